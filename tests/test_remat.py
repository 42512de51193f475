"""gradlab.remat: gradients equal plain for every strategy, FLOPs prove the recompute, memory follows the
plan, the planner meets Revolve's bound and matches brute force, bad input gets a clear error."""

import itertools
import math
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from gradlab import remat
from gradlab._validate import OptionError, ShapeError, UnknownNameError


def tanh_layer(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][None, :])


def named_layer(p, x):
    return checkpoint_name(tanh_layer(p, x), "out")


def tanh_vjp(p, x, y, ct):
    """The VJP of tanh_layer from its input and output (tanh' = 1 − y²)."""
    dz = ct * (1 - y * y)
    return {"w": x.T @ dz, "b": jnp.sum(dz, axis=0)}, dz @ p["w"].T


CAL = remat.Calibration(tape_cost=3.0, working=3.0, single=2.0, activation_bytes=1)


def chain_problem(L, width=6, batch=3, dtype=jnp.float64, seed=1):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.standard_normal((L, width, width)) / np.sqrt(width), dtype),
        "b": jnp.asarray(0.1 * rng.standard_normal((L, width)), dtype),
    }
    x = jnp.asarray(rng.standard_normal((batch, width)), dtype)
    return params, x


def grad_fn(strategy, layer=tanh_layer, **opts):
    def loss(params, x):
        y = remat.scan_layers(layer, params, x, strategy=strategy, **opts)
        return jnp.sum(jnp.sin(y))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


STRATEGIES = [
    ("per_layer", {}),
    ("every_k", {"k": 3}),
    ("every_k", {"k": 4}),
    ("sqrt", {}),
    ("recursive", {}),
    ("binomial", {}),
    ("binomial", {"snapshots": 1}),
    ("binomial", {"snapshots": 2, "model": "revolve"}),
    ("dots_saveable", {}),
    ("nothing_saveable", {}),
    ("everything_saveable", {}),
    ("save_only_these_names", {"names": ("out",)}),
    ("binomial", {"snapshots": 2, "calibration": CAL}),
    ("none", {"layer_vjp": tanh_vjp}),
    ("recursive", {"layer_vjp": tanh_vjp}),
    ("binomial", {"snapshots": 1, "layer_vjp": tanh_vjp}),
    ("binomial", {"snapshots": 3, "layer_vjp": tanh_vjp}),
]


def _id(v):
    if isinstance(v, dict):
        return ",".join(f"{k}={_id(x)}" for k, x in v.items()) or "-"
    if callable(v):
        return v.__name__
    if isinstance(v, remat.Calibration):
        return "CAL"
    return str(v)


@pytest.mark.parametrize("L", [1, 9])
@pytest.mark.parametrize(("strategy", "opts"), STRATEGIES, ids=_id)
def test_gradients_equal_plain(strategy, opts, L):
    if strategy == "every_k" and opts["k"] > L:
        pytest.skip("k > L")
    params, x = chain_problem(L)
    layer = named_layer if strategy.startswith("save_") else tanh_layer
    ref = grad_fn("none", layer)(params, x)
    got = grad_fn(strategy, layer, **opts)(params, x)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("L", [1, 9])
def test_plain_scan_equals_an_unrolled_python_loop(L):
    """The reference of test_gradients_equal_plain, scan_layers(strategy="none"), against jax.grad
    of the chain written as a Python loop (no scan, no remat): an oracle outside the code under test."""
    params, x = chain_problem(L)

    def loop_loss(params, x):
        for i in range(L):
            x = tanh_layer(jax.tree.map(lambda a, i=i: a[i], params), x)
        return jnp.sum(jnp.sin(x))

    want = jax.grad(loop_loss, argnums=(0, 1))(params, x)
    got = grad_fn("none")(params, x)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_forward_value_and_dict_state():
    params, x = chain_problem(5)
    y0 = remat.scan_layers(tanh_layer, params, x)
    for s in ("sqrt", "binomial", "recursive"):
        # the same arithmetic in another loop structure: equal up to how XLA compiles each loop (bitwise
        # with XLA's defaults; not with its CPU small-while-loop option, which emits small loops whole)
        y = remat.scan_layers(tanh_layer, params, x, strategy=s)
        np.testing.assert_allclose(y, y0, rtol=1e-14, atol=1e-15)

    def layer(p, state):  # a dict-valued state and a pytree of parameters
        return {"h": tanh_layer(p, state["h"]), "n": state["n"] + jnp.sum(p["b"])}

    state = {"h": x, "n": jnp.float64(0.0)}

    def loss(params, strategy):
        out = remat.scan_layers(layer, params, state, strategy=strategy)
        return jnp.sum(out["h"] ** 2) + out["n"]

    g0 = jax.grad(loss)(params, "none")
    g1 = jax.grad(loss)(params, "binomial")
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_compiles_once():
    params, x = chain_problem(6)
    traces = []

    def loss(params, x):
        traces.append(1)
        return jnp.sum(remat.scan_layers(tanh_layer, params, x, strategy="binomial", snapshots=2))

    g = jax.jit(jax.grad(loss))
    g(params, x)
    g(jax.tree.map(lambda a: a + 1.0, params), x + 1.0)
    assert len(traces) == 1


