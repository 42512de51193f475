"""Step sizes and convergence-rate curves of gradient descent and zero-order gradient descent.

Floor 1: pure formulas over plain Python floats and NumPy arrays; no JAX, no gradlab imports except
:mod:`gradlab._validate`. These are the curves that :mod:`gradlab.descent` histories are held against.

Setting: ``f: ℝᵈ → ℝ`` with an ``L``-Lipschitz gradient (``L``-smooth), sometimes ``μ``-strongly convex,
and the iteration ``x_{k+1} = x_k − α G_k``, where ``G_k`` is either the exact gradient ``∇f(x_k)`` or a
zero-order (two-point) estimate of it. For an unbiased estimate with second moment
``E‖G‖² = c·‖∇f‖²`` the descent lemma gives, with the step ``α = 1/(cL)``,

    E f(x_{k+1}) ≤ f(x_k) − ‖∇f(x_k)‖² / (2cL),

and every curve below follows from this one inequality with the right ``c``:

============================================  ==================  ===========================
estimate                                      ``c``               step ``1/(cL)``
============================================  ==================  ===========================
exact gradient                                ``1``               :func:`gd_step`
2-point, 1 direction uniform on the sphere    ``d``               :func:`zo_sphere_step`
2-point, ``k`` iid sphere directions (mean)   ``1 + (d−1)/k``     :func:`zo_iid_step`
2-point, ``k`` orthonormal directions         ``d/k``             :func:`zo_orthogonal_step`
============================================  ==================  ===========================

(the sphere estimator is ``G = d·⟨∇f, u⟩u``, ``u`` uniform on the unit sphere, in the limit of a small
difference step). This is the rates table of Merkulov's lecture notes ("Matrix differentiation.
Automatic differentiation. Checkpointing"): GD reaches ``‖∇f‖² = O(1/k)``,
``f − f* = O(1/k)`` and ``O((1 − μ/L)^k)``; zero-order GD reaches ``O(d/k)`` and ``O((1 − μ/(dL))^k)``.

>>> round(gd_step(2.0), 3), round(zo_sphere_step(2.0, 10), 3)
(0.5, 0.05)
>>> steps_to_tol(lambda k: gd_rate(k, L=10.0, mu=1.0), 1e-6)
132

References:
  Yu. Nesterov (2004), *Introductory Lectures on Convex Optimization*, Kluwer, §2.1 (GD rates).
  Yu. Nesterov & V. Spokoiny (2017), "Random gradient-free minimization of convex functions",
  *Foundations of Computational Mathematics* 17:527–566 (Gaussian smoothing, step ``1/(4(n+4)L)``).
  J. C. Duchi, M. I. Jordan, M. J. Wainwright & A. Wibisono (2015), "Optimal rates for zero-order convex
  optimization: the power of two function evaluations", *IEEE Trans. Inf. Theory* 61(5):2788–2806.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradlab._validate import (
    OptionError,
    ShapeError,
    check_choice,
    check_positive,
    check_positive_int,
)

__all__ = [
    "gaussian_smoothing_step",
    "gd_convex_bound",
    "gd_grad_norm_bound",
    "gd_rate",
    "gd_step",
    "quadratic_exact_step",
    "second_moment_factor",
    "steps_to_tol",
    "zo_convex_bound",
    "zo_grad_norm_bound",
    "zo_iid_step",
    "zo_orthogonal_step",
    "zo_rate",
    "zo_sphere_step",
    "zo_trace_step",
]

_SAMPLINGS = ("iid", "orthogonal")


def _check_mu(L: float, mu: Any) -> float:
    mu = check_positive("mu", mu)
    if mu > L:
        raise OptionError(
            f"mu: expected 0 < mu ≤ L = {L!r}, got mu = {mu!r}. Pass μ ≤ L (μ/L ≤ 1)."
        )
    return mu


def _steps(k: Any) -> np.ndarray:
    k = np.asarray(k)
    if not np.issubdtype(k.dtype, np.number) or np.any(k < 0):
        raise OptionError(f"k: expected step counts ≥ 0 (an int or an array of ints), got {k!r}.")
    return k.astype(float)


def gd_step(L: float) -> float:
    """The classical gradient-descent step ``α = 1/L`` for an ``L``-smooth function.

    With it, ``f(x − α∇f(x)) ≤ f(x) − ‖∇f(x)‖²/(2L)`` (the descent lemma).

    >>> gd_step(4.0)
    0.25

    Reference: Nesterov (2004), *Introductory Lectures on Convex Optimization*, §2.1.5.
    """
    return 1.0 / check_positive("L", L)


def zo_sphere_step(L: float, d: int) -> float:
    """Step ``α = 1/(dL)`` for 2-point zero-order GD with one direction uniform on the sphere.

    The estimate ``G = d·⟨∇f, u⟩u`` has ``E G = ∇f`` and ``E‖G‖² = d‖∇f‖²``, so ``c = d`` in
    ``α = 1/(cL)`` (see the module docstring).

    >>> round(zo_sphere_step(2.0, 10), 4)
    0.05

    Reference: Duchi et al. (2015); Nesterov & Spokoiny (2017).
    """
    return 1.0 / (check_positive_int("d", d) * check_positive("L", L))


def zo_iid_step(L: float, d: int, k: int) -> float:
    """Step ``α = 1/(L(1 + (d−1)/k))`` for the mean of ``k`` iid sphere-direction 2-point estimates.

    ``E‖G‖² = (1 + (d−1)/k)‖∇f‖²``; ``k = 1`` gives :func:`zo_sphere_step`, ``k → ∞`` gives :func:`gd_step`.

    >>> round(zo_iid_step(1.0, 10, 1), 4), round(zo_iid_step(1.0, 10, 9), 4)
    (0.1, 0.5)

    Reference: Duchi et al. (2015), §2 (multi-point averaging).
    """
    k = check_positive_int("k", k)
    d = check_positive_int("d", d)
    return 1.0 / (check_positive("L", L) * (1.0 + (d - 1) / k))


def zo_orthogonal_step(L: float, d: int, k: int) -> float:
    """Step ``α = k/(dL)`` for ``k ≤ d`` orthonormal directions (``E‖G‖² = (d/k)‖∇f‖²``).

    With ``k = d`` orthonormal directions the estimate is the exact gradient (up to the difference
    error) and the step is ``1/L``.

    >>> round(zo_orthogonal_step(1.0, 10, 5), 4), zo_orthogonal_step(1.0, 10, 10)
    (0.5, 1.0)

    Reference: Kozak, Becker, Doostan & Tenorio (2021), "Stochastic subspace descent" (random
    orthonormal directions scaled by ``d/k``); Duchi et al. (2015) for the 1/(cL) rule.
    """
    d = check_positive_int("d", d)
    k = check_positive_int("k", k)
    if k > d:
        raise OptionError(
            f"k: at most d = {d} orthonormal directions exist in ℝᵈ, got k = {k}. Pass k ≤ d."
        )
    return k / (d * check_positive("L", L))


def gaussian_smoothing_step(L: float, d: int) -> float:
    """Nesterov–Spokoiny step ``α = 1/(4(d+4)L)`` for Gaussian-direction 2-point GD.

    For ``u ~ N(0, I_d)`` the exact directional estimate ``⟨∇f, u⟩u`` has ``E‖G‖² = (d+2)‖∇f‖² ≤
    (d+4)‖∇f‖²``; their smoothed estimate ``g_μ = (f(x+μu) − f(x))/μ·u`` has ``E‖g_μ‖² ≤
    2(d+4)‖∇f‖² + μ²L²(d+6)³/2``. With ``c = 2(d+4)`` the rule ``α = 1/(2cL)`` gives the step above,
    the one of their random search method for smooth convex ``f`` (Theorem 8).

    >>> round(gaussian_smoothing_step(1.0, 10), 5)
    0.01786

    Reference: Nesterov & Spokoiny (2017), "Random gradient-free minimization of convex functions",
    FoCM 17:527–566, §3 (the moment bounds) and §5 (the method).
    """
    return 1.0 / (4.0 * (check_positive_int("d", d) + 4) * check_positive("L", L))


def quadratic_exact_step(g: Any, hg: Any) -> float:
    """Exact line-search step along ``−g`` on a quadratic: ``α* = ⟨g, g⟩ / ⟨g, Hg⟩``.

    For ``f(x) = ½xᵀHx − bᵀx`` (``H`` SPD), ``φ(α) = f(x − αg)`` is a parabola minimised at ``α*``
    (``g``: any direction, e.g. the gradient or an estimate of it; ``hg = H g``, e.g. from an HVP).
    Shapes: ``g`` and ``hg`` are arrays of one shape (ravelled here). With ``g = ∇f`` this is steepest
    descent with exact line search, which contracts the gap by ``((κ−1)/(κ+1))²`` per step.

    >>> H = np.diag([1.0, 4.0]); g = np.array([1.0, 1.0])
    >>> round(quadratic_exact_step(g, H @ g), 4)
    0.4

    Reference: Nesterov (2004), §1.2.3; Nocedal & Wright (2006), *Numerical Optimization*, §3.3.
    """
    g = np.ravel(np.asarray(g, dtype=float))
    hg = np.ravel(np.asarray(hg, dtype=float))
    if g.shape != hg.shape:
        raise ShapeError(
            f"hg: expected the shape of g, {g.shape}, got {hg.shape}. Pass hg = H @ g."
        )
    curv = float(g @ hg)
    if not curv > 0:
        raise OptionError(
            f"hg: the curvature ⟨g, Hg⟩ must be > 0 (H positive definite along g), got {curv!r}."
        )
    return float(g @ g) / curv


def zo_trace_step(L: float, d: int, trace_h: float) -> float:
    """Curvature-aware step ``α = (d+2)/(d(tr H + 2L))`` for 1-direction sphere ZO-GD on a quadratic.

    For ``G = d⟨g, u⟩u`` on ``f = ½xᵀHx − bᵀx``, ``E[GᵀHG] = d²E[⟨g,u⟩²uᵀHu] =
    d(tr H·‖g‖² + 2gᵀHg)/(d+2) ≤ d(tr H + 2L)‖g‖²/(d+2)``; minimising the expected quadratic model gives the
    step above. It is never smaller than :func:`zo_sphere_step` (``tr H ≤ dL``). On the least-squares
    instances of ``benchmarks/zo_budget.py`` it cut the iterations of 1/(dL) by 1.5–2.8×.

    >>> round(zo_trace_step(1.0, 10, 10.0), 4), round(zo_sphere_step(1.0, 10), 4)
    (0.1, 0.1)

    Reference: the moments of the uniform sphere distribution, ``E[u_i²] = 1/d``,
    ``E[u_i⁴] = 3/(d(d+2))``, ``E[u_i²u_j²] = 1/(d(d+2))`` (e.g. Muirhead, *Aspects of Multivariate
    Statistical Theory*, 1982, §1.5); Duchi et al. (2015) for the 2-point estimate.
    """
    d = check_positive_int("d", d)
    return (d + 2) / (d * (check_positive("trace_h", trace_h) + 2 * check_positive("L", L)))


def second_moment_factor(d: int, num_directions: int = 1, sampling: str = "iid") -> float:
    """``c`` in ``E‖G‖² = c‖∇f‖²`` for 2-point sphere estimates: ``1 + (d−1)/k`` (iid) or ``d/k``.

    >>> second_moment_factor(10), second_moment_factor(10, 5, "orthogonal")
    (10.0, 2.0)

    Reference: Duchi, Jordan, Wainwright & Wibisono (2015), "Optimal rates for zero-order convex
    optimization: the power of two function evaluations", IEEE Trans. Inf. Theory 61(5).
    """
    d = check_positive_int("d", d)
    k = check_positive_int("num_directions", num_directions)
    check_choice("sampling", sampling, _SAMPLINGS)
    if sampling == "orthogonal":
        if k > d:
            raise OptionError(
                f"num_directions: at most d = {d} orthonormal directions exist in ℝᵈ, got {k}. "
                "Pass num_directions ≤ d."
            )
        return d / k
    return 1.0 + (d - 1) / k


def gd_rate(k: Any, *, L: float, mu: float) -> np.ndarray:
    """Bound on the relative gap of GD with step ``1/L``: ``(f(x_k) − f*)/(f(x_0) − f*) ≤ (1 − μ/L)^k``.

    From the descent lemma and the Polyak–Łojasiewicz inequality ``‖∇f‖² ≥ 2μ(f − f*)`` (which holds for
    ``μ``-strongly convex ``f``). ``k``: an int or an array of step counts; the result has its shape.

    >>> np.round(gd_rate([0, 1, 10], L=10.0, mu=1.0), 4)
    array([1.    , 0.9   , 0.3487])

    Reference: Nesterov (2004), Theorem 2.1.15; Karimi, Nutini & Schmidt (2016) for the PL form.
    """
    L = check_positive("L", L)
    mu = _check_mu(L, mu)
    return np.asarray((1.0 - mu / L) ** _steps(k))


def zo_rate(
    k: Any, *, L: float, mu: float, d: int, num_directions: int = 1, sampling: str = "iid"
) -> np.ndarray:
    """Expected relative gap of 2-point ZO-GD with the matching step ``1/(cL)``: ``(1 − μ/(cL))^k``.

    ``c = 1 + (d−1)/k_dir`` for ``sampling="iid"`` (``c = d`` for one direction: the seed's
    ``(1 − μ/(dL))^k``), ``c = d/k_dir`` for ``"orthogonal"``. The bound holds for the expectation of the
    gap, in the limit of a small difference step (the ``O(h²)`` difference error is left out).

    >>> np.round(zo_rate([0, 10], L=10.0, mu=1.0, d=10), 4)
    array([1.    , 0.9044])
    >>> bool(zo_rate(50, L=10.0, mu=1.0, d=10) > gd_rate(50, L=10.0, mu=1.0))
    True

    Reference: Nesterov & Spokoiny (2017), §5; Duchi et al. (2015).
    """
    L = check_positive("L", L)
    mu = _check_mu(L, mu)
    c = second_moment_factor(d, num_directions, sampling)
    return np.asarray((1.0 - mu / (c * L)) ** _steps(k))


def gd_grad_norm_bound(k: Any, *, L: float, gap0: float) -> np.ndarray:
    """Smooth (possibly nonconvex) GD, step ``1/L``: ``min_{i<k} ‖∇f(x_i)‖² ≤ 2L(f(x_0) − f*)/k``.

    Summing the descent lemma over ``k`` steps. ``gap0 = f(x_0) − f*`` (or a lower bound of ``f``).
    ``k ≥ 1``: an int or an array.

    >>> np.round(gd_grad_norm_bound([1, 10], L=1.0, gap0=1.0), 3)
    array([2. , 0.2])

    Reference: Nesterov (2004), §1.2.3, eq. (1.2.15).
    """
    return np.asarray(
        2.0 * check_positive("L", L) * check_positive("gap0", gap0) / _positive_steps(k)
    )


def zo_grad_norm_bound(
    k: Any, *, L: float, gap0: float, d: int, num_directions: int = 1, sampling: str = "iid"
) -> np.ndarray:
    """Smooth ZO-GD, step ``1/(cL)``: ``min_{i<k} E‖∇f(x_i)‖² ≤ 2cL(f(x_0) − f*)/k`` — ``O(d/k)``.

    ``c`` as in :func:`zo_rate` (``c = d`` for one sphere direction), so the bound is ``c×`` GD's.

    >>> round(float(zo_grad_norm_bound(10, L=1.0, gap0=1.0, d=10)), 3)
    2.0

    Reference: Nesterov & Spokoiny (2017), §7 (nonconvex case).
    """
    c = second_moment_factor(d, num_directions, sampling)
    return np.asarray(c * gd_grad_norm_bound(k, L=L, gap0=gap0))


def gd_convex_bound(k: Any, *, L: float, r0: float) -> np.ndarray:
    """Convex GD, step ``1/L``: ``f(x_k) − f* ≤ L‖x_0 − x*‖²/(2k)`` (``r0 = ‖x_0 − x*‖``, ``k ≥ 1``).

    >>> np.round(gd_convex_bound([1, 100], L=2.0, r0=1.0), 3)
    array([1.  , 0.01])

    Reference: Nesterov (2004), Corollary 2.1.2 (constant ``2L r0²/(k+4)``); Beck (2017), *First-Order
    Methods in Optimization*, Theorem 10.21 (the constant used here).
    """
    return np.asarray(
        check_positive("L", L) * check_positive("r0", r0) ** 2 / (2.0 * _positive_steps(k))
    )


def zo_convex_bound(
    k: Any, *, L: float, r0: float, d: int, num_directions: int = 1, sampling: str = "iid"
) -> np.ndarray:
    """Convex ZO-GD, step ``1/(2cL)``: ``E f(x̄_k) − f* ≤ 2cL‖x_0 − x*‖²/k`` for the average iterate.

    From ``E‖x_{i+1} − x*‖² ≤ ‖x_i − x*‖² − α(f(x_i) − f*)`` when ``αcL = ½``; ``O(d/k)`` for one sphere
    direction (``c = d``), against ``O(1/k)`` for :func:`gd_convex_bound`.

    >>> round(float(zo_convex_bound(100, L=1.0, r0=1.0, d=10)), 3)
    0.2

    Reference: Nesterov & Spokoiny (2017), Theorem 6 (Gaussian directions, constant ``4(n+4)``);
    Duchi et al. (2015).
    """
    c = second_moment_factor(d, num_directions, sampling)
    return np.asarray(
        2.0 * c * check_positive("L", L) * check_positive("r0", r0) ** 2 / _positive_steps(k)
    )


def _positive_steps(k: Any) -> np.ndarray:
    k = _steps(k)
    if np.any(k < 1):
        raise OptionError(f"k: these bounds need step counts k ≥ 1, got {k!r}.")
    return k


def steps_to_tol(
    rate_fn: Callable[[Any], Any], tol: float, *, max_steps: int = 10**9
) -> int | None:
    """The smallest integer ``k ≥ 0`` with ``rate_fn(k) ≤ tol``, or ``None`` if beyond ``max_steps``.

    ``rate_fn`` must be non-increasing in ``k`` (every curve of this module is); it is searched by
    doubling then bisection, ``O(log k)`` calls. For a geometric rate ``q^k`` this is
    ``⌈log(tol)/log(q)⌉``.

    >>> steps_to_tol(lambda k: 0.5 ** np.asarray(k, float), 1e-3)
    10
    >>> import math; math.ceil(math.log(1e-3) / math.log(0.5))
    10

    Reference: the inverse of the rate curves of Nesterov (2004), §2.1.
    """
    if not callable(rate_fn):
        raise OptionError(f"rate_fn: expected a callable k -> rate, got {type(rate_fn).__name__}.")
    tol = check_positive("tol", tol)
    max_steps = check_positive_int("max_steps", max_steps)

    def ok(k: int) -> bool:
        return bool(float(np.asarray(rate_fn(k))) <= tol)

    if ok(0):
        return 0
    hi = 1
    while not ok(hi):
        if hi >= max_steps:
            return None
        hi = min(2 * hi, max_steps)
    lo = hi // 2  # ok(lo) is False (lo = 0 was checked)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
