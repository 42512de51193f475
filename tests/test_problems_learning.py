"""The learning losses and the worked examples: hand-derived gradients and HVPs against JAX's AD,
the published numbers of the lecture notes, the Schwarz counterexample, solutions and constants.

The registry-wide contracts (every problem × seeds × dtypes) live in test_problems.py; this file holds
what is specific to these nine problems. Their ``loss``/``grad``/``hvp`` are ``jax.tree_util.Partial``
pytrees, so the oracles below take them as arguments of jitted functions and compile once per problem
and shape, not once per seed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from gradlab import problems
from gradlab._validate import OptionError
from gradlab.problems._worked import schwarz_mixed_partials

LEARNING = [
    "softmax_cross_entropy",
    "logistic_regression",
    "multiclass_svm",
    "mlp",
    "mlp_classifier",
]
WORKED = ["toy_graph", "sigmoid_neuron", "forward_mode_example", "schwarz"]
NAMES = LEARNING + WORKED
DICT_PARAMS = ["softmax_cross_entropy", "mlp", "mlp_classifier", "toy_graph", "sigmoid_neuron"]
ANALYTIC = ["mlp", "toy_graph", "sigmoid_neuron", "forward_mode_example"]

_CACHE: dict = {}


def build(name, seed=0, **opts):
    """problems.make, memoised: instances are deterministic in (name, key, options)."""
    tag = (name, seed, tuple(sorted(opts.items())))
    if tag not in _CACHE:
        _CACHE[tag] = problems.make(name, jax.random.key(seed), **opts)
    return _CACHE[tag]


def flat(tree):
    """The leaves of ``tree`` ravelled into one float64 NumPy vector (in ``ravel_pytree`` order)."""
    return np.concatenate(
        [np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)]
    )


def rel(a, b):
    a, b = flat(a), flat(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# The oracles are jitted functions that take the problem's Partials as arguments: post-processing is
# NumPy, so each problem compiles a handful of programs in all (XLA compile time dominates here).


@jax.jit
def first_order(p_loss, p_grad, p_hvp, x):
    """(loss, closed-form grad, jax.grad, hvp(x, x) or None)."""
    hvp = None if p_hvp is None else p_hvp(x, x)
    return p_loss(x), p_grad(x), jax.grad(p_loss)(x), hvp


def evaluate(p, x):
    """(loss as a float, closed-form grad, jax.grad) at ``x``."""
    loss, grad, reference, _ = first_order(p.loss, p.grad, None, x)
    return float(loss), grad, reference


@jax.jit
def ad_grad(loss, x):
    return jax.grad(loss)(x)


@jax.jit
def ad_hessian(loss, x):
    """The dense Hessian of ``loss`` at ``x``, over the ravelled parameters."""
    theta, unravel = ravel_pytree(x)
    return jax.hessian(lambda t: loss(unravel(t)))(theta)


@jax.jit
def oracles(p_loss, p_grad, p_hvp, x, v_flat):
    """Closed forms and AD in one compilation: (grad, jax.grad, hvp or None, dense Hessian)."""
    theta, unravel = ravel_pytree(x)
    hvp = None if p_hvp is None else p_hvp(x, unravel(v_flat))
    H = jax.hessian(lambda t: p_loss(unravel(t)))(theta)
    return p_grad(x), jax.grad(p_loss)(x), hvp, H


@jax.jit
def vmap_hessian(loss, xs):
    return jax.vmap(jax.hessian(loss))(xs)


def normal_like(x, seed):
    """A standard normal vector with the size and dtype of the ravelled ``x`` (NumPy: no compile)."""
    theta = ravel_pytree(x)[0]
    return jnp.asarray(np.random.default_rng(seed).standard_normal(theta.shape), theta.dtype)


@jax.jit
def complex_step_derivative(loss, x, v_flat):
    """``Im f(x + ihv)/h``: the directional derivative, free of cancellation (for analytic ``f``)."""
    h = 1e-30
    theta, unravel = ravel_pytree(x)
    xc = jax.tree.map(lambda a, b: a + 1j * h * b, x, unravel(v_flat.astype(theta.dtype)))
    return jnp.imag(loss(xc)) / h


# ---------------------------------------------------------------------------------------------------
# Closed forms against AD
# ---------------------------------------------------------------------------------------------------


def test_problem_functions_are_partials():
    for name in NAMES:
        p = build(name)
        for f in (p.loss, p.grad, p.hvp):
            assert f is None or isinstance(f, Partial)


@pytest.mark.parametrize("name", NAMES)
def test_closed_forms_match_jax_grad_and_dense_hessian(name, seed, key):
    p = build(name, seed)
    x = p.random_point(jax.random.fold_in(key, 7))
    v = normal_like(x, seed)
    grad, reference, hvp, H = oracles(p.loss, p.grad, p.hvp, x, v)
    assert rel(grad, reference) <= 1e-10
    if p.hvp is None:
        return
    H = np.asarray(H)
    assert rel(hvp, H @ np.asarray(v)) <= 1e-10
    eig = np.linalg.eigvalsh(H)
    if p.smoothness is not None:
        assert np.abs(eig).max() <= p.smoothness * (1 + 1e-10)
    if p.strong_convexity is not None:
        assert eig.min() >= p.strong_convexity * (1 - 1e-10)


@pytest.mark.parametrize("name", ANALYTIC)
def test_analytic_problems_pass_the_complex_step(name, key):
    p = build(name)
    assert p.analytic
    x = p.random_point(jax.random.fold_in(key, 7))
    v = normal_like(x, 9)
    expected = float(flat(evaluate(p, x)[1]) @ np.asarray(v))
    np.testing.assert_allclose(float(complex_step_derivative(p.loss, x, v)), expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Learning problems: solutions, data, subgradients
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "opts"), [("logistic_regression", {}), ("softmax_cross_entropy", {"l2": 0.05})]
)
def test_newton_solution_is_stationary(name, opts, seed, key):
    p = build(name, seed, **opts)
    assert p.solution is not None and p.strong_convexity == opts.get("l2", 0.1)
    loss, grad, _ = evaluate(p, p.solution)
    assert np.linalg.norm(flat(grad)) <= 1e-12
    np.testing.assert_allclose(loss, p.min_value, rtol=1e-14)
    for i in range(3):
        assert evaluate(p, p.random_point(jax.random.fold_in(key, i)))[0] >= p.min_value


def test_unregularised_glms_have_no_solution_or_strong_convexity():
    for name in ("softmax_cross_entropy", "logistic_regression"):
        p = build(name, l2=0.0)
        assert p.solution is None and p.min_value is None and p.strong_convexity is None


def test_glm_losses_at_zero_are_log_of_the_number_of_classes():
    p = build("softmax_cross_entropy")
    np.testing.assert_allclose(evaluate(p, p.init)[0], math.log(3), rtol=1e-14)
    q = build("logistic_regression")
    np.testing.assert_allclose(evaluate(q, q.init)[0], math.log(2), rtol=1e-14)
    np.testing.assert_array_equal(q.data["t"], 2 * np.asarray(q.data["y"]) - 1)
    assert set(np.unique(q.data["y"])) <= {0.0, 1.0}


def test_logistic_intercept_is_a_column_of_ones():
    p = build("logistic_regression")
    assert p.options["intercept"] and p.init.shape == (11,)
    np.testing.assert_array_equal(p.data["X"][:, -1], 1.0)
    assert build("logistic_regression", intercept=False, l2=0.0).init.shape == (10,)


def test_softmax_is_stable_for_huge_logits():
    p = build("softmax_cross_entropy")
    x = jax.tree.map(lambda a: 1e4 * a, p.random_point(jax.random.key(5)))
    loss, grad, _ = evaluate(p, x)
    assert np.isfinite(loss) and np.all(np.isfinite(flat(grad)))


def test_svm_hand_gradient_is_a_subgradient(key):
    p = build("multiclass_svm")
    W = p.random_point(jax.random.fold_in(key, 1))
    f, g, _ = evaluate(p, W)
    for i in range(5):
        V = p.random_point(jax.random.fold_in(key, 10 + i))
        assert evaluate(p, V)[0] >= f + float(flat(g) @ (flat(V) - flat(W))) - 1e-12


def test_svm_at_zero_every_margin_is_active():
    p = build("multiclass_svm")
    c, n = p.options["num_classes"], p.options["num_samples"]
    loss, grad, reference = evaluate(p, p.init)
    assert loss == pytest.approx((c - 1) * p.options["margin"], rel=1e-14)
    X, Y = np.asarray(p.data["X"]), np.asarray(p.data["Y"])
    expected = X.T @ (1 - Y - (c - 1) * Y) / n  # +x_i for j ≠ y_i, −(c−1)x_i for j = y_i
    assert rel(grad, expected) <= 1e-14
    assert rel(grad, reference) <= 1e-14  # no kink at W = 0


def test_mlp_teacher_attains_zero_and_noise_removes_the_known_minimum():
    p = build("mlp")
    assert p.min_value == 0.0 and p.solution is None
    loss, grad, _ = evaluate(p, p.data["teacher"])
    assert loss <= 1e-30 and np.linalg.norm(flat(grad)) <= 1e-15
    q = build("mlp", noise=0.1)
    assert q.min_value is None and evaluate(q, q.data["teacher"])[0] > 0


def _mlpc_forward_numpy(p, x):
    """The classifier's forward pass in float64 NumPy, independent of JAX: (A1, Z2, softmax(Z2))."""
    x = {k: np.asarray(v, np.float64) for k, v in x.items()}
    A1 = np.tanh(np.asarray(p.data["X"]) @ x["W1"] + x["b1"])
    Z2 = A1 @ x["W2"] + x["b2"]
    E = np.exp(Z2 - Z2.max(axis=1, keepdims=True))
    return A1, Z2, E / E.sum(axis=1, keepdims=True)


