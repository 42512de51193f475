"""gradlab.curvature: HVPs against the dense Hessian, trace/diagonal/spectrum estimators against oracles and
theory (float64, fixed seeds). Coverage of the error bars over 200 seeds is `slow`."""

import collections
import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import curvature as cv
from gradlab import problems
from gradlab._validate import GradlabError, OptionError, ShapeError, UnknownNameError


def _spd(n, lam, seed=1):
    U = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]
    return jnp.asarray((U * lam) @ U.T)


def _spectra(n):
    k = np.arange(1, n + 1)
    return {
        "inv_k2": 1.0 / k**2,
        "inv_k": 1.0 / k,
        "flat": np.sort(np.random.default_rng(0).uniform(1.0, 2.0, n))[::-1],
        "lowrank_noise": np.concatenate([np.ones(10), 1e-2 * np.ones(n - 10)]),
    }


def _dict_loss():
    def f(p):
        h = jnp.tanh(p["W"] @ p["x"] + p["b"])
        return jnp.sum(h**2) + jnp.sum(p["x"] ** 4) / 4 + p["b"][0] * p["W"][1, 2]

    x = {
        "W": jax.random.normal(jax.random.key(0), (3, 4)),
        "b": jnp.array([0.1, -0.2, 0.3]),
        "x": jnp.array([1.0, -0.5, 0.2, 2.0]),
    }
    return f, x


# ------------------------------------------------------------------------------------------------
# HVPs


@pytest.mark.parametrize("mode", cv.HVP_MODES)
def test_hvp_modes_match_dense_hessian(mode, key):
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    H = jax.hessian(lambda z: f(unravel(z)))(flat)
    v = unravel(jax.random.normal(key, flat.shape))
    want = H @ jax.flatten_util.ravel_pytree(v)[0]
    got = jax.flatten_util.ravel_pytree(cv.hvp(f, x, v, mode=mode))[0]
    assert jnp.max(jnp.abs(got - want)) <= 1e-10 * max(1.0, float(jnp.max(jnp.abs(want))))
    op = jax.flatten_util.ravel_pytree(cv.hvp_operator(f, x)(v))[0]
    assert jnp.max(jnp.abs(op - want)) <= 1e-10 * max(1.0, float(jnp.max(jnp.abs(want))))


def test_hessian_dense_is_jax_hessian_and_problem_hvp():
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    H = cv.hessian(f, x, batch_size=5)
    np.testing.assert_allclose(H, jax.hessian(lambda z: f(unravel(z)))(flat), atol=1e-12)
    p = problems.make("mlp", jax.random.key(0), in_dim=2, hidden=4, out_dim=1)
    v = jax.tree.map(jnp.ones_like, p.init)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(cv.hvp(p.loss, p.init, v))[0],
        jax.flatten_util.ravel_pytree(p.hvp(p.init, v))[0],
        atol=1e-10,
    )


def test_hvp_errors():
    with pytest.raises(UnknownNameError, match="mode"):
        cv.hvp(jnp.sum, jnp.ones(2), jnp.ones(2), mode="fwd_fwd")
    with pytest.raises(GradlabError, match="scalar"):
        cv.hvp(lambda x: x, jnp.ones(2), jnp.ones(2))
    # a direction unlike x, and integer points: errors that name the argument
    f = lambda p: jnp.sum(p["w"] ** 3) + jnp.sum(p["b"] ** 2)  # noqa: E731
    x = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(GradlabError, match=r"v: expected a pytree with the structure"):
        cv.hvp(f, x, {"w": jnp.ones(3)})
    with pytest.raises(GradlabError, match=r"v: leaf \['b'\] has shape \(3,\), expected \(2,\)"):
        cv.hvp(f, x, {"w": jnp.ones(3), "b": jnp.ones(3)})
    v32 = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2)}
    with pytest.raises(GradlabError, match=r"v: leaf \['w'\] has dtype float32, expected float64"):
        cv.hvp(f, x, v32)
    with pytest.raises(GradlabError, match=r"v: leaf \['w'\] has dtype float32"):
        cv.hvp_operator(f, x)(v32)
    with pytest.raises(GradlabError, match=r"x: the array has dtype int"):
        cv.hessian(lambda z: jnp.sum(z * 1.0) ** 2, jnp.arange(3))
    with pytest.raises(GradlabError, match=r"x: the array has dtype int"):
        cv.hessian_trace(
            lambda z: jnp.sum(z * 1.0) ** 2, jnp.arange(3), jax.random.key(0), num_matvecs=2
        )


# ------------------------------------------------------------------------------------------------
# Trace


N = 200


@pytest.fixture(scope="module")
def mats():
    return {name: (_spd(N, lam), float(lam.sum())) for name, lam in _spectra(N).items()}


def _run_seeds(A, method, m, seeds, **kw):
    """value, std_error over seeds by lax.map (no batched LAPACK across seeds)."""
    n = A.shape[0]

    def one(key):
        e = cv.trace(lambda v: A @ v, key, like=jnp.zeros(n), num_matvecs=m, method=method, **kw)
        return e.value, e.std_error

    keys = jax.random.split(jax.random.key(123), seeds)
    v, s = jax.jit(lambda ks: jax.lax.map(one, ks))(keys)
    return np.asarray(v), np.asarray(s)


@pytest.mark.parametrize("method", cv.TRACE_METHODS)
def test_trace_exact_with_n_matvecs_and_dict_like(method):
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    want = jnp.trace(jax.hessian(lambda z: f(unravel(z)))(flat))
    n = flat.size
    est = cv.hessian_trace(f, x, jax.random.key(0), num_matvecs=n, method=method)
    assert abs(est.value - want) < 1e-10 and est.num_matvecs == n
    # exact up to rounding: the error bar is the rounding floor 2·eps·|value| and covers the error
    eps = jnp.finfo(est.value.dtype).eps
    assert est.std_error == 2 * eps * abs(est.value)
    assert abs(est.value - want) <= 1.96 * est.std_error


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "xnystrace", "auto"])
def test_trace_unbiased(mats, method):
    A, tr = mats["inv_k"]
    v, _ = _run_seeds(A, method, 20, 100)
    assert abs(v.mean() - tr) < 4 * v.std() / np.sqrt(len(v))


@pytest.mark.parametrize("sampler", cv.SAMPLERS)
def test_hutchinson_samplers_dict_pytree(sampler):
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    want = float(jnp.trace(jax.hessian(lambda z: f(unravel(z)))(flat)))
    est = cv.hessian_trace(f, x, jax.random.key(3), num_matvecs=15, sampler=sampler)
    assert abs(float(est.value) - want) < 5 * float(est.std_error)


def test_hutchinson_variance_matches_theory():
    n, m = 30, 5
    A = _spd(n, np.linspace(-1.0, 3.0, n), seed=4)
    theory = 2 * (jnp.sum(A * A) - jnp.sum(jnp.diag(A) ** 2)) / m
    v, _ = _run_seeds(A, "hutchinson", m, 2000)
    ratio = v.var(ddof=1) / theory
    assert abs(ratio - 1) < 4 * np.sqrt(2 / 1999) * 1.5  # sampling error of a variance (+ kurtosis)


@pytest.mark.slow
def test_variance_reduced_error_falls_like_one_over_m():
    A, tr = _spd(N, 1.0 / np.arange(1, N + 1) ** 2), float(np.sum(1.0 / np.arange(1, N + 1) ** 2))
    for method in ("hutch++", "xtrace", "xnystrace"):
        err = [np.median(np.abs(_run_seeds(A, method, m, 20)[0] - tr)) for m in (12, 48)]
        assert err[1] < err[0] / 4 * 1.5, (method, err)  # 4× the matvecs: ≥ ~4× smaller


def test_rtol_stopping_rule(mats):
    A, tr = mats["flat"]
    like = jnp.zeros(N)
    loose = cv.trace(lambda v: A @ v, jax.random.key(0), like=like, num_matvecs=300, rtol=1e-2)
    assert int(loose.num_matvecs) < 300 and loose.std_error < 1e-2 * abs(loose.value)
    tight = cv.trace(lambda v: A @ v, jax.random.key(0), like=like, num_matvecs=60, rtol=1e-9)
    assert int(tight.num_matvecs) == 60
    pp = cv.trace(
        lambda v: A @ v, jax.random.key(0), like=like, num_matvecs=150, method="hutch++", rtol=1e-2
    )
    assert int(pp.num_matvecs) < 150 and abs(pp.value - tr) < 5 * pp.std_error


