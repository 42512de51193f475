"""Function-evaluation budget of zero-order methods on least squares: gradlab vs nevergrad vs scipy.

Problem (ANCHORS.md, "Zero-order vs finite differences vs exact gradient descent"): ``f(w) = ½‖Aw − b‖²``,
``A ∈ R^{2d×d}``, ``A_ij ~ N(0, 1/(2d))``, ``b = A w_true + 0.1 z``, ``w0 = 0``; drawn with NumPy's
``default_rng(seed)``; stop at the relative gap ``(f − f*)/(f(w0) − f*) ≤ 1e-6``. ``d ∈ {10, 100, 1000}``,
median over seeds (5; ``--quick``: 2 seeds and ``d ∈ {10, 100}``). float64 throughout.

Methods (one JSON line per (method, d): median ``fun_evals_to_tol``, ``steps_to_tol``, wall time, per-seed
values, and how many seeds reached the tolerance):

gradlab engine (``descent.run``; monitoring ``f(x_k)`` is free, as in the engine):
  ``gradlab.gd_exact`` (reference, 0 evaluations), ``gradlab.fd_central`` / ``gradlab.fd_forward`` (1/L),
  ``gradlab.zo_sphere_k1`` (1/(dL)), ``gradlab.zo_sphere_k1_trace`` (trace step), ``gradlab.zo_iid_k10``
  (1/(L(1+(d−1)/k))), ``gradlab.zo_orth_k10`` (k/(dL)). The 2-point ZO-GD rows at ``d = 1000`` need
  10⁵ steps each and are only run with ``--slow`` (they are far from the goal anyway; see ANCHORS).
library zero-order method (``descent.fd_cg``, the promoted ``proto.fd_cg_secant``):
  ``gradlab.fd_cg``: ``descent.fd_cg(f, w0, check_decrease=False, ...)`` — forward-difference gradients at
    trial points, PR+ conjugate directions, secant step: ``d + 1`` evaluations per iteration, counted by the
    library (``History.fun_evals_to_tol``); it must reproduce ``proto.fd_cg_secant``'s counts.
prototypes in this file (JAX, jitted once per ``d``; the evaluation counter is exact — every call of ``f``
  by the method is counted; monitoring ``f(x_k)`` for the stopping test is free, as in ``descent.run``):
  ``proto.fd_cg_secant``: forward-difference gradient (``d + 1`` evaluations) at a *trial* point
    ``y = x + α₀p`` only; the gradient at the exact line minimiser along ``p`` is interpolated from the
    gradients at ``x`` and ``y`` (a secant step on ``φ'(α)``, exact for quadratics), and Polak–Ribière+
    conjugate directions. ``d + 1`` evaluations per iteration.
  ``proto.fd_cg_parabola``: the brief's idea (c): forward-difference gradient sharing ``f(x)``, one extra
    evaluation along ``p`` for a parabolic (exact on quadratics) step, and ``f(x_{k+1})`` as the next base:
    ``d + 2`` evaluations per iteration.
  ``proto.random_line_search``: idea (a): per random sphere direction ``v``, ``f(x ± μv)`` with the known
    ``f(x)`` give slope and curvature; exact step along ``v``; ``f(x_new)`` evaluated: 3 per iteration.
peers (same process, same instances, NumPy objective wrapped by an exact counter; the count is taken at
  the first evaluated point that meets the criterion):
  ``scipy.lbfgsb`` (``minimize(method="L-BFGS-B")`` without ``jac``: its own forward differences),
  ``scipy.cg`` (``method="CG"`` without ``jac``), ``nevergrad.NGOpt`` and ``nevergrad.OnePlusOne``
  (ask/tell with a budget). scipy runs with ``maxiter``/``maxfun`` raised and tight ``gtol``/``ftol`` so that
  it is not stopped by its own defaults before the gap criterion (the defaults stop L-BFGS-B at
  ``maxfun = 15000``, i.e. 15 gradients at d = 1000).

The last line, ``"bench": "zo_budget_goal"``, compares gradlab's best zero-order method at each ``d`` with
the goal: ≤ ½ nevergrad's best and ≤ scipy's best evaluations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import _common  # noqa: F401  (x64 on)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import emit, environment, sig
from jax import lax

from gradlab import descent, grads, theory

TOL = 1e-6


# --------------------------------------------------------------------------------------------------
# problem


def make_problem(d: int, seed: int) -> dict:
    """The ANCHORS least-squares instance for ``(d, seed)``: arrays, f*, f(w0), L, tr H."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((2 * d, d)) / np.sqrt(2 * d)
    b = A @ rng.standard_normal(d) + 0.1 * rng.standard_normal(2 * d)
    w_star = np.linalg.lstsq(A, b, rcond=None)[0]
    f_star = 0.5 * float(np.sum((A @ w_star - b) ** 2))
    f0 = 0.5 * float(b @ b)
    return {
        "d": d,
        "A": A,
        "b": b,
        "f_star": f_star,
        "f0": f0,
        "L": float(np.linalg.norm(A, 2) ** 2),
        "trH": float(np.sum(A * A)),
    }


