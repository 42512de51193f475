"""The ``curvature`` kind: Hessian trace estimators, top eigenvalues and the spectral density of
catalog losses, vs the dense Hessian.

Config section::

    [curvature]
    problem = [{name = "mlp", hidden = 16}]
    method = ["hutchinson", "hutch++", "xtrace", "auto"]
    num_matvecs = [10, 30, 100]
    top_k = 5                  # Lanczos top-k eigenvalues vs eigh of the dense Hessian (0: skip)
    lanczos_block_size = 1     # > 1: block Lanczos (finds eigenvalues of multiplicity up to it)
    point = ["init", "trained"]  # where the Hessian is taken: "init", "random", "trained" (a sweep axis)
    optimizer = "adam"         # for "trained": a deterministic full-batch optax run from init
    learning_rate = 0.01       #   with the problem's hand-derived gradient
    train_steps = 1000
    slq_probes = 10            # the SLQ spectral density vs the dense spectrum (0: skip)
    slq_iters = 30
    mesh = false               # true: spread probe blocks over every local device (jax.sharding)
    psd = false                # true: every problem's Hessian is PSD (a convex loss): lets "auto"
                               #   choose XNysTrace (see gradlab.curvature.trace)

Per run (problem × point × method × budget × repeat): :func:`gradlab.curvature.hessian_trace` at the
point, its relative error against the trace of the dense Hessian (:func:`gradlab.curvature.hessian`),
whether ±1.96·std_error covers the truth, and the top-k eigenvalues by Lanczos against ``eigh``. The
first (method, budget) run of each (problem, point, repeat) also records the spectrum: the stochastic
Lanczos quadrature density (:func:`gradlab.curvature.spectral_density`, on a grid of
:data:`DENSITY_POINTS` points) beside the dense eigenvalues smoothed by the same Gaussian kernel on the
same grid and their histogram, the density's integral and mean, and the quadrature moments
``mean_z Σ_j w_j θ_j^k`` (with standard errors over probes) against ``tr(H^k)/n``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, StrictBool

from gradlab.lab.config import Base, PosInt, PositiveFloat, Sweep
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

NAME = "curvature"
SUMMARY = (
    "Hessian trace (Hutchinson, Hutch++, XTrace, XNysTrace, auto), top eigenvalues and SLQ spectral "
    "density vs dense, at init, a random point or after training"
)

_METHODS = Literal["hutchinson", "hutch++", "xtrace", "xnystrace", "auto"]
_POINTS = Literal["init", "random", "trained"]

DENSITY_POINTS = 200  # grid points of the recorded densities: result.json stays small
HIST_BINS = 40  # bins of the dense eigenvalues' histogram
TRAIN_POINTS = 40  # recorded points of the training loss curve


class Section(Base):
    """The ``[curvature]`` section."""

    problem: Sweep[Any] = Field(default_factory=lambda: [{"name": "mlp"}], min_length=1)
    method: Sweep[_METHODS] = Field(default_factory=lambda: ["hutchinson", "auto"], min_length=1)
    num_matvecs: Sweep[PosInt] = Field(default_factory=lambda: [10, 30, 100], min_length=1)
    top_k: Annotated[int, Field(ge=0, le=100, strict=True)] = 5
    lanczos_block_size: Annotated[int, Field(ge=1, le=100, strict=True)] = 1
    point: Sweep[_POINTS] = Field(default_factory=lambda: ["init"])
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: PositiveFloat = 0.01
    train_steps: PosInt = 1000
    slq_probes: Annotated[int, Field(ge=0, le=1000, strict=True)] = 10
    slq_iters: Annotated[int, Field(ge=1, le=1000, strict=True)] = 30
    mesh: StrictBool = False
    psd: StrictBool = False
    max_dim: PosInt = 4000


def check(section: Section, experiment: Any, raw: Any) -> tuple[Section, list[str]]:
    problems, errors = validate_entries(
        section.problem, "problem", problem_models, raw, (NAME, "problem")
    )
    given = raw.get(NAME, {}) if isinstance(raw, Mapping) else {}
    if "trained" not in section.point:
        errors += [
            f"{NAME}.{key}: used only at point 'trained'; add \"trained\" to {NAME}.point or "
            "remove this key."
            for key in ("optimizer", "learning_rate", "train_steps")
            if key in given
        ]
    if section.psd and "auto" not in section.method:
        errors.append(
            f"{NAME}.psd: used only by method 'auto' (the other methods ignore it); add \"auto\" to "
            f"{NAME}.method or remove psd."
        )
    if section.lanczos_block_size != 1 and section.top_k == 0:
        errors.append(
            f"{NAME}.lanczos_block_size: used only for the top eigenvalues; set {NAME}.top_k > 0 "
            "or remove lanczos_block_size."
        )
    return section.model_copy(update={"problem": problems}), errors


def check_instances(section: Section, experiment: Any) -> list[str]:
    """The deep check (``gradlab validate``, and before any run is computed): build each problem point
    and hold every (method, budget) to what :func:`gradlab.curvature.trace` accepts at its dimension
    (a budget ≥ d is always exact; below it each method needs a few matvecs for an error bar)."""
    import jax

    from gradlab import problems
    from gradlab.curvature import _MIN_MATVECS

    with jax.enable_x64(True):  # as the runs will
        built, errors = build_problem_points(section.problem, experiment.dtype, NAME)
        for spec, problem in built:
            label = entry_label(spec, problems.options(spec["name"]))
            d = sum(int(np.size(a)) for a in jax.tree.leaves(problem.init))
            if d > section.max_dim:
                errors.append(
                    f"{NAME}.max_dim: problem {label} has d = {d} parameters > max_dim = "
                    f"{section.max_dim}: the dense Hessian oracle ({d}² entries) would not fit; "
                    f"raise {NAME}.max_dim or shrink the problem."
                )
                continue
            for method in section.method:
                need = min(d, _MIN_MATVECS[method])  # a budget ≥ d is the exact trace
                low = sorted({m for m in section.num_matvecs if m < need})
                if low:
                    errors.append(
                        f"{NAME}.num_matvecs: method {method!r} needs at least {need} matvecs "
                        f"(for an error bar) on problem {label} (d = {d}); got {low}. Raise "
                        f"num_matvecs or drop {method!r}."
                    )
    return errors


def expand(resolved: Any) -> list[dict[str, Any]]:
    """One spec per (problem, point, method, budget, repeat). A "trained" point carries its training
    settings (so editing them leaves the other points' runs cached); the first (method, budget) of each
    (problem, point, repeat) is marked to record the spectrum, which does not depend on the method."""
    exp, sec = resolved.experiment, resolved.section
    specs = []
    for problem in expand_entries(sec.problem):
        for point in dict.fromkeys(sec.point):
            for i, method in enumerate(sec.method):
                for j, m in enumerate(sec.num_matvecs):
                    for r in range(exp.repeats):
                        spec = {
                            **base_spec(NAME, exp, r),
                            "problem": problem,
                            "method": {"name": method},
                            "num_matvecs": m,
                            "top_k": sec.top_k,
                            "point": point,
                            "mesh": sec.mesh,
                            "max_dim": sec.max_dim,
                        }
                        if sec.psd and method == "auto":  # absent otherwise: run ids unchanged
                            spec["psd"] = True
                        if sec.top_k and sec.lanczos_block_size != 1:  # likewise
                            spec["lanczos_block_size"] = sec.lanczos_block_size
                        if point == "trained":
                            spec["train"] = {
                                "optimizer": sec.optimizer,
                                "learning_rate": sec.learning_rate,
                                "steps": sec.train_steps,
                            }
                        if i == 0 and j == 0 and sec.slq_probes > 0:
                            spec["spectrum"] = {"probes": sec.slq_probes, "iters": sec.slq_iters}
                        specs.append(spec)
    return specs


def labels(spec: Mapping[str, Any]) -> dict[str, str]:
    from gradlab import problems

    p = spec["problem"]
    return {
        "problem": entry_label(p, problems.options(p["name"])),
        "method": spec["method"]["name"],
        "point": spec.get("point", "init"),
    }


# Executables compiled in this process, by (piece, static options, argument structure and shapes): the
# problem's loss and gradient are ``Partial`` pytrees, so every run of a sweep on instances of the same
# shapes (every method, budget, point and repeat) reuses them, and compile time is kept apart from run
# time.
_COMPILED: dict[tuple, Any] = {}


def _signature(args: tuple) -> tuple:
    import jax

    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(
        (tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", type(v).__name__))) for v in leaves
    )


def _run(piece: str, statics: tuple, args: tuple) -> tuple[Any, float, float]:
    """``(outputs, compile_seconds, run_seconds)`` of ``_PIECES[piece](*statics)`` on ``args``, jitted
    and compiled once per process and signature (``compile_seconds`` is 0 on a cache hit), with the
    fast-compile options on CPU."""
    import time

    import jax

    from gradlab.checks import _fast_options

    key = (piece, statics, _signature(args))
    t0 = time.perf_counter()
    exe = _COMPILED.get(key)
    if exe is None:
        # XLA:CPU at -O0 without the fusion emitters (as gradlab.checks): these small programs are
        # compile-bound, and compile 2-4x faster for a slower (still sub-second) run
        lowered = jax.jit(_PIECES[piece](*statics)).lower(*args)
        exe = _COMPILED[key] = lowered.compile(dict(_fast_options()) or None)
    t1 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, t1 - t0, time.perf_counter() - t1


def _train_fn(optimizer: str, steps: int):
    """``(grad, loss, x0, lr) -> (x, losses)``: ``steps`` full-batch optax steps from ``x0`` with the
    given (hand-derived) gradient; ``losses[k]`` is the loss after ``k`` steps."""
    import jax
    import jax.numpy as jnp
    import optax

    def train(grad, loss, x0, lr):
        tx = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)

        def step(carry, _):
            x, state = carry
            updates, state = tx.update(grad(x), state, x)
            return (optax.apply_updates(x, updates), state), loss(x)

        (x, _), losses = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
        return x, jnp.concatenate([losses, loss(x)[None]])

    return train


def _hessian_fn():
    from gradlab import curvature

    return lambda loss, x: curvature.hessian(loss, x)


def _trace_fn(method: str, m: int, psd: bool = False, mesh: bool = False):
    import jax

    from gradlab import curvature

    def f(loss, x, key):
        # mesh: the probe blocks spread over every local device (compiled like the one-device run, so
        # the two timings compare)
        kw = {"mesh": jax.make_mesh((jax.device_count(),), ("probes",))} if mesh else {}
        est = curvature.hessian_trace(loss, x, key, num_matvecs=m, method=method, psd=psd, **kw)
        return est.value, est.std_error, est.num_matvecs

    return f


def _eig_fn(k: int, block_size: int = 1):
    from gradlab import curvature

    def f(loss, x, key):
        op = curvature.hvp_operator(loss, x)
        ev = curvature.eigenvalues(op, key, like=x, k=k, which="largest", block_size=block_size)
        return ev.values

    return f


def _slq_fn(probes: int, iters: int):
    from gradlab import curvature

    def f(loss, x, key):
        sd = curvature.spectral_density(
            curvature.hvp_operator(loss, x),
            key,
            like=x,
            num_probes=probes,
            num_iters=iters,
            num_points=DENSITY_POINTS,
        )
        return sd.grid, sd.density, sd.nodes, sd.weights, sd.num_matvecs

    return f


_PIECES = {
    "train": _train_fn,
    "hessian": _hessian_fn,
    "trace": _trace_fn,
    "eig": _eig_fn,
    "slq": _slq_fn,
}


def _spectrum(
    loss: Any, x: Any, key: Any, lam: np.ndarray, probes: int, iters: int
) -> tuple[dict[str, Any], float]:
    """The SLQ density of the Hessian of ``loss`` at ``x`` beside the dense eigenvalues ``lam`` (and
    the compile time)."""
    (grid, density, nodes, weights, matvecs), c, _ = _run("slq", (probes, iters), (loss, x, key))
    grid, density = np.asarray(grid), np.asarray(density)
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    # the default grid runs from θ_min − 5σ to θ_max + 5σ: read the kernel width σ back from it, to
    # smooth the dense eigenvalues with the same kernel on the same grid
    sigma = float(((grid[-1] - grid[0]) - (nodes.max() - nodes.min())) / 10)
    u = (grid[:, None] - lam[None, :]) / sigma
    dense_density = np.exp(-0.5 * u * u).sum(axis=1) / (lam.size * sigma * np.sqrt(2 * np.pi))
    hist, edges = np.histogram(lam, bins=HIST_BINS, range=(grid[0], grid[-1]), density=True)
    # the quadrature moments per probe: Σ_j w_j θ_j^k estimates zᵀH^k z/‖z‖², mean tr(H^k)/n
    per_probe = np.stack([np.sum(weights * nodes**k, axis=1) for k in (1, 2, 3)])
    p = per_probe.shape[1]
    se = per_probe.std(axis=1, ddof=1) / np.sqrt(p) if p > 1 else np.full(3, np.nan)
    return {
        "slq_probes": probes,
        "slq_iters": int(nodes.shape[1]),
        "slq_matvecs": int(matvecs),
        "slq_sigma": sigma,
        "slq_grid": grid.tolist(),
        "slq_density": density.tolist(),
        "dense_density": dense_density.tolist(),
        "dense_hist_edges": edges.tolist(),
        "dense_hist": hist.tolist(),
        "slq_integral": float(np.trapezoid(density, grid)),
        "slq_mean": float(np.trapezoid(grid * density, grid)),
        "dense_integral": float(np.trapezoid(dense_density, grid)),
        "slq_moments": per_probe.mean(axis=1).tolist(),
        "slq_moments_se": se.tolist(),
        "dense_moments": [float(np.mean(lam**k)) for k in (1, 2, 3)],
    }, c


def execute(spec: Mapping[str, Any]) -> dict[str, Any]:
    import jax
    from jax.flatten_util import ravel_pytree

    pkey = problem_key(spec["seed"], spec["problem"], spec["repeat"])
    p = make_problem(spec["problem"], pkey, spec["dtype"])
    _, k_est, k_eig = jax.random.split(
        jax.random.fold_in(pkey, stable_hash({"method": spec["method"], "m": spec["num_matvecs"]})),
        3,
    )
    # the point and the SLQ probes depend on the problem and the repeat only: every method and budget
    # sees the same Hessian
    k_point = jax.random.fold_in(pkey, stable_hash("point"))
    k_slq = jax.random.fold_in(pkey, stable_hash("spectrum"))
    d = int(ravel_pytree(p.init)[0].size)
    if d > spec["max_dim"]:
        raise ValueError(
            f"problem has d = {d} parameters > max_dim = {spec['max_dim']}: the dense Hessian "
            "oracle would not fit; raise curvature.max_dim or shrink the problem."
        )
    point = spec.get("point", "init")
    points: list[dict[str, Any]] = []
    compile_time = 0.0
    loss_init = float(p.loss(p.init))
    if point == "random" and p.random_point:
        x = p.random_point(k_point)
    elif point == "trained":
        train = spec["train"]
        (x, losses), c, _ = _run(
            "train",
            (train["optimizer"], train["steps"]),
            (p.grad, p.loss, p.init, train["learning_rate"]),
        )
        compile_time += c
        losses = np.asarray(losses)
        if not np.all(np.isfinite(losses)):
            step = int(np.argmin(np.isfinite(losses)))
            raise ValueError(
                f"training diverged: the loss is not finite after {step} {train['optimizer']} "
                f"steps; lower curvature.learning_rate (now {train['learning_rate']:g})."
            )
        if "spectrum" in spec:  # the curve once per point, with the spectrum
            points = [
                {"step": k, "train_loss": float(losses[k])}
                for k in thin(train["steps"], TRAIN_POINTS).tolist()
            ]
    else:
        x = p.init
    H, c, _ = _run("hessian", (), (p.loss, x))
    compile_time += c
    H = np.asarray(H)
    H = 0.5 * (H + H.T)
    exact = float(np.trace(H))
    lam_all = np.linalg.eigvalsh(H)
    method, m, psd = spec["method"]["name"], spec["num_matvecs"], spec.get("psd", False)
    statics = (method, m, psd, bool(spec["mesh"]))
    (value, std, used), c, seconds = _run("trace", statics, (p.loss, x, k_est))
    compile_time += c
    value, std = float(value), float(std)
    if not np.isfinite(value):
        raise ValueError(
            f"{method} gave a non-finite trace estimate (xnystrace, and auto with curvature.psd = "
            f"true, need a positive semi-definite Hessian; here λ_min = {lam_all[0]:.3g})."
        )
    summary: dict[str, Any] = {
        "d": d,
        "devices": jax.device_count() if spec["mesh"] else 1,
        "loss": float(p.loss(x)),
        "loss_init": loss_init,
        "grad_norm": float(np.linalg.norm(np.asarray(ravel_pytree(p.grad(x))[0]))),
        "exact_trace": exact,
        "value": value,
        "std_error": std,
        "num_matvecs_used": int(used),
        "rel_error": abs(value - exact) / max(abs(exact), 1e-300),
        "rel_std_error": std / max(abs(exact), 1e-300),
        "covered": bool(abs(value - exact) <= 1.96 * std),
        "lambda_min": float(lam_all[0]),
        "lambda_max": float(lam_all[-1]),
        "num_negative": int(np.sum(lam_all < -1e-10 * max(abs(lam_all).max(), 1e-300))),
    }
    k = min(spec["top_k"], d)
    if k:
        lam = lam_all[::-1][:k]
        block = min(spec.get("lanczos_block_size", 1), d)
        values, c, _ = _run("eig", (k, block), (p.loss, x, k_eig))
        compile_time += c
        got = np.sort(np.asarray(values))[::-1][:k]
        summary["top_eigenvalues"] = got.tolist()
        summary["top_eigenvalues_exact"] = lam.tolist()
        summary["eig_max_rel_error"] = float(
            np.max(np.abs(got - lam) / np.maximum(np.abs(lam), 1e-300))
        )
    if "spectrum" in spec:
        sp = spec["spectrum"]
        more, c = _spectrum(p.loss, x, k_slq, lam_all, sp["probes"], sp["iters"])
        summary.update(more)
        compile_time += c
    timing = {"seconds": seconds, "compile_time": compile_time}
    return {"status": "ok", "summary": summary, "points": points, "timing": timing}


_POINT_ORDER = {"init": 0, "random": 1, "trained": 2}


def _fmt_list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def report(runs: Sequence[Mapping[str, Any]], resolved_json: Mapping[str, Any]) -> list[Any]:
    """A table per (problem, point, method, budget): median relative error, std_error/|tr| and the
    coverage of ±1.96·std_error over repeats; the error-vs-budget figure per problem and point; the
    Lanczos top-k check; then, where the spectrum was recorded, the points side by side (init vs after
    training): trace ± 1.96·std_error vs dense, top eigenvalues, SLQ moments, density figures."""
    from gradlab.lab import report as R

    groups: dict[tuple, list[Mapping]] = {}
    for r in runs:
        lab = labels(r["spec"])
        key = (lab["problem"], lab["point"], lab["method"], r["spec"]["num_matvecs"])
        groups.setdefault(key, []).append(r)
    several = len({k[1] for k in groups}) > 1
    order = sorted(groups, key=lambda k: (k[0], _POINT_ORDER[k[1]], k[2], k[3]))
    rows = []
    for key in order:
        prob, point, method, m = key
        members = groups[key]
        s = [x["summary"] for x in members]
        rows.append(
            [
                prob,
                *([point] if several else []),
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
            "repeats); 'covered' counts repeats where ±1.96·std_error contains tr H. Seconds: the "
            "estimator's run time, compiled once per process and shape (compile_time in runs.json), "
            "with mesh = true as without."
        ),
        R.Table(
            [
                "problem",
                *(["point"] if several else []),
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
    # where runs recorded the spectrum, the table by point below shows their Lanczos eigenvalues;
    # here only a line on the spread over all runs (each run's Lanczos starts from its own vector)
    spectrum_shown = any("spectrum" in r["spec"] for r in runs)
    eig_errors = [e for r in runs if (e := r["summary"].get("eig_max_rel_error")) is not None]
    if spectrum_shown and eig_errors:
        blocks.append(R.Heading("Top eigenvalues: Lanczos vs eigh"))
        blocks.append(
            R.Text(
                f"Lanczos top-k eigenvalues vs eigh, over all {len(eig_errors)} runs (each run's "
                f"Lanczos starts from its own random vector): max relative error "
                f"{min(eig_errors):.1e} to {max(eig_errors):.1e}; the table below shows the runs "
                "that also recorded the spectrum."
            )
        )
    for key in order if not spectrum_shown else ():
        for r in groups[key]:
            s = r["summary"]
            tag = (key[0], key[1], r["spec"]["repeat"])
            if "top_eigenvalues" in s and tag not in seen:
                seen.add(tag)
                eig_rows.append(
                    [
                        key[0],
                        *([key[1]] if several else []),
                        r["spec"]["repeat"],
                        _fmt_list(s["top_eigenvalues"]),
                        _fmt_list(s["top_eigenvalues_exact"]),
                        f"{s['eig_max_rel_error']:.1e}",
                    ]
                )
    if eig_rows:
        blocks += [
            R.Heading("Top eigenvalues: Lanczos vs eigh"),
            R.Table(
                [
                    "problem",
                    *(["point"] if several else []),
                    "repeat",
                    "Lanczos",
                    "eigh (dense)",
                    "max rel. error",
                ],
                eig_rows,
            ),
        ]
    for prob, point in dict.fromkeys((k[0], k[1]) for k in order):
        mine = [k for k in order if k[:2] == (prob, point)]
        if len({k[3] for k in mine}) < 2:
            continue  # one budget: the table says it all
        series = []
        for method in dict.fromkeys(k[2] for k in mine):
            ms = [k[3] for k in mine if k[2] == method]
            ys = [
                float(
                    np.median([x["summary"]["rel_error"] for x in groups[(prob, point, method, m)]])
                )
                for m in ms
            ]
            series.append(R.Series(label=method, runs=[(ms, ys)]))
        one = all(len(groups[k]) == 1 for k in mine)
        where = f" at {point}" if several else ""
        blocks.append(
            R.line_figure(
                f"{NAME}-{prob}{'-' + point if several else ''}-trace_error_vs_matvecs",
                title=f"{prob}{where}: Hessian trace",
                xlabel="matrix-vector products",
                ylabel="relative error (one repeat)" if one else "median relative error",
                series=series,
                logx=True,
                logy=True,
                markers=True,
            )
        )
    return blocks + _by_point(runs, groups, order, several)


def _by_point(
    runs: Sequence[Mapping[str, Any]], groups: Mapping[tuple, list], order: list, several: bool
) -> list[Any]:
    """The points side by side, from the runs that recorded the spectrum (one per problem, point and
    repeat): trace ± 1.96·std_error per method at the largest budget vs dense, the top eigenvalues, the
    SLQ moments vs tr(H^k)/n, and a density figure per point (repeat 0)."""
    from gradlab.lab import report as R

    spec_runs = {}
    for r in runs:
        if "slq_density" in r["summary"]:
            lab = labels(r["spec"])
            spec_runs[(lab["problem"], lab["point"], r["spec"]["repeat"])] = r
    if not spec_runs:
        return []
    keys = sorted(spec_runs, key=lambda k: (k[0], _POINT_ORDER[k[1]], k[2]))
    repeats = len({k[2] for k in keys}) > 1
    methods = list(dict.fromkeys(k[2] for k in order))
    budget = {
        (prob, point): max(k[3] for k in order if k[:2] == (prob, point)) for prob, point, _ in keys
    }
    m_all = set(budget.values())
    m_text = f" (m = {next(iter(m_all))})" if len(m_all) == 1 else " (largest m)"

    def cell(prob: str, point: str, repeat: int, method: str) -> str:
        for r in groups.get((prob, point, method, budget[(prob, point)]), []):
            if r["spec"]["repeat"] == repeat:
                s = r["summary"]
                mark = "" if s["covered"] else " (misses)"
                return f"{s['value']:.4g} ± {1.96 * s['std_error']:.2g}{mark}"
        return "—"

    trace_rows, eig_rows, slq_rows = [], [], []
    for key in keys:
        prob, point, repeat = key
        s = spec_runs[key]["summary"]
        head = [prob, point, *([repeat] if repeats else [])]
        trace_rows.append(
            [
                *head,
                f"{s['loss']:.4g}",
                f"{s['grad_norm']:.2g}",
                s["d"],
                f"{s['exact_trace']:.4g}",
                *(cell(prob, point, repeat, method) for method in methods),
            ]
        )
        if "top_eigenvalues" in s:
            eig_rows.append(
                [
                    *head,
                    _fmt_list(s["top_eigenvalues"]),
                    _fmt_list(s["top_eigenvalues_exact"]),
                    f"{s['eig_max_rel_error']:.1e}",
                    f"{s['lambda_min']:.3g}",
                    f"{s['num_negative']}/{s['d']}",
                ]
            )
        m1, m2 = s["slq_moments"][0], s["slq_moments"][1]
        se1, se2 = s["slq_moments_se"][0], s["slq_moments_se"][1]

        def moment(m: float, se: float | None, exact: float) -> str:
            if se is None:
                return f"{m:.4g}"
            mark = "" if abs(m - exact) <= 1.96 * se else " (misses)"
            return f"{m:.4g} ± {1.96 * se:.2g}{mark}"

        slq_rows.append(
            [
                *head,
                f"{s['slq_probes']} × {s['slq_iters']}",
                f"{s['slq_integral']:.6f}",
                f"{s['slq_mean']:.4g}",
                moment(m1, se1, s["dense_moments"][0]),
                f"{s['dense_moments'][0]:.4g}",
                moment(m2, se2, s["dense_moments"][1]),
                f"{s['dense_moments'][1]:.4g}",
            ]
        )
    head = ["problem", "point", *(["repeat"] if repeats else [])]
    title = "At init vs after training" if several else "Spectrum: SLQ vs the dense Hessian"
    blocks: list[Any] = [
        R.Heading(title),
        R.Text(
            "Loss, gradient norm ‖∇L‖ and tr H of the dense Hessian at each point, beside each "
            f"method's estimate ± 1.96·std_error{m_text}; '(misses)' marks an interval that does "
            "not contain tr H."
        ),
        R.Table(
            [*head, "loss", "‖∇L‖", "d", "tr H (dense)", *(f"{m}{m_text}" for m in methods)],
            trace_rows,
        ),
    ]
    if eig_rows:
        blocks += [
            R.Text(
                "Top eigenvalues by Lanczos (full reorthogonalization) vs eigh of the dense Hessian, "
                "the smallest eigenvalue and the number of negative ones (the loss is not convex)."
            ),
            R.Table(
                [*head, "Lanczos", "eigh (dense)", "max rel. error", "λ_min", "λ < 0"], eig_rows
            ),
        ]
    blocks += [
        R.Text(
            "Stochastic Lanczos quadrature (probes × Lanczos steps): the integral and the mean "
            "∫ t ρ(t) dt of the smoothed density, and the quadrature moments ⟨θ^k⟩ = mean over probes "
            "of Σ_j w_j θ_j^k (± 1.96·std_error over probes), unbiased for tr(H^k)/n; '(misses)' "
            "marks an interval that does not contain tr(H^k)/n (expected in about 1 of 20)."
        ),
        R.Table([*head, "SLQ", "∫ ρ", "∫ t ρ", "⟨θ⟩", "tr H / n", "⟨θ²⟩", "tr H² / n"], slq_rows),
    ]
    blocks.append(
        R.Text(
            "The figures: the SLQ density (blue) beside the dense eigenvalues smoothed with the same "
            "Gaussian kernel (dashed) and binned (grey), on a log density axis so that the bulk and "
            "the outliers show together (a lone eigenvalue is a bump of height 1/(nσ√(2π))); the "
            "dotted line is λ = 0. Markers: the top eigenvalues by eigh (circles) and Lanczos "
            "(crosses), and λ_min (square)."
        )
    )
    for key in keys:
        if key[2] == 0:
            blocks.append(_density_figure(key[0], key[1], spec_runs[key]["summary"]))
    trained = [k for k in keys if k[2] == 0 and spec_runs[k].get("points")]
    several_problems = len({k[0] for k in trained}) > 1
    curves = []
    for key in trained:
        run = spec_runs[key]
        train = run["spec"]["train"]
        label = f"{train['optimizer']}(lr={train['learning_rate']:g})"
        curves.append(
            R.Series(
                label=f"{key[0]}: {label}" if several_problems else label,
                runs=[
                    (
                        [pt["step"] for pt in run["points"]],
                        [pt["train_loss"] for pt in run["points"]],
                    )
                ],
            )
        )
    if curves:
        blocks.append(
            R.line_figure(
                f"{NAME}-training_loss",
                title=(f"{trained[0][0]}: " if not several_problems else "")
                + "the optax run from init to the trained point (full batch, hand gradient)",
                xlabel="step",
                ylabel="training loss",
                series=curves,
                logy=True,
            )
        )
    return blocks


def _density_figure(prob: str, point: str, s: Mapping[str, Any]) -> Any:
    """The SLQ density and the dense spectrum (smoothed with the same kernel, and its histogram) on a
    log density axis, with the top eigenvalues (Lanczos and eigh) and λ_min as markers."""
    from gradlab.lab import report as R

    def draw(ax: Any) -> None:
        grid = np.asarray(s["slq_grid"])
        slq, dense = np.asarray(s["slq_density"]), np.asarray(s["dense_density"])
        edges, hist = np.asarray(s["dense_hist_edges"]), np.asarray(s["dense_hist"])
        n, sigma = s["d"], s["slq_sigma"]
        # one eigenvalue alone: a histogram bar of 1/(n·width), a kernel bump of 1/(n·σ·√(2π))
        single = min(1 / (n * (edges[1] - edges[0])), 1 / (n * sigma * np.sqrt(2 * np.pi)))
        floor = 0.2 * single
        top = 3 * max(slq.max(), dense.max(), hist.max())
        ax.stairs(
            np.maximum(hist, floor),
            edges,
            baseline=floor,
            fill=True,
            color="0.8",
            label="eigh: histogram",
        )
        ax.plot(
            grid, np.maximum(dense, 0.1 * floor), color="k", lw=1.0, ls="--", label="eigh: smoothed"
        )
        ax.plot(grid, np.maximum(slq, 0.1 * floor), color="C0", lw=1.4, label="SLQ density")
        ax.axvline(0.0, color="0.5", lw=0.6, ls=":")
        y = top / 6
        if "top_eigenvalues" in s:
            ax.plot(
                s["top_eigenvalues_exact"],
                [y] * len(s["top_eigenvalues_exact"]),
                "o",
                mfc="none",
                color="C3",
                ms=7,
                label=f"top {len(s['top_eigenvalues_exact'])}: eigh",
            )
            ax.plot(
                s["top_eigenvalues"],
                [y] * len(s["top_eigenvalues"]),
                "+",
                color="C2",
                ms=7,
                label="top: Lanczos",
            )
        ax.plot([s["lambda_min"]], [y], "s", mfc="none", color="C4", ms=6, label="λ_min: eigh")
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        ax.set_xlim(grid[0], grid[-1])
        ax.set_xlabel("eigenvalue λ of the Hessian")
        ax.set_ylabel("spectral density")
        ax.set_title(
            f"{point}: loss {s['loss']:.3g}, tr H = {s['exact_trace']:.4g}, "
            f"λ ∈ [{s['lambda_min']:.3g}, {s['lambda_max']:.3g}], {s['num_negative']} of {n} < 0",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    return R.Figure(
        name=f"{NAME}-{prob}-{point}-spectral_density",
        caption=(
            f"spectral density of the Hessian — {prob} at {point}: SLQ ({s['slq_probes']} probes × "
            f"{s['slq_iters']} Lanczos steps, Gaussian kernel σ = {s['slq_sigma']:.2g}) vs the "
            "dense eigenvalues (same kernel, and a histogram)"
        ),
        draw=draw,
    )