@pytest.mark.parametrize("method", ["xtrace", "xnystrace"])
def test_rtol_for_x_methods_grows_the_sketch(mats, method):
    A, tr = mats["inv_k2"]
    like = jnp.zeros(N)
    traces = collections.Counter()

    @functools.partial(jax.jit, static_argnames=("m", "rtol", "batch_size"))
    def _est(A, key, m, rtol, batch_size):
        traces[(m, rtol, batch_size)] += 1
        return cv.trace(
            lambda v: A @ v,
            key,
            like=like,
            num_matvecs=m,
            method=method,
            rtol=rtol,
            batch_size=batch_size,
        )

    def est(m, rtol=None, key=0, batch_size=None, scale=1.0):
        return _est(scale * A, jax.random.key(key), m, rtol, batch_size)

    # budgets: XTrace 60 (sketches of 10, 20, 30 probes, QR extended by block Gram–Schmidt),
    # XNysTrace 40 (10, 20, 40 probes)
    m = 60 if method == "xtrace" else 40
    # never stopping: the doubling sketch reproduces the one-shot estimate from the same probes
    one, grown = est(m), est(m, rtol=1e-15)
    assert int(grown.num_matvecs) == m
    np.testing.assert_allclose(grown.value, one.value, rtol=1e-10)
    np.testing.assert_allclose(grown.std_error, one.std_error, rtol=1e-8)
    # stopping: at a sketch size of the schedule after the first (the stop also needs the previous
    # size's estimate to agree), below the target, and within a sane error bar (coverage measured
    # in benchmarks/README.md)
    per_probe = 2 if method == "xtrace" else 1
    used = []
    for key in range(6):
        loose = est(m, rtol=1e-2, key=key)
        used.append(int(loose.num_matvecs))
        assert used[-1] // per_probe in (20, 40), used  # never at the first size
        if used[-1] < m:
            assert loose.std_error < 1e-2 * abs(loose.value)
        assert abs(loose.value - tr) < 4 * loose.std_error
    assert min(used) < m, used
    # compiled once: a new matrix and key reuse the executable, and the stop is decided at run time
    doubled = est(m, rtol=1e-2, key=0, scale=2.0)
    np.testing.assert_allclose(doubled.value, 2 * est(m, rtol=1e-2, key=0).value, rtol=1e-10)
    assert traces[(m, 1e-2, None)] == 1


@pytest.mark.slow  # compiles all three continuations (≈ 30 s)
@pytest.mark.parametrize("psd", [False, True])
def test_rtol_for_auto_continues_the_chosen_method(mats, psd):
    """auto with rtol decides from the first 10 probes, then runs the chosen method's own rtol loop
    from them: the result equals that method's rtol run (same probes, same matvecs)."""
    A, tr = mats["inv_k2"]
    like = jnp.zeros(N)

    @functools.partial(jax.jit, static_argnames=("method", "psd"))
    def est(key, method, psd=False):
        return cv.trace(
            lambda v: A @ v, key, like=like, num_matvecs=60, method=method, rtol=1e-2, psd=psd
        )

    want = "xnystrace" if psd else "xtrace"  # the choice on a fast-decaying spectrum
    for key in range(3):
        a = est(jax.random.key(key), "auto", psd=psd)
        b = est(jax.random.key(key), want)
        np.testing.assert_allclose([a.value, a.std_error], [b.value, b.std_error], rtol=1e-10)
        assert int(a.num_matvecs) == int(b.num_matvecs) < 60
        assert abs(a.value - tr) < 4 * a.std_error


@pytest.mark.parametrize("m", [8, 13, 25])
def test_rtol_for_auto_with_small_budgets(m):
    """Budgets under 20 split as m/2 + m/2 before the stopping rule: auto's Hutchinson continuation
    runs in blocks of its first block (m/2), eagerly and under jit (where every branch is traced);
    the leftover block of m = 13 (6 + 6 + 1) and m = 25 (10 + 10 + 5) included."""
    n = 60
    A = jnp.diag(jnp.linspace(1.0, 2.0, n))  # flat: auto picks Hutchinson
    like = jnp.zeros(n)

    def est(key, psd):
        return cv.trace(
            lambda v: A @ v, key, like=like, num_matvecs=m, method="auto", rtol=1e-9, psd=psd
        )

    for psd in (False, True):
        eager = est(jax.random.key(0), psd)
        assert int(eager.num_matvecs) == m  # rtol never met: the whole budget is spent
        assert abs(float(eager.value) - 90.0) < 5 * float(eager.std_error)
    if m == 13:  # under jit every branch is traced (≈ 15 s of compilation: one budget)
        jitted = jax.jit(est, static_argnums=1)(jax.random.key(0), False)
        assert int(jitted.num_matvecs) == m
        np.testing.assert_allclose(jitted.value, est(jax.random.key(0), False).value, rtol=1e-12)


def test_batch_size_and_jit_compile_once(mats):
    A, _ = mats["inv_k"]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def est(A, key):
        return cv.trace(lambda v: A @ v, key, like=jnp.zeros(N), num_matvecs=30, method="hutch++")

    a = est(A, jax.random.key(0))
    est(2 * A, jax.random.key(1))
    b = cv.trace(
        lambda v: A @ v,
        jax.random.key(0),
        like=jnp.zeros(N),
        num_matvecs=30,
        method="hutch++",
        batch_size=7,
    )
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12)


def _auto_runs(A, psd, m=40, keys=(0,), only_branch=False):
    """auto's ``(estimate, branch, bad)`` for each seed in ``keys`` (one compilation, ``lax.map``
    over the keys); ``only_branch``: just the choice (the estimators are then dead code, which
    compiles in a fraction of the time)."""
    like = jnp.zeros(A.shape[0])
    mv, n, _ = cv._flat_operator(lambda v: A @ v, like)
    samp = cv._probe_sampler("sphere", like, 1)

    def one(k):
        out = cv._auto(mv, k, samp, m, batch_size=None, mesh=None, n=n, psd=psd)
        return out[1] if only_branch else out

    return jax.jit(lambda ks: jax.lax.map(one, ks))(jnp.stack([jax.random.key(k) for k in keys]))


def _auto_branch(A, psd, m=40, keys=(0,)):
    """auto's choice for each seed in ``keys``: 0 Hutchinson, 1 XNysTrace, 2 XTrace."""
    return [int(b) for b in _auto_runs(A, psd, m, keys, only_branch=True)]


def test_auto_picks_hutchinson_on_flat_and_sketch_on_decaying(mats):
    # 0 Hutchinson, 1 XNysTrace, 2 XTrace. On the flat spectrum resphered XNysTrace ties Hutchinson
    # (median errors 2.2e-3 vs 2.4e-3 at m = 30), so either is right there; XTrace (1.5x worse) is
    # not — and without psd=True it must be judged by its own residual statistic, not XNysTrace's
    # terms (which chose it for most seeds). A gap onto a flat floor (10 eigenvalues 1, the rest
    # 1e-2) takes XTrace even for a PSD operator; without psd=True, XNysTrace is never chosen.
    for name, want_psd, want in [
        ("flat", (0, 1), (0,)),
        ("inv_k2", (1,), (2,)),
        ("lowrank_noise", (2,), (2,)),
    ]:
        A, _ = mats[name]
        assert set(_auto_branch(A, psd=True, keys=range(4))) <= set(want_psd), name
        assert set(_auto_branch(A, psd=False, keys=range(4))) <= set(want), name


def _indefinite_tail(n, q, key=3):
    """A Hessian-like spectrum: ``1/k`` on ``q`` directions, small negative eigenvalues on the rest."""
    lam = np.concatenate([1.0 / np.arange(1, q + 1), -1e-3 * np.linspace(0.5, 1.5, n - q)])
    return _spd(n, lam, seed=key), float(lam.sum())


