"""Property tests: malformed configs never give a traceback, always a field-named message."""

from __future__ import annotations

import copy
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gradlab import lab  # noqa: E402

VALID = {
    "kind": "descent",
    "seed": 0,
    "repeats": 1,
    "dtype": "float64",
    "descent": {
        "num_steps": 10,
        "tol": 1e-3,
        "problem": [{"name": "quadratic", "dim": 3}],
        "strategy": [{"name": "exact"}, {"name": "two_point", "num_directions": [1, 2]}],
        "optimizer": [{"name": "sgd", "learning_rate": "theory"}],
    },
}

# values a user might mistype: wrong types, out of range, non-finite, empty, nested
LEAVES = st.sampled_from(
    [
        -3,
        0,
        1,
        2,
        7,
        -1.5,
        0.0,
        0.5,
        float("nan"),
        float("inf"),
        "",
        "x",
        "sphere",
        "theory",
        "exact",
        "descent",
        "float16",
        True,
        False,
        None,
    ]
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["name", "dim", "k", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = st.sampled_from(
    [
        "kind",
        "seed",
        "repeats",
        "dtype",
        "descent",
        "gradcheck",
        "name",
        "dim",
        "num_directions",
        "distribution",
        "learning_rate",
        "problem",
        "strategy",
        "optimizer",
        "tol",
        "num_steps",
        "bogus",
        "Seed",
    ]
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw):
    cfg = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(cfg) if p]
        path = draw(st.sampled_from(paths))
        parent = cfg
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
    return cfg


LINE = re.compile(r"^(\s+- )?[^\s:][^:]*: \S")


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(mutated())
def test_malformed_configs_give_field_named_errors(cfg):
    try:
        lab.parse(cfg)
    except lab.ConfigError as e:
        lines = str(e).splitlines()
        body = (
            lines[1:]
            if len(lines) > 1 and lines[0].endswith("errors in the config:")
            else lines[:1]
        )
        for line in body:
            assert LINE.match(line), f"no field path in: {line!r}"
    # any other exception type fails the test (a traceback a user would see)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list('kind=" descent[]\n0123.-_x{},#')), max_size=60))
def test_arbitrary_toml_text_never_crashes(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("cfg") / "c.toml"
    p.write_text(text)
    try:
        lab.load(p)
    except lab.ConfigError as e:
        assert str(e).startswith(str(p))
