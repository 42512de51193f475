"""The matrix-calculus catalog: textbook losses with hand-derived closed-form gradients.

Every problem is a pure JAX loss plus its gradient derived by hand with differentials — write the
differential of the loss as ``df = ⟨G, dx⟩`` and read the gradient off as ``G`` — an HVP where it is
simple, a random-instance constructor and what is known about the instance (solution, optimal value,
smoothness ``L`` and strong convexity ``μ``).

>>> import jax
>>> from gradlab import problems
>>> "quadratic" in problems.names()
True
>>> p = problems.make("least_squares", jax.random.key(0), dim=3, num_samples=8)
>>> p.grad(p.init).shape
(3,)

The names, options and defaults of every problem: ``problems.names()`` and ``problems.options(name)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from gradlab._validate import (
    OptionError,
    check_choice,
    check_key,
    check_options,
    keyword_defaults,
)

__all__ = [
    "Problem",
    "SchwarzMixedPartials",
    "describe",
    "make",
    "names",
    "options",
    "register",
    "schwarz_mixed_partials",
]

Params = Any
Factory = Callable[..., "Problem"]


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One instance of a catalog problem.

    Attributes:
      name: the registry name (``problems.names()``).
      loss: ``loss(params) -> scalar``, a pure JAX function.
      grad: ``grad(params) -> params``, the hand-derived closed form (a subgradient where the loss has
        kinks); same pytree structure as ``params``.
      hvp: ``hvp(params, v) -> params``, the closed-form Hessian-vector product ``∇²f(params) v``, or
        ``None`` where it is not simple.
      init: a starting point (for the worked examples: the point with the published numbers).
      solution: a minimiser, or ``None`` where unknown or not unique.
      min_value: ``loss(solution)`` (or the known infimum), or ``None``.
      smoothness: ``L``, a Lipschitz constant of the gradient, or ``None``.
      strong_convexity: ``μ``, or ``None`` (also where the loss is not convex).
      random_point: ``random_point(key) -> params``, a point of the domain for checks (SPD for
        ``log_det``, nonzero for ``log_quadratic`` ...).
      data: the instance's arrays (``A``, ``b``, ``X``, ``y`` ...), for inspection.
      options: the resolved constructor options (sizes, dtype, ...).
      description: the math in one line.
      reference: where the example and its derivation come from.
      analytic: whether the loss is a real-analytic composition of complex-safe operations, so the
        complex-step derivative is valid.
      smooth: ``False`` where the loss has kinks (the gradient is a subgradient and finite differences
        can disagree near a kink).
    """

    name: str
    loss: Callable[[Params], Any]
    grad: Callable[[Params], Params]
    hvp: Callable[[Params, Params], Params] | None
    init: Params
    solution: Params | None = None
    min_value: float | None = None
    smoothness: float | None = None
    strong_convexity: float | None = None
    random_point: Callable[[Any], Params] | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    reference: str = ""
    analytic: bool = True
    smooth: bool = True

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Problem({self.name}[{opts}]: {self.description})"


_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Register ``factory(key, /, **options) -> Problem`` under ``name`` (a decorator).

    The factory's keyword-only parameters, with their defaults, are the problem's options; the
    signature is the single source of defaults.

    >>> import jax, jax.numpy as jnp
    >>> @register("zz_scaled_square")
    ... def zz_scaled_square(key, /, *, scale=2.0):
    ...     return Problem(
    ...         name="zz_scaled_square",
    ...         loss=lambda x: scale * jnp.sum(x**2),
    ...         grad=lambda x: 2 * scale * x,
    ...         hvp=lambda x, v: 2 * scale * v,
    ...         init=jnp.ones(3),
    ...     )
    >>> options("zz_scaled_square")
    {'scale': 2.0}
    >>> p = make("zz_scaled_square", jax.random.key(0), scale=0.5)
    >>> p.grad(p.init).tolist()
    [1.0, 1.0, 1.0]
    >>> del _REGISTRY["zz_scaled_square"]  # a demo: leave the catalog as it was
    >>> "zz_scaled_square" in names()
    False

    Raises:
      OptionError: ``name`` is not a non-empty string, or is already registered (checked when the
        decorator is applied).

    Reference: PEP 318 (decorators) and PEP 3102 (keyword-only arguments, here the options); each
    problem cites its own sources in its docstring and in ``Problem.reference``.
    """

    if not isinstance(name, str) or not name.strip():
        raise OptionError(
            f"name: expected a non-empty string (the name configs and problems.make use), got {name!r}."
        )

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise OptionError(
                f"name: a problem {name!r} is already registered ({_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}); register yours under another name "
                f"(problems.names() lists the taken ones)."
            )
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    """The registered problem names, sorted.

    >>> names()[:3]
    ['forward_mode_example', 'least_squares', 'linear_solve']

    Reference: Magnus & Neudecker, *Matrix Differential Calculus* (the method of the catalog); each
    problem cites its own sources in its docstring and in ``Problem.reference``.
    """
    return sorted(_REGISTRY)


def options(name: str) -> dict[str, Any]:
    """The options of problem ``name`` with their defaults.

    >>> options("least_squares")["dim"]
    10

    Reference: PEP 3102 (keyword-only arguments) and the Python documentation of
    ``inspect.signature``: the options are the factory's keyword-only parameters.
    """
    check_choice("problem", name, _REGISTRY)
    return keyword_defaults(_REGISTRY[name])


def describe(name: str) -> str:
    """The first line of the docstring of problem ``name``.

    >>> describe("toy_graph")
    'The backprop toy graph f(x, y, z) = (x + y)z at (−2, 5, −4): f = −12, ∇f = (−4, −4, 3).'

    Reference: PEP 257 (docstring conventions: the first line is the summary).
    """
    check_choice("problem", name, _REGISTRY)
    doc = inspect.getdoc(_REGISTRY[name]) or ""
    return doc.splitlines()[0] if doc else ""


def make(name: str, key: Any, /, **opts: Any) -> Problem:
    """Build an instance of catalog problem ``name`` from a PRNG ``key`` and options.

    Args:
      name: one of :func:`names`.
      key: a ``jax.random.key`` (required: instances are random; the worked examples ignore it).
      **opts: sizes and settings (``dim``, ``num_samples``, ``dtype`` ...); see :func:`options`.

    Raises:
      UnknownNameError: ``name`` is not registered (the message lists the names).
      OptionError: an option the problem does not take, or a bad value.

    >>> import jax
    >>> p = make("quadratic", jax.random.key(1), dim=4)
    >>> p.init.shape
    (4,)

    Reference: Magnus & Neudecker, *Matrix Differential Calculus* (the differentials the closed
    forms are derived with); each problem's own sources in its docstring and ``Problem.reference``.
    """
    check_choice("problem", name, _REGISTRY)
    accepted = options(name)
    check_options(f"problem {name!r}", opts, accepted)
    check_key(key, f"problem {name!r}")
    return _REGISTRY[name](key, **opts)


# The catalog modules register their problems on import; they import `register` from this module, so they
# come last.
from gradlab.problems import _learning, _matrix, _worked  # noqa: E402, F401
from gradlab.problems._worked import SchwarzMixedPartials, schwarz_mixed_partials  # noqa: E402