# --- the planner ----------------------------------------------------------------------------------------


@cache
def brute_force(l, s, c, model, w=0.0, single=None):
    """Minimal evaluations by exhaustive recursion (independent of remat._dp's vectorised tables): a run
    is taped at once when its tape (c·l + w; one layer: single) fits s snapshots beyond one layer's."""

    def tape(n):
        return single if (n == 1 and single is not None) else c * n + w

    best = math.inf
    if (l == 1 or model == "chain") and tape(l) <= s + tape(1):
        best = l
    if s >= 1:
        for m in range(1, l):
            best = min(
                best,
                m
                + brute_force(l - m, s - 1, c, model, w, single)
                + brute_force(m, s, c, model, w, single),
            )
    return best


@pytest.mark.parametrize("model", ["revolve", "chain"])
@pytest.mark.parametrize("c", [1.0, 3.0])
def test_plan_matches_brute_force(model, c):
    for L, s in itertools.product(range(1, 16), range(1, 6)):
        p = remat.plan(L, snapshots=s, tape_cost=c, model=model)
        assert p.forward_evals == brute_force(L, s, c, model), (L, s)
        assert p.peak_activations <= s + c + 1e-9


def test_calibrated_plan_matches_brute_force_and_bounds_its_peak():
    """With working buffers (w) and a fused one-layer reversal (single), the schedule for s snapshots is
    still optimal and peaks within s + single: the memory of s snapshots beyond the minimum."""
    for c, w, single in [(3.0, 3.0, 2.0), (1.0, 3.0, 2.0), (2.0, 0.5, 1.5)]:
        cal = remat.Calibration(tape_cost=c, working=w, single=single, activation_bytes=1)
        for L, s in itertools.product(range(1, 14), range(1, 6)):
            p = remat.plan(L, snapshots=s, calibration=cal)
            assert p.forward_evals == brute_force(L, s, c, "chain", w, single), (c, w, L, s)
            assert p.peak_activations <= s + single + 1e-9
    # memory-poor keeps one snapshot and reverses one layer at a time: 1 + single, whatever L
    for L in (2, 17, 64):
        assert remat.plan(L, snapshots=1, calibration=CAL).peak_activations == 3.0
    assert remat.plan(64, strategy="none", calibration=CAL).peak_activations == 3 * 64 + 3
    assert remat.plan(64, strategy="per_layer", calibration=CAL).peak_activations == 64 + 3
    assert remat.plan(64, strategy="sqrt", calibration=CAL).peak_activations == 8 + 3 * 8 + 3


@pytest.mark.parametrize(
    ("s", "t"), [(1, 1), (1, 4), (2, 2), (2, 3), (3, 2), (3, 3), (4, 2), (5, 1)]
)
def test_revolve_bound_is_met_exactly(s, t):
    """β(s, t) = C(s+t, s) steps reversed with ≤ t repeats each; the total is t·l − C(s+t, t−1)."""
    L = math.comb(s + t, s)
    p = remat.plan(L, snapshots=s, model="revolve")
    assert p.max_evals_per_layer - 1 == t
    assert p.recomputations == t * L - math.comb(s + t, t - 1) == remat.revolve_advances(L, s)
    # one more step needs one more repeat somewhere
    assert remat.plan(L + 1, snapshots=s, model="revolve").max_evals_per_layer - 1 == t + 1
    for l in range(1, L + 1):
        assert remat.plan(l, snapshots=s, model="revolve").recomputations == remat.revolve_advances(
            l, s
        )


