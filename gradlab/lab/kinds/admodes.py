"""The ``admodes`` kind: forward vs reverse mode on the Jacobian of f(x) = Ax, n fixed, m varied.

Config section::

    [admodes]
    n = 100
    ms = [10, 25, 50, 80, 100, 125, 200, 400, 1000]
    rounds = 9                  # interleaved timing rounds per m (medians reported)
    clock = "cpu"               # process CPU time (steady on a loaded machine) or "wall"

Per run (m × repeat): :func:`gradlab.admodes.costs` of ``jacfwd`` (≈ n JVPs: ``2mn²`` FLOPs), ``jacrev``
(≈ m VJPs: ``2m²n``) and ``jacobian(mode="auto")`` — compile time apart, run time (median of interleaved
rounds), HLO FLOPs — and the mode auto chose. The report finds the crossover m* where reverse ÷ forward
crosses 1 (by time and by FLOPs; the seeds' figure puts it at m ≈ n) and how much slower auto is than the
better fixed mode at each m.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from gradlab._backend import platform
from gradlab.lab.config import Base, PosInt, Sweep
from gradlab.lab.kinds._common import base_spec

NAME = "admodes"
SUMMARY = "forward vs reverse mode: Jacobian of f(x) = Ax as m grows (time, FLOPs, crossover, auto)"


class Section(Base):
    """The ``[admodes]`` section."""

    n: PosInt = 100
    ms: Sweep[PosInt] = Field(
        default_factory=lambda: [10, 25, 50, 80, 100, 125, 200, 400, 1000], min_length=2
    )
    rounds: Annotated[int, Field(ge=1, le=1000, strict=True)] = 9
    clock: Literal["cpu", "wall"] = "cpu"


def check(section: Section, experiment: Any, raw: Any) -> tuple[Section, list[str]]:
    return section, []


def expand(resolved: Any) -> list[dict[str, Any]]:
    exp, sec = resolved.experiment, resolved.section
    return [
        {
            **base_spec(NAME, exp, r),
            "n": sec.n,
            "m": m,
            "rounds": sec.rounds,
            "clock": sec.clock,
        }
        for m in sorted(set(sec.ms))
        for r in range(exp.repeats)
    ]


def execute(spec: Mapping[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from gradlab import admodes
    from gradlab.lab.kinds._common import stable_hash

    n, m = spec["n"], spec["m"]
    key = jax.random.fold_in(jax.random.key(spec["seed"]), stable_hash([n, m, spec["repeat"]]))
    ka, kx = jax.random.split(key)
    dtype = jnp.dtype(spec["dtype"])
    A = jax.random.normal(ka, (m, n)).astype(dtype)
    x = jax.random.normal(kx, (n,)).astype(dtype)
    # the process CPU time misses a GPU's or TPU's time: off the CPU the wall clock is used
    clock = spec["clock"] if platform() == "cpu" else "wall"
    c = admodes.costs(
        lambda x, A: A @ x,
        x,
        A,
        ops=("jacfwd", "jacrev", "jacobian"),
        repeats=spec["rounds"],
        clock=clock,
    )
    summary: dict[str, Any] = {
        "auto_mode": admodes.choose_mode(lambda x: A @ x, x),
        "clock": clock,  # the clock used (process CPU time only on the CPU backend)
    }
    timing: dict[str, Any] = {}
    for op in ("forward", "jacfwd", "jacrev", "jacobian"):
        summary[f"flops.{op}"] = c[op].flops
        timing[f"run_time.{op}"] = c[op].run_s
        timing[f"compile_time.{op}"] = c[op].compile_s
    # one recorded point per run, so that results.json (the tidy table) has the metrics; the clock used
    # is named apart from the spec's `clock` column (off the CPU it is the wall clock)
    point = {k: v for k, v in summary.items() if k != "clock"}
    point["clock_used"] = clock
    return {"status": "ok", "summary": summary, "points": [point], "timing": timing}


def report(runs: Sequence[Mapping[str, Any]], resolved_json: Mapping[str, Any]) -> list[Any]:
    from gradlab import admodes
    from gradlab.lab import report as R

    by: dict[int, list[Mapping]] = {}
    for r in runs:
        by.setdefault(r["spec"]["m"], []).append(r)
    ms = sorted(by)
    n = runs[0]["spec"]["n"]

    def med(members, key):
        return float(np.median([x["timing"][key] for x in members]))

    fwd = [med(by[m], "run_time.jacfwd") for m in ms]
    rev = [med(by[m], "run_time.jacrev") for m in ms]
    auto = [med(by[m], "run_time.jacobian") for m in ms]
    ffl = [by[m][0]["summary"]["flops.jacfwd"] for m in ms]
    rfl = [by[m][0]["summary"]["flops.jacrev"] for m in ms]
    rows = [
        [
            m,
            f"{1e6 * f:.1f}",
            f"{1e6 * r:.1f}",
            f"{r / f:.2f}",
            f"{rf / ff:.3g}" if ff else "—",
            by[m][0]["summary"]["auto_mode"],
            f"{a / min(f, r):.2f}",
        ]
        for m, f, r, a, ff, rf in zip(ms, fwd, rev, auto, ffl, rfl, strict=True)
    ]
    m_time = admodes.crossing(ms, fwd, rev)
    m_flops = admodes.crossing(ms, ffl, rfl)
    clock = runs[0].get("summary", {}).get("clock", runs[0]["spec"]["clock"])
    blocks: list[Any] = [
        R.Heading(f"Jacobian of f(x) = Ax, n = {n}: forward vs reverse mode"),
        R.Text(
            f"Medians over repeats of the median of interleaved rounds ({clock} clock), in µs per "
            "Jacobian; FLOPs from the compiled HLO. jacfwd pushes n tangents (2mn² FLOPs), jacrev pulls "
            "m cotangents (2m²n). 'auto ÷ best' is jacobian(mode='auto') against the faster fixed mode."
        ),
        R.Table(
            [
                "m",
                "jacfwd µs",
                "jacrev µs",
                "rev ÷ fwd (time)",
                "rev ÷ fwd (FLOPs)",
                "auto picks",
                "auto ÷ best",
            ],
            rows,
        ),
        R.Text(
            f"Crossover m* (reverse ÷ forward crosses 1): {m_time:.3g} by time, {m_flops:.3g} by FLOPs "
            f"(n = {n}; the seeds' figure: m* ≈ n)."
        ),
    ]
    blocks.append(
        R.line_figure(
            f"{NAME}-jacobian_time_vs_m",
            title=f"Jacobian of Ax, n = {n}",
            xlabel="outputs m",
            ylabel="time per Jacobian (s)",
            series=[
                R.Series("jacfwd (forward)", [(ms, fwd)]),
                R.Series("jacrev (reverse)", [(ms, rev)]),
                R.Series("jacobian(mode='auto')", [(ms, auto)]),
            ],
            logx=True,
            logy=True,
            markers=True,
        )
    )
    blocks.append(
        R.line_figure(
            f"{NAME}-jacobian_flops_vs_m",
            title=f"Jacobian of Ax, n = {n}",
            xlabel="outputs m",
            ylabel="FLOPs per Jacobian",
            series=[
                R.Series("jacfwd (forward)", [(ms, ffl)]),
                R.Series("jacrev (reverse)", [(ms, rfl)]),
            ],
            logx=True,
            logy=True,
            markers=True,
        )
    )
    return blocks
