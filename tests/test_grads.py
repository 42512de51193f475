"""Gradient strategies: a registry × catalog problems × seeds against jax.grad, and the stochastic
estimators against their theory (means, second moments, standard errors) in float64."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import grads, problems, theory
from gradlab._tree import relative_error
from gradlab._validate import NotScalarError, OptionError, ShapeError, UnknownNameError

PROBLEMS = ["quadratic", "least_squares", "logistic_regression", "mlp", "log_det"]
# (name, options, relative tolerance against jax.grad or None for stochastic, counts(d) -> (evals, grads, jvps))
STRATEGIES = {
    "exact": ({}, 1e-12, lambda d: (0, 1, 0)),
    "forward_mode": ({"batch_size": 7}, 1e-12, lambda d: (0, 0, d)),
    "forward_difference": ({}, 1e-6, lambda d: (d + 1, 0, 0)),
    "central_difference": ({}, 1e-9, lambda d: (2 * d, 0, 0)),
    "two_point": ({"num_directions": 3}, None, lambda d: (6, 0, 0)),
    "forward_gradient": ({"num_directions": 3}, None, lambda d: (0, 0, 3)),
}


def test_names_cover_the_registry():
    assert sorted(STRATEGIES) == grads.names()


@functools.cache
def _registry_run(problem):
    """One problem instance and one compiled function running every strategy (reused across seeds)."""
    p = problems.make(problem, jax.random.key(0))
    strategies = {name: grads.make(name, **opts) for name, (opts, _, _) in STRATEGIES.items()}

    @jax.jit
    def run(x, key):
        return {name: s(p.loss, x, key) for name, s in strategies.items()}, jax.grad(p.loss)(x)

    return p, run


@pytest.mark.parametrize("problem", PROBLEMS)
def test_registry(problem, seed):
    """Every strategy at a random point: structure, dtype, accuracy against jax.grad, counts."""
    key = jax.random.key(seed)
    p, run = _registry_run(problem)
    x = p.random_point(key)
    d = sum(leaf.size for leaf in jax.tree.leaves(x))
    out, g = run(x, jax.random.fold_in(key, 2))
    f = p.loss(x)
    for name, (_, rtol, counts) in STRATEGIES.items():
        est = out[name]
        assert jax.tree.structure(est.grad) == jax.tree.structure(x), name
        assert jax.tree.map(lambda a: a.dtype, est.grad) == jax.tree.map(lambda a: a.dtype, x), name
        assert (int(est.num_fun_evals), int(est.num_grads), int(est.num_jvps)) == counts(d), name
        assert est.num_fun_evals.dtype == jnp.int32
        if rtol is not None:
            err = float(relative_error(est.grad, g))
            assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"
            assert float(est.std_error) == 0.0
            assert jnp.allclose(est.value, f, rtol=1e-10), name
        else:
            assert bool(jnp.isfinite(est.std_error)), name
            assert jnp.allclose(est.value, f, rtol=1e-8), name


# --- stochastic estimators against theory ---------------------------------------------------------------

D = 10


def _quadratic():
    """f(x) = ½ xᵀAx + bᵀx: central differences are exact, so c_i = ⟨∇f, v_i⟩ up to round-off."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    B = jax.random.normal(k1, (D, D)) / math.sqrt(D)
    A = B @ B.T + jnp.eye(D)
    b = jax.random.normal(k2, (D,))
    x = jax.random.normal(k3, (D,))
    return (lambda z: 0.5 * z @ A @ z + b @ z), x, A @ x + b


def _many(strategy, fn, x, n, seed=11):
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.jit(jax.vmap(lambda k: strategy(fn, x, k)))(keys)


def _within(sample, expect, sigmas=5.0):
    """The sample mean of ``sample`` (axis 0) is within ``sigmas`` standard errors of ``expect``."""
    n = sample.shape[0]
    se = jnp.std(sample, axis=0) / math.sqrt(n)
    return bool(jnp.all(jnp.abs(jnp.mean(sample, axis=0) - expect) <= sigmas * se + 1e-12))


SECOND_MOMENTS = [  # (strategy, options, E‖G‖² / ‖∇f‖²)
    # the sphere rows from gradlab.theory (what the theory step sizes are built on), checked here
    ("two_point", {"distribution": "sphere"}, theory.second_moment_factor(D)),
    (
        "two_point",
        {"distribution": "sphere", "num_directions": 4},
        theory.second_moment_factor(D, 4),
    ),
    (
        "two_point",
        {"distribution": "orthogonal", "num_directions": 4},
        theory.second_moment_factor(D, 4, "orthogonal"),
    ),
    ("two_point", {"distribution": "coordinate", "num_directions": 4}, D / 4),
    ("two_point", {"distribution": "gaussian"}, D + 2),
    ("two_point", {"distribution": "rademacher", "num_directions": 2}, 1 + (D - 1) / 2),
    ("forward_gradient", {"num_directions": 3}, 1 + (D + 1) / 3),
    ("forward_gradient", {"distribution": "sphere", "num_directions": 2}, 1 + (D - 1) / 2),
]


