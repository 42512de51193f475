"""gradlab.pitfalls: every phenomenon is really there, with the numbers JAX computes today."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import checks, pitfalls, rules
from gradlab._validate import UnknownNameError


def _normal(seed, shape):
    """Seeded NumPy test data: no XLA compilation per shape, unlike jax.random."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.fixture(scope="module")
def computed():
    return {p.name: p for p in pitfalls.run()}


def test_run_returns_every_pitfall_in_order(computed):
    assert list(computed) == pitfalls.names()
    for p in computed.values():
        assert isinstance(p, pitfalls.Pitfall)
        for field in ("name", "what", "jax_says", "truth", "lesson"):
            text = getattr(p, field)
            assert isinstance(text, str) and text and "\n" not in text, (p.name, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        computed["mds_factor"].truth = "anything"


def test_table_lists_every_pitfall(computed):
    text = pitfalls.table(list(computed.values()))
    lines = text.splitlines()
    assert lines[0].startswith("| # | pitfall | what | JAX says | truth | lesson |")
    assert len(lines) == 2 + len(computed)
    for name, line in zip(computed, lines[2:], strict=True):
        assert f"`{name}`" in line
        assert line.count(" | ") == 5  # six cells: no stray unescaped pipe from |x| or ‖·‖


def test_unknown_name_says_what_exists():
    with pytest.raises(UnknownNameError, match="Did you mean 'inv_vs_solve'"):
        pitfalls.run(["inv_vs_slove"])
    assert [p.name for p in pitfalls.run("subgradients_at_zero")] == ["subgradients_at_zero"]


# --------------------------------------------------------------------------------------------------
# 1. SVD


def test_svd_repeated_is_nan_but_the_truth_is_finite(computed):
    v = computed["svd_repeated"].values
    assert v["nan_fraction"] == 1.0 and np.isnan(v["grad_u"]).all()
    # (Σᵢ u₁ᵢ)² at diag(3, 2, 2): u₁ turns by (σ₁ dW_j1 + σ_j dW_1j)/(σ₁² − σ_j²), times 2·Σu₁ = 2
    expected = np.array([[0.0, 0.8, 0.8], [1.2, 0.0, 0.0], [1.2, 0.0, 0.0]])
    np.testing.assert_allclose(v["fd_u"], expected, atol=1e-8)
    assert v["sigma_error"] < 1e-14
    W = jnp.diag(jnp.array([3.0, 2.0, 2.0]))
    ours = jax.grad(lambda W: rules.singular_values(W).sum())(W)  # the σ-only rule at the same tie
    np.testing.assert_allclose(ours, jnp.eye(3), atol=1e-15)


def test_svd_near_degenerate_blows_up_like_one_over_twice_the_gap(computed):
    v = computed["svd_near_degenerate"].values
    grad, exact, gaps = map(np.asarray, (v["grad"], v["exact"], v["gaps"]))
    np.testing.assert_allclose(grad, exact, rtol=1e-6)
    assert np.all(np.diff(grad) > 0)
    np.testing.assert_allclose(grad[1:] * 2 * gaps[1:], 1.0, rtol=1e-3)
    # the numbers are computed, not stored: another gap gives another number
    other = pitfalls.svd_near_degenerate(gaps=(1e-3,)).values["grad"][0]
    assert other == pytest.approx(1.001 / (1.001**2 - 1), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# 2. sqrt and norm at zero


def test_sqrt_at_zero(computed):
    v = computed["sqrt_at_zero"].values
    assert v["grad_sqrt"] == math.inf
    assert math.isnan(v["grad_sqrt_of_square"])
    assert v["grad_abs"] == 1.0


def test_norm_at_zero(computed):
    v = computed["norm_at_zero"].values
    assert np.isnan(v["grad_norm"]).all() and np.isnan(v["grad_norm_sq"]).all()
    np.testing.assert_array_equal(v["grad_sum_sq"], 0.0)
    np.testing.assert_array_equal(v["grad_safe"], 0.0)


def test_safe_norm_is_the_norm_away_from_zero(seed):
    x = _normal(seed, (4, 3))

    @jax.jit
    def both(x):
        safe, plain = pitfalls._safe_norm, lambda v: jnp.linalg.norm(v, axis=-1)
        values = safe(x), plain(x)
        grads = jax.grad(lambda v: safe(v).sum())(x), jax.grad(lambda v: plain(v).sum())(x)
        return values, grads

    (v_safe, v_plain), (g_safe, g_plain) = both(x)
    np.testing.assert_allclose(v_safe, v_plain, rtol=1e-15)
    np.testing.assert_allclose(g_safe, g_plain, rtol=1e-14)


# --------------------------------------------------------------------------------------------------
# 3. log det


def test_logdet_overflow(computed):
    v = computed["logdet_overflow"].values
    small, large = v["small"], v["large"]
    assert small["logdet_naive"] == -math.inf and small["grad_naive_nan_fraction"] == 1.0
    assert large["logdet_naive"] == math.inf
    assert large["grad_naive_nan_fraction"] == 0.0 and large["grad_naive_max_abs"] == 0.0  # silent
    for case in (small, large):
        assert math.isfinite(case["logdet_slogdet"])
        assert case["logdet_slogdet"] == pytest.approx(case["logdet_exact"], rel=1e-13)
        assert case["grad_slogdet_error"] < 1e-12


# --------------------------------------------------------------------------------------------------
# 4. subgradients


def test_subgradients_at_zero(computed):
    assert computed["subgradients_at_zero"].values == {"abs": 1.0, "maximum": 0.5, "relu": 0.0}


# --------------------------------------------------------------------------------------------------
# 5. MDS


def _mds_loss(W, D):
    """Σ_ij (‖W_i − W_j‖² − D_ij)², through the Gram matrix (not the broadcasting of gradlab's own)."""
    G = W @ W.T
    sq_norms = jnp.diag(G)
    return jnp.sum((sq_norms[:, None] + sq_norms[None, :] - 2.0 * G - D) ** 2)


def _mds_wrong_gradient(W, D):
    """The classic slip: 4 Σ_j r_ij (W_i − W_j) instead of 8 Σ_j r_ij (W_i − W_j)."""
    diff = W[:, None, :] - W[None, :, :]
    r = jnp.sum(diff**2, axis=-1) - D
    return 4.0 * jnp.sum(r[:, :, None] * diff, axis=1)


_A = np.random.default_rng(0).uniform(size=(5, 5))
_D = jnp.asarray((_A + _A.T) * (1.0 - np.eye(5)))  # symmetric target, zero diagonal


def _mds_of_w(W):
    return _mds_loss(W, _D)


def test_mds_factor_is_exactly_one_half(computed):
    v = computed["mds_factor"].values
    assert v["ratio"] == pytest.approx(0.5, abs=1e-12)
    assert v["spread"] < 1e-12 and v["right_error"] < 1e-12


def test_mds_factor_independent_oracle(seed):
    W = _normal(seed, (5, 2))
    auto = jax.jit(jax.grad(_mds_of_w))(W)
    np.testing.assert_allclose(
        jax.jit(_mds_wrong_gradient)(W, _D), 0.5 * auto, rtol=1e-12, atol=1e-13
    )


def test_gradient_checker_flags_the_mds_mistake(seed):
    W = _normal(seed, (5, 2))
    result = checks.gradient(_mds_of_w, W, reference=_mds_wrong_gradient(W, _D))
    assert result.ok is False
    assert "0.5" in result.message and "factor 2" in result.message, result.message
    assert checks.gradient(_mds_of_w, W, reference=2.0 * _mds_wrong_gradient(W, _D)).ok


def test_stress_at_zero_distance(computed):
    v = computed["stress_at_zero_distance"].values
    assert v["nan_fraction"] == 1.0 and np.isnan(v["grad_plain"]).all()
    assert v["safe_error"] < 1e-12


# --------------------------------------------------------------------------------------------------
# 6. inv vs solve


def test_inv_backward_error_dwarfs_solve(computed):
    v = computed["inv_vs_solve"].values
    assert v["backward_error_solve"] < 1e-15
    assert v["backward_error_inv"] > 1e-9
    assert v["backward_error_inv"] > 1e5 * v["backward_error_solve"]


def test_inv_is_harmless_when_well_conditioned():
    v = pitfalls.inv_vs_solve(cond=1e2).values
    assert v["backward_error_inv"] < 1e-13
