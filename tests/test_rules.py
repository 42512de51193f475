"""gradlab.rules: each custom_vjp rule against plain JAX AD (float64, seeds 1-3), under jit and vmap."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradlab import rules
from gradlab._validate import GradlabError, OptionError, ShapeError

RTOL = 1e-10


@pytest.fixture
def rng(seed):
    """NumPy test data from the seeds 1, 2, 3: no XLA compilation per array shape, unlike jax.random."""
    return np.random.default_rng(seed)


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape))


def _well_conditioned(rng, n):
    """A random n×n matrix with singular values in [1, 10] (condition number ≤ 10)."""
    Q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return jnp.asarray((Q1 * np.linspace(1.0, 10.0, n)[None, :]) @ Q2.T)


def _count_primitives(jaxpr, name):
    """Number of equations named ``name`` in a closed jaxpr, sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_primitives(sub, name)
    return count


@functools.partial(jax.jit, static_argnums=(0, 1))
def _first_and_second_order(loss, reference, *args):
    """Gradients of ``loss`` and ``reference`` and a reverse-over-reverse directional second
    derivative of both, in one compiled call (each test compiles once, not op by op)."""
    argnums = tuple(range(len(args)))
    directions = jax.tree.map(jnp.cos, args)  # any fixed direction

    def second(fn):
        def along(*a):
            return sum(
                jnp.vdot(g, d) for g, d in zip(jax.grad(fn, argnums)(*a), directions, strict=True)
            )

        return jax.grad(along, argnums)(*args)

    return (
        (loss(*args), jax.grad(loss, argnums)(*args), second(loss)),
        (reference(*args), jax.grad(reference, argnums)(*args), second(reference)),
    )


