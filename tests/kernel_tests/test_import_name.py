"""genkv's kernels/ folder never stands in for Hugging Face's ``kernels`` package.

Run from a checkout's root, ``python -c`` and ``python -m`` put the root on sys.path, where the folder ``kernels/``
(genkv.kernels) would answer ``import kernels``. diffusers imports that name whenever the ``kernels``
distribution is installed (transformers 5 installs it), so genkv's folder hands the import over to the real one.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import genkv.kernels

CHECKOUT = Path(genkv.kernels.__file__).resolve().parent.parent


@pytest.mark.skipif(not (CHECKOUT / "pyproject.toml").exists(), reason="installed package: no checkout root to run from")
def test_import_kernels_from_a_checkout_root_gets_the_real_package():
    probe = (
        "import sys, genkv.kernels, genkv.pipelines\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError as err:\n"
        "    print('IMPORTERROR', err)\n"
        "else:\n"
        "    print('FILE', kernels.__file__)\n"
        "print('GENKV', genkv.kernels.block_sparse_attention.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["GENKV"] == "genkv.kernels.dispatch"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert lines.get("FILE") == "None"  # the empty stand-in that reads as "not installed"
    else:
        assert "FILE" in lines and not Path(lines["FILE"]).resolve().is_relative_to(CHECKOUT / "kernels")


def test_without_the_real_package_the_stand_in_reads_as_not_installed(tmp_path):
    from genkv.kernels import _real_kernels_package

    module, spec = _real_kernels_package([str(tmp_path)])  # a search path with no 'kernels' on it
    assert spec is None
    # transformers' rule for a name that a folder merely shadows: no version and no __file__
    assert getattr(module, "__version__", "N/A") == "N/A" and getattr(module, "__file__", None) is None
    with pytest.raises(AttributeError):
        module.CUDAProperties  # what diffusers' and transformers' hub-kernel integrations import first


@pytest.mark.skipif(not (CHECKOUT / "pyproject.toml").exists(), reason="installed package: no checkout root to run from")
def test_a_checkout_runs_without_its_install(tmp_path):
    """Run from a checkout, its genkv/ folder shadows whatever is installed (a regular install too): the rooms
    beside it must still import as genkv.kernels / genkv.pipelines / genkv.configs."""
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
             "import genkv.kernels, genkv.pipelines, genkv.configs\n"
             "print(genkv.kernels.__file__)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == CHECKOUT / "kernels" / "__init__.py"