def test_hand_computed_revolve_schedules():
    # memory-poor, s = 1: advance 0→2, tape 2; advance 0→1, tape 1; tape 0 (3 advances, 6 evaluations)
    p = remat.plan(3, snapshots=1, model="revolve")
    assert p.schedule == remat.Split(
        0, 2, 3, remat.Split(0, 1, 2, remat.Tape(0, 1), remat.Tape(1, 2)), remat.Tape(2, 3)
    )
    assert (p.forward_evals, p.recomputations) == (6, 3)
    # s = 2, l = 3 = β(2, 1): every state stored once, taped from its snapshot: 2 advances
    p = remat.plan(3, snapshots=2, model="revolve")
    assert p.recomputations == 2 and p.max_evals_per_layer == 2
    # s = 2, l = 6 = β(2, 2): 2·6 − C(4, 1) = 8 advances
    assert remat.plan(6, snapshots=2, model="revolve").recomputations == 8
    # the chain model tapes a run at once when memory allows: plain backprop with enough snapshots
    p = remat.plan(5, snapshots=4, tape_cost=1.0)
    assert p.schedule == remat.Tape(0, 5) and p.recomputations == 0


def test_plan_other_strategies():
    p = remat.plan(128, strategy="sqrt", tape_cost=3.0)
    assert p.schedule[0] in (8, 16) and p.forward_evals == 256
    assert remat.plan(128, strategy="recursive").flops_ratio == pytest.approx(2.0)
    # bisection puts the larger half first, as documented (the JAX docs' recursive checkpointing):
    # L = 3 splits into layers [0, 2) and [2, 3), at 5 forward evaluations
    small = remat.plan(3, strategy="recursive")
    assert small.schedule == remat.Split(0, 2, 3, remat.Tape(0, 2), remat.Tape(2, 3))
    assert small.forward_evals == 5
    assert remat.plan(10, strategy="none", tape_cost=3.0).peak_activations == 30
    e = remat.plan(10, strategy="every_k", k=3)
    assert e.forward_evals == 2 * 9 + 1


def test_plan_with_budget_picks_cheapest_that_fits():
    act = 1000.0
    for units in (4, 8, 20, 60, 400):
        p = remat.plan(32, memory_budget=units * act, activation_bytes=act, tape_cost=3.0)
        assert p.peak_bytes <= units * act
        others = [remat.plan(32, strategy=n, tape_cost=3.0) for n in ("none", "sqrt", "recursive")]
        others += [remat.plan(32, strategy="every_k", k=k, tape_cost=3.0) for k in range(1, 33)]
        fits = [o.forward_evals for o in others if o.peak_activations <= units]
        assert p.forward_evals <= min(fits, default=math.inf)
    assert remat.plan(32, memory_budget=1e9, activation_bytes=act).strategy == "none"
    cal = CAL._replace(activation_bytes=act)
    for units in (3, 5, 12, 40):
        p = remat.plan(64, memory_budget=units * act, calibration=cal)
        assert p.peak_bytes <= units * act and p.working == 3.0


# tests marked with the conftest's `xla_cpu` hold XLA:CPU's buffer assignment; XLA:GPU assigns buffers
# differently, which `calibrate` reads off the same way there


def jax_tape(layer, params, x):
    """JAX's own count of the activation-sized residuals one layer saves (``print_saved_residuals``):
    x, tanh and 1 − tanh for the tanh layer through JAX 0.10; x and 1 − tanh² from JAX 0.11."""
    p1 = jax.tree.map(lambda a: a[0], params)
    lines = remat._saved_residual_lines(layer, p1, x)
    return sum(remat._residual_line_bytes(line) == x.nbytes for line in lines)


@pytest.mark.usefixtures("xla_cpu")
def test_tape_cost():
    params, x = chain_problem(3)
    assert remat.tape_cost(tanh_layer, params, x) == jax_tape(tanh_layer, params, x) in (2, 3)
    assert remat.tape_cost(tanh_layer, params, x, policy="dots_saveable") == 1.0


