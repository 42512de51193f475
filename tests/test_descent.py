"""The descent engine: GD against the theory and ANCHORS, compile-once, stopping, costs, errors."""

import dataclasses
import math
import re
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import descent, problems, theory
from gradlab import grads as grads_mod
from gradlab._validate import NotScalarError, OptionError

TOL = 1e-6


class Est(NamedTuple):  # the strategy contract, locally (independent of gradlab.grads)
    value: jax.Array
    grad: jax.Array
    num_fun_evals: jax.Array
    num_grads: jax.Array
    num_jvps: jax.Array
    std_error: jax.Array


def local_exact(fn, params, key):
    del key
    value, grad = jax.value_and_grad(fn)(params)
    return Est(value, grad, jnp.int32(0), jnp.int32(1), jnp.int32(0), jnp.zeros(()))


def local_sphere(fn, params, key, mu=1e-5):
    """Two-point sphere estimator, one direction: G = d (f(x+μu) − f(x−μu))/(2μ) u."""
    u = jax.random.normal(key, params.shape, params.dtype)
    u = u / jnp.linalg.norm(u)
    fp, fm = fn(params + mu * u), fn(params - mu * u)
    g = params.size * (fp - fm) / (2 * mu) * u
    return Est((fp + fm) / 2, g, jnp.int32(2), jnp.int32(0), jnp.int32(0), jnp.full((), jnp.nan))


def lsq(seed, dim=10):
    return problems.make("least_squares", jax.random.key(seed), dim=dim, num_samples=2 * dim)


def gd(p, strategy=local_exact, *, step=None, **kw):
    step = 1 / p.smoothness if step is None else step
    kw.setdefault("num_steps", 5000)
    return descent.run(
        p.loss, p.init, strategy, optax.sgd(step), key=jax.random.key(0), f_star=p.min_value, **kw
    )


# --- GD with the exact gradient -------------------------------------------------------------------------


def test_gd_converges_and_is_below_the_theory_bound(seed):
    p = lsq(seed)
    h = gd(p, tol=TOL)
    assert not h.diverged and h.steps_to_tol == h.steps_run
    gap = h.relative_gap
    assert gap[-1] <= TOL < gap[-2]
    # ANCHORS: 61 iterations at d = 10 (median over seeds); same order of magnitude here
    assert 20 <= h.steps_to_tol <= 200
    # (1 − μ/L)^k is a bound on the relative gap at every step
    bound = theory.gd_rate(np.arange(h.steps_run + 1), L=p.smoothness, mu=p.strong_convexity)
    assert np.all(gap <= bound * (1 + 1e-9) + 1e-12)
    assert h.steps_to_tol <= theory.steps_to_tol(
        lambda k: theory.gd_rate(k, L=p.smoothness, mu=p.strong_convexity), TOL
    )
    # strong convexity: ‖w − w*‖² ≤ 2(f(w) − f*)/μ
    err2 = float(jnp.sum((h.params - p.solution) ** 2))
    assert err2 <= 2 * (h.loss[-1] - p.min_value) / p.strong_convexity * (1 + 1e-6) + 1e-20
    # per-step cost: one gradient per step, cumulative, starting at 0
    np.testing.assert_array_equal(h.num_grads, np.arange(h.steps_run + 1))
    np.testing.assert_array_equal(h.num_fun_evals, 0)
    assert h.fun_evals_to_tol == 0
    assert h.compile_time > 0 and h.run_time > 0
    assert "steps_run" in repr(h) and "tol reached" in h.summary()


def test_compile_once_no_retrace():
    p = lsq(1)
    traces = []

    def loss(w):
        traces.append(1)
        return p.loss(w)

    opt = optax.sgd(1 / p.smoothness)
    h1 = descent.run(loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=50)
    n = len(traces)
    assert n > 0 and h1.compile_time > 0
    w1 = p.init + 1.0
    h2 = descent.run(loss, w1, local_exact, opt, key=jax.random.key(5), num_steps=70)
    assert len(traces) == n, "a second run with new values retraced"
    assert (
        h2.compile_time == 0.0
        and h2.steps_run == 70
        and h2.loss[0] == pytest.approx(float(p.loss(w1)))
    )


