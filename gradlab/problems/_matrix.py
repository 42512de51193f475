"""Matrix-calculus problems: each loss with a gradient derived by hand from its differential.

The recipe, used for every problem below: expand the differential of the loss with the rules
``d(XY) = dX·Y + X·dY``, ``d(X⁻¹) = −X⁻¹ dX X⁻¹``, ``d log det X = ⟨X⁻ᵀ, dX⟩``,
``d⟨X, Y⟩ = ⟨dX, Y⟩ + ⟨X, dY⟩`` and the cyclic trace, until it reads ``df = ⟨G, dX⟩`` with the
Frobenius inner product ``⟨A, B⟩ = tr(AᵀB)``; then ``∇f = G``. The Hessian-vector product is the
differential of the gradient in the direction ``V``: ``∇²f(X)[V] = d(∇f)(X)[V]``.

Nothing here calls ``jax.grad``, ``jax.jvp`` or ``jax.vjp``: the closed forms are what the AD oracles
are checked against.

As in the rest of the catalog, ``loss``, ``grad`` and ``hvp`` are module-level functions of
``(params, **data)`` with the instance's data bound by :class:`jax.tree_util.Partial`: they are pytrees
whose leaves are the data, so passed as an *argument* to a jitted function they compile once for every
instance of the same shapes; called directly they behave as plain functions. Instances are drawn
with JAX (a function of the key) and assembled with NumPy in float64 on the host, so building one
compiles little more than the random-number kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from gradlab._validate import OptionError, check_positive, check_positive_int
from gradlab.problems import Problem, register
from gradlab.problems._common import resolve_dtype

__all__: list[str] = []  # the problems are reached through the registry (problems.make)

_SEED = 'D. Merkulov, lecture "Matrix differentiation. Automatic differentiation"'
_MAGNUS = (
    "J. R. Magnus & H. Neudecker, Matrix Differential Calculus with Applications in Statistics and "
    "Econometrics, 3rd ed., Wiley, 2019"
)
_GILES = (
    "M. B. Giles, Collected matrix derivative results for forward and reverse mode algorithmic "
    "differentiation, 2008"
)
_BOYD = "S. Boyd & L. Vandenberghe, Convex Optimization, Cambridge University Press, 2004"
_TOWNSEND = "J. Townsend, Differentiating the singular value decomposition, 2016"


# ----------------------------------------------------------------------------------------------------
# Private helpers (instances and option checks)
# ----------------------------------------------------------------------------------------------------


# Compiling the random-number kernel dominates the cost of building a small instance, so instances and
# random points draw a power-of-two number of normals (one compilation per bucket and dtype, shared by
# every problem) and cut their arrays from the front of the draw.


def _bucket(size: int) -> int:
    """The draw size for ``size`` numbers: the next power of two, at least 64."""
    return max(64, 1 << (size - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("size", "dt"))
def _draw_flat(key: Any, *, size: int, dt: Any) -> jax.Array:
    return jax.random.normal(key, (size,), dt)


def _cut(flat: Any, shapes: tuple[tuple[int, ...], ...]) -> list[Any]:
    sizes = [math.prod(shape) for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [
        flat[o : o + k].reshape(shape) for o, k, shape in zip(offsets, sizes, shapes, strict=True)
    ]


def _gaussians(key: Any, dt: Any, *shapes: tuple[int, ...]) -> list[jax.Array]:
    """Standard-normal JAX arrays of the given shapes, cut from one bucketed draw."""
    return _cut(_draw_flat(key, size=_bucket(sum(map(math.prod, shapes))), dt=dt), shapes)


def _host_draw(key: Any, dt: Any, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """:func:`_gaussians` as float64 NumPy arrays, for building an instance on the host.

    Instances are drawn with JAX (so they are functions of the key) but assembled with NumPy in
    float64: the linear algebra of a small instance (QR, solves, eigenvalues) costs far less in LAPACK
    than compiling it with XLA, and the stored constants come out in float64 whatever ``dtype``.
    """
    flat = _draw_flat(key, size=_bucket(sum(map(math.prod, shapes))), dt=dt)
    return _cut(np.asarray(flat, np.float64), shapes)


def _rounded(a: Any, dt: Any) -> np.ndarray:
    """``a`` rounded to ``dt`` and back to float64: the instance's data exactly as the loss sees it."""
    return np.asarray(np.asarray(a, dt), np.float64)


def _log_spaced(xp: Any, lo: float, hi: float, n: int, dt: Any) -> Any:
    return lo * (hi / lo) ** xp.linspace(0.0, 1.0, n, dtype=dt)


def _spd_from(xp: Any, g: Any, lo: float, hi: float) -> Any:
    """An SPD matrix with eigenvalues log-spaced in ``[lo, hi]`` and eigenvectors from ``qr(g)``.

    ``xp`` is ``numpy`` (instances, on the host) or ``jax.numpy`` (random points, traceable).
    """
    q, _ = xp.linalg.qr(g)
    a = (q * _log_spaced(xp, lo, hi, g.shape[0], g.dtype)[None, :]) @ q.T
    return (a + a.T) / 2


def _conditioned_from(xp: Any, g1: Any, g2: Any, lo: float, hi: float) -> Any:
    """A non-symmetric matrix with singular values log-spaced in ``[lo, hi]``, singular vectors from
    ``qr(g1)`` and ``qr(g2)``."""
    q1, _ = xp.linalg.qr(g1)
    q2, _ = xp.linalg.qr(g2)
    return (q1 * _log_spaced(xp, lo, hi, g1.shape[0], g1.dtype)[None, :]) @ q2.T