def test_mlp_classifier_output_error_is_softmax_minus_labels(key):
    p = build("mlp_classifier")
    x = p.random_point(jax.random.fold_in(key, 3))
    A1, _, P = _mlpc_forward_numpy(p, x)
    Y, n = np.asarray(p.data["Y"]), p.options["num_samples"]
    G = (P - Y) / n  # BP1 at the logits: no softmax-derivative factor
    loss, grad, reference = evaluate(p, x)
    np.testing.assert_allclose(loss, -np.sum(Y * np.log(P)) / n, rtol=1e-13)
    for g in (grad, reference):
        np.testing.assert_allclose(g["b2"], G.sum(axis=0), rtol=1e-11, atol=1e-15)
        np.testing.assert_allclose(g["W2"], A1.T @ G, rtol=1e-11, atol=1e-15)
        D1 = (G @ np.asarray(x["W2"]).T) * (1 - A1 * A1)
        np.testing.assert_allclose(g["W1"], np.asarray(p.data["X"]).T @ D1, rtol=1e-11, atol=1e-15)


def test_mlp_classifier_at_zero_and_weight_decay(key):
    p = build("mlp_classifier", num_classes=4)
    zero = jax.tree.map(jnp.zeros_like, p.init)
    loss, grad, _ = evaluate(p, zero)
    np.testing.assert_allclose(loss, math.log(4), rtol=1e-14)
    for part in ("W1", "b1", "W2"):  # A1 = 0 and W2 = 0: only the output bias moves
        np.testing.assert_array_equal(grad[part], 0.0)
    np.testing.assert_allclose(grad["b2"], np.mean(0.25 - np.asarray(p.data["Y"]), axis=0))
    q = build("mlp_classifier", num_classes=4, l2=0.3)
    x = p.random_point(key)
    (f0, g0, _), (f1, g1, _) = evaluate(p, x), evaluate(q, x)
    np.testing.assert_allclose(f1 - f0, 0.15 * float(flat(x) @ flat(x)), rtol=1e-12)
    np.testing.assert_allclose(flat(g1) - flat(g0), 0.3 * flat(x), rtol=1e-10, atol=1e-15)