def jax_loss(A, b) -> Callable:
    def f(w):
        r = A @ w - b
        return 0.5 * jnp.dot(r, r)

    return f


# --------------------------------------------------------------------------------------------------
# gradlab engine rows


def gradlab_methods(d: int) -> dict[str, Callable[[dict], tuple]]:
    """name -> (problem -> (strategy, step size)); the optimizer is optax.sgd(step)."""
    k = min(10, d)
    return {
        "gradlab.gd_exact": lambda p: (grads.exact(), theory.gd_step(p["L"])),
        "gradlab.fd_central": lambda p: (grads.central_difference(), theory.gd_step(p["L"])),
        "gradlab.fd_forward": lambda p: (grads.forward_difference(), theory.gd_step(p["L"])),
        "gradlab.zo_sphere_k1": lambda p: (
            grads.two_point(num_directions=1),
            theory.zo_sphere_step(p["L"], d),
        ),
        "gradlab.zo_sphere_k1_trace": lambda p: (
            grads.two_point(num_directions=1),
            theory.zo_trace_step(p["L"], d, p["trH"]),
        ),
        "gradlab.zo_iid_k10": lambda p: (
            grads.two_point(num_directions=k),
            theory.zo_iid_step(p["L"], d, k),
        ),
        "gradlab.zo_orth_k10": lambda p: (
            grads.two_point(num_directions=k, distribution="orthogonal"),
            theory.zo_orthogonal_step(p["L"], d, k),
        ),
    }


SLOW_AT_1000 = {"gradlab.zo_sphere_k1", "gradlab.zo_sphere_k1_trace", "gradlab.zo_iid_k10",
                "gradlab.zo_orth_k10", "gradlab.fd_central", "gradlab.fd_forward",
                "proto.random_line_search"}  # fmt: skip


def run_gradlab(name: str, build: Callable, p: dict, seed: int) -> dict:
    d = p["d"]
    f = jax_loss(jnp.asarray(p["A"]), jnp.asarray(p["b"]))
    strategy, step = build(p)
    max_steps = (
        5000
        if name in {"gradlab.gd_exact", "gradlab.fd_central", "gradlab.fd_forward"}
        else 400 * d
    )
    h = descent.run(f, jnp.zeros(d), strategy, optax.sgd(step), key=jax.random.key(seed),
                    num_steps=max_steps, tol=TOL, f_star=p["f_star"], chunk_size=1024)  # fmt: skip
    return {
        "fun_evals_to_tol": h.fun_evals_to_tol,
        "steps_to_tol": h.steps_to_tol,
        "grads_to_tol": None if h.steps_to_tol is None else int(h.num_grads[h.steps_to_tol]),
        "compile_s": h.compile_time,
        "run_s": h.run_time,
    }


def run_fd_cg(p: dict, seed: int) -> dict:
    """``descent.fd_cg`` (the library version of ``proto.fd_cg_secant``) on one instance."""
    d = p["d"]
    f = jax_loss(jnp.asarray(p["A"]), jnp.asarray(p["b"]))
    h = descent.fd_cg(f, jnp.zeros(d), num_steps=10 * d + 100, tol=TOL, f_star=p["f_star"],
                      check_decrease=False)  # fmt: skip
    return {
        "fun_evals_to_tol": h.fun_evals_to_tol,
        "steps_to_tol": h.steps_to_tol,
        "compile_s": h.compile_time,
        "run_s": h.run_time,
    }


