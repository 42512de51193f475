"""The ``descent`` kind: problems × strategies × optimizers × repeats through :func:`gradlab.descent.run`.

Config section::

    [descent]
    num_steps = 2000            # the most steps per run
    tol = 1e-6                  # stop at relative gap ≤ tol (problems with a known f*), else ‖∇f‖ ≤ tol
    problem = [{name = "least_squares", dim = [10, 100]}]          # each entry its own sub-grid
    optimizer = [{name = "sgd", learning_rate = "theory"}]

    [[descent.strategy]]
    name = "exact"

    [[descent.strategy]]
    name = "two_point"
    num_directions = [1, 8]     # multiplies only the two_point runs

``learning_rate = "theory"`` (sgd, momentum and nesterov) takes the step the theory gives for the strategy on the instance:
``1/L`` for exact gradients and finite differences, ``1/(cL)`` for random-direction estimates with
``E‖G‖² = c‖∇f‖²`` (``c = 1 + (d−1)/k`` for ``k`` iid sphere or Rademacher directions, ``1 + (d+1)/k``
for Gaussian ones, ``d/k`` for orthonormal frames or distinct coordinates). On a ``μ``-strongly convex
problem the report then draws the theory rate ``(1 − μ/(cL))^k`` beside the measured relative gap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BeforeValidator, Field, StrictBool, model_validator

from gradlab.lab.config import (
    Base,
    PosInt,
    PositiveFloat,
    Sweep,
)
from gradlab.lab.kinds._common import (
    base_spec,
    build_problem_points,
    entry_label,
    expand_entries,
    make_problem,
    problem_key,
    problem_models,
    stable_hash,
    thin,
    validate_entries,
)

NAME = "descent"
SUMMARY = "problems × gradient strategies × optax optimizers: loss, evaluations and time per step"

_DISTRIBUTIONS = Literal["sphere", "gaussian", "rademacher", "orthogonal", "coordinate"]
_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "lbfgs")


def _learning_rate(v: Any) -> Any:
    if v == "theory":
        return v
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"expected a number > 0 or 'theory', got {v!r}")
    return float(v)


LearningRate = Annotated[Any, BeforeValidator(_learning_rate)]
Momentum = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class _Strategy(Base):
    name: str
    label: str | None = None


class Exact(_Strategy):
    name: Literal["exact"]


class ForwardMode(_Strategy):
    name: Literal["forward_mode"]
    batch_size: PosInt | None = None


class ForwardDifference(_Strategy):
    name: Literal["forward_difference"]
    step: Sweep[PositiveFloat] | None = None


class CentralDifference(_Strategy):
    name: Literal["central_difference"]
    step: Sweep[PositiveFloat] | None = None


class TwoPoint(_Strategy):
    name: Literal["two_point"]
    num_directions: Sweep[PosInt] = Field(default_factory=lambda: [1])
    distribution: Sweep[_DISTRIBUTIONS] = Field(default_factory=lambda: ["sphere"])
    smoothing: Sweep[PositiveFloat] | None = None
    batch_size: PosInt | None = None
    lean: StrictBool = False


class ForwardGradient(_Strategy):
    name: Literal["forward_gradient"]
    num_directions: Sweep[PosInt] = Field(default_factory=lambda: [1])
    distribution: Sweep[_DISTRIBUTIONS] = Field(default_factory=lambda: ["gaussian"])
    batch_size: PosInt | None = None


STRATEGIES: dict[str, type[Base]] = {
    "exact": Exact,
    "forward_mode": ForwardMode,
    "forward_difference": ForwardDifference,
    "central_difference": CentralDifference,
    "two_point": TwoPoint,
    "forward_gradient": ForwardGradient,
}


def strategy_model(name: str) -> type[Base]:
    from gradlab._validate import check_choice

    return STRATEGIES[check_choice("strategy", name, STRATEGIES)]


DEFAULT_MOMENTUM = 0.9


class Optimizer(Base):
    """An optax optimizer: ``sgd``, ``momentum`` (heavy ball), ``nesterov``, ``adam``, ``lbfgs``."""

    name: Literal["sgd", "momentum", "nesterov", "adam", "lbfgs"] = "sgd"
    learning_rate: Sweep[LearningRate] | None = Field(default_factory=lambda: ["theory"])
    # None unless the optimizer takes it (the resolved config shows only what a run uses)
    momentum: Sweep[Momentum] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class Section(Base):
    """The ``[descent]`` section."""

    problem: Sweep[Any] = Field(default_factory=lambda: [{"name": "least_squares"}], min_length=1)
    strategy: Sweep[Any] = Field(default_factory=lambda: [{"name": "exact"}], min_length=1)
    optimizer: Sweep[Optimizer] = Field(default_factory=lambda: [Optimizer()], min_length=1)
    num_steps: PosInt = 1000
    tol: PositiveFloat | None = None
    use_f_star: StrictBool = True
    record_grad_norm: StrictBool = False
    points: Annotated[int, Field(ge=2, le=100_000, strict=True)] = 200
    curves: StrictBool = True


def _optimizer_points(opt: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for lr in opt["learning_rate"] or [None]:
        if opt["name"] in ("momentum", "nesterov"):
            out += [
                {"name": opt["name"], "learning_rate": lr, "momentum": m} for m in opt["momentum"]
            ]
        elif opt["name"] == "lbfgs":
            out.append({"name": "lbfgs"})
        else:
            out.append({"name": opt["name"], "learning_rate": lr})
    # lbfgs has one point whatever the learning rates
    return [dict(t) for t in dict.fromkeys(tuple(sorted(o.items())) for o in out)]


def check(section: Section, experiment: Any, raw: Any) -> tuple[Section, list[str]]:
    """Validate the problem and strategy entries against their registries; build each problem once."""
    problems, errors = validate_entries(
        section.problem, "problem", problem_models, raw, (NAME, "problem")
    )
    strategies, more = validate_entries(
        section.strategy, "strategy", strategy_model, raw, (NAME, "strategy")
    )
    errors += more
    for i, opt in enumerate(section.optimizer):
        where = f"{NAME}.optimizer[{i}]"
        # a null (as the resolved config writes for options an optimizer does not take) is not given
        given = {k for k in opt.model_fields_set if getattr(opt, k) is not None}
        if opt.name == "adam" and "learning_rate" not in given:
            errors.append(
                f"{where}.learning_rate: required for 'adam' (it has no theory step size); "
                "give a number or a list, e.g. learning_rate = 0.01."
            )
        elif opt.name == "adam" and "theory" in opt.learning_rate:
            errors.append(
                f"{where}.learning_rate: 'theory' is defined for sgd, momentum and "
                f"nesterov; give a number for {opt.name!r} (e.g. learning_rate = 0.01)."
            )
        if opt.name == "lbfgs" and "learning_rate" in given:
            errors.append(
                f"{where}.learning_rate: lbfgs takes no learning rate (its line search picks each "
                "step); remove the key, or choose sgd, momentum, nesterov or adam."
            )
        if opt.name not in ("momentum", "nesterov") and "momentum" in given:
            errors.append(
                f"{where}.momentum: applies to name = 'momentum' or 'nesterov' only, not "
                f"{opt.name!r}; remove the key or change the name."
            )
    # the resolved config (config.json, the report) shows the options each optimizer uses: momentum's
    # default for momentum/nesterov only, no learning rate for lbfgs
    optimizers = [
        opt.model_copy(
            update={
                "momentum": (opt.momentum or [DEFAULT_MOMENTUM])
                if opt.name in ("momentum", "nesterov")
                else None,
                "learning_rate": None if opt.name == "lbfgs" else opt.learning_rate,
            }
        )
        for opt in section.optimizer
    ]
    section = section.model_copy(
        update={"problem": problems, "strategy": strategies, "optimizer": optimizers}
    )
    return section, errors


def check_instances(section: Section, experiment: Any) -> list[str]:
    """The deep check (run by ``gradlab validate`` and before any run is computed, skipped when every
    run is cached): build each problem and strategy point, and trace each strategy on each problem."""
    optimizers = [o.model_dump() for o in section.optimizer]
    return _check_instances(section.problem, section.strategy, experiment, optimizers)


def _check_instances(
    problems: Sequence[Mapping],
    strategies: Sequence[Mapping],
    experiment,
    optimizers: Sequence[Mapping] = (),
) -> list[str]:
    """Build every problem point and strategy point once, so constructor errors show at validation."""
    import jax

    with jax.enable_x64(True):  # as the runs will (gradlab.lab.runner._execute_one)
        return _check_instances_x64(problems, strategies, experiment, optimizers)


def _check_instances_x64(problems, strategies, experiment, optimizers) -> list[str]:
    import jax

    from gradlab import grads

    built, errors = build_problem_points(problems, experiment.dtype, NAME)
    for i, opt in enumerate(optimizers):
        if opt["name"] == "lbfgs" or "theory" not in opt["learning_rate"]:
            continue
        lacking = sorted({_problem_label(s) for s, p in built if not p.smoothness})
        if lacking:
            errors.append(
                f"{NAME}.optimizer[{i}].learning_rate: 'theory' is 1/(cL) and needs the smoothness "
                f"constant L, which {'problem' if len(lacking) == 1 else 'problems'} {', '.join(lacking)} "
                f"{'does' if len(lacking) == 1 else 'do'} not give; set a number "
                "(e.g. learning_rate = 0.01) or drop that problem."
            )
    for i, entry in enumerate(strategies):
        for spec in expand_entries([entry]):
            try:
                strategy = grads.make(spec["name"], **_strategy_options(spec))
            except Exception as e:
                errors.append(f"{NAME}.strategy[{i}] ({_strategy_label(spec)}): {e}")
                break
            for pspec, problem in built:  # trace once (no compile) to catch e.g. k > d
                try:
                    jax.eval_shape(
                        lambda x, k, s=strategy, p=problem: s(p.loss, x, k).grad,
                        problem.init,
                        jax.random.key(0),
                    )
                except Exception as e:
                    errors.append(
                        f"{NAME}.strategy[{i}] ({_strategy_label(spec)}) on problem "
                        f"{_problem_label(pspec)}: {e}"
                    )
    return errors


def _strategy_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("name", "label") and v is not None}


def expand(resolved: Any) -> list[dict[str, Any]]:
    """One run spec per (problem point, strategy point, optimizer point, repeat)."""
    exp, sec = resolved.experiment, resolved.section
    specs = []
    for problem in expand_entries(sec.problem):
        for strategy in expand_entries(sec.strategy):
            for opt in sec.optimizer:
                for optimizer in _optimizer_points(opt.model_dump()):
                    for r in range(exp.repeats):
                        specs.append(
                            {
                                **base_spec(NAME, exp, r),
                                "problem": problem,
                                "strategy": strategy,
                                "optimizer": optimizer,
                                "num_steps": sec.num_steps,
                                "tol": sec.tol,
                                "use_f_star": sec.use_f_star,
                                "record_grad_norm": sec.record_grad_norm,
                                "points": sec.points,
                            }
                        )
    return specs


# ------------------------------------------------------------------------------------------------
# execution


def second_moment(strategy: Mapping[str, Any], d: int) -> float:
    """``c`` in ``E‖G‖² ≈ c‖∇f‖²`` for the strategy (1 for exact and finite-difference gradients)."""
    name = strategy["name"]
    if name not in ("two_point", "forward_gradient"):
        return 1.0
    k = int(strategy.get("num_directions") or 1)
    dist = strategy.get("distribution") or ("sphere" if name == "two_point" else "gaussian")
    if dist in ("orthogonal", "coordinate"):
        return d / min(k, d)
    if dist == "gaussian":
        return 1.0 + (d + 1) / k
    return 1.0 + (d - 1) / k


def _optimizer(spec: Mapping[str, Any], lr: float | None):
    import optax

    name = spec["name"]
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=spec["momentum"])
    if name == "nesterov":
        return optax.sgd(lr, momentum=spec["momentum"], nesterov=True)
    if name == "adam":
        return optax.adam(lr)
    return optax.lbfgs()


# A run is timed again while warm when its first execution took less than this: the first execution of
# a freshly compiled loop carries a fixed cost of ~1–5 ms (allocation, first dispatch) that would
# dominate the time per step of a short run (a 30-step exact run at d = 10 read 0.19 ms/step cold,
# ~0.005 warm). The warm runs reuse the cached executable and the same key: the same results.
RETIME_BELOW_S = 1.0
RETIMES = 3


def _warm_run_time(go: Any, first: float) -> float:
    """``first``, or for a short run the median of :data:`RETIMES` warm re-executions' ``run_time``."""
    if first >= RETIME_BELOW_S:
        return first
    return float(np.median([go().run_time for _ in range(RETIMES)]))