# --- measurement: FLOPs prove the recompute, memory follows the plan ------------------------------------


def test_hlo_flops_matches_cost_analysis_without_loops():
    a = jnp.ones((16, 8))
    b = jnp.ones((8, 4))
    f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b) * 2.0 + 1.0))
    c = f.lower(a, b).compile()
    counted = remat.hlo_flops(c.as_text())
    assert counted["dot_flops"] == 2 * 16 * 8 * 4
    assert counted["flops"] == pytest.approx(c.cost_analysis()["flops"], rel=0.15)


def _chain_grad(strategy, **o):
    return jax.grad(
        lambda p, x: jnp.sum(remat.scan_layers(tanh_layer, p, x, strategy=strategy, **o)),
        argnums=(0, 1),
    )


# activation-heavy and small: width 16, batch 1024, float32 (an activation is 64 KiB, a layer's W 1 KiB)
MW, MB = 16, 1024


@pytest.mark.usefixtures("xla_cpu")
def test_calibrate_reads_the_tape_and_working_buffers():
    params, x = chain_problem(4, width=MW, batch=MB, dtype=jnp.float32)
    cal = remat.calibrate(tanh_layer, params, x)
    assert cal.activation_bytes == MB * MW * 4
    assert cal.tape_cost == pytest.approx(jax_tape(tanh_layer, params, x), abs=0.05)
    assert cal.working == pytest.approx(3.0, abs=0.3)
    assert cal.single == pytest.approx(2.0, abs=0.1)
    out = remat.calibrate(tanh_layer, params, x, layer_vjp=tanh_vjp)
    assert out.tape_cost == pytest.approx(1.0, abs=0.05)  # one state per layer


# every strategy and custom-VJP variant; the default suite checks a representative four at L = 8
_MEASURE_CASES = [
    ("none", {}),
    ("per_layer", {}),
    ("every_k", {"k": 3}),
    ("sqrt", {}),
    ("recursive", {}),
    ("binomial", {"snapshots": 1}),
    ("binomial", {"snapshots": 4}),
    ("none", {"layer_vjp": tanh_vjp}),
    ("recursive", {"layer_vjp": tanh_vjp}),
    ("binomial", {"snapshots": 1, "layer_vjp": tanh_vjp}),
    ("binomial", {"snapshots": 3, "layer_vjp": tanh_vjp}),
]
_MEASURE_CORE = [_MEASURE_CASES[i] for i in (0, 3, 6, 9)]


@pytest.mark.usefixtures("xla_cpu")
@pytest.mark.parametrize(
    ("L", "cases"),
    [
        pytest.param(8, _MEASURE_CORE, id="8-core"),
        pytest.param(8, _MEASURE_CASES, id="8-all", marks=pytest.mark.slow),
        pytest.param(16, _MEASURE_CASES, id="16-all", marks=pytest.mark.slow),
    ],
)
def test_measure_proves_recompute_and_memory_follows_plan(L, cases):
    """FLOPs ÷ plain equal the plan's ratio (the recompute happened), and the calibrated plan's memory
    (plain's gradient outputs + peak_bytes) is within 25% of temp + output bytes for every strategy, with
    the same ordering wherever the predictions differ by more than the tolerance."""
    params, x = chain_problem(L, width=MW, batch=MB, dtype=jnp.float32)
    cals = {
        False: remat.calibrate(tanh_layer, params, x),
        True: remat.calibrate(tanh_layer, params, x, layer_vjp=tanh_vjp),
    }
    layer_dot = 2 * MB * MW * MW
    base = remat.measure(_chain_grad("none"), params, x, run=False)
    assert base.dot_flops == 3 * L * layer_dot  # forward + two backward dots per layer
    assert base.xla_flops < base.flops  # XLA counts the scan body once
    rows = []
    for strategy, opts in cases:
        cal = cals["layer_vjp" in opts]
        run_opts = dict(opts, calibration=cal) if strategy == "binomial" else opts
        m = remat.measure(_chain_grad(strategy, **run_opts), params, x, run=False)
        plan_opts = {k: v for k, v in opts.items() if k in ("snapshots", "k")}
        p = remat.plan(L, strategy=strategy, calibration=cal, **plan_opts)
        assert m.unknown_trip_counts == 0
        flops_ratio = m.dot_flops / base.dot_flops
        assert flops_ratio == pytest.approx(p.flops_ratio, rel=0.02), (strategy, opts)
        if p.recomputations:
            assert flops_ratio > 1.05, (strategy, opts, "no recompute")
        predicted = base.output_bytes + p.peak_bytes
        assert m.memory_bytes == pytest.approx(predicted, rel=0.25), (strategy, opts)
        rows.append((predicted, m.memory_bytes))
    for (pa, ma), (pb, mb) in itertools.combinations(rows, 2):
        if max(pa, pb) > 1.25 * min(pa, pb):
            assert (pa < pb) == (ma < mb)


