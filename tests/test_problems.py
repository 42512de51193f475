"""The catalog as a registry: every problem × seeds × dtypes against the AD oracles.

Problem-specific facts (published numbers, solutions, constants) live in test_problems_matrix.py and
test_problems_learning.py; this file holds what every problem must satisfy, so a new problem is tested the
moment it is registered.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import problems
from gradlab._validate import OptionError, UnknownNameError

NAMES = problems.names()
REQUIRED = {
    "quadratic", "log_quadratic", "log_det", "least_squares", "mds", "nuclear_norm", "svd_energy",
    "linear_solve", "softmax_cross_entropy", "logistic_regression", "multiclass_svm", "mlp",
    "toy_graph", "sigmoid_neuron", "forward_mode_example", "schwarz",
}  # fmt: skip


def rel(a, b):
    a, _ = ravel_pytree(a)
    b, _ = ravel_pytree(b)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-300))


def test_required_names_are_registered():
    assert REQUIRED <= set(NAMES), f"missing: {sorted(REQUIRED - set(NAMES))}"


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_gradient_matches_reverse_mode(name, key):
    p = problems.make(name, key)
    x = p.random_point(jax.random.fold_in(key, 7))
    assert rel(jax.jit(p.grad)(x), jax.jit(jax.grad(p.loss))(x)) <= 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_hvp_matches_dense_hessian(name, key):
    p = problems.make(name, key)
    if p.hvp is None:
        pytest.skip(f"{name} has no closed-form HVP")
    x = p.random_point(jax.random.fold_in(key, 7))
    flat, unravel = ravel_pytree(x)
    v = unravel(jax.random.normal(jax.random.fold_in(key, 8), flat.shape, flat.dtype))
    dense = jax.jit(jax.hessian(lambda z: p.loss(unravel(z))))(flat)
    assert rel(jax.jit(p.hvp)(x, v), unravel(dense @ ravel_pytree(v)[0])) <= 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_problem_fields_are_consistent(name):
    p = problems.make(name, jax.random.key(0))
    assert p.name == name
    assert jax.tree.structure(p.init) == jax.tree.structure(p.random_point(jax.random.key(1)))
    assert np.shape(p.loss(p.init)) == ()
    assert jax.tree.structure(p.grad(p.init)) == jax.tree.structure(p.init)
    for field in ("min_value", "smoothness", "strong_convexity"):
        value = getattr(p, field)
        assert value is None or isinstance(value, float), f"{field} should be a float or None"
    if p.smoothness is not None and p.strong_convexity is not None:
        assert 0 < p.strong_convexity <= p.smoothness
    if p.solution is not None and p.min_value is not None:
        np.testing.assert_allclose(float(p.loss(p.solution)), p.min_value, rtol=1e-8, atol=1e-10)
    assert p.description and p.reference


@pytest.mark.parametrize("name", NAMES)
def test_instances_are_deterministic_in_the_key(name):
    a = problems.make(name, jax.random.key(3))
    b = problems.make(name, jax.random.key(3))
    np.testing.assert_array_equal(ravel_pytree(a.init)[0], ravel_pytree(b.init)[0])
    x = a.random_point(jax.random.key(4))
    assert float(a.loss(x)) == float(b.loss(x))


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_grad_compile_once(name):
    p = problems.make(name, jax.random.key(0))
    traces = 0

    def counted(x):
        nonlocal traces
        traces += 1
        return p.loss(x), p.grad(x)

    f = jax.jit(counted)
    for i in range(3):
        f(p.random_point(jax.random.key(i)))
    assert traces == 1


@pytest.mark.parametrize("name", NAMES)
def test_float32_instances(name):
    if "dtype" not in problems.options(name):
        pytest.skip(f"{name} has no dtype option")
    p = problems.make(name, jax.random.key(0), dtype="float32")
    x = p.random_point(jax.random.key(1))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(x))
    assert rel(jax.jit(p.grad)(x), jax.jit(jax.grad(p.loss))(x)) <= 1e-4


def test_dict_parameter_problems_exist():
    dict_problems = [n for n in NAMES if isinstance(problems.make(n, jax.random.key(0)).init, dict)]
    assert {"mlp", "linear_solve", "softmax_cross_entropy"} <= set(dict_problems)


def test_unknown_problem_is_a_clear_error():
    with pytest.raises(
        UnknownNameError, match=r"problem: unknown name 'quadratc'.*Did you mean 'quadratic'"
    ):
        problems.make("quadratc", jax.random.key(0))
    with pytest.raises(OptionError, match=r"key: expected a single jax.random.key\(seed\)"):
        problems.make("quadratic", 0)
    with pytest.raises(OptionError, match=r"key: problem 'quadratic' needs an explicit PRNG key"):
        problems.make("quadratic", None)


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(OptionError, match=r"unknown option 'dimm'.*dim=10"):
        problems.make("least_squares", jax.random.key(0), dimm=3)


@pytest.mark.parametrize("name", NAMES)
def test_factories_take_options_keyword_only(name):
    params = list(inspect.signature(problems._REGISTRY[name]).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_ONLY
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])


# Where the Hessian attains the constants, they must be attained: an L twice too large halves every
# theory step (1/L) silently, and an upper-bound test alone cannot see it.
TIGHT = [  # (problem, options, the point where the extreme curvature is attained)
    ("quadratic", {}, "init"),  # constant Hessian: L = λ_max, μ = λ_min everywhere
    ("least_squares", {}, "init"),
    ("least_squares", {"dim": 7, "num_samples": 30}, "init"),
    (
        "logistic_regression",
        {},
        "zero",
    ),  # σ'(0) = 1/4 is the largest: L = σ_max(X)²/(4n) + l2 at w = 0
    ("toy_graph", {}, "init"),
    # two classes: the softmax Hessian's top eigenvalue 1/2 (at equal logits, at W = 0) is attained,
    # L = σ_max(X)²/(2n)
    ("softmax_cross_entropy", {"num_classes": 2}, "zero"),
]


@pytest.mark.parametrize(("name", "opts", "where"), TIGHT, ids=lambda v: str(v))
def test_smoothness_is_attained(name, opts, where):
    p = problems.make(name, jax.random.key(3), **opts)
    flat, unravel = ravel_pytree(p.init)
    x = flat if where == "init" else jnp.zeros_like(flat)
    eig = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda z: p.loss(unravel(z)))(x)))
    assert np.max(np.abs(eig)) == pytest.approx(p.smoothness, rel=1e-10)
    if p.strong_convexity is not None and name != "logistic_regression":  # there μ = l2 is a bound
        assert eig[0] == pytest.approx(p.strong_convexity, rel=1e-10)


def test_register_refuses_a_taken_or_empty_name():
    with pytest.raises(
        OptionError, match=r"name: a problem 'quadratic' is already registered \(gradlab"
    ):

        @problems.register("quadratic")
        def another(key, /):  # pragma: no cover - never registered
            raise AssertionError

    assert (
        problems.make("quadratic", jax.random.key(0)).name == "quadratic"
    )  # the catalog's is kept
    with pytest.raises(OptionError, match="name: expected a non-empty string"):
        problems.register("")