def test_auto_never_trusts_nystrom_on_an_indefinite_operator():
    # the bug this guards: half-sketches of such an operator look PSD, XNysTrace's pseudo-inverse then
    # dropped the negative directions and reported std_error ≈ 1e-16 at a 1e-3 relative error
    # (150 of 200 eigenvalues positive: even the 100-probe sketches are positive definite)
    A, tr = _indefinite_tail(N, 150)
    like = jnp.zeros(N)
    mv = lambda v: A @ v  # noqa: E731
    est, branch, bad = _auto_runs(A, psd=False, m=100, keys=range(5))
    assert 1 not in branch.tolist() and not bad.any()
    assert np.all(np.abs(est.value - tr) <= 4 * est.std_error), (est.value - tr, est.std_error)
    # 100 positive: the 50-probe half looks PSD, the full 100-probe sketch does not
    B, _ = _indefinite_tail(N, 100)
    assert _auto_branch(B, psd=True, m=100) == [1]
    with pytest.raises(GradlabError, match="psd"):  # declared PSD, wrongly, and the sketch shows it
        cv.trace(
            lambda v: B @ v, jax.random.key(0), like=like, num_matvecs=100, method="auto", psd=True
        )
    nan = jax.jit(
        lambda B: cv.trace(
            lambda v: B @ v, jax.random.key(0), like=like, num_matvecs=100, method="auto", psd=True
        )
    )(B)
    assert np.isnan(nan.value) and np.isnan(nan.std_error)
    with pytest.raises(OptionError, match="psd"):
        cv.trace(mv, jax.random.key(0), like=like, num_matvecs=10, method="auto", psd="yes")


def test_nystrom_not_psd_sees_null_directions_that_move():
    # ΩᵀAΩ = 0 for A = diag(1, −1, 0, …), ω = e1 + e2: the quadratic form vanishes but Aω ≠ 0, which
    # a PSD operator cannot do; for A = e1e1ᵀ and ω = e2 both vanish (a genuine null direction).
    n = 6
    omega = jnp.zeros((1, n)).at[0, :2].set(1.0)
    for diag, want in [((1.0, -1.0), True), ((0.0, 0.0), False)]:
        A = jnp.diag(jnp.zeros(n).at[:2].set(jnp.asarray(diag)).at[2].set(1.0))
        om = omega if want else jnp.zeros((1, n)).at[0, 1].set(1.0)
        Y = om @ A
        core = cv._nystrom_core(om @ Y.T, Y @ Y.T)
        assert bool(cv._nystrom_not_psd(core)) is want


def test_trace_errors(mats):
    A, _ = mats["inv_k"]
    like = jnp.zeros(N)
    mv = lambda v: A @ v  # noqa: E731
    with pytest.raises(UnknownNameError, match="method"):
        cv.trace(mv, jax.random.key(0), like=like, num_matvecs=10, method="xtrce")
    with pytest.raises(UnknownNameError, match="sampler"):
        cv.trace(mv, jax.random.key(0), like=like, num_matvecs=10, sampler="normal")
    with pytest.raises(OptionError, match="num_matvecs"):
        cv.trace(mv, jax.random.key(0), like=like, num_matvecs=3, method="hutch++")
    with pytest.raises(OptionError, match="sampler"):
        cv.trace(
            mv, jax.random.key(0), like=like, num_matvecs=10, method="xtrace", sampler="rademacher"
        )
    with pytest.raises(ShapeError, match="square"):
        cv.trace(lambda v: v[:5], jax.random.key(0), like=like, num_matvecs=10)
    B = jax.random.normal(jax.random.key(1), (N, N))
    with pytest.raises(GradlabError, match="symmetric"):
        cv.trace(lambda v: B @ v, jax.random.key(0), like=like, num_matvecs=20, method="xtrace")
    C = _spd(N, np.linspace(-1.0, 1.0, N))
    with pytest.raises(GradlabError, match="positive semi-definite"):
        cv.trace(lambda v: C @ v, jax.random.key(0), like=like, num_matvecs=20, method="xnystrace")
    with pytest.raises(OptionError, match="mesh"):
        cv.trace(mv, jax.random.key(0), like=like, num_matvecs=10, mesh="cpu")
    # a `like` the operator cannot take, and a missing key, are named (not raw JAX errors)
    with pytest.raises(ShapeError, match=r"like: the operator cannot be applied"):
        cv.trace(mv, jax.random.key(0), like=jnp.zeros(N - 1), num_matvecs=10)
    f = lambda p: jnp.sum(p["a"] ** 4)  # noqa: E731
    with pytest.raises(ShapeError, match=r"like: the operator cannot be applied"):
        op = cv.hvp_operator(f, {"a": jnp.ones(3)})
        cv.trace(op, jax.random.key(0), like=jnp.zeros(3), num_matvecs=2)
    for fn in (cv.trace, cv.diagonal):
        with pytest.raises(OptionError, match=f"key: {fn.__name__} needs an explicit PRNG key"):
            fn(mv, None, like=like, num_matvecs=10)
    with pytest.raises(OptionError, match="key: eigenvalues"):
        cv.eigenvalues(mv, None, like=like, k=2)
    with pytest.raises(OptionError, match="batch_size: expected an integer ≥ 1, got 0"):
        cv.hessian(f, {"a": jnp.ones(3)}, batch_size=0)
    # an empty `like` is named, by every estimator (it crashed inside the library)
    for like_empty in ({}, {"z": jnp.zeros((0,))}):
        for call in (
            lambda lk: cv.trace(lambda v: v, jax.random.key(0), like=lk, num_matvecs=4),
            lambda lk: cv.diagonal(lambda v: v, jax.random.key(0), like=lk, num_matvecs=4),
            lambda lk: cv.eigenvalues(lambda v: v, jax.random.key(0), like=lk, k=1),
            lambda lk: cv.spectral_density(lambda v: v, jax.random.key(0), like=lk),
        ):
            with pytest.raises(ShapeError, match="like: expected a pytree with at least one entry"):
                call(like_empty)
    with pytest.raises(
        ShapeError, match=r"grid: expected a 1-D array of evaluation points, got shape \(2, 2\)"
    ):
        cv.spectral_density(mv, jax.random.key(0), like=like, grid=jnp.zeros((2, 2)))


def test_like_may_be_shape_dtype_structs():
    """``like`` fixes shapes and dtypes only: jax.ShapeDtypeStruct leaves give the same estimates."""
    A = _spd(12, np.linspace(1.0, 3.0, 12), seed=2)
    mv = lambda p: {"v": A @ p["v"]}  # noqa: E731
    arrays, structs = {"v": jnp.zeros(12)}, {"v": jax.ShapeDtypeStruct((12,), jnp.float64)}
    key = jax.random.key(0)
    for call in (
        lambda lk: cv.trace(mv, key, like=lk, num_matvecs=6).value,
        lambda lk: cv.diagonal(mv, key, like=lk, num_matvecs=6).value["v"],
        # eigenvalues unravels its vectors with `like` itself; spectral_density uses the same
        # _flat_operator as trace and diagonal
        lambda lk: cv.eigenvalues(mv, key, like=lk, k=1, num_iters=3).vectors["v"],
    ):
        np.testing.assert_array_equal(call(structs), call(arrays))


# ------------------------------------------------------------------------------------------------
# Leave-one-out / leave-two-out terms and their variance estimate


def _xtrace_brute(A, Omega, i, drop):
    """XTrace term of probe i with the probes `drop` (∋ i) out of the sketch, in n-space."""
    n, k = Omega.shape
    keep = [c for c in range(k) if c not in drop]
    Q = np.linalg.qr(A @ Omega[:, keep])[0]
    w = Omega[:, i] - Q @ (Q.T @ Omega[:, i])
    return np.trace(Q.T @ A @ Q) + (n - len(keep)) / (w @ w) * (w @ A @ w)


def _nystrom_brute(A, Omega, i, drop):
    """XNysTrace term of probe i with the probes `drop` (∋ i) out of the sketch, in n-space."""
    n, k = Omega.shape
    keep = [c for c in range(k) if c not in drop]
    Om, Y = Omega[:, keep], A @ Omega[:, keep]
    A_hat = Y @ np.linalg.pinv(Om.T @ Y) @ Y.T
    Qo = np.linalg.qr(Om)[0]
    w = Omega[:, i] - Qo @ (Qo.T @ Omega[:, i])
    return np.trace(A_hat) + (n - len(keep)) / (w @ w) * (w @ (A - A_hat) @ w)


