"""``genkv methods``: every method's settings with their defaults and meaning, video and image methods apart.

The meanings come from each method class's docstring (its ``Args:`` section), so the listing and the API
documentation cannot disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

#: a field documented under another name by the method it comes from (fastar's prompt_top_k is annca's top_k)
_SAME_AS = {"prompt_top_k": "top_k"}


def docstring_args(cls: type) -> dict[str, str]:
    """``{field: one-line meaning}`` from the ``Args:`` sections of ``cls`` and its bases (``a, b: text`` lines
    document both fields; indented lines continue the previous one)."""
    meanings: dict[str, str] = {}
    for klass in cls.__mro__:
        doc = inspect.getdoc(klass) or ""
        match = re.search(r"^Args:\n((?:[ \t]+\S.*\n?|\n)*)", doc, re.MULTILINE)
        if not match:
            continue
        current: list[str] = []
        for line in match.group(1).splitlines():
            # a field name starts right after the 4-space indent; deeper lines continue the entry above (their
            # own colons, as in "frame budget: ...", are text)
            entry = re.match(r"^ {4}(\w[\w, ]*):\s*(.*)$", line)
            if entry:
                current = [name.strip() for name in entry.group(1).split(",")]
                for name in current:
                    meanings.setdefault(name, entry.group(2).strip())
            elif line.strip() and current:
                for name in current:
                    meanings[name] = f"{meanings[name]} {line.strip()}"
    return meanings


def _one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    cut = re.search(r"(?<=\.)\s", text)
    return text[: cut.start()].rstrip(".") if cut else text.rstrip(".")


def _meaning(cls: type, field: dataclasses.Field, documented: dict[str, list[tuple[type, str]]]) -> str:
    """The field's meaning from ``cls``'s docstring; else from the method that documents the same setting with
    the same default (fastar's fields are tempcache's, annsa's and annca's); else from any that documents it."""
    own = docstring_args(cls)
    if field.name in own:
        return own[field.name]
    candidates = documented.get(field.name) or documented.get(_SAME_AS.get(field.name, ""), [])
    for other, text in candidates:
        same = [f for f in dataclasses.fields(other) if f.name in (field.name, _SAME_AS.get(field.name))]
        if same and same[0].default == field.default:
            return text
    return candidates[0][1] if candidates else ""


def _setting(field: dataclasses.Field) -> str:
    return f"{field.name}={field.default!r}" if isinstance(field.default, str) else f"{field.name}={field.default}"


def is_image_method(cls: type) -> bool:
    """Next-scale (VAR) image methods build a scale cache instead of a video keeper."""
    return hasattr(cls, "build_scale_cache")


def describe_methods() -> list[str]:
    """The lines ``genkv methods`` prints."""
    import genkv
    from genkv.registry import _METHODS

    genkv.list_methods()  # registers the built-in methods
    classes = {name: _METHODS[name] for name in genkv.list_methods()}
    documented: dict[str, list[tuple[type, str]]] = {}
    for cls in classes.values():
        for key, text in docstring_args(cls).items():
            documented.setdefault(key, []).append((cls, text))
    lines: list[str] = []
    sections = (
        ("video methods (genkv render --method NAME --set KEY=VALUE; apply_genkv on a video pipeline)", False),
        ("image methods (next-scale VAR models: apply_genkv(VARPipeline, NAME); genkv calibrate)", True),
    )
    for title, image in sections:
        lines += ["", title] if lines else [title]
        for name, cls in classes.items():
            if is_image_method(cls) != image:
                continue
            summary = _first_sentence(inspect.getdoc(cls) or "")
            lines.append(f"  {name:<10} {summary}")
            for field in dataclasses.fields(cls):
                lines.append(f"      {_setting(field):<26} {_one_line(_meaning(cls, field, documented))}".rstrip())
            if not dataclasses.fields(cls):
                lines.append("      (no settings)")
        if not image:
            from .render import DEFAULT_METHOD, DEFAULT_SETTINGS

            settings = ", ".join(f"{k}={v}" for k, v in DEFAULT_SETTINGS.items())
            lines.append(f"  (genkv render without --method or --config: {DEFAULT_METHOD} with {settings})")
    lines += ["", "presets (--config NAME, or --method NAME; settings as shipped in configs/NAME.yaml)"]
    for name in genkv.list_presets():
        cfg = genkv.load_preset(name)
        fields = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k != "method")
        lines.append(f"  {name:<16} {cfg.name}: {fields}")
    return lines
