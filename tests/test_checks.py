"""The gradient checker against known truths: right gradients pass, the classic wrong ones are caught and
named, the difference errors have the textbook orders, and the catalog's closed forms all pass.

Test functions are module-level so that the checker's compiled function is reused across seeds.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import checks, problems
from gradlab._validate import NotScalarError, OptionError, ShapeError, UnknownNameError

EPS64 = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------------------
# Functions with hand-derived gradients
# ---------------------------------------------------------------------------------------------------


def smooth(x):
    """f(x) = Σ sin(x_i)·x_i + log Σ exp(x_i)."""
    return jnp.sum(jnp.sin(x) * x) + jax.nn.logsumexp(x)


def smooth_grad(x):
    return jnp.sin(x) + x * jnp.cos(x) + jax.nn.softmax(x)


def layer(p):
    """f(W, b) = Σ log(1 + exp(W x0 + b)) + ½‖W‖², W square (so a transpose keeps the shape).

    Written with log1p∘exp rather than jax.nn.softplus (which uses max and abs) to stay analytic.
    """
    x0 = jnp.array([1.0, -2.0, 0.5], dtype=p["W"].dtype)
    return jnp.sum(jnp.log1p(jnp.exp(p["W"] @ x0 + p["b"]))) + 0.5 * jnp.sum(p["W"] ** 2)


def layer_grad(p):
    x0 = jnp.array([1.0, -2.0, 0.5], dtype=p["W"].dtype)
    s = jax.nn.sigmoid(p["W"] @ x0 + p["b"])
    return {"W": jnp.outer(s, x0) + p["W"], "b": s}


def rect(W):
    """f(W) = Σ tanh(W) ⊙ C for a non-square W (a transposed gradient has the wrong shape)."""
    return jnp.sum(jnp.tanh(W) * jnp.arange(1.0, 1.0 + W.size).reshape(W.shape))


def analytic(x):
    """Real-analytic and complex-safe: exp, sin, division, products."""
    return jnp.sum(jnp.exp(x) * jnp.sin(x) / (1.0 + x**2))


def quartic(x):
    return jnp.sum(x**4) / 4 + jnp.sum(x[:-1] * x[1:])


def quartic_hvp(x, v):
    shifted = jnp.concatenate([v[1:], jnp.zeros(1, v.dtype)]) + jnp.concatenate(
        [jnp.zeros(1, v.dtype), v[:-1]]
    )
    return 3 * x**2 * v + shifted


def point(key, n=6, dtype=jnp.float64):
    return jax.random.normal(key, (n,), dtype)


def layer_point(key, dtype=jnp.float64):
    kw, kb = jax.random.split(key)
    return {"W": jax.random.normal(kw, (3, 3), dtype), "b": jax.random.normal(kb, (3,), dtype)}


# ---------------------------------------------------------------------------------------------------
# Right gradients pass
# ---------------------------------------------------------------------------------------------------


def test_correct_gradient_passes(key):
    check = checks.gradient(smooth, point(key), reference=smooth_grad)
    assert check.ok, check.message
    assert check.message == ""
    assert set(check.errors) == {"reverse", "forward", "forward_diff", "central_diff", "reference"}
    assert check.errors["reverse"] == 0.0
    assert check.errors["reference"] <= 1e-14
    assert set(check.tolerances) == set(check.errors)
    assert check.dtype == np.float64
    assert float(check.value) == pytest.approx(float(smooth(point(key))))
    check.raise_if_failed()


def test_correct_gradient_passes_on_a_dict_pytree(key):
    x = layer_point(key)
    check = checks.gradient(layer, x, reference=layer_grad, complex_step=True)
    assert check.ok, check.message
    for m, g in check.grads.items():
        assert jax.tree.structure(g) == jax.tree.structure(x), m
        assert g["W"].shape == (3, 3)
    assert set(check.steps) == {"forward_diff", "central_diff", "complex_step"}
    assert jax.tree.structure(check.steps["central_diff"]) == jax.tree.structure(x)


def test_reference_as_a_value_and_as_a_numpy_callable(key):
    x = point(key)
    by_value = checks.gradient(smooth, x, reference=smooth_grad(x))
    assert by_value.ok, by_value.message

    def numpy_reference(x):  # not traceable: evaluated eagerly
        x = np.asarray(x)
        e = np.exp(x - x.max())
        return np.sin(x) + x * np.cos(x) + e / e.sum()

    by_numpy = checks.gradient(smooth, x, reference=numpy_reference)
    assert by_numpy.ok, by_numpy.message


# ---------------------------------------------------------------------------------------------------
# Wrong gradients are caught and named
# ---------------------------------------------------------------------------------------------------


def test_half_gradient_is_rejected_with_the_factor(key):
    check = checks.gradient(smooth, point(key), reference=lambda x: 0.5 * smooth_grad(x))
    assert not check.ok
    assert check.errors["reference"] == pytest.approx(0.5, rel=1e-12)
    assert "reference ≈ 0.5 × reverse mode: a missing factor 2?" in check.message
    with pytest.raises(AssertionError, match="missing factor 2"):
        check.raise_if_failed()


def test_one_entry_gets_a_factor_hint_only_for_a_telling_ratio():
    # with one entry every pair of numbers is proportional: 'a missing factor 2.2?' would be noise
    f = lambda x: jnp.sum(x**3)  # noqa: E731
    x = jnp.array([0.7])
    odd = checks.gradient(f, x, reference=lambda x: 3 * x**2 / 2.2)
    assert not odd.ok and "factor" not in odd.message and "ratio 0.4545" in odd.message
    half = checks.gradient(f, x, reference=lambda x: 1.5 * x**2)
    assert "a missing factor 2?" in half.message
    flipped = checks.gradient(f, x, reference=lambda x: -3 * x**2)
    assert "sign flipped" in flipped.message
    # a subnormal gradient against 1: the ratio overflows, no hint (and no crash)
    tiny = checks.gradient(lambda z: 1e-310 * jnp.sum(z), x, reference=lambda z: jnp.ones(1))
    assert not tiny.ok and "factor" not in tiny.message


def test_bad_steps_name_the_argument():
    x = jnp.ones(3)
    with pytest.raises(OptionError, match=r"step: expected a positive finite number, got 0\.0"):
        checks.gradient(jnp.sum, x, step=0.0)
    with pytest.raises(UnknownNameError, match=r"step: unknown name 'centrl_diff'.*Did you mean"):
        checks.gradient(jnp.sum, x, step={"centrl_diff": 1e-6})
    with pytest.raises(OptionError, match=r"step\['central_diff'\]: expected a positive"):
        checks.gradient(jnp.sum, x, step={"central_diff": -1e-6})


def test_rtol_that_would_be_ignored_is_an_error(key):
    x = point(key)
    with pytest.raises(OptionError, match=r"rtol=1e-06: .*no reference= was given"):
        checks.gradient(smooth, x, rtol=1e-6)
    with pytest.raises(
        OptionError, match=r"rtol\['complex_step'\]: the method 'complex_step' is not run"
    ):
        checks.gradient(smooth, x, rtol={"complex_step": 1e-10})
    with pytest.raises(UnknownNameError, match="rtol"):
        checks.gradient(smooth, x, rtol={"centrl_diff": 1e-6})
    # what it is for: a loosened tolerance for a method that runs
    tight = checks.gradient(smooth, x, rtol={"central_diff": 1e-15})
    assert tight.tolerances["central_diff"] == 1e-15 and not tight.ok
    ref = checks.gradient(smooth, x, reference=smooth_grad, rtol=1e-6)
    assert ref.tolerances["reference"] == 1e-6 and ref.ok


def test_sign_flipped_gradient_is_rejected(key):
    check = checks.gradient(smooth, point(key), reference=lambda x: -smooth_grad(x))
    assert not check.ok
    assert "sign flipped" in check.message


def test_transposed_matrix_gradient_is_rejected(key):
    def transposed(p):
        g = layer_grad(p)
        return {"W": g["W"].T, "b": g["b"]}

    check = checks.gradient(layer, layer_point(key), reference=transposed)
    assert not check.ok
    assert "TRANSPOSE of the gradient in x['W']" in check.message
    assert "x['b']" not in check.message  # only W's entries disagree
    assert "x['W'][" in check.message


def test_transposed_shape_is_a_shape_error(key):
    W = jax.random.normal(key, (2, 3))
    with pytest.raises(ShapeError, match=r"TRANSPOSED shape \(3, 2\)"):
        checks.gradient(rect, W, reference=lambda W: jax.grad(rect)(W).T)


def test_message_names_the_disagreeing_entries(key):
    x = layer_point(key)
    good = layer_grad(x)
    bad = {"W": good["W"], "b": good["b"].at[1].add(1.0)}
    check = checks.gradient(layer, x, reference=bad)
    assert not check.ok
    assert "1 of 12 entries disagree" in check.message
    expected = float(good["b"][1])
    assert f"x['b'][1]: expected {expected:.6g} (reverse mode), got {expected + 1:.6g}" in (
        check.message
    )
    # the table lists every method with its error and tolerance, and the failing one
    table = check.table()
    assert table.splitlines()[0].split() == ["method", "rel.", "error", "tolerance", "ok"]
    assert "FAIL" in table and str(check).endswith(check.message)


def test_reference_with_the_wrong_structure_says_what_was_expected(key):
    x = layer_point(key)
    with pytest.raises(ShapeError, match="expected a pytree with the structure"):
        checks.gradient(layer, x, reference={"W": x["W"]})
    with pytest.raises(ShapeError, match=r"leaf \['b'\] has shape \(4,\), expected \(3,\)"):
        checks.gradient(layer, x, reference={"W": x["W"], "b": jnp.zeros(4)})


@jax.custom_vjp
def wrong_square(x):
    return x**2


wrong_square.defvjp(lambda x: (x**2, x), lambda x, g: (g * x,))  # wrong: d(x²) = 2x dx


def sum_wrong_square(x):
    return jnp.sum(wrong_square(x))


def test_a_wrong_ad_rule_is_caught_by_the_differences(key):
    check = checks.gradient(sum_wrong_square, point(key), complex_step=True)
    assert not check.ok
    failed = {m for m in check.errors if check.errors[m] > check.tolerances[m]}
    assert failed == {"forward_diff", "central_diff", "complex_step"}
    assert "every other method disagrees with reverse mode" in check.message
    assert "an extra factor 2" in check.message  # the differences (right) = 2 × reverse (wrong)
    # a custom_vjp has no JVP: forward mode is skipped, and said so
    assert "forward" not in check.errors
    assert "forward mode skipped: f uses a custom_vjp rule" in check.table()
    with pytest.raises(OptionError, match="custom_vjp"):
        checks.gradient(sum_wrong_square, point(key), methods=["forward"])


def test_hvp_of_a_custom_vjp_uses_reverse_over_reverse(key):
    x = point(key)
    with pytest.raises(OptionError, match="rev_rev"):
        checks.hvp(sum_wrong_square, x, "fwd_rev", key=key)
    # the wrong rule's "Hessian" is I (from g·x), consistently in both the HVP and the oracle
    result = checks.hvp(sum_wrong_square, x, "rev_rev", key=key)
    assert result.ok, result.message
    np.testing.assert_allclose(result.expected, result.v, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Accuracy of the methods: complex step and the difference orders
# ---------------------------------------------------------------------------------------------------


def test_complex_step_is_accurate_to_machine_precision(key):
    check = checks.gradient(analytic, point(key), complex_step=True)
    assert check.ok, check.message
    assert check.errors["complex_step"] <= 2e-15
    # no cancellation: far more accurate than the best difference formula
    assert check.errors["complex_step"] < 1e-3 * check.errors["central_diff"]


def test_difference_errors_have_the_predicted_order(key):
    check = checks.gradient(analytic, point(key))
    fwd, cen = check.errors["forward_diff"], check.errors["central_diff"]
    # forward: O(h) + O(ε/h) at h = √ε → ~√ε; central: O(h²) + O(ε/h) at h = ε^{1/3} → ~ε^{2/3}
    assert EPS64**0.5 / 10 <= fwd <= 100 * EPS64**0.5, fwd
    assert EPS64 ** (2 / 3) / 100 <= cen <= 100 * EPS64 ** (2 / 3), cen
    assert cen < fwd / 30


def test_complex_step_refuses_a_non_analytic_loss():
    with pytest.raises(OptionError, match="not analytic"):
        checks.gradient(lambda x: jnp.sum(jnp.abs(x)), jnp.ones(3), complex_step=True)


def test_float32_works_with_looser_tolerances(key):
    x32, x64 = point(key, dtype=jnp.float32), point(key, dtype=jnp.float64)
    c32 = checks.gradient(smooth, x32, reference=smooth_grad)
    c64 = checks.gradient(smooth, x64, reference=smooth_grad)
    assert c32.ok, c32.message
    assert c32.dtype == np.float32
    for m in c32.tolerances:
        assert c32.tolerances[m] > c64.tolerances[m], m
    assert c32.tolerances["reference"] == 1e-4 and c64.tolerances["reference"] == 1e-8
    assert c32.grads["reverse"].dtype == jnp.float32
    bad = checks.gradient(smooth, x32, reference=lambda x: 0.5 * smooth_grad(x))
    assert not bad.ok and "missing factor 2" in bad.message


# ---------------------------------------------------------------------------------------------------
# Step sweep: the measured optimum of central differences is at ε^{1/3}
# ---------------------------------------------------------------------------------------------------

SWEEP_FUNCTIONS = {
    "cubic": lambda x: jnp.sum(x**3) / 3 + jnp.sum(x),
    "tanh": lambda x: jnp.sum(jnp.tanh(x)),
    "sin_x": lambda x: jnp.sum(jnp.sin(x) * x),
    "rosenbrock": lambda x: jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2),
    "log_det": lambda x: jnp.linalg.slogdet(2 * jnp.eye(3) + jnp.outer(x[:3], x[:3]))[1],
    "exp_sin": lambda x: jnp.sum(jnp.exp(x) + jnp.sin(x)),
    "logistic": lambda x: jnp.sum(jnp.log1p(jnp.exp(-x * jnp.arange(1, 6) / 5))),
}


@jax.jit(static_argnums=0)
def _third_derivative(f, x, v):
    return jax.grad(jax.grad(jax.grad(lambda t: f(x + t * v))))(jnp.zeros((), x.dtype))


@pytest.mark.parametrize("random_direction", [False, True], ids=["ones", "random"])
def test_step_sweep_optimum_matches_theory(key, random_direction):
    """Central differences: e(h) ≈ |f'''|h²/6 + cε|f|/h is smallest at h* = (3cε|f|/|f'''|)^{1/3}.

    Honest version of "the best step is ε^{1/3}·scale": (1) for every function the measured optimum is
    within 3× of h* computed from the function's own |f| and |f'''| (by AD, c = 1); (2) for those
    functions whose value and third derivative are of one size (h* within 2× of ε^{1/3}·scale), the
    measured optimum is within 3× of ε^{1/3}·scale. Functions where they are not (exp_sin and logistic
    have |f'''| ≪ |f| here) are kept in, and only checked by (1). Measured: best/h* = 0.5-0.8 (the
    round-off constant c < 1), and best/(ε^{1/3}·scale) = 0.4-2.1 where the second claim applies.
    """
    x = 0.5 * point(key, n=5)
    one_size = 0
    for name, f in SWEEP_FUNCTIONS.items():
        sweep = checks.step_sweep(
            f, x, key=jax.random.fold_in(key, 1) if random_direction else None
        )
        v = sweep.direction
        h_theory = (3 * EPS64 * abs(float(f(x))) / abs(float(_third_derivative(f, x, v)))) ** (
            1 / 3
        )
        best, predicted = sweep.best_step["central"], sweep.predicted_step["central"]
        assert predicted == pytest.approx(EPS64 ** (1 / 3) * sweep.scale)
        assert 1 / 3 <= best / h_theory <= 3, (name, best, h_theory)
        if 1 / 2 <= h_theory / predicted <= 2:
            one_size += 1
            assert 1 / 3 <= best / predicted <= 3, (name, best, predicted)
    assert one_size >= 1  # the second claim is not vacuous (3-5 of 7 along the all-ones direction)


def test_step_sweep_kink_is_no_truncation_arm():
    """A piecewise-quadratic f: central differences are exact up to rounding until the stencil
    straddles the kink (h ≈ 0.017 here), then jump to a flat 2e-2-size error. That jump is no arm
    rising like h²: the fit must not read a truncation constant (nor an optimum at 8e-5, as it did)
    off it. Forward differences keep their slope-1 arm, b = f''/(2|D|), from the quadratic term."""

    def f(x):
        return 0.01 * jnp.sum(jax.nn.relu(x - 1.0)) + 0.05 * jnp.sum(x**2)

    for x0 in (0.99, 0.97, 0.95):  # the kink at x₀ = 1, 1 − x0 away (h·(1/√3) along the ones)
        sweep = checks.step_sweep(f, jnp.array([x0, 0.5, 0.3]))
        jump = sweep.errors["central"][sweep.steps > 0.1]
        assert np.all((1e-3 < jump) & (jump < 0.5))  # the jump is in the sweep, in the fitted range
        assert np.isnan(sweep.fit["central"][1]), x0
        # no optimum to fit: the argmin, just before the stencil reaches the kink
        argmin = sweep.steps[np.argmin(sweep.errors["central"])]
        assert sweep.best_step["central"] == argmin > 1e-3
        a, b = sweep.fit["forward"]
        second = 0.1  # f'' along v = 0.1·‖v‖²
        assert np.isfinite(a) and b == pytest.approx(second / 2 / abs(sweep.exact), rel=2e-2)


@pytest.mark.parametrize("name", ["least_squares", "quadratic", "toy_graph"])
def test_step_sweep_quadratic_central_has_no_truncation_arm(name):
    """Central differences of a quadratic are exact up to rounding: whatever the direction, the errors
    only fall as h grows, and no truncation constant may be read off a stray rounding-level point
    (at these points and directions one right-arm point of rounding noise gave b ≈ 1e-14 and a
    'best step' near the end of the sweep)."""
    p = problems.make(name, jax.random.key(0))
    for k in range(3):
        x = p.random_point(jax.random.key(k)) if p.random_point is not None else p.init
        sweep = checks.step_sweep(p.loss, x, key=jax.random.key(100 + k))
        assert np.isnan(sweep.fit["central"][1]), (name, k)
        if name != "toy_graph":  # (x + y)z is bilinear: forward differences are exact along v too
            assert np.isfinite(sweep.fit["forward"][1]), (name, k)


def test_step_sweep_table_and_shapes(key):
    sweep = checks.step_sweep(smooth, point(key), steps=np.logspace(-12, -2, 21))
    assert sweep.steps.shape == (21,)
    assert set(sweep.errors) == {"forward", "central"}
    assert sweep.exact == pytest.approx(float(jnp.vdot(smooth_grad(point(key)), sweep.direction)))
    # the V: forward is best near √ε, where central is still far from its own minimum
    assert sweep.best_step["forward"] < sweep.best_step["central"]
    table = sweep.table()
    assert "≈ best central" in table and "≈ predicted forward" in table
    with pytest.raises(OptionError, match="positive"):
        checks.step_sweep(smooth, point(key), steps=[1e-3, -1e-3])
    with pytest.raises(UnknownNameError):
        checks.step_sweep(smooth, point(key), methods=("backward",))


# ---------------------------------------------------------------------------------------------------
# HVP check
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", checks.HVP_MODES)
def test_hvp_modes_pass(key, mode):
    result = checks.hvp(quartic, point(key), mode, key=jax.random.fold_in(key, 1))
    assert result.ok, result.message
    assert result.error <= 1e-13
    assert result.mode == mode


def test_hvp_closed_form_passes_and_a_wrong_one_fails(key):
    x, v = point(key), point(jax.random.fold_in(key, 1))
    good = checks.hvp(quartic, x, quartic_hvp, v=v)
    assert good.ok, good.message
    np.testing.assert_allclose(good.value, good.expected, rtol=1e-12)

    bad = checks.hvp(quartic, x, lambda x, v: quartic_hvp(x, v) - 2 * x**2 * v, v=v)  # 3x² → x²
    assert not bad.ok
    assert "hvp check failed" in bad.message and "x[" in bad.message
    sign = checks.hvp(quartic, x, lambda x, v: -quartic_hvp(x, v), v=v)
    assert "sign flipped" in sign.message


def test_hvp_on_a_dict_pytree(key):
    result = checks.hvp(layer, layer_point(key), "rev_fwd", key=key)
    assert result.ok, result.message
    assert result.value["W"].shape == (3, 3)


def test_near_a_minimum_in_float32_a_wrong_rule_is_inconclusive_not_ok():
    # a factor-2 error in a custom rule, checked in float32 next to the minimum: the differences'
    # round-off (|f| = 1 ≫ ‖∇f‖ ≈ 1e-4) gives them tolerances > 0.1, so they cannot tell
    @jax.custom_jvp
    def f(x):
        return jnp.sum((x - 1.0) ** 2) + 1.0

    f.defjvp(lambda p, t: (f(p[0]), jnp.sum(4 * (p[0] - 1.0) * t[0])))
    x = 1.0 + 3e-5 * jnp.arange(1.0, 6.0, dtype=jnp.float32)
    check = checks.gradient(f, x)
    assert check.ok and not check.conclusive and not check.verified
    assert check.status == "inconclusive"
    assert "INCONCLUSIVE" in str(check) and "no method independent of the AD rules" in str(check)
    with pytest.raises(AssertionError, match="inconclusive"):
        check.raise_if_failed()
    check.raise_if_failed(allow_inconclusive=True)
    # away from the minimum the same rule is caught
    wrong = checks.gradient(f, x + 1.0)
    assert not wrong.ok and not wrong.verified and wrong.status == "failed"
    # a correct gradient in float64 is conclusive
    good = checks.gradient(quartic, jnp.array([1.0, -2.0, 0.5]))
    assert good.conclusive and good.verified and good.status == "ok"


def test_a_transposed_hvp_is_named_as_such():
    B = jax.random.normal(jax.random.key(1), (3, 3))
    W = jax.random.normal(jax.random.key(2), (3, 3))
    r = checks.hvp(
        lambda W: 0.5 * jnp.sum((W @ B) ** 2),  # H·V = V B Bᵀ
        W,
        lambda W, V: (V @ B @ B.T).T,
        key=jax.random.key(3),
    )
    assert not r.ok and "TRANSPOSE of the Hessian-vector product in x" in r.message
    assert "∂f/∂X_ij" not in r.message  # the gradient's hint does not apply


def test_half_precision_points_are_checked():
    check = checks.gradient(lambda x: jnp.sum(x**2), jnp.ones(3, jnp.bfloat16))
    assert check.ok and str(check.dtype) == "bfloat16" and not check.conclusive
    h = checks.hvp(
        lambda x: jnp.sum(x**3),
        jnp.ones(3, jnp.float16),
        lambda x, v: 6 * x * v,
        v=jnp.ones(3, jnp.float16),
    )
    assert h.ok and h.tolerance >= 10 * float(jnp.finfo(jnp.float16).eps)


def test_hvp_oracle_is_put_to_the_test_at_repeated_singular_values():
    # σ₁ = σ₂: JAX's SVD derivative is undefined there and jax.hessian is off, while the closed form
    # is right (it agrees with central differences of jax.grad); the failure says so
    rng = np.random.default_rng(0)
    q1 = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    q2 = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    W = jnp.asarray(q1[:, :3] @ np.diag([3.0, 3.0, 1.0]) @ q2.T)
    p = problems.make("svd_energy", jax.random.key(0), rows=5, cols=3, rank=2)
    check = checks.hvp(p.loss, W, p.hvp, key=jax.random.key(1))
    assert not check.ok and check.oracle_suspect
    assert "the oracle is suspect here" in check.message
    # a wrong closed form at a generic point is not excused
    wrong = checks.hvp(
        quartic, jnp.array([1.0, -2.0]), lambda x, v: 2 * x**2 * v, key=jax.random.key(0)
    )
    assert not wrong.ok and not wrong.oracle_suspect


def test_hvp_validation():
    with pytest.raises(OptionError, match="key"):
        checks.hvp(quartic, jnp.ones(3), "fwd_rev")
    with pytest.raises(OptionError, match="key: expected a single"):
        checks.hvp(quartic, jnp.ones(3), "fwd_rev", key=0)
    with pytest.raises(OptionError, match="key: expected a single"):
        checks.catalog(["quadratic"], key=0)
    with pytest.raises(UnknownNameError, match="fwd_rev"):
        checks.hvp(quartic, jnp.ones(3), "fwd_fwd", key=jax.random.key(0))
    with pytest.raises(ShapeError):
        checks.hvp(quartic, jnp.ones(3), "fwd_rev", v=jnp.ones(4))


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def test_non_scalar_output_is_refused():
    with pytest.raises(NotScalarError, match=r"shape \(3,\)"):
        checks.gradient(lambda x: x**2, jnp.ones(3))
    with pytest.raises(NotScalarError, match="complex"):
        checks.gradient(lambda x: jnp.sum(x) * 1j, jnp.ones(3))


def test_unknown_method_is_refused():
    with pytest.raises(UnknownNameError, match="Did you mean 'central_diff'"):
        checks.gradient(smooth, jnp.ones(3), methods=["central_dif"])
    with pytest.raises(OptionError, match="no reference was given"):
        checks.gradient(smooth, jnp.ones(3), methods=["reference"])


def test_methods_subset_and_step(key):
    x = point(key)
    check = checks.gradient(smooth, x, methods=["central_diff"], step=1e-4)
    assert set(check.errors) == {"reverse", "central_diff"}
    h = check.steps["central_diff"]
    np.testing.assert_allclose(h, 1e-4 * jnp.maximum(1.0, jnp.abs(x)), rtol=1e-10)


def test_non_differentiable_point_and_stationary_point():
    check = checks.gradient(jnp.linalg.norm, jnp.zeros(3))  # jax.grad(norm)(0) = NaN
    assert not check.ok
    assert "the reverse-mode gradient (the baseline) has 3 non-finite entries" in check.message
    # at a stationary point the errors are absolute, and the right gradient (zero) still passes
    flat = checks.gradient(lambda x: jnp.sum(x**2), jnp.zeros(3))
    assert flat.ok, flat.message


def test_integer_point_is_refused():
    with pytest.raises(OptionError, match="floating"):
        checks.gradient(smooth, jnp.arange(3))


def test_second_call_does_not_retrace(key):
    traces = []

    def f(x):
        traces.append(1)
        return jnp.sum(jnp.cos(x) ** 2)

    checks.gradient(f, point(key), complex_step=True)
    n = len(traces)
    checks.gradient(f, point(jax.random.fold_in(key, 1)), complex_step=True)
    assert len(traces) == n


# ---------------------------------------------------------------------------------------------------
# The catalog: every problem's closed forms pass (parametrised so that pytest-xdist can spread them)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", problems.names())
def test_catalog_problem_passes(name):
    result = checks.catalog([name], key=jax.random.key(0))
    row = result.rows[0]
    assert row.name == name
    assert result.ok, result.table()
    assert row.errors["reference"] <= 1e-10
    assert row.hvp_error is None or row.hvp_error <= row.hvp_tolerance


def test_catalog_table_columns():
    result = checks.catalog(["quadratic", "log_det"], key=jax.random.key(0))
    lines = result.table().splitlines()
    assert lines[0].split() == [
        "problem",
        "reverse",
        "forward",
        "forward_diff",
        "central_diff",
        "complex_step",
        "reference",
        "hvp",
        "ok",
    ]
    assert [r.name for r in result.rows] == ["quadratic", "log_det"]
    log_det = lines[3].split()
    assert log_det[0] == "log_det" and log_det[5] == "-"  # not analytic: no complex step
    assert lines[-1] == "2 of 2 problems ok (float64)."
    with pytest.raises(UnknownNameError):
        checks.catalog(["quadratc"], key=jax.random.key(0))


def test_catalog_in_float32():
    result = checks.catalog(["quadratic", "log_det"], key=jax.random.key(0), dtype="float32")
    assert result.ok, result.table()
    assert result.table().splitlines()[-1] == "2 of 2 problems ok (float32)."
    assert 1e-9 < result.rows[0].errors["reference"] <= 1e-4  # float32 rounding, float32 tolerance


def test_catalog_reports_a_wrong_problem_and_a_broken_one(monkeypatch):
    def half_gradient(key, /, *, dim=4):
        good = problems.make("quadratic", key, dim=dim)
        return dataclasses.replace(good, name="zz_half", grad=lambda x: 0.5 * good.grad(x))

    def broken(key, /):
        raise RuntimeError("boom")

    monkeypatch.setitem(problems._REGISTRY, "zz_half", half_gradient)
    monkeypatch.setitem(problems._REGISTRY, "zz_broken", broken)
    result = checks.catalog(["quadratic", "zz_half", "zz_broken"], key=jax.random.key(0))
    assert not result.ok
    assert [r.ok for r in result.rows] == [True, False, False]
    table = result.table()
    assert "1 of 3 problems ok (float64)." in table
    assert "zz_half:\ngradient check failed: reference disagrees" in table
    assert "reference ≈ 0.5 × reverse mode: a missing factor 2?" in table
    assert "zz_broken:\nerror: RuntimeError: boom" in table


def test_difference_batches_are_wide_off_the_cpu(monkeypatch):
    """Chunks of 4 coordinates on the CPU backend (batched LAPACK deadlocked beyond ~30 there), 64
    elsewhere; the numbers do not depend on the chunking."""
    monkeypatch.setattr(checks.jax, "default_backend", lambda: "cpu")
    assert checks._chunk() == 4
    x = jnp.linspace(0.1, 1.0, 11)
    cpu = checks.gradient(lambda z: jnp.sum(jnp.sin(z) * z), x)
    monkeypatch.setattr(checks.jax, "default_backend", lambda: "gpu")
    assert checks._chunk() == 64
    wide = checks.gradient(lambda z: jnp.sum(jnp.sin(z) * z), x)  # a new f: traced again
    for m in cpu.errors:
        assert wide.errors[m] == pytest.approx(cpu.errors[m], rel=1e-6, abs=1e-18), m


def test_checks_trace_f_with_full_float32_matrix_products():
    """The checks hold float32 results to float32 tolerances, so they run f with float32 matrix
    products in full precision (a GPU's default is TF32), also under a coarser user setting."""
    seen = []

    def f(x):
        seen.append(str(jax.config.jax_default_matmul_precision))
        return jnp.sum(jnp.sin(x) * x)

    x = jnp.array([0.5, -1.0, 2.0])
    with jax.default_matmul_precision("bfloat16"):
        assert checks.gradient(f, x).ok
        assert checks.hvp(f, x, "fwd_rev", key=jax.random.key(0)).ok
        checks.step_sweep(f, x, key=jax.random.key(1))
        assert str(jax.config.jax_default_matmul_precision) == "bfloat16"
    assert seen and set(seen) == {"highest"}, seen


def test_complex_step_runs_one_coordinate_at_a_time_off_the_cpu(monkeypatch):
    """Vmapped complex steps lost their imaginary part on XLA:GPU; off the CPU the coordinates go
    through a plain scan, with the same numbers."""
    calls = []
    real = checks._map_coords

    def spy(body, n, **kw):
        calls.append(kw.get("one_at_a_time", False))
        return real(body, n, **kw)

    monkeypatch.setattr(checks, "_map_coords", spy)
    x = jnp.linspace(0.1, 1.0, 7)
    monkeypatch.setattr(checks.jax, "default_backend", lambda: "cpu")
    cpu = checks.gradient(lambda z: jnp.sum(jnp.sin(z) * z), x, complex_step=True)
    monkeypatch.setattr(checks.jax, "default_backend", lambda: "gpu")
    gpu = checks.gradient(lambda z: jnp.sum(jnp.sin(z) * z), x, complex_step=True)
    plain = checks.gradient(lambda z: jnp.sum(jnp.sin(z) * z), x)  # no complex step: vmapped
    assert calls == [False, False, True, False]  # off the CPU: the others vmapped, then the step
    assert cpu.ok and gpu.ok and plain.ok
    assert gpu.errors["complex_step"] == pytest.approx(cpu.errors["complex_step"], abs=1e-15)


def test_catalog_workers_check_in_full_float32_matrix_products(monkeypatch):
    """The precision setting is thread-local: the catalog's worker threads set it themselves (the
    global setting here is bfloat16, which a thread would otherwise inherit)."""
    seen = []
    real = checks._core

    def spy(*args, **kwargs):
        seen.append(str(jax.config.jax_default_matmul_precision))
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "_core", spy)
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "bfloat16")
    try:
        out = checks.catalog(["quadratic", "log_det"], key=jax.random.key(0), workers=2)
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    assert out.ok and seen == ["highest", "highest"], seen