def test_early_stop_trims_arrays_inside_a_chunk():
    p = lsq(2)
    full = gd(p, num_steps=400, chunk_size=400)
    h = gd(p, tol=TOL, num_steps=400, chunk_size=37)  # the stop falls inside a chunk
    k = h.steps_to_tol
    assert k is not None and h.steps_run == k
    for arr in (h.loss, h.num_fun_evals, h.num_grads, h.num_jvps):
        assert arr.shape == (k + 1,)
    # the trajectory does not depend on the chunking, and params are those at the stop
    np.testing.assert_allclose(h.loss, full.loss[: k + 1], rtol=1e-12)
    np.testing.assert_allclose(float(p.loss(h.params)), h.loss[-1], rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 37])
def test_unrolled_blocks_stop_exactly_where_single_steps_do(chunk_size):
    # a block of 8 steps is speculative: a stop inside it is undone and replayed step by step
    p = lsq(2)
    one = gd(p, tol=TOL, num_steps=400, unroll=1, chunk_size=chunk_size)
    blk = gd(p, tol=TOL, num_steps=400, unroll=8, chunk_size=chunk_size)
    assert one.steps_to_tol is not None and one.steps_to_tol % 8 != 0  # the stop is inside a block
    assert blk.steps_to_tol == one.steps_to_tol == blk.steps_run
    np.testing.assert_allclose(blk.loss, one.loss, rtol=1e-12)
    np.testing.assert_array_equal(blk.num_grads, one.num_grads)
    np.testing.assert_allclose(blk.params, one.params, rtol=1e-12)
    if chunk_size is not None:  # the rest does not depend on the chunking
        return
    # no tolerance: all steps, the last < 8 of them by the step loop
    a, b = gd(p, num_steps=301, unroll=1), gd(p, num_steps=301, unroll=8)
    assert b.steps_run == 301 and b.loss.shape == (302,)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-12)
    # a sampled strategy sees the same keys step by step
    s1 = gd(p, local_sphere, step=1 / (10 * p.smoothness), num_steps=100, unroll=1)
    s8 = gd(p, local_sphere, step=1 / (10 * p.smoothness), num_steps=100, unroll=8)
    np.testing.assert_allclose(s8.loss, s1.loss, rtol=1e-10)


def test_default_unroll_is_one_on_the_cpu_and_eight_elsewhere(monkeypatch):
    """unroll=None: one step per loop iteration on the CPU backend, blocks of 8 on accelerators (an
    XLA:GPU iteration reads its predicate back to the host); the stop and the losses do not change."""
    p = lsq(2)
    configs = []
    real = descent._Config

    def spy(*args):
        configs.append(real(*args))
        return configs[-1]

    monkeypatch.setattr(descent, "_Config", spy)
    monkeypatch.setattr(descent.jax, "default_backend", lambda: "cpu")
    cpu = gd(p, tol=TOL, num_steps=400)
    monkeypatch.setattr(descent.jax, "default_backend", lambda: "gpu")
    acc = gd(p, tol=TOL, num_steps=400)
    with jax.default_device(jax.devices("cpu")[0]):  # computations on the CPU device: its default
        dev = gd(p, tol=TOL, num_steps=400)
    assert [c.unroll for c in configs] == [1, 8, 1]
    assert dev.steps_to_tol == cpu.steps_to_tol
    assert cpu.steps_to_tol is not None and cpu.steps_to_tol % 8 != 0
    assert acc.steps_to_tol == cpu.steps_to_tol
    np.testing.assert_allclose(acc.loss, cpu.loss, rtol=1e-12)


def test_executables_are_not_reused_across_precision_or_device():
    """The executable cache keys on x64, the default matmul precision (TF32 or full float32 on a GPU)
    and the default device, as jax.jit's own cache does."""
    p = lsq(1)
    opt = optax.sgd(1 / p.smoothness)

    def go(run=descent.run):
        return run(p.loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=5)

    go()
    assert go().compile_time == 0.0  # a hit
    with jax.default_matmul_precision("bfloat16"):
        assert go().compile_time > 0
        assert go().compile_time == 0.0
    with jax.default_device(jax.devices("cpu")[0]):
        assert go().compile_time > 0
    assert go().compile_time == 0.0  # the first executable is still there

    def cg():
        return descent.fd_cg(p.loss, p.init, num_steps=5)

    cg()
    assert cg().compile_time == 0.0
    with jax.default_matmul_precision("bfloat16"):
        assert cg().compile_time > 0


def test_unrolled_blocks_detect_divergence_at_its_step():
    p = lsq(3)
    one = gd(p, step=3 / p.smoothness, num_steps=20000, unroll=1)
    blk = gd(p, step=3 / p.smoothness, num_steps=20000, unroll=8)
    assert blk.diverged and blk.diverged_step == one.diverged_step == blk.steps_run