@pytest.mark.usefixtures("xla_cpu")
def test_memory_poor_memory_does_not_grow_with_depth():
    """binomial with one snapshot holds 1 + single activations at any L (a regression: the fence's
    ``x + 0·ct[0]`` chained down the schedule once kept one cotangent per level alive, ~L activations)."""
    temps = {}
    for L in (3, 10):
        params, x = chain_problem(L, width=MW, batch=MB, dtype=jnp.float32)
        g = _chain_grad("binomial", snapshots=1, tape_cost=3.0)
        temps[L] = remat.measure(g, params, x, run=False).temp_bytes / (MB * MW * 4)
    assert temps[10] - temps[3] < 0.5, temps
    assert temps[10] < 4, temps


@pytest.mark.usefixtures("xla_cpu")
def test_binomial_keeps_its_planned_peak_with_large_layers():
    """Width 128, batch 512: a layer's W is a quarter of an activation. A regression: one-layer advances
    (trip-count-1 loops, unrolled by XLA) read parameter slices that XLA hoisted to the program start, all
    alive at once (+3 activations here); advances in the backward are fenced now."""
    L, s = 20, 6
    params, x = chain_problem(L, width=128, batch=512, dtype=jnp.float32)
    cal = remat.calibrate(tanh_layer, params, x)
    m = remat.measure(_chain_grad("binomial", snapshots=s, calibration=cal), params, x, run=False)
    p = remat.plan(L, snapshots=s, calibration=cal)
    assert m.temp_bytes / cal.activation_bytes == pytest.approx(p.peak_activations, abs=1.0)


@pytest.mark.usefixtures("xla_cpu")
def test_output_tape_keeps_plain_flops():
    """layer_vjp reverses from stored states: no matmul is recomputed (FLOPs equal plain's)."""
    params, x = chain_problem(8, width=MW, batch=MB, dtype=jnp.float32)
    base = remat.measure(_chain_grad("none"), params, x, run=False)
    m = remat.measure(_chain_grad("none", layer_vjp=tanh_vjp), params, x, run=False)
    assert m.dot_flops == base.dot_flops
    # one state per layer instead of JAX's c (3, or 2 from JAX 0.11)
    assert m.temp_bytes < 1.5 / jax_tape(tanh_layer, params, x) * base.temp_bytes


def test_measure_fields():
    f = jax.grad(lambda w: jnp.sum(jnp.tanh(w) ** 2))
    m = remat.measure(f, jnp.ones(8), repeats=2, primal=lambda w: jnp.sum(jnp.tanh(w) ** 2))
    assert m.run_s is not None and m.compile_s > 0 and m.memory_bytes >= m.output_bytes
    # the residuals of tanh(w)², one line each ("f64[8] output of tanh …"; jax 0.11 saves 1 − tanh² instead)
    assert m.saved_residuals and all(r.startswith("f64[8] output of") for r in m.saved_residuals)


# --- bad input -----------------------------------------------------------------------------------------