# --------------------------------------------------------------------------------------------------
# prototypes (JAX). Each returns (evals_to_tol, iters_to_tol, hit) from a jitted lax.while_loop.


def _fd_grad(f, y, f_y):
    """Forward differences sharing ``f(y)``: ``d`` evaluations (the base ``f_y`` is counted by the caller)."""
    d = y.size
    h = jnp.sqrt(jnp.finfo(y.dtype).eps) * jnp.maximum(1.0, jnp.abs(y))
    h = (y + h) - y
    fp = jax.vmap(lambda i: f(y.at[i].add(h[i])))(jnp.arange(d))
    return (fp - f_y) / h


def _pr_plus(g_new, g, p):
    """Polak–Ribière+ direction, restarted to −g when it is not a descent direction."""
    beta = jnp.maximum(0.0, jnp.dot(g_new, g_new - g) / jnp.dot(g, g))
    p_new = -g_new + beta * p
    return jnp.where(jnp.dot(g_new, p_new) < 0, p_new, -g_new)


def fd_cg_secant(A, b, f_star, f0, max_iters):
    """FD gradients at trial points + secant-interpolated exact line search + PR+ CG; d + 1 evals/iter."""
    f = jax_loss(A, b)
    d = A.shape[1]
    thresh = TOL * (f0 - f_star)
    x = jnp.zeros(d)
    g = _fd_grad(f, x, f(x))
    evals = d + 1

    def cond(c):
        _x, _g, _p, _a0, _evals, it, hit = c
        return (~hit) & (it < max_iters)

    def body(c):
        x, g, p, a0, evals, it, _ = c
        y = x + a0 * p
        gy = _fd_grad(f, y, f(y))
        evals = evals + d + 1
        curv = jnp.dot(gy - g, p) / a0  # pᵀHp (exact for a quadratic up to FD error)
        slope = jnp.dot(g, p)
        alpha = jnp.where(curv > 0, -slope / curv, a0)
        x_new = x + alpha * p
        g_new = g + (alpha / a0) * (gy - g)
        p_new = _pr_plus(g_new, g, p)
        hit = f(x_new) - f_star <= thresh  # monitoring: not counted
        return x_new, g_new, p_new, alpha, evals, it + 1, hit

    init = (x, g, -g, jnp.asarray(1.0), jnp.asarray(evals), jnp.asarray(0), f(x) - f_star <= thresh)
    _, _, _, _, evals, it, hit = lax.while_loop(cond, body, init)
    return evals, it, hit


def fd_cg_parabola(A, b, f_star, f0, max_iters):
    """FD gradient sharing f(x) + one evaluation along p (parabolic step) + f(x_new): d + 2 evals/iter."""
    f = jax_loss(A, b)
    d = A.shape[1]
    thresh = TOL * (f0 - f_star)
    x = jnp.zeros(d)
    fx = f(x)
    g = _fd_grad(f, x, fx)
    evals = d + 1

    def cond(c):
        return (~c[-1]) & (c[-2] < max_iters)

    def body(c):
        x, fx, g, p, a0, evals, it, _ = c
        slope = jnp.dot(g, p)
        fy = f(x + a0 * p)
        curv = 2.0 * (fy - fx - a0 * slope) / a0**2
        alpha = jnp.where(curv > 0, -slope / curv, a0)
        x_new = x + alpha * p
        f_new = f(x_new)
        g_new = _fd_grad(f, x_new, f_new)
        evals = evals + d + 2
        p_new = _pr_plus(g_new, g, p)
        hit = f_new - f_star <= thresh  # f(x_new) was evaluated (and counted) anyway
        return x_new, f_new, g_new, p_new, alpha, evals, it + 1, hit

    init = (
        x,
        fx,
        g,
        -g,
        jnp.asarray(1.0),
        jnp.asarray(evals),
        jnp.asarray(0),
        fx - f_star <= thresh,
    )
    out = lax.while_loop(cond, body, init)
    return out[-3], out[-2], out[-1]