@pytest.mark.parametrize("unroll", [1, 20])
def test_monitor_every_records_every_kth_step(unroll):
    p = lsq(2)
    full = gd(p, num_steps=95, unroll=1)
    h = gd(p, num_steps=95, monitor_every=10, unroll=unroll)
    np.testing.assert_array_equal(h.steps, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95])
    np.testing.assert_allclose(h.loss, full.loss[h.steps], rtol=1e-12)
    np.testing.assert_array_equal(h.num_grads, h.steps)
    assert h.steps_run == 95 and np.array_equal(full.steps, np.arange(96))
    # the stop is tested on recorded steps only: the first multiple of 10 at or past the exact stop
    exact = gd(p, tol=TOL, num_steps=400)
    t = gd(p, tol=TOL, num_steps=400, monitor_every=10, unroll=unroll)
    assert t.steps_to_tol == t.steps_run == -(-exact.steps_to_tol // 10) * 10 == t.steps[-1]
    assert t.fun_evals_to_tol == t.num_fun_evals[-1] and t.relative_gap[-1] <= TOL
    np.testing.assert_allclose(float(p.loss(t.params)), t.loss[-1], rtol=1e-12)
    # the last step is always recorded and tested: a budget that ends at the exact stop, between
    # two multiples of 10, reaches tol there
    n = exact.steps_to_tol
    assert n % 10
    end = gd(p, tol=TOL, num_steps=n, monitor_every=10, unroll=unroll)
    assert end.steps_to_tol == end.steps_run == n == end.steps[-1]


def test_unrecorded_steps_skip_the_value_only_where_the_optimizer_ignores_it():
    p = lsq(2, dim=100)
    f = p.loss
    assert not descent._update_reads_value(optax.sgd(0.1), f, p.init)
    assert not descent._update_reads_value(optax.adam(0.1), f, p.init)
    assert descent._update_reads_value(optax.lbfgs(), f, p.init)  # its line search reads f(x_k)
    # L-BFGS between records (12 unrecorded steps: the inner loop) follows the recorded trajectory. The
    # run stops while the gap is still ~1e-9 (40 steps at d = 100): once L-BFGS has converged to
    # rounding, its line search's step count follows the rounding, and any change in how XLA compiles
    # the loop (e.g. XLA's small-while-loop option on the CPU) changes the counts of both runs.
    run = lambda every: descent.run(  # noqa: E731
        f,
        p.init,
        local_exact,
        optax.lbfgs(),
        key=jax.random.key(0),
        num_steps=40,
        monitor_every=every,
    )
    full, thin = run(1), run(13)
    np.testing.assert_array_equal(thin.steps, [0, 13, 26, 39, 40])
    assert full.num_fun_evals[-1] > full.steps_run + 1  # the line search spent extra evaluations
    np.testing.assert_allclose(thin.loss, full.loss[thin.steps], rtol=1e-9)
    np.testing.assert_array_equal(thin.num_fun_evals, full.num_fun_evals[thin.steps])


def test_error_monitor_every_and_unroll():
    p = lsq(1)
    with pytest.raises(OptionError, match="monitor_every"):
        gd(p, num_steps=10, monitor_every=0)
    with pytest.raises(OptionError, match="unroll"):
        gd(p, num_steps=10, unroll=-2)


def test_num_steps_limit_without_tol():
    p = lsq(1)
    h = gd(p, num_steps=300, chunk_size=128)  # 3 chunks, the last one partly used
    assert h.steps_run == 300 and h.loss.shape == (301,) and h.steps_to_tol is None
    assert h.num_grads[-1] == 300


def test_divergence_is_detected_and_marked():
    p = lsq(3)
    h = gd(p, step=3 / p.smoothness, num_steps=20000, tol=TOL)
    assert h.diverged and h.steps_to_tol is None
    k = h.diverged_step
    assert k == h.steps_run and h.loss.shape == (k + 1,)
    assert not np.isfinite(h.loss[-1]) and np.all(np.isfinite(h.loss[:-1]))


def test_grad_norm_criterion_and_record():
    p = lsq(1)
    h = descent.run(
        p.loss,
        p.init,
        local_exact,
        optax.sgd(1 / p.smoothness),
        key=jax.random.key(0),
        num_steps=5000,
        tol=1e-6,
    )
    assert h.criterion == "grad_norm" and h.grad_norm is not None
    assert h.grad_norm[-1] <= 1e-6 < h.grad_norm[-2]
    np.testing.assert_allclose(h.grad_norm[0], np.linalg.norm(p.grad(p.init)), rtol=1e-12)
    h2 = gd(p, num_steps=10, record_grad_norm=True)
    assert h2.grad_norm.shape == (11,)
    assert gd(p, num_steps=10).grad_norm is None


@pytest.mark.parametrize(
    "make_opt",
    [lambda L: optax.adam(0.1), lambda L: optax.sgd(1 / L, momentum=0.5), lambda L: optax.lbfgs()],
    ids=["adam", "momentum", "lbfgs"],
)
def test_other_optimizers_run(make_opt):
    p = lsq(1)
    h = descent.run(
        p.loss,
        p.init,
        local_exact,
        make_opt(p.smoothness),
        key=jax.random.key(0),
        num_steps=300,
        tol=1e-4,
        f_star=p.min_value,
    )
    assert not h.diverged and h.steps_to_tol is not None
    assert np.all(np.diff(h.num_fun_evals) >= 0)


def test_lbfgs_counts_linesearch_evaluations():
    p = lsq(2)
    h = descent.run(
        p.loss,
        p.init,
        local_exact,
        optax.lbfgs(),
        key=jax.random.key(0),
        num_steps=30,
        tol=1e-8,
        f_star=p.min_value,
    )
    # the strategy costs 1 gradient per step; the zoom line search adds ≥ 1 value_and_grad per step
    assert h.num_fun_evals[-1] >= h.steps_run
    assert h.num_grads[-1] >= 2 * h.steps_run
    assert h.steps_to_tol is not None and h.steps_to_tol < 30


def _hand_linesearch_counts(fn, x, opt, num_steps, zoom):
    """Cumulative (function evaluations, gradients) of an exact-gradient optax loop run by hand: one
    gradient per step for the estimate, plus the line search's own count read from its state."""

    @jax.jit  # one compiled step (eager optax line searches take seconds per step)
    def step(x, state):
        v, g = jax.value_and_grad(fn)(x)
        u, state = opt.update(g, state, x, value=v, grad=g, value_fn=fn)
        return optax.apply_updates(x, u), state

    state, fe, gr = opt.init(x), [0], [0]
    for _ in range(num_steps):
        x, state = step(x, state)
        n = int(optax.tree_utils.tree_get(state, "num_linesearch_steps"))
        fe.append(fe[-1] + n)
        gr.append(gr[-1] + 1 + (n if zoom else 0))
    return np.asarray(fe), np.asarray(gr)


@pytest.mark.parametrize("kind", ["zoom", "backtracking"])
def test_linesearch_counts_equal_a_hand_loop(kind):
    """Every evaluation a line search makes is counted, exactly: zoom (optax.lbfgs) one value and one
    gradient per line-search step, backtracking one value."""
    p = lsq(3)
    if kind == "zoom":
        opt = optax.lbfgs()
    else:  # a unit step overshoots here (fe[-1] > 0 below), so backtracking has work to do
        opt = optax.chain(
            optax.sgd(1.0), optax.scale_by_backtracking_linesearch(max_backtracking_steps=30)
        )
    h = descent.run(p.loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=25)
    fe, gr = _hand_linesearch_counts(p.loss, p.init, opt, h.steps_run, kind == "zoom")
    assert fe[-1] > 0  # the line search did evaluate
    np.testing.assert_array_equal(h.num_fun_evals, fe)
    np.testing.assert_array_equal(h.num_grads, gr)


def test_a_start_point_that_already_stops():
    """Step 0 itself can end the run: within tol at the optimum (steps_to_tol = 0, not diverged), or a
    non-finite loss at x₀ (diverged at step 0); the History then holds x₀ alone."""
    p = lsq(4)
    at_opt = descent.run(
        p.loss,
        p.solution,
        local_exact,
        optax.sgd(0.1),
        key=jax.random.key(0),
        num_steps=50,
        tol=1e-6,
    )
    assert at_opt.steps_to_tol == 0 and not at_opt.diverged and at_opt.diverged_step is None
    assert (
        at_opt.steps_run == 0 and at_opt.loss.shape == (1,) and at_opt.num_fun_evals.tolist() == [0]
    )
    nan_at_start = descent.run(
        lambda x: jnp.sum(x**2) / jnp.sum(x),  # 0/0 at x = 0
        jnp.zeros(3),
        local_exact,
        optax.sgd(0.1),
        key=jax.random.key(0),
        num_steps=50,
    )
    assert nan_at_start.diverged and nan_at_start.diverged_step == 0
    assert nan_at_start.steps_to_tol is None and nan_at_start.steps_run == 0


def test_a_tolerance_below_the_float32_rounding_is_an_error():
    """In float32, a relative gap far below ε·|f*|/(f(x₀) − f*) cannot be seen: the loss rounds onto
    f* first and the test would pass by rounding (tol = 1e-12 'reached' at a true gap of 3e-7)."""
    p = problems.make("quadratic", jax.random.key(0), dtype="float32")
    common = {"key": jax.random.key(1), "num_steps": 2000, "f_star": p.min_value}
    opt = optax.sgd(theory.gd_step(p.smoothness))
    ok = descent.run(p.loss, p.init, local_exact, opt, tol=1e-6, **common)
    assert ok.steps_to_tol is not None and ok.relative_gap[ok.steps_to_tol] > 0
    match = r"tol=1e-12: in float32 the relative gap .* cannot be resolved below about 4.7e-07"
    with pytest.raises(OptionError, match=match):
        descent.run(p.loss, p.init, local_exact, opt, tol=1e-12, **common)
    with pytest.raises(OptionError, match=match):
        descent.fd_cg(p.loss, p.init, tol=1e-12, f_star=p.min_value, num_steps=50)
    # the tolerance the message suggests is accepted
    with pytest.raises(OptionError) as err:
        descent.run(p.loss, p.init, local_exact, opt, tol=1e-9, **common)
    suggested = float(re.search(r"Use tol ≥ ([0-9.e+\-]+)", str(err.value)).group(1))
    assert descent.run(p.loss, p.init, local_exact, opt, tol=suggested, **common).steps_run > 0
    # a start below f* is another error: f* is then no lower bound (test_f_star_above_the_start...)
    with pytest.raises(OptionError, match="f_star=1000: above the loss at the start"):
        descent.run(p.loss, p.init, local_exact, opt, tol=2.0, **{**common, "f_star": 1e3})
    with pytest.raises(OptionError, match="f_star: expected a finite optimal value, got nan"):
        descent.run(p.loss, p.init, local_exact, opt, tol=1e-3, **{**common, "f_star": math.nan})
    # float64: the same problem resolves 1e-12
    p64 = problems.make("quadratic", jax.random.key(0))
    h = descent.run(p64.loss, p64.init, local_exact, opt, tol=1e-12, **common)
    assert h.steps_to_tol is not None


def test_costs_do_not_wrap_in_int32_without_x64(python_without_x64):
    """Without x64 the device counts are int32: a cost that varies per step (a line search) is
    recorded per record and summed on the host in int64, so 10⁹ JVPs a step add up past 2³¹."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, optax
        from gradlab import descent, grads
        assert not jax.config.jax_enable_x64
        class Big:
            name = "big"
            def __call__(self, fn, p, k):
                return grads.forward_mode()(fn, p, k)._replace(num_jvps=jnp.int32(10**9))
        f = lambda x: jnp.sum((x - 1.0) ** 2)
        for kw in ({}, {"monitor_every": 2, "chunk_size": 4}):
            h = descent.run(f, jnp.zeros(3), Big(), optax.lbfgs(), key=jax.random.key(0),
                            num_steps=9, **kw)
            assert h.num_jvps.dtype.name == "int64", h.num_jvps.dtype
            assert (h.num_jvps == h.steps * 10**9).all(), (h.steps, h.num_jvps)
        print("ok")
        """
    )
    python_without_x64(code, timeout=120)