def _normal(key: Any, shape: tuple[int, ...], dt: Any) -> jax.Array:
    return _gaussians(key, dt, shape)[0]


_spd_jit = jax.jit(functools.partial(_spd_from, jnp), static_argnames=("lo", "hi"))
_conditioned_jit = jax.jit(functools.partial(_conditioned_from, jnp), static_argnames=("lo", "hi"))


def _random_spd(key: Any, n: int, dt: Any) -> jax.Array:
    (g,) = _gaussians(key, dt, (n, n))
    return _spd_jit(g, lo=0.5, hi=2.0)


def _random_linear_system(key: Any, n: int, dt: Any) -> dict[str, jax.Array]:
    g1, g2, b = _gaussians(key, dt, (n, n), (n, n), (n,))
    return {"A": _conditioned_jit(g1, g2, lo=1.0, hi=4.0), "b": b}


def _check_cond(cond: Any) -> float:
    c = check_positive("cond", cond)
    if c < 1.0:
        raise OptionError(
            f"cond: expected a condition number ≥ 1, got {cond!r}. Pass e.g. cond=10.0."
        )
    return c


def _options(dt: Any, **opts: Any) -> dict[str, Any]:
    return {**opts, "dtype": str(dt)}


# ----------------------------------------------------------------------------------------------------
# Vectors: quadratic forms and least squares
# ----------------------------------------------------------------------------------------------------


def _quadratic_instance(key, n, cond, dt):
    g_s, g_k, b, c = _host_draw(key, dt, (n, n), (n, n), (n,), ())
    a = _rounded(_spd_from(np, g_s, 1.0, cond) / 2 + (g_k - g_k.T) / 2, dt)
    h = a + a.T  # exact in float64 (and exactly symmetric) for data rounded to float32 or float64
    x_star = np.linalg.solve(h, b)
    eig = np.linalg.eigvalsh(h)
    return a, b, c, h, x_star, float(c - 0.5 * (b @ x_star)), eig


def _quadratic_loss(x, *, A, b, c):
    return x @ (A @ x) - b @ x + c


def _quadratic_grad(x, *, H, b):
    return H @ x - b  # H = A + Aᵀ


def _quadratic_hvp(x, v, *, H):
    del x
    return H @ v


@register("quadratic")
def quadratic(key, /, *, dim=10, cond=10.0, dtype=None) -> Problem:
    """Quadratic form f(x) = ⟨x, Ax⟩ − bᵀx + c with a non-symmetric A (the lecture notes' example 1).

    Math:
      ``f(x) = ⟨x, Ax⟩ − bᵀx + c`` with ``x, b ∈ ℝⁿ``, ``c ∈ ℝ`` and ``A ∈ ℝⁿˣⁿ`` *not* symmetric:
      ``A = S/2 + K`` with ``S`` SPD (eigenvalues log-spaced in ``[1, cond]``) and ``K`` skew, so
      ``A + Aᵀ = S`` (up to rounding) is positive definite.

    Gradient by differentials:
      ``df = ⟨dx, Ax⟩ + ⟨x, A dx⟩ − ⟨b, dx⟩ = ⟨Ax + Aᵀx − b, dx⟩``, so ``∇f(x) = (A + Aᵀ)x − b``.
      Only the symmetric part of ``A`` survives; writing ``2Ax − b`` is the classic slip when ``A`` is
      not symmetric. Differentiating once more, ``∇²f = A + Aᵀ`` and ``hvp(x, v) = (A + Aᵀ)v``.

    Facts:
      solution ``x* = (A + Aᵀ)⁻¹b``, ``min_value = c − ½ bᵀx*``, and ``L``, ``μ`` are the largest
      and smallest eigenvalues of ``A + Aᵀ``. ``init`` is the zero vector.

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      dim: ``n``, the dimension of ``x``.
      cond: the condition number of ``A + Aᵀ`` (≥ 1).
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, example 1; Magnus & Neudecker (differentials of quadratic forms).

    >>> import jax, jax.numpy as jnp
    >>> from gradlab import problems
    >>> p = problems.make("quadratic", jax.random.key(0), dim=4, cond=5.0)
    >>> bool(jnp.allclose(p.data["A"], p.data["A"].T))
    False
    >>> round(p.strong_convexity, 4), round(p.smoothness, 4)
    (1.0, 5.0)
    >>> float(jnp.linalg.norm(p.grad(p.solution))) < 1e-4
    True
    """
    n = check_positive_int("dim", dim)
    cond = _check_cond(cond)
    dt = resolve_dtype(dtype)
    a, b, c, h, x_star, f_star, eig = _quadratic_instance(key, n, cond, dt)
    a, b, c, h = (jnp.asarray(arr, dt) for arr in (a, b, c, h))

    def random_point(k):
        return _normal(k, (n,), dt)

    return Problem(
        name="quadratic",
        loss=Partial(_quadratic_loss, A=a, b=b, c=c),
        grad=Partial(_quadratic_grad, H=h, b=b),
        hvp=Partial(_quadratic_hvp, H=h),
        init=jnp.asarray(np.zeros(n), dt),
        solution=jnp.asarray(x_star, dt),
        min_value=f_star,
        smoothness=float(eig[-1]),
        strong_convexity=float(eig[0]),
        random_point=random_point,
        data={"A": a, "b": b, "c": c},
        options=_options(dt, dim=n, cond=cond),
        description="f(x) = ⟨x, Ax⟩ − bᵀx + c, A non-symmetric, A + Aᵀ ≻ 0",
        reference=f"{_SEED}, example 1; {_MAGNUS}",
        analytic=True,
        smooth=True,
    )