def _sketch(n=60, k=8, seed=0):
    A = np.asarray(_spd(n, 1.0 / np.arange(1, n + 1), seed=seed))
    samp = cv._probe_sampler("sphere", jnp.zeros(n), 1)
    Omega = np.asarray(cv._probes(samp, jax.random.key(seed), 0, k).T)
    return A, Omega


def test_xtrace_leave_one_and_two_out_terms_match_brute_force():
    A, Omega = _sketch()
    n, k = Omega.shape
    Q, R = jnp.linalg.qr(A @ Omega)
    Z = A @ Q
    t, t2 = cv._xtrace_terms(Q.T @ Z, Q.T @ Omega, R, jnp.sum(Omega**2, axis=0), n)
    scale = np.trace(A)
    for i in range(k):
        assert abs(t[i] - _xtrace_brute(A, Omega, i, {i})) < 1e-10 * scale
        for j in (0, 3, k - 1):
            if j != i:
                assert abs(t2[i, j] - _xtrace_brute(A, Omega, i, {i, j})) < 1e-10 * scale, (i, j)


def test_nystrom_leave_one_and_two_out_terms_match_brute_force():
    A, Omega = _sketch(seed=1)
    n, k = Omega.shape
    Hm, YtY, OtO = cv._grams(jnp.asarray(Omega.T), jnp.asarray((A @ Omega).T))  # rows (k, n)
    t, t2 = cv._nystrom_terms(cv._nystrom_core(Hm, YtY), OtO, n)
    scale = np.trace(A)
    for i in range(k):
        assert abs(t[i] - _nystrom_brute(A, Omega, i, {i})) < 1e-10 * scale
        for j in (0, 3, k - 1):
            if j != i:
                assert abs(t2[i, j] - _nystrom_brute(A, Omega, i, {i, j})) < 1e-10 * scale, (i, j)


@pytest.mark.parametrize("method", ["xtrace", "xnystrace"])
def test_loo_variance_is_unbiased_where_naive_is_not(mats, method):
    # E[std_error²] (without the critical-value factor) = Var(value): the covariance term is needed
    A, tr = mats["inv_k2"]
    n, m = A.shape[0], 30
    k = m // 2 if method == "xtrace" else m
    samp = cv._probe_sampler("sphere", jnp.zeros(n), 1)

    def one(key):
        if method == "xtrace":
            Om = cv._probes(samp, key, 0, k).T
            Q, R = jnp.linalg.qr(A @ Om)
            t, t2 = cv._xtrace_terms(Q.T @ (A @ Q), Q.T @ Om, R, jnp.sum(Om**2, axis=0), n)
        else:
            Om = cv._probes(samp, key, 0, k)  # rows (k, n)
            Hm, YtY, OtO = cv._grams(Om, Om @ A)
            t, t2 = cv._nystrom_terms(cv._nystrom_core(Hm, YtY), OtO, n)
        m2, m3, m4 = cv._moments(t)
        ratio = cv._quantile_ratio(k, m2, m3, m4)
        return jnp.mean(t), (cv._loo_se(t, t2) / ratio) ** 2, jnp.var(t, ddof=1) / k

    keys = jax.random.split(jax.random.key(5), 400)
    v, var_hat, naive = map(np.asarray, jax.jit(lambda ks: jax.lax.map(one, ks))(keys))
    true_var = np.mean((v - tr) ** 2)
    # sampling error of a variance over 400 seeds: ~7% (normal) to ~15% (heavy tails)
    assert 0.75 < var_hat.mean() / true_var < 1.3, var_hat.mean() / true_var
    assert naive.mean() / true_var < 0.75  # the naive (matfree's) variance under-covers here


@pytest.mark.parametrize("method", ["hutch++", "xtrace", "xnystrace", "auto"])
def test_exact_on_low_rank_operator(method):
    # rank 5, sketches of 10–15 probes: exact up to rounding; the error bar is then the rounding
    # floor 2·eps·|value| (before it, XTrace/XNysTrace reported 0 and Hutch++ the residual's
    # rounding only: ±1.96·std_error covered 0.07–0.69 of the seeds)
    n = 80
    A = _spd(n, np.concatenate([np.arange(1.0, 6.0), np.zeros(n - 5)]), seed=2)
    run = jax.jit(
        lambda ks: jax.lax.map(
            lambda k: cv.trace(
                lambda v: A @ v, k, like=jnp.zeros(n), num_matvecs=30, method=method
            ),
            ks,
        )
    )
    est = run(jax.random.split(jax.random.key(0), 50))
    err = np.abs(np.asarray(est.value) - 15.0)
    assert err.max() < 1e-12 and float(est.std_error.max()) < 1e-12
    assert np.all(est.std_error >= 2 * np.finfo(np.float64).eps * np.abs(est.value) * (1 - 1e-12))
    assert np.mean(err <= 1.96 * est.std_error) >= 0.9


def test_skewness_corrected_critical_value():
    k = 12
    # normal moments (γ = 0, κ = 0): plain Student t
    assert cv._quantile_ratio(k, 1.0, 0.0, 3.0) == pytest.approx(float(cv._t_ratio(k - 1)))
    # exponential terms (γ = 2, κ = 6): wider; the mean of 12 exponentials, t-interval under-covers
    wide = float(cv._quantile_ratio(k, 1.0, 2.0, 9.0))
    assert wide > float(cv._t_ratio(k - 1)) * 1.2
    # the sample moments it takes (divisor k), as _loo_se passes them
    x = jnp.asarray(np.random.default_rng(0).exponential(size=37))
    m2, m3, m4 = cv._moments(x)
    np.testing.assert_allclose([m2, m3, m4], [np.mean((x - x.mean()) ** p) for p in (2, 3, 4)])


SPECTRAL_ERRORS = [  # (call on A = I₅, error, message): what the docstrings promise
    (
        lambda mv, k, like: cv.trace(mv, k, like=like, num_matvecs=3, rtol=0.0),
        OptionError,
        "rtol: expected a positive",
    ),
    (
        lambda mv, k, like: cv.eigenvalues(mv, k, like=like, k=6),
        OptionError,
        r"k: at most n = 5 eigenvalues",
    ),
    (
        lambda mv, k, like: cv.eigenvalues(mv, k, like=like, k=3, num_iters=2),
        OptionError,
        "num_iters: expected an integer ≥ 3",
    ),
    (
        lambda mv, k, like: cv.eigenvalues(mv, k, like=like, k=2, which="biggest"),
        UnknownNameError,
        "which: unknown name 'biggest'",
    ),
    (
        lambda mv, k, like: cv.eigenvalues(mv, k, like=like, k=2, block_size=0),
        OptionError,
        "block_size: expected an integer ≥ 1",
    ),
    (
        lambda mv, k, like: cv.eigenvalues(mv, k, like=like, k=2, block_size=6),
        OptionError,
        r"block_size: at most n = 5 start vectors, got 6",
    ),
    (
        lambda mv, k, like: cv.eigenvalues(mv, k, like=like, k=4, block_size=3),
        OptionError,
        r"block_size: 3 start vectors fit only 1 whole blocks \(3 Ritz values\) in n = 5",
    ),
    (
        lambda mv, k, like: cv.spectral_density(mv, k, like=like, num_points=1),
        OptionError,
        "num_points: expected an integer ≥ 2",
    ),
    (
        lambda mv, k, like: cv.spectral_density(mv, k, like=like, sigma=0.0),
        OptionError,
        "sigma: expected a positive",
    ),
    (
        lambda mv, k, like: cv.spectral_density(mv, k, like=like, num_probes=0),
        OptionError,
        "num_probes: expected an integer ≥ 1",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), SPECTRAL_ERRORS)
def test_estimator_option_errors_name_the_argument(call, error, match):
    A = jnp.eye(5)
    with pytest.raises(error, match=match):
        call(lambda v: A @ v, jax.random.key(0), jnp.zeros(5))