def test_mlp_classifier_labels_follow_the_teacher_and_hessian_is_indefinite(key):
    p = build("mlp_classifier", noise=0.0)
    labels, Y = np.asarray(p.data["labels"]), np.asarray(p.data["Y"])
    np.testing.assert_array_equal(Y, np.eye(3)[labels])
    assert np.bincount(labels, minlength=3).min() > 0
    _, F, _ = _mlpc_forward_numpy(p, p.data["teacher"])  # noiseless: the centred teacher's argmax
    np.testing.assert_array_equal(labels, np.argmax(F - F.mean(axis=0), axis=1))
    noisy = np.asarray(build("mlp_classifier").data["labels"])  # same key, same X and teacher
    assert 0.5 < np.mean(noisy == labels) < 1.0
    _, _, _, H = oracles(p.loss, p.grad, p.hvp, p.init, normal_like(p.init, 0))
    eig = np.linalg.eigvalsh(np.asarray(H))
    assert eig.min() < -1e-3 < 1e-3 < eig.max()  # a non-convex loss: negative curvature at init


@pytest.mark.parametrize("name", LEARNING)
def test_instances_depend_on_the_key_only_through_the_draws(name):
    a, b, c = build(name, 1), problems.make(name, jax.random.key(1)), build(name, 2)
    np.testing.assert_array_equal(a.data["X"], b.data["X"])
    assert not np.array_equal(a.data["X"], c.data["X"])
    assert a.options["dtype"] == "float64" and isinstance(a.options["num_samples"], int)


# ---------------------------------------------------------------------------------------------------
# Worked examples: the published numbers
# ---------------------------------------------------------------------------------------------------