def _log_quadratic_instance(key, n, cond, dt):
    g, init = _host_draw(key, dt, (n, n), (n,))
    return jnp.asarray(_spd_from(np, g, 1.0, cond), dt), jnp.asarray(init, dt)


def _log_quadratic_loss(x, *, A):
    return jnp.log(x @ (A @ x))


def _log_quadratic_grad(x, *, A):
    ax = A @ x
    return 2 * ax / (x @ ax)


def _log_quadratic_hvp(x, v, *, A):
    ax = A @ x
    q = x @ ax
    return 2 * (A @ v) / q - 4 * ax * (ax @ v) / q**2


@register("log_quadratic")
def log_quadratic(key, /, *, dim=10, cond=10.0, dtype=None) -> Problem:
    """Log of a quadratic form f(x) = ln⟨x, Ax⟩ with A SPD (the lecture notes' example 2).

    Math:
      ``f(x) = ln⟨x, Ax⟩`` on ``x ∈ ℝⁿ \\ {0}``, ``A`` SPD (so the argument of the logarithm is
      positive), eigenvalues log-spaced in ``[1, cond]``.

    Gradient by differentials:
      with ``q = ⟨x, Ax⟩``, ``df = dq / q = (⟨dx, Ax⟩ + ⟨x, A dx⟩) / q = ⟨(A + Aᵀ)x, dx⟩ / q``, and
      ``A = Aᵀ`` gives ``∇f(x) = 2Ax / q``. The HVP is the differential of that quotient in the
      direction ``v``: ``d(2Ax/q) = 2Av/q − 2Ax·dq/q²`` with ``dq = 2⟨Ax, v⟩``, so
      ``hvp(x, v) = 2Av/q − 4(Ax)⟨Ax, v⟩/q²``.

    Facts:
      ``f(tx) = f(x) + 2 ln|t|``: scale-invariant up to a constant, unbounded below as ``x → 0`` and
      not convex, so ``solution``, ``min_value``, ``L`` and ``μ`` are ``None``. ``random_point``
      draws a Gaussian vector (non-zero with probability one).

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      dim: ``n``, the dimension of ``x``.
      cond: the condition number of ``A`` (≥ 1).
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, example 2; Magnus & Neudecker.

    >>> import jax, jax.numpy as jnp
    >>> from gradlab import problems
    >>> p = problems.make("log_quadratic", jax.random.key(0), dim=3)
    >>> x = p.random_point(jax.random.key(1))
    >>> round(float(p.grad(x) @ x), 6)  # Euler: ⟨∇f(x), x⟩ = 2 for the log of a 2-homogeneous q
    2.0
    >>> p.solution is None
    True
    """
    n = check_positive_int("dim", dim)
    cond = _check_cond(cond)
    dt = resolve_dtype(dtype)
    a, init = _log_quadratic_instance(key, n, cond, dt)

    def random_point(k):
        return _normal(k, (n,), dt)

    return Problem(
        name="log_quadratic",
        loss=Partial(_log_quadratic_loss, A=a),
        grad=Partial(_log_quadratic_grad, A=a),
        hvp=Partial(_log_quadratic_hvp, A=a),
        init=init,
        solution=None,
        min_value=None,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"A": a},
        options=_options(dt, dim=n, cond=cond),
        description="f(x) = ln⟨x, Ax⟩, A SPD, x ≠ 0",
        reference=f"{_SEED}, example 2; {_MAGNUS}",
        analytic=True,
        smooth=True,
    )


def _least_squares_instance(key, n, m, dt):
    x_mat, w0, noise = _host_draw(key, dt, (m, n), (n,), (m,))
    y = _rounded(x_mat @ w0 + 0.1 * noise, dt)
    w_star = np.linalg.lstsq(x_mat, y, rcond=None)[0]
    r_star = x_mat @ w_star - y
    sv = np.linalg.svd(x_mat, compute_uv=False)
    return x_mat, y, w_star, float(r_star @ r_star), sv


def _least_squares_loss(w, *, X, y):
    r = X @ w - y
    return r @ r  # not jnp.vdot, which conjugates: the loss must stay complex-step safe


def _least_squares_grad(w, *, X, y):
    return 2 * (X.T @ (X @ w - y))


def _least_squares_hvp(w, v, *, X):
    del w
    return 2 * (X.T @ (X @ v))