@pytest.mark.parametrize(("name", "opts", "ratio"), SECOND_MOMENTS, ids=lambda v: str(v))
def test_unbiased_and_second_moment(name, opts, ratio):
    fn, x, g = _quadratic()
    est = _many(grads.make(name, **opts), fn, x, 4000)
    assert _within(est.grad, g), "mean of the estimates is not ∇f"
    sq = jnp.sum(est.grad**2, axis=1)
    assert _within(sq, ratio * jnp.sum(g**2)), (float(jnp.mean(sq) / jnp.sum(g**2)), ratio)


def test_error_shrinks_like_one_over_sqrt_n():
    """E‖mean of n estimates − ∇f‖² = (d − 1)‖∇f‖²/n for one sphere direction (tr Cov = (d − 1)‖∇f‖²)."""
    fn, x, g = _quadratic()
    est = _many(grads.two_point(), fn, x, 16384)
    theory = (D - 1) * jnp.sum(g**2)
    mse = {}
    for n in (64, 256):
        means = est.grad.reshape(-1, n, D).mean(axis=1)
        err2 = jnp.sum((means - g[None, :]) ** 2, axis=1) * n  # each has expectation `theory`
        assert _within(err2, theory), (n, float(jnp.mean(err2) / theory))
        mse[n] = float(jnp.mean(err2) / n)
    assert 2.0 <= mse[64] / mse[256] <= 8.0  # ≈ 4: the error norm halves when n quadruples


def test_standard_error_is_calibrated():
    """E[std_error²] = tr Cov(G_i)/k = (d − 1)‖∇f‖²/k for k iid sphere directions; k = 1 gives NaN."""
    fn, x, g = _quadratic()
    k = 5
    est = _many(grads.two_point(num_directions=k), fn, x, 4000)
    assert _within(est.std_error**2, (D - 1) * jnp.sum(g**2) / k)
    one = grads.two_point()(fn, x, jax.random.key(0))
    assert bool(jnp.isnan(one.std_error))


@pytest.mark.parametrize("name", ["two_point", "forward_gradient"])
@pytest.mark.parametrize("distribution", ["orthogonal", "coordinate"])
def test_standard_error_without_replacement(name, distribution):
    """k of d directions without replacement: E[std_error²] = E‖G − ∇f‖² = (d/k − 1)‖∇f‖² (the
    finite-population correction 1 − k/d), and k = d (an exact gradient) has a 0 error bar."""
    fn, x, g = _quadratic()
    k = 4
    est = _many(grads.make(name, num_directions=k, distribution=distribution), fn, x, 4000)
    theory = (D / k - 1) * jnp.sum(g**2)
    assert _within(jnp.sum((est.grad - g[None, :]) ** 2, axis=1), theory)
    assert _within(est.std_error**2, theory), float(jnp.mean(est.std_error**2) / theory)
    full = grads.make(name, num_directions=D, distribution=distribution)(fn, x, jax.random.key(1))
    np.testing.assert_allclose(full.grad, g, rtol=1e-6)
    assert float(full.std_error) == 0.0


def test_mixed_precision_leaves_get_steps_of_their_own_dtype():
    """A float32 leaf ravelled with float64 ones is stored in float32: its FD steps and the
    smoothing must be sized by float32's ε (with float64's they round away: a zero gradient)."""
    params = {"a": jnp.arange(1.0, 4.0, dtype=jnp.float32), "b": jnp.array([1.0, 2.0])}

    def fn(p):
        return jnp.sum(p["a"].astype(jnp.float64) ** 2) + jnp.sum(p["b"] ** 3)

    want = {"a": np.array([2.0, 4.0, 6.0]), "b": np.array([3.0, 12.0])}
    for strategy, rtol in [
        (grads.forward_difference(), 1e-3),
        (grads.central_difference(), 1e-4),
        (grads.two_point(num_directions=5, distribution="coordinate"), 1e-4),
    ]:
        est = strategy(fn, params, jax.random.key(0))
        assert est.grad["a"].dtype == jnp.float32 and est.grad["b"].dtype == jnp.float64
        for leaf in ("a", "b"):
            np.testing.assert_allclose(est.grad[leaf], want[leaf], rtol=rtol, err_msg=strategy.name)