def test_the_compiled_cache_follows_the_x64_setting():
    """The same fn/strategy/optimizer run with x64 off and then inside `with jax.enable_x64(False)`
    ... and back: the executables are cached per x64 setting (a cached float64 executable fed float32
    arrays used to raise 'Argument types differ')."""
    f = lambda x: jnp.sum((x - 1.0) ** 2)  # noqa: E731
    opt = optax.sgd(0.1)
    a = descent.run(f, jnp.zeros(3), local_exact, opt, key=jax.random.key(0), num_steps=5)
    with jax.enable_x64(False):
        b = descent.run(
            f, jnp.zeros(3, jnp.float32), local_exact, opt, key=jax.random.key(0), num_steps=5
        )
    assert a.loss.dtype == np.float64 and b.loss.dtype == np.float32
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-6)


def test_dict_params_mlp_runs():
    p = problems.make("mlp", jax.random.key(0), in_dim=2, hidden=4, out_dim=1, num_samples=20)
    h = descent.run(
        p.loss, p.init, local_exact, optax.adam(1e-2), key=jax.random.key(0), num_steps=100
    )
    assert h.steps_run == 100 and h.loss[-1] < h.loss[0]
    assert sorted(h.params) == ["W1", "W2", "b1", "b2"]
    assert jax.tree.map(jnp.shape, h.params) == jax.tree.map(jnp.shape, p.init)