@register("least_squares")
def least_squares(key, /, *, dim=10, num_samples=20, dtype=None) -> Problem:
    """Linear least squares f(w) = ‖Xw − y‖² (not halved).

    Math:
      ``f(w) = ‖Xw − y‖²`` with ``X ∈ ℝᵐˣⁿ`` Gaussian (``m = num_samples``, ``n = dim``), ``w ∈ ℝⁿ``
      and ``y = Xw₀ + 0.1·ε`` for a hidden Gaussian ``w₀`` and noise ``ε``. The loss is **not** halved,
      so every derivative carries a factor 2.

    Gradient by differentials:
      with ``r = Xw − y``, ``df = d⟨r, r⟩ = 2⟨r, X dw⟩ = ⟨2Xᵀr, dw⟩``, so
      ``∇f(w) = 2Xᵀ(Xw − y)``; once more, ``∇²f = 2XᵀX`` and ``hvp(w, v) = 2Xᵀ(Xv)``.

    Facts:
      ``solution`` is the least-squares solution (``jnp.linalg.lstsq``; the minimum-norm one when
      ``m < n``), ``min_value = ‖Xw* − y‖²`` (``0`` when ``m ≤ n``), ``L = 2σ_max(X)²`` and
      ``μ = 2σ_min(X)²`` when ``m ≥ n``; for ``m < n`` the loss is convex but not strongly convex and
      ``μ`` is ``None``. ``init`` is the zero vector.

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      dim: ``n``, the number of features (the dimension of ``w``).
      num_samples: ``m``, the number of rows of ``X``.
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture (matrix calculus examples); Magnus & Neudecker.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("least_squares", jax.random.key(0), dim=3, num_samples=8)
    >>> p.data["X"].shape, p.solution.shape
    ((8, 3), (3,))
    >>> round(p.smoothness / p.strong_convexity, 2) > 1
    True
    """
    n = check_positive_int("dim", dim)
    m = check_positive_int("num_samples", num_samples)
    dt = resolve_dtype(dtype)
    x_mat, y, w_star, r_star, sv = _least_squares_instance(key, n, m, dt)
    x_mat, y = jnp.asarray(x_mat, dt), jnp.asarray(y, dt)

    def random_point(k):
        return _normal(k, (n,), dt)

    return Problem(
        name="least_squares",
        loss=Partial(_least_squares_loss, X=x_mat, y=y),
        grad=Partial(_least_squares_grad, X=x_mat, y=y),
        hvp=Partial(_least_squares_hvp, X=x_mat),
        init=jnp.asarray(np.zeros(n), dt),
        solution=jnp.asarray(w_star, dt),
        min_value=r_star if m > n else 0.0,
        smoothness=2 * float(sv[0]) ** 2,
        strong_convexity=2 * float(sv[-1]) ** 2 if m >= n else None,
        random_point=random_point,
        data={"X": x_mat, "y": y},
        options=_options(dt, dim=n, num_samples=m),
        description="f(w) = ‖Xw − y‖², X ∈ ℝ^(num_samples × dim)",
        reference=f"{_SEED}; {_MAGNUS}",
        analytic=True,
        smooth=True,
    )


# ----------------------------------------------------------------------------------------------------
# Matrices: log det, multidimensional scaling, SVD losses, linear solve
# ----------------------------------------------------------------------------------------------------


def _log_det_instance(key, n, cond, dt):
    (g,) = _host_draw(key, dt, (n, n))
    s = _rounded(_spd_from(np, g, 1.0, cond), dt)
    s_inv = np.linalg.inv(s)
    return s, (s_inv + s_inv.T) / 2, float(np.linalg.slogdet(s)[1])


def _log_det_loss(x, *, S):
    _, logabsdet = jnp.linalg.slogdet(x)
    return jnp.sum(S * x) - logabsdet


def _log_det_grad(x, *, S):
    return S - jnp.linalg.solve(x.T, jnp.eye(x.shape[0], dtype=x.dtype))


def _log_det_hvp(x, v):
    y = jnp.linalg.solve(x.T, v.T)  # X⁻ᵀ Vᵀ
    return jnp.linalg.solve(x, y.T).T  # (X⁻¹ (X⁻ᵀVᵀ)ᵀ)ᵀ = X⁻ᵀ Vᵀ X⁻ᵀ


@register("log_det")
def log_det(key, /, *, dim=5, cond=10.0, dtype=None) -> Problem:
    """Log-det barrier f(X) = ⟨S, X⟩ − log det X over SPD matrices (the lecture notes' example 3).

    Math:
      ``f(X) = ⟨S, X⟩ − log det X`` with ``X`` SPD and data ``S`` SPD (eigenvalues log-spaced in
      ``[1, cond]``). The loss uses ``jnp.linalg.slogdet`` — ``log(det(X))`` under- or overflows for
      moderate ``n`` — and so evaluates ``⟨S, X⟩ − log|det X|`` for any invertible ``X``.

    Gradient by differentials:
      ``d det X = det X ⟨X⁻ᵀ, dX⟩`` gives ``d log det X = ⟨X⁻ᵀ, dX⟩``, so ``df = ⟨S − X⁻ᵀ, dX⟩`` and
      ``∇f(X) = S − X⁻ᵀ`` (``S − X⁻¹`` on symmetric ``X``). Differentiating ``−X⁻ᵀ`` with
      ``d(X⁻¹) = −X⁻¹ dX X⁻¹`` and transposing: ``hvp(X, V) = X⁻ᵀ Vᵀ X⁻ᵀ``. Note the ``Vᵀ``: on all of
      ``ℝⁿˣⁿ`` (what ``jax.hessian`` differentiates over) the Hessian maps ``V ↦ X⁻ᵀVᵀX⁻ᵀ``, which is
      the familiar ``X⁻¹VX⁻¹`` only for symmetric ``V`` and ``X``.

    Facts:
      ``∇f = 0`` at ``X* = S⁻¹`` (``solution``), with ``min_value = n + log det S``. ``f`` is convex on
      the symmetric matrices, but as a function on ``ℝⁿˣⁿ`` its Hessian is negative along
      skew-symmetric directions (``⟨V, X⁻¹VᵀX⁻¹⟩ < 0`` for ``V = −Vᵀ``), and its curvature on the SPD
      cone is unbounded near the boundary: ``L`` and ``μ`` are ``None``. ``init`` is the identity and
      ``random_point`` draws an SPD matrix with eigenvalues in ``[0.5, 2]``.

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      dim: ``n``, the size of ``X``.
      cond: the condition number of ``S`` (≥ 1).
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, example 3; Boyd & Vandenberghe, Convex Optimization, appendix A.4 (the
      gradient of log det); Magnus & Neudecker.

    >>> import jax, jax.numpy as jnp
    >>> from gradlab import problems
    >>> p = problems.make("log_det", jax.random.key(0), dim=3)
    >>> x = p.random_point(jax.random.key(1))
    >>> bool(jnp.all(jnp.linalg.eigvalsh(x) > 0))
    True
    >>> float(jnp.abs(p.loss(p.solution) - p.min_value)) < 1e-4
    True
    """
    n = check_positive_int("dim", dim)
    cond = _check_cond(cond)
    dt = resolve_dtype(dtype)
    s, s_inv, logdet_s = _log_det_instance(key, n, cond, dt)
    s = jnp.asarray(s, dt)

    def random_point(k):
        return _random_spd(k, n, dt)

    return Problem(
        name="log_det",
        loss=Partial(_log_det_loss, S=s),
        grad=Partial(_log_det_grad, S=s),
        hvp=Partial(_log_det_hvp),
        init=jnp.asarray(np.eye(n), dt),
        solution=jnp.asarray(s_inv, dt),
        min_value=n + logdet_s,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"S": s},
        options=_options(dt, dim=n, cond=cond),
        description="f(X) = ⟨S, X⟩ − log det X, S and X SPD",
        reference=f"{_SEED}, example 3; {_BOYD}, appendix A.4; {_MAGNUS}",
        analytic=False,
        smooth=True,
    )


