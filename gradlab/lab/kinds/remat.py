"""The ``remat`` kind: checkpoint strategies on a tanh chain, measured (memory, FLOPs, time) beside the plan.

Config section::

    [remat]
    layers = [8, 16, 32, 64]    # L, the chain's depth
    width = 128
    batch = 512
    strategy = ["none", "per_layer", "sqrt", "recursive", {name = "binomial", snapshots = [1, 4]},
                "dots_saveable"]
    time = false                # also time one gradient (compile time is always kept apart)

The chain is ``x ← tanh(x W_i + b_i)`` (stacked parameters, :func:`gradlab.remat.scan_layers`); the
measured function is the gradient of ``sum(x_L)`` with respect to the parameters and ``x_0``. Per run
(L × strategy point × repeat): :func:`gradlab.remat.measure` — temp + output bytes of the compiled memory
analysis, FLOPs of the compiled HLO with loop trip counts — and :func:`gradlab.remat.plan`'s predicted
peak activations and FLOPs ratio. The report divides by the ``none`` run at the same L (vanilla
backprop), draws the memory-vs-FLOPs Pareto front at the largest L with the planner's predictions beside
the measurements, and the three regimes (vanilla, memory-poor = ``binomial`` with one snapshot,
checkpointed = ``sqrt``/``binomial``) against L.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import Field, StrictBool

from gradlab.lab.config import Base, PosInt, Sweep
from gradlab.lab.kinds._common import base_spec, entry_label, expand_entries, validate_entries

NAME = "remat"
SUMMARY = (
    "checkpoint strategies on a tanh chain: memory, FLOPs and time vs plain backprop and the plan"
)

_PLANNED = ("none", "per_layer", "every_k", "sqrt", "recursive", "binomial")


class Strategy(Base):
    name: str
    snapshots: Sweep[PosInt] | None = None
    k: Sweep[PosInt] | None = None
    names: list[str] | None = None


def strategy_model(name: str) -> type[Base]:
    from gradlab import remat
    from gradlab._validate import check_choice

    check_choice("strategy", name, remat.names())
    return Strategy


class Section(Base):
    """The ``[remat]`` section."""

    layers: Sweep[PosInt] = Field(default_factory=lambda: [8, 16, 32], min_length=1)
    width: PosInt = 128
    batch: PosInt = 512
    strategy: Sweep[Any] = Field(
        default_factory=lambda: ["none", "per_layer", "sqrt", "recursive"], min_length=1
    )
    time: StrictBool = False
    repeats_per_timing: Annotated[int, Field(ge=1, le=100, strict=True)] = 3


def check(section: Section, experiment: Any, raw: Any) -> tuple[Section, list[str]]:
    strategies, errors = validate_entries(
        section.strategy, "strategy", strategy_model, raw, (NAME, "strategy")
    )
    for i, s in enumerate(strategies):
        if s["name"] == "binomial" and not s.get("snapshots"):
            errors.append(
                f"{NAME}.strategy[{i}].snapshots: binomial needs snapshots = [...] (≥ 1)."
            )
        if s["name"] == "every_k" and not s.get("k"):
            errors.append(f"{NAME}.strategy[{i}].k: every_k needs k = [...] (≥ 1).")
        elif s["name"] == "every_k":
            ks = s["k"] if isinstance(s["k"], list) else [s["k"]]
            too_long = sorted({k for k in ks if k > min(section.layers)})
            if too_long:
                errors.append(
                    f"{NAME}.strategy[{i}].k: every_k needs 1 ≤ k ≤ L (the segment length); "
                    f"k = {too_long} exceeds {NAME}.layers' smallest L = {min(section.layers)}. "
                    "Use shorter segments or drop the smaller depths."
                )
    return section.model_copy(update={"strategy": strategies}), errors


def _options(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "name" and v is not None}


def expand(resolved: Any) -> list[dict[str, Any]]:
    exp, sec = resolved.experiment, resolved.section
    return [
        {
            **base_spec(NAME, exp, r),
            "layers": L,
            "width": sec.width,
            "batch": sec.batch,
            "strategy": strategy,
            "time": sec.time,
            "repeats_per_timing": sec.repeats_per_timing,
        }
        for L in sec.layers
        for strategy in expand_entries(sec.strategy)
        for r in range(exp.repeats)
    ]


def labels(spec: Mapping[str, Any]) -> dict[str, str]:
    return {
        "strategy": entry_label(spec["strategy"], {"snapshots": None, "k": None, "names": None})
    }


def _layer(p, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ p["w"] + p["b"][None, :])


def execute(spec: Mapping[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from gradlab import remat
    from gradlab.lab.kinds._common import stable_hash

    L, W, B = spec["layers"], spec["width"], spec["batch"]
    dtype = jnp.dtype(spec["dtype"])
    key = jax.random.fold_in(jax.random.key(spec["seed"]), stable_hash([L, W, B, spec["repeat"]]))
    kw, kx = jax.random.split(key)
    params = {
        "w": (jax.random.normal(kw, (L, W, W)) / np.sqrt(W)).astype(dtype),
        "b": jnp.zeros((L, W), dtype),
    }
    x = jax.random.normal(kx, (B, W)).astype(dtype)
    s = spec["strategy"]
    opts = _options(s)
    cal = remat.calibrate(_layer, params, x)
    if s["name"] == "binomial":  # the schedule the calibrated plan predicts
        opts["calibration"] = cal
    grad = jax.grad(
        lambda p, x: jnp.sum(remat.scan_layers(_layer, p, x, strategy=s["name"], **opts)),
        argnums=(0, 1),
    )
    m = remat.measure(grad, params, x, run=spec["time"], repeats=spec["repeats_per_timing"])
    c = cal.tape_cost
    act = B * W * dtype.itemsize
    summary: dict[str, Any] = {
        "memory_bytes": m.memory_bytes,
        "temp_bytes": m.temp_bytes,
        "output_bytes": m.output_bytes,
        "flops": m.flops,
        "dot_flops": m.dot_flops,
        "xla_flops": m.xla_flops,
        "unknown_trip_counts": m.unknown_trip_counts,
        "tape_cost": c,
        "working": cal.working,
        "activation_bytes": act,
    }
    if s["name"] in _PLANNED:
        plan_opts = {k: v for k, v in opts.items() if k in ("snapshots", "k")}
        plan = remat.plan(L, strategy=s["name"], calibration=cal, **plan_opts)
        summary.update(
            plan_peak_activations=plan.peak_activations,
            plan_peak_bytes=plan.peak_bytes,
            plan_flops_ratio=plan.flops_ratio,
            plan_memory_ratio=plan.memory_ratio,
            plan_forward_evals=plan.forward_evals,
        )
    timing = {"compile_time": m.compile_s, "run_time": m.run_s}
    # one recorded point, the measurement itself, so that results.json (the tidy table) has the metrics
    return {"status": "ok", "summary": summary, "points": [dict(summary)], "timing": timing}


def report(runs: Sequence[Mapping[str, Any]], resolved_json: Mapping[str, Any]) -> list[Any]:
    from gradlab.lab import report as R

    by: dict[tuple[int, str], list[Mapping]] = {}
    for r in runs:
        by.setdefault((r["spec"]["layers"], labels(r["spec"])["strategy"]), []).append(r)

    def med(members, key, where="summary"):
        vals = [m[where].get(key) for m in members if m[where].get(key) is not None]
        return float(np.median(vals)) if vals else None

    rows, ratios = [], {}
    for (L, strat), members in sorted(by.items()):
        base = by.get((L, "none"))
        mem, fl = med(members, "memory_bytes"), med(members, "dot_flops")
        # a zero baseline (a backend whose matmuls are library calls the HLO count cannot see) gives
        # no ratio rather than a ZeroDivisionError
        mem_r = mem / med(base, "memory_bytes") if base and med(base, "memory_bytes") else None
        fl_r = fl / med(base, "dot_flops") if base and med(base, "dot_flops") else None
        plan_mem = None
        if base and members[0]["summary"].get("plan_peak_bytes") is not None:
            # calibrated plan: the gradient outputs (the same for every strategy) + predicted temporaries
            s0, b0 = members[0]["summary"], base[0]["summary"]
            plan_mem = (b0["output_bytes"] + s0["plan_peak_bytes"]) / b0["memory_bytes"]
        ratios[(L, strat)] = (mem_r, fl_r, plan_mem, members[0]["summary"].get("plan_flops_ratio"))
        rows.append(
            [
                L,
                strat,
                f"{mem / 2**20:.3g}",
                "—" if mem_r is None else f"{mem_r:.3f}",
                "—" if plan_mem is None else f"{plan_mem:.3f}",
                "—" if fl_r is None else f"{fl_r:.3f}",
                "—"
                if members[0]["summary"].get("plan_flops_ratio") is None
                else f"{members[0]['summary']['plan_flops_ratio']:.3f}",
                R.median_range([m["timing"]["compile_time"] for m in members], fmt="{:.2f}"),
                R.median_range([m["timing"].get("run_time") for m in members], fmt="{:.4f}"),
            ]
        )
    blocks: list[Any] = [
        R.Heading("Memory and FLOPs of the gradient, ÷ plain backprop"),
        R.Text(
            "Memory = temp + output bytes of the compiled gradient; FLOPs = matmul FLOPs of the compiled "
            "HLO with loop bodies times their trip counts (XLA's cost analysis counts a scan body once). "
            "'plan' columns are gradlab.remat.plan's predictions, calibrated by gradlab.remat.calibrate "
            "(memory: the gradient outputs + the predicted peak of temporaries). A FLOPs ratio above 1 "
            "proves the recompute happened."
        ),
        R.Table(
            [
                "L",
                "strategy",
                "memory MiB",
                "memory ÷ plain",
                "plan",
                "FLOPs ÷ plain",
                "plan",
                "compile s",
                "run s",
            ],
            rows,
        ),
    ]
    Ls = sorted({k[0] for k in by})
    Lmax = Ls[-1]
    points = []
    for (L, strat), (mem_r, fl_r, plan_mem, plan_fl) in ratios.items():
        if L == Lmax and mem_r is not None:
            points.append((strat, mem_r, fl_r, plan_mem, plan_fl))
    if points:
        blocks.append(R.Heading(f"Pareto front at L = {Lmax}"))
        blocks.append(
            R.scatter_figure(
                f"{NAME}-pareto-L{Lmax}",
                title=f"memory vs FLOPs at L = {Lmax} (filled: measured, hollow: plan)",
                xlabel="memory ÷ plain",
                ylabel="FLOPs ÷ plain",
                points=points,
            )
        )
    if len(Ls) >= 2:
        blocks.append(R.Heading("Regimes against depth"))
        strategies = sorted({k[1] for k in by})
        for key, ylabel, slug in (
            ("memory_bytes", "gradient memory (bytes)", "memory"),
            ("dot_flops", "gradient matmul FLOPs", "flops"),
        ):
            series = []
            for strat in strategies:
                xs = [L for L in Ls if (L, strat) in by]
                ys = [med(by[(L, strat)], key) for L in xs]
                series.append(R.Series(label=strat, runs=[(xs, ys)]))
            blocks.append(
                R.line_figure(
                    f"{NAME}-{slug}_vs_L",
                    title=f"{ylabel} vs depth L",
                    xlabel="layers L",
                    ylabel=ylabel,
                    series=series,
                    logx=True,
                    logy=True,
                    markers=True,
                )
            )
        exps = []
        for strat in strategies:
            xs = [L for L in Ls if (L, strat) in by]
            if len(xs) >= 2:
                ys = [med(by[(L, strat)], "memory_bytes") for L in xs]
                exps.append([strat, f"{np.polyfit(np.log(xs), np.log(ys), 1)[0]:.2f}"])
        blocks.append(R.Text("Fitted exponent of memory in L (log-log least squares):"))
        blocks.append(R.Table(["strategy", "memory ∝ L^p, p ="], exps))
    return blocks