@pytest.mark.parametrize("sampler", ["rademacher", "gaussian", "sphere"])
def test_structural_standard_error_is_unbiased(sampler):
    """E[std_error²] = Var(estimate): 2(‖A‖_F² − Σa_ii²)/m (Rademacher), 2‖A‖_F²/m (Gaussian),
    2n/(n + 2)·(‖A‖_F² − (tr A)²/n)/m (√n-sphere)."""
    n, m = 30, 6
    A = _spd(n, np.linspace(-1.0, 3.0, n), seed=4)
    fro, diag = float(jnp.sum(A * A)), float(jnp.sum(jnp.diag(A) ** 2))
    theory = {
        "rademacher": 2 * (fro - diag) / m,
        "gaussian": 2 * fro / m,
        "sphere": 2 * n / (n + 2) * (fro - float(jnp.trace(A)) ** 2 / n) / m,
    }[sampler]
    v, se = _run_seeds(A, "hutchinson", m, 4000, sampler=sampler)
    assert abs(v.var(ddof=1) / theory - 1) < 0.1
    # the mean of se² over 4000 seeds: unbiased (its sampling error here is ≈ 1.5%)
    assert abs(np.mean(se**2) / theory - 1) < 0.06, np.mean(se**2) / theory
    # Hutch++: the same identity on its residual R = PAP, conditionally on the sketch
    v, se = _run_seeds(A, "hutch++", 3 * m, 4000, sampler=sampler)
    assert abs(np.mean(se**2) / v.var(ddof=1) - 1) < 0.1


def test_structural_standard_error_exact_cases():
    # Rademacher probes on a diagonal matrix: zᵀAz = tr A for every z, and the error bar is 0
    A = jnp.diag(jnp.arange(1.0, 41.0))
    est = cv.trace(lambda v: A @ v, jax.random.key(0), like=jnp.zeros(40), num_matvecs=5)
    assert abs(float(est.value) - 820.0) < 1e-9 and float(est.std_error) < 1e-9
    # √n-sphere probes on a multiple of the identity: zᵀAz = c·n for every z, and the error bar is 0
    est = cv.trace(
        lambda v: 3.0 * v, jax.random.key(0), like=jnp.zeros(40), num_matvecs=5, sampler="sphere"
    )
    assert abs(float(est.value) - 120.0) < 1e-9 and float(est.std_error) < 1e-9


@pytest.mark.parametrize(
    ("method", "sampler"),
    [
        ("hutchinson", "sphere"),
        ("hutch++", "rademacher"),
        pytest.param("hutchinson", "rademacher", marks=pytest.mark.slow),
        pytest.param("hutch++", "sphere", marks=pytest.mark.slow),
    ],
)
def test_rtol_loop_equals_one_shot_when_it_never_stops(method, sampler):
    # the rtol loop accumulates the same sums (value and structural standard error)
    B = _spd(40, np.linspace(0.1, 2.0, 40), seed=1)
    kw = dict(like=jnp.zeros(40), num_matvecs=32, method=method, batch_size=4, sampler=sampler)
    one, seq = jax.jit(
        lambda k: (
            cv.trace(lambda v: B @ v, k, **kw),
            cv.trace(lambda v: B @ v, k, rtol=1e-14, **kw),
        )
    )(jax.random.key(2))
    assert int(seq.num_matvecs) == 32
    np.testing.assert_allclose([seq.value, seq.std_error], [one.value, one.std_error], rtol=1e-10)


@pytest.mark.parametrize(
    ("method", "budget"), [("hutchinson", 19), ("hutchinson", 25), ("hutch++", 40)]
)
def test_rtol_spends_the_whole_budget_when_it_never_stops(method, budget):
    # budgets that are not a multiple of the block: the rest is one last, smaller block
    B = _spd(60, np.linspace(1.0, 2.0, 60), seed=1)
    kw = dict(like=jnp.zeros(60), num_matvecs=budget, method=method)
    one = cv.trace(lambda v: B @ v, jax.random.key(0), **kw)
    seq = cv.trace(lambda v: B @ v, jax.random.key(0), rtol=1e-14, **kw)
    assert int(seq.num_matvecs) == budget
    np.testing.assert_allclose([seq.value, seq.std_error], [one.value, one.std_error], rtol=1e-10)


def test_rtol_blocks_do_not_depend_on_batch_size():
    # batch_size chunks the products (memory); the stop is tested on blocks of ≥ 10 probes whatever
    # it is (hessian_trace's default batch_size = 1 tested the stop every 2 probes)
    n = 60
    lam = np.linspace(1.0, 2.0, n)
    B = _spd(n, lam, seed=1)

    def f(x):
        return 0.5 * x @ (B @ x)

    for bs in (1, 3, None):
        est = cv.hessian_trace(
            f, jnp.zeros(n), jax.random.key(0), num_matvecs=50, rtol=0.02, batch_size=bs
        )
        assert int(est.num_matvecs) % 10 == 0 and int(est.num_matvecs) >= 10, bs
        same = cv.trace(
            lambda v: B @ v, jax.random.key(0), like=jnp.zeros(n), num_matvecs=50, rtol=0.02
        )
        np.testing.assert_allclose(est.value, same.value, rtol=1e-10)


def test_exact_diagonal_and_half_precision_trace_carry_the_rounding_floor():
    """Exact results (num_matvecs ≥ n) still carry rounding: 2·eps·|value| per entry, as the trace's;
    a bfloat16 operator is estimated in float32, but its products carry bfloat16 rounding, so the
    floor uses bfloat16's eps (a float32-sized error bar put the exact-budget trace ~1e4 standard
    errors from the float32 trace at the same point)."""
    A = jnp.array([[2.0, 0.1], [0.1, 3.0]])
    d = cv.diagonal(lambda v: A @ v, jax.random.key(0), like=jnp.zeros(2), num_matvecs=2)
    np.testing.assert_array_equal(
        d.std_error, 2 * jnp.finfo(jnp.float64).eps * jnp.array([2.0, 3.0])
    )
    f = lambda x: jnp.sum(jnp.tanh(x) ** 2 * jnp.arange(1.0, 9.0))  # noqa: E731
    x16 = jnp.linspace(-1.0, 1.0, 8).astype(jnp.bfloat16)
    e16 = cv.hessian_trace(f, x16, jax.random.key(0), num_matvecs=8)
    e32 = cv.hessian_trace(f, x16.astype(jnp.float32), jax.random.key(0), num_matvecs=8)
    eps16 = float(jnp.finfo(jnp.bfloat16).eps)
    assert float(e16.std_error) == pytest.approx(2 * eps16 * abs(float(e16.value)), rel=1e-6)
    assert abs(float(e16.value) - float(e32.value)) < 2 * float(e16.std_error)
    # one bfloat16 leaf among float32 ones counts for its own entries only
    like = {"w": jnp.zeros(6, jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)}
    mv = lambda v: {"w": 3.0 * v["w"], "b": 2.0 * v["b"]}  # noqa: E731
    eps32 = float(jnp.finfo(jnp.float32).eps)
    d = cv.diagonal(mv, jax.random.key(0), like=like, num_matvecs=8)
    np.testing.assert_allclose(d.std_error["b"], 2 * eps16 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(d.std_error["w"], 2 * eps32 * 3.0, rtol=1e-6)
    t = cv.trace(mv, jax.random.key(0), like=like, num_matvecs=8)
    assert float(t.value) == 22.0
    assert float(t.std_error) == pytest.approx(2 * (2 * 2.0 * eps16 + 6 * 3.0 * eps32), rel=1e-5)


def test_float32_estimates_keep_their_dtype():
    n = 30
    A32 = _spd(n, np.linspace(1.0, 2.0, n)).astype(jnp.float32)
    like = jnp.zeros(n, jnp.float32)
    for method in cv.TRACE_METHODS:
        for rtol in (None, 1e-3):
            est = jax.jit(
                lambda k, m=method, r=rtol: cv.trace(
                    lambda v: A32 @ v, k, like=like, num_matvecs=20, method=m, rtol=r
                )
            )(jax.random.key(0))
            assert est.value.dtype == est.std_error.dtype == jnp.float32, (method, rtol)
    for method in cv.DIAGONAL_METHODS:
        d = cv.diagonal(
            lambda v: A32 @ v, jax.random.key(0), like=like, num_matvecs=10, method=method
        )
        assert d.value.dtype == d.std_error.dtype == jnp.float32, method


# ------------------------------------------------------------------------------------------------
# Diagonal, eigenvalues, spectral density


@pytest.mark.parametrize("method", cv.DIAGONAL_METHODS)
def test_diagonal_unbiased_and_dict(method):
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    H = jax.hessian(lambda z: f(unravel(z)))(flat)
    op = cv.hvp_operator(f, x)

    def one(key):
        d = cv.diagonal(op, key, like=x, num_matvecs=10, method=method)
        return jax.flatten_util.ravel_pytree(d.value)[0]

    ds = jax.lax.map(one, jax.random.split(jax.random.key(0), 400))
    z = (ds.mean(0) - jnp.diag(H)) / (ds.std(0) / 20 + 1e-12)
    assert jnp.max(jnp.abs(z)) < 4.5
    exact = cv.diagonal(op, jax.random.key(0), like=x, num_matvecs=flat.size, method=method)
    assert set(exact.value) == {"W", "b", "x"}
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(exact.value)[0], jnp.diag(H), atol=1e-12
    )