def execute(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one descent; returns the summary, the thinned per-step points and the timing."""
    import jax
    from jax.flatten_util import ravel_pytree

    from gradlab import descent, grads

    pkey = problem_key(spec["seed"], spec["problem"], spec["repeat"])
    problem = make_problem(spec["problem"], pkey, spec["dtype"])
    strategy = grads.make(spec["strategy"]["name"], **_strategy_options(spec["strategy"]))
    skey = jax.random.fold_in(
        jax.random.fold_in(pkey, stable_hash(spec["strategy"])), stable_hash(spec["optimizer"])
    )
    d = int(ravel_pytree(problem.init)[0].size)
    L, mu = problem.smoothness, problem.strong_convexity
    c = second_moment(spec["strategy"], d)
    lr = spec["optimizer"].get("learning_rate")
    theory_lr = 1.0 / (c * L) if L else None
    if lr == "theory":
        if theory_lr is None:
            raise ValueError(
                f"learning_rate = 'theory' needs the smoothness constant L, which problem "
                f"{problem.name!r} does not give; set a number."
            )
        lr = theory_lr
    f_star = problem.min_value if spec["use_f_star"] else None
    optimizer = _optimizer(spec["optimizer"], lr)

    def go():
        return descent.run(
            problem.loss,
            problem.init,
            strategy,
            optimizer,
            key=skey,
            num_steps=spec["num_steps"],
            tol=spec["tol"],
            f_star=f_star,
            record_grad_norm=spec["record_grad_norm"],
        )

    h = go()
    n = h.steps_run
    run_time = _warm_run_time(go, h.run_time)
    rate = None
    theory_steps = None
    if (
        spec["optimizer"]["name"] == "sgd"
        and spec["optimizer"].get("learning_rate") == "theory"
        and L
        and mu
        and f_star is not None
    ):
        rate = 1.0 - mu / (c * L)
        if spec["tol"] is not None and 0 < rate < 1:
            theory_steps = math.ceil(math.log(spec["tol"]) / math.log(rate))
    gap = None
    if f_star is not None:
        denom = float(h.loss[0]) - f_star
        gap = (h.loss - f_star) / denom if denom != 0 else None
    points = []
    min_g2 = None if h.grad_norm is None else np.minimum.accumulate(np.asarray(h.grad_norm) ** 2)
    for k in thin(n, spec["points"]).tolist():
        row = {
            "step": k,
            "loss": float(h.loss[k]),
            "num_fun_evals": int(h.num_fun_evals[k]),
            "num_grads": int(h.num_grads[k]),
            "num_jvps": int(h.num_jvps[k]),
            "time_s": run_time * k / n if n else 0.0,
        }
        if gap is not None:
            row["gap"] = float(gap[k])
        if rate is not None:
            row["theory_gap"] = float(rate**k)
        if h.grad_norm is not None:
            row["grad_norm"] = float(h.grad_norm[k])
            row["min_grad_norm_sq"] = float(
                min_g2[k]
            )  # over every step i ≤ k, not the thinned ones
        points.append(row)
    final = float(h.loss[n])
    summary = {
        "d": d,
        "L": L,
        "mu": mu,
        "f_star": f_star,
        "learning_rate": float(lr) if lr is not None else None,
        "theory_learning_rate": theory_lr,
        "second_moment": c,
        "theory_rate": rate,
        "theory_steps_to_tol": theory_steps,
        "criterion": h.criterion,
        "steps_run": n,
        "steps_to_tol": h.steps_to_tol,
        "fun_evals_to_tol": h.fun_evals_to_tol,
        "num_fun_evals": int(h.num_fun_evals[n]),
        "num_grads": int(h.num_grads[n]),
        "num_jvps": int(h.num_jvps[n]),
        "evals_per_step": float(h.num_fun_evals[n]) / n if n else 0.0,
        "final_loss": final if math.isfinite(final) else None,
        "final_gap": float(gap[n]) if gap is not None and np.isfinite(gap[n]) else None,
        "diverged": h.diverged,
        "diverged_step": h.diverged_step,
    }
    status = "diverged" if h.diverged else "ok"
    timing = {
        "compile_time": h.compile_time,
        "run_time": run_time,
        "first_run_time": h.run_time,
        "time_per_step": run_time / n if n else 0.0,
    }
    return {"status": status, "summary": summary, "points": points, "timing": timing}


# ------------------------------------------------------------------------------------------------
# report


def _strategy_label(s: Mapping[str, Any]) -> str:
    from gradlab import grads

    return entry_label(s, grads.options(s["name"]))


def _problem_label(p: Mapping[str, Any]) -> str:
    from gradlab import problems

    return entry_label(p, problems.options(p["name"]))


def labels(spec: Mapping[str, Any]) -> dict[str, str]:
    """Display labels of a run's axes."""
    strategy = _strategy_label(spec["strategy"])
    problem = _problem_label(spec["problem"])
    o = spec["optimizer"]
    if o["name"] == "lbfgs":
        optimizer = "lbfgs"
    else:
        lr = o["learning_rate"]
        lr_text = "theory" if lr == "theory" else f"{lr:g}"
        optimizer = f"{o['name']}(lr={lr_text}"
        optimizer += f", momentum={o['momentum']:g})" if "momentum" in o else ")"
    return {"problem": problem, "strategy": strategy, "optimizer": optimizer}


def report(runs: Sequence[Mapping[str, Any]], resolved_json: Mapping[str, Any]) -> list[Any]:
    """The descent report: a summary table (medians and ranges over repeats) and three figures per
    (problem, optimizer): relative gap (or loss) vs steps, vs function evaluations, vs time."""
    from gradlab.lab import report as R

    blocks: list[Any] = []
    groups: dict[tuple, list[Mapping]] = {}
    for run in runs:
        lab = labels(run["spec"])
        groups.setdefault((lab["problem"], lab["optimizer"], lab["strategy"]), []).append(run)

    tol = resolved_json.get(NAME, {}).get("tol")
    exact_steps: dict[tuple, float] = {}
    for (prob, opt, strat), members in groups.items():
        med = R.censored_median([m["summary"].get("steps_to_tol") for m in members])
        if strat == "exact" and tol is not None and med is not None and math.isfinite(med):
            exact_steps[(prob, opt)] = med

    def to_tol(summ, key, bound_key):
        """Steps or evaluations to tol; a run that stopped short of tol counts as more than it ran."""
        vals = [s[key] for s in summ]
        if tol is None:
            return R.median_range(vals, fmt="{:.0f}")
        return R.median_range_censored(
            vals, [None if s["diverged"] else s[bound_key] for s in summ], fmt="{:.0f}"
        )

    rows = []
    for (prob, opt, strat), members in groups.items():
        ok = [m for m in members if m["status"] in ("ok", "diverged")]
        summ = [m["summary"] for m in ok]
        tim = [m["timing"] for m in ok]
        failed = len(members) - len(ok)
        diverged = sum(1 for m in ok if m["status"] == "diverged")
        rows.append(
            [
                prob,
                strat,
                opt,
                R.median_range([s["learning_rate"] for s in summ], fmt="{:.3g}"),
                to_tol(summ, "steps_to_tol", "steps_run"),
                R.median_range([s["theory_steps_to_tol"] for s in summ], fmt="{:.0f}"),
                _ratio([s["steps_to_tol"] for s in summ], exact_steps.get((prob, opt))),
                to_tol(summ, "fun_evals_to_tol", "num_fun_evals"),
                R.median_range([s["evals_per_step"] for s in summ], fmt="{:.5g}"),
                R.median_range(
                    [
                        s["final_gap"] if s["final_gap"] is not None else s["final_loss"]
                        for s in summ
                    ],
                    fmt="{:.2e}",
                ),
                R.median_range([t["compile_time"] for t in tim], fmt="{:.2f}"),
                R.median_range([1e3 * t["time_per_step"] for t in tim], fmt="{:.3g}"),
                f"{len(members)}"
                + (f" ({diverged} diverged)" if diverged else "")
                + (f" ({failed} failed)" if failed else ""),
            ]
        )
    blocks.append(R.Heading("Summary"))
    blocks.append(
        R.Text(
            "Medians over repeats, with [min–max] when the repeats differ. "
            f"Steps and evaluations to tol (tol = {tol}) are measured; a run that stopped short "
            "of tol counts as more than it ran ('>N', and 'k of n not reached'), so a median is "
            "'>N' when most repeats missed tol; 'theory steps' is "
            "⌈log tol / log(1 − μ/(cL))⌉ for sgd with the theory step (c = 1 for exact gradients, "
            "the second-moment factor of the estimator otherwise), from the bound f − f* ≤ "
            "(1 − μ/(cL))ᵏ(f₀ − f*): an upper bound, loose by about 2× on a quadratic, where the step "
            "1/L contracts the slowest direction's error by (1 − μ/L) and so f − f* by (1 − μ/L)²; "
            "'steps ÷ exact' divides the "
            "median steps by those of exact gradients on the same problem. 'final' is the relative gap "
            "(f − f*)/(f₀ − f*) when f* is known, else the loss. Evaluations count f calls only; "
            "gradients and JVPs are in results.json; exact-gradient runs make none and are left out "
            "of the figures against evaluations. Times: compile apart from run; ms/step from the run "
            f"time of a warm execution (a run shorter than {RETIME_BELOW_S:g} s is executed again "
            f"{RETIMES} times with its executable cached, and the median is kept: a first execution "
            "carries a fixed cost of milliseconds)"
            + (
                "; runs with record_grad_norm also compute the true gradient at every step, which "
                "their times include"
                if any(r["spec"].get("record_grad_norm") for r in runs)
                else ""
            )
            + ". Colours follow the strategy in every figure."
        )
    )
    blocks.append(
        R.Table(
            [
                "problem",
                "strategy",
                "optimizer",
                "step size",
                "steps to tol",
                "theory steps",
                "steps ÷ exact",
                "evals to tol",
                "evals/step",
                "final",
                "compile s",
                "ms/step",
                "runs",
            ],
            rows,
        )
    )

    colors = _strategy_colors(runs)
    blocks += _scaling(runs, colors)
    if not resolved_json.get(NAME, {}).get("curves", True):
        return blocks

    # figures: one set per (problem, optimizer)
    by_panel: dict[tuple, dict[str, list[Mapping]]] = {}
    for (prob, opt, strat), members in groups.items():
        by_panel.setdefault((prob, opt), {})[strat] = members
    blocks.append(R.Heading("Curves"))
    for (prob, opt), curves in by_panel.items():
        has_gap = any(
            "gap" in (m["points"][0] if m["points"] else {}) for ms in curves.values() for m in ms
        )
        ykey = "gap" if has_gap else "loss"
        ylabel = "relative gap (f − f*)/(f₀ − f*)" if has_gap else "loss f(x)"
        for xkey, xlabel, slug in (
            ("step", "step", "steps"),
            ("num_fun_evals", "function evaluations", "evals"),
            ("time_s", "run time (s, from the run's total)", "time"),
        ):
            series = []
            for strat, members in curves.items():
                runs_xy = [
                    (
                        [p[xkey] for p in m["points"]],
                        [p.get(ykey) for p in m["points"]],
                    )
                    for m in members
                    if m["points"]
                ]
                theory = None
                if xkey != "time_s":
                    th = [m for m in members if m["points"] and "theory_gap" in m["points"][0]]
                    if th and ykey == "gap":
                        m = th[0]
                        theory = (
                            [p[xkey] for p in m["points"]],
                            [p["theory_gap"] for p in m["points"]],
                        )
                if xkey == "num_fun_evals" and all(max(x, default=0) == 0 for x, _ in runs_xy):
                    continue  # exact gradients make no function evaluations: not a vertical line at 0
                series.append(
                    R.Series(label=strat, runs=runs_xy, theory=theory, color=colors.get(strat))
                )
            if all(not s.runs for s in series):
                continue  # (exact gradients only, on the evaluations axis)
            fig = R.line_figure(
                f"{NAME}-{prob}-{opt}-{ykey}_vs_{slug}",
                title=f"{prob}, {opt}",
                xlabel=xlabel,
                ylabel=ylabel,
                series=series,
                logy=True,
            )
            blocks.append(fig)
        fig = _grad_norm_figure(prob, opt, curves, colors)
        if fig is not None:
            if not any(getattr(b, "name", "").endswith("grad_norm_vs_steps") for b in blocks):
                blocks.append(
                    R.Text(
                        "Gradient norms (record_grad_norm: the true ‖∇f(x_k)‖ at each recorded step, "
                        "not counted as cost): the smallest ‖∇f‖² so far against the step, beside the "
                        "bound 2cL(f₀ − f*)/k of smooth GD at the step 1/(cL) — c = 1 for exact and "
                        "difference gradients, c = d for one sphere direction, so zero-order GD's "
                        "bound is d× GD's. On a strongly convex problem both fall linearly, far below "
                        "the O(1/k) bounds; what the bound predicts is the shift: zero-order curves "
                        "reach a level about d× later."
                    )
                )
            blocks.append(fig)
    return blocks


def _grad_norm_figure(
    prob: str, opt: str, curves: Mapping[str, list[Mapping]], colors: Mapping[str, str]
) -> Any:
    """With ``record_grad_norm``: ``min_{i≤k} ‖∇f(x_i)‖²`` against the step, per strategy, beside the
    smooth-case bound ``2cL(f(x₀) − f*)/k`` for sgd at the theory step ``1/(cL)`` (``c = 1`` for exact
    and difference gradients, the estimator's second-moment factor otherwise: ``d`` for one sphere
    direction), which is what makes zero-order GD need ``c×`` the iterations (Nesterov & Spokoiny)."""
    from gradlab import theory
    from gradlab.lab import report as R

    series = []
    for strat, members in curves.items():
        runs_xy = []
        for m in members:
            pts = [
                p for p in m["points"] if p.get("min_grad_norm_sq") is not None and p["step"] > 0
            ]
            if pts:  # (step > 0: a log axis)
                runs_xy.append(([p["step"] for p in pts], [p["min_grad_norm_sq"] for p in pts]))
        if not runs_xy:
            continue
        th = None
        m = members[0]
        s, pts = m["summary"], m["points"]
        theory_step = (
            s.get("learning_rate") is not None
            and s.get("theory_learning_rate") is not None
            and math.isclose(s["learning_rate"], s["theory_learning_rate"], rel_tol=1e-12)
            and m["spec"]["optimizer"]["name"] == "sgd"
        )
        if theory_step and s.get("f_star") is not None and pts and pts[-1]["step"] > 0:
            gap0 = pts[0]["loss"] - s["f_star"]
            ks = [p["step"] for p in pts if p["step"] > 0]
            if gap0 > 0 and ks:
                bound = s["second_moment"] * theory.gd_grad_norm_bound(ks, L=s["L"], gap0=gap0)
                th = (ks, bound.tolist())
        series.append(R.Series(label=strat, runs=runs_xy, theory=th, color=colors.get(strat)))
    if not series:
        return None
    return R.line_figure(
        f"{NAME}-{prob}-{opt}-grad_norm_vs_steps",
        title=f"{prob}, {opt}: smallest ‖∇f‖² so far (bound 2cL(f₀ − f*)/k dashed)",
        xlabel="step",
        ylabel="min over i ≤ k of ‖∇f(x_i)‖²",
        series=series,
        logy=True,
        logx=True,
    )


def _ratio(values: Sequence[Any], base: float | None) -> str:
    """The censored median of ``values`` (``None``: tol not reached) ÷ ``base``; '—' if either is
    unknown, and '—' too when the median itself was not reached (the table's steps column says so)."""
    from gradlab.lab import report as R

    med = R.censored_median(values)
    if med is None or not base or not math.isfinite(med):
        return "—"
    return f"{med / base:.3g}"


def _strategy_colors(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One matplotlib colour per strategy label, in order of first appearance, for every figure."""
    order = dict.fromkeys(labels(r["spec"])["strategy"] for r in runs)
    return {name: f"C{i % 10}" for i, name in enumerate(order)}


def _scaling(runs: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> list[Any]:
    """When a problem size is swept (≥ 3 values of ``d``), cost per step against ``d``: milliseconds
    and function evaluations per step, per strategy and optimizer (medians over repeats)."""
    from gradlab.lab import report as R

    ds = sorted({r["summary"]["d"] for r in runs})
    if len(ds) < 3:
        return []
    names = sorted({r["spec"]["problem"]["name"] for r in runs})
    blocks: list[Any] = [R.Heading("Cost per step as the dimension grows")]
    for pname in names:
        sel = [r for r in runs if r["spec"]["problem"]["name"] == pname]
        curves: dict[str, dict[int, list[Mapping]]] = {}
        strategy_of: dict[str, str] = {}
        for r in sel:
            lab = labels(r["spec"])
            key = f"{lab['strategy']}, {lab['optimizer']}"
            strategy_of[key] = lab["strategy"]
            curves.setdefault(key, {}).setdefault(r["summary"]["d"], []).append(r)
        rows = []
        for label, by_d in curves.items():
            for d in sorted(by_d):
                members = by_d[d]
                rows.append(
                    [
                        label,
                        d,
                        R.median_range(
                            [m["summary"]["evals_per_step"] for m in members], fmt="{:.4g}"
                        ),
                        R.median_range(
                            [
                                m["summary"]["num_grads"] / max(m["summary"]["steps_run"], 1)
                                + m["summary"]["num_jvps"] / max(m["summary"]["steps_run"], 1)
                                for m in members
                            ],
                            fmt="{:.4g}",
                        ),
                        R.median_range([1e3 * m["timing"]["time_per_step"] for m in members]),
                    ]
                )
        blocks.append(
            R.Table(
                ["strategy, optimizer", "d", "f evals/step", "grads + JVPs/step", "ms/step"], rows
            )
        )
        for ykey, ylabel, slug in (
            ("time", "run time per step (ms, median over repeats)", "ms_per_step"),
            ("evals", "function evaluations per step", "evals_per_step"),
        ):
            series = []
            for label, by_d in curves.items():
                xs = sorted(by_d)
                if ykey == "time":
                    ys = [
                        1e3 * float(np.median([m["timing"]["time_per_step"] for m in by_d[d]]))
                        for d in xs
                    ]
                else:
                    ys = [
                        float(np.median([m["summary"]["evals_per_step"] for m in by_d[d]]))
                        for d in xs
                    ]
                if ykey == "evals" and max(ys) == 0:
                    continue
                series.append(
                    R.Series(label=label, runs=[(xs, ys)], color=colors.get(strategy_of[label]))
                )
            if series:
                blocks.append(
                    R.line_figure(
                        f"{NAME}-{pname}-{slug}_vs_d",
                        title=f"{pname}: cost per step vs dimension",
                        xlabel="dimension d",
                        ylabel=ylabel,
                        series=series,
                        logx=True,
                        logy=True,
                        markers=True,
                    )
                )
    return blocks
