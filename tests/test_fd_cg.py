"""descent.fd_cg: the derivative-free FD + Polak–Ribière+ + secant-step method (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import descent, grads, problems
from gradlab._validate import NotScalarError, OptionError

KEY = jax.random.key(0)


def test_least_squares_reaches_tol_and_beats_fd_gd():
    p = problems.make("least_squares", KEY, dim=10, num_samples=20)
    d = 10
    h = descent.fd_cg(p.loss, p.init, num_steps=200, tol=1e-6, f_star=p.min_value,
                      check_decrease=False)  # fmt: skip
    assert h.steps_to_tol is not None and h.relative_gap[h.steps_to_tol] <= 1e-6
    assert h.fun_evals_to_tol <= 3 * (d + 1) * d
    # exact counts: d + 1 for x_0, then d + 1 per iteration (no fallback on a convex quadratic)
    assert h.num_fun_evals[0] == 0
    np.testing.assert_array_equal(h.num_fun_evals, (d + 1) * (np.arange(h.steps_run + 1) + 1) * (
        np.arange(h.steps_run + 1) > 0))  # fmt: skip
    assert h.num_grads.max() == 0 and h.num_jvps.max() == 0
    assert h.loss.shape == (h.steps_run + 1,) and not h.diverged
    fd = descent.run(p.loss, p.init, grads.forward_difference(), optax.sgd(1 / p.smoothness),
                     key=jax.random.key(1), num_steps=5000, tol=1e-6, f_star=p.min_value)  # fmt: skip
    assert fd.fun_evals_to_tol is not None and h.fun_evals_to_tol < fd.fun_evals_to_tol
    # with the (counted) decrease check: one more evaluation per iteration, same iterates here
    hc = descent.fd_cg(p.loss, p.init, num_steps=200, tol=1e-6, f_star=p.min_value)
    assert hc.steps_to_tol == h.steps_to_tol
    np.testing.assert_array_equal(np.diff(hc.num_fun_evals)[1:], d + 2)
    assert hc.num_fun_evals[1] == 2 * (d + 1) + 1


def _exact_grad_norm(fn, params):
    g = jax.grad(fn)(params)
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("logistic_regression", {"dim": 5, "num_samples": 40}),
        ("softmax_cross_entropy", {}),
    ],
)
def test_non_quadratic_converges(name, kwargs):
    p = problems.make(name, KEY, **kwargs)
    g0 = _exact_grad_norm(p.loss, p.init)
    h = descent.fd_cg(p.loss, p.init, num_steps=300, tol=1e-5 * max(g0, 1.0))
    assert not h.diverged
    # with the decrease check every accepted iterate decreases the loss
    assert np.all(np.diff(h.loss) <= 1e-12 * np.abs(h.loss[:-1]) + 1e-14)
    assert h.loss[-1] < h.loss[0]
    assert _exact_grad_norm(p.loss, h.params) <= 1e-3 * max(g0, 1.0)
    assert jax.tree.structure(h.params) == jax.tree.structure(p.init)
    inc = np.diff(h.num_fun_evals)
    d = jax.flatten_util.ravel_pytree(p.init)[0].size
    # per iteration: d + 2, or d + 2 + d after a fallback that stays put (plus d + 1 for x_0 at first)
    assert inc[0] in (2 * (d + 1) + 1, 2 * (d + 1) + 1 + d)
    assert set(inc[1:].tolist()) <= {d + 2, 2 * d + 2}


def test_compile_once():
    p = problems.make("least_squares", KEY, dim=6, num_samples=12)
    descent.clear_cache()
    h1 = descent.fd_cg(p.loss, p.init, num_steps=50, tol=1e-6, f_star=p.min_value)
    assert h1.compile_time > 0
    h2 = descent.fd_cg(p.loss, p.init + 0.5, num_steps=50, tol=1e-6, f_star=p.min_value)
    assert h2.compile_time == 0.0
    assert h2.loss[0] != h1.loss[0]


def test_bad_arguments():
    p = problems.make("least_squares", KEY, dim=3, num_samples=6)
    with pytest.raises(OptionError, match="num_steps"):
        descent.fd_cg(p.loss, p.init, num_steps=0)
    with pytest.raises(OptionError, match="num_steps"):
        descent.fd_cg(p.loss, p.init, num_steps=2.5)
    with pytest.raises(OptionError, match="tol"):
        descent.fd_cg(p.loss, p.init, num_steps=5, tol=-1.0)
    with pytest.raises(OptionError, match="step"):
        descent.fd_cg(p.loss, p.init, num_steps=5, step=0.0)
    with pytest.raises(OptionError, match="restart_every"):
        descent.fd_cg(p.loss, p.init, num_steps=5, restart_every=0)
    with pytest.raises(OptionError, match="f_star"):
        descent.fd_cg(p.loss, p.init, num_steps=5, f_star="x")
    with pytest.raises(OptionError, match="fn"):
        descent.fd_cg(3, p.init, num_steps=5)
    with pytest.raises(NotScalarError, match="fn"):
        descent.fd_cg(lambda x: x * 2, p.init, num_steps=5)


def test_fd_cg_converges_on_mds_with_defaults():
    """Regression: a far-out first trial on the quartic MDS loss once collapsed the trial length to 0."""
    p = problems.make("mds", jax.random.key(0), num_points=5, dim=2)
    h = descent.fd_cg(p.loss, p.init, num_steps=500, tol=1e-6, f_star=0.0)
    assert h.steps_to_tol is not None
    assert h.fun_evals_to_tol < 2000  # Nelder–Mead needs ≈ 1,100 here, plain 2-point ZO-GD ≈ 9,000