@pytest.mark.parametrize("method", cv.DIAGONAL_METHODS)
@pytest.mark.parametrize("m", [10, 11])
def test_diagonal_std_error_and_count_against_monte_carlo(method, m):
    """Per entry, the standard error (divided by its t factor) estimates the sampling sd of the
    estimate; for Hutchinson with Rademacher probes that sd is √(Σ_{l≠j} a_jl²/m) exactly. XDiag uses
    2⌊m/2⌋ products (an odd budget leaves one unused)."""
    n = 40
    lam = np.linspace(0.5, 3.0, n) * np.where(np.arange(n) % 3 == 0, -1.0, 1.0)  # indefinite
    A = _spd(n, lam, seed=3)

    def one(key):
        d = cv.diagonal(lambda v: A @ v, key, like=jnp.zeros(n), num_matvecs=m, method=method)
        return d.value, d.std_error, d.num_matvecs

    v, se, used = jax.lax.map(one, jax.random.split(jax.random.key(0), 2000))
    k = m if method == "hutchinson" else m // 2
    assert set(np.asarray(used).tolist()) == {m if method == "hutchinson" else 2 * (m // 2)}
    rms = jnp.sqrt(jnp.mean((se / cv._t_ratio(jnp.asarray(k - 1.0))) ** 2, axis=0))
    sd = v.std(axis=0)
    ratio = rms / sd  # 2000 seeds: each entry's sd is known to ±1.6%
    assert 0.96 < float(jnp.mean(ratio)) < 1.04 and 0.85 < float(jnp.min(ratio))
    assert float(jnp.max(ratio)) < 1.15
    if method == "hutchinson":
        theory = jnp.sqrt((jnp.sum(A * A, axis=1) - jnp.diag(A) ** 2) / m)
        assert 0.97 < float(jnp.mean(theory / sd)) < 1.03
    coverage = float(jnp.mean(jnp.abs(v - jnp.diag(A)[None, :]) <= 1.96 * se))
    assert 0.93 < coverage < 0.97


def test_xdiag_beats_hutchinson_on_low_rank(mats):
    A, _ = mats["inv_k2"]
    errs = {}
    for method in cv.DIAGONAL_METHODS:
        d = cv.diagonal(
            lambda v: A @ v, jax.random.key(0), like=jnp.zeros(N), num_matvecs=60, method=method
        )
        errs[method] = float(jnp.linalg.norm(d.value - jnp.diag(A)))
    assert errs["xdiag"] < errs["hutchinson"] / 5


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_matches_eigh(which, block_size):
    n = 120
    lam = np.concatenate(
        [np.linspace(-3.0, -2.0, 3), np.linspace(-0.5, 0.5, n - 6), [2.0, 2.7, 4.0]]
    )
    A = _spd(n, lam, seed=7)
    ev = cv.eigenvalues(
        lambda v: A @ v,
        jax.random.key(0),
        like=jnp.zeros(n),
        k=3,
        which=which,
        num_iters=80,
        block_size=block_size,
    )
    w = np.linalg.eigvalsh(np.asarray(A))
    want = {"largest": w[::-1][:3], "smallest": w[:3], "magnitude": w[np.argsort(-np.abs(w))][:3]}[
        which
    ]
    np.testing.assert_allclose(ev.values, want, atol=1e-8)
    u = ev.vectors[0]
    np.testing.assert_allclose(A @ u, ev.values[0] * u, atol=1e-6)
    assert ev.residuals[0] < 1e-6


def test_lanczos_float32_full_run_stays_orthogonal():
    """In float32, n Lanczos steps on n = 60 lose orthogonality within a few dozen steps unless every
    step is re-orthogonalized twice against the whole basis (one pass leaves ghost copies of the
    large eigenvalues and a non-orthonormal basis): all n Ritz values must match eigh, and the Ritz
    vectors must be orthonormal to float32 rounding."""
    n = 60
    lam = np.concatenate([np.geomspace(1e-3, 1.0, n - 3), [5.0, 20.0, 100.0]])
    A = _spd(n, lam, seed=4).astype(jnp.float32)
    ev = cv.eigenvalues(
        lambda v: A @ v, jax.random.key(2), like=jnp.zeros(n, jnp.float32), k=n, num_iters=n
    )
    assert ev.values.dtype == jnp.float32
    w = np.linalg.eigvalsh(np.asarray(A, np.float64))[::-1]
    np.testing.assert_allclose(np.asarray(ev.values, np.float64), w, atol=1e-4 * w[0])
    U = np.asarray(ev.vectors, np.float64)
    np.testing.assert_allclose(U @ U.T, np.eye(n), atol=1e-4)


def test_lanczos_residuals_and_counts_before_convergence():
    """Stopped early (12 iterations on n = 120), the Ritz pairs are rough: the reported residuals must
    be ‖Au − θu‖ of the returned vectors, and the counts the iterations run."""
    n, q = 120, 12
    lam = np.linspace(0.1, 3.0, n)
    A = _spd(n, lam, seed=5)
    ev = cv.eigenvalues(lambda v: A @ v, jax.random.key(1), like=jnp.zeros(n), k=3, num_iters=q)
    U = ev.vectors  # (k, n)
    want = jnp.linalg.norm(U @ A - ev.values[:, None] * U, axis=1)  # A symmetric: rows u·A = (Au)ᵀ
    assert float(jnp.min(want)) > 1e-4  # not converged: the test can tell residual formulas apart
    np.testing.assert_allclose(ev.residuals, want, rtol=1e-8)
    np.testing.assert_allclose(jnp.linalg.norm(U, axis=1), 1.0, atol=1e-12)
    assert int(ev.num_matvecs) == q
    sd = cv.spectral_density(
        lambda v: A @ v, jax.random.key(1), like=jnp.zeros(n), num_probes=4, num_iters=q
    )
    assert int(sd.num_matvecs) == 4 * q


def _multiple_eigenvalues(n=80, seed=6):
    """7 three times, 5 twice, the rest spread over [0, 2]."""
    lam = np.concatenate([[7.0, 7.0, 7.0, 5.0, 5.0], np.linspace(2.0, 0.0, n - 5)])
    return _spd(n, lam, seed=seed), np.sort(lam)[::-1]


def test_block_lanczos_finds_multiplicities():
    """A block of 3 finds an eigenvalue of multiplicity 3 three times (and one of multiplicity 2
    twice), with residuals that are ‖Au − θu‖ of the returned orthonormal Ritz vectors. (Single-vector
    Lanczos finds the copies only through rounding, after enough steps: with 60 it returns 7 twice
    here, with 21 on the docstring's example once; that limit is the docstring's example.)"""
    n = 80
    A, lam = _multiple_eigenvalues(n)
    mv = lambda v: A @ v  # noqa: E731
    ev = cv.eigenvalues(mv, jax.random.key(0), like=jnp.zeros(n), k=5, num_iters=60, block_size=3)
    np.testing.assert_allclose(ev.values, lam[:5], atol=1e-8)
    U = ev.vectors
    np.testing.assert_allclose(U @ U.T, np.eye(5), atol=1e-10)
    want = jnp.linalg.norm(U @ A - ev.values[:, None] * U, axis=1)
    np.testing.assert_allclose(ev.residuals, want, rtol=1e-6, atol=1e-13)
    assert float(jnp.max(ev.residuals)) < 1e-6
    assert int(ev.num_matvecs) == 60


def test_block_lanczos_budget_chunks_jit_and_pytrees():
    """The budget rounds up to whole blocks; batch_size chunks do not change the result; it runs
    under jit; a dict Hessian's top eigenvalues match the dense one."""
    n = 80
    A, lam = _multiple_eigenvalues(n)
    mv = lambda v: A @ v  # noqa: E731
    key, like = jax.random.key(3), jnp.zeros(n)
    ev = cv.eigenvalues(mv, key, like=like, k=3, num_iters=50, block_size=4)
    assert int(ev.num_matvecs) == 52  # ⌈50/4⌉ = 13 blocks of 4
    chunked = cv.eigenvalues(mv, key, like=like, k=3, num_iters=50, block_size=4, batch_size=3)
    np.testing.assert_allclose(chunked.values, ev.values, rtol=1e-12)
    jitted = jax.jit(
        lambda key, A: cv.eigenvalues(
            lambda v: A @ v, key, like=like, k=3, num_iters=50, block_size=4
        )
    )(key, A)
    np.testing.assert_allclose(jitted.values, ev.values, rtol=1e-12)
    np.testing.assert_allclose(ev.values, lam[:3], atol=1e-8)
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    w = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda z: f(unravel(z)))(flat)))
    ev = cv.eigenvalues(cv.hvp_operator(f, x), jax.random.key(0), like=x, k=4, block_size=2)
    np.testing.assert_allclose(ev.values, w[::-1][:4], atol=1e-9)
    assert ev.vectors["W"].shape == (4, 3, 4)


