"""Hand-written reverse-mode rules (``jax.custom_vjp``) for the derivations in the lecture notes.

Each rule is a plain function whose value is what its name says and whose VJP is the formula derived
with differentials, not the one JAX would assemble from the primitives inside it (ḡ is the cotangent
of the output):

- :func:`solve`: ``x = A⁻¹b`` with one LU factorization; ``b̄ = A⁻ᵀḡ`` reusing the LU, ``Ā = −b̄xᵀ``.
- :func:`singular_values`: ``σ(W)``, thin and descending; ``W̄ = U diag(ḡ) Vᵀ``.
- :func:`sigmoid`: ``σ(x) = 1/(1 + e⁻ˣ)`` without overflow; ``x̄ = ḡ σ(1 − σ)`` from the saved output.
- :func:`straight_through`: ``fn(x)``, e.g. rounding; ``x̄ = ḡ`` (identity).
- :func:`clip_gradient`: the identity; ``x̄ = clip(ḡ, lo, hi)``.
- :func:`clip_gradient_norm`: the identity; ``x̄ = ḡ · min(1, c/‖ḡ‖)``.

Where plain AD is defined the first three agree with it (the tests check this with ``jax.grad`` and
``jax.test_util.check_grads`` in float64); the last three *define* a gradient that AD would not give.
All compose with ``jax.jit`` and ``jax.vmap``. Like every ``custom_vjp`` function they support reverse
mode (also reverse-over-reverse) but not forward mode: ``jax.jvp`` and ``jax.jacfwd`` raise.

The rules stand apart from the rest of gradlab: they import only the validation and pytree helpers.

References:
    M. B. Giles, "Collected matrix derivative results for forward and reverse mode algorithmic
    differentiation", 2008 (the linear solve). J. Townsend, "Differentiating the singular
    value decomposition", 2016; M. Seeger, A. Hetzel, Z. Dai, E. Meissner, N. D. Lawrence,
    "Auto-differentiating linear algebra", 2017 (the SVD). Y. Bengio, N. Léonard, A. Courville,
    "Estimating or propagating gradients through stochastic neurons for conditional computation",
    2013 (straight-through). R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training
    recurrent neural networks", ICML 2013 (clipping).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from gradlab._tree import tree_norm
from gradlab._validate import OptionError, ShapeError, check_positive

__all__ = [
    "clip_gradient",
    "clip_gradient_norm",
    "sigmoid",
    "singular_values",
    "solve",
    "straight_through",
]


# --------------------------------------------------------------------------------------------------
# helpers


def _as_real_float(argument: str, x: Any) -> jax.Array:
    """``x`` as an array of a real floating dtype (integers are promoted to the default float)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise OptionError(
            f"{argument}: expected a real array, got dtype {x.dtype}. gradlab's rules are written for "
            "real inputs; use the jax.numpy function directly for complex ones."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array if it is known at trace time, else ``None`` (a tracer under jit)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


# --------------------------------------------------------------------------------------------------
# solve


@jax.custom_vjp
def _solve(A, b):
    return jsl.lu_solve(jsl.lu_factor(A), b)


def _solve_fwd(A, b):
    lu_and_piv = jsl.lu_factor(A)
    x = jsl.lu_solve(lu_and_piv, b)
    return x, (lu_and_piv, x)


def _solve_bwd(residuals, g):
    lu_and_piv, x = residuals
    b_bar = jsl.lu_solve(lu_and_piv, g, trans=1)  # Aᵀ b̄ = ḡ with the forward pass's factors
    A_bar = -(jnp.outer(b_bar, x) if x.ndim == 1 else b_bar @ x.T)
    return A_bar, b_bar


_solve.defvjp(_solve_fwd, _solve_bwd)
_solve_jit = jax.jit(_solve)  # one compiled call when used eagerly; inlined under an outer jit


def solve(A, b, /):
    r"""Solve ``A x = b`` by LU, with a reverse pass that reuses the forward pass's LU factors.

    Math: differentiate ``A x = b``: ``dA x + A dx = db``, so ``dx = A⁻¹(db − dA x)``. For a loss with
    ``∂L/∂x = ḡ``,

        dL = ⟨ḡ, A⁻¹(db − dA x)⟩ = ⟨A⁻ᵀḡ, db⟩ − ⟨A⁻ᵀḡ xᵀ, dA⟩,

    hence ``b̄ = A⁻ᵀ ḡ`` and ``Ā = −b̄ xᵀ`` (Giles 2008). ``A = P L U`` is factored once in the
    forward pass; the backward pass is one transposed solve with the same factors (O(n²) per
    right-hand side, no second O(n³) factorization) and one outer product. With k right-hand sides,
    ``Ā = −B̄ Xᵀ``.

    Args:
        A: a square, invertible real matrix, shape ``(n, n)``. Batch with ``jax.vmap``.
        b: the right-hand side, shape ``(n,)`` or ``(n, k)``.

    Returns:
        ``x``, with the shape of ``b``.

    Raises:
        ShapeError: if ``A`` is not square or ``b`` does not have ``n`` rows.

    A singular ``A`` gives inf/NaN, as ``jnp.linalg.solve`` does. Reverse mode only (``custom_vjp``).

    >>> A = jnp.array([[4.0, 1.0], [2.0, 3.0]])
    >>> b = jnp.array([1.0, 2.0])
    >>> print(jnp.round(solve(A, b), 4))
    [0.1 0.6]
    >>> grad_A, grad_b = jax.grad(lambda A, b: solve(A, b).sum(), argnums=(0, 1))(A, b)
    >>> print(jnp.round(grad_b, 4))  # A⁻ᵀ 1
    [0.1 0.3]
    >>> print(jnp.round(grad_A, 4))  # −A⁻ᵀ1 xᵀ
    [[-0.01 -0.06]
     [-0.03 -0.18]]

    References: M. B. Giles, "Collected matrix derivative results for forward and reverse mode algorithmic
    differentiation", 2008.
    """
    A = _as_real_float("solve: A", A)
    b = _as_real_float("solve: b", b)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ShapeError(
            f"solve: A must be a square matrix of shape (n, n), got shape {A.shape}. "
            "For a batch of systems use jax.vmap(rules.solve); for least squares use jnp.linalg.lstsq."
        )
    n = A.shape[0]
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise ShapeError(
            f"solve: b must have shape ({n},) or ({n}, k) to match A of shape {A.shape}, got shape "
            f"{b.shape}. Pass one right-hand side as a vector or k of them as the columns of a matrix."
        )
    dtype = jnp.promote_types(A.dtype, b.dtype)
    return _solve_jit(A.astype(dtype), b.astype(dtype))


# --------------------------------------------------------------------------------------------------
# singular values


@jax.custom_vjp
def _singular_values(W):
    return jnp.linalg.svd(W, full_matrices=False, compute_uv=False)


def _singular_values_fwd(W):
    U, s, Vt = jnp.linalg.svd(W, full_matrices=False)
    return s, (U, Vt)


def _singular_values_bwd(residuals, g):
    U, Vt = residuals
    return ((U * g[..., None, :]) @ Vt,)


_singular_values.defvjp(_singular_values_fwd, _singular_values_bwd)
_singular_values_jit = jax.jit(_singular_values)


def singular_values(W, /):
    r"""Singular values of ``W`` (thin, descending), with the VJP ``W̄ = U diag(ḡ) Vᵀ``.

    Math: differentiate ``W = U Σ Vᵀ``: ``Uᵀ dW V = Uᵀ dU Σ + dΣ + Σ dVᵀ V``. Orthogonality makes
    ``Uᵀ dU`` and ``dVᵀ V`` antisymmetric, so their diagonals vanish and ``dΣ = diag(Uᵀ dW V)``. For a
    loss with ``∂L/∂σ = ḡ``,

        dL = ⟨diag(ḡ), Uᵀ dW V⟩ = ⟨U diag(ḡ) Vᵀ, dW⟩,   so   W̄ = U diag(ḡ) Vᵀ.

    Unlike a loss that touches ``U`` or ``V`` (see :mod:`gradlab.pitfalls`), no ``1/(σᵢ² − σⱼ²)``
    term appears, so the rule stays finite at repeated singular values. There it uses the singular
    vectors the SVD returned; for a symmetric function of σ (the nuclear norm ``Σσ``, the squared
    Frobenius norm ``Σσ²``, ...) ``ḡ`` is equal on tied values, the result does not depend on that
    choice, and it is the true gradient wherever the function is differentiable (Lewis 1995).

    Args:
        W: a real matrix of shape ``(..., m, n)``.

    Returns:
        ``σ`` of shape ``(..., min(m, n))``, descending.

    >>> W = jnp.array([[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    >>> print(jnp.round(singular_values(W), 4))
    [3. 2.]
    >>> print(jnp.round(jax.grad(lambda W: singular_values(W).sum())(W), 4))  # nuclear norm: U Vᵀ
    [[ 1.  0.]
     [ 0. -1.]
     [ 0.  0.]]

    References: J. Townsend, "Differentiating the singular value decomposition", 2016; M. Seeger et
    al., "Auto-differentiating linear algebra", 2017; A. S. Lewis, "The convex analysis of unitarily
    invariant matrix functions", J. Convex Analysis 2(1), 1995.
    """
    W = _as_real_float("singular_values: W", W)
    if W.ndim < 2:
        raise ShapeError(
            f"singular_values: W must be a matrix of shape (..., m, n), got shape {W.shape}. "
            "Reshape a vector to a column, W[:, None], if that is what you mean."
        )
    return _singular_values_jit(W)


# --------------------------------------------------------------------------------------------------
# sigmoid


def _stable_sigmoid(x):
    z = jnp.exp(-jnp.abs(x))  # in (0, 1]: never overflows
    return jnp.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@jax.custom_vjp
def _sigmoid(x):
    return _stable_sigmoid(x)


def _sigmoid_fwd(x):
    s = _stable_sigmoid(x)
    return s, s


def _sigmoid_bwd(s, g):
    return (g * s * (1.0 - s),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)
_sigmoid_jit = jax.jit(_sigmoid)


def sigmoid(x, /):
    r"""The logistic sigmoid ``σ(x) = 1/(1 + e⁻ˣ)``, elementwise, with a VJP from the saved output.

    Math: ``dσ = e⁻ˣ/(1 + e⁻ˣ)² dx = σ(1 − σ) dx``, so ``x̄ = ḡ σ(1 − σ)``: the backward pass needs only the
    forward output, not ``x`` and no second exponential (the "sigmoid gate" of the backprop notes). The
    forward pass uses ``z = e^{−|x|} ∈ (0, 1]``: ``σ = 1/(1+z)`` for ``x ≥ 0`` and ``z/(1+z)`` otherwise,
    so nothing overflows for any finite ``x``.

    Same caveat as ``jax.nn.sigmoid``: for ``x ≳ 37`` (float64) or ``≳ 17`` (float32) ``σ`` rounds to 1
    and the gradient to 0 rather than to the tiny ``e⁻ˣ``.

    Args:
        x: a real array of any shape.

    Returns:
        ``σ(x)``, with the shape of ``x``.

    >>> x = jnp.array([-800.0, 0.0, 2.0])
    >>> print(jnp.round(sigmoid(x), 4))
    [0.  0.5 0.8808]
    >>> print(jnp.round(jax.grad(lambda x: sigmoid(x).sum())(x), 4))
    [0.    0.25  0.105]

    References: the backprop lecture notes (the sigmoid node); any textbook on logistic regression.
    """
    return _sigmoid_jit(_as_real_float("sigmoid: x", x))


# --------------------------------------------------------------------------------------------------
# straight-through estimator


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _straight_through(fn, x):
    return jnp.asarray(fn(x)).astype(x.dtype)


def _straight_through_fwd(fn, x):
    return jnp.asarray(fn(x)).astype(x.dtype), None


def _straight_through_bwd(fn, _, g):
    return (g,)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def straight_through(x, /, *, fn: Callable[[jax.Array], jax.Array] = jnp.round):
    r"""Straight-through estimator: the value ``fn(x)``, the gradient of the identity.

    For a piecewise-constant ``fn`` (rounding, ``sign``, a threshold) the true derivative is 0 almost
    everywhere and undefined at the jumps, so plain AD gives no training signal. The straight-through
    estimator pretends ``fn`` was the identity in the backward pass: ``x̄ = ḡ``. It is a biased estimator of
    the gradient of the expected loss, useful for quantization and hard gates.

    Args:
        x: a real array of any shape.
        fn: keyword-only; a function of one array that keeps its shape, e.g. ``jnp.round``, ``jnp.sign`` or
            ``lambda x: x > 0``. Its output is cast to ``x``'s dtype. Pass a module-level function or the
            same object each time: a new ``lambda`` per call retraces under ``jit``.

    Returns:
        ``fn(x)`` with the shape and dtype of ``x``.

    Raises:
        OptionError: if ``fn`` is not callable. ShapeError: if ``fn`` changes the shape.

    >>> x = jnp.array([0.2, 0.7, 1.5])
    >>> print(straight_through(x))
    [0. 1. 2.]
    >>> print(jax.grad(lambda x: (3.0 * straight_through(x)).sum())(x))
    [3. 3. 3.]
    >>> print(jax.grad(lambda x: (3.0 * jnp.round(x)).sum())(x))  # plain AD: no signal
    [0. 0. 0.]

    References: Y. Bengio, N. Léonard, A. Courville, "Estimating or propagating gradients through
    stochastic neurons for conditional computation", arXiv:1308.3432, 2013.
    """
    if not callable(fn):
        raise OptionError(
            f"straight_through: fn must be a function of one array, got {fn!r}. "
            "Pass e.g. fn=jnp.round or fn=jnp.sign."
        )
    x = _as_real_float("straight_through: x", x)
    out = jax.eval_shape(fn, x)
    if getattr(out, "shape", None) != x.shape:
        raise ShapeError(
            f"straight_through: fn must keep the shape of x, {x.shape}; it returned "
            f"{getattr(out, 'shape', type(out).__name__)}. The identity backward pass needs matching shapes; "
            "apply reductions after straight_through."
        )
    return _straight_through(fn, x)


# --------------------------------------------------------------------------------------------------
# gradient clipping


@jax.custom_vjp
def _clip_gradient(x, lo, hi):
    return x


def _clip_gradient_fwd(x, lo, hi):
    return x, (lo, hi)


def _clip_gradient_bwd(residuals, g):
    lo, hi = residuals
    g = jax.tree.map(lambda t: jnp.clip(t, lo, hi).astype(t.dtype), g)
    return g, jnp.zeros_like(lo), jnp.zeros_like(hi)


_clip_gradient.defvjp(_clip_gradient_fwd, _clip_gradient_bwd)


def clip_gradient(x, lo, hi):
    r"""Identity in the forward pass; the cotangent clipped elementwise to ``[lo, hi]`` in the backward pass.

    ``y = x``, ``x̄ = clip(ḡ, lo, hi)``. Put it where the gradient should be bounded (e.g. on a hidden state)
    without changing the value. Value clipping changes the gradient's direction; to keep the direction use
    :func:`clip_gradient_norm`.

    Args:
        x: an array or a pytree of arrays; every leaf is clipped the same way.
        lo, hi: scalars (or arrays broadcastable to every leaf) with ``lo ≤ hi``; they may be traced
            values under ``jit`` and receive a zero gradient.

    Returns:
        ``x`` unchanged.

    Raises:
        OptionError: if ``lo > hi`` (checked when both are known at trace time).

    >>> x = jnp.array([1.0, 2.0, 3.0])
    >>> print(jax.grad(lambda x: (jnp.array([-5.0, 0.5, 5.0]) * clip_gradient(x, -1.0, 1.0)).sum())(x))
    [-1.   0.5  1. ]

    References: R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (they clip the norm; value clipping is the cruder variant).
    """
    lo_c, hi_c = _concrete(lo), _concrete(hi)
    if lo_c is not None and hi_c is not None and np.any(lo_c > hi_c):
        raise OptionError(
            f"clip_gradient: expected lo ≤ hi, got lo={lo!r}, hi={hi!r}. Swap them, e.g. "
            "clip_gradient(x, -1.0, 1.0)."
        )
    dtype = jnp.result_type(float)
    return _clip_gradient(x, jnp.asarray(lo, dtype), jnp.asarray(hi, dtype))


@jax.custom_vjp
def _clip_gradient_norm(x, max_norm):
    return x


def _clip_gradient_norm_fwd(x, max_norm):
    return x, max_norm


def _clip_gradient_norm_bwd(max_norm, g):
    scale = max_norm / jnp.maximum(tree_norm(g), max_norm)  # = min(1, c/‖ḡ‖), and 1 at ḡ = 0
    g = jax.tree.map(lambda t: (t * scale).astype(t.dtype), g)
    return g, jnp.zeros_like(max_norm)


_clip_gradient_norm.defvjp(_clip_gradient_norm_fwd, _clip_gradient_norm_bwd)


def clip_gradient_norm(x, max_norm):
    r"""Identity in the forward pass; the cotangent rescaled to norm at most ``max_norm`` in the backward pass.

    ``y = x``, ``x̄ = ḡ · min(1, c / ‖ḡ‖)`` with ``c = max_norm`` and ``‖ḡ‖`` the Euclidean norm over all
    leaves of the pytree together (global-norm clipping, Pascanu et al. 2013). The direction is kept; the
    scale is computed as ``c / max(‖ḡ‖, c)``, which is exactly 1 at ``ḡ = 0`` (no 0/0).

    Args:
        x: an array or a pytree of arrays.
        max_norm: ``c > 0``; may be a traced value under ``jit`` (receives a zero gradient).

    Returns:
        ``x`` unchanged.

    Raises:
        OptionError: if ``max_norm`` is not a positive number (checked when known at trace time).

    >>> x = jnp.array([1.0, 2.0])
    >>> print(jax.grad(lambda x: (jnp.array([30.0, 40.0]) * clip_gradient_norm(x, 5.0)).sum())(x))
    [3. 4.]

    References: R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013.
    """
    c = _concrete(max_norm)
    if c is not None:
        if c.shape != ():
            raise OptionError(
                f"clip_gradient_norm: max_norm must be a scalar, got shape {c.shape}. "
                "Clip leaves separately with jax.tree.map if you need one bound per leaf."
            )
        check_positive("clip_gradient_norm: max_norm", c.item())
    return _clip_gradient_norm(x, jnp.asarray(max_norm, jnp.result_type(float)))