def test_errors_name_the_argument_and_range():
    params, x = chain_problem(4)
    with pytest.raises(OptionError, match=r"num_layers: expected an integer ≥ 1"):
        remat.plan(0)
    with pytest.raises(OptionError, match=r"snapshots: expected an integer ≥ 1"):
        remat.plan(8, snapshots=0)
    with pytest.raises(OptionError, match=r"snapshots: expected an integer ≥ 1"):
        remat.scan_layers(tanh_layer, params, x, strategy="binomial", snapshots=0)
    with pytest.raises(
        UnknownNameError, match=r"strategy: unknown name 'dots_savable'.*dots_saveable"
    ):
        remat.scan_layers(tanh_layer, params, x, strategy="dots_savable")
    with pytest.raises(UnknownNameError, match=r"policy: unknown name"):
        remat.policy("nothing")
    with pytest.raises(OptionError, match=r"memory_budget: .* less than one layer's tape"):
        remat.plan(8, memory_budget=100.0, activation_bytes=1000.0)
    with pytest.raises(OptionError, match=r"activation_bytes"):
        remat.plan(8, memory_budget=100.0)
    with pytest.raises(OptionError, match=r"k: expected 1 ≤ k ≤ L = 4"):
        remat.scan_layers(tanh_layer, params, x, strategy="every_k", k=5)
    with pytest.raises(OptionError, match=r"k: strategy='every_k' needs k="):
        remat.scan_layers(tanh_layer, params, x, strategy="every_k")
    with pytest.raises(OptionError, match=r"unknown option 'snapshot'"):
        remat.scan_layers(tanh_layer, params, x, strategy="binomial", snapshot=2)
    with pytest.raises(
        OptionError, match=r"names: the policy 'save_only_these_names' needs names="
    ):
        remat.scan_layers(tanh_layer, params, x, strategy="save_only_these_names")
    with pytest.raises(OptionError, match=r"calibration: .* drop tape_cost="):
        remat.plan(8, tape_cost=3.0, calibration=CAL)
    with pytest.raises(OptionError, match=r"working: expected a finite number ≥ 0"):
        remat.plan(8, working=-1.0)
    with pytest.raises(OptionError, match=r"layer_vjp: expected a function"):
        remat.scan_layers(tanh_layer, params, x, strategy="binomial", layer_vjp=3)
    with pytest.raises(OptionError, match=r"unknown option 'layer_vjp'"):
        remat.scan_layers(tanh_layer, params, x, strategy="sqrt", layer_vjp=tanh_vjp)
    with pytest.raises(ShapeError, match=r"params: every leaf must be stacked"):
        remat.scan_layers(tanh_layer, {"w": params["w"], "b": params["b"][:2]}, x)


def test_hlo_flops_counts_convolutions_and_names_what_it_cannot_count():
    conv = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
    )
    compiled = conv.lower(jnp.ones((2, 16, 8)), jnp.ones((3, 8, 4))).compile()
    counted = remat.hlo_flops(compiled.as_text())
    xla = compiled.cost_analysis()["flops"]
    # 2 × (2·16·4 outputs) × (3·8 kernel entries per output feature); XLA leaves out the padding
    assert counted["flops"] == 2 * (2 * 16 * 4) * (3 * 8) and xla <= counted["flops"] < 1.1 * xla
    assert counted["uncounted"] == ()
    fft = remat.measure(lambda x: jnp.fft.fft(x).real.sum(), jnp.ones(256), run=False)
    assert fft.uncounted == ("fft",)
    chol = remat.measure(lambda a: jnp.sum(jnp.linalg.cholesky(a)), jnp.eye(4), run=False)
    assert chol.uncounted == ("custom-call",)


_GPU_GEMM_HLO = """HloModule jit_f

ENTRY %main.4 (Arg_0.1: f32[{lhs}], Arg_1.2: f32[{rhs}]) -> f32[{out}] {{
  %Arg_0.1 = f32[{lhs}]{{1,0}} parameter(0)
  %Arg_1.2 = f32[{rhs}]{{1,0}} parameter(1)
  %custom-call.1 = (f32[{out}]{{1,0}}, s8[4194304]{{0}}) custom-call(f32[{lhs}]{{1,0}} %Arg_0.1, f32[{rhs}]{{1,0}} %Arg_1.2), custom_call_target="__cublas$gemm", backend_config={{"operation_queue_id":"0","gemm_backend_config":{{"alpha_real":1,"beta":0,"dot_dimension_numbers":{{"lhs_contracting_dimensions":["{lc}"],"rhs_contracting_dimensions":["{rc}"],"lhs_batch_dimensions":[{b}],"rhs_batch_dimensions":[{b}]}},"epilogue":"DEFAULT"}}}}
  ROOT %get-tuple-element.2 = f32[{out}]{{1,0}} get-tuple-element(%custom-call.1), index=0
}}
"""


