"""Pieces shared by the experiment kinds: problem entries, stable hashes and keys, thinning."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydantic
from pydantic import StrictBool, create_model

from gradlab.lab.config import FiniteFloat, PosInt, Sweep, format_errors, product

__all__ = [
    "base_spec",
    "canonical",
    "entry_label",
    "expand_entries",
    "make_problem",
    "problem_key",
    "stable_hash",
    "thin",
    "validate_entries",
]


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the text that ids and keys are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any) -> int:
    """A 31-bit integer hash of ``obj``'s canonical JSON, the same in every process and version.

    >>> stable_hash({"name": "exact"}) == stable_hash({"name": "exact"})
    True
    """
    return int(hashlib.sha256(canonical(obj).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def base_spec(kind: str, experiment: Any, repeat: int) -> dict[str, Any]:
    """The keys every run spec starts with: kind, seed, dtype and the repeat index."""
    return {"kind": kind, "seed": experiment.seed, "dtype": experiment.dtype, "repeat": repeat}


def _normalise(entry: Any) -> Any:
    return {"name": entry} if isinstance(entry, str) else entry


@functools.cache
def _problem_model(name: str) -> type[pydantic.BaseModel]:
    """A pydantic model of problem ``name``'s options, built from its constructor's defaults."""
    from gradlab import problems
    from gradlab.lab.config import Base

    fields: dict[str, Any] = {"name": (str, ...)}
    for opt, default in problems.options(name).items():
        if opt == "dtype":
            continue  # set at the top level of the config
        if isinstance(default, bool):
            fields[opt] = (Sweep[StrictBool], [default])
        elif isinstance(default, int):
            fields[opt] = (Sweep[PosInt], [default])
        elif isinstance(default, float):
            fields[opt] = (Sweep[FiniteFloat], [default])
        else:
            fields[opt] = (Sweep[Any], [default])
    return create_model(f"Problem_{name}", __base__=Base, **fields)


def validate_entries(
    entries: Sequence[Any],
    registry: str,
    models: Any,
    raw: Any,
    prefix: tuple,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate a list of ``{name = ..., option = value or [values]}`` entries against per-name models.

    ``registry`` names the axis in messages (``problem``/``strategy``); ``models(name)`` returns the
    pydantic model of one name or raises ``KeyError`` for unknown names (listed with the allowed
    names). Returns the normalised entries (every option a list) and error lines.
    """
    out: list[dict[str, Any]] = []
    errors: list[str] = []
    from gradlab.lab.config import _walk

    for i, entry in enumerate(entries):
        entry = _normalise(entry)
        where = (*prefix, i)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            errors.append(
                f"{_walk(raw, where)}: expected a {registry} name or a table with name = "
                f"'<{registry}>' and its options, got {entry!r}."
            )
            continue
        try:
            model = models(entry["name"])
        except KeyError as e:
            msg = str(e.args[0] if e.args else e).removeprefix(f"{registry}: ")
            errors.append(f"{_walk(raw, (*where, 'name'))}: {msg}")
            continue
        try:
            obj = model.model_validate(dict(entry))
        except pydantic.ValidationError as e:
            errors.extend(format_errors(e, raw, where))
            continue
        out.append(obj.model_dump(mode="json"))
    return out, errors


def problem_models(name: str) -> type[pydantic.BaseModel]:
    """The option model of a catalog problem (``KeyError`` with the allowed names if unknown)."""
    from gradlab import problems
    from gradlab._validate import check_choice

    return _problem_model(check_choice("problem", name, problems.names()))


def expand_entries(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each entry's own sub-grid: the product of its list-valued options, one dict per point.

    >>> expand_entries([{"name": "exact"}, {"name": "two_point", "num_directions": [1, 4]}])
    [{'name': 'exact'}, {'name': 'two_point', 'num_directions': 1}, {'name': 'two_point', 'num_directions': 4}]
    """
    out: list[dict[str, Any]] = []
    for entry in entries:
        axes = {
            k: v if isinstance(v, list) else [v]
            for k, v in entry.items()
            if k not in ("name", "label")
        }
        for point in product(axes):
            spec = {"name": entry["name"], **point}
            if entry.get("label"):
                spec["label"] = entry["label"]
            out.append(spec)
    return out


def entry_label(spec: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
    """A short display label: the name and the options that differ from their defaults.

    >>> entry_label({"name": "two_point", "num_directions": 4, "distribution": "sphere"},
    ...             {"num_directions": 1, "distribution": "sphere"})
    'two_point(num_directions=4)'
    """
    if spec.get("label"):
        return str(spec["label"])
    defaults = defaults or {}
    opts = [
        f"{k}={v}"
        for k, v in spec.items()
        if k not in ("name", "label") and (k not in defaults or defaults[k] != v)
    ]
    return f"{spec['name']}({', '.join(opts)})" if opts else str(spec["name"])


def problem_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "name"}


def problem_key(seed: int, problem: Mapping[str, Any], repeat: int):
    """The instance key: ``fold_in(fold_in(key(seed), hash(problem spec)), repeat)``.

    It depends on nothing else, so adding a strategy or a problem does not change another run's numbers.
    """
    import jax

    root = jax.random.key(seed)
    return jax.random.fold_in(jax.random.fold_in(root, stable_hash(dict(problem))), repeat)


def make_problem(spec: Mapping[str, Any], key: Any, dtype: str):
    from gradlab import problems

    return problems.make(spec["name"], key, dtype=dtype, **problem_options(spec))


def build_problem_points(
    entries: Sequence[Mapping[str, Any]], dtype: str, kind_name: str
) -> tuple[list[tuple[dict[str, Any], Any]], list[str]]:
    """Build every problem point of ``entries`` once, for the deep config checks: ``(spec, problem)``
    pairs and the errors, each naming ``<kind>.problem[i]`` and the point (an entry stops at its first
    failing point). Call under x64, as the runs execute."""
    import jax

    from gradlab import problems

    built, errors = [], []
    for i, entry in enumerate(entries):
        for spec in expand_entries([entry]):
            try:
                built.append((spec, make_problem(spec, jax.random.key(0), dtype)))
            except Exception as e:
                label = entry_label(spec, problems.options(spec["name"]))
                errors.append(f"{kind_name}.problem[{i}] ({label}): {e}")
                break
    return built, errors


def thin(n: int, points: int) -> np.ndarray:
    """At most ``points`` (≥ 2) indices of ``0..n``: half linear, half geometric, with 0 and n.

    >>> thin(10, 100).tolist() == list(range(11))
    True
    >>> idx = thin(100_000, 50); int(idx[0]), int(idx[-1]), len(idx) <= 50
    (0, 100000, True)
    """
    if n + 1 <= points:
        return np.arange(n + 1)
    half = max(points // 2, 2)
    lin = np.linspace(0, n, half).round().astype(np.int64)
    geo = np.geomspace(1, n, points - half).round().astype(np.int64)
    idx = np.unique(np.concatenate([lin, geo, [0, n]]))
    while len(idx) > points:  # rounding collisions can leave a few too many; drop interior ones
        idx = np.delete(idx, len(idx) // 2)
    return idx
