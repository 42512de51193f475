"""Input validation shared by every gradlab module.

One exception type per kind of mistake, and one helper per kind of check, so every message reads the same
way: *which argument*, *what was expected*, *what was seen*, and *how to fix it*. Modelled on lineax's and
equinox's error messages.

Floor 1: no gradlab imports.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "GradlabError",
    "NotScalarError",
    "OptionError",
    "ShapeError",
    "UnknownNameError",
    "check_choice",
    "check_options",
    "check_positive",
    "check_positive_int",
    "check_same_structure",
    "check_scalar_output",
    "keyword_defaults",
]


class GradlabError(ValueError):
    """Base class of gradlab's input errors (a ``ValueError``, so ``except ValueError`` catches it)."""


class UnknownNameError(GradlabError, KeyError):
    """A name (problem, method, strategy, policy, ...) that is not in its registry."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class OptionError(GradlabError, TypeError):
    """An option that a constructor does not take, or a value of the wrong type or out of range."""


class ShapeError(GradlabError):
    """An array or pytree whose shape or structure does not match what was expected."""


class NotScalarError(GradlabError):
    """A loss that does not return a real scalar."""


def _suggest(value: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(argument: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise :class:`UnknownNameError`.

    >>> check_choice("method", "central", ["forward", "central"])
    'central'
    >>> check_choice("method", "centrl", ["forward", "central"])
    Traceback (most recent call last):
    ...
    gradlab._validate.UnknownNameError: method: unknown name 'centrl'; expected one of ['central', 'forward']. Did you mean 'central'?
    """
    allowed = sorted(allowed)
    if value not in allowed:
        raise UnknownNameError(
            f"{argument}: unknown name {value!r}; expected one of {allowed}.{_suggest(value, allowed)}"
        )
    return value


def check_options(argument: str, given: Mapping[str, Any], accepted: Mapping[str, Any]) -> None:
    """Raise :class:`OptionError` if ``given`` has a key that ``accepted`` (name -> default) lacks."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        shown = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        name = unknown[0]
        raise OptionError(
            f"{argument}: unknown option {name!r}; the accepted options (with defaults) are: {shown}."
            f"{_suggest(name, accepted)}"
        )


def check_positive_int(argument: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ≥ ``minimum``; otherwise raise :class:`OptionError`.

    >>> check_positive_int("dim", 3)
    3
    >>> check_positive_int("dim", -3)
    Traceback (most recent call last):
    ...
    gradlab._validate.OptionError: dim: expected an integer ≥ 1, got -3.
    """
    if isinstance(value, bool) or not isinstance(value, int | _np_integer()):
        raise OptionError(f"{argument}: expected an integer ≥ {minimum}, got {value!r}.")
    if value < minimum:
        raise OptionError(f"{argument}: expected an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def check_positive(argument: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0; otherwise raise :class:`OptionError`."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{argument}: expected a positive number, got {value!r}.") from None
    if not (x > 0 and x != float("inf")):
        raise OptionError(f"{argument}: expected a positive finite number, got {value!r}.")
    return x


def check_scalar_output(argument: str, out: Any) -> None:
    """Raise :class:`NotScalarError` unless ``out`` is a real floating-point scalar (shape ``()``)."""
    import jax
    import numpy as np

    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape is None:
        if isinstance(out, int | float):
            return
        raise NotScalarError(
            f"{argument}: the function must return a real scalar, got {type(out).__name__}. "
            "Return a 0-d array, e.g. reduce with jnp.sum or jnp.mean."
        )
    if shape != ():
        raise NotScalarError(
            f"{argument}: the function must return a real scalar (shape ()), got shape {tuple(shape)}. "
            "Reduce the output, e.g. with jnp.sum(...) or jnp.mean(...), or pass a scalar loss."
        )
    if dtype is not None and np.issubdtype(dtype, np.complexfloating):
        raise NotScalarError(
            f"{argument}: the function must return a real scalar, got dtype {dtype}. "
            "Take jnp.real(...) or a norm of the output."
        )
    if dtype is not None and not jax.numpy.issubdtype(dtype, jax.numpy.floating):  # bfloat16 too
        raise NotScalarError(
            f"{argument}: the function must return a real floating-point scalar to be differentiated, "
            f"got dtype {dtype}. Compute the loss in floating point (integer parameters? cast them, "
            "e.g. jnp.asarray(params, jnp.float64))."
        )


def check_float_params(argument: str, tree: Any) -> None:
    """Raise :class:`OptionError` unless every leaf of ``tree`` is a real floating-point array (the
    point a derivative is taken at), naming the first leaf that is not.

    >>> import numpy as np
    >>> check_float_params("params", {"b": np.zeros(2), "w": np.arange(2)})
    Traceback (most recent call last):
    ...
    gradlab._validate.OptionError: params: leaf ['w'] has dtype int..., expected real floating-point arrays (derivatives are taken with respect to them). Cast them, e.g. jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params).
    """
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ShapeError(f"{argument}: expected at least one array, got an empty pytree {tree!r}.")
    for path, leaf in leaves:
        dtype = jax.numpy.result_type(leaf)
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):  # bfloat16 is floating
            where = f"leaf {jax.tree_util.keystr(path)}" if path else "the array"
            raise OptionError(
                f"{argument}: {where} has dtype {dtype}, expected real floating-point arrays "
                f"(derivatives are taken with respect to them). Cast them, e.g. "
                f"jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), {argument.split()[-1]})."
            )