def _sq_dists(w: jax.Array) -> jax.Array:
    diff = w[:, None, :] - w[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def _laplacian(r: jax.Array) -> jax.Array:
    """``diag(R1) − R``: the linear map with ``(Lap(R)W)ᵢ = Σⱼ Rᵢⱼ (Wᵢ − Wⱼ)``."""
    return jnp.diag(jnp.sum(r, axis=1)) - r


def _mds_loss(w, *, D):
    r = _sq_dists(w) - D
    return jnp.sum(r * r)


def _mds_grad(w, *, D):
    return 8 * (_laplacian(_sq_dists(w) - D) @ w)


def _mds_hvp(w, v, *, D):
    diff_w = w[:, None, :] - w[None, :, :]
    diff_v = v[:, None, :] - v[None, :, :]
    dr = 2 * jnp.sum(diff_w * diff_v, axis=-1)
    return 8 * (_laplacian(_sq_dists(w) - D) @ v + _laplacian(dr) @ w)


def _mds_instance(key, n, d, dt):
    z, init = _host_draw(key, dt, (n, d), (n, d))
    diff = z[:, None, :] - z[None, :, :]
    return (jnp.asarray(arr, dt) for arr in (z, (diff * diff).sum(axis=-1), init))


@register("mds")
def mds(key, /, *, num_points=8, dim=2, dtype=None) -> Problem:
    """Multidimensional scaling L(W) = Σᵢⱼ (‖Wᵢ − Wⱼ‖² − Dᵢⱼ)² on squared distances (the notes' MDS).

    Math:
      ``L(W) = Σᵢ,ⱼ (‖Wᵢ − Wⱼ‖² − Dᵢⱼ)²`` over ``W ∈ ℝᴺˣᵈ`` (row ``Wᵢ`` is point ``i``), the sum over
      all ordered pairs, with ``Dᵢⱼ = ‖Zᵢ − Zⱼ‖²`` the *squared* distances of hidden Gaussian points
      ``Z ∈ ℝᴺˣᵈ`` (the "S-stress" of Takane, Young & de Leeuw). A quartic polynomial in ``W``.

    Gradient by differentials:
      with ``rᵢⱼ = ‖Wᵢ − Wⱼ‖² − Dᵢⱼ`` (symmetric in ``i, j``),
      ``dL = Σᵢⱼ 2rᵢⱼ · 2⟨Wᵢ − Wⱼ, dWᵢ − dWⱼ⟩``. The ``−dWⱼ`` half, after swapping the names ``i ↔ j``
      and using ``rⱼᵢ = rᵢⱼ``, equals the ``dWᵢ`` half, so ``dL = Σᵢ ⟨8 Σⱼ rᵢⱼ (Wᵢ − Wⱼ), dWᵢ⟩`` and
      ``∇_{Wᵢ} L = 8 Σⱼ rᵢⱼ (Wᵢ − Wⱼ)``, i.e. ``∇L = 8 (diag(R1) − R) W``. Keeping only the ``dWᵢ``
      half — forgetting that ``Wᵢ`` also enters every term through the ``j`` slot, the pair ``(j, i)``
      — gives ``4 Σⱼ rᵢⱼ (Wᵢ − Wⱼ)``: exactly half the true gradient, the classic mistake of
      hand-written MDS gradients.
      HVP: with ``Lap(R) = diag(R1) − R`` linear in ``R`` and ``drᵢⱼ = 2⟨Wᵢ − Wⱼ, Vᵢ − Vⱼ⟩``,
      ``hvp(W, V) = 8 Lap(R) V + 8 Lap(dR) W``.

    Facts:
      ``solution = Z`` with ``min_value = 0``; every rigid motion of ``Z`` (rotation, reflection,
      translation) is a minimiser too, so compare solutions through ``D``. Non-convex, with a quartic
      (not globally Lipschitz) gradient: ``L`` and ``μ`` are ``None``.

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      num_points: ``N`` (≥ 2).
      dim: ``d``, the embedding dimension.
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, "Example: multidimensional scaling"; Y. Takane, F. W. Young & J. de Leeuw,
      Psychometrika 42, 1977.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("mds", jax.random.key(0), num_points=5, dim=2)
    >>> p.init.shape, float(p.loss(p.solution))
    ((5, 2), 0.0)
    """
    n_pts = check_positive_int("num_points", num_points, minimum=2)
    d = check_positive_int("dim", dim)
    dt = resolve_dtype(dtype)
    z, dist, init = _mds_instance(key, n_pts, d, dt)

    def random_point(k):
        return _normal(k, (n_pts, d), dt)

    return Problem(
        name="mds",
        loss=Partial(_mds_loss, D=dist),
        grad=Partial(_mds_grad, D=dist),
        hvp=Partial(_mds_hvp, D=dist),
        init=init,
        solution=z,
        min_value=0.0,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"D": dist, "Z": z},
        options=_options(dt, num_points=n_pts, dim=d),
        description="L(W) = Σᵢⱼ (‖Wᵢ − Wⱼ‖² − Dᵢⱼ)², D squared distances",
        reference=f"{_SEED}, example: multidimensional scaling; Takane, Young & de Leeuw 1977",
        analytic=True,
        smooth=True,
    )


