"""Gradient strategies: exact, forward mode, finite differences, zero-order 2-point, forward gradients.

A strategy is a constructor that binds static options and returns a pure callable
``strategy(fn, params, key) -> GradEstimate``: jit-compatible, vmap-compatible over keys, pytree-generic
(parameters are ravelled at the boundary with :func:`jax.flatten_util.ravel_pytree`). ``key`` is required
and positional even for the deterministic strategies, which ignore it. Every estimate carries its cost
(function evaluations, reverse-mode gradients, JVPs) and a standard error.

A 2-point estimator is a sampler (:mod:`gradlab.samplers`) × a difference formula × a mean:

    G = (1/k) Σ_i c_i v_i / m,   c_i = (f(x + μ v_i) − f(x − μ v_i)) / (2μ),   E[v vᵀ] = m I.

For the unit sphere ``m = 1/d`` (so ``G = (d/k) Σ c_i v_i``); Gaussian and Rademacher ``m = 1``; ``k``
orthonormal directions or ``k`` distinct coordinates ``m = 1/d``. Since ``c_i = ⟨∇f(x), v_i⟩ + O(μ²)``
(the central difference is exact for quadratics), ``E[G] = ∇f(x) + O(μ²)``. Second moments, with
``g = ∇f(x)`` and exact directional derivatives:

- one sphere direction: ``E‖G‖² = d² E[⟨g, v⟩²] = d ‖g‖²``;
- ``k`` iid sphere directions: ``E‖G‖² = ‖g‖² + (d‖g‖² − ‖g‖²)/k = (1 + (d − 1)/k) ‖g‖²``;
- ``k`` orthonormal directions (or ``k`` distinct coordinates):
  ``E‖G‖² = (d/k)² Σ_i E⟨g, v_i⟩² = (d/k) ‖g‖²``;
- one Gaussian direction: ``E‖G‖² = (d + 2) ‖g‖²``; one Rademacher direction: ``d ‖g‖²``.

>>> import jax, jax.numpy as jnp
>>> from gradlab import grads
>>> f = lambda x: 0.5 * jnp.sum(x**2)
>>> x = jnp.arange(4.0)
>>> est = grads.make("two_point", num_directions=4, distribution="orthogonal")(f, x, jax.random.key(0))
>>> int(est.num_fun_evals), est.grad.shape
(8, (4,))
>>> bool(jnp.allclose(est.grad, x))  # k = d orthonormal directions recover the gradient of a quadratic
True
>>> grads.names()
['central_difference', 'exact', 'forward_difference', 'forward_gradient', 'forward_mode', 'two_point']

References: Nocedal & Wright (2006), *Numerical Optimization*, ch. 8 (finite differences and their steps);
Nesterov & Spokoiny (2017), "Random gradient-free minimization of convex functions", FoCM 17:527–566;
Duchi, Jordan, Wainwright & Wibisono (2015), "Optimal rates for zero-order convex optimization: the power of
two function evaluations", IEEE Trans. Inf. Theory 61(5); Malladi et al. (2023), "Fine-tuning language
models with just forward passes" (MeZO); Baydin, Pearlmutter, Syme, Wood & Torr (2022), "Gradients without
backpropagation".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gradlab import samplers
from gradlab._validate import (
    OptionError,
    ShapeError,
    check_choice,
    check_float_params,
    check_key,
    check_options,
    check_positive,
    check_positive_int,
    check_scalar_output,
    keyword_defaults,
)

__all__ = [
    "GradEstimate",
    "Strategy",
    "central_difference",
    "exact",
    "forward_difference",
    "forward_gradient",
    "forward_mode",
    "make",
    "names",
    "options",
    "two_point",
]

Params = Any


class GradEstimate(NamedTuple):
    """A gradient estimate with its cost and uncertainty (a pytree: passes through ``jit``/``lax.scan``).

    Attributes:
      value: ``f(params)``. Exact for ``exact``, ``forward_mode``, ``forward_difference`` and
        ``forward_gradient``; for ``central_difference`` and ``two_point`` the mean of the ``f(x ± h)``
        evaluations, an O(h²) estimate of ``f(x)`` at no extra cost.
      grad: the estimate, with the structure and dtypes of ``params``.
      num_fun_evals: int32, plain evaluations of ``f`` (zero-order queries). The primal pass inside a
        gradient or a JVP is not counted here.
      num_grads: int32, reverse-mode gradient evaluations (``exact``: 1).
      num_jvps: int32, Jacobian-vector products (``forward_mode``: d; ``forward_gradient``: k).
      std_error: scalar, the standard error of ``grad`` in norm, ``sqrt(tr Ĉov / k)`` from the ``k``
        per-direction estimates, times the finite-population correction ``sqrt(1 − k/d)`` for
        directions drawn without replacement (``orthogonal``, ``coordinate``; Cochran 1977, §2.5: 0 at
        ``k = d``); 0 for deterministic strategies; NaN where it cannot be estimated (k = 1).
    """

    value: jax.Array
    grad: Params
    num_fun_evals: jax.Array
    num_grads: jax.Array
    num_jvps: jax.Array
    std_error: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Strategy:
    """A gradient strategy: a pure callable ``strategy(fn, params, key) -> GradEstimate``.

    Attributes:
      name: the registry name (:func:`names`).
      options: the resolved constructor options (every keyword with its value, defaults included).
      estimate: the underlying pure function.
    """

    name: str
    options: Mapping[str, Any]
    estimate: Callable[[Callable[[Params], Any], Params, Any], GradEstimate]

    def __call__(self, fn: Callable[[Params], Any], params: Params, key: Any, /) -> GradEstimate:
        # deterministic strategies ignore the key, but it is always required
        check_key(key, f"grads.{self.name}")
        return self.estimate(fn, params, key)

    @property
    def label(self) -> str:
        """A deterministic label ``name[k=v,...]`` (options sorted by name), for reports."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}[{opts}]" if opts else self.name

    def __repr__(self) -> str:
        return f"Strategy({self.label})"


