"""Learning losses of the catalog: softmax cross-entropy, logistic regression, multiclass SVM, two MLPs.

Every gradient here is written by hand: by differentials for the three linear models (write
``dL = ⟨G, dW⟩`` and read off ``G``), and by the four backpropagation equations for the two MLPs. The tests
hold each one against ``jax.grad`` and each HVP against the dense ``jax.hessian``.

Conventions shared by the five problems: data rows are samples (``X`` is ``n × d``), losses are means
over the samples, and the random instance is drawn from a random "teacher" model so that the labels
carry signal.

The losses are jitted module-level functions of ``(params, *data)``; a problem binds its data with
:class:`jax.tree_util.Partial`, so ``loss``, ``grad`` and ``hvp`` are pytrees whose leaves are the data.
Called directly they compile once per shape and dtype, shared by every instance; passed as an
*argument* to a jitted function they do not retrace for a new instance
(``jax.jit(lambda f, x: f(x))(p.loss, x)``). The random instances are drawn by jitted generators
from one normal draw each, again one compilation per shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from gradlab._validate import OptionError, check_positive, check_positive_int
from gradlab.problems import Problem, register
from gradlab.problems._common import resolve_dtype

__all__: list[str] = []  # the problems are reached through the registry (problems.make)


# --------------------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------------------


def _check_nonnegative(argument: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number ≥ 0; otherwise raise :class:`OptionError`."""
    if isinstance(value, bool | np.bool_):
        raise OptionError(f"{argument}: expected a finite number ≥ 0, got {value!r}.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{argument}: expected a finite number ≥ 0, got {value!r}.") from None
    if not (0.0 <= x < math.inf):
        raise OptionError(f"{argument}: expected a finite number ≥ 0, got {value!r}.")
    return x