def check_key(key: Any, who: str) -> None:
    """Raise :class:`OptionError` unless ``key`` is one PRNG key: a typed ``jax.random.key(seed)``
    (shape ``()``) or a raw ``uint32[2]`` ``jax.random.PRNGKey``. ``who`` names the caller; keys are
    never defaulted.

    >>> check_key(None, "trace")
    Traceback (most recent call last):
    ...
    gradlab._validate.OptionError: key: trace needs an explicit PRNG key (keys are never defaulted), got None. Pass key=jax.random.key(seed).
    """
    import jax
    import jax.numpy as jnp

    if key is None:
        raise OptionError(
            f"key: {who} needs an explicit PRNG key (keys are never defaulted), got None. "
            "Pass key=jax.random.key(seed)."
        )
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype is not None and dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        got = type(key).__name__
        if dtype is not None or shape is not None:
            got += f" with dtype {dtype} and shape {shape}"
        raise OptionError(
            f"key: expected a single jax.random.key(seed) (or a raw uint32[2] PRNGKey), got {got}. "
            "Pass key=jax.random.key(seed)."
        )


def check_same_structure(argument: str, tree: Any, like: Any, *, dtypes: bool = False) -> None:
    """Raise :class:`ShapeError` unless ``tree`` has the structure and leaf shapes of ``like`` (and,
    with ``dtypes``, :class:`OptionError` unless its leaves have their dtypes too)."""
    import jax

    t_leaves, t_def = jax.tree.flatten(tree)
    l_paths, l_def = jax.tree_util.tree_flatten_with_path(like)
    if t_def != l_def:
        raise ShapeError(
            f"{argument}: expected a pytree with the structure of the parameters, {l_def}; got {t_def}."
        )
    for a, (path, b) in zip(t_leaves, l_paths, strict=True):
        where = f"leaf {jax.tree_util.keystr(path)}" if path else "the array"
        if jax.numpy.shape(a) != jax.numpy.shape(b):
            raise ShapeError(
                f"{argument}: {where} has shape {jax.numpy.shape(a)}, expected {jax.numpy.shape(b)} "
                "(the shape of the matching parameter)."
            )
        if dtypes and (ta := jax.numpy.result_type(a)) != (tb := jax.numpy.result_type(b)):
            raise OptionError(
                f"{argument}: {where} has dtype {ta}, expected {tb} (the dtype of the matching "
                f"parameter). Cast it, e.g. jax.tree.map(lambda a, b: a.astype(b.dtype), "
                f"{argument}, params)."
            )


def _np_integer():
    import numpy as np

    return np.integer


def keyword_defaults(fn: Any) -> dict[str, Any]:
    """The keyword-only parameters of ``fn`` with their defaults: a constructor's options.

    >>> def two_point(*, num_directions=1, distribution="sphere"): ...
    >>> keyword_defaults(two_point)
    {'num_directions': 1, 'distribution': 'sphere'}
    """
    import inspect

    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