def _nuclear_norm_loss(w):
    return jnp.sum(jnp.linalg.svd(w, compute_uv=False))


def _nuclear_norm_grad(w):
    u, _, vh = jnp.linalg.svd(w, full_matrices=False)
    return u @ vh


def _nuclear_norm_hvp(w, d):
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    v = vh.T
    c = u.T @ d @ v
    omega = (c - c.T) / (s[:, None] + s[None, :])
    left = (d @ v - u @ c) / s[None, :]  # (I − UUᵀ) D V Σ⁻¹, zero when m ≤ n
    right = (u.T @ d - c @ vh) / s[:, None]  # Σ⁻¹ Uᵀ D (I − VVᵀ), zero when m ≥ n
    return u @ omega @ vh + left @ vh + u @ right


@register("nuclear_norm")
def nuclear_norm(key, /, *, rows=6, cols=4, dtype=None) -> Problem:
    """Nuclear norm ‖W‖_* = Σᵢ σᵢ(W) of a rectangular matrix, gradient UVᵀ.

    Math:
      ``f(W) = Σᵢ σᵢ(W)`` for ``W ∈ ℝᵐˣⁿ`` (``m = rows``, ``n = cols``), thin SVD ``W = UΣVᵀ``.

    Gradient by differentials:
      from ``dW = dU Σ Vᵀ + U dΣ Vᵀ + U Σ dVᵀ`` and the skew-symmetry of ``UᵀdU`` and ``VᵀdV`` (zero
      diagonals), ``dΣ = diag(Uᵀ dW V)``. With ``∂f/∂Σ = I``:
      ``df = ⟨I, diag(UᵀdWV)⟩ = ⟨I, UᵀdWV⟩ = ⟨UVᵀ, dW⟩``, so ``∇f(W) = UVᵀ``, the polar factor. It is
      well defined, and ``f`` is differentiable, wherever ``W`` has full rank ``min(m, n)`` (repeated
      singular values do no harm, since the loss depends on ``Σ`` only); a Gaussian ``W`` is full rank.
      At rank-deficient ``W`` (``W = 0`` included) ``f`` has a kink and ``UVᵀ`` is one subgradient.
      HVP (the differential of the polar factor, valid at full rank): with ``C = Uᵀ D V`` for the
      direction ``D``,
      ``hvp(W, D) = U Ω Vᵀ + (I − UUᵀ) D V Σ⁻¹ Vᵀ + U Σ⁻¹ Uᵀ D (I − VVᵀ)`` with
      ``Ωᵢⱼ = (Cᵢⱼ − Cⱼᵢ)/(σᵢ + σⱼ)``; the second term vanishes when ``m ≤ n``, the third when
      ``m ≥ n``.

    Facts:
      convex, minimised by ``solution = 0`` with ``min_value = 0`` (where the gradient returned is a
      subgradient, not zero). Not smooth (``smooth=False``) and not strongly convex: ``L`` and ``μ``
      are ``None``. ``analytic=False`` (SVD). ``init`` and ``random_point`` are Gaussian.

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      rows: ``m``.
      cols: ``n``.
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, "Gradient propagation through the SVD"; Townsend 2016; G. A. Watson,
      Characterization of the subdifferential of some matrix norms, Linear Algebra Appl. 170, 1992.

    >>> import jax, jax.numpy as jnp
    >>> from gradlab import problems
    >>> p = problems.make("nuclear_norm", jax.random.key(0), rows=5, cols=3)
    >>> g = p.grad(p.init)
    >>> g.shape, bool(jnp.allclose(g.T @ g, jnp.eye(3), atol=1e-5))
    ((5, 3), True)
    """
    m = check_positive_int("rows", rows)
    n = check_positive_int("cols", cols)
    dt = resolve_dtype(dtype)

    def random_point(k):
        return _normal(k, (m, n), dt)

    return Problem(
        name="nuclear_norm",
        loss=Partial(_nuclear_norm_loss),
        grad=Partial(_nuclear_norm_grad),
        hvp=Partial(_nuclear_norm_hvp),
        init=random_point(key),
        solution=jnp.asarray(np.zeros((m, n)), dt),
        min_value=0.0,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={},
        options=_options(dt, rows=m, cols=n),
        description="f(W) = ‖W‖_* = Σᵢ σᵢ(W), W ∈ ℝ^(rows × cols)",
        reference=f"{_SEED}, gradient propagation through the SVD; {_TOWNSEND}; Watson 1992",
        analytic=False,
        smooth=False,
    )


