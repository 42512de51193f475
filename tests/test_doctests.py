"""Run the doctests of every gradlab module and of README.md under the strict test set-up."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import gradlab

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(gradlab.__path__, prefix="gradlab.")
    if "__main__" not in m.name
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# the examples print what they print on XLA:CPU (memory, FLOPs, chunking): they run there (conftest)
pytestmark = pytest.mark.usefixtures("xla_cpu")


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False)
    assert result.failed == 0, (
        f"{result.failed} doctest(s) failed in {name} (run pytest -s to see them)"
    )


def test_readme_doctests():
    result = doctest.testfile(str(ROOT / "README.md"), module_relative=False, optionflags=FLAGS)
    assert result.attempted >= 10, "the README's Python examples were not found"
    assert result.failed == 0, (
        f"{result.failed} README doctest(s) failed (run pytest -s to see them)"
    )