def test_toy_graph_published_numbers():
    p = build("toy_graph")
    loss, grad, reference = evaluate(p, p.init)
    assert loss == p.data["published_value"] == -12.0
    for g in (grad, reference):
        assert {k: float(v) for k, v in g.items()} == p.data["published_grad"]
    assert float(p.init["x"]) + float(p.init["y"]) == p.data["published_q"]
    assert p.smoothness == pytest.approx(math.sqrt(2))


def test_sigmoid_neuron_published_numbers():
    p = build("sigmoid_neuron")
    tol = 0.5 * 10.0 ** -p.data["published_decimals"]
    s, grad, reference = evaluate(p, p.init)
    assert abs(s - p.data["published_value"]) <= tol
    assert abs(s * (1 - s) - p.data["published_local_grad"]) <= tol
    for g in (grad, reference):
        for part in ("w", "x"):
            np.testing.assert_allclose(g[part], p.data["published_grad"][part], atol=tol)


def test_forward_mode_example_numbers_and_modes():
    p = build("forward_mode_example")
    d = p.data
    assert d["point"] == (2.0, 3.0) and tuple(p.init.tolist()) == d["point"]
    loss, grad, _ = evaluate(p, p.init)
    np.testing.assert_allclose(loss, d["value"], rtol=1e-15)
    np.testing.assert_allclose(grad, d["grad"], rtol=1e-15)
    assert round(d["value"], 6) == 3.521468
    assert [round(g, 6) for g in d["grad"]] == [2.020101, 0.933485]
    # forward mode: one JVP per input seed gives one partial each, = the tangent of v2 + v3
    jvps = jax.jit(jax.vmap(lambda f, x, e: jax.jvp(f, (x,), (e,))[1], (None, None, 0)))
    dL = np.asarray(jvps(p.loss, p.init, jnp.eye(2)))
    for i, tangents in enumerate((d["tangents_w1"], d["tangents_w2"])):
        np.testing.assert_allclose(dL[i], tangents["v2"] + tangents["v3"], rtol=1e-14)
        np.testing.assert_allclose(dL[i], d["grad"][i], rtol=1e-14)
    # reverse mode: the adjoint of v1 times dv1/dw1 = 1/w1 is ∂L/∂w1
    np.testing.assert_allclose(d["adjoints"]["v1"] / 2.0, d["grad"][0], rtol=1e-15)


def test_forward_mode_random_points_stay_in_the_domain(key):
    p = build("forward_mode_example")
    for i in range(20):
        w = np.asarray(p.random_point(jax.random.fold_in(key, i)))
        assert w[0] > 1 and w[1] > 0
        assert np.isfinite(evaluate(p, jnp.asarray(w))[0])


# ---------------------------------------------------------------------------------------------------
# Schwarz
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [1e-1, 1e-3, 1e-6])
def test_schwarz_mixed_partials_differ(h):
    m = schwarz_mixed_partials(h=h)
    assert m.fxy == pytest.approx(-1.0, abs=1e-9)
    assert m.fyx == pytest.approx(1.0, abs=1e-9)
    published = build("schwarz").data["published_mixed_partials"]
    assert (m.fxy, m.fyx) == pytest.approx((published["fxy"], published["fyx"]))


def test_schwarz_helper_validates_h():
    with pytest.raises(OptionError, match="h:"):
        schwarz_mixed_partials(h=0.0)


def test_schwarz_at_and_near_the_origin():
    p = build("schwarz")
    zero = jnp.zeros(2)
    grad, reference, _, H = oracles(p.loss, p.grad, None, zero, zero)
    assert evaluate(p, zero)[0] == 0.0
    np.testing.assert_array_equal(grad, [0.0, 0.0])
    np.testing.assert_array_equal(reference, [0.0, 0.0])
    # JAX's answer at the origin: the Hessian of the constant branch (stated in the docstring)
    np.testing.assert_array_equal(H, p.data["jax_hessian_at_origin"])
    # near the origin the (symmetric) Hessian has off-diagonal +1 on the x-axis and −1 on the y-axis
    H = vmap_hessian(p.loss, jnp.array([[1e-3, 0.0], [0.0, 1e-3], [-1e-300, 0.0], [0.0, -1e-300]]))
    for i in (0, 2):
        np.testing.assert_allclose(H[i], [[0, 1], [1, 0]], atol=1e-12)
        np.testing.assert_allclose(H[i + 1], [[0, -1], [-1, 0]], atol=1e-12)
    # tiny nonzero points do not underflow into 0/0: f_y(t, 0) = t and f_x(0, t) = −t
    _, grad, reference = evaluate(p, jnp.array([1e-300, 0.0]))
    np.testing.assert_array_equal(grad, [0.0, 1e-300])
    np.testing.assert_array_equal(reference, [0.0, 1e-300])
    # the same mixed partials from jax.grad along the axes, by central differences
    h = 1e-4
    g = np.asarray(
        jax.jit(jax.vmap(ad_grad, (None, 0)))(
            p.loss, jnp.array([[0.0, h], [0.0, -h], [h, 0.0], [-h, 0.0]])
        )
    )
    assert (g[0, 0] - g[1, 0]) / (2 * h) == pytest.approx(-1.0, abs=1e-9)
    assert (g[2, 1] - g[3, 1]) / (2 * h) == pytest.approx(1.0, abs=1e-9)


