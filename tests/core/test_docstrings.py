"""Every docstring example in the package runs and prints what it says (the public API's runnable examples).

Only modules whose docstrings hold examples become tests: a module without one has nothing to check here.
"""

import doctest
import importlib
import pkgutil

import pytest

import genkv

_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    import genkv.kernels
    import genkv.pipelines

    names = set()
    # genkv.kernels and genkv.pipelines live in the top-level kernels/ and pipelines/ folders: walk them too.
    for package in (genkv, genkv.kernels, genkv.pipelines):
        names.add(package.__name__)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
    finder = doctest.DocTestFinder()
    with_examples = []
    for name in sorted(names):
        module = importlib.import_module(name)
        if any(test.examples for test in finder.find(module)):
            with_examples.append(name)
    return with_examples


MODULES = _modules_with_examples()


def test_the_public_api_has_examples():
    # the walk above must find the examples the README points to, or every test below silently disappears
    assert {"genkv.api", "genkv.testing"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=_FLAGS, verbose=False)
    assert result.attempted > 0, f"{name} was collected for its examples but doctest ran none"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