def test_block_lanczos_full_basis_and_float32():
    """``num_iters = n`` with blocks: every Ritz value matches eigh (the basis spans everything, the
    last block included), in float32 to its rounding with an orthonormal basis."""
    n = 48
    lam = np.concatenate([np.full(4, 3.0), np.geomspace(1e-2, 2.0, n - 4)])
    A = _spd(n, lam, seed=9).astype(jnp.float32)
    ev = cv.eigenvalues(
        lambda v: A @ v,
        jax.random.key(1),
        like=jnp.zeros(n, jnp.float32),
        k=n,
        num_iters=n,
        block_size=4,
    )
    assert ev.values.dtype == jnp.float32 and int(ev.num_matvecs) == n
    w = np.linalg.eigvalsh(np.asarray(A, np.float64))[::-1]
    np.testing.assert_allclose(np.asarray(ev.values, np.float64), w, atol=1e-5 * w[0])
    U = np.asarray(ev.vectors, np.float64)
    np.testing.assert_allclose(U @ U.T, np.eye(n), atol=1e-5)


def test_lanczos_dict_hessian_top_eigenvalues():
    f, x = _dict_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    w = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda z: f(unravel(z)))(flat)))
    ev = cv.eigenvalues(cv.hvp_operator(f, x), jax.random.key(0), like=x, k=5)
    np.testing.assert_allclose(ev.values, w[::-1][:5], atol=1e-9)
    assert ev.vectors["W"].shape == (5, 3, 4)


def test_spectral_density_integrates_to_one_and_moments():
    n, p, q = 150, 8, 12
    lam = np.random.default_rng(2).uniform(0.0, 3.0, n)
    A = _spd(n, lam, seed=3)
    sd = cv.spectral_density(
        lambda v: A @ v, jax.random.key(0), like=jnp.zeros(n), num_probes=p, num_iters=q
    )
    assert abs(float(jnp.trapezoid(sd.density, sd.grid)) - 1) < 1e-6
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    # Gauss quadrature is exact for degree ≤ 2q − 1: the quadrature moments equal zᵀA^k z/‖z‖²
    Z = jax.random.rademacher(jax.random.split(jax.random.key(0))[0], (p, n), jnp.float64)
    for k in range(1, 6):
        quad = np.mean(np.sum(sd.weights * sd.nodes**k, axis=1))
        Ak = np.linalg.matrix_power(np.asarray(A), k)
        exact = np.mean(np.einsum("pi,ij,pj->p", Z, Ak, Z)) / n
        np.testing.assert_allclose(quad, exact, rtol=1e-8)
        assert abs(quad - np.sum(lam**k) / n) < 0.1 * np.sum(lam**k) / n  # tr(Aᵏ)/n within MC error
    mean = float(jnp.trapezoid(sd.grid * sd.density, sd.grid))
    assert abs(mean - lam.mean()) < 0.05 * lam.mean()


def test_spectral_density_default_width():
    """The documented default width σ = max((θ_max − θ_min)/100, √ε·max(|θ_max|, 1)), read off the
    default grid (θ_min − 5σ to θ_max + 5σ), for a spread spectrum and for a one-point one (where the
    floor keeps the density finite)."""
    n = 100
    for lam in (np.random.default_rng(2).uniform(0.5, 3.0, n), np.full(n, 2.0)):
        A = _spd(n, lam, seed=3)
        sd = cv.spectral_density(
            lambda v, A=A: A @ v, jax.random.key(0), like=jnp.zeros(n), num_probes=4, num_iters=10
        )
        lo, hi = float(jnp.min(sd.nodes)), float(jnp.max(sd.nodes))
        sigma = max((hi - lo) / 100, np.finfo(np.float64).eps ** 0.5 * max(abs(hi), 1.0))
        assert float(sd.grid[0]) == pytest.approx(lo - 5 * sigma, rel=1e-9, abs=1e-12)
        assert float(sd.grid[-1]) == pytest.approx(hi + 5 * sigma, rel=1e-9, abs=1e-12)
        assert bool(jnp.all(jnp.isfinite(sd.density)))
        assert abs(float(jnp.trapezoid(sd.density, sd.grid)) - 1) < 1e-6


def test_hutchpp_sketch_takes_a_third_of_the_budget():
    """Hutch++ spends m/3 matvecs on the sketch S, m/3 on A·Q and m/3 on the Hutchinson probes of the
    rest: with m = 30 on a rank-10 PSD operator the 10-column sketch spans its range, so the estimate
    is exact up to rounding (a smaller sketch leaves an O(1) error)."""
    n = 80
    A = _spd(n, np.concatenate([np.arange(1.0, 11.0), np.zeros(n - 10)]), seed=2)
    for key in range(3):
        e = cv.trace(
            lambda v: A @ v,
            jax.random.key(key),
            like=jnp.zeros(n),
            num_matvecs=30,
            method="hutch++",
        )
        assert abs(float(e.value) - 55.0) < 1e-10
        assert int(e.num_matvecs) == 30


def test_rtol_target_is_relative_to_the_whole_estimate(mats):
    """Hutch++'s stop compares its standard error with rtol·|sketch trace + residual estimate|; on
    1/k² the residual part is small, and a target relative to it alone would never be met."""
    A, exact = mats["inv_k2"]
    e = cv.trace(
        lambda v: A @ v,
        jax.random.key(0),
        like=jnp.zeros(N),
        num_matvecs=150,
        method="hutch++",
        rtol=1e-2,
    )
    assert int(e.num_matvecs) < 150
    assert float(e.std_error) < 1e-2 * abs(float(e.value))
    assert abs(float(e.value) - exact) < 4 * float(e.std_error)


def test_settled_needs_the_previous_sketch_to_agree():
    """The X-methods stop only where this sketch's error bar is small and the previous (half-size)
    sketch's estimate lies within 1.96 of its standard errors; never at the first size."""
    est = cv.Estimate(jnp.asarray(1.0), jnp.asarray(1e-3), jnp.asarray(20))
    near = cv.Estimate(jnp.asarray(1.05), jnp.asarray(0.1), jnp.asarray(10))
    far = cv.Estimate(jnp.asarray(2.0), jnp.asarray(0.1), jnp.asarray(10))
    assert bool(cv._settled(est, near, 1e-2))
    assert not bool(cv._settled(est, far, 1e-2))  # a small error bar alone is not enough
    assert not bool(cv._settled(est, None, 1e-2))
    assert not bool(cv._settled(est, near, 1e-4))  # the error bar itself above the target