def test_hlo_flops_counts_cublas_gemm_custom_calls():
    """On a GPU XLA emits most dots as cuBLAS custom calls; the count reads their shapes and
    dot_dimension_numbers (a GPU-style module written out here: CI has no GPU)."""
    plain = _GPU_GEMM_HLO.format(lhs="64,32", rhs="32,16", out="64,16", lc=1, rc=0, b="")
    c = remat.hlo_flops(plain)
    assert c["dot_flops"] == c["flops"] == 2 * 64 * 32 * 16 and c["uncounted"] == ()
    batched = _GPU_GEMM_HLO.format(lhs="8,64,32", rhs="8,32,16", out="8,64,16", lc=2, rc=1, b='"0"')
    assert remat.hlo_flops(batched)["dot_flops"] == 2 * 8 * 64 * 32 * 16
    other = plain.replace("__cublas$gemm", "__cusolver$potrf")  # not a GEMM: listed, not counted
    assert remat.hlo_flops(other)["dot_flops"] == 0 and remat.hlo_flops(other)["uncounted"] == (
        "custom-call",
    )


H100_HLO = Path(__file__).parent / "data" / "hlo_h100"


@pytest.mark.parametrize(
    ("name", "dot_flops", "flops"),
    [
        # forward (cuDNN conv fused with a ×2 result scale and a bias add) + backward input +
        # backward filter: 3 × 6144, plus 2 FLOPs per output entry for the fused scale and bias
        ("conv1d_grad_float32", 3 * 2 * (2 * 16 * 4) * (3 * 8), 3 * 6144 + 2 * (2 * 16 * 4)),
        (
            "conv2d_float64",
            2 * (4 * 16 * 16 * 8) * (3 * 3 * 3),
            2 * (4 * 16 * 16 * 8) * (3 * 3 * 3),
        ),
        # a 30×10 matrix–vector product rewritten as multiply + reduce (both named dot_general)
        ("matvec_30x10_float64", 2 * 30 * 10, 2 * 30 * 10),
        # a Triton split-K GEMM fusion (8 partial products) and the reduce of the parts
        ("matmul_128_float32", 2 * 128**3, 2 * 128**3 + 8 * 128 * 128),
    ],
)
def test_hlo_flops_reads_gpu_modules(name, dot_flops, flops):
    """Optimized HLO of jax 0.11.2 on an H100 (.gpu diagnostics, 2026-11-23): cuDNN convolutions of
    all three kinds, a dot that XLA:GPU strength-reduced, and a Triton GEMM fusion are all counted."""
    c = remat.hlo_flops((H100_HLO / f"{name}.txt").read_text())
    assert (c["dot_flops"], c["flops"], c["uncounted"]) == (dot_flops, flops, ())


@pytest.mark.parametrize(
    ("f", "shapes"),
    [
        (lambda a, b: a @ b, ((30, 1), (1, 20))),  # contraction size 1: XLA makes a multiply of it
        (lambda a, b: jnp.einsum("ij,j->ij", a, b), ((40, 100), (100,))),
        (lambda a, b: jnp.einsum("bik,bkj->bij", a, b), ((4, 6, 1), (4, 1, 8))),
        (lambda a, v: a @ v, ((30, 10), (10,))),
        (jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))), ((16, 16), (1, 16))),
    ],
)
def test_hlo_flops_dot_flops_are_part_of_flops(f, shapes):
    """Dots that XLA rewrites as multiplies keep the ``dot_general`` name; counted as dot FLOPs they
    stay inside the total (a regression: a bare multiply was counted twice as a dot)."""
    args = [jnp.ones(s) for s in shapes]
    c = remat.hlo_flops(jax.jit(f).lower(*args).compile().as_text())
    assert 0 < c["dot_flops"] <= c["flops"], c


def test_hlo_flops_counts_a_gpu_scan_by_its_trip_count():
    """The gradient of a 6-step scan of ``tanh(c @ w)`` (64×32 @ 32×32) on an H100: forward dots 6×,
    backward 2 × 6× (the count that ``cost_analysis`` gives for one trip only)."""
    c = remat.hlo_flops((H100_HLO / "scan_grad_float64.txt").read_text())
    assert c["dot_flops"] == 3 * 6 * 2 * 64 * 32 * 32 and c["unknown_trip_counts"] == 0