# --- zero-order GD against GD: the seed's O(d) factor ------------------------------------------------------


def test_zero_order_sphere_takes_about_d_times_gd(seed):
    d = 10
    p = lsq(seed, dim=d)
    exact = gd(p, tol=TOL)
    zo = descent.run(
        p.loss,
        p.init,
        local_sphere,
        optax.sgd(theory.zo_sphere_step(p.smoothness, d)),
        key=jax.random.key(100 + seed),
        num_steps=20000,
        tol=TOL,
        f_star=p.min_value,
    )
    assert zo.steps_to_tol is not None
    ratio = zo.steps_to_tol / exact.steps_to_tol
    assert 0.5 * d <= ratio <= 2 * d, ratio
    # cost: 2 function evaluations per step, no gradients
    np.testing.assert_array_equal(zo.num_fun_evals, 2 * np.arange(zo.steps_run + 1))
    assert zo.fun_evals_to_tol == 2 * zo.steps_to_tol and zo.num_grads[-1] == 0


# --- errors ---------------------------------------------------------------------------------------------


def _args():
    p = lsq(1)
    return p, optax.sgd(1 / p.smoothness)


def test_error_non_scalar_loss():
    p, opt = _args()
    with pytest.raises(NotScalarError, match="fn"):
        descent.run(
            lambda w: p.data["X"] @ w, p.init, local_exact, opt, key=jax.random.key(0), num_steps=5
        )