# ``top`` is the 0/1 indicator of the kept indices, ``top[i] = (i < rank)``, of length ``rows``: as
# data rather than a static ``rank``, every rank shares one compilation.


def _top_mask(m, k, dt):
    return jnp.asarray(np.arange(m) < k, dt)


def _svd_energy_loss(w, *, top):
    s = jnp.linalg.svd(w, compute_uv=False)
    return 0.5 * jnp.sum(top[: s.shape[0]] * s * s)


def _svd_energy_grad(w, *, top):
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    return (u * (top[: s.shape[0]] * s)[None, :]) @ vh


def _svd_energy_hvp(w, d, *, top):
    m = w.shape[0]
    u, s, _ = jnp.linalg.svd(w, full_matrices=True)  # u: the eigenvectors of WWᵀ, all m of them
    lam = jnp.pad(s * s, (0, m - s.shape[0]))  # the eigenvalues of WWᵀ
    mask = top[:, None] != top[None, :]  # exactly one of i, j among the kept
    gap = jnp.abs(lam[:, None] - lam[None, :])
    f = jnp.where(mask, 1 / jnp.where(mask, gap, 1), 0)
    c = u.T @ (d @ w.T + w @ d.T) @ u
    dp = u @ (f * c) @ u.T
    uk = u * top[None, :]
    return dp @ w + uk @ (uk.T @ d)


@register("svd_energy")
def svd_energy(key, /, *, rows=6, cols=4, rank=2, dtype=None) -> Problem:
    """Top-k singular energy f(W) = ½ Σ_{i≤k} σᵢ(W)², gradient U_k Σ_k V_kᵀ.

    Math:
      ``f(W) = ½ Σ_{i ≤ k} σᵢ(W)²`` for ``W ∈ ℝᵐˣⁿ`` and ``k = rank ≤ min(m, n)``, with
      ``σ₁ ≥ σ₂ ≥ …``. For ``k = min(m, n)`` this is ``½‖W‖_F²``.

    Gradient by differentials:
      as for any loss of the singular values, ``dΣ = diag(Uᵀ dW V)`` gives
      ``df = ⟨∂f/∂Σ, UᵀdWV⟩ = ⟨U (∂f/∂Σ) Vᵀ, dW⟩``; here ``∂f/∂Σ = diag(σ₁, …, σ_k, 0, …)``, so
      ``∇f(W) = U_k Σ_k V_kᵀ = P_k W`` with ``P_k = U_kU_kᵀ`` the projector onto the top-``k`` left
      singular vectors. Valid wherever ``σ_k > σ_{k+1}`` (a Gaussian ``W`` has the gap).
      HVP: ``d(P_k W) = dP_k W + P_k D``. With the full eigendecomposition ``WWᵀ = U Λ Uᵀ``
      (``Λ = σ²`` padded with zeros to ``m``), the perturbation of a spectral projector is
      ``dP_k = U (F ∘ (Uᵀ (DWᵀ + WDᵀ) U)) Uᵀ`` with ``Fᵢⱼ = 1/|λᵢ − λⱼ|`` when exactly one of ``i, j``
      is among the top ``k`` and ``0`` otherwise.

    Facts:
      convex (a maximum over rank-``k`` projectors ``P`` of ``½‖PW‖_F²``), minimised by
      ``solution = 0`` with ``min_value = 0``. For ``k < min(m, n)`` it has kinks where
      ``σ_k = σ_{k+1}`` (``smooth=False``), curvature ``∝ 1/(σ_k² − σ_{k+1}²)`` near them and flat
      directions: ``L`` and ``μ`` are ``None``. For ``k = min(m, n)``, ``L = μ = 1``.
      ``analytic=False`` (SVD).

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      rows: ``m``.
      cols: ``n``.
      rank: ``k``, the number of singular values kept, ``1 ≤ k ≤ min(m, n)``.
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, "Gradient propagation through the SVD"; Townsend 2016; T. Kato, Perturbation
      Theory for Linear Operators, ch. II (derivative of a spectral projector).

    >>> import jax, jax.numpy as jnp
    >>> from gradlab import problems
    >>> p = problems.make("svd_energy", jax.random.key(0), rows=4, cols=3, rank=1)
    >>> w = p.random_point(jax.random.key(1))
    >>> s = jnp.linalg.svd(w, compute_uv=False)
    >>> round(float(p.loss(w) - s[0] ** 2 / 2), 6)
    0.0
    >>> int(jnp.linalg.matrix_rank(p.grad(w)))
    1
    """
    m = check_positive_int("rows", rows)
    n = check_positive_int("cols", cols)
    k = check_positive_int("rank", rank)
    p_min = min(m, n)
    if k > p_min:
        raise OptionError(
            f"rank: expected an integer ≤ min(rows, cols) = {p_min}, got {rank!r}. "
            f"Pass rank ≤ {p_min} or a larger matrix."
        )
    dt = resolve_dtype(dtype)
    top = _top_mask(m, k, dt)

    def random_point(k_):
        return _normal(k_, (m, n), dt)

    full = k == p_min
    return Problem(
        name="svd_energy",
        loss=Partial(_svd_energy_loss, top=top),
        grad=Partial(_svd_energy_grad, top=top),
        hvp=Partial(_svd_energy_hvp, top=top),
        init=random_point(key),
        solution=jnp.asarray(np.zeros((m, n)), dt),
        min_value=0.0,
        smoothness=1.0 if full else None,
        strong_convexity=1.0 if full else None,
        random_point=random_point,
        data={},
        options=_options(dt, rows=m, cols=n, rank=k),
        description="f(W) = ½ Σ_{i≤rank} σᵢ(W)², W ∈ ℝ^(rows × cols)",
        reference=f"{_SEED}, gradient propagation through the SVD; {_TOWNSEND}; Kato, ch. II",
        analytic=False,
        smooth=full,
    )