def random_line_search(A, b, f_star, f0, max_iters, key):
    """Random sphere directions, exact step along each from f(x ± μv) and f(x); 3 evals/iter."""
    f = jax_loss(A, b)
    d = A.shape[1]
    thresh = TOL * (f0 - f_star)
    x = jnp.zeros(d)
    fx = f(x)

    def cond(c):
        return (~c[-1]) & (c[-2] < max_iters)

    def body(c):
        x, fx, evals, it, _ = c
        v = jax.random.normal(jax.random.fold_in(key, it), (d,))
        v = v / jnp.linalg.norm(v)
        mu = jnp.finfo(x.dtype).eps ** 0.25 * jnp.maximum(1.0, jnp.max(jnp.abs(x)))
        fp, fm = f(x + mu * v), f(x - mu * v)
        slope = (fp - fm) / (2 * mu)
        curv = (fp + fm - 2 * fx) / mu**2
        t = jnp.where(curv > 0, -slope / curv, 0.0)
        x_new = x + t * v
        f_new = f(x_new)
        return x_new, f_new, evals + 3, it + 1, f_new - f_star <= thresh

    init = (x, fx, jnp.asarray(1), jnp.asarray(0), fx - f_star <= thresh)
    out = lax.while_loop(cond, body, init)
    return out[-3], out[-2], out[-1]


PROTOTYPES = {
    "proto.fd_cg_secant": (fd_cg_secant, lambda d: 10 * d + 100, False),
    "proto.fd_cg_parabola": (fd_cg_parabola, lambda d: 10 * d + 100, False),
    "proto.random_line_search": (random_line_search, lambda d: 2000 * d, True),
}


def prototype_runner(name: str, d: int):
    """Compile the prototype once for this ``d``; return (call(problem, seed) -> dict, compile_s)."""
    fn, iters, keyed = PROTOTYPES[name]
    max_iters = iters(d)
    shapes = (jnp.zeros((2 * d, d)), jnp.zeros(2 * d), jnp.float64(0), jnp.float64(1))
    t0 = time.perf_counter()
    if keyed:
        exe = jax.jit(lambda A, b, fs, f0, k: fn(A, b, fs, f0, max_iters, k)).lower(
            *shapes, jax.random.key(0)).compile()  # fmt: skip
    else:
        exe = jax.jit(lambda A, b, fs, f0: fn(A, b, fs, f0, max_iters)).lower(*shapes).compile()
    compile_s = time.perf_counter() - t0

    def call(p, seed):
        args = (
            jnp.asarray(p["A"]),
            jnp.asarray(p["b"]),
            jnp.float64(p["f_star"]),
            jnp.float64(p["f0"]),
        )
        if keyed:
            args = (*args, jax.random.key(seed))
        t0 = time.perf_counter()
        evals, it, hit = jax.block_until_ready(exe(*args))
        run_s = time.perf_counter() - t0
        hit = bool(hit)
        return {
            "fun_evals_to_tol": int(evals) if hit else None,
            "steps_to_tol": int(it) if hit else None,
            "compile_s": compile_s,
            "run_s": run_s,
        }

    return call, compile_s


# --------------------------------------------------------------------------------------------------
# peers


class _Reached(Exception):
    pass


class CountedObjective:
    """NumPy ``f`` with an exact evaluation counter; raises ``_Reached`` at the first point meeting the gap."""

    def __init__(self, p: dict):
        self.A, self.b, self.f_star = p["A"], p["b"], p["f_star"]
        self.thresh = TOL * (p["f0"] - p["f_star"])
        self.n = 0
        self.hit: int | None = None

    def __call__(self, w) -> float:
        self.n += 1
        r = self.A @ np.asarray(w, dtype=np.float64) - self.b
        v = 0.5 * float(r @ r)
        if self.hit is None and v - self.f_star <= self.thresh:
            self.hit = self.n
            raise _Reached
        return v


