"""YAML presets shipped with genkv (installed as ``genkv.configs``); load with ``genkv.load_preset(name)``."""
