"""Experiment configs: TOML → pydantic v2 models → a resolved, JSON-able spec.

A config file has a few top-level keys and one section per experiment kind::

    name = "quickstart"        # default: the file's stem
    kind = "descent"           # one of gradlab.lab.kinds.names()
    seed = 0                   # the root of every PRNG key
    repeats = 3                # independent problem instances and strategy keys
    dtype = "float64"          # or "float32"

    [descent]                  # the section of the chosen kind (its own pydantic model)
    num_steps = 500
    ...

Every model forbids unknown keys (``extra="forbid"``), and every error is reported with the path of the
field in the file and the allowed values, e.g. ``descent.strategy[1].num_directions: expected an integer
≥ 1, got -3``. Sweep axes are lists (:data:`Sweep`): a scalar is a one-point axis.

:func:`load` reads and validates a file; :func:`parse` does the same for a dict (the property tests use it);
:class:`ConfigError` is raised for any problem, with one line per error.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from gradlab._validate import GradlabError

__all__ = [
    "Base",
    "ConfigError",
    "Experiment",
    "PosInt",
    "PositiveFloat",
    "Sweep",
    "format_errors",
    "load",
    "parse",
    "product",
]

T = TypeVar("T")


class ConfigError(GradlabError):
    """A config that cannot be used: TOML syntax, unknown keys, wrong types, out-of-range values."""


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else [value]


def _nonempty(value: list) -> list:
    if not value:
        raise ValueError("expected a non-empty list (or a single value)")
    return value


# A sweep axis: a value or a non-empty list of values (a scalar is a one-point axis).
Sweep = Annotated[list[T], BeforeValidator(_as_list), pydantic.AfterValidator(_nonempty)]
PosInt = Annotated[int, Field(ge=1, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
# strict: a TOML string ("1e-6") or boolean (true) is an error, not silently a number; integers are fine
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class Base(BaseModel):
    """Base of every config model: unknown keys are errors that list the allowed keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = [f.alias or k for k, f in cls.model_fields.items() if not k.startswith("_")]
            unknown = [k for k in data if k not in allowed]
            if unknown:
                close = difflib.get_close_matches(str(unknown[0]), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise pydantic_core_error(
                    "unknown_key",
                    f"unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}.{hint}",
                )
        return data


def pydantic_core_error(kind: str, message: str) -> Exception:
    from pydantic_core import PydanticCustomError

    return PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}"))