def test_loo_se_without_pair_covariance_is_the_studentized_spread():
    """With no covariance between the leave-one-out terms (every Δ_ij = 0), the standard error is the
    sample one, √(s²/k) with s² the unbiased (k − 1) variance, times the critical-value ratio."""
    k = 7
    t = jnp.asarray(np.random.default_rng(0).normal(size=k))
    se = cv._loo_se(t, jnp.broadcast_to(t[:, None], (k, k)))
    m2, m3, m4 = cv._moments(t)
    want = jnp.sqrt(jnp.var(t, ddof=1) / k) * cv._quantile_ratio(k, m2, m3, m4)
    assert float(se) == pytest.approx(float(want), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Calibration (slow)


# Cases that miss the 0.93–0.97 coverage band (measured coverage over the test's 1000 seeds).
# strict: when a fix lands they XPASS and the suite says so.
MISCALIBRATED: dict[tuple[str, str, int], float] = {
    # empty: the last case, auto with 10 matvecs on 1/k (psd=False), 0.929, is 0.937 since auto's
    # Hutchinson branch takes its standard error from the probes its decision did not see.
}
# 200 seeds (the count) measure a coverage of 0.95 only to ±0.015 (one binomial standard
# deviation), so a calibrated estimator would leave the 0.93–0.97 band in about one case of five; with
# 1000 seeds the band is ±2.9 standard deviations wide.
CALIBRATION_SEEDS = 1000


def _calibration_cases():
    for m in (10, 30):
        for spectrum in ["inv_k2", "inv_k", "flat", "lowrank_noise"]:
            for method in cv.TRACE_METHODS:
                cov = MISCALIBRATED.get((spectrum, method, m))
                marks = (
                    [
                        pytest.mark.xfail(
                            strict=True, reason=f"coverage {cov} outside 0.93-0.97 (issue 5)"
                        )
                    ]
                    if cov is not None
                    else []
                )
                yield pytest.param(spectrum, method, m, marks=marks, id=f"{spectrum}-{method}-m{m}")


@pytest.mark.slow
@pytest.mark.parametrize(("spectrum", "method", "m"), list(_calibration_cases()))
def test_error_bars_are_calibrated(mats, method, spectrum, m):
    A, tr = mats[spectrum]
    v, s = _run_seeds(A, method, m, CALIBRATION_SEEDS)
    coverage = np.mean(np.abs(v - tr) <= 1.96 * s)
    assert 0.93 <= coverage <= 0.97, coverage


# ------------------------------------------------------------------------------------------------
# Sharding (subprocess with 8 CPU devices)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        from gradlab import curvature as cv
        assert jax.device_count() == 8
        mesh = jax.make_mesh((8,), ("probes",))
        n = 64
        U = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))[0]
        A = jnp.asarray((U / np.arange(1, n + 1)) @ U.T)
        # jax.make_mesh gives Explicit axes: the eager X-methods with rtol used to fail on them
        cases = [("hutchinson", None), ("xnystrace", None), ("xtrace", 1e-6), ("xnystrace", 1e-6),
                 ("auto", 1e-6), ("hutch++", 1e-6)]
        for method, rtol in cases:
            kw = dict(like=jnp.zeros(n), num_matvecs=30, method=method, rtol=rtol)
            a = cv.trace(lambda v: A @ v, jax.random.key(0), **kw)
            b = cv.trace(lambda v: A @ v, jax.random.key(0), mesh=mesh, **kw)
            c = jax.jit(lambda k: cv.trace(lambda v: A @ v, k, mesh=mesh, batch_size=2, **kw))(
                jax.random.key(0))
            for e in (b, c):
                assert abs(float(e.value - a.value)) <= 1e-12 * abs(float(a.value)), method
                assert abs(float(e.std_error - a.std_error)) <= 1e-12 * abs(float(a.value)), method
        f = lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum(p["w"] ** 4)
        x = {"w": jnp.linspace(-1.0, 1.0, 40)}
        a = cv.hessian_trace(f, x, jax.random.key(1), num_matvecs=20)
        b = cv.hessian_trace(f, x, jax.random.key(1), num_matvecs=20, mesh=mesh)
        assert abs(float(a.value - b.value)) <= 1e-12 * abs(float(a.value))
        print("OK")
        """
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_parameters_are_estimated_in_float32(half):
    """LAPACK has no half-precision QR/eigh: with bfloat16/float16 parameters (alone, or next to
    float32 ones) every estimator runs in float32, and the symmetry test allows the half-precision
    rounding (a bfloat16 bias used to make XTrace call the Hessian asymmetric)."""
    n_w, n_b = 20, 10
    A = _spd(n_w + n_b, np.linspace(1.0, 3.0, n_w + n_b), seed=4)

    def f(p):
        z = jnp.concatenate([p["w"].astype(jnp.float32), p["b"].astype(jnp.float32)])
        return 0.5 * z @ A.astype(jnp.float32) @ z

    tr = float(jnp.trace(A))
    for x in (
        {"w": jnp.ones(n_w, half), "b": jnp.ones(n_b, half)},
        {"w": jnp.ones(n_w, jnp.float32), "b": jnp.ones(n_b, half)},
    ):
        for method in cv.TRACE_METHODS:
            e = cv.hessian_trace(f, x, jax.random.key(1), num_matvecs=16, method=method, psd=True)
            assert e.value.dtype == jnp.float32 and e.std_error.dtype == jnp.float32
            assert abs(float(e.value) - tr) <= 4 * float(e.std_error) + 1e-2 * tr, method
        op = cv.hvp_operator(f, x)
        d = cv.diagonal(op, jax.random.key(0), like=x, num_matvecs=12, method="xdiag")
        # a pytree like the parameters, in float32 (half-precision leaves are promoted)
        assert jax.tree.map(lambda a: a.dtype, d.value) == {"w": jnp.float32, "b": jnp.float32}
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(d))
        ev = cv.eigenvalues(op, jax.random.key(0), like=x, k=2, num_iters=30)
        np.testing.assert_allclose(
            ev.values, np.linalg.eigvalsh(np.asarray(A))[::-1][:2], rtol=2e-2
        )
        sd = cv.spectral_density(op, jax.random.key(0), like=x, num_probes=2, num_iters=10)
        assert abs(float(jnp.trapezoid(sd.density, sd.grid)) - 1) < 1e-3


def test_hessian_trace_batches_by_backend(monkeypatch):
    """batch_size=None: one HVP at a time on the CPU backend (cheapest there), one vmap elsewhere."""
    seen = []
    real = cv.trace

    def spy(*args, **kw):
        seen.append(kw["batch_size"])
        return real(*args, **kw)

    monkeypatch.setattr(cv, "trace", spy)
    f, x = lambda p: jnp.sum(p**4), jnp.linspace(-1.0, 1.0, 6)
    monkeypatch.setattr(cv.jax, "default_backend", lambda: "cpu")
    a = cv.hessian_trace(f, x, jax.random.key(0), num_matvecs=4)
    monkeypatch.setattr(cv.jax, "default_backend", lambda: "gpu")
    b = cv.hessian_trace(f, x, jax.random.key(0), num_matvecs=4)
    c = cv.hessian_trace(f, x, jax.random.key(0), num_matvecs=4, batch_size=2)
    assert seen == [1, None, 2]
    np.testing.assert_allclose(
        [b.value, c.value], a.value, rtol=1e-12
    )  # batching changes no number


def test_block_lanczos_exhausted_krylov_space_and_tiny_scale():
    """A rank-2 operator scaled by 1e-12: the block Krylov space of a block of 3 is exhausted after
    one step (every later direction is replaced by a random one orthogonal to the basis), and the
    scale of A must not matter — the two nonzero eigenvalues and the zero eigenvalue are exact."""
    n = 30
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((n, 2)))[0]
    A = jnp.asarray(1e-12 * (U * np.array([3.0, 2.0])) @ U.T)
    ev = cv.eigenvalues(
        lambda v: A @ v, jax.random.key(0), like=jnp.zeros(n), k=3, num_iters=12, block_size=3
    )
    np.testing.assert_allclose(ev.values, [3e-12, 2e-12, 0.0], atol=1e-24)
    U_out = ev.vectors
    np.testing.assert_allclose(U_out @ U_out.T, np.eye(3), atol=1e-12)