@pytest.mark.parametrize("lean", [False, True])
def test_smoothing_is_the_documented_mu(lean):
    """On f = Σ x_i³ a central difference along e_i is 3x_i² + μ² exactly, so with all d coordinate
    directions two_point returns ∇f + μ²·1: the test reads μ off the estimate. μ = s·max(1, ‖x‖∞),
    s = smoothing or ε^{1/3}."""
    x = jnp.array([5.0, -1.0, 0.3, 2.0])
    fn = lambda z: jnp.sum(z**3)  # noqa: E731
    opts = {"num_directions": 4, "distribution": "coordinate", "lean": lean}
    est = grads.two_point(**opts, smoothing=1e-2)(fn, x, jax.random.key(0))
    np.testing.assert_allclose(est.grad - 3 * x**2, (1e-2 * 5.0) ** 2, rtol=1e-6)
    # the default is s = ε^{1/3} (its μ² is at the round-off level here, so compare the estimates)
    default = grads.two_point(**opts)(fn, x, jax.random.key(0))
    s = float(jnp.finfo(jnp.float64).eps) ** (1 / 3)
    explicit = grads.two_point(**opts, smoothing=s)(fn, x, jax.random.key(0))
    np.testing.assert_array_equal(default.grad, explicit.grad)


def test_difference_steps_are_relative_to_each_coordinate():
    """On f(z) = ‖z − x₀‖² at x₀ every difference is exact up to its step: the forward estimate of
    ∂f/∂z_i is h_i itself, so the test reads the steps h_i = √ε·max(1, |x_i|) off the estimate (one
    step for all coordinates would give √ε everywhere); central differences are exactly 0."""
    x0 = jnp.array([1e3, -20.0, 0.5])
    fn = lambda z: jnp.sum((z - x0) ** 2)  # noqa: E731
    est = grads.forward_difference()(fn, x0, jax.random.key(0))
    eps = float(jnp.finfo(jnp.float64).eps)
    np.testing.assert_allclose(est.grad, math.sqrt(eps) * np.maximum(1.0, np.abs(x0)), rtol=1e-6)
    np.testing.assert_allclose(
        grads.forward_difference(step=1e-3)(fn, x0, jax.random.key(0)).grad,
        1e-3 * np.maximum(1.0, np.abs(x0)),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(grads.central_difference()(fn, x0, jax.random.key(0)).grad, 0.0)


def test_orthogonal_and_coordinate_full_rank_are_exact():
    fn, x, g = _quadratic()
    for dist in ("orthogonal", "coordinate"):
        for make in (grads.two_point, grads.forward_gradient):
            est = make(num_directions=D, distribution=dist)(fn, x, jax.random.key(3))
            assert float(relative_error(est.grad, g)) < 1e-8, (dist, make)


@functools.cache
def _lean_run(distribution):
    p = problems.make("mlp", jax.random.key(0))  # dict-valued params
    common = {"num_directions": 5, "distribution": distribution}
    variants = [
        grads.two_point(**common),
        grads.two_point(**common, batch_size=2),
        grads.two_point(**common, lean=True),
        grads.two_point(**common, lean=True, batch_size=2),  # 5 = 2 + 2 + 1: a masked last chunk
    ]
    return p, jax.jit(lambda x, k: [s(p.loss, x, k) for s in variants])


@pytest.mark.parametrize("distribution", ["sphere", "gaussian", "rademacher", "coordinate"])
def test_lean_matches_non_lean(distribution):
    key = jax.random.key(1)  # one seed: the comparison is exact, and each variant set compiles once
    p, run = _lean_run(distribution)
    outs = run(p.random_point(key), jax.random.fold_in(key, 9))
    for other in outs[1:]:
        assert float(relative_error(other.grad, outs[0].grad)) < 1e-12
        assert jnp.allclose(other.value, outs[0].value, rtol=1e-13)
        assert jnp.allclose(other.std_error, outs[0].std_error, rtol=1e-10)
        assert int(other.num_fun_evals) == 10


def test_vmap_over_keys_matches_single_calls():
    fn, x, _ = _quadratic()
    s = grads.forward_gradient(num_directions=2)
    keys = jax.random.split(jax.random.key(5), 3)
    batched = jax.jit(jax.vmap(lambda k: s(fn, x, k)))(keys)
    assert batched.grad.shape == (3, D)
    single_call = jax.jit(lambda k: s(fn, x, k))
    for i in range(3):
        single = single_call(keys[i])
        assert jnp.allclose(batched.grad[i], single.grad, rtol=1e-12)


def test_compile_once():
    """A second call with new parameter values and a new key does not retrace the loss."""
    _, x, _ = _quadratic()
    traces = []

    def fn(z):
        traces.append(None)
        return jnp.sum(z**4)

    strategies = [grads.make(n, **STRATEGIES[n][0]) for n in grads.names()]
    run = jax.jit(lambda x, k: [s(fn, x, k) for s in strategies])
    jax.block_until_ready(run(x, jax.random.key(0)))
    first = len(traces)
    jax.block_until_ready(run(x + 1.0, jax.random.key(1)))
    assert len(traces) == first


def test_estimate_is_a_pytree_through_scan():
    fn, x, _ = _quadratic()
    s = grads.two_point(num_directions=2, lean=True)

    def step(x, k):
        est = s(fn, x, k)
        return jax.tree.map(lambda a, b: a - 0.01 * b, x, est.grad), est

    _, ests = jax.lax.scan(step, x, jax.random.split(jax.random.key(0), 4))
    assert ests.grad.shape == (4, D)
    assert ests.num_fun_evals.tolist() == [4] * 4


# --- bad arguments --------------------------------------------------------------------------------------


def test_bad_options():
    with pytest.raises(OptionError, match=r"num_directions: expected an integer ≥ 1, got -3"):
        grads.two_point(num_directions=-3)
    with pytest.raises(OptionError, match=r"num_directions: expected an integer ≥ 1, got 2.5"):
        grads.forward_gradient(num_directions=2.5)
    with pytest.raises(
        UnknownNameError, match=r"distribution: unknown name 'normal'; expected one of \["
    ):
        grads.two_point(distribution="normal")
    with pytest.raises(OptionError, match=r"step: expected a positive finite number, got 0"):
        grads.forward_difference(step=0.0)
    with pytest.raises(OptionError, match=r"smoothing: expected a positive finite number, got -1"):
        grads.two_point(smoothing=-1.0)
    with pytest.raises(OptionError, match=r"batch_size: expected an integer ≥ 1, got 0"):
        grads.forward_mode(batch_size=0)
    with pytest.raises(OptionError, match=r"lean: the 'orthogonal' distribution has no lean mode"):
        grads.two_point(distribution="orthogonal", lean=True)
    with pytest.raises(OptionError, match=r"lean: expected True or False"):
        grads.two_point(lean=1)


def test_registry_errors():
    with pytest.raises(
        UnknownNameError, match=r"strategy: unknown name 'two_pont'.*Did you mean 'two_point'"
    ):
        grads.make("two_pont")
    with pytest.raises(
        OptionError, match=r"unknown option 'num_dirs'.*num_directions=1.*distribution='sphere'"
    ):
        grads.make("two_point", num_dirs=3)
    assert grads.options("forward_difference") == {"step": None}
    s = grads.make("two_point", num_directions=4, distribution="gaussian")
    assert s.name == "two_point"
    assert s.options["num_directions"] == 4
    assert (
        s.label
        == "two_point[batch_size=None,distribution=gaussian,lean=False,num_directions=4,smoothing=None]"
    )


def test_call_errors():
    x = jnp.ones(3)
    with pytest.raises(
        NotScalarError, match=r"two_point: fn: the function must return a real scalar"
    ):
        grads.two_point()(lambda z: z * 2, x, jax.random.key(0))
    with pytest.raises(NotScalarError, match=r"exact: fn"):
        grads.exact()(lambda z: z * 2, x, jax.random.key(0))
    with pytest.raises(OptionError, match=r"key: grads.exact needs an explicit PRNG key"):
        grads.exact()(jnp.sum, x, None)
    with pytest.raises(OptionError, match=r"key: expected a single jax.random.key"):
        grads.two_point()(jnp.sum, x, 0)
    for name in set(grads.names()) - {"exact"}:  # reverse mode returns the empty gradient
        with pytest.raises(ShapeError, match=r"params: expected at least one entry"):
            grads.make(name)(lambda p: jnp.sum(p["a"]), {"a": jnp.zeros(0)}, jax.random.key(0))
    with pytest.raises(OptionError, match=r"two_point: num_directions = 4 exceeds d = 3"):
        grads.two_point(num_directions=4, distribution="orthogonal")(jnp.sum, x, jax.random.key(0))
    with pytest.raises(OptionError, match=r"forward_gradient: num_directions = 5 exceeds d = 3"):
        grads.forward_gradient(num_directions=5, distribution="coordinate")(
            jnp.sum, x, jax.random.key(0)
        )


@pytest.mark.parametrize("name", ["exact", "forward_mode", "central_difference", "two_point"])
def test_integer_leaves_are_an_error_even_in_a_mixed_tree(name):
    """ravel_pytree promotes {float, int} leaves to float: the integer leaf's gradient came back as int
    zeros; every strategy now names the leaf."""
    f = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2.0)  # noqa: E731
    params = {"a": jnp.ones(2), "b": jnp.arange(2)}
    with pytest.raises(OptionError, match=r"params: leaf \['b'\] has dtype int"):
        grads.make(name)(f, params, jax.random.key(0))
