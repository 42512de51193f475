"""Run the doctests of every gradlab module and of README.md under the strict test set-up."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import jax
import pytest

import gradlab

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(gradlab.__path__, prefix="gradlab.")
    if "__main__" not in m.name
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.fixture(autouse=True)
def _on_the_cpu_device():
    """The examples print what they print on XLA:CPU (memory, FLOPs, chunking): run them there, also
    on a machine with an accelerator."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


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