def _assert_same_derivatives(loss, reference, *args, rtol=RTOL, atol=1e-12):
    ours, theirs = _first_and_second_order(loss, reference, *args)
    for o, t in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(o, t, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# solve


def _weighted_sin(solver):
    def loss(A, b):
        return jnp.sum(jnp.cos(jnp.arange(b.size).reshape(b.shape)) * jnp.sin(solver(A, b)))

    return loss


_SOLVE_LOSS, _SOLVE_REFERENCE = _weighted_sin(rules.solve), _weighted_sin(jnp.linalg.solve)


@pytest.mark.parametrize("k", [None, 3], ids=["vector", "matrix"])
def test_solve_matches_jax(rng, k):
    n = 5
    A = _well_conditioned(rng, n)
    b = _normal(rng, (n,) if k is None else (n, k))
    np.testing.assert_allclose(rules.solve(A, b), jnp.linalg.solve(A, b), rtol=RTOL)
    _assert_same_derivatives(_SOLVE_LOSS, _SOLVE_REFERENCE, A, b)  # first and second order
    if k is None:  # against finite differences (slow op by op, so for one shape)
        check_grads(rules.solve, (A, b), order=1, modes=["rev"])


def test_solve_backward_reuses_the_lu_factors(rng):
    A = _well_conditioned(rng, 4)
    b = jnp.ones(4)
    grad = jax.grad(lambda A, b: rules.solve(A, b).sum(), argnums=(0, 1))
    assert _count_primitives(jax.make_jaxpr(grad)(A, b).jaxpr, "lu") == 1
    # the backward pass is a transposed triangular solve pair, not a second factorization
    assert _count_primitives(jax.make_jaxpr(grad)(A, b).jaxpr, "triangular_solve") == 4


def _sum_of_squares(solver):
    return lambda A, b: jnp.sum(solver(A, b) ** 2)


_SOLVE_GRADS = jax.jit(jax.vmap(jax.grad(_sum_of_squares(rules.solve), argnums=(0, 1))))
_SOLVE_REFERENCE_GRADS = jax.jit(
    jax.vmap(jax.grad(_sum_of_squares(jnp.linalg.solve), argnums=(0, 1)))
)


def test_solve_jit_and_vmap(rng):
    A = jnp.stack([_well_conditioned(rng, 3) for _ in range(4)])
    b = _normal(rng, (4, 3))
    for o, t in zip(_SOLVE_GRADS(A, b), _SOLVE_REFERENCE_GRADS(A, b), strict=True):
        np.testing.assert_allclose(o, t, rtol=RTOL, atol=1e-12)


def test_solve_promotes_integers():
    x = rules.solve(jnp.array([[2, 0], [0, 4]]), jnp.array([2, 2]))
    assert jnp.issubdtype(x.dtype, jnp.floating)
    np.testing.assert_allclose(x, [1.0, 0.5])


@pytest.mark.parametrize(
    ("A_shape", "b_shape", "fragment"),
    [((3, 4), (3,), "square"), ((3,), (3,), "square"), ((3, 3), (4,), "(3,) or (3, k)"),
     ((3, 3), (3, 2, 1), "(3,) or (3, k)")],
)  # fmt: skip
def test_solve_shape_errors(A_shape, b_shape, fragment):
    with pytest.raises(
        ShapeError, match=r"solve: .*" + fragment.replace("(", r"\(").replace(")", r"\)")
    ):
        rules.solve(jnp.ones(A_shape), jnp.ones(b_shape))


def test_solve_rejects_complex():
    with pytest.raises(OptionError, match="real"):
        rules.solve(jnp.eye(2, dtype=jnp.complex128), jnp.ones(2))


# --------------------------------------------------------------------------------------------------
# singular values


def _svd_loss(svals):
    def loss(W):
        s = svals(W)
        return jnp.sum(jnp.cos(jnp.arange(s.shape[-1])) * s**2) + jnp.sum(s)

    return loss


_SVD_LOSS = _svd_loss(rules.singular_values)
_SVD_REFERENCE = _svd_loss(lambda W: jnp.linalg.svd(W, compute_uv=False))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_singular_values_match_jax(rng, shape):
    W = _normal(rng, shape)
    np.testing.assert_allclose(
        rules.singular_values(W), jnp.linalg.svd(W, compute_uv=False), rtol=RTOL
    )
    _assert_same_derivatives(_SVD_LOSS, _SVD_REFERENCE, W, rtol=1e-9)
    check_grads(rules.singular_values, (W,), order=1, modes=["rev"])


def _sum_of_cosines(svals):
    return lambda W: jnp.sum(jnp.cos(svals(W)))


@jax.jit
def _svd_batched_grads(W):  # the batch dimension handled by the rule itself, and by vmap
    loss = _sum_of_cosines(rules.singular_values)
    reference = _sum_of_cosines(lambda W: jnp.linalg.svd(W, compute_uv=False))
    return jax.grad(reference)(W), jax.grad(loss)(W), jax.vmap(jax.grad(loss))(W)


def test_singular_values_batched_jit_vmap(rng):
    expected, batched, mapped = _svd_batched_grads(_normal(rng, (3, 4, 2)))
    np.testing.assert_allclose(batched, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mapped, expected, rtol=1e-9, atol=1e-12)


def test_singular_values_finite_at_repeated_values(rng):
    # nuclear norm at an orthogonal matrix (all σ = 1): the gradient is U Vᵀ = W itself
    Q = jnp.asarray(np.linalg.qr(rng.standard_normal((4, 4)))[0])
    grad = jax.grad(lambda W: rules.singular_values(W).sum())(Q)
    np.testing.assert_allclose(grad, Q, atol=1e-12)


def test_singular_values_shape_error():
    with pytest.raises(ShapeError, match=r"singular_values: W must be a matrix"):
        rules.singular_values(jnp.ones(3))


# --------------------------------------------------------------------------------------------------
# sigmoid


def _sigmoid_loss(sig):
    def loss(x):
        return jnp.sum(jnp.cos(jnp.arange(x.size)) * sig(x))

    return loss


def test_sigmoid_matches_jax(rng):
    x = jnp.concatenate([5.0 * _normal(rng, (11,)), jnp.array([-800.0, -40.0, 0.0, 40.0, 800.0])])
    np.testing.assert_allclose(rules.sigmoid(x), jax.nn.sigmoid(x), rtol=1e-15, atol=1e-300)
    assert jnp.all(jnp.isfinite(rules.sigmoid(x)))
    # atol: where σ rounds to 0 or 1 both second derivatives are rounding noise of size ~1e-18
    _assert_same_derivatives(
        _sigmoid_loss(rules.sigmoid), _sigmoid_loss(jax.nn.sigmoid), x, rtol=1e-13, atol=1e-16
    )
    check_grads(rules.sigmoid, (x[:11],), order=1, modes=["rev"])


def test_sigmoid_jit_vmap_and_integers(rng):
    x = _normal(rng, (3, 4))
    grad = jax.grad(lambda v: jnp.sum(rules.sigmoid(v) ** 2))
    expected = jax.grad(lambda v: jnp.sum(jax.nn.sigmoid(v) ** 2))(x)
    np.testing.assert_allclose(jax.jit(jax.vmap(grad))(x), expected, rtol=1e-13)
    assert jnp.issubdtype(rules.sigmoid(jnp.arange(3)).dtype, jnp.floating)


# --------------------------------------------------------------------------------------------------
# straight-through


def test_straight_through_forward_and_identity_backward(rng):
    x = 3.0 * _normal(rng, (6,))
    w = _normal(rng, (6,))
    np.testing.assert_array_equal(rules.straight_through(x), jnp.round(x))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(w * rules.straight_through(x)))(x), w)
    # with a differentiable fn whose derivative is 1 it equals plain AD
    shift = rules.straight_through(x, fn=lambda v: v + 1.0)
    np.testing.assert_array_equal(shift, x + 1.0)
    np.testing.assert_array_equal(
        jax.grad(lambda v: jnp.sum(w * rules.straight_through(v, fn=lambda u: u + 1.0)))(x),
        jax.grad(lambda v: jnp.sum(w * (v + 1.0)))(x),
    )


