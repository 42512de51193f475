"""Step sizes and rate curves of gradlab.theory: small numbers, monotonicity, inverses."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import theory
from gradlab._validate import OptionError, ShapeError, UnknownNameError


def test_step_formulas():
    L, d, k = 2.0, 10, 5
    assert theory.gd_step(L) == pytest.approx(0.5)
    assert theory.zo_sphere_step(L, d) == pytest.approx(1 / 20)
    assert theory.zo_iid_step(L, d, k) == pytest.approx(1 / (2 * (1 + 9 / 5)))
    assert theory.zo_orthogonal_step(L, d, k) == pytest.approx(5 / 20)
    assert theory.gaussian_smoothing_step(L, d) == pytest.approx(1 / (4 * 14 * 2))
    assert theory.zo_trace_step(L, d, 7.0) == pytest.approx(12 / (10 * (7 + 4)))
    # limits: one iid direction is the sphere step; d orthonormal directions is GD
    assert theory.zo_iid_step(L, d, 1) == pytest.approx(theory.zo_sphere_step(L, d))
    assert theory.zo_orthogonal_step(L, d, d) == pytest.approx(theory.gd_step(L))
    # tr H ≤ dL, so the trace step is never below the sphere step
    assert theory.zo_trace_step(L, d, d * L) >= theory.zo_sphere_step(L, d)


def test_quadratic_exact_step_minimises_the_parabola():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    h = a @ a.T + np.eye(6)
    b = rng.normal(size=6)
    x = rng.normal(size=6)
    g = h @ x - b
    alpha = theory.quadratic_exact_step(g, h @ g)

    def f(z):
        return 0.5 * z @ h @ z - b @ z

    phi = [f(x - t * g) for t in (alpha * 0.99, alpha, alpha * 1.01)]
    assert phi[1] < phi[0] and phi[1] < phi[2]
    with pytest.raises(OptionError, match="hg"):
        theory.quadratic_exact_step(g, -h @ g)


def test_rates_small_numbers_and_monotone():
    k = np.arange(0, 50)
    gd = theory.gd_rate(k, L=10.0, mu=1.0)
    zo = theory.zo_rate(k, L=10.0, mu=1.0, d=10)
    np.testing.assert_allclose(gd, 0.9**k)
    np.testing.assert_allclose(zo, 0.99**k)
    assert gd[0] == zo[0] == 1.0
    assert np.all(np.diff(gd) < 0) and np.all(np.diff(zo) < 0)
    assert np.all(zo[1:] > gd[1:])
    orth = theory.zo_rate(k, L=10.0, mu=1.0, d=10, num_directions=10, sampling="orthogonal")
    np.testing.assert_allclose(orth, gd)
    iid = theory.zo_rate(k, L=10.0, mu=1.0, d=10, num_directions=3)
    assert np.all(iid[1:] < zo[1:]) and np.all(iid[1:] > gd[1:])


def test_sublinear_bounds():
    k = np.array([1, 10, 100])
    np.testing.assert_allclose(theory.gd_grad_norm_bound(k, L=2.0, gap0=3.0), 12.0 / k)
    np.testing.assert_allclose(theory.zo_grad_norm_bound(k, L=2.0, gap0=3.0, d=7), 7 * 12.0 / k)
    np.testing.assert_allclose(theory.gd_convex_bound(k, L=2.0, r0=1.5), 2.0 * 2.25 / (2 * k))
    np.testing.assert_allclose(
        theory.zo_convex_bound(k, L=2.0, r0=1.5, d=7), 2 * 7 * 2.0 * 2.25 / k
    )
    with pytest.raises(OptionError, match="k"):
        theory.gd_convex_bound(0, L=1.0, r0=1.0)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_steps_to_tol_inverts_geometric_rates(q, tol):
    n = theory.steps_to_tol(lambda k: q ** np.asarray(k, float), tol)
    assert n == math.ceil(math.log(tol) / math.log(q) - 1e-12)
    assert q**n <= tol < q ** (n - 1)


def test_steps_to_tol_edge_cases():
    assert theory.steps_to_tol(lambda k: 1.0, 2.0) == 0
    assert theory.steps_to_tol(lambda k: 1.0, 0.5, max_steps=1000) is None
    n = theory.steps_to_tol(lambda k: theory.gd_rate(k, L=10.0, mu=1.0), 1e-6)
    assert n == 132
    nz = theory.steps_to_tol(lambda k: theory.zo_rate(k, L=10.0, mu=1.0, d=10), 1e-6)
    assert 9 * n <= nz <= 11 * n  # ≈ d times more steps


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: theory.gd_step(0.0), OptionError, r"L: expected a positive finite number"),
        (lambda: theory.zo_sphere_step(1.0, 0), OptionError, r"d: expected an integer ≥ 1"),
        (
            lambda: theory.zo_orthogonal_step(1.0, 3, 4),
            OptionError,
            r"k: at most d = 3 .*Pass k ≤ d",
        ),
        (lambda: theory.gd_rate(3, L=1.0, mu=2.0), OptionError, r"mu: expected 0 < mu ≤ L = 1.0"),
        (lambda: theory.gd_rate(3, L=1.0, mu=0.0), OptionError, r"mu: expected a positive"),
        (
            lambda: theory.zo_rate(3, L=1.0, mu=0.5, d=3, sampling="gauss"),
            UnknownNameError,
            r"sampling: unknown name 'gauss'; expected one of \['iid', 'orthogonal'\]",
        ),
        (lambda: theory.steps_to_tol(lambda k: 1.0, 0.0), OptionError, r"tol: expected a positive"),
        (lambda: theory.steps_to_tol(3.0, 0.1), OptionError, r"rate_fn: expected a callable"),
        (lambda: theory.gd_rate(-1, L=1.0, mu=0.5), OptionError, r"k: expected step counts ≥ 0"),
        (
            lambda: theory.second_moment_factor(3, 4, "orthogonal"),
            OptionError,
            r"num_directions: at most d = 3 .*Pass num_directions ≤ d",
        ),
        (
            lambda: theory.quadratic_exact_step(jnp.ones(3), jnp.ones(4)),
            ShapeError,
            r"hg: expected the shape of g, \(3,\), got \(4,\)",
        ),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
