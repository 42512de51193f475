"""The matrix-calculus problems: closed forms against AD oracles, and the facts each instance claims.

Oracles: ``jax.grad`` for gradients, the dense ``jax.hessian`` applied to a random direction for HVPs
(and its spectrum for ``L`` and ``μ``), ``jax.jvp`` of the closed-form gradient, and the complex-step
derivative for the ``analytic`` flag.

All the oracles of one instance run inside one jitted function (:func:`_bundle`) that takes the
problem's ``loss``, ``grad`` and ``hvp`` (``jax.tree_util.Partial`` pytrees) as arguments: that is the
jit/grad/jvp-compatibility check of the closed forms, and it compiles once per shape for all seeds —
compilation dominates the run time of these small problems. Comparisons are made in NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import problems
from gradlab._validate import OptionError

MATRIX = [
    "quadratic",
    "log_quadratic",
    "log_det",
    "least_squares",
    "mds",
    "nuclear_norm",
    "svd_energy",
    "linear_solve",
]
# The shapes where the SVD formulas and least squares take another branch (checked at one seed).
WIDE = (("rows", 3), ("cols", 5))
FULL_RANK = (("rows", 6), ("cols", 4), ("rank", 4))
UNDERDETERMINED = (("dim", 6), ("num_samples", 4))
EXTRA = [
    ("nuclear_norm", WIDE),
    ("svd_energy", (*WIDE, ("rank", 2))),
    ("svd_energy", FULL_RANK),
    ("least_squares", UNDERDETERMINED),
]
SEEDS = (1, 2, 3)
CASES = [(name, (), seed) for name in MATRIX for seed in SEEDS] + [(n, o, 1) for n, o in EXTRA]
CASE_IDS = [f"{n}{''.join(f'-{k}{v}' for k, v in o)}-seed{s}" for n, o, s in CASES]
TOL = 1e-10
COMPLEX_STEP = 1e-30


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)] + [[]])


def rel(a, b):
    a, b = flat(a), flat(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@functools.partial(jax.jit, static_argnames=("hessian", "complex_step"))
def _bundle(loss, grad, hvp, x, v, solution, *, hessian, complex_step):
    out = {"loss": loss(x), "grad": grad(x), "ad_grad": jax.grad(loss)(x), "hvp": hvp(x, v)}
    if hessian:
        out["jvp_of_grad"] = jax.jvp(grad, (x,), (v,))[1]
        flat_x, unravel = ravel_pytree(x)
        out["hess"] = jax.hessian(lambda z: loss(unravel(z)))(flat_x)
        out["hess_v"] = unravel(out["hess"] @ ravel_pytree(v)[0])
    if complex_step:
        shifted = jax.tree.map(lambda a, b: a + 1j * COMPLEX_STEP * b, x, v)
        out["complex_step"] = jnp.imag(loss(shifted)) / COMPLEX_STEP
    if solution is not None:
        out["solution_loss"] = loss(solution)
        out["solution_grad"] = grad(solution)
    return out


@functools.cache
def oracles(name, opts, seed, dtype=None):
    """One instance, a random point ``x`` and direction ``v``, and the oracles there (NumPy arrays).

    The dense Hessian and the jvp only in float64, the complex step only for problems flagged
    ``analytic``.
    """
    key = jax.random.key(seed)
    p = problems.make(name, key, **dict(opts), **({} if dtype is None else {"dtype": dtype}))
    x = p.random_point(jax.random.fold_in(key, 7))
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype), x)
    out = _bundle(
        p.loss,
        p.grad,
        p.hvp,
        x,
        v,
        p.solution,
        hessian=dtype is None,
        complex_step=p.analytic and dtype is None,
    )
    return p, x, v, jax.tree.map(np.asarray, out)


def test_all_matrix_problems_are_registered():
    assert set(MATRIX) <= set(problems.names())
    for name in MATRIX:
        assert problems.describe(name)


# ----------------------------------------------------------------------------------------------------
# Closed forms against the AD oracles (3 seeds per problem, plus extra shapes)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "opts", "seed"), CASES, ids=CASE_IDS)
def test_gradient_matches_reverse_mode(name, opts, seed):
    _, _, _, o = oracles(name, opts, seed)
    assert rel(o["grad"], o["ad_grad"]) <= TOL


@pytest.mark.parametrize(("name", "opts", "seed"), CASES, ids=CASE_IDS)
def test_hvp_matches_dense_hessian(name, opts, seed):
    p, _, _, o = oracles(name, opts, seed)
    assert p.hvp is not None, f"{name}: every matrix problem has a closed-form HVP"
    assert rel(o["hvp"], o["hess_v"]) <= TOL
    # The directional derivative of the hand-written gradient is the hand-written HVP.
    assert rel(o["jvp_of_grad"], o["hvp"]) <= 1e-9


@pytest.mark.parametrize(("name", "opts", "seed"), CASES, ids=CASE_IDS)
def test_constants_bound_the_hessian_spectrum(name, opts, seed):
    p, _, _, o = oracles(name, opts, seed)
    if p.smoothness is None and p.strong_convexity is None:
        pytest.skip(f"{name} claims neither L nor μ")
    eig = np.linalg.eigvalsh((o["hess"] + o["hess"].T) / 2)
    if p.smoothness is not None:
        assert eig[-1] <= p.smoothness * (1 + 1e-10)
    if p.strong_convexity is not None:
        assert 0 < p.strong_convexity <= eig[0] * (1 + 1e-10)


@pytest.mark.parametrize(("name", "opts", "seed"), CASES, ids=CASE_IDS)
def test_analytic_flag_agrees_with_complex_step(name, opts, seed):
    p, _, v, o = oracles(name, opts, seed)
    if not p.analytic:
        pytest.skip(f"{name} is not analytic (SVD or slogdet)")
    exact = float(flat(o["grad"]) @ flat(v))
    assert abs(float(o["complex_step"]) - exact) <= TOL * max(abs(exact), 1.0)


@pytest.mark.parametrize(("name", "opts", "seed"), CASES, ids=CASE_IDS)
def test_solution_is_stationary_and_attains_min_value(name, opts, seed):
    p, _, _, o = oracles(name, opts, seed)
    if p.solution is None:
        assert p.min_value is None
        pytest.skip(f"{name} has no minimiser")
    np.testing.assert_allclose(float(o["solution_loss"]), p.min_value, rtol=1e-10, atol=1e-12)
    if p.smooth:  # at a kink (nuclear norm at 0) the closed form is a subgradient, not 0
        scale = max(np.linalg.norm(flat(o["grad"])), 1.0)
        assert np.linalg.norm(flat(o["solution_grad"])) <= 1e-10 * scale


# ----------------------------------------------------------------------------------------------------
# What each problem claims, in NumPy against its data
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_quadratic_is_non_symmetric_and_its_constants_are_eigenvalues(seed):
    p, x, _, o = oracles("quadratic", (), seed)
    a, b = np.asarray(p.data["A"]), np.asarray(p.data["b"])
    assert np.linalg.norm(a - a.T) > 1.0
    eig = np.linalg.eigvalsh(a + a.T)
    np.testing.assert_allclose([p.strong_convexity, p.smoothness], [1.0, 10.0], rtol=1e-10)
    np.testing.assert_allclose([eig[0], eig[-1]], [1.0, 10.0], rtol=1e-10)
    # The slip ∇f = 2Ax − b (true only for symmetric A) is caught by the oracle.
    assert rel(2 * a @ np.asarray(x) - b, o["ad_grad"]) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_log_quadratic_is_the_log_of_the_form(seed):
    p, x, _, o = oracles("log_quadratic", (), seed)
    a, x = np.asarray(p.data["A"]), np.asarray(x)
    np.testing.assert_allclose(o["loss"], np.log(x @ a @ x), rtol=1e-12)
    np.testing.assert_allclose(o["grad"] @ x, 2.0, rtol=1e-12)  # Euler: f(tx) = f(x) + 2 ln|t|
    assert p.smoothness is None and p.strong_convexity is None


@pytest.mark.parametrize("seed", SEEDS)
def test_log_det_facts(seed):
    p, x, v, o = oracles("log_det", (), seed)
    x, v, s = np.asarray(x), np.asarray(v), np.asarray(p.data["S"])
    assert np.all(np.linalg.eigvalsh(x) > 0), "random_point must be SPD"
    np.testing.assert_allclose(x, x.T)
    np.testing.assert_allclose(p.solution, np.linalg.inv(s), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p.min_value, 5 + np.linalg.slogdet(s)[1], rtol=1e-12)
    # On a non-symmetric direction the Hessian is V ↦ X⁻ᵀVᵀX⁻ᵀ, not X⁻¹VX⁻¹.
    x_inv = np.linalg.inv(x)
    assert rel(o["hvp"], x_inv @ v.T @ x_inv) <= 1e-9
    assert rel(o["hvp"], x_inv @ v @ x_inv) > 1e-3


def test_log_det_loss_survives_where_log_of_det_underflows():
    p = problems.make("log_det", jax.random.key(0))
    x = 1e-70 * np.eye(5)
    assert np.linalg.det(x) == 0.0  # det = 1e-350 underflows: log(det X) would be −inf
    expected = np.trace(np.asarray(p.data["S"])) * 1e-70 + 5 * 70 * np.log(10.0)
    np.testing.assert_allclose(float(jax.jit(p.loss)(x)), expected, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_least_squares_is_not_halved(seed):
    p, w, _, o = oracles("least_squares", (), seed)
    x_mat, y, w = np.asarray(p.data["X"]), np.asarray(p.data["y"]), np.asarray(w)
    r = x_mat @ w - y
    np.testing.assert_allclose(o["loss"], r @ r, rtol=1e-12)
    np.testing.assert_allclose(o["grad"], 2 * x_mat.T @ r, rtol=1e-10)
    sv = np.linalg.svd(x_mat, compute_uv=False)
    np.testing.assert_allclose([p.smoothness, p.strong_convexity], 2 * sv[[0, -1]] ** 2, rtol=1e-10)


def test_least_squares_underdetermined_is_not_strongly_convex():
    p, _, _, o = oracles("least_squares", UNDERDETERMINED, 1)
    assert p.strong_convexity is None and p.min_value == 0.0
    assert np.linalg.norm(o["solution_grad"]) <= 1e-10


@pytest.mark.parametrize("seed", SEEDS)
def test_mds_gradient_factor_is_8_not_4(seed):
    p, w, _, o = oracles("mds", (), seed)
    w, d = np.asarray(w), np.asarray(p.data["D"])
    r = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1) - d
    # The textbook slip, written out pair by pair: 4 Σⱼ rᵢⱼ (Wᵢ − Wⱼ).
    four = np.stack(
        [4 * sum(r[i, j] * (w[i] - w[j]) for j in range(len(w))) for i in range(len(w))]
    )
    assert rel(o["grad"], o["ad_grad"]) <= TOL
    np.testing.assert_allclose(rel(four, o["ad_grad"]), 0.5, rtol=1e-10)
    np.testing.assert_allclose(o["grad"], 2 * four, rtol=1e-10)


def test_mds_solution_up_to_rigid_motion():
    p = problems.make("mds", jax.random.key(4))
    t = 0.7
    reflect_rotate = np.array([[np.cos(t), np.sin(t)], [np.sin(t), -np.cos(t)]])
    moved = np.asarray(p.solution) @ reflect_rotate + np.array([[1.0, -2.0]])
    loss, grad = jax.jit(lambda w: (p.loss(w), p.grad(w)))(moved)
    assert float(loss) <= 1e-20 * float(np.sum(np.asarray(p.data["D"]) ** 2))
    assert np.linalg.norm(grad) <= 1e-10 * np.linalg.norm(p.data["D"]) ** 1.5


@pytest.mark.parametrize(("opts", "seed"), [((), 1), ((), 2), ((), 3), (WIDE, 1)])
def test_nuclear_norm_gradient_is_the_polar_factor(opts, seed):
    p, w, _, o = oracles("nuclear_norm", opts, seed)
    w, g = np.asarray(w), o["grad"]
    np.testing.assert_allclose(o["loss"], np.linalg.svd(w, compute_uv=False).sum(), rtol=1e-12)
    np.testing.assert_allclose(g @ g.T @ g, g, atol=1e-12)  # a partial isometry of full rank
    np.testing.assert_allclose(np.sum(g * w), o["loss"], rtol=1e-12)  # ⟨UVᵀ, W⟩ = ‖W‖_*
    assert not p.smooth and not p.analytic


def test_svd_energy_full_rank_is_half_the_squared_frobenius_norm():
    p, w, v, o = oracles("svd_energy", FULL_RANK, 1)
    np.testing.assert_allclose(o["grad"], w, rtol=1e-12)
    np.testing.assert_allclose(o["hvp"], v, rtol=1e-10)
    np.testing.assert_allclose(o["loss"], 0.5 * np.sum(np.asarray(w) ** 2), rtol=1e-12)
    assert p.smooth and (p.smoothness, p.strong_convexity) == (1.0, 1.0)
    partial, w, _, o = oracles("svd_energy", (), 1)
    assert not partial.smooth and partial.smoothness is None
    np.testing.assert_allclose(o["loss"], 0.5 * np.sum(np.linalg.svd(w, compute_uv=False)[:2] ** 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_solve_gradients_are_the_adjoint_formulas(seed):
    p, params, _, o = oracles("linear_solve", (), seed)
    a, b = np.asarray(params["A"]), np.asarray(params["b"])
    x = np.linalg.solve(a, b)
    adjoint = np.linalg.solve(a.T, x - np.asarray(p.data["x_target"]))
    np.testing.assert_allclose(o["grad"]["b"], adjoint, rtol=1e-10)
    np.testing.assert_allclose(o["grad"]["A"], -np.outer(adjoint, x), rtol=1e-10)
    assert np.linalg.cond(a) <= 4.0 + 1e-9


# ----------------------------------------------------------------------------------------------------
# Options, dtypes, determinism
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MATRIX)
def test_float32_instances_build_and_run(name):
    p, x, _, o = oracles(name, (), 0, dtype="float32")
    assert p.options["dtype"] == "float32"
    for tree in (x, p.init, p.data, p.solution):
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(tree))
    for k in ("loss", "grad", "hvp"):
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(o[k]))
        assert np.all(np.isfinite(flat(o[k])))
    assert rel(o["grad"], o["ad_grad"]) <= 1e-4
    for c in (p.min_value, p.smoothness, p.strong_convexity):
        assert c is None or isinstance(c, float)


@pytest.mark.parametrize("name", MATRIX)
def test_options_are_recorded_with_the_dtype_as_a_string(name):
    p = problems.make(name, jax.random.key(0))
    assert p.options == {**problems.options(name), "dtype": "float64"}
    assert p.name == name and p.description and p.reference
    for c in (p.min_value, p.smoothness, p.strong_convexity):
        assert c is None or isinstance(c, float)


@pytest.mark.parametrize("name", MATRIX)
def test_instances_are_deterministic_in_the_key(name):
    a = problems.make(name, jax.random.key(5))
    b = problems.make(name, jax.random.key(5))
    c = problems.make(name, jax.random.key(6))
    np.testing.assert_array_equal(flat(a.init), flat(b.init))
    np.testing.assert_array_equal(flat(a.data), flat(b.data))
    assert not np.array_equal(flat((a.init, a.data)), flat((c.init, c.data)))


BAD_OPTIONS = [
    ("quadratic", {"dim": 0}, "dim"),
    ("quadratic", {"dim": 2.5}, "dim"),
    ("quadratic", {"cond": 0.5}, "cond"),
    ("log_quadratic", {"cond": -1.0}, "cond"),
    ("log_det", {"dim": -2}, "dim"),
    ("least_squares", {"num_samples": 0}, "num_samples"),
    ("mds", {"num_points": 1}, "num_points"),
    ("mds", {"dim": True}, "dim"),
    ("nuclear_norm", {"rows": 0}, "rows"),
    ("svd_energy", {"rows": 4, "cols": 3, "rank": 5}, r"rank: .*min\(rows, cols\) = 3"),
    ("svd_energy", {"rank": 0}, "rank"),
    ("linear_solve", {"dtype": "int32"}, "dtype"),
]


@pytest.mark.parametrize(("name", "opts", "match"), BAD_OPTIONS)
def test_bad_options_name_the_option(name, opts, match):
    with pytest.raises(OptionError, match=match):
        problems.make(name, jax.random.key(0), **opts)