# --- helpers -------------------------------------------------------------------------------------------


def _flatten(name: str, fn: Callable, params: Params):
    """Check ``fn`` returns a real scalar, ravel ``params``; return ``(x, unravel, f_flat)``."""
    check_float_params(f"{name}: params", params)  # per leaf: ravel_pytree promotes a mixed tree
    check_scalar_output(f"{name}: fn", jax.eval_shape(fn, params))
    x, unravel = ravel_pytree(params)
    if x.size == 0:
        raise ShapeError(
            f"{name}: params: expected at least one entry, got a pytree of total size 0 "
            f"({jax.tree.structure(params)}); there is nothing to estimate a gradient of."
        )

    def f_flat(z):
        return jnp.asarray(fn(unravel(z)), x.dtype)

    return x, unravel, f_flat


def _count(n: int) -> jax.Array:
    return jnp.asarray(n, jnp.int32)


def _estimate(value, grad, *, evals=0, grads=0, jvps=0, std_error) -> GradEstimate:
    return GradEstimate(value, grad, _count(evals), _count(grads), _count(jvps), std_error)


def _std_error(sum_sq: jax.Array, g: jax.Array, k: int, sampler: samplers.Sampler) -> jax.Array:
    """``sqrt(tr Ĉov / k)`` from ``Σ_i ‖G_i‖²`` and the mean ``G`` of ``k`` per-direction estimates.

    ``orthogonal`` and ``coordinate`` directions are drawn without replacement (given the random
    basis, ``k`` of its ``d`` directions), so the finite-population correction ``1 − k/d`` applies
    (Cochran 1977, §2.5): the error bar of ``k = d`` directions, an exact gradient, is 0.
    """
    if k < 2:
        return jnp.asarray(jnp.nan, g.dtype)
    tr_cov = jnp.maximum(sum_sq - k * jnp.vdot(g, g), 0.0) / (k - 1)
    if sampler.name in samplers.DISTINCT:
        tr_cov = tr_cov * (1.0 - k / sampler.dim)
    return jnp.sqrt(tr_cov / k)