def test_schwarz_init_and_smoothness():
    p = build("schwarz")
    loss, grad, _ = evaluate(p, p.init)
    np.testing.assert_allclose(loss, p.data["value_at_init"], rtol=1e-15)
    np.testing.assert_allclose(grad, p.data["grad_at_init"], rtol=1e-14)
    assert p.hvp is None and not p.analytic and p.smooth
    theta = np.linspace(0, np.pi / 2, 41)  # the Hessian has degree 0 and period π/2 in θ
    H = vmap_hessian(p.loss, jnp.asarray(np.stack([np.cos(theta), np.sin(theta)], axis=1)))
    worst = np.abs(np.linalg.eigvalsh(np.asarray(H))).max()
    assert worst == pytest.approx(p.smoothness, rel=1e-12)  # attained where sin 4θ = ±1


# ---------------------------------------------------------------------------------------------------
# jit, dtypes, options
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DICT_PARAMS)
def test_dict_parameter_problems_under_jit(name, key):
    p = build(name)
    assert isinstance(p.init, dict)
    x = p.random_point(key)
    v = p.random_point(jax.random.fold_in(key, 1))
    _, reference, _, H = oracles(p.loss, p.grad, p.hvp, x, ravel_pytree(v)[0])
    loss, grad, hvp = jax.jit(lambda x, v: (p.loss(x), p.grad(x), p.hvp(x, v)))(x, v)
    assert rel(grad, reference) <= 1e-10
    assert rel(hvp, np.asarray(H) @ flat(v)) <= 1e-10
    np.testing.assert_allclose(float(loss), evaluate(p, x)[0], rtol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_float32_builds(name):
    p = build(name, dtype="float32")
    assert p.options["dtype"] == "float32"
    x = p.random_point(jax.random.key(1))
    loss, grad, reference, hvp = first_order(p.loss, p.grad, p.hvp, x)
    outputs = [p.init, x, loss, grad, hvp, p.solution]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(outputs))
    assert rel(grad, reference) <= 1e-4
    for field in ("min_value", "smoothness", "strong_convexity"):
        assert getattr(p, field) is None or type(getattr(p, field)) is float


@pytest.mark.parametrize(
    ("name", "opts", "option"),
    [
        ("softmax_cross_entropy", {"dim": 0}, "dim"),
        ("softmax_cross_entropy", {"num_classes": 1}, "num_classes"),
        ("softmax_cross_entropy", {"l2": -1.0}, "l2"),
        ("logistic_regression", {"num_samples": 2.5}, "num_samples"),
        ("logistic_regression", {"l2": float("nan")}, "l2"),
        ("logistic_regression", {"intercept": "yes"}, "intercept"),
        ("multiclass_svm", {"margin": 0.0}, "margin"),
        ("multiclass_svm", {"reg": "big"}, "reg"),
        ("mlp", {"hidden": 0}, "hidden"),
        ("mlp", {"in_dim": True}, "in_dim"),
        ("mlp", {"noise": -0.1}, "noise"),
        ("mlp", {"dtype": "int32"}, "dtype"),
        ("mlp_classifier", {"num_classes": 1}, "num_classes"),
        ("mlp_classifier", {"l2": -1.0}, "l2"),
        ("mlp_classifier", {"noise": float("inf")}, "noise"),
        ("toy_graph", {"dtype": "complex64"}, "dtype"),
        ("schwarz", {"x": 1.0}, "x"),
    ],
)
def test_bad_options_name_the_option(name, opts, option):
    with pytest.raises(OptionError, match=rf"\b{option}\b"):
        problems.make(name, jax.random.key(0), **opts)


@pytest.mark.parametrize("name", NAMES)
def test_descriptions_and_flags(name):
    p = build(name)
    assert problems.describe(name) and p.description and p.reference
    assert p.options["dtype"] == "float64"
    assert p.smooth is (name != "multiclass_svm")
    assert p.analytic is (name in ANALYTIC)
