"""The ``gradcheck`` kind: the catalog's closed-form gradients and HVPs checked, with step sweeps.

Config section::

    [gradcheck]
    problem = "all"             # or a list: ["quadratic", {name = "mds", num_points = [8, 16]}]
    sweep = true                # the V-shaped error-vs-step curves of forward and central differences

Per run (problem point × repeat): a random point and direction from the instance key; the relative error
of every method (forward mode, forward/central differences, the complex step where valid, the closed
form) against reverse mode with its tolerance (:func:`gradlab.checks.gradient`), the closed-form HVP
against the dense Hessian (:func:`gradlab.checks.hvp`), and the step sweep
(:func:`gradlab.checks.step_sweep`) with the measured and predicted optimal steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BeforeValidator, StrictBool

from gradlab.lab.config import Base
from gradlab.lab.kinds._common import (
    base_spec,
    entry_label,
    expand_entries,
    make_problem,
    problem_key,
    problem_models,
    validate_entries,
)

NAME = "gradcheck"
SUMMARY = (
    "closed-form gradients and HVPs of catalog problems vs AD and finite differences, step sweeps"
)


class Section(Base):
    """The ``[gradcheck]`` section."""

    # "all", a list of entries, or one entry (a name or a table) as a one-entry list
    problem: Annotated[
        Literal["all"] | list[Any],
        BeforeValidator(lambda v: v if v == "all" or isinstance(v, list) else [v]),
    ] = "all"
    sweep: StrictBool = True


def check(section: Section, experiment: Any, raw: Any) -> tuple[Section, list[str]]:
    from gradlab import problems as P

    entries = P.names() if section.problem == "all" else section.problem
    if not entries:
        return section, [f"{NAME}.problem: expected 'all' or a non-empty list of problems."]
    problems, errors = validate_entries(entries, "problem", problem_models, raw, (NAME, "problem"))
    return section.model_copy(update={"problem": problems}), errors


def expand(resolved: Any) -> list[dict[str, Any]]:
    exp, sec = resolved.experiment, resolved.section
    return [
        {
            **base_spec(NAME, exp, r),
            "problem": problem,
            "sweep": sec.sweep,
        }
        for problem in expand_entries(sec.problem)
        for r in range(exp.repeats)
    ]


def labels(spec: Mapping[str, Any]) -> dict[str, str]:
    from gradlab import problems

    p = spec["problem"]
    return {"problem": entry_label(p, problems.options(p["name"]))}


def execute(spec: Mapping[str, Any]) -> dict[str, Any]:
    import time

    import jax

    from gradlab import checks

    key = problem_key(spec["seed"], spec["problem"], spec["repeat"])
    k_point, k_dir, k_sweep = jax.random.split(jax.random.fold_in(key, 1), 3)
    p = make_problem(spec["problem"], key, spec["dtype"])
    x = p.random_point(k_point) if p.random_point is not None else p.init
    t0 = time.perf_counter()
    g = checks.gradient(p.loss, x, reference=p.grad, complex_step=p.analytic)
    h = checks.hvp(p.loss, x, p.hvp, key=k_dir) if p.hvp is not None else None
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "ok": bool(g.ok and (h.ok if h else True)),
        "value": float(np.asarray(g.value)),
        "eps": float(np.finfo(g.dtype).eps),
        "message": "\n".join(filter(None, [g.message, h.message if h else ""])),
        "notes": list(g.notes),
    }
    for m, e in g.errors.items():
        summary[f"error.{m}"] = float(e)
        summary[f"tolerance.{m}"] = float(g.tolerances[m])
    if h is not None:
        summary["error.hvp"] = float(h.error)
        summary["tolerance.hvp"] = float(h.tolerance)
    points = []
    if spec["sweep"]:
        t1 = time.perf_counter()
        sw = checks.step_sweep(p.loss, x, key=k_sweep)
        seconds += time.perf_counter() - t1
        for m, errs in sw.errors.items():
            summary[f"best_step.{m}"] = float(sw.best_step[m])
            summary[f"predicted_step.{m}"] = float(sw.predicted_step[m])
            # the truncation constant b of the V's right arm; None where the errors have no such arm
            # (central differences of a quadratic, a piecewise-linear f): then there is no optimum
            b = sw.fit[m][1]
            summary[f"truncation.{m}"] = float(b) if math.isfinite(b) and b > 0 else None
            for hstep, e in zip(sw.steps.tolist(), np.asarray(errs).tolist(), strict=True):
                points.append({"method": m, "step": hstep, "error": e})
    status = "ok"
    return {"status": status, "summary": summary, "points": points, "timing": {"seconds": seconds}}


def report(runs: Sequence[Mapping[str, Any]], resolved_json: Mapping[str, Any]) -> list[Any]:
    """A table of relative errors (medians over repeats) per problem and method, with tolerances,
    and one error-vs-step figure per problem (measured V's, with the predicted optimal steps)."""
    from gradlab.lab import report as R

    by_problem: dict[str, list[Mapping]] = {}
    for run in runs:
        by_problem.setdefault(labels(run["spec"])["problem"], []).append(run)
    methods: list[str] = []
    for run in runs:
        for k in run["summary"]:
            if k.startswith("error.") and k[6:] not in methods:
                methods.append(k[6:])
    order = ["forward_mode", "forward", "central", "complex_step", "reference", "hvp"]
    methods.sort(key=lambda m: (order.index(m) if m in order else len(order), m))
    rows = []
    for prob, members in by_problem.items():
        row: list[Any] = [prob]
        for m in methods:
            errs = [r["summary"].get(f"error.{m}") for r in members]
            row.append(
                R.median_range(errs, fmt="{:.1e}") if any(e is not None for e in errs) else "—"
            )
        n_ok = sum(1 for r in members if r["summary"].get("ok"))
        row.append(f"{n_ok}/{len(members)}")
        rows.append(row)
    blocks: list[Any] = [
        R.Heading("Relative errors against reverse mode"),
        R.Text(
            "‖g_method − g_reverse‖/‖g_reverse‖ at a random point per repeat (medians [min–max]); "
            "'reference' is the hand-derived gradient, 'hvp' the hand-derived Hessian-vector product "
            "against the dense Hessian. Tolerances (see gradlab.checks): the difference quotients' "
            "from the dtype's ε, the method's truncation order and the measured truncation error; "
            "forward mode's and the complex step's 1e3·ε (rounding only); the hand-derived gradient "
            "and HVP a fixed relative 1e-8 (float64) or 1e-4 (float32). 'ok' counts repeats where "
            "every method passed."
        ),
        R.Table(["problem", *methods, "ok"], rows),
    ]
    failing = [r for r in runs if not r["summary"].get("ok")]
    if failing:
        blocks.append(R.Heading("Checks that failed"))
        blocks.append(
            R.Table(
                ["problem", "repeat", "message"],
                [
                    [
                        labels(r["spec"])["problem"],
                        r["spec"]["repeat"],
                        r["summary"].get("message", ""),
                    ]
                    for r in failing
                ],
            )
        )
    if any(r["points"] for r in runs):
        blocks.append(R.Heading("Error vs step (finite differences)"))
        steps_rows = []
        for prob, members in by_problem.items():
            row: list[Any] = [prob]
            for m in ("forward", "central"):
                with_arm = [
                    r for r in members if r["summary"].get(f"truncation.{m}", 1.0) is not None
                ]
                if not with_arm:
                    row.append("— (no truncation arm)")
                else:  # repeats without a truncation arm have no optimum to count
                    row.append(
                        R.median_range(
                            [r["summary"].get(f"best_step.{m}") for r in with_arm], fmt="{:.2e}"
                        )
                    )
                row.append(
                    R.median_range(
                        [r["summary"].get(f"predicted_step.{m}") for r in members], fmt="{:.2e}"
                    )
                )
            steps_rows.append(row)
        blocks.append(
            R.Text(
                "The measured optimal step is the minimiser of the V a/h + b·hᵖ fitted to the errors "
                "(medians [min–max] over repeats); the prediction is √ε·scale (forward) and "
                "ε^(1/3)·scale (central), scale = max(1, ‖x‖∞) at each repeat's point. Where the "
                "errors have no truncation arm (the difference is exact up to rounding: central "
                "differences of a quadratic, or f piecewise linear along the direction), the error "
                "only falls as h grows and there is no optimal step inside the sweep: '—'."
            )
        )
        blocks.append(
            R.Table(
                ["problem", "forward: best h", "predicted", "central: best h", "predicted"],
                steps_rows,
            )
        )
        for prob, members in by_problem.items():
            series = []
            for m in ("forward", "central"):
                runs_xy = []
                for r in members:
                    pts = [p for p in r["points"] if p["method"] == m]
                    if pts:
                        runs_xy.append(
                            ([p["step"] for p in pts], [max(p["error"], 1e-18) for p in pts])
                        )
                if runs_xy:
                    series.append(R.Series(label=m, runs=runs_xy))
            if series:
                blocks.append(
                    R.line_figure(
                        f"{NAME}-{prob}-error_vs_step",
                        title=prob,
                        xlabel="step h",
                        ylabel="relative error of the difference quotient",
                        series=series,
                        logx=True,
                        logy=True,
                    )
                )
    return blocks
