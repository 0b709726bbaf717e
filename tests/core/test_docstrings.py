"""Every docstring example in the package runs and prints what it says (the public API's runnable examples)."""

import doctest
import importlib
import pkgutil

import pytest



def _modules():
    import genkv.kernels
    import genkv.pipelines

    names = set()
    # genkv.kernels and genkv.pipelines live in the top-level kernels/ and pipelines/ folders: walk them too.
    for package in (genkv, genkv.kernels, genkv.pipelines):
        names.add(package.__name__)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert failures == 0, f"{failures} docstring example(s) failed in {name}"
