"""The classic matrix-calculus pitfalls, computed live with the numbers JAX gives.

Nothing is hard-coded: each pitfall is a function that runs the offending computation in float64,
next to a correct one, and returns a :class:`Pitfall` holding both, so what :func:`table` prints (for
the README and ``gradlab pitfalls``) is whatever the installed JAX says today. :func:`run` computes
them all, or the ones named.

>>> [p.name for p in run(["subgradients_at_zero"])]
['subgradients_at_zero']
>>> print(run(["subgradients_at_zero"])[0].jax_says)
abs: 1.0, maximum(x, 0): 0.5, relu: 0.0

The pitfalls, in order: :func:`svd_repeated`, :func:`svd_near_degenerate`, :func:`sqrt_at_zero`,
:func:`norm_at_zero`, :func:`logdet_overflow`, :func:`subgradients_at_zero`, :func:`mds_factor`,
:func:`stress_at_zero_distance`, :func:`inv_vs_solve`. Each switches float64 on for its own duration
(``jax.enable_x64``), so the results do not depend on the caller's setting. The larger computations run
under ``jax.jit``, as a user's training step would. Random data (the MDS points, the orthogonal factors
of the ill-conditioned matrix) come from the fixed key ``jax.random.key(0)`` so that the table is
reproducible; the phenomena do not depend on it.

Floor 1 (imports only gradlab's validation): this module computes and formats, nothing else.

References:
  D. Merkulov, "Matrix differentiation. Automatic differentiation. Checkpointing" (the SVD and MDS
  examples); the d2l / Berkeley STAT 157 slides (subderivatives).
  J. Townsend (2016), "Differentiating the singular value decomposition". P.-Å. Wedin (1972),
  "Perturbation bounds in connection with singular value decomposition", *BIT* 12.
  A. Griewank & A. Walther (2008), *Evaluating Derivatives*, 2nd ed., SIAM, ch. 14
  (differentiation without differentiability). J. Bolte & E. Pauwels (2020), "A mathematical model
  for automatic differentiation in machine learning", NeurIPS.
  JAX documentation, FAQ, "Gradients contain NaN where using ``where``". NumPy documentation,
  ``numpy.linalg.slogdet``. K. B. Petersen & M. S. Pedersen, *The Matrix Cookbook*.
  Y. Takane, F. W. Young & J. de Leeuw (1977), *Psychometrika* 42 (SSTRESS). J. B. Kruskal (1964),
  *Psychometrika* 29 (stress). I. Borg & P. J. F. Groenen (2005), *Modern Multidimensional
  Scaling*, 2nd ed., Springer.
  N. J. Higham (2002), *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM, ch. 9 and
  ch. 14 (LU solves vs the inverse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradlab._validate import check_choice

__all__ = [
    "Pitfall",
    "inv_vs_solve",
    "logdet_overflow",
    "mds_factor",
    "names",
    "norm_at_zero",
    "run",
    "sqrt_at_zero",
    "stress_at_zero_distance",
    "subgradients_at_zero",
    "svd_near_degenerate",
    "svd_repeated",
    "table",
]

_KEY_SEED = 0


@dataclass(frozen=True)
class Pitfall:
    """One pitfall, as computed.

    Attributes:
        name: a short identifier (the function's name).
        what: one line: the computation.
        jax_says: what JAX returns, formatted.
        truth: the correct value (or what a correct formulation returns), formatted.
        lesson: one line: the fix.
        values: the raw numbers behind ``jax_says`` and ``truth`` (floats, tuples, NumPy arrays,
            nested dicts), for tests and reports; not part of equality.
    """

    name: str
    what: str
    jax_says: str
    truth: str
    lesson: str
    values: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


# --------------------------------------------------------------------------------------------------
# helpers


def _fmt(v: float) -> str:
    """A number in at most 3 significant digits; nan/inf spelled as JAX prints them."""
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e3:
        return f"{v:.3g}"
    return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _count(mask) -> str:
    mask = np.asarray(mask)
    return f"{int(mask.sum())}/{mask.size}"


def _central_difference_gradient(f: Callable, x: jax.Array, h: float = 1e-5) -> jax.Array:
    """∂f/∂x by central differences, one coordinate at a time (float64; small inputs only)."""
    basis = h * jnp.eye(x.size, dtype=x.dtype).reshape((x.size, *x.shape))
    return jax.vmap(lambda e: (f(x + e) - f(x - e)) / (2 * h))(basis).reshape(x.shape)


def _safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """‖x‖ along ``axis`` with gradient 0 (not NaN) at x = 0: the double-``where`` trick.

    The inner ``where`` keeps ``sqrt`` away from 0 in *both* branches, so the branch that is not taken
    cannot produce ``inf · 0 = NaN`` in the backward pass; the outer ``where`` picks the value.
    """
    sq = jnp.sum(x * x, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _orthogonal(key: jax.Array, n: int) -> jax.Array:
    Q, R = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return Q * jnp.sign(jnp.diag(R))[None, :]


def _with_condition_number(key: jax.Array, n: int, cond: float) -> jax.Array:
    """A = U diag(s) Vᵀ with U, V random orthogonal and s log-spaced from 1 down to 1/cond."""
    ku, kv = jax.random.split(key)
    s = jnp.logspace(0.0, -jnp.log10(cond), n)
    return (_orthogonal(ku, n) * s[None, :]) @ _orthogonal(kv, n).T


# --------------------------------------------------------------------------------------------------
# 1. the SVD


def _svd_u_loss(W):
    """(Σᵢ U[i, 0])²: a function of the first left singular vector, blind to its sign."""
    return jnp.sum(jnp.linalg.svd(W)[0][:, 0]) ** 2


def _svd_sigma_loss(W):
    return jnp.sum(jnp.linalg.svd(W, compute_uv=False))


@jax.jit
def _svd_repeated_arrays(W):
    U, _, Vt = jnp.linalg.svd(W)
    grad_sigma = jax.grad(_svd_sigma_loss)(W)
    return {
        "grad_u": jax.grad(_svd_u_loss)(W),
        "fd_u": _central_difference_gradient(_svd_u_loss, W),
        "grad_sigma": grad_sigma,
        "sigma_error": jnp.max(jnp.abs(grad_sigma - U @ Vt)),
    }


def svd_repeated() -> Pitfall:
    """A loss of ``U`` from ``jnp.linalg.svd`` is NaN when two singular values tie, even where smooth.

    At ``W = diag(3, 2, 2)`` the loss ``(Σᵢ U[i, 0])²`` depends only on the first singular vector,
    which is well defined (σ₁ = 3 is simple) and smooth (the square removes the sign ambiguity). JAX's
    SVD rule still forms ``1/(σ₂² − σ₃²) = 1/0`` for the tied pair, and ``inf · 0`` spreads NaN to every
    entry. Central differences give the finite truth; a loss of the singular values alone has no
    ``1/(σᵢ² − σⱼ²)`` term and its gradient ``U Vᵀ`` is exact.

    >>> svd_repeated().values["nan_fraction"]
    1.0

    Reference: J. Townsend, "Differentiating the singular value decomposition", 2016 (the
    ``1/(σⱼ² − σᵢ²)`` terms of the rule for U and V); Merkulov's lecture, "Gradient propagation
    through the SVD" (the σ-only gradient ``U Vᵀ``).
    """
    with jax.enable_x64(True):
        v = jax.tree.map(np.asarray, _svd_repeated_arrays(jnp.diag(jnp.array([3.0, 2.0, 2.0]))))
        nan = np.isnan(v["grad_u"])
        v["nan_fraction"] = float(nan.mean())
        v["sigma_error"] = float(v["sigma_error"])
        return Pitfall(
            name="svd_repeated",
            what="grad of (Σᵢ U[i,0])² from jnp.linalg.svd at W = diag(3, 2, 2), where σ₂ = σ₃",
            jax_says=f"NaN in {_count(nan)} entries",
            truth=(
                f"finite: central differences give max |∂L/∂W| = {_fmt(np.abs(v['fd_u']).max())}; "
                f"a σ-only loss Σσ gets U Vᵀ (error {_fmt(v['sigma_error'])})"
            ),
            lesson="Differentiate functions of σ (or of subspaces), not single columns of U or V.",
            values=v,
        )


def svd_near_degenerate(gaps: Sequence[float] = (1e-2, 1e-4, 1e-6, 1e-8)) -> Pitfall:
    """Near a tie the singular-vector gradient is huge, ≈ 1/(2·gap), and that is the true derivative.

    For ``W = diag(a, 1)``, ``a = 1 + g``, the first left singular vector turns by
    ``dθ = (a dW₁₀ + dW₀₁)/(a² − 1)``, so ``∂U[1,0]/∂W[1,0] = a/(a² − 1) ≈ 1/(2g)``: JAX is right, the
    singular vectors are ill-conditioned.

    >>> [round(g) for g in svd_near_degenerate(gaps=(1e-2, 1e-4)).values["grad"]]
    [50, 5000]

    Reference: J. Townsend (2016), as for :func:`svd_repeated`; P.-Å. Wedin, "Perturbation bounds
    in connection with singular value decomposition", BIT 12, 1972 (singular vectors are
    ill-conditioned as the gap closes).
    """

    def u10(W):
        return jnp.linalg.svd(W)[0][1, 0]

    with jax.enable_x64(True):
        grad = jax.jit(
            jax.vmap(lambda a: jax.grad(u10)(jnp.diag(jnp.stack([a, jnp.ones_like(a)]))))
        )
        a = 1.0 + np.asarray(gaps, dtype=np.float64)
        said = tuple(float(x) for x in np.abs(np.asarray(grad(jnp.asarray(a)))[:, 1, 0]))
        exact = tuple(float(x) for x in a / (a * a - 1.0))
        worst = max(abs(s - e) / e for s, e in zip(said, exact, strict=True))
        return Pitfall(
            name="svd_near_degenerate",
            what="|∂U[1,0]/∂W[1,0]| at W = diag(1 + gap, 1), gap = " + ", ".join(map(_fmt, gaps)),
            jax_says=", ".join(map(_fmt, said)),
            truth=(
                f"a/(a²−1) with a = 1 + gap, ≈ 1/(2·gap): {', '.join(map(_fmt, exact))} "
                f"(rel. err {_fmt(worst)})"
            ),
            lesson="Near-tied σ make singular vectors ill-conditioned: use σ-only losses or widen the gap.",
            values={"gaps": tuple(gaps), "grad": said, "exact": exact, "rel_error": worst},
        )


# --------------------------------------------------------------------------------------------------
# 2. square roots and norms at zero


def sqrt_at_zero() -> Pitfall:
    """``grad(sqrt)(0) = inf``, and ``inf · 0`` turns ``sqrt(x²)`` at 0 into NaN.

    >>> sqrt_at_zero().values["grad_sqrt"]
    inf

    Reference: Griewank & Walther (2008), *Evaluating Derivatives*, ch. 14, "Differentiation without
    Differentiability" (AD where an elemental function such as √ is not differentiable).
    """
    with jax.enable_x64(True):
        zero = jnp.zeros((), jnp.float64)
        d_sqrt = float(jax.grad(jnp.sqrt)(zero))
        d_sqrt_sq = float(jax.grad(lambda x: jnp.sqrt(x * x))(zero))
        d_abs = float(jax.grad(jnp.abs)(zero))
        return Pitfall(
            name="sqrt_at_zero",
            what="jax.grad(jnp.sqrt)(0.) and jax.grad(lambda x: jnp.sqrt(x**2))(0.)",
            jax_says=f"{_fmt(d_sqrt)} and {_fmt(d_sqrt_sq)}",
            truth=(
                "1/(2√x) → ∞: no derivative at 0; √(x²) = |x| has subgradients [−1, 1] "
                f"(grad(jnp.abs)(0.) = {_fmt(d_abs)})"
            ),
            lesson="Keep sqrt away from 0 in losses: use jnp.abs, or sqrt of a clamped or double-where input.",
            values={"grad_sqrt": d_sqrt, "grad_sqrt_of_square": d_sqrt_sq, "grad_abs": d_abs},
        )


def norm_at_zero() -> Pitfall:
    """``grad(norm)(0)`` and even ``grad(norm(x)**2)(0)`` are NaN; ``sum(x**2)`` and a safe norm are not.

    >>> norm_at_zero().values["grad_norm"]
    array([nan, nan, nan])

    Reference: JAX documentation, FAQ, "Gradients contain NaN where using ``where``" (the
    double-``where`` trick); Griewank & Walther (2008), *Evaluating Derivatives*, ch. 14.
    """
    with jax.enable_x64(True):
        zeros = jnp.zeros(3, jnp.float64)
        g_norm = np.asarray(jax.grad(jnp.linalg.norm)(zeros))
        g_norm_sq = np.asarray(jax.grad(lambda x: jnp.linalg.norm(x) ** 2)(zeros))
        g_sum_sq = np.asarray(jax.grad(lambda x: jnp.sum(x**2))(zeros))
        g_safe = np.asarray(jax.grad(_safe_norm)(zeros))
        return Pitfall(
            name="norm_at_zero",
            what="jax.grad(jnp.linalg.norm)(zeros(3)) and jax.grad(lambda x: norm(x)**2)(zeros(3))",
            jax_says=f"NaN in {_count(np.isnan(g_norm))} and {_count(np.isnan(g_norm_sq))} entries",
            truth=(
                f"∇‖x‖² = 2x = 0 (jnp.sum(x**2): max |g| = {_fmt(np.abs(g_sum_sq).max())}); "
                f"0 is a subgradient of ‖x‖ (double-where norm: {_fmt(np.abs(g_safe).max())})"
            ),
            lesson="Write squared norms as jnp.sum(x**2); for ‖x‖ use a double-where safe norm.",
            values={
                "grad_norm": g_norm,
                "grad_norm_sq": g_norm_sq,
                "grad_sum_sq": g_sum_sq,
                "grad_safe": g_safe,
            },
        )


# --------------------------------------------------------------------------------------------------
# 3. log det


def _logdet_naive(X):
    return jnp.log(jnp.linalg.det(X))


def _logdet_stable(X):
    return jnp.linalg.slogdet(X)[1]


@jax.jit
def _logdet_arrays(X):
    return {
        "naive": _logdet_naive(X),
        "grad_naive": jax.grad(_logdet_naive)(X),
        "slogdet": _logdet_stable(X),
        "grad_slogdet": jax.grad(_logdet_stable)(X),
    }


def logdet_overflow(n: int = 200) -> Pitfall:
    """``log(det(X))`` under- and overflows long before ``log det X`` does; ``slogdet`` is exact.

    ``det(10⁻³ I₂₀₀) = 10⁻⁶⁰⁰`` is 0 in float64 and ``det(100 I₂₀₀) = 10⁴⁰⁰`` is inf. The log is then
    ±inf, and the gradient is NaN in the first case and, worse, silently 0 in the second, while the
    true gradient is ``X⁻ᵀ``. ``slogdet`` sums ``log |u_ii|`` over the LU factors, never the product.

    >>> logdet_overflow(n=200).values["small"]["logdet_naive"]
    -inf

    Reference: NumPy documentation, ``numpy.linalg.slogdet`` (``det`` can over- or underflow,
    ``slogdet`` does not); Petersen & Pedersen, *The Matrix Cookbook* (``∂ log|det X|/∂X = X⁻ᵀ``).
    """
    with jax.enable_x64(True):
        out: dict[str, Any] = {}
        for label, scale in (("small", 1e-3), ("large", 100.0)):
            a = jax.tree.map(np.asarray, _logdet_arrays(scale * jnp.eye(n, dtype=jnp.float64)))
            nan = np.isnan(a["grad_naive"])
            out[label] = {
                "scale": scale,
                "logdet_naive": float(a["naive"]),
                "grad_naive_nan": _count(nan),
                "grad_naive_nan_fraction": float(nan.mean()),
                "grad_naive_max_abs": math.nan
                if nan.all()
                else float(np.nanmax(np.abs(a["grad_naive"]))),
                "logdet_slogdet": float(a["slogdet"]),
                "logdet_exact": n * math.log(scale),
                "grad_slogdet_error": float(np.max(np.abs(a["grad_slogdet"] - np.eye(n) / scale))),
            }

        def says(d):
            if d["grad_naive_nan_fraction"] > 0:
                return f"{_fmt(d['logdet_naive'])}, grad NaN in {d['grad_naive_nan']} entries"
            return f"{_fmt(d['logdet_naive'])}, grad silently {_fmt(d['grad_naive_max_abs'])}"

        small, large = out["small"], out["large"]
        error = max(small["grad_slogdet_error"], large["grad_slogdet_error"])
        return Pitfall(
            name="logdet_overflow",
            what=f"log(det(X)) and its grad at X = 1e-3·I and X = 100·I, n = {n}",
            jax_says=f"{says(small)}; {says(large)}",
            truth=(
                f"slogdet: {small['logdet_slogdet']:.2f} and {large['logdet_slogdet']:.2f}, "
                f"grad X⁻ᵀ = 1000·I and 0.01·I (max err {_fmt(error)})"
            ),
            lesson="Use jnp.linalg.slogdet (or 2·Σ log diag(cholesky(X)) for SPD X), not log(det(X)).",
            values=out,
        )


# --------------------------------------------------------------------------------------------------
# 4. subgradients


def subgradients_at_zero() -> Pitfall:
    """At the kink JAX returns *a* subgradient, and which one depends on how the function is written.

    >>> subgradients_at_zero().values
    {'abs': 1.0, 'maximum': 0.5, 'relu': 0.0}

    Reference: the d2l / Berkeley STAT 157 slides, "Subderivative" (``∂|x|``, ``∂max(x, 0)`` at 0);
    J. Bolte & E. Pauwels, "A mathematical model for automatic differentiation in machine
    learning", NeurIPS 2020 (what AD returns at a kink depends on how the function is written).
    """
    with jax.enable_x64(True):
        zero = jnp.zeros((), jnp.float64)
        vals = {
            "abs": float(jax.grad(jnp.abs)(zero)),
            "maximum": float(jax.grad(lambda x: jnp.maximum(x, 0.0))(zero)),
            "relu": float(jax.grad(jax.nn.relu)(zero)),
        }
        return Pitfall(
            name="subgradients_at_zero",
            what="jax.grad at 0 of jnp.abs, lambda x: jnp.maximum(x, 0.), jax.nn.relu",
            jax_says=f"abs: {vals['abs']}, maximum(x, 0): {vals['maximum']}, relu: {vals['relu']}",
            truth="∂|x|(0) = [−1, 1], ∂max(x, 0)(0) = [0, 1]: all three are valid subgradients, all different",
            lesson="Don't rely on the value at a kink: write the one you mean with jnp.where and test at 0.",
            values=vals,
        )


# --------------------------------------------------------------------------------------------------
# 5. multidimensional scaling


def _mds_data(n: int = 6, d: int = 2):
    """Points W (n, d) and a symmetric target D (n, n) of squared distances with a zero diagonal."""
    kw, kt = jax.random.split(jax.random.key(_KEY_SEED))
    W = jax.random.normal(kw, (n, d))
    T = jax.random.normal(kt, (n, d))
    return W, jnp.sum((T[:, None, :] - T[None, :, :]) ** 2, axis=-1)


def _mds_loss(W, D):
    """L(W) = Σ_ij (‖W_i − W_j‖² − D_ij)²."""
    sq = jnp.sum((W[:, None, :] - W[None, :, :]) ** 2, axis=-1)
    return jnp.sum((sq - D) ** 2)


def _mds_hand_gradient(W, D, factor):
    """``factor`` · Σ_j r_ij (W_i − W_j), r_ij = ‖W_i − W_j‖² − D_ij; the right factor is 8."""
    r = jnp.sum((W[:, None, :] - W[None, :, :]) ** 2, axis=-1) - D
    return factor * (jnp.sum(r, axis=1)[:, None] * W - r @ W)


@jax.jit
def _mds_arrays(W, D):
    auto = jax.grad(_mds_loss)(W, D)
    wrong = _mds_hand_gradient(W, D, 4.0)
    right = _mds_hand_gradient(W, D, 8.0)
    scale = jnp.max(jnp.abs(auto))
    return {
        "ratio": jnp.vdot(wrong, auto) / jnp.vdot(auto, auto),
        "spread": jnp.max(jnp.abs(wrong - 0.5 * auto)) / scale,
        "right_error": jnp.max(jnp.abs(right - auto)) / scale,
    }


def mds_factor() -> Pitfall:
    """The MDS gradient with factor 4 (instead of 8) is exactly half of ``jax.grad``.

    ``dL = Σ_ij 2 r_ij · 2⟨W_i − W_j, dW_i − dW_j⟩``; ``W_i`` appears in both the (i, j) and the
    (j, i) term, so for symmetric ``D`` the gradient is ``∇_{W_i} L = 8 Σ_j r_ij (W_i − W_j)``.
    Counting only the (i, j) term gives the factor 4.

    >>> mds_factor().values["ratio"]
    0.5

    Reference: Merkulov's lecture, "Example: multidimensional scaling" (the loss); Y. Takane,
    F. W. Young & J. de Leeuw, Psychometrika 42, 1977 (squared-distance stress, SSTRESS).
    """
    with jax.enable_x64(True):
        v = {k: float(x) for k, x in _mds_arrays(*_mds_data()).items()}
        return Pitfall(
            name="mds_factor",
            what="hand gradient of Σ_ij (‖W_i − W_j‖² − D_ij)² with factor 4 vs jax.grad (N = 6, d = 2)",
            jax_says=f"hand / jax.grad = {v['ratio']:.15f} (max deviation from 0.5: {_fmt(v['spread'])})",
            truth=(
                "∇_{W_i} = 8 Σ_j (‖W_i − W_j‖² − D_ij)(W_i − W_j): "
                f"matches jax.grad to {_fmt(v['right_error'])}"
            ),
            lesson="W_i sits in the (i, j) and the (j, i) terms: count both; check hand gradients.",
            values=v,
        )


def _stress(W, D, norm: Callable):
    """S(W) = Σ_ij (‖W_i − W_j‖ − D_ij)² with the given row norm."""
    return jnp.sum((norm(W[:, None, :] - W[None, :, :]) - D) ** 2)


def _plain_norm(x):
    return jnp.linalg.norm(x, axis=-1)


@jax.jit
def _stress_arrays(W, D):
    grad_plain = jax.grad(_stress)(W, D, _plain_norm)
    grad_safe = jax.grad(_stress)(W, D, _safe_norm)
    # by hand, for symmetric D: ∇_{W_i} S = 4 Σ_{j≠i} (d_ij − D_ij)(W_i − W_j)/d_ij
    diff = W[:, None, :] - W[None, :, :]
    off = ~jnp.eye(W.shape[0], dtype=bool)
    dist = jnp.where(off, _safe_norm(diff), 1.0)
    coeff = jnp.where(off, (dist - D) / dist, 0.0)
    by_hand = 4.0 * jnp.sum(coeff[:, :, None] * diff, axis=1)
    return {
        "grad_plain": grad_plain,
        "safe_error": jnp.max(jnp.abs(grad_safe - by_hand)) / jnp.max(jnp.abs(by_hand)),
    }


def stress_at_zero_distance() -> Pitfall:
    """A distance (not squared) MDS stress has NaN gradients: ‖W_i − W_i‖ = 0 on the diagonal.

    The diagonal terms ``(‖W_i − W_i‖ − 0)²`` are constant 0, but their backward pass multiplies the
    cotangent 0 by the NaN gradient of the norm at 0 (see :func:`norm_at_zero`).

    >>> stress_at_zero_distance().values["nan_fraction"]
    1.0

    Reference: J. B. Kruskal, Psychometrika 29, 1964 (stress of distances); I. Borg & P. J. F.
    Groenen, *Modern Multidimensional Scaling*, 2nd ed., Springer 2005; JAX documentation, FAQ,
    "Gradients contain NaN where using ``where``".
    """
    with jax.enable_x64(True):
        W, D2 = _mds_data()
        v = jax.tree.map(np.asarray, _stress_arrays(W, jnp.sqrt(D2)))
        nan = np.isnan(v["grad_plain"])
        v["nan_fraction"] = float(nan.mean())
        v["safe_error"] = float(v["safe_error"])
        return Pitfall(
            name="stress_at_zero_distance",
            what="jax.grad of Σ_ij (‖W_i − W_j‖ − D_ij)² (distances, not squared; N = 6, d = 2)",
            jax_says=f"NaN in {_count(nan)} entries (from the i = j terms)",
            truth=(
                "finite: 4 Σ_{j≠i} (d_ij − D_ij)(W_i − W_j)/d_ij; "
                f"a double-where norm matches it to {_fmt(v['safe_error'])}"
            ),
            lesson="Mask zero distances inside the norm (double where), not after: 0·NaN is NaN.",
            values=v,
        )


# --------------------------------------------------------------------------------------------------
# 6. inv vs solve


def _backward_error(A, x, b):
    """Normwise backward error ‖Ax − b‖ / (‖A‖₂ ‖x‖)."""
    return jnp.linalg.norm(A @ x - b) / (jnp.linalg.norm(A, 2) * jnp.linalg.norm(x))


@jax.jit
def _inv_vs_solve_arrays(A, b):
    return {
        "backward_error_inv": _backward_error(A, jnp.linalg.inv(A) @ b, b),
        "backward_error_solve": _backward_error(A, jnp.linalg.solve(A, b), b),
    }


def inv_vs_solve(cond: float = 1e12, n: int = 50) -> Pitfall:
    """``inv(A) @ b`` is not backward stable; ``solve`` (LU with partial pivoting) is.

    ``A = U diag(s) Vᵀ`` with random orthogonal ``U, V`` and ``s`` log-spaced in ``[1/cond, 1]``;
    ``b = A·1``. The backward error of ``inv(A) @ b`` grows like ``cond · ε`` (times a factor that
    depends on ``b``), the one of ``solve`` stays near ``ε``.

    >>> v = inv_vs_solve().values
    >>> bool(v["backward_error_inv"] > 1e6 * v["backward_error_solve"])
    True

    Reference: N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM 2002,
    ch. 9 (LU with partial pivoting) and ch. 14 (matrix inversion: why not to solve with inv).
    """
    with jax.enable_x64(True):
        A = jax.jit(_with_condition_number, static_argnums=1)(jax.random.key(_KEY_SEED), n, cond)
        out = _inv_vs_solve_arrays(A, A @ jnp.ones(n))
        v = {k: float(x) for k, x in out.items()} | {"cond": cond, "n": n}
        return Pitfall(
            name="inv_vs_solve",
            what=(
                f"backward error ‖Ax − b‖/(‖A‖‖x‖) of x = inv(A) @ b vs jnp.linalg.solve(A, b), "
                f"cond(A) = {_fmt(cond)}, n = {n}"
            ),
            jax_says=f"inv: {_fmt(v['backward_error_inv'])}",
            truth=f"solve: {_fmt(v['backward_error_solve'])} (backward stable: ≈ ε = 1.1e-16)",
            lesson="Never form inv(A) to solve: use jnp.linalg.solve, cho_solve or gradlab.rules.solve.",
            values=v,
        )


# --------------------------------------------------------------------------------------------------
# registry, run, table

_PITFALLS: dict[str, Callable[[], Pitfall]] = {
    f.__name__: f
    for f in (
        svd_repeated,
        svd_near_degenerate,
        sqrt_at_zero,
        norm_at_zero,
        logdet_overflow,
        subgradients_at_zero,
        mds_factor,
        stress_at_zero_distance,
        inv_vs_solve,
    )
}


def names() -> list[str]:
    """The pitfalls' names, in the order :func:`run` computes them.

    >>> names()[:3]
    ['svd_repeated', 'svd_near_degenerate', 'sqrt_at_zero']

    Reference: the sources of each pitfall, in its docstring and the module's References.
    """
    return list(_PITFALLS)


def run(which: str | Iterable[str] | None = None) -> list[Pitfall]:
    """Compute the pitfalls named in ``which`` (one name, several, or all by default), in order.

    Raises:
        UnknownNameError: for a name that is not in :func:`names`.

    >>> [p.name for p in run("mds_factor")]
    ['mds_factor']

    Reference: the sources of each pitfall, in its docstring and the module's References.
    """
    if isinstance(which, str):  # one name, not an iterable of characters
        which = [which]
    selected = (
        names()
        if which is None
        else [check_choice("pitfalls.run: which", w, _PITFALLS) for w in which]
    )
    return [_PITFALLS[name]() for name in selected]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(pitfalls: Sequence[Pitfall] | None = None) -> str:
    """A Markdown table of the pitfalls (computed now if not given): what, JAX says, truth, lesson.

    >>> print(table(run(["subgradients_at_zero"])).splitlines()[0])
    | # | pitfall | what | JAX says | truth | lesson |

    Reference: GitHub Flavored Markdown Spec, "Tables (extension)" (the table format); the
    pitfalls' sources in the module's References.
    """
    if pitfalls is None:
        pitfalls = run()
    rows = [
        "| # | pitfall | what | JAX says | truth | lesson |",
        "|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(pitfalls, start=1):
        cells = [str(i), f"`{p.name}`", p.what, p.jax_says, p.truth, p.lesson]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)