def run_scipy(method: str, p: dict, seed: int) -> dict:
    from scipy.optimize import minimize

    obj = CountedObjective(p)
    d = p["d"]
    opts = {"maxiter": 100_000, "gtol": 1e-14}
    if method == "L-BFGS-B":
        opts.update(maxfun=10**7, ftol=1e-16)
    t0 = time.perf_counter()
    status = None
    try:
        res = minimize(obj, np.zeros(d), method=method, options=opts)
        status = res.message if not isinstance(res.message, bytes) else res.message.decode()
    except _Reached:
        status = "reached"
    return {
        "fun_evals_to_tol": obj.hit,
        "steps_to_tol": None,
        "evals_total": obj.n,
        "status": str(status),
        "run_s": time.perf_counter() - t0,
    }


def run_nevergrad(optimizer: str, p: dict, seed: int, budget: int) -> dict:
    import nevergrad as ng

    obj = CountedObjective(p)
    d = p["d"]
    param = ng.p.Array(init=np.zeros(d))
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
    t0 = time.perf_counter()
    try:
        for _ in range(budget):
            cand = opt.ask()
            opt.tell(cand, obj(cand.value))
    except _Reached:
        pass
    return {
        "fun_evals_to_tol": obj.hit,
        "steps_to_tol": None,
        "evals_total": obj.n,
        "budget": budget,
        "run_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------------


def _median(values):
    vals = [v for v in values if v is not None]
    if len(vals) < len(values) or not vals:
        return None  # a seed that did not reach the tolerance: no honest median
    return statistics.median(vals)


def summarize_rows(method: str, d: int, rows: list[dict], seeds: list[int]) -> dict:
    ev = [r["fun_evals_to_tol"] for r in rows]
    st = [r.get("steps_to_tol") for r in rows]
    out = {
        "bench": "zo_budget",
        "method": method,
        "d": d,
        "seeds": seeds,
        "reached": sum(e is not None for e in ev),
        "fun_evals_to_tol": _median(ev),
        "steps_to_tol": _median(st) if all(s is not None for s in st) else None,
        "per_seed_fun_evals": ev,
        "run_s_median": sig(statistics.median(r["run_s"] for r in rows)),
    }
    if "compile_s" in rows[0]:
        out["compile_s_median"] = sig(statistics.median(r["compile_s"] for r in rows))
    if "grads_to_tol" in rows[0]:
        out["grads_to_tol"] = _median([r["grads_to_tol"] for r in rows])
    if "status" in rows[0]:
        out["status"] = sorted({r["status"] for r in rows})
    if "budget" in rows[0]:
        out["budget"] = rows[0]["budget"]
    return out


NEVERGRAD_BUDGET = {10: 5_000, 100: 60_000, 1000: 400_000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, d ∈ {10, 100} (< 2 minutes)")
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument(
        "--slow", action="store_true", help="also the 2-point ZO-GD rows at d = 1000"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip nevergrad and scipy")
    parser.add_argument("--no-engine", action="store_true", help="skip the descent.run rows")
    parser.add_argument("--nevergrad-seeds-1000", type=int, default=1,
                        help="seeds for nevergrad at d = 1000 (a Python ask/tell loop: slow)")  # fmt: skip
    parser.add_argument(
        "--seeds-1000", type=int, default=2, help="seeds at d = 1000 (FD/scipy are slow)"
    )
    parser.add_argument("--ngopt-seeds", type=int, default=2,
                        help="seeds for NGOpt at d = 100 (~70 s each here); NGOpt is not run at d = 1000 "
                        "nor, with --quick, at d = 100")  # fmt: skip
    args = parser.parse_args(argv)
    dims = args.dims or ([10, 100] if args.quick else [10, 100, 1000])
    n_seeds = args.seeds or (2 if args.quick else 5)
    seeds = list(range(n_seeds))
    emit(environment(tol=TOL, seeds=seeds, dims=dims, quick=args.quick))

    results: dict[int, dict[str, dict]] = {d: {} for d in dims}
    for d in dims:
        d_seeds = seeds if d < 1000 else seeds[: args.seeds_1000]
        problems = {s: make_problem(d, s) for s in d_seeds}

        # the library method first, so that it is named the best on a tie with its prototype
        rows = [run_fd_cg(problems[s], s) for s in d_seeds]
        results[d]["gradlab.fd_cg"] = line = summarize_rows("gradlab.fd_cg", d, rows, d_seeds)
        emit(line)

        for name in PROTOTYPES:
            if d >= 1000 and name in SLOW_AT_1000 and not args.slow:
                emit(
                    {
                        "bench": "zo_budget",
                        "method": name,
                        "d": d,
                        "skipped": "slow at d = 1000; --slow",
                    }
                )
                continue
            call, _ = prototype_runner(name, d)
            rows = [call(problems[s], s) for s in d_seeds]
            results[d][name] = line = summarize_rows(name, d, rows, d_seeds)
            emit(line)

        if not args.no_engine:
            for name, build in gradlab_methods(d).items():
                if d >= 1000 and name in SLOW_AT_1000 and not args.slow:
                    emit({"bench": "zo_budget", "method": name, "d": d, "skipped":
                          "slow at d = 1000 (ZO-GD: ~1e5 steps; FD-GD: ~1e5 evaluations of a 2000x1000 matvec); run with --slow (see ANCHORS for counts)"})  # fmt: skip
                    continue
                rows = [run_gradlab(name, build, problems[s], s) for s in d_seeds]
                results[d][name] = line = summarize_rows(name, d, rows, d_seeds)
                emit(line)

        if not args.no_peers:
            for method in ("L-BFGS-B", "CG"):
                rows = [run_scipy(method, problems[s], s) for s in d_seeds]
                name = f"scipy.{method.lower().replace('-', '')}"
                results[d][name] = line = summarize_rows(name, d, rows, d_seeds)
                emit(line)
            for opt in ("NGOpt", "OnePlusOne"):
                if opt == "NGOpt" and (d >= 1000 or (d >= 100 and args.quick)):
                    emit(
                        {
                            "bench": "zo_budget",
                            "method": f"nevergrad.{opt}",
                            "d": d,
                            "skipped": "Python ask/tell loop too slow here (~70 s per seed at d = 100)",
                        }
                    )
                    continue
                ng_seeds = (
                    (seeds if d < 100 else seeds[: args.ngopt_seeds])
                    if opt == "NGOpt"
                    else (seeds if d < 1000 else seeds[: args.nevergrad_seeds_1000])
                )
                rows = [run_nevergrad(opt, problems[s], s, NEVERGRAD_BUDGET.get(d, 400 * d))
                        for s in ng_seeds]  # fmt: skip
                name = f"nevergrad.{opt}"
                results[d][name] = line = summarize_rows(name, d, rows, ng_seeds)
                emit(line)

    # the goal, per d
    zo_prefixes = ("proto.", "gradlab.zo_", "gradlab.fd_")
    for d in dims:
        res = results[d]

        def best(prefix_pred, res=res):
            cands = {n: r["fun_evals_to_tol"] for n, r in res.items()
                     if prefix_pred(n) and r.get("fun_evals_to_tol") is not None}  # fmt: skip
            if not cands:
                return None, None
            n = min(cands, key=cands.get)
            return n, cands[n]

        ours, ours_ev = best(lambda n: n.startswith(zo_prefixes))
        ng, ng_ev = best(lambda n: "nevergrad" in n)
        sp, sp_ev = best(lambda n: "scipy" in n)
        line = {
            "bench": "zo_budget_goal",
            "d": d,
            "gradlab_best": ours,
            "gradlab_best_evals": ours_ev,
            "nevergrad_best": ng,
            "nevergrad_best_evals": ng_ev,
            "scipy_best": sp,
            "scipy_best_evals": sp_ev,
        }
        if ours_ev is not None:
            line["vs_nevergrad"] = None if ng_ev is None else sig(ours_ev / ng_ev, 3)
            line["vs_scipy"] = None if sp_ev is None else sig(ours_ev / sp_ev, 3)
            line["goal_half_nevergrad"] = None if ng_ev is None else ours_ev <= 0.5 * ng_ev
            line["goal_le_scipy"] = None if sp_ev is None else ours_ev <= sp_ev
        emit(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
