"""The ``curvature`` kind: Hessian trace estimators and top eigenvalues of catalog losses, vs the dense
Hessian.

Config section::

    [curvature]
    problem = [{name = "mlp", hidden = 16}]
    method = ["hutchinson", "hutch++", "xtrace", "auto"]
    num_matvecs = [10, 30, 100]
    top_k = 5                  # Lanczos top-k eigenvalues vs eigh of the dense Hessian (0: skip)
    point = "init"             # or "random": where the Hessian is taken
    mesh = false               # true: spread probe blocks over every local device (jax.sharding)

Per run (problem point × method × budget × repeat): :func:`gradlab.curvature.hessian_trace` at the point,
its relative error against the trace of the dense Hessian (:func:`gradlab.curvature.hessian`), whether
±1.96·std_error covers the truth, and the top-k eigenvalues by Lanczos against ``eigh``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, StrictBool

from gradlab.lab.config import Base, PosInt
from gradlab.lab.kinds._common import (
    base_spec,
    entry_label,
    expand_entries,
    make_problem,
    problem_key,
    problem_models,
    stable_hash,
    validate_entries,
)

NAME = "curvature"
SUMMARY = (
    "Hessian trace (Hutchinson, Hutch++, XTrace, XNysTrace, auto) and top eigenvalues vs dense"
)

_METHODS = Literal["hutchinson", "hutch++", "xtrace", "xnystrace", "auto"]


class Section(Base):
    """The ``[curvature]`` section."""

    problem: list[Any] = Field(default_factory=lambda: [{"name": "mlp"}], min_length=1)
    method: list[_METHODS] = Field(default_factory=lambda: ["hutchinson", "auto"], min_length=1)
    num_matvecs: list[PosInt] = Field(default_factory=lambda: [10, 30, 100], min_length=1)
    top_k: Annotated[int, Field(ge=0, le=100, strict=True)] = 5
    point: Literal["init", "random"] = "init"
    mesh: StrictBool = False
    max_dim: PosInt = 4000


def check(section: Section, experiment: Any, raw: Any) -> tuple[Section, list[str]]:
    problems, errors = validate_entries(
        section.problem, "problem", problem_models, raw, (NAME, "problem")
    )
    return section.model_copy(update={"problem": problems}), errors


def expand(resolved: Any) -> list[dict[str, Any]]:
    exp, sec = resolved.experiment, resolved.section
    return [
        {
            **base_spec(NAME, exp, r),
            "problem": problem,
            "method": {"name": method},
            "num_matvecs": m,
            "top_k": sec.top_k,
            "point": sec.point,
            "mesh": sec.mesh,
            "max_dim": sec.max_dim,
        }
        for problem in expand_entries(sec.problem)
        for method in sec.method
        for m in sec.num_matvecs
        for r in range(exp.repeats)
    ]


def labels(spec: Mapping[str, Any]) -> dict[str, str]:
    from gradlab import problems

    p = spec["problem"]
    return {
        "problem": entry_label(p, problems.options(p["name"])),
        "method": spec["method"]["name"],
    }


def execute(spec: Mapping[str, Any]) -> dict[str, Any]:
    import time

    import jax
    from jax.flatten_util import ravel_pytree

    from gradlab import curvature

    pkey = problem_key(spec["seed"], spec["problem"], spec["repeat"])
    p = make_problem(spec["problem"], pkey, spec["dtype"])
    k_point, k_est, k_eig = jax.random.split(
        jax.random.fold_in(pkey, stable_hash({"method": spec["method"], "m": spec["num_matvecs"]})),
        3,
    )
    x = p.random_point(k_point) if spec["point"] == "random" and p.random_point else p.init
    d = int(ravel_pytree(x)[0].size)
    if d > spec["max_dim"]:
        raise ValueError(
            f"problem has d = {d} parameters > max_dim = {spec['max_dim']}: the dense Hessian "
            "oracle would not fit; raise curvature.max_dim or shrink the problem."
        )
    mesh = None
    if spec["mesh"]:
        mesh = jax.make_mesh((jax.device_count(),), ("probes",))
    H = np.asarray(curvature.hessian(p.loss, x))
    H = 0.5 * (H + H.T)
    exact = float(np.trace(H))
    t0 = time.perf_counter()
    est = curvature.hessian_trace(
        p.loss,
        x,
        k_est,
        num_matvecs=spec["num_matvecs"],
        method=spec["method"]["name"],
        mesh=mesh,
    )
    value = float(est.value)
    std = float(est.std_error)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "d": d,
        "devices": jax.device_count() if mesh is not None else 1,
        "exact_trace": exact,
        "value": value,
        "std_error": std,
        "num_matvecs_used": int(est.num_matvecs),
        "rel_error": abs(value - exact) / max(abs(exact), 1e-300),
        "rel_std_error": std / max(abs(exact), 1e-300),
        "covered": bool(abs(value - exact) <= 1.96 * std),
    }
    k = min(spec["top_k"], d)
    if k:
        lam = np.linalg.eigvalsh(H)[::-1][:k]
        op = curvature.hvp_operator(p.loss, x)
        eig = curvature.eigenvalues(op, k_eig, like=x, k=k, which="largest")
        got = np.sort(np.asarray(eig.values))[::-1][:k]
        summary["top_eigenvalues"] = got.tolist()
        summary["top_eigenvalues_exact"] = lam.tolist()
        summary["eig_max_rel_error"] = float(
            np.max(np.abs(got - lam) / np.maximum(np.abs(lam), 1e-300))
        )
    return {"status": "ok", "summary": summary, "points": [], "timing": {"seconds": seconds}}


def report(runs: Sequence[Mapping[str, Any]], resolved_json: Mapping[str, Any]) -> list[Any]:
    """A table per (problem, method, budget): median relative error, std_error/|tr| and the coverage of
    ±1.96·std_error over repeats; the error-vs-budget figure per problem; the Lanczos top-k check."""
    from gradlab.lab import report as R

    groups: dict[tuple, list[Mapping]] = {}
    for r in runs:
        lab = labels(r["spec"])
        groups.setdefault((lab["problem"], lab["method"], r["spec"]["num_matvecs"]), []).append(r)
    rows = []
    for (prob, method, m), members in sorted(groups.items(), key=lambda kv: kv[0]):
        s = [x["summary"] for x in members]
        rows.append(
            [
                prob,
                method,
                m,
                s[0]["d"],
                f"{s[0]['exact_trace']:.6g}",
                R.median_range([v["rel_error"] for v in s], fmt="{:.2e}"),
                R.median_range([v["rel_std_error"] for v in s], fmt="{:.2e}"),
                f"{sum(v['covered'] for v in s)}/{len(s)}",
                R.median_range([x["timing"]["seconds"] for x in members], fmt="{:.3f}"),
            ]
        )
    blocks: list[Any] = [
        R.Heading("Hessian trace estimates vs the dense Hessian"),
        R.Text(
            "Relative error |estimate − tr H|/|tr H| and std_error/|tr H| (medians [min–max] over "
            "repeats); 'covered' counts repeats where ±1.96·std_error contains tr H. Seconds include "
            "compilation."
        ),
        R.Table(
            [
                "problem",
                "method",
                "matvecs",
                "d",
                "tr H",
                "rel. error",
                "std_error/|tr H|",
                "covered",
                "seconds",
            ],
            rows,
        ),
    ]
    eig_rows = []
    seen = set()
    for r in runs:
        s = r["summary"]
        prob = labels(r["spec"])["problem"]
        if "top_eigenvalues" in s and (prob, r["spec"]["repeat"]) not in seen:
            seen.add((prob, r["spec"]["repeat"]))
            eig_rows.append(
                [
                    prob,
                    r["spec"]["repeat"],
                    ", ".join(f"{v:.4g}" for v in s["top_eigenvalues"]),
                    ", ".join(f"{v:.4g}" for v in s["top_eigenvalues_exact"]),
                    f"{s['eig_max_rel_error']:.1e}",
                ]
            )
    if eig_rows:
        blocks += [
            R.Heading("Top eigenvalues: Lanczos vs eigh"),
            R.Table(["problem", "repeat", "Lanczos", "eigh (dense)", "max rel. error"], eig_rows),
        ]
    for prob in sorted({k[0] for k in groups}):
        if len({k[2] for k in groups if k[0] == prob}) < 2:
            continue  # one budget: the table says it all
        series = []
        for method in sorted({k[1] for k in groups if k[0] == prob}):
            ms = sorted({k[2] for k in groups if k[0] == prob and k[1] == method})
            ys = [
                float(np.median([x["summary"]["rel_error"] for x in groups[(prob, method, m)]]))
                for m in ms
            ]
            series.append(R.Series(label=method, runs=[(ms, ys)]))
        blocks.append(
            R.line_figure(
                f"{NAME}-{prob}-trace_error_vs_matvecs",
                title=f"{prob}: Hessian trace",
                xlabel="matrix-vector products",
                ylabel="median relative error",
                series=series,
                logx=True,
                logy=True,
                markers=True,
            )
        )
    return blocks