def _linear_solve_instance(key, n, dt):
    target, g1, g2, g3, g4, b = _host_draw(key, dt, (n,), (n, n), (n, n), (n, n), (n, n), (n,))
    a0 = _rounded(_conditioned_from(np, g1, g2, 1.0, 4.0), dt)
    init = {"A": jnp.asarray(_conditioned_from(np, g3, g4, 1.0, 4.0), dt), "b": jnp.asarray(b, dt)}
    return (jnp.asarray(arr, dt) for arr in (target, a0, a0 @ target)), init


def _linear_solve_loss(params, *, x_target):
    r = jnp.linalg.solve(params["A"], params["b"]) - x_target
    return 0.5 * (r @ r)


def _linear_solve_grad(params, *, x_target):
    a = params["A"]
    x = jnp.linalg.solve(a, params["b"])
    lam = jnp.linalg.solve(a.T, x - x_target)  # the adjoint A⁻ᵀḡ
    return {"A": -jnp.outer(lam, x), "b": lam}


def _linear_solve_hvp(params, v, *, x_target):
    a = params["A"]
    x = jnp.linalg.solve(a, params["b"])
    lam = jnp.linalg.solve(a.T, x - x_target)
    x_dot = jnp.linalg.solve(a, v["b"] - v["A"] @ x)
    lam_dot = jnp.linalg.solve(a.T, x_dot - v["A"].T @ lam)
    return {"A": -jnp.outer(lam_dot, x) - jnp.outer(lam, x_dot), "b": lam_dot}


@register("linear_solve")
def linear_solve(key, /, *, dim=5, dtype=None) -> Problem:
    """Loss through a linear solve L(A, b) = ½‖A⁻¹b − x_target‖², params {"A", "b"}.

    Math:
      params are the pytree ``{"A": A ∈ ℝⁿˣⁿ, "b": b ∈ ℝⁿ}``; ``x = A⁻¹b`` (``jnp.linalg.solve``,
      never ``inv(A) @ b``) and ``L = ½‖x − x_target‖²`` with a Gaussian ``x_target`` (data).

    Gradient by differentials:
      ``A x = b`` gives ``dA x + A dx = db``, so ``dx = A⁻¹(db − dA x)``. With
      ``ḡ = ∂L/∂x = x − x_target`` and the adjoint ``λ = A⁻ᵀḡ``:
      ``dL = ⟨ḡ, A⁻¹(db − dA x)⟩ = ⟨λ, db⟩ − ⟨λxᵀ, dA⟩``, so ``∂L/∂b = A⁻ᵀḡ`` and
      ``∂L/∂A = −A⁻ᵀḡ xᵀ`` — one more solve with ``Aᵀ``, the cost of the forward pass.
      HVP in the direction ``(V_A, V_b)``: ``ẋ = A⁻¹(V_b − V_A x)``, ``λ̇ = A⁻ᵀ(ẋ − V_Aᵀλ)`` (from
      ``d(A⁻ᵀ) = −A⁻ᵀ dAᵀ A⁻ᵀ``), and ``hvp = {"A": −λ̇xᵀ − λẋᵀ, "b": λ̇}``.

    Facts:
      ``min_value = 0``, attained on a whole manifold (every ``(A, b)`` with ``b = A x_target``);
      ``solution`` is one of them, ``(A₀, A₀ x_target)`` for a random well-conditioned ``A₀``.
      Non-convex in ``A``: ``L`` and ``μ`` are ``None``. ``random_point`` draws a non-symmetric ``A``
      with singular values in ``[1, 4]`` and a Gaussian ``b``. ``analytic=True``: the solve is a
      rational function of ``(A, b)``; pivoting changes the order of the elimination, not its value.

    Args:
      key: a ``jax.random.key``; the instance is a deterministic function of it and the options.
      dim: ``n``.
      dtype: a real float dtype; ``None`` is JAX's default float.

    References:
      Merkulov's lecture, "Gradient propagation through the linear least squares"; Giles 2008.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("linear_solve", jax.random.key(0), dim=3)
    >>> g = p.grad(p.init)
    >>> g["A"].shape, g["b"].shape
    ((3, 3), (3,))
    """
    n = check_positive_int("dim", dim)
    dt = resolve_dtype(dtype)
    (target, a0, b0), init = _linear_solve_instance(key, n, dt)

    def random_point(k):
        return _random_linear_system(k, n, dt)

    return Problem(
        name="linear_solve",
        loss=Partial(_linear_solve_loss, x_target=target),
        grad=Partial(_linear_solve_grad, x_target=target),
        hvp=Partial(_linear_solve_hvp, x_target=target),
        init=init,
        solution={"A": a0, "b": b0},
        min_value=0.0,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"x_target": target},
        options=_options(dt, dim=n),
        description="L(A, b) = ½‖A⁻¹b − x_target‖², params {A, b}",
        reference=f"{_SEED}, gradient propagation through the linear least squares; {_GILES}",
        analytic=True,
        smooth=True,
    )