def _mixed(params: Params, x: jax.Array) -> bool:
    """Whether some leaf of ``params`` has another dtype than the ravelled ``x`` (which promotes them)."""
    return any(jnp.result_type(leaf) != x.dtype for leaf in jax.tree.leaves(params))


def _leaf_eps(params: Params, x: jax.Array, mixed: bool) -> jax.Array:
    """Machine ε per ravelled coordinate, of the dtype of the leaf it comes from (a scalar unless
    ``mixed``, see :func:`_mixed`). A float32 leaf ravelled with float64 ones is stored in float32, so
    its steps must be sized by float32's ε, not by the promoted dtype's."""
    if not mixed:
        return jnp.asarray(jnp.finfo(x.dtype).eps, x.dtype)

    def eps(leaf):
        dt = jnp.result_type(leaf)
        e = jnp.finfo(dt).eps if jnp.issubdtype(dt, jnp.floating) else jnp.finfo(x.dtype).eps
        return jnp.full(jnp.shape(leaf), e, x.dtype)

    return ravel_pytree(jax.tree.map(eps, params))[0]


def _rel_steps(
    x: jax.Array, step: float | None, power: float, params: Params, unravel: Callable
) -> jax.Array:
    """Per-coordinate FD steps ``s·max(1, |x_i|)``, ``s = step`` or ``ε_i^power`` (ε of coordinate
    ``i``'s leaf dtype), as actually represented: ``(x + h) − x`` after the round trip through the
    leaves' dtypes (Nocedal & Wright §8.1)."""
    mixed = _mixed(params, x)
    s = _leaf_eps(params, x, mixed) ** power if step is None else jnp.asarray(step, x.dtype)
    h = s * jnp.maximum(1.0, jnp.abs(x))
    if mixed:
        return ravel_pytree(unravel(x + h))[0].astype(x.dtype) - x
    return (x + h) - x


def _map(fn: Callable, xs: jax.Array, batch_size: int | None):
    """``fn`` (one row) vmapped over the rows of ``xs``: all at once (``batch_size=None``) or in chunks of
    ``batch_size`` rows (:func:`_map_chunks`)."""
    return _map_chunks(jax.vmap(fn), xs, batch_size)