@pytest.mark.parametrize("num_steps", [0, -1, 2.5, True])
def test_error_num_steps(num_steps):
    p, opt = _args()
    with pytest.raises(OptionError, match="num_steps"):
        descent.run(p.loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=num_steps)


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan")])
def test_error_tol(tol):
    p, opt = _args()
    with pytest.raises(OptionError, match="tol"):
        descent.run(p.loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=5, tol=tol)


def test_error_missing_key():
    p, opt = _args()
    with pytest.raises(OptionError, match="key"):
        descent.run(p.loss, p.init, local_exact, opt, key=None, num_steps=5)
    with pytest.raises(TypeError):
        descent.run(
            p.loss, p.init, local_exact, opt, num_steps=5
        )  # key is keyword-only and required
    with pytest.raises(OptionError, match="key"):
        descent.run(p.loss, p.init, local_exact, opt, key=3, num_steps=5)


def test_error_strategy_and_optimizer():
    p, opt = _args()
    with pytest.raises(OptionError, match="strategy"):
        descent.run(p.loss, p.init, "exact", opt, key=jax.random.key(0), num_steps=5)
    with pytest.raises(OptionError, match="optimizer"):
        descent.run(p.loss, p.init, local_exact, 0.1, key=jax.random.key(0), num_steps=5)


def test_error_constructor_passed_as_strategy():
    p, opt = _args()
    with pytest.raises(OptionError, match=r"constructor grads.exact itself; call it"):
        descent.run(p.loss, p.init, grads_mod.exact, opt, key=jax.random.key(0), num_steps=5)


def test_error_integer_params():
    _, opt = _args()
    with pytest.raises(OptionError, match=r"params: the array has dtype int"):
        descent.run(
            lambda x: jnp.sum(x * 1.0) ** 2,
            jnp.arange(3),
            local_exact,
            opt,
            key=jax.random.key(0),
            num_steps=5,
        )
    with pytest.raises(NotScalarError, match=r"fn: .*floating-point scalar.*got dtype int"):
        descent.run(
            lambda x: jnp.sum(x).astype(jnp.int32),
            jnp.ones(3),
            local_exact,
            opt,
            key=jax.random.key(0),
            num_steps=5,
        )


@pytest.mark.parametrize("method", ["run", "fd_cg"])
def test_f_star_above_the_start_is_an_error(method):
    """An f* above f(x₀) is no lower bound: the relative gap would start negative and the stop test
    pass at step 0 ('converged'); it is an error naming f_star. f* equal to f(x₀) stops at 0."""
    f = lambda x: jnp.sum(x**2)  # noqa: E731
    x0 = jnp.ones(3)  # f(x0) = 3

    def go(f_star):
        if method == "fd_cg":
            return descent.fd_cg(f, x0, num_steps=10, tol=1e-3, f_star=f_star)
        opt = optax.sgd(0.1)
        return descent.run(
            f, x0, local_exact, opt, key=jax.random.key(0), num_steps=10, tol=1e-3, f_star=f_star
        )

    with pytest.raises(OptionError, match=r"f_star=100: above the loss at the start, f\(x₀\) = 3"):
        go(100.0)
    assert go(3.0).steps_to_tol == 0  # already optimal
    assert go(0.0).steps_run > 0


