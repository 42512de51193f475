"""Remat strategies on an activation-heavy tanh chain: memory ÷ plain and FLOPs ÷ plain, beside the plan.

Chain ``x ← tanh(x W_i + b_i)``, width 128, batch 4096, float32, ``L ∈ {8, 16, 32, 64, 128}``; the gradient
of ``sum(x_L)`` w.r.t. all ``W_i, b_i`` and ``x_0``. For each strategy of ``gradlab.remat.scan_layers`` the
gradient function is compiled once (``jax.jit(...).lower(...).compile()``, compile time reported) and
measured with ``remat.measure``: memory = ``temp + output`` bytes of ``memory_analysis()``; FLOPs = the
optimized HLO counted with loop trip counts (``cost_analysis`` counts a scan body once; its raw number is
reported as ``xla_flops``). ``flops_ratio`` is the matmul FLOPs ÷ plain — a backward layer costs two forward
layers, so it is ``(evaluations + 2L) / 3L`` — and ``total_flops_ratio`` counts the elementwise work too.

Two tapes: JAX's (``tape = "jax"``: ``x``, ``tanh`` and ``1 − tanh`` per layer) and the output tape
(``tape = "output"``: ``layer_vjp`` below computes the layer's VJP from its input and output, so a tape
stores one state per layer, as Revolve assumes). Beside each measurement, the calibrated plan
(``remat.calibrate`` — compiled plain backprop on 1–3 layers — then ``remat.plan(..., calibration=)``):
predicted memory = plain's gradient outputs + ``plan.peak_bytes``, and ``plan_vs_measured_memory``.

Strategies per L: ``none``, ``per_layer``, ``dots_saveable``, ``sqrt``, ``recursive``, ``binomial[s=1]``
(memory-poor), ``none`` and ``recursive`` with the output tape, and ``binomial`` with the most snapshots
whose *predicted* memory fits the *measured* memory of ``sqrt``, of ``recursive`` and of 0.07 × plain (JAX's
recursive halving in the issue), with each tape. Output (JSON lines): one line per (L, strategy), then a
summary: fitted exponents of memory in L, the goals at the largest L, and the plan-vs-measured check
(every ratio within 25%; pairs whose measured order contradicts the predicted one).

``--quick``: batch 512 and L ≤ 64. ``--run`` also times the gradients whose planned FLOPs ratio is ≤ 3
(memory-poor backprop is not timed: up to 22× plain), compiled apart from the measurement and timed
round-robin (``_common.interleaved``, ``--repeats`` rounds) so that load changes hit all alike: one
``remat_chain_time`` line per L with the minimum and median seconds and their ratios to ``none``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial

import _common  # noqa: F401  (x64 on; the chain itself is float32)
import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, environment, interleaved, sig

from gradlab import remat

RECURSIVE_HALVING_MEMORY = 0.07  # JAX-docs recursive halving at L = 128 (ANCHORS.md), ÷ plain


def layer(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][None, :])


def layer_vjp(p, x, y, ct):
    """The VJP of ``layer`` from its input ``x`` and output ``y`` (tanh' = 1 − y²): no recomputation."""
    dz = ct * (1 - y * y)
    return {"w": x.T @ dz, "b": jnp.sum(dz, axis=0)}, dz @ p["w"].T


def _fit_snapshots(L, cal, budget_units):
    """The most snapshots whose calibrated plan peaks within ``budget_units`` activations (None: none fit)."""
    floor = remat.plan(1, strategy="none", calibration=cal).peak_activations
    s = int(np.floor(budget_units - floor + 1e-9))
    if s < 1:
        return None
    while remat.plan(L, snapshots=s + 1, calibration=cal).peak_activations <= budget_units + 1e-9:
        s += 1
        if s > 4 * L:
            break
    return s


def _variant(ctx, label, strategy, tape="jax", snapshots=None):
    """Measure one strategy on the chain of ``ctx`` beside its calibrated plan; emit and keep the row."""
    L, params, x, act = ctx["L"], ctx["params"], ctx["x"], ctx["act"]
    base = ctx["base"]
    cal = ctx["cals"][tape]
    opts = {} if snapshots is None else {"snapshots": snapshots}
    if tape == "output":
        opts["layer_vjp"] = layer_vjp
    if strategy == "binomial":
        opts["calibration"] = cal
    planned = strategy in ("none", "per_layer", "sqrt", "recursive", "binomial")
    plan = (
        remat.plan(L, strategy=strategy, snapshots=snapshots, calibration=cal) if planned else None
    )
    g = jax.grad(
        lambda p, x: jnp.sum(remat.scan_layers(layer, p, x, strategy=strategy, **opts)),
        argnums=(0, 1),
    )
    m = remat.measure(g, params, x, run=False)
    if ctx["run"] and (plan is None or plan.flops_ratio <= 3):
        compiled = jax.jit(g).lower(params, x).compile()
        ctx["timers"][label] = partial(compiled, params, x)
    if not base:
        base["m"] = m
    b = base["m"]
    predicted = None if plan is None else b.output_bytes + plan.peak_bytes
    row = {
        "bench": "remat_chain",
        "L": L,
        "batch": ctx["batch"],
        "strategy": label,
        "tape": tape,
        "snapshots": snapshots,
        "tape_cost": sig(cal.tape_cost, 3),
        "working": sig(cal.working, 3),
        "memory_bytes": m.memory_bytes,
        "temp_bytes": m.temp_bytes,
        "output_bytes": m.output_bytes,
        "memory_ratio": sig(m.memory_bytes / b.memory_bytes),
        "flops_ratio": sig(m.dot_flops / b.dot_flops),
        "total_flops_ratio": sig(m.flops / b.flops),
        "flops": m.flops,
        "xla_flops": m.xla_flops,
        "compile_s": sig(m.compile_s, 3),
        "plan_peak_activations": None if plan is None else plan.peak_activations,
        "measured_temp_activations": sig(m.temp_bytes / act),
        "plan_memory_bytes": None if predicted is None else sig(predicted),
        "plan_vs_measured_memory": None
        if predicted is None
        else sig(predicted / m.memory_bytes, 3),
        "plan_flops_ratio": None if plan is None else sig(plan.flops_ratio),
    }
    emit(row)
    ctx["results"][label] = row
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 512, L ≤ 64")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--run", action="store_true", help="also time the gradients (slow)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    batch = args.batch or (512 if args.quick else 4096)
    depths = args.layers or ([8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 128])
    W = args.width
    emit(environment(width=W, batch=batch, depths=depths, dtype="float32"))

    results: dict[int, dict[str, dict]] = {}
    times: dict[int, dict] = {}
    for L in depths:
        rng = np.random.default_rng(0)
        params = {
            "w": jnp.asarray(rng.standard_normal((L, W, W)) / np.sqrt(W), jnp.float32),
            "b": jnp.zeros((L, W), jnp.float32),
        }
        x = jnp.asarray(rng.standard_normal((batch, W)), jnp.float32)
        act = batch * W * 4
        cals = {
            "jax": remat.calibrate(layer, params, x),
            "output": remat.calibrate(layer, params, x, layer_vjp=layer_vjp),
        }
        results[L] = {}
        ctx = {
            "L": L,
            "params": params,
            "x": x,
            "act": act,
            "batch": batch,
            "cals": cals,
            "base": {},
            "run": args.run,
            "results": results[L],
            "timers": {},
        }
        run_variant = partial(_variant, ctx)

        plain = run_variant("none", "none")
        run_variant("per_layer", "per_layer")
        run_variant("dots_saveable", "dots_saveable")
        sq = run_variant("sqrt", "sqrt")
        rec = run_variant("recursive", "recursive")
        run_variant("binomial[s=1]", "binomial", snapshots=1)
        run_variant("none+output_tape", "none", tape="output")
        run_variant("recursive+output_tape", "recursive", tape="output")
        targets = {
            "sqrt": sq["memory_bytes"],
            "recursive": rec["memory_bytes"],
            "0.07": RECURSIVE_HALVING_MEMORY * plain["memory_bytes"],
        }
        done: dict[tuple[str, int], dict] = {}
        for (where, target), tape in itertools.product(targets.items(), ("jax", "output")):
            # the most snapshots whose predicted memory fits the target, then fewer while the measured
            # memory exceeds it by more than 1% (the goals compare at equal measured memory)
            s = _fit_snapshots(L, cals[tape], (target - plain["output_bytes"]) / act)
            while s is not None and s >= 1:
                label = f"binomial[s={s}]" + ("+output_tape" if tape == "output" else "")
                if (tape, s) not in done:
                    done[(tape, s)] = run_variant(label, "binomial", tape=tape, snapshots=s)
                if done[(tape, s)]["memory_bytes"] <= 1.01 * target:
                    results[L][f"@{where}:{tape}"] = done[(tape, s)]
                    break
                s -= 1

        if ctx["timers"]:
            samples = interleaved(ctx["timers"], repeats=args.repeats)
            best = {k: min(v) for k, v in samples.items()}
            med = {k: float(np.median(v)) for k, v in samples.items()}
            timing = {
                "bench": "remat_chain_time",
                "L": L,
                "repeats": args.repeats,
                "min_s": {k: sig(v, 3) for k, v in best.items()},
                "median_s": {k: sig(v, 3) for k, v in med.items()},
                "time_ratio_min": {k: sig(v / best["none"], 3) for k, v in best.items()},
                "time_ratio_median": {k: sig(v / med["none"], 3) for k, v in med.items()},
            }
            emit(timing)
            times[L] = timing
            ctx["timers"].clear()

    # fitted exponent of memory in L (least squares on log-log over the depths measured)
    exponents = {}
    for label in (
        "none",
        "per_layer",
        "dots_saveable",
        "sqrt",
        "recursive",
        "binomial[s=1]",
        "none+output_tape",
        "recursive+output_tape",
    ):
        pts = [(L, r[label]["memory_bytes"]) for L, r in results.items() if label in r]
        if len(pts) >= 2:
            lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            exponents[label] = sig(float(np.polyfit(lx, ly, 1)[0]), 3)

    # plan vs measured: every ratio within 25%, and the measured order follows the predicted one
    ratios = [
        (L, k, v["plan_vs_measured_memory"])
        for L, r in results.items()
        for k, v in r.items()
        if not k.startswith("@") and v["plan_vs_measured_memory"] is not None
    ]
    worst = max(ratios, key=lambda t: abs(t[2] - 1))
    discordant = []
    for L, r in results.items():
        rows = [(k, v) for k, v in r.items() if not k.startswith("@") and v["plan_memory_bytes"]]
        for (ka, a), (kb, b) in itertools.combinations(rows, 2):
            pa, pb, ma, mb = (
                a["plan_memory_bytes"],
                b["plan_memory_bytes"],
                a["memory_bytes"],
                b["memory_bytes"],
            )
            if (pa < pb) != (ma < mb) and max(pa, pb) > 1.1 * min(pa, pb):
                discordant.append([L, ka, kb])

    Lmax = max(results)
    top = results[Lmax]

    def pair(key):
        v = top.get(key)
        return v and [v["strategy"], v["memory_ratio"], v["flops_ratio"]]

    def met(key, flops):
        v = top.get(key)
        return bool(v and v["flops_ratio"] <= flops)

    sq, rec = top["sqrt"], top["recursive"]
    emit(
        {
            "bench": "remat_chain_summary",
            "L": Lmax,
            "batch": batch,
            "memory_exponent_in_L": exponents,
            "sqrt": [sq["memory_ratio"], sq["flops_ratio"]],
            "recursive": [rec["memory_ratio"], rec["flops_ratio"]],
            "binomial_at_sqrt_memory": {"jax": pair("@sqrt:jax"), "output": pair("@sqrt:output")},
            "binomial_at_recursive_memory": {
                "jax": pair("@recursive:jax"),
                "output": pair("@recursive:output"),
            },
            "binomial_at_0.07_memory": {"jax": pair("@0.07:jax"), "output": pair("@0.07:output")},
            "goal_sqrt": "memory <= 0.2 and flops <= 1.35",
            "goal_sqrt_met": sq["memory_ratio"] <= 0.2 and sq["flops_ratio"] <= 1.35,
            "goal_binomial_sqrt_memory": "flops <= 1.28",
            "goal_binomial_sqrt_memory_met": {
                "jax": met("@sqrt:jax", 1.28),
                "output": met("@sqrt:output", 1.28),
            },
            "goal_binomial_recursive_memory": "flops <= 1.6",
            "goal_binomial_recursive_memory_met": {
                "jax": met("@recursive:jax", 1.6),
                "output": met("@recursive:output", 1.6),
                "jax@0.07": met("@0.07:jax", 1.6),
                "output@0.07": met("@0.07:output", 1.6),
            },
            "time_ratio_min": times.get(Lmax, {}).get("time_ratio_min"),
            "plan_vs_measured_worst": list(worst),
            "plan_vs_measured_within_25pct": abs(worst[2] - 1) <= 0.25,
            "plan_vs_measured_discordant_pairs": discordant,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