def _check_bool(argument: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise OptionError(f"{argument}: expected True or False, got {value!r}.")
    return bool(value)


def _sigma_max_sq(a: Any) -> float:
    """``‖A‖₂²``, the squared largest singular value, computed in float64 NumPy."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64), 2) ** 2)


def _with_ones(X: jax.Array) -> jax.Array:
    """``[X, 1]``: append a column of ones (an intercept)."""
    return jnp.concatenate([X, jnp.ones((X.shape[0], 1), X.dtype)], axis=1)


def _log_softmax(z: jax.Array) -> jax.Array:
    """Row-wise log-softmax with the max shift (the shift is a constant for the derivative)."""
    m = jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True))
    zs = z - m
    return zs - jnp.log(jnp.sum(jnp.exp(zs), axis=1, keepdims=True))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _newton(
    loss: Callable[..., jax.Array],
    grad: Callable[..., jax.Array],
    hess: Callable[..., jax.Array],
    x0: jax.Array,
    args: tuple,
) -> jax.Array:
    """Minimise a smooth strongly convex ``loss(x, *args)`` of a flat ``x`` by Newton's method.

    Damped steps with Armijo backtracking (the step sizes ``1, ½, ¼, …`` are tried at once) until the
    squared Newton decrement ``gᵀH⁻¹g`` is below ``√ε``, well inside the region of quadratic
    convergence; then three full steps take the gradient to rounding level. At most 100 iterations.
    Used only at construction, to give the strongly convex problems their ``solution``.
    """
    tol = math.sqrt(float(jnp.finfo(x0.dtype).eps))
    ts = 0.5 ** jnp.arange(30, dtype=x0.dtype)

    def step(state):
        i, x, polished = state
        g = grad(x, *args)
        d = jnp.linalg.solve(hess(x, *args), g)
        decrement = jnp.vdot(g, d)
        f0 = loss(x, *args)
        fs = jax.vmap(lambda t: loss(x - t * d, *args))(ts)
        ok = fs <= f0 - 0.25 * ts * decrement
        near = decrement <= tol
        t = jnp.where(near, 1.0, jnp.where(jnp.any(ok), ts[jnp.argmax(ok)], 0.0))
        return i + 1, x - t * d, polished + near.astype(jnp.int32)

    def cond(state):
        i, _, polished = state
        return (i < 100) & (polished < 3)

    return jax.lax.while_loop(cond, step, (jnp.int32(0), x0, jnp.int32(0)))[1]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_parts(key: Any, shapes: tuple, dt: Any) -> tuple:
    """Standard normal arrays of the given shapes, cut from one draw.

    One draw, not one per array: XLA compiles one ``jax.random.normal`` several times faster than a
    ``split`` followed by several draws, and instances are built often in tests and sweeps.
    """
    sizes = [math.prod(shape) for shape in shapes]
    z = jax.random.normal(key, (sum(sizes),), dt)
    parts, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        parts.append(z[start : start + size].reshape(shape))
        start += size
    return tuple(parts)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _classification_data(key: Any, n: int, d: int, c: int, dt: Any):
    """``X ~ N(0, 1)`` (``n × d``); labels ``argmax(XW* + E)``, ``W* ~ N(0, 4/d)``, ``E ~ N(0, 1)``."""
    X, W_teacher, E = _normal_parts(key, ((n, d), (d, c), (n, c)), dt)
    labels = jnp.argmax(X @ ((2.0 / math.sqrt(d)) * W_teacher) + E, axis=1)
    return X, labels, jax.nn.one_hot(labels, c, dtype=dt)


# --------------------------------------------------------------------------------------------------
# softmax cross-entropy
# --------------------------------------------------------------------------------------------------


def _sce_probs_log(p, X):
    return _log_softmax(X @ p["W"] + p["b"][None, :])


@jax.jit
def _sce_loss(p, X, Y, l2):
    ce = -jnp.sum(Y * _sce_probs_log(p, X)) / X.shape[0]
    return ce + 0.5 * l2 * (jnp.sum(p["W"] * p["W"]) + jnp.sum(p["b"] * p["b"]))


@jax.jit
def _sce_grad(p, X, Y, l2):
    G = (jnp.exp(_sce_probs_log(p, X)) - Y) / X.shape[0]
    return {"W": X.T @ G + l2 * p["W"], "b": jnp.sum(G, axis=0) + l2 * p["b"]}


@jax.jit
def _sce_hvp(p, v, X, Y, l2):
    del Y
    P = jnp.exp(_sce_probs_log(p, X))
    dZ = X @ v["W"] + v["b"][None, :]
    dP = P * dZ - P * jnp.sum(P * dZ, axis=1, keepdims=True)
    n = X.shape[0]
    return {"W": X.T @ dP / n + l2 * v["W"], "b": jnp.sum(dP, axis=0) / n + l2 * v["b"]}


# Newton works on the stacked parameters W̃ = [W; bᵀ] ((d+1) × c), flattened row-major.
def _sce_split(theta, d, c):
    wt = theta.reshape(d + 1, c)
    return {"W": wt[:d], "b": wt[d]}


def _sce_flat_loss(theta, X, Y, l2):
    return _sce_loss(_sce_split(theta, X.shape[1], Y.shape[1]), X, Y, l2)


def _sce_flat_grad(theta, X, Y, l2):
    g = _sce_grad(_sce_split(theta, X.shape[1], Y.shape[1]), X, Y, l2)
    return jnp.concatenate([g["W"], g["b"][None, :]], axis=0).reshape(-1)


def _sce_flat_hess(theta, X, Y, l2):
    (n, d), c = X.shape, Y.shape[1]
    X1 = _with_ones(X)
    P = jnp.exp(_log_softmax(X1 @ theta.reshape(d + 1, c)))
    J = jnp.eye(c, dtype=X.dtype)[None] * P[:, :, None] - P[:, :, None] * P[:, None, :]
    H = jnp.einsum("ik,il,ijm->kjlm", X1, X1, J).reshape((d + 1) * c, (d + 1) * c)
    return H / n + l2 * jnp.eye((d + 1) * c, dtype=X.dtype)


@register("softmax_cross_entropy")
def softmax_cross_entropy(
    key: Any,
    /,
    *,
    dim: int = 10,
    num_classes: int = 3,
    num_samples: int = 50,
    l2: float = 0.0,
    dtype: Any = None,
) -> Problem:
    """Multinomial logistic regression: mean cross-entropy of softmax(XW + b) against one-hot labels.

    The loss, over parameters ``{"W": d × c, "b": c}`` and data ``X`` (``n × d``), one-hot ``Y``
    (``n × c``), with ``z_i = Wᵀx_i + b`` and ``p_i = softmax(z_i)``::

        L(W, b) = (1/n) Σ_i −⟨y_i, log p_i⟩ + (l2/2)(‖W‖_F² + ‖b‖²)

    The log-softmax is computed with the max shift ``z − max z`` so large logits do not overflow.

    Gradient by differentials. Because ``Σ_k y_ik = 1``, one sample's loss is
    ``ℓ_i = lse(z_i) − ⟨y_i, z_i⟩`` with ``lse(z) = log Σ_k e^{z_k}``, and ``d lse(z) = ⟨p, dz⟩``. So
    ``dℓ_i = ⟨p_i − y_i, dz_i⟩`` — the "ŷ − y" of softmax with cross-entropy — and
    ``dz_i = dWᵀx_i + db``. With ``G = (P − Y)/n`` (``n × c``, rows ``(p_i − y_i)/n``)::

        dL = Σ_i ⟨G_i, dWᵀx_i + db⟩ + l2(⟨W, dW⟩ + ⟨b, db⟩)
           = ⟨XᵀG + l2 W, dW⟩ + ⟨Gᵀ1 + l2 b, db⟩,

    so ``∇_W L = Xᵀ(P − Y)/n + l2 W`` and ``∇_b L = mean_i (p_i − y_i) + l2 b``.

    Hessian-vector product: differentiate ``p`` once more, ``dp = (diag(p) − ppᵀ) dz`` (the softmax
    Jacobian). For a direction ``(V_W, v_b)`` put ``dZ = XV_W + 1v_bᵀ`` and
    ``dP_i = p_i ⊙ dz_i − p_i⟨p_i, dz_i⟩``; then ``H(V) = (XᵀdP/n + l2 V_W, dPᵀ1/n + l2 v_b)``.

    Constants: ``diag(p) − ppᵀ ≼ ½ I`` (a variance bound, Böhning 1992), so with ``X̃ = [X, 1]``,
    ``L = ‖X̃‖₂²/(2n) + l2``. The loss is convex in ``(W, b)``; it is ``l2``-strongly convex when
    ``l2 > 0`` (the bias is regularised too, otherwise shifting every logit by the same constant would
    be a flat direction). For ``l2 > 0`` the unique minimiser is computed at construction by Newton's
    method (to machine precision; there is no closed form); for ``l2 = 0`` it may not exist
    (separable data), and ``solution`` is ``None``.

    Instance: ``X_ij ~ N(0, 1)``; labels ``argmax_k (x_iᵀW* + ε_i)_k`` from a random teacher
    ``W* ~ N(0, 4/d)`` with Gaussian noise ``ε_i ~ N(0, I)``. ``data`` holds ``X``, ``Y`` and the
    integer ``labels``.

    Options:
      dim: number of features ``d``.
      num_classes: number of classes ``c`` (≥ 2).
      num_samples: number of samples ``n``.
      l2: ridge weight on ``W`` and ``b`` (≥ 0).
      dtype: floating dtype (``None``: JAX's default float).

    Reference: Bishop (2006), *Pattern Recognition and Machine Learning*, §4.3.4; the gradient
    ``ŷ − y`` and the softmax Jacobian ``diag(p) − ppᵀ`` as in the backpropagation treatise of the
    seed notes; Böhning (1992), "Multinomial logistic regression algorithm", for the curvature bound.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("softmax_cross_entropy", jax.random.key(0), dim=4, num_classes=3)
    >>> g = p.grad(p.init)
    >>> g["W"].shape, g["b"].shape
    ((4, 3), (3,))
    >>> round(float(p.loss(p.init)), 6)  # zero logits: log 3
    1.098612
    """
    d = check_positive_int("dim", dim)
    c = check_positive_int("num_classes", num_classes, minimum=2)
    n = check_positive_int("num_samples", num_samples)
    l2 = _check_nonnegative("l2", l2)
    dt = resolve_dtype(dtype)

    X, labels, Y = _classification_data(key, n, d, c, dt)
    data = {"X": X, "Y": Y, "l2": l2}

    def random_point(k):
        W, b = _normal_parts(k, ((d, c), (c,)), dt)
        return {"W": W, "b": b}

    solution = min_value = None
    if l2 > 0:
        theta = _newton(
            _sce_flat_loss, _sce_flat_grad, _sce_flat_hess, jnp.zeros((d + 1) * c, dt), (X, Y, l2)
        )
        solution = _sce_split(theta, d, c)
        min_value = float(_sce_loss(solution, **data))

    X1 = np.hstack([np.asarray(X, np.float64), np.ones((n, 1))])
    return Problem(
        name="softmax_cross_entropy",
        loss=Partial(_sce_loss, **data),
        grad=Partial(_sce_grad, **data),
        hvp=Partial(_sce_hvp, **data),
        init={"W": jnp.zeros((d, c), dt), "b": jnp.zeros((c,), dt)},
        solution=solution,
        min_value=min_value,
        smoothness=_sigma_max_sq(X1) / (2 * n) + l2,
        strong_convexity=l2 if l2 > 0 else None,
        random_point=random_point,
        data={"X": X, "Y": Y, "labels": labels},
        options={"dim": d, "num_classes": c, "num_samples": n, "l2": l2, "dtype": dt.name},
        description="L(W, b) = mean_i −⟨y_i, log softmax(Wᵀx_i + b)⟩ + (l2/2)(‖W‖² + ‖b‖²)",
        reference="Bishop (2006) PRML §4.3.4; the backpropagation lecture notes (softmax + CE gives ŷ − y)",
        analytic=False,  # the max shift of the log-softmax is not complex-safe
        smooth=True,
    )


# --------------------------------------------------------------------------------------------------
# logistic regression
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _logistic_data(key: Any, n: int, d: int, intercept: bool, dt: Any):
    """``X ~ N(0, 1)``; ``y = 1[Xw* + b* + ε > 0]``, ``w* ~ N(0, 4/d)``, ``b* ~ N(0, ¼)``, ``ε ~ N(0, 1)``."""
    X, w_teacher, b_teacher, eps = _normal_parts(key, ((n, d), (d,), (), (n,)), dt)
    logit = X @ ((2.0 / math.sqrt(d)) * w_teacher) + eps
    if intercept:
        logit = logit + 0.5 * b_teacher
        X = _with_ones(X)
    return X, (logit > 0).astype(dt)


@jax.jit
def _lr_loss(w, X, y, l2):
    z = X @ w
    return jnp.mean(jnp.logaddexp(z, 0.0) - y * z) + 0.5 * l2 * jnp.sum(w * w)


@jax.jit
def _lr_grad(w, X, y, l2):
    return X.T @ (jax.nn.sigmoid(X @ w) - y) / X.shape[0] + l2 * w


@jax.jit
def _lr_hvp(w, v, X, y, l2):
    del y
    s = jax.nn.sigmoid(X @ w)
    return X.T @ (s * (1 - s) * (X @ v)) / X.shape[0] + l2 * v


def _lr_hess(w, X, y, l2):
    del y
    s = jax.nn.sigmoid(X @ w)
    return (X.T * (s * (1 - s))[None, :]) @ X / X.shape[0] + l2 * jnp.eye(X.shape[1], dtype=X.dtype)


@register("logistic_regression")
def logistic_regression(
    key: Any,
    /,
    *,
    dim: int = 10,
    num_samples: int = 50,
    l2: float = 0.1,
    intercept: bool = True,
    dtype: Any = None,
) -> Problem:
    """Binary logistic regression: mean logistic loss plus an L2 penalty, strongly convex for l2 > 0.

    With labels ``y_i ∈ {0, 1}``, ``z = Xw`` and ``σ(t) = 1/(1 + e^{−t})``::

        L(w) = (1/n) Σ_i [log(1 + e^{z_i}) − y_i z_i] + (l2/2)‖w‖²

    which equals ``(1/n) Σ_i log(1 + e^{−t_i z_i})`` with the ±1 labels ``t = 2y − 1`` (both are
    stored in ``data``). ``log(1 + e^z)`` is evaluated stably as ``logaddexp(z, 0)``.

    Gradient by differentials: ``d log(1 + e^z) = σ(z) dz``, so
    ``dL = (1/n)⟨σ(z) − y, X dw⟩ + l2⟨w, dw⟩ = ⟨Xᵀ(σ(Xw) − y)/n + l2 w, dw⟩`` and
    ``∇L(w) = Xᵀ(σ(Xw) − y)/n + l2 w``.

    Hessian: ``dσ = σ(1 − σ) dz``, so ``∇²L(w) = XᵀDX/n + l2 I`` with ``D = diag(σ(z) ⊙ (1 − σ(z)))``
    (the IRLS weight matrix), and the HVP is ``Xᵀ(σ(1 − σ) ⊙ Xv)/n + l2 v``. Since
    ``0 < σ(1 − σ) ≤ ¼``: ``L = ‖X‖₂²/(4n) + l2`` and ``μ = l2`` (``None`` when ``l2 = 0``, where the
    loss is convex but not strongly convex and the minimiser may not exist).

    With ``intercept=True`` a column of ones is appended to ``X``, so ``w`` has ``dim + 1`` entries and
    the last one is the bias; it is penalised like the others, which keeps ``μ = l2``. For ``l2 > 0``
    the unique minimiser is computed at construction by Newton's method (IRLS) to machine precision.

    Instance: ``X_ij ~ N(0, 1)``; ``y_i = 1[x_iᵀw* + b* + ε_i > 0]`` from a random teacher
    ``w* ~ N(0, 4/d)`` (bias ``b* ~ N(0, ¼)`` with an intercept, else 0) with noise
    ``ε_i ~ N(0, 1)``. ``data`` holds ``X`` (with the ones column, if any), ``y`` in {0, 1} and ``t``
    in {−1, +1}.

    Options:
      dim: number of features ``d`` (the parameter has ``d + 1`` entries with an intercept).
      num_samples: number of samples ``n``.
      l2: ridge weight (≥ 0); the default ``0.1`` makes the problem strongly convex.
      intercept: append a column of ones (a bias) to ``X``.
      dtype: floating dtype (``None``: JAX's default float).

    Reference: Bishop (2006), *Pattern Recognition and Machine Learning*, §4.3.2–4.3.3 (the gradient
    and the IRLS Hessian ``XᵀRX``); Nesterov (2004) for ``L`` and ``μ`` of regularised losses.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("logistic_regression", jax.random.key(0), dim=3, num_samples=20)
    >>> p.init.shape  # three weights and a bias
    (4,)
    >>> round(float(p.loss(p.init)), 4)  # log 2 at w = 0
    0.6931
    >>> p.strong_convexity
    0.1
    >>> float(jax.numpy.linalg.norm(p.grad(p.solution))) < 1e-12
    True
    """
    d = check_positive_int("dim", dim)
    n = check_positive_int("num_samples", num_samples)
    l2 = _check_nonnegative("l2", l2)
    intercept = _check_bool("intercept", intercept)
    dt = resolve_dtype(dtype)

    X, y = _logistic_data(key, n, d, intercept, dt)
    m = X.shape[1]
    data = {"X": X, "y": y, "l2": l2}

    def random_point(k):
        return _normal_parts(k, ((m,),), dt)[0]

    solution = min_value = None
    if l2 > 0:
        solution = _newton(_lr_loss, _lr_grad, _lr_hess, jnp.zeros((m,), dt), (X, y, l2))
        min_value = float(_lr_loss(solution, **data))

    return Problem(
        name="logistic_regression",
        loss=Partial(_lr_loss, **data),
        grad=Partial(_lr_grad, **data),
        hvp=Partial(_lr_hvp, **data),
        init=jnp.zeros((m,), dt),
        solution=solution,
        min_value=min_value,
        smoothness=_sigma_max_sq(X) / (4 * n) + l2,
        strong_convexity=l2 if l2 > 0 else None,
        random_point=random_point,
        data={"X": X, "y": y, "t": 2 * y - 1},
        options={"dim": d, "num_samples": n, "l2": l2, "intercept": intercept, "dtype": dt.name},
        description="L(w) = mean_i [log(1 + exp(x_iᵀw)) − y_i x_iᵀw] + (l2/2)‖w‖²",
        reference="Bishop (2006) PRML §4.3.2–4.3.3 (logistic regression, IRLS Hessian XᵀRX)",
        analytic=False,  # logaddexp takes a max internally: not complex-safe
        smooth=True,
    )


# --------------------------------------------------------------------------------------------------
# multiclass SVM
# --------------------------------------------------------------------------------------------------


def _svm_margins(W, X, Y, margin):
    S = X @ W
    return S - jnp.sum(S * Y, axis=1, keepdims=True) + margin


@jax.jit
def _svm_loss(W, X, Y, margin, reg):
    hinge = jnp.maximum(_svm_margins(W, X, Y, margin), 0.0) * (1 - Y)
    return jnp.sum(hinge) / X.shape[0] + reg * jnp.sum(W * W)


@jax.jit
def _svm_grad(W, X, Y, margin, reg):
    A = ((_svm_margins(W, X, Y, margin) > 0) & (Y == 0)).astype(X.dtype)
    C = A - Y * jnp.sum(A, axis=1, keepdims=True)
    return X.T @ C / X.shape[0] + 2 * reg * W


@jax.jit
def _svm_hvp(W, V, reg):
    del W
    return 2 * reg * V


@register("multiclass_svm")
def multiclass_svm(
    key: Any,
    /,
    *,
    dim: int = 10,
    num_classes: int = 3,
    num_samples: int = 50,
    margin: float = 1.0,
    reg: float = 0.01,
    dtype: Any = None,
) -> Problem:
    """Multiclass hinge (SVM) loss with an L2 penalty: Johnson's hand-derived-gradient example.

    With scores ``S = XW`` (``n × c``; ``W`` is ``d × c``), integer labels ``y_i`` and margin ``Δ``::

        L(W) = (1/n) Σ_i Σ_{j ≠ y_i} max(0, s_ij − s_{i,y_i} + Δ) + λ‖W‖_F²

    (``λ`` is ``reg``; note the penalty has no ½, as in the lecture notes.)

    Subgradient by hand — the notes' "bad idea" slide, done once, vectorised. Let
    ``A_ij = 1[s_ij − s_{i,y_i} + Δ > 0]`` for ``j ≠ y_i`` (and ``A_{i,y_i} = 0``): the active
    margins. Away from the kinks each active term differentiates to ``x_i`` in column ``j`` and
    ``−x_i`` in column ``y_i``, so ``dL = (1/n) Σ_i Σ_j C_ij ⟨x_i, dW_{:,j}⟩ + 2λ⟨W, dW⟩`` with the
    coefficient matrix ``C = A − Y ⊙ (A1)`` (column ``y_i`` gets minus the number of active margins of
    sample ``i``). Hence::

        ∇L(W) = XᵀC/n + 2λW.

    At a kink (a margin exactly 0) any value in ``[0, 1]`` for ``A_ij`` gives a subgradient; this
    choice takes 0 (``jax.grad`` of ``jnp.maximum`` takes ½ there).

    Curvature: the hinge part is piecewise linear, so wherever it is differentiable its Hessian is
    zero and ``∇²L = 2λI``; ``hvp(W, V) = 2λV`` (exact almost everywhere). The loss is convex and
    ``2λ``-strongly convex; it has kinks, so ``smoothness`` is ``None``, ``smooth`` and ``analytic`` are
    ``False``, and the minimiser (a quadratic program) is not computed.

    Instance: ``X_ij ~ N(0, 1)``; labels ``argmax_k (x_iᵀW* + ε_i)_k``, ``W* ~ N(0, 4/d)``,
    ``ε_i ~ N(0, I)`` (as for ``softmax_cross_entropy``: same key and sizes, same data). ``data``
    holds ``X``, the integer ``labels`` and their one-hot ``Y``.

    Options:
      dim: number of features ``d``.
      num_classes: number of classes ``c`` (≥ 2).
      num_samples: number of samples ``n``.
      margin: the margin ``Δ`` (> 0).
      reg: the penalty weight ``λ`` (≥ 0).
      dtype: floating dtype (``None``: JAX's default float).

    Reference: J. Johnson, lecture notes on backpropagation (Lecture 6, 2022), "a bad idea: derive
    ∇_W L on paper"; Weston & Watkins (1999), "Support vector machines for multi-class pattern
    recognition" (this sum-of-hinges form; Crammer & Singer 2001 use the max over ``j`` instead).

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("multiclass_svm", jax.random.key(0), dim=4, num_classes=3)
    >>> round(float(p.loss(p.init)), 6)  # W = 0: every margin is active, (c − 1)Δ
    2.0
    >>> p.grad(p.init).shape, p.smooth
    ((4, 3), False)
    """
    d = check_positive_int("dim", dim)
    c = check_positive_int("num_classes", num_classes, minimum=2)
    n = check_positive_int("num_samples", num_samples)
    margin = check_positive("margin", margin)
    reg = _check_nonnegative("reg", reg)
    dt = resolve_dtype(dtype)

    X, labels, Y = _classification_data(key, n, d, c, dt)
    data = {"X": X, "Y": Y, "margin": margin, "reg": reg}

    def random_point(k):
        return _normal_parts(k, ((d, c),), dt)[0]

    return Problem(
        name="multiclass_svm",
        loss=Partial(_svm_loss, **data),
        grad=Partial(_svm_grad, **data),
        hvp=Partial(_svm_hvp, reg=reg),
        init=jnp.zeros((d, c), dt),
        solution=None,
        min_value=None,
        smoothness=None,
        strong_convexity=2 * reg if reg > 0 else None,
        random_point=random_point,
        data={"X": X, "labels": labels, "Y": Y},
        options={
            "dim": d,
            "num_classes": c,
            "num_samples": n,
            "margin": margin,
            "reg": reg,
            "dtype": dt.name,
        },
        description="L(W) = mean_i Σ_{j≠y_i} max(0, s_ij − s_{i,y_i} + Δ) + λ‖W‖², S = XW",
        reference="Johnson, backprop lecture notes (2022); Weston & Watkins (1999)",
        analytic=False,
        smooth=False,
    )


# --------------------------------------------------------------------------------------------------
# MLP regression
# --------------------------------------------------------------------------------------------------


def _mlp_scale(z: tuple, bias: float) -> dict:
    """Parameters from standard normal parts: ``W ~ N(0, 1/fan_in)``, ``b ~ N(0, bias²)``."""
    W1, b1, W2, b2 = z
    return {
        "W1": W1 / math.sqrt(W1.shape[0]),
        "b1": bias * b1,
        "W2": W2 / math.sqrt(W2.shape[0]),
        "b2": bias * b2,
    }


def _mlp_forward(p, X):
    A1 = jnp.tanh(X @ p["W1"] + p["b1"][None, :])
    return A1, A1 @ p["W2"] + p["b2"][None, :]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _mlp_data(key: Any, n: int, di: int, h: int, do: int, dt: Any, noise: Any):
    """Inputs, teacher, targets ``f_teacher(X) + noise·ε`` and a small random init."""
    net = ((di, h), (h,), (h, do), (do,))
    z = _normal_parts(key, ((n, di), (n, do), *net, *net), dt)
    X, teacher = z[0], _mlp_scale(z[2:6], bias=0.5)
    Y = _mlp_forward(teacher, X)[1] + noise * z[1]
    return X, Y, teacher, _mlp_scale(z[6:10], bias=0.0)


@jax.jit
def _mlp_loss(p, X, Y):
    R = _mlp_forward(p, X)[1] - Y
    return jnp.sum(R * R) / (2 * X.shape[0])


@jax.jit
def _mlp_grad(p, X, Y):
    A1, F = _mlp_forward(p, X)
    D2 = (F - Y) / X.shape[0]  # BP1 (identity output)
    D1 = (D2 @ p["W2"].T) * (1 - A1 * A1)  # BP2
    return {
        "W1": X.T @ D1,  # BP4
        "b1": jnp.sum(D1, axis=0),  # BP3
        "W2": A1.T @ D2,
        "b2": jnp.sum(D2, axis=0),
    }


@jax.jit
def _mlp_hvp(p, v, X, Y):
    A1, F = _mlp_forward(p, X)
    T = 1 - A1 * A1
    D2 = (F - Y) / X.shape[0]
    RA1 = T * (X @ v["W1"] + v["b1"][None, :])
    RD2 = (RA1 @ p["W2"] + A1 @ v["W2"] + v["b2"][None, :]) / X.shape[0]
    RD1 = (RD2 @ p["W2"].T + D2 @ v["W2"].T) * T - 2 * (D2 @ p["W2"].T) * A1 * RA1
    return {
        "W1": X.T @ RD1,
        "b1": jnp.sum(RD1, axis=0),
        "W2": RA1.T @ D2 + A1.T @ RD2,
        "b2": jnp.sum(RD2, axis=0),
    }


@register("mlp")
def mlp(
    key: Any,
    /,
    *,
    in_dim: int = 3,
    hidden: int = 16,
    out_dim: int = 2,
    num_samples: int = 50,
    noise: float = 0.0,
    dtype: Any = None,
) -> Problem:
    """One-hidden-layer tanh MLP regression, with its gradient by hand-written backpropagation.

    Parameters ``{"W1": in × h, "b1": h, "W2": h × out, "b2": out}``; data ``X`` (``n × in``),
    targets ``Y`` (``n × out``). Rows are samples::

        Z1 = XW1 + 1b1ᵀ,  A1 = tanh(Z1),  F = A1W2 + 1b2ᵀ,  L = (1/2n)‖F − Y‖_F²

    Gradient: the four backpropagation equations, written for a batch (one row per sample, the
    output activation is the identity and ``C`` is the loss):

    - BP1, output error: ``δ² = ∇_a C ⊙ σ'(z²)`` becomes ``Δ2 = (F − Y)/n``.
    - BP2, error of the hidden layer: ``δ¹ = (W²ᵀδ²) ⊙ σ'(z¹)`` becomes
      ``Δ1 = (Δ2 W2ᵀ) ⊙ (1 − A1²)``, using ``tanh' = 1 − tanh²``.
    - BP3, biases: ``∂C/∂b = δ`` summed over the batch: ``∇b2 = Δ2ᵀ1``, ``∇b1 = Δ1ᵀ1``.
    - BP4, weights: ``∂C/∂W = a^{l−1} δ`` summed over the batch: ``∇W2 = A1ᵀΔ2``, ``∇W1 = XᵀΔ1``.

    Hessian-vector product: exact, by Pearlmutter's R-operator — differentiate the forward and the
    backward pass above once more along ``V = (V_W1, v_b1, V_W2, v_b2)``::

        R(Z1) = XV_W1 + 1v_b1ᵀ,   R(A1) = (1 − A1²) ⊙ R(Z1),
        R(Δ2) = (R(A1)W2 + A1V_W2 + 1v_b2ᵀ)/n,
        R(Δ1) = (R(Δ2)W2ᵀ + Δ2V_W2ᵀ) ⊙ (1 − A1²) − 2(Δ2W2ᵀ) ⊙ A1 ⊙ R(A1),
        Hv = (XᵀR(Δ1), R(Δ1)ᵀ1, R(A1)ᵀΔ2 + A1ᵀR(Δ2), R(Δ2)ᵀ1).

    (The Gauss–Newton part of ``H`` keeps only the terms without ``Δ2``; the rest is the curvature of
    the network times the residual.)

    Instance: ``X_ij ~ N(0, 1)``; ``Y = f_teacher(X) + noise·ε`` for a random teacher network of the
    same shape (``data["teacher"]``). With ``noise = 0`` the teacher attains ``min_value = 0`` (up to
    rounding: targets and loss are separately compiled programs); it is not a unique minimiser
    (permuting hidden units, or flipping the sign of one unit's weights in and out, gives the same
    network), so ``solution`` is ``None``. The loss is not convex, and its gradient
    is not globally Lipschitz: ``smoothness`` and ``strong_convexity`` are ``None``. ``init`` is a
    random network with ``W ~ N(0, 1/fan_in)`` and zero biases (all-zero weights would leave the
    hidden layer stuck: with ``W2 = 0`` the backpropagated error ``Δ1`` vanishes).

    Options:
      in_dim: input dimension.
      hidden: hidden width ``h``.
      out_dim: output dimension.
      num_samples: number of samples ``n``.
      noise: standard deviation of the target noise (≥ 0).
      dtype: floating dtype (``None``: JAX's default float).

    Reference: Rumelhart, Hinton & Williams (1986); the four equations as in Nielsen, *Neural Networks
    and Deep Learning* (2015), ch. 2, and the backpropagation treatise of the seed notes; Pearlmutter
    (1994), "Fast exact multiplication by the Hessian", for the R-operator.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("mlp", jax.random.key(0), in_dim=2, hidden=4, out_dim=1)
    >>> sorted(p.grad(p.init))
    ['W1', 'W2', 'b1', 'b2']
    >>> float(p.loss(p.data["teacher"])) <= 1e-30, p.min_value
    (True, 0.0)
    """
    di = check_positive_int("in_dim", in_dim)
    h = check_positive_int("hidden", hidden)
    do = check_positive_int("out_dim", out_dim)
    n = check_positive_int("num_samples", num_samples)
    noise = _check_nonnegative("noise", noise)
    dt = resolve_dtype(dtype)

    X, Y, teacher, init = _mlp_data(key, n, di, h, do, dt, noise)

    def random_point(k):
        return _mlp_scale(_normal_parts(k, ((di, h), (h,), (h, do), (do,)), dt), bias=1.0)

    return Problem(
        name="mlp",
        loss=Partial(_mlp_loss, X=X, Y=Y),
        grad=Partial(_mlp_grad, X=X, Y=Y),
        hvp=Partial(_mlp_hvp, X=X, Y=Y),
        init=init,
        solution=None,
        min_value=0.0 if noise == 0 else None,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"X": X, "Y": Y, "teacher": teacher},
        options={
            "in_dim": di,
            "hidden": h,
            "out_dim": do,
            "num_samples": n,
            "noise": noise,
            "dtype": dt.name,
        },
        description="L = (1/2n)‖tanh(XW1 + b1)W2 + b2 − Y‖_F²",
        reference="Rumelhart, Hinton & Williams (1986); Nielsen (2015) ch. 2; Pearlmutter (1994)",
        analytic=True,
        smooth=True,
    )


# --------------------------------------------------------------------------------------------------
# MLP classifier
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _mlpc_data(key: Any, n: int, di: int, h: int, c: int, dt: Any, noise: Any):
    """Inputs, a teacher network, its noisy argmax labels and a small random init."""
    net = ((di, h), (h,), (h, c), (c,))
    z = _normal_parts(key, ((n, di), (n, c), *net, *net), dt)
    X, teacher = z[0], _mlp_scale(z[2:6], bias=0.5)
    teacher["W2"] = 2.0 * teacher["W2"]  # W2* ~ N(0, 4/h): logits of order 1, labels carry signal
    teacher["b2"] = jnp.zeros_like(teacher["b2"])
    F = _mlp_forward(teacher, X)[1]
    F = F - jnp.mean(F, axis=0, keepdims=True)  # centred over the samples: no class left empty
    labels = jnp.argmax(F + noise * z[1], axis=1)
    return X, labels, jax.nn.one_hot(labels, c, dtype=dt), teacher, _mlp_scale(z[6:10], bias=0.0)


def _sq_norm(p) -> jax.Array:
    return sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(p))


@jax.jit
def _mlpc_loss(p, X, Y, l2):
    ce = -jnp.sum(Y * _log_softmax(_mlp_forward(p, X)[1])) / X.shape[0]
    return ce + 0.5 * l2 * _sq_norm(p)


@jax.jit
def _mlpc_grad(p, X, Y, l2):
    A1, Z2 = _mlp_forward(p, X)
    D2 = (jnp.exp(_log_softmax(Z2)) - Y) / X.shape[0]  # BP1: softmax with cross-entropy, (P − Y)/n
    D1 = (D2 @ p["W2"].T) * (1 - A1 * A1)  # BP2
    g = {
        "W1": X.T @ D1,  # BP4
        "b1": jnp.sum(D1, axis=0),  # BP3
        "W2": A1.T @ D2,
        "b2": jnp.sum(D2, axis=0),
    }
    return jax.tree.map(lambda gi, pi: gi + l2 * pi, g, p)


@jax.jit
def _mlpc_hvp(p, v, X, Y, l2):
    n = X.shape[0]
    A1, Z2 = _mlp_forward(p, X)
    P = jnp.exp(_log_softmax(Z2))
    T = 1 - A1 * A1
    D2 = (P - Y) / n
    RA1 = T * (X @ v["W1"] + v["b1"][None, :])
    RZ2 = RA1 @ p["W2"] + A1 @ v["W2"] + v["b2"][None, :]
    RD2 = (P * RZ2 - P * jnp.sum(P * RZ2, axis=1, keepdims=True)) / n  # softmax Jacobian
    RD1 = (RD2 @ p["W2"].T + D2 @ v["W2"].T) * T - 2 * (D2 @ p["W2"].T) * A1 * RA1
    hv = {
        "W1": X.T @ RD1,
        "b1": jnp.sum(RD1, axis=0),
        "W2": RA1.T @ D2 + A1.T @ RD2,
        "b2": jnp.sum(RD2, axis=0),
    }
    return jax.tree.map(lambda hi, vi: hi + l2 * vi, hv, v)


@register("mlp_classifier")
def mlp_classifier(
    key: Any,
    /,
    *,
    in_dim: int = 2,
    hidden: int = 16,
    num_classes: int = 3,
    num_samples: int = 100,
    noise: float = 0.5,
    l2: float = 0.0,
    dtype: Any = None,
) -> Problem:
    """One-hidden-layer tanh MLP classifier: softmax cross-entropy, gradient by backpropagation.

    Parameters ``{"W1": in × h, "b1": h, "W2": h × c, "b2": c}``; data ``X`` (``n × in``), one-hot
    labels ``Y`` (``n × c``). Rows are samples::

        Z1 = XW1 + 1b1ᵀ,  A1 = tanh(Z1),  Z2 = A1W2 + 1b2ᵀ,  P = softmax(Z2) (row-wise),
        L = −(1/n) Σ_i ⟨y_i, log p_i⟩ + (l2/2)(‖W1‖² + ‖b1‖² + ‖W2‖² + ‖b2‖²)

    The log-softmax is computed with the max shift ``z − max z`` so large logits do not overflow.

    Gradient: the four backpropagation equations for a batch, with the output error of softmax with
    cross-entropy. One sample's loss is ``lse(z_i) − ⟨y_i, z_i⟩`` (``Σ_k y_ik = 1``) and
    ``d lse(z) = ⟨p, dz⟩``, so the error at the logits is ``p_i − y_i`` — no ``σ'`` factor:

    - BP1, output error: ``Δ2 = (P − Y)/n``.
    - BP2, hidden error: ``Δ1 = (Δ2 W2ᵀ) ⊙ (1 − A1²)`` (``tanh' = 1 − tanh²``).
    - BP3, biases: ``∇b2 = Δ2ᵀ1``, ``∇b1 = Δ1ᵀ1``.
    - BP4, weights: ``∇W2 = A1ᵀΔ2``, ``∇W1 = XᵀΔ1``;

    plus ``l2`` times each parameter for the penalty.

    Hessian-vector product: exact, by Pearlmutter's R-operator along ``V = (V_W1, v_b1, V_W2, v_b2)``,
    as for ``mlp`` but through the softmax Jacobian ``dp = (diag(p) − ppᵀ) dz`` at the output::

        R(Z1) = XV_W1 + 1v_b1ᵀ,   R(A1) = (1 − A1²) ⊙ R(Z1),
        R(Z2) = R(A1)W2 + A1V_W2 + 1v_b2ᵀ,
        R(Δ2) = (P ⊙ R(Z2) − P ⊙ (P ⊙ R(Z2))11ᵀ)/n     (row i: (diag(p_i) − p_ip_iᵀ) R(z_i)/n),
        R(Δ1) = (R(Δ2)W2ᵀ + Δ2V_W2ᵀ) ⊙ (1 − A1²) − 2(Δ2W2ᵀ) ⊙ A1 ⊙ R(A1),
        Hv = (XᵀR(Δ1), R(Δ1)ᵀ1, R(A1)ᵀΔ2 + A1ᵀR(Δ2), R(Δ2)ᵀ1) + l2 V.

    The terms without ``Δ2`` are the Gauss–Newton part (positive semi-definite); the terms with
    ``Δ2`` are the network's own curvature times the output error, and give the Hessian its negative
    eigenvalues (it is indefinite at initialisation and in general).

    Instance: ``X_ij ~ N(0, 1)``; labels ``argmax_k (f*(x_i) + noise·ε_i)_k`` from a random tanh
    teacher ``f*`` of the same shape (``W1* ~ N(0, 1/in)``, ``b1* ~ N(0, ¼)``, ``W2* ~ N(0, 4/h)``,
    ``b2* = 0``), its logits centred over the samples (so that no class is nearly empty), with
    Gaussian logit noise ``ε_i ~ N(0, I)``: non-linear class boundaries that a linear softmax cannot
    fit. ``data`` holds ``X``, ``Y``, the integer ``labels`` and the ``teacher``. ``init`` is a
    random network with ``W ~ N(0, 1/fan_in)`` and zero biases (as ``mlp``). The loss is not convex
    and its infimum is not known (it is 0, not attained, on separable data with ``l2 = 0``):
    ``solution``, ``min_value``, ``smoothness`` and ``strong_convexity`` are ``None``.

    Options:
      in_dim: input dimension.
      hidden: hidden width ``h``.
      num_classes: number of classes ``c`` (≥ 2).
      num_samples: number of samples ``n``.
      noise: standard deviation of the teacher's logit noise (≥ 0; 0: noiseless labels).
      l2: weight decay on every parameter (≥ 0).
      dtype: floating dtype (``None``: JAX's default float).

    Reference: Rumelhart, Hinton & Williams (1986); Nielsen, *Neural Networks and Deep Learning*
    (2015), ch. 2 and 3 (the four equations; softmax with cross-entropy has output error
    ``a − y``); Bishop (2006), *PRML* §5.3 and §5.4.6; Pearlmutter (1994) for the R-operator.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("mlp_classifier", jax.random.key(0), hidden=8, num_classes=3)
    >>> {k: v.shape for k, v in sorted(p.grad(p.init).items())}
    {'W1': (2, 8), 'W2': (8, 3), 'b1': (8,), 'b2': (3,)}
    >>> p.data["Y"].shape, sorted(set(p.data["labels"].tolist()))
    ((100, 3), [0, 1, 2])
    >>> z = jax.tree.map(jax.numpy.zeros_like, p.init)
    >>> round(float(p.loss(z)), 6)  # zero logits: log 3
    1.098612
    """
    di = check_positive_int("in_dim", in_dim)
    h = check_positive_int("hidden", hidden)
    c = check_positive_int("num_classes", num_classes, minimum=2)
    n = check_positive_int("num_samples", num_samples)
    noise = _check_nonnegative("noise", noise)
    l2 = _check_nonnegative("l2", l2)
    dt = resolve_dtype(dtype)

    X, labels, Y, teacher, init = _mlpc_data(key, n, di, h, c, dt, noise)
    data = {"X": X, "Y": Y, "l2": l2}

    def random_point(k):
        return _mlp_scale(_normal_parts(k, ((di, h), (h,), (h, c), (c,)), dt), bias=1.0)

    return Problem(
        name="mlp_classifier",
        loss=Partial(_mlpc_loss, **data),
        grad=Partial(_mlpc_grad, **data),
        hvp=Partial(_mlpc_hvp, **data),
        init=init,
        solution=None,
        min_value=None,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"X": X, "Y": Y, "labels": labels, "teacher": teacher},
        options={
            "in_dim": di,
            "hidden": h,
            "num_classes": c,
            "num_samples": n,
            "noise": noise,
            "l2": l2,
            "dtype": dt.name,
        },
        description="L = mean_i −⟨y_i, log softmax(tanh(x_iᵀW1 + b1)W2 + b2)⟩ + (l2/2)‖θ‖²",
        reference="Rumelhart, Hinton & Williams (1986); Nielsen (2015) ch. 2–3; Pearlmutter (1994)",
        analytic=False,  # the max shift of the log-softmax is not complex-safe
        smooth=True,
    )