def _map_chunks(chunk_fn: Callable, xs: jax.Array, batch_size: int | None):
    """``chunk_fn`` (rows in, rows out) on all rows of ``xs`` at once, or on chunks of ``batch_size`` rows
    through ``lax.map`` (full chunks, then the remainder), as ``lax.map(..., batch_size=)`` does for a
    per-row function."""
    n = xs.shape[0]
    if batch_size is None or batch_size >= n:
        return chunk_fn(xs)
    num = n // batch_size
    head = xs[: num * batch_size].reshape(num, batch_size, *xs.shape[1:])
    out = jax.lax.map(chunk_fn, head)
    out = jax.tree.map(lambda o: o.reshape(num * batch_size, *o.shape[2:]), out)
    if num * batch_size == n:
        return out
    rest = chunk_fn(xs[num * batch_size :])
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def _plus_minus(f_flat: Callable, x: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``f(x + o_i)`` and ``f(x − o_i)`` for the rows ``o_i`` of ``offsets`` (``b × d``), as *one* vmapped
    batch of ``2b`` points: for a loss built on matrix products the ``2b`` evaluations become one
    matrix–matrix product (the data read once) rather than two of ``b`` rows. A single direction keeps its
    two evaluations apart (the concatenation costs more than it saves on small problems)."""
    b = offsets.shape[0]
    xb = x[None, :]
    if b == 1:
        return jax.vmap(f_flat)(xb + offsets), jax.vmap(f_flat)(xb - offsets)
    fs = jax.vmap(f_flat)(jnp.concatenate([xb + offsets, xb - offsets]))
    return fs[:b], fs[b:]


def _check_optional(argument: str, value: Any, check: Callable) -> Any:
    return None if value is None else check(argument, value)


# --- deterministic strategies ---------------------------------------------------------------------------


def exact() -> Strategy:
    """Reverse mode: ``jax.value_and_grad(fn)(params)``; one gradient evaluation, standard error 0.

    >>> import jax, jax.numpy as jnp
    >>> est = exact()(lambda x: jnp.sum(x**3), jnp.array([1.0, 2.0]), jax.random.key(0))
    >>> est.grad.tolist(), int(est.num_grads), float(est.std_error)
    ([3.0, 12.0], 1, 0.0)

    Reference: Griewank & Walther, *Evaluating Derivatives*, 2nd ed., SIAM 2008, ch. 3–4 (reverse mode);
      Bradbury et al., JAX (``jax.value_and_grad``).
    """

    def estimate(fn, params, key):
        check_float_params("exact: params", params)
        check_scalar_output("exact: fn", jax.eval_shape(fn, params))
        value, g = jax.value_and_grad(fn)(params)
        zero = jnp.zeros((), ravel_pytree(params)[0].dtype)
        return _estimate(value, g, grads=1, std_error=zero)

    return Strategy("exact", {}, estimate)


def forward_mode(*, batch_size: int | None = None) -> Strategy:
    """Forward mode along the basis: ``∂f/∂x_i = J e_i``, ``d`` JVPs (as ``jax.jacfwd``).

    ``jax.linearize`` runs the primal once (giving the exact value); the ``d`` JVPs are vmapped all at once
    (``batch_size=None``) or in chunks of ``batch_size`` basis vectors (peak memory O(d·batch_size)).
    The basis passes through ``lax.optimization_barrier`` with ``x``, so that a compiled loop of steps
    recomputes all ``d`` JVPs at every step: for a loss built on ``A x`` with constant ``A``, XLA would
    otherwise compute ``A·I`` once before the loop, and timings would show one matvec per step.

    >>> import jax, jax.numpy as jnp
    >>> est = forward_mode(batch_size=2)(lambda x: jnp.sum(x**3), jnp.array([1.0, 2.0, 3.0]), jax.random.key(0))
    >>> est.grad.tolist(), int(est.num_jvps)
    ([3.0, 12.0, 27.0], 3)

    Reference: Griewank & Walther, *Evaluating Derivatives*, 2nd ed., SIAM 2008, ch. 3 (forward mode:
      one JVP per coordinate, ``d`` in all).
    """
    batch_size = _check_optional("batch_size", batch_size, check_positive_int)

    def estimate(fn, params, key):
        x, unravel, f_flat = _flatten("forward_mode", fn, params)
        d = x.size
        value, jvp = jax.linearize(f_flat, x)
        # The basis is tied to x: otherwise, inside a descent loop, XLA hoists the part of the d JVPs
        # that does not depend on x (A·[e_1 … e_d] for a loss A x − b) out of the loop, and forward
        # mode then times as one matvec per step instead of d JVPs (fd_cost: 25 ms once, 0.9 ms/step).
        idx, _ = jax.lax.optimization_barrier((jnp.arange(d), x))
        g = _map(lambda i: jvp(jax.nn.one_hot(i, d, dtype=x.dtype)), idx, batch_size)
        return _estimate(value, unravel(g), jvps=d, std_error=jnp.zeros((), x.dtype))

    return Strategy("forward_mode", {"batch_size": batch_size}, estimate)


def forward_difference(*, step: float | None = None) -> Strategy:
    """Forward differences sharing ``f(x)``: ``g_i ≈ (f(x + h_i e_i) − f(x)) / h_i``; ``d + 1`` evaluations.

    ``h_i = s·max(1, |x_i|)`` with the relative step ``s = step`` or ``√ε`` (ε of the params dtype), which
    balances the truncation error ``|f''| h / 2`` against the round-off ``2ε|f| / h`` (Nocedal & Wright
    §8.1). The error is O(h) + O(ε/h) ≈ O(√ε). The value is the exact ``f(x)``.

    >>> import jax, jax.numpy as jnp
    >>> est = forward_difference()(lambda x: jnp.sum(x**3), jnp.array([1.0, 2.0]), jax.random.key(0))
    >>> [round(g, 6) for g in est.grad.tolist()], int(est.num_fun_evals)
    ([3.0, 12.0], 3)

    Reference: Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §8.1 (step ≈ √ε balancing
      truncation and round-off).
    """
    step = _check_optional("step", step, check_positive)

    def estimate(fn, params, key):
        x, unravel, f_flat = _flatten("forward_difference", fn, params)
        d = x.size
        h = _rel_steps(x, step, 0.5, params, unravel)
        f0 = f_flat(x)
        fp = jax.vmap(lambda i: f_flat(x.at[i].add(h[i])))(jnp.arange(d))
        g = (fp - f0) / h
        return _estimate(f0, unravel(g), evals=d + 1, std_error=jnp.zeros((), x.dtype))

    return Strategy("forward_difference", {"step": step}, estimate)


def central_difference(*, step: float | None = None) -> Strategy:
    """Central differences: ``g_i ≈ (f(x + h_i e_i) − f(x − h_i e_i)) / (2 h_i)``; ``2d`` evaluations.

    ``h_i = s·max(1, |x_i|)`` with the relative step ``s = step`` or ``ε^{1/3}``, balancing the truncation
    error ``|f'''| h² / 6`` against the round-off ``ε|f| / h`` (Nocedal & Wright §8.1): error O(ε^{2/3}).
    Exact (up to round-off) for quadratics. The value is the mean of the ``2d`` evaluations, ``f(x) +
    O(h²)``.

    >>> import jax, jax.numpy as jnp
    >>> est = central_difference()(lambda x: jnp.sum(x**3), jnp.array([1.0, 2.0]), jax.random.key(0))
    >>> [round(g, 8) for g in est.grad.tolist()], int(est.num_fun_evals)
    ([3.0, 12.0], 4)

    Reference: Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §8.1 (step ≈ ε^{1/3}, error
      O(ε^{2/3})).
    """
    step = _check_optional("step", step, check_positive)

    def estimate(fn, params, key):
        x, unravel, f_flat = _flatten("central_difference", fn, params)
        d = x.size
        h = _rel_steps(x, step, 1.0 / 3.0, params, unravel)
        fp = jax.vmap(lambda i: f_flat(x.at[i].add(h[i])))(jnp.arange(d))
        fm = jax.vmap(lambda i: f_flat(x.at[i].add(-h[i])))(jnp.arange(d))
        g = (fp - fm) / (2 * h)
        value = (jnp.sum(fp) + jnp.sum(fm)) / (2 * d)
        return _estimate(value, unravel(g), evals=2 * d, std_error=jnp.zeros((), x.dtype))

    return Strategy("central_difference", {"step": step}, estimate)


# --- stochastic strategies ------------------------------------------------------------------------------


def _check_distribution(distribution: str) -> str:
    return check_choice("distribution", distribution, samplers.names())


def _sampler(strategy: str, distribution: str, x: jax.Array, k: int) -> samplers.Sampler:
    """``samplers.make(distribution, x, num=k)``, with the error for ``k > d`` naming ``num_directions``."""
    d = x.size
    if distribution in samplers.DISTINCT and k > d:
        raise OptionError(
            f"{strategy}: num_directions = {k} exceeds d = {d}: the {distribution!r} distribution "
            f"draws at most d distinct directions. Use num_directions ≤ {d}, or an iid "
            "distribution ('sphere', 'gaussian', 'rademacher')."
        )
    return samplers.make(distribution, x, num=k)


def two_point(
    *,
    num_directions: int = 1,
    distribution: str = "sphere",
    smoothing: float | None = None,
    batch_size: int | None = None,
    lean: bool = False,
) -> Strategy:
    """Zero-order 2-point estimator: ``G = (1/(k m)) Σ_i (f(x + μv_i) − f(x − μv_i)) / (2μ) · v_i``.

    ``v_i`` from ``samplers.make(distribution, params, num=k)`` with ``E[v vᵀ] = m I``: for ``"sphere"``
    ``G = (d/k) Σ_i (...) v_i`` (the seed's estimator), for ``"gaussian"``/``"rademacher"``
    ``G = (1/k) Σ_i (...) v_i``, for ``"orthogonal"`` (a random k-frame, ``k ≤ d``) and ``"coordinate"``
    (``k`` distinct coordinates) ``G = (d/k) Σ_i (...) v_i``. Cost ``2k`` evaluations of ``f``.

    Bias and variance: ``(f(x+μv) − f(x−μv))/(2μ) = ⟨∇f, v⟩ + O(μ²‖v‖³)``, so ``E[G] = ∇f + O(μ²)`` (exact
    for quadratics). With ``g = ∇f``: ``E‖G‖² = d‖g‖²`` for one sphere direction, ``(1 + (d−1)/k)‖g‖²`` for
    ``k`` iid sphere directions, ``(d/k)‖g‖²`` for ``k`` orthonormal directions or distinct coordinates
    (Nesterov & Spokoiny 2017; Duchi et al. 2015).

    Smoothing: ``μ = s·max(1, ‖x‖∞)`` with the relative smoothing ``s = smoothing`` or ``ε^{1/3}`` (ε of
    the params dtype). The difference along ``v`` is a central difference of ``t ↦ f(x + t v)``, whose
    error ``μ²|∂³f|/6 + ε|f|/μ`` is smallest near ``μ ∝ ε^{1/3}`` (Nocedal & Wright §8.1); the scale
    ``max(1, ‖x‖∞)`` keeps the perturbation relative to the entries of ``x``. A larger smoothing estimates
    the gradient of the smoothed ``f_μ`` instead (Nesterov & Spokoiny), useful for noisy ``f``.

    Memory: ``lean=False`` materialises the ``k × d`` block of directions and vmaps the evaluations over
    chunks of ``batch_size`` directions (default: all at once); a chunk of ``b`` directions evaluates its
    ``2b`` points ``x ± μv_i`` as one batch, so a loss built on matrix products reads its data once per
    chunk (one matrix–matrix product, not two). ``lean=True`` (MeZO, Malladi et al. 2023)
    regenerates direction ``i`` from the key (``samplers.Sampler.direction``, ``fold_in(key, i)`` for the
    iid samplers) inside a ``lax.scan`` over chunks of ``batch_size`` directions (default 1), never holding
    the ``k × d`` block: peak memory O(d·batch_size). Lean and non-lean give the same estimate for the
    same key (up to summation order). ``"orthogonal"`` has no lean mode.

    Value: the mean of the ``2k`` evaluations, ``f(x) + O(μ²)``. Standard error: ``sqrt(tr Ĉov / k)`` of
    the per-direction estimates ``G_i = c_i v_i / m`` (NaN for ``k = 1``), times ``sqrt(1 − k/d)`` for
    ``orthogonal`` and ``coordinate`` directions (drawn without replacement: 0 at ``k = d``).

    >>> import jax, jax.numpy as jnp
    >>> f = lambda x: 0.5 * jnp.sum(x**2)
    >>> x = jnp.ones(3)
    >>> s = two_point(num_directions=2, distribution="gaussian")
    >>> a, b = s(f, x, jax.random.key(0)), two_point(num_directions=2, distribution="gaussian", lean=True)(
    ...     f, x, jax.random.key(0))
    >>> bool(jnp.allclose(a.grad, b.grad, rtol=1e-12)), int(a.num_fun_evals)
    (True, 4)

    Reference: Nesterov & Spokoiny, Random gradient-free minimization of convex functions, *Found.
      Comput. Math.* 17 (2017); Duchi, Jordan, Wainwright & Wibisono, Optimal rates for zero-order
      convex optimization, *IEEE Trans. Inf. Theory* 61 (2015); Malladi et al., Fine-tuning language
      models with just forward passes (MeZO), NeurIPS 2023 (the lean mode).
    """
    k = check_positive_int("num_directions", num_directions)
    distribution = _check_distribution(distribution)
    smoothing = _check_optional("smoothing", smoothing, check_positive)
    batch_size = _check_optional("batch_size", batch_size, check_positive_int)
    if not isinstance(lean, bool):
        raise OptionError(f"lean: expected True or False, got {lean!r}.")
    if lean and distribution == "orthogonal":
        raise OptionError(
            "lean: the 'orthogonal' distribution has no lean mode (an orthonormal frame is drawn as a "
            "whole). Use lean=False, or a distribution among ['coordinate', 'gaussian', 'rademacher', "
            "'sphere']."
        )
    opts = {
        "num_directions": k,
        "distribution": distribution,
        "smoothing": smoothing,
        "batch_size": batch_size,
        "lean": lean,
    }

    def estimate(fn, params, key):
        x, unravel, f_flat = _flatten("two_point", fn, params)
        sampler = _sampler("two_point", distribution, x, k)
        # one μ for every direction: sized by the least precise leaf's ε
        s = (
            jnp.max(_leaf_eps(params, x, _mixed(params, x))) ** (1.0 / 3.0)
            if smoothing is None
            else smoothing
        )
        mu = jnp.asarray(s, x.dtype) * jnp.maximum(1.0, jnp.max(jnp.abs(x)))
        inv_m = jnp.asarray(1.0 / sampler.second_moment, x.dtype)

        def query(V):  # a chunk of directions (b × d): the 2b evaluations as one batch
            fp, fm = _plus_minus(f_flat, x, mu * V)
            return (fp - fm) / (2 * mu), fp + fm

        if lean:
            g_sum, sum_sq, f_sum = _lean_sum(query, sampler, key, k, batch_size or 1, x)
        else:
            V = sampler(key)
            c, fsum = _map_chunks(query, V, batch_size)
            g_sum = c @ V
            sum_sq = jnp.sum(c**2 * jnp.sum(V**2, axis=1))
            f_sum = jnp.sum(fsum)
        g = g_sum * inv_m / k
        se = _std_error(sum_sq * inv_m**2, g, k, sampler)
        return _estimate(f_sum / (2 * k), unravel(g), evals=2 * k, std_error=se)

    return Strategy("two_point", opts, estimate)


def _lean_sum(query, sampler, key, k: int, batch_size: int, x: jax.Array):
    """``Σ c_i v_i``, ``Σ c_i² ‖v_i‖²`` and ``Σ (f₊ + f₋)`` with directions regenerated chunk by chunk."""
    b = min(batch_size, k)
    num_chunks = -(-k // b)

    def body(carry, j):
        g_sum, sum_sq, f_sum = carry
        idx = j * b + jnp.arange(b)
        valid = idx < k
        V = jax.vmap(sampler.direction, in_axes=(None, 0))(key, jnp.minimum(idx, k - 1))
        c, fsum = query(V)
        c = jnp.where(valid, c, 0.0)
        fsum = jnp.where(valid, fsum, 0.0)
        return (
            g_sum + c @ V,
            sum_sq + jnp.sum(c**2 * jnp.sum(V**2, axis=1)),
            f_sum + jnp.sum(fsum),
        ), None

    zero = jnp.zeros((), x.dtype)
    init = (jnp.zeros_like(x), zero, zero)
    (g_sum, sum_sq, f_sum), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return g_sum, sum_sq, f_sum


def forward_gradient(
    *, num_directions: int = 1, distribution: str = "gaussian", batch_size: int | None = None
) -> Strategy:
    """Forward gradient (Baydin et al. 2022): ``G = (1/(k m)) Σ_i ⟨∇f(x), v_i⟩ v_i`` from ``k`` JVPs.

    No backward pass: each ``⟨∇f(x), v_i⟩`` is one JVP of ``f`` (``jax.linearize`` once, then the JVPs
    vmapped all at once or in chunks of ``batch_size``). With ``E[v vᵀ] = m I`` the estimate is unbiased;
    for the default Gaussian ``v`` (``m = 1``) it is Baydin et al.'s ``⟨∇f, v⟩ v`` with
    ``E‖G‖² = (1 + (d+1)/k)‖∇f‖²``. The value is the exact ``f(x)``; the standard error is
    ``sqrt(tr Ĉov / k)`` of the per-direction estimates (NaN for ``k = 1``), times ``sqrt(1 − k/d)``
    for ``orthogonal`` and ``coordinate`` directions (drawn without replacement: 0 at ``k = d``).

    >>> import jax, jax.numpy as jnp
    >>> f = lambda x: 0.5 * jnp.sum(x**2)
    >>> est = forward_gradient(num_directions=3, distribution="orthogonal")(f, jnp.ones(3), jax.random.key(0))
    >>> [round(g, 10) for g in est.grad.tolist()], int(est.num_jvps)
    ([1.0, 1.0, 1.0], 3)

    Reference: Baydin, Pearlmutter, Syme, Wood & Torr, Gradients without backpropagation,
      arXiv:2202.08587 (2022).
    """
    k = check_positive_int("num_directions", num_directions)
    distribution = _check_distribution(distribution)
    batch_size = _check_optional("batch_size", batch_size, check_positive_int)
    opts = {"num_directions": k, "distribution": distribution, "batch_size": batch_size}

    def estimate(fn, params, key):
        x, unravel, f_flat = _flatten("forward_gradient", fn, params)
        sampler = _sampler("forward_gradient", distribution, x, k)
        inv_m = jnp.asarray(1.0 / sampler.second_moment, x.dtype)
        value, jvp = jax.linearize(f_flat, x)
        V = sampler(key)
        c = _map(jvp, V, batch_size)
        g = (c @ V) * inv_m / k
        sum_sq = jnp.sum(c**2 * jnp.sum(V**2, axis=1)) * inv_m**2
        return _estimate(value, unravel(g), jvps=k, std_error=_std_error(sum_sq, g, k, sampler))

    return Strategy("forward_gradient", opts, estimate)


# --- registry -------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Strategy]] = {
    "exact": exact,
    "forward_mode": forward_mode,
    "forward_difference": forward_difference,
    "central_difference": central_difference,
    "two_point": two_point,
    "forward_gradient": forward_gradient,
}


def names() -> list[str]:
    """The strategy names, sorted.

    >>> names()[:3]
    ['central_difference', 'exact', 'forward_difference']

    Reference: the strategies' own docstrings.
    """
    return sorted(_REGISTRY)


def options(name: str) -> dict[str, Any]:
    """The options of strategy ``name`` with their defaults (read from the constructor's signature).

    >>> options("two_point")["distribution"]
    'sphere'

    Reference: the strategies' own docstrings (their keyword-only parameters are the options).
    """
    check_choice("strategy", name, _REGISTRY)
    return keyword_defaults(_REGISTRY[name])


def make(name: str, /, **opts: Any) -> Strategy:
    """Build strategy ``name`` (one of :func:`names`) from keyword options, e.g. from a config's ``**kwargs``.

    Raises:
      UnknownNameError: ``name`` is not registered (the message lists the names).
      OptionError: an option the strategy does not take (the message lists the accepted options with their
        defaults), or a bad value.

    >>> make("central_difference", step=1e-5).options
    {'step': 1e-05}

    Reference: the strategies' own docstrings (:func:`exact` … :func:`forward_gradient`).
    """
    check_choice("strategy", name, _REGISTRY)
    check_options(f"strategy {name!r}", opts, options(name))
    return _REGISTRY[name](**opts)