def test_straight_through_other_fns_jit_vmap(rng):
    x = _normal(rng, (3, 4))
    step = jax.jit(jax.vmap(lambda v: rules.straight_through(v, fn=jnp.sign)))(x)
    np.testing.assert_array_equal(step, jnp.sign(x))
    hard = rules.straight_through(x, fn=lambda v: v > 0)  # bool output, cast to x's dtype
    assert hard.dtype == x.dtype
    np.testing.assert_array_equal(hard, (x > 0).astype(x.dtype))
    grad = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(rules.straight_through(v) ** 2))))(x)
    np.testing.assert_allclose(grad, 2.0 * jnp.round(x))


def test_straight_through_errors():
    with pytest.raises(OptionError, match="fn must be a function"):
        rules.straight_through(jnp.ones(3), fn=2.0)
    with pytest.raises(ShapeError, match="fn must keep the shape"):
        rules.straight_through(jnp.ones(3), fn=jnp.sum)


# --------------------------------------------------------------------------------------------------
# clipping


def test_clip_gradient_value(rng):
    x = _normal(rng, (8,))
    w = 3.0 * _normal(rng, (8,))
    np.testing.assert_array_equal(rules.clip_gradient(x, -1.0, 1.0), x)
    grad = jax.grad(lambda x: jnp.sum(w * rules.clip_gradient(x, -1.0, 0.5)))(x)
    np.testing.assert_array_equal(grad, jnp.clip(w, -1.0, 0.5))
    # inside the bounds it is plain AD of the identity
    plain = jax.grad(lambda x: jnp.sum(jnp.sin(x)))(x)
    clipped = jax.grad(lambda x: jnp.sum(jnp.sin(rules.clip_gradient(x, -2.0, 2.0))))(x)
    np.testing.assert_array_equal(clipped, plain)


def test_clip_gradient_pytree_traced_bounds_and_vmap(rng):
    params = {"a": _normal(rng, (3,)), "b": jnp.ones((2, 2))}

    def loss(p, bound):
        q = rules.clip_gradient(p, -bound, bound)
        return 10.0 * (q["a"].sum() - q["b"].sum())

    g = jax.jit(jax.grad(loss))(params, 2.0)  # the bound is a traced argument
    np.testing.assert_array_equal(g["a"], jnp.full(3, 2.0))
    np.testing.assert_array_equal(g["b"], jnp.full((2, 2), -2.0))
    batched = jax.vmap(jax.grad(lambda x: jnp.sum(5.0 * rules.clip_gradient(x, -1.0, 1.0))))(
        jnp.ones((4, 3))
    )
    np.testing.assert_array_equal(batched, jnp.ones((4, 3)))


def test_clip_gradient_norm(rng):
    x = _normal(rng, (5,))
    w = _normal(rng, (5,))
    norm = float(jnp.linalg.norm(w))
    small = jax.grad(lambda x: jnp.sum(w * rules.clip_gradient_norm(x, 2.0 * norm)))(x)
    np.testing.assert_allclose(small, w, rtol=1e-15)  # under the bound: untouched
    big = jax.grad(lambda x: jnp.sum(w * rules.clip_gradient_norm(x, 0.25 * norm)))(x)
    np.testing.assert_allclose(big, 0.25 * w, rtol=1e-13)  # over: same direction, norm 0.25‖w‖
    zero = jax.grad(lambda x: jnp.sum(0.0 * rules.clip_gradient_norm(x, 1.0)))(x)
    np.testing.assert_array_equal(zero, jnp.zeros(5))  # no 0/0 at a zero cotangent


def test_clip_gradient_norm_is_global_over_a_pytree():
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}

    def loss(p, c):
        q = rules.clip_gradient_norm(p, c)
        return 3.0 * q["a"].sum() + 4.0 * q["b"].sum()  # cotangent norm 5

    g = jax.jit(jax.grad(loss))(params, 1.0)
    np.testing.assert_allclose(g["a"], [0.6])
    np.testing.assert_allclose(g["b"], [0.8])


def test_clip_errors():
    with pytest.raises(OptionError, match="lo ≤ hi"):
        rules.clip_gradient(jnp.ones(2), 1.0, -1.0)
    with pytest.raises(OptionError, match="max_norm"):
        rules.clip_gradient_norm(jnp.ones(2), 0.0)
    with pytest.raises(OptionError, match="scalar"):
        rules.clip_gradient_norm(jnp.ones(2), jnp.ones(2))
    assert issubclass(OptionError, GradlabError)


def test_rules_are_reverse_mode_only():
    # custom_vjp functions cannot be pushed forward; the docstrings say so, this keeps them honest
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(rules.sigmoid, (jnp.ones(2),), (jnp.ones(2),))