def test_error_strategy_grad_structure():
    p, opt = _args()

    def bad(fn, params, key):
        e = local_exact(fn, params, key)
        return e._replace(grad=e.grad[:3])

    with pytest.raises(ValueError, match="strategy"):
        descent.run(p.loss, p.init, bad, opt, key=jax.random.key(0), num_steps=5)


# --- the real strategies of gradlab.grads × catalog problems ------------------------------------------------

grads = pytest.importorskip("gradlab.grads")
STRATEGIES = grads.names()


@pytest.mark.parametrize("problem", ["least_squares", "quadratic"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs(name, problem):
    d = 5
    p = problems.make(problem, jax.random.key(1), dim=d)
    strategy = grads.make(name)
    opt = optax.sgd(1 / (d * p.smoothness))  # the zero-order step: safe for every strategy
    h = descent.run(p.loss, p.init, strategy, opt, key=jax.random.key(2), num_steps=200)
    assert not h.diverged and h.steps_run == 200
    assert np.all(np.isfinite(h.loss)) and h.loss[-1] < h.loss[0]
    # cumulative cost = per-estimate cost × steps
    est = strategy(p.loss, p.init, jax.random.key(0))
    for field in ("num_fun_evals", "num_grads", "num_jvps"):
        per_step = int(getattr(est, field))
        np.testing.assert_array_equal(getattr(h, field), per_step * np.arange(201), err_msg=field)


def test_real_exact_matches_local_exact():
    p = lsq(1)
    opt = optax.sgd(1 / p.smoothness)
    a = descent.run(p.loss, p.init, grads.exact(), opt, key=jax.random.key(0), num_steps=50)
    b = descent.run(p.loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=50)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)


def test_divergence_without_tol_is_detected_and_params_are_at_the_stop():
    p = lsq(3)
    h = gd(p, step=3 / p.smoothness, num_steps=20000)
    assert h.diverged and h.diverged_step == h.steps_run < 20000
    assert h.loss.shape == (h.steps_run + 1,) and h.num_grads[-1] == h.steps_run
    assert not np.isfinite(h.loss[-1]) and np.all(np.isfinite(h.loss[:-1]))


def test_exact_value_strategies_monitor_the_true_loss():
    assert descent._value_is_exact(grads.exact()) and descent._value_is_exact(grads.forward_mode())
    assert not descent._value_is_exact(grads.two_point()) and not descent._value_is_exact(
        local_exact
    )
    p = lsq(2)
    for strategy in (grads.two_point(), grads.forward_difference()):
        h = gd(p, strategy, step=1 / (10 * p.smoothness), num_steps=30)
        want = [float(p.loss(h.params))]
        np.testing.assert_allclose(h.loss[-1:], want, rtol=1e-12)
        np.testing.assert_allclose(h.loss[0], float(p.loss(p.init)), rtol=1e-12)


@pytest.mark.slow  # 96 compiles (~2-3 min on 2 cores); CI runs it after the default suite
@pytest.mark.parametrize("problem", problems.names())
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_on_every_catalog_problem(name, problem):
    """The registry product: every strategy × every catalog problem runs through descent.run."""
    p = problems.make(problem, jax.random.key(3))
    flat, _ = ravel_pytree(p.init)
    d = flat.size
    lr = 0.1 / (d * p.smoothness) if p.smoothness else 1e-4
    strategy = grads.make(name)
    h = descent.run(p.loss, p.init, strategy, optax.sgd(lr), key=jax.random.key(4), num_steps=20)
    assert not h.diverged and h.steps_run == 20
    assert np.all(np.isfinite(h.loss))
    assert jax.tree.structure(h.params) == jax.tree.structure(p.init)
    est = strategy(p.loss, p.init, jax.random.key(0))
    np.testing.assert_array_equal(h.num_fun_evals, int(est.num_fun_evals) * np.arange(21))
    if name in ("exact", "forward_mode", "forward_difference", "central_difference"):
        assert h.loss[-1] <= h.loss[0]  # a small step along a (near-)exact gradient descends


def test_run_inside_a_transformation_is_named():
    """descent.run and fd_cg drive their loops from the host: under jit/vmap/grad the arguments are
    tracers, which must give an error naming the argument, not JAX's TracerArrayConversionError."""
    p = lsq(1)
    opt = optax.sgd(0.1)
    with pytest.raises(OptionError, match=r"params: descent\.run got a traced value"):
        jax.jit(
            lambda x: descent.run(p.loss, x, local_exact, opt, key=jax.random.key(0), num_steps=3)
        )(p.init)
    with pytest.raises(OptionError, match=r"f_star: descent\.run got a traced value"):
        jax.vmap(
            lambda fs: descent.run(
                p.loss, p.init, local_exact, opt, key=jax.random.key(0), num_steps=3, f_star=fs
            )
        )(jnp.zeros(2))
    with pytest.raises(OptionError, match=r"params: descent\.fd_cg got a traced value"):
        jax.jit(lambda x: descent.fd_cg(p.loss, x, num_steps=3))(p.init)


def test_relative_gap_when_the_start_is_optimal():
    """f(x₀) = f*: the gap is 0 where the loss stays at f* (not 0/0 = NaN with a RuntimeWarning)."""
    p = lsq(1)
    run = lambda **kw: descent.run(  # noqa: E731
        p.loss, p.solution, local_exact, optax.sgd(0.0), key=jax.random.key(0), num_steps=3, **kw
    )
    f0 = float(run().loss[0])  # f(x₀) exactly as the engine computes it
    np.testing.assert_array_equal(run(f_star=f0).relative_gap, np.zeros(4))
    h = run(f_star=f0)
    h_left = dataclasses.replace(h, loss=np.array([f0, f0, f0 + 1.0, np.nan]))
    np.testing.assert_array_equal(h_left.relative_gap, [0.0, 0.0, np.inf, np.nan])


# --- the compiled loop stays as lean as a hand-written one --------------------------------------------


def _loop_body_kernels(compiled) -> int:
    """Kernels (fusions, dots, copies, custom calls) in the body of the entry computation's last
    ``while`` loop (the step loop of ``descent.run``; the scan of a hand loop), from the optimized HLO."""
    text = compiled.as_text()
    comps = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s", block)
        if m:
            comps["ENTRY" if block.startswith("ENTRY") else m.group(1)] = block
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", comps["ENTRY"])
    body = comps[bodies[-1]]
    kinds = (" fusion(", " dot(", " copy(", " custom-call(")
    return sum(any(k in line for k in kinds) for line in body.splitlines())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel structure")
def test_step_loop_has_no_more_kernels_than_a_hand_loop_recording_the_loss():
    # A hand-written GD loop that records f(x_k) from value_and_grad, compiled with the engine's
    # options, against the engine's step loop on the same problem: the stop test (in the loop's
    # condition) and the pending value (not carried for optax.sgd) add no kernel to the body. Before,
    # the loss reduction fed three consumers and the body had 3 more kernels (12 against 9).
    p = lsq(0, dim=30)
    lr = 1 / p.smoothness
    vg = jax.value_and_grad(p.loss)

    def hand(w):
        def body(w, _):
            v, g = vg(w)
            return w - lr * g, v

        return jax.lax.scan(body, w, None, length=100)

    hand_exe = jax.jit(hand).lower(p.init).compile(descent._compiler_options())
    descent.clear_cache()
    opt = optax.sgd(lr)
    descent.run(p.loss, p.init, grads_mod.exact(), opt, key=jax.random.key(0), num_steps=100)
    (exe,) = [e for k, e in descent._CACHE.items() if k[2] == id(opt)]
    assert _loop_body_kernels(exe.first) <= _loop_body_kernels(hand_exe)


@pytest.mark.parametrize("value", [None, "dict"])
def test_a_strategy_whose_value_is_none_or_a_pytree_still_runs(value):
    """The strategy contract needs ``grad`` and the counts; where the value is not the loss the
    engine evaluates ``fn`` itself, so a value of None or a pytree must not break the loop (the
    pending value it does not carry is replaced leaf by leaf)."""
    p = lsq(0)

    def strategy(fn, params, key):
        est = local_exact(fn, params, key)
        return est._replace(value=None if value is None else {"v": est.value})

    h = gd(p, strategy, num_steps=50)
    ref = gd(p, local_exact, num_steps=50)
    np.testing.assert_allclose(h.loss, ref.loss, rtol=1e-12)