class Experiment(Base):
    """The top-level keys of a config; the kind's section is validated by the kind's own model."""

    name: str = Field(default="experiment", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: str
    description: str = ""
    seed: NonNegInt = 0
    repeats: PosInt = 1
    dtype: Literal["float64", "float32"] = "float64"


# --------------------------------------------------------------------------------------------------
# error formatting


def _walk(raw: Any, loc: Sequence[Any]) -> str:
    """The path of ``loc`` in the user's file, skipping pydantic's internal steps (union tags, the
    index pydantic adds when a scalar sweep value is wrapped into a one-point list)."""
    parts: list[str] = []
    node = raw
    for step in loc:
        if isinstance(step, int):
            if isinstance(node, list):
                parts.append(f"[{step}]")
                node = node[step] if 0 <= step < len(node) else None
            continue  # a scalar wrapped into a list: the user wrote no index
        if isinstance(node, Mapping) and step in node:
            parts.append(f".{step}" if parts else str(step))
            node = node[step]
        elif (
            isinstance(node, Mapping)
            and step not in node
            and step
            in (
                "function-after",
                "function-before",
                "function-wrap",
                "function-plain",
            )
        ):
            continue
        elif isinstance(node, Mapping) and node.get("name") == step:
            continue  # a discriminator tag
        else:
            parts.append(f".{step}" if parts else str(step))
            node = None
    return "".join(parts) or "(top level)"


def _type_word(ctx_value: Any, expected_type: str | None) -> str:
    if expected_type == "int" or (isinstance(ctx_value, int) and not isinstance(ctx_value, bool)):
        return "an integer"
    return "a number"


_EXPECT = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_error(err: Mapping[str, Any], raw: Any, prefix: Sequence[Any] = ()) -> str:
    """One line ``path: expected ..., got ...`` for one pydantic error dict."""
    loc = (*prefix, *err.get("loc", ()))
    path = _walk(raw, loc)
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind in ("unknown_key", "value_error", "assertion_error") or kind.startswith("gradlab_"):
        msg = err.get("msg", "")
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return f"{path}: {msg}"
    if kind == "missing":
        return f"{path}: required key missing."
    if kind == "extra_forbidden":
        return f"{path}: unknown key."
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sym = {
            "greater_than_equal": "≥",
            "greater_than": ">",
            "less_than_equal": "≤",
            "less_than": "<",
        }
        bound = next(iter(ctx.values()), None)
        word = _type_word(got, None) if isinstance(got, int) else _type_word(bound, None)
        shown = f"{bound:g}" if isinstance(bound, int | float) else bound
        return f"{path}: expected {word} {sym[kind]} {shown}, got {_short(got)}."
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected", "")
        close = difflib.get_close_matches(str(got), re.findall(r"'([^']*)'", str(expected)), n=1)
        hint = f" Did you mean {close[0]!r}?" if close and isinstance(got, str) else ""
        return f"{path}: expected one of {expected}, got {_short(got)}.{hint}"
    if kind in _EXPECT:
        return f"{path}: expected {_EXPECT[kind]}, got {_short(got)}."
    if kind == "string_pattern_mismatch":
        return f"{path}: expected letters, digits, '_', '.' or '-' only, got {_short(got)}."
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        if kind == "too_short" and isinstance(least, int) and least > 1:
            return f"{path}: expected at least {least} values, got {_short(got)}."
        return f"{path}: must not be empty."
    return f"{path}: {err.get('msg', kind)} (got {_short(got)})."


def format_errors(exc: pydantic.ValidationError, raw: Any, prefix: Sequence[Any] = ()) -> list[str]:
    """Every error of a pydantic ``ValidationError`` as a ``path: message`` line (deduplicated).

    ``raw`` is the input that failed (the messages quote its values); ``prefix`` is prepended to every
    path (a kind's section name).

    >>> class Opts(pydantic.BaseModel):
    ...     dim: pydantic.PositiveInt
    >>> try:
    ...     Opts.model_validate({"dim": 0})
    ... except pydantic.ValidationError as exc:
    ...     print(format_errors(exc, {"dim": 0}, prefix=["problem"]))
    ['problem.dim: expected an integer > 0, got 0.']
    """
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        line = format_error(err, raw, prefix)
        if line not in lines:
            lines.append(line)
    return lines


def raise_errors(lines: Sequence[str], source: str | None = None) -> None:
    """Raise one :class:`ConfigError` listing ``lines`` (nothing if empty)."""
    if not lines:
        return
    head = f"{source}: " if source else ""
    if len(lines) == 1:
        raise ConfigError(f"{head}{lines[0]}")
    body = "\n".join(f"  - {line}" for line in lines)
    raise ConfigError(f"{head}{len(lines)} errors in the config:\n{body}")


# --------------------------------------------------------------------------------------------------
# loading


def parse(
    data: Any, *, source: str | None = None, default_name: str | None = None, deep: bool = True
):
    """Validate a config ``data`` (a dict, as ``tomllib`` returns) into a resolved config.

    Returns a :class:`gradlab.lab.kinds.Resolved` (``experiment``, ``section``, ``kind``). Raises
    :class:`ConfigError` (never anything else) naming every bad field.

    >>> cfg = parse({"kind": "gradcheck", "gradcheck": {"problem": ["quadratic"]}})
    >>> cfg.kind.NAME, cfg.experiment.repeats, [p["name"] for p in cfg.section.problem]
    ('gradcheck', 1, ['quadratic'])
    >>> parse({"kind": "descent", "descent": {"num_steps": 0}})
    Traceback (most recent call last):
    ...
    gradlab.lab.config.ConfigError: descent.num_steps: expected an integer ≥ 1, got 0.

    Reference: pydantic v2 documentation, "Models" and "Validation errors" (the field-path ``loc`` of
    each error, which the messages above name as ``section.field``).
    """
    from gradlab.lab import kinds

    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source or 'config'}: expected a table of keys (kind = ..., [section]), "
            f"got {type(data).__name__}."
        )
    data = dict(data)
    if default_name is not None and "name" not in data:
        data["name"] = default_name
    fields = Experiment.model_fields
    top = {k: v for k, v in data.items() if not isinstance(v, Mapping) or k in fields}
    sections = {k: v for k, v in data.items() if isinstance(v, Mapping) and k not in fields}
    known_sections = kinds.names()
    errors: list[str] = []
    for k in sections:
        if k not in known_sections:
            close = difflib.get_close_matches(k, known_sections, n=1)
            hint = f" Did you mean [{close[0]}]?" if close else ""
            errors.append(
                f"[{k}]: unknown section; sections are the experiment kinds: "
                f"{', '.join(known_sections)}.{hint}"
            )
    try:
        experiment = Experiment.model_validate(top)
    except pydantic.ValidationError as e:
        errors.extend(format_errors(e, data))
        experiment = None
    kind = None
    kind_name = data.get("kind")
    if isinstance(kind_name, str):
        if kind_name not in known_sections:
            close = difflib.get_close_matches(kind_name, known_sections, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            errors.append(
                f"kind: unknown kind {kind_name!r}; expected one of "
                f"{', '.join(known_sections)}.{hint}"
            )
        else:
            kind = kinds.get(kind_name)
            for other in sections:
                if other != kind_name and other in known_sections:
                    errors.append(
                        f"[{other}]: this section is read by kind {other!r}, but kind = "
                        f"{kind_name!r}; remove it or change kind."
                    )
    section = None
    if kind is not None:
        raw_section = data.get(kind.NAME, {})
        try:
            section = kind.Section.model_validate(raw_section)
        except pydantic.ValidationError as e:
            errors.extend(format_errors(e, data, prefix=(kind.NAME,)))
        if section is not None:
            try:
                section, more = kind.check(section, experiment, data)
                errors.extend(more)
            except GradlabError as e:  # a kind's semantic check that raised instead of listing
                errors.append(f"{kind.NAME}: {e}")
    if deep and not errors and hasattr(kind, "check_instances"):
        errors.extend(kind.check_instances(section, experiment))
    raise_errors(errors, source)
    return kinds.Resolved(
        experiment=experiment, section=section, kind=kind, source=source, checked=deep
    )


def load(path: str | Path, *, deep: bool = True):
    """Read and validate the TOML config at ``path`` (see :func:`parse`); the name defaults to its stem.

    Raises :class:`ConfigError` for a missing file, a TOML syntax error (with line and column) or any
    invalid field. ``deep=False`` skips the kind's instance checks (building every problem and
    strategy), which :func:`gradlab.lab.run` does itself only when some run must be computed.

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = pathlib.Path(d) / "my sweep.toml"
    ...     _ = path.write_text('kind = "gradcheck"\\n[gradcheck]\\nproblem = ["quadratic"]\\n')
    ...     cfg = load(path)
    ...     _ = path.write_text('kind = "gradcheck"\\n[gradcheck\\n')
    ...     try:
    ...         load(path)
    ...     except ConfigError as e:
    ...         print("TOML syntax error" in str(e))
    True
    >>> cfg.experiment.name  # the file's stem, made safe for a folder name
    'my_sweep'

    Reference: Python's ``tomllib`` (TOML 1.0, https://toml.io/en/v1.0.0); :func:`parse`.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e}).") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}.") from None
    # the default name is the file's stem, with characters a run folder name cannot hold replaced
    default_name = re.sub(r"[^A-Za-z0-9_.-]", "_", p.stem).strip(".") or "experiment"
    return parse(data, source=str(path), default_name=default_name, deep=deep)


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of sweep ``axes`` (name → values), in the order given.

    >>> product({"a": [1, 2], "b": ["x"]})
    [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]
    """
    out: list[dict[str, Any]] = [{}]
    for name, values in axes.items():
        out = [{**row, name: v} for row in out for v in values]
    return out
