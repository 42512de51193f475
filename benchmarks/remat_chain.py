"""Remat strategies on an activation-heavy tanh chain: memory ÷ plain and FLOPs ÷ plain, beside the plan.

Chain ``x ← tanh(x W_i + b_i)``, width 128, batch 4096, float32, ``L ∈ {8, 16, 32, 64, 128}``; the gradient
of ``sum(x_L)`` w.r.t. all ``W_i, b_i`` and ``x_0``. For each strategy of ``gradlab.remat.scan_layers`` the
gradient function is compiled once (``jax.jit(...).lower(...).compile()``, compile time reported) and
measured with ``remat.measure``: memory = ``temp + output`` bytes of ``memory_analysis()``; FLOPs = the
optimized HLO counted with loop trip counts (``cost_analysis`` counts a scan body once; its raw number is
reported as ``xla_flops``). A backward layer costs two forward layers (two matmuls), so FLOPs ÷ plain is
``(evaluations + 2L) / 3L``. Beside each measurement: the planner's prediction (``remat.plan``) of peak
activations and FLOPs ratio, and the prediction in bytes (plain's overhead + peak × activation bytes).

Output (JSON lines): one line per (L, strategy) — the Pareto data and the three regimes (``none`` = vanilla,
``binomial[s=1]`` = memory-poor, ``sqrt`` / ``binomial`` = checkpointed) against L — then a summary: the
fitted exponent of memory in L per strategy and the goals at the largest L (``sqrt`` ≤ 0.2 memory at ≤ 1.35
FLOPs; ``binomial`` at ``sqrt``'s memory ≤ 1.28 FLOPs and at ``recursive``'s memory ≤ 1.6 FLOPs).
``--quick``: batch 512 and L ≤ 64. ``--run`` also times one gradient per configuration (slow on 2 cores).
"""

from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (x64 on; the chain itself is float32)
import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, environment, sig

from gradlab import remat


def layer(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][None, :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 512, L ≤ 64")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--run", action="store_true", help="also time one gradient (slow)")
    args = parser.parse_args(argv)
    batch = args.batch or (512 if args.quick else 4096)
    depths = args.layers or ([8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 128])
    W = args.width
    emit(environment(width=W, batch=batch, depths=depths, dtype="float32"))

    results: dict[int, dict[str, dict]] = {}
    for L in depths:
        rng = np.random.default_rng(0)
        params = {
            "w": jnp.asarray(rng.standard_normal((L, W, W)) / np.sqrt(W), jnp.float32),
            "b": jnp.zeros((L, W), jnp.float32),
        }
        x = jnp.asarray(rng.standard_normal((batch, W)), jnp.float32)
        act = batch * W * 4
        c = remat.tape_cost(layer, params, x)
        sqrt_plan = remat.plan(L, strategy="sqrt", tape_cost=c)
        rec_plan = remat.plan(L, strategy="recursive", tape_cost=c)
        s_sqrt = max(1, round(sqrt_plan.peak_activations - c))
        s_rec = max(1, round(rec_plan.peak_activations - c))
        variants = {
            "none": ("none", {}),
            "per_layer": ("per_layer", {}),
            "dots_saveable": ("dots_saveable", {}),
            "sqrt": ("sqrt", {}),
            "recursive": ("recursive", {}),
            f"binomial[s={s_sqrt}]": ("binomial", {"snapshots": s_sqrt}),
            f"binomial[s={s_rec}]": ("binomial", {"snapshots": s_rec}),
            "binomial[s=1]": ("binomial", {"snapshots": 1}),
        }
        if L > 64:  # memory-poor at L = 128 compiles hundreds of scans; it is quadratic anyway
            variants.pop("binomial[s=1]")
        results[L] = {}
        base = None
        for label, (strategy, opts) in variants.items():
            g = jax.grad(
                lambda p, x, s=strategy, o=opts: jnp.sum(
                    remat.scan_layers(layer, p, x, strategy=s, **o)
                ),
                argnums=(0, 1),
            )
            m = remat.measure(g, params, x, run=args.run, repeats=3)
            if base is None:
                base = m
                overhead = m.memory_bytes - c * L * act
            plan = (
                remat.plan(L, strategy=strategy, tape_cost=c, **opts)
                if strategy in ("none", "per_layer", "sqrt", "recursive", "binomial")
                else None
            )
            row = {
                "bench": "remat_chain",
                "L": L,
                "strategy": label,
                "tape_cost": c,
                "memory_bytes": m.memory_bytes,
                "memory_ratio": sig(m.memory_bytes / base.memory_bytes),
                "flops": m.flops,
                "flops_ratio": sig(m.dot_flops / base.dot_flops),
                "xla_flops": m.xla_flops,
                "compile_s": sig(m.compile_s, 3),
                "run_s": None if m.run_s is None else sig(m.run_s, 3),
                "plan_peak_activations": None if plan is None else plan.peak_activations,
                "plan_memory_bytes": None
                if plan is None
                else sig(overhead + plan.peak_activations * act),
                "plan_flops_ratio": None if plan is None else sig(plan.flops_ratio),
                "plan_vs_measured_memory": None
                if plan is None
                else sig((overhead + plan.peak_activations * act) / m.memory_bytes, 3),
            }
            emit(row)
            results[L][label] = row

    # fitted exponent of memory in L (least squares on log-log over the depths measured)
    exponents = {}
    for label in ("none", "per_layer", "sqrt", "recursive"):
        pts = [(L, r[label]["memory_bytes"]) for L, r in results.items() if label in r]
        if len(pts) >= 2:
            lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            exponents[label] = sig(float(np.polyfit(lx, ly, 1)[0]), 3)
    Lmax = max(results)
    top = results[Lmax]
    binos = {k: v for k, v in top.items() if k.startswith("binomial")}
    sq, rec = top["sqrt"], top["recursive"]

    def best_at(memory_ratio):
        fits = [v for v in binos.values() if v["memory_ratio"] <= memory_ratio * 1.02]
        return min(fits, key=lambda v: v["flops_ratio"]) if fits else None

    b_sqrt, b_rec = best_at(sq["memory_ratio"]), best_at(rec["memory_ratio"])
    emit(
        {
            "bench": "remat_chain_summary",
            "L": Lmax,
            "batch": batch,
            "memory_exponent_in_L": exponents,
            "sqrt": [sq["memory_ratio"], sq["flops_ratio"]],
            "recursive": [rec["memory_ratio"], rec["flops_ratio"]],
            "binomial_at_sqrt_memory": b_sqrt and [b_sqrt["memory_ratio"], b_sqrt["flops_ratio"]],
            "binomial_at_recursive_memory": b_rec and [b_rec["memory_ratio"], b_rec["flops_ratio"]],
            "goal_sqrt": "memory <= 0.2 and flops <= 1.35",
            "goal_sqrt_met": sq["memory_ratio"] <= 0.2 and sq["flops_ratio"] <= 1.35,
            "goal_binomial_sqrt_memory": "flops <= 1.28",
            "goal_binomial_sqrt_memory_met": bool(b_sqrt and b_sqrt["flops_ratio"] <= 1.28),
            "goal_binomial_recursive_memory": "flops <= 1.6",
            "goal_binomial_recursive_memory_met": bool(b_rec and b_rec["flops_ratio"] <= 1.6),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
