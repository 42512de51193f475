"""GD vs zero-order GD vs FD-CG vs Nelder–Mead on multidimensional scaling (the seed's MDS claim).

Claim (``../shared/seeds/001_f7f0d50ffa7e9f44.txt``, "Example: multidimensional scaling"): gradient-free
methods handle this problem much slower, especially in higher dimensions.

Problem: ``problems.make("mds", jax.random.key(seed), num_points=N, dim=d)``,
``L(W) = Σᵢⱼ (‖Wᵢ − Wⱼ‖² − Dᵢⱼ)²`` (quartic, non-convex, ``min_value = 0``), ``n = N·d`` parameters, start
``p.init``; target ``L(x) ≤ 1e-6·L(x₀)`` (relative gap, ``f* = 0``) or the method's budget. float64.
Sizes ``(N, d) ∈ {(5, 2), (10, 2), (20, 2), (20, 3)}`` (``--quick``: the first two).

Methods (one JSON line per (method, size)):
  ``gd_exact_sgd`` / ``gd_exact_adam``: ``descent.run`` with ``grads.exact()`` and ``optax.sgd(lr)`` /
    ``optax.adam(lr)``; ``lr`` the best (fewest steps to the target) of a small grid, run per size (the grid
    runs are not counted; ``lr_grid`` lists the outcomes). Cost: one gradient (and the value) per step.
  ``zo_sphere_k1``: ``grads.two_point(num_directions=1)`` (2 evaluations per step) with ``optax.sgd``
    at the best exact-GD sgd step divided by ``n`` (the ``E‖G‖² = n‖g‖²`` variance of one sphere
    direction); ``zo_orth_kn``: ``grads.two_point(num_directions=n, distribution="orthogonal")``
    (a random orthonormal frame, i.e. a rotated central-difference gradient: ``2n`` per step) with the
    best exact-GD sgd step.
  ``fd_cg``: ``descent.fd_cg`` with defaults, and ``fd_cg_restart1`` (``restart_every=1``: steepest
    descent with the secant step), both counted by the library.
  ``scipy_nelder_mead``: ``scipy.optimize.minimize(method="Nelder-Mead", options={"adaptive": True})``
    on a NumPy copy of the loss wrapped by an exact counter; the count is taken at the first evaluated
    point meeting the target (the wrapper then stops the run); ``maxfev`` = ``--nm-maxfev``.
Function evaluations monitoring ``f(x_k)`` for the stopping test are free (as in ``descent.run``).
Wall time: ``compile_s`` apart where JAX compiles; ``run_s`` the execution.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (x64 on)
import jax
import numpy as np
import optax
from _common import emit, environment, sig
from scipy.optimize import minimize

from gradlab import descent, grads, problems

TOL = 1e-6
SIZES = [(5, 2), (10, 2), (20, 2), (20, 3)]
SGD_GRID = [3e-3, 1e-3, 3e-4, 1e-4]
ADAM_GRID = [1e-1, 3e-2, 1e-2]


def _row(method, n_pts, d, h, f0, **extra):
    reached = h.steps_to_tol is not None
    return {
        "bench": "mds_methods",
        "method": method,
        "N": n_pts,
        "d": d,
        "n": n_pts * d,
        "reached": reached,
        "iterations": int(h.steps_to_tol if reached else h.steps_run),
        "fun_evals": int(h.num_fun_evals[h.steps_to_tol if reached else -1]),
        "grad_evals": int(h.num_grads[h.steps_to_tol if reached else -1]),
        "final_rel_loss": sig(float(h.loss[-1]) / f0),
        "diverged": bool(h.diverged),
        "compile_s": sig(h.compile_time),
        "run_s": sig(h.run_time),
        **extra,
    }


def _best_lr(p, x0, make_opt, grid, num_steps):
    """The grid value reaching the target in the fewest steps (``None`` if none does), and all outcomes."""
    outcomes, best = {}, None
    for lr in grid:
        h = descent.run(
            p.loss,
            x0,
            grads.exact(),
            make_opt(lr),
            key=jax.random.key(0),
            num_steps=num_steps,
            tol=TOL,
            f_star=0.0,
        )
        outcomes[str(lr)] = "diverged" if h.diverged else h.steps_to_tol
        if h.steps_to_tol is not None and (best is None or h.steps_to_tol < best[1]):
            best = (lr, h.steps_to_tol)
    return (None if best is None else best[0]), outcomes


def _nelder_mead(p, x0, f0, maxfev):
    D = np.asarray(p.data["D"])
    shape = x0.shape

    def loss(w):
        w = w.reshape(shape)
        diff = w[:, None, :] - w[None, :, :]
        r = (diff * diff).sum(-1) - D
        return float((r * r).sum())

    class _Reached(Exception):
        pass

    count, best = [0], [np.inf]

    def counted(w):
        count[0] += 1
        v = loss(w)
        best[0] = min(best[0], v)
        if v <= TOL * f0:
            raise _Reached
        return v

    t = time.perf_counter()
    reached, nit = False, None
    try:
        res = minimize(
            counted,
            np.asarray(x0).ravel(),
            method="Nelder-Mead",
            options={
                "maxfev": maxfev,
                "maxiter": maxfev,
                "xatol": 0.0,
                "fatol": 0.0,
                "adaptive": True,
            },
        )
        nit = int(res.nit)
    except _Reached:
        reached = True
    return {
        "reached": reached,
        "iterations": nit,  # scipy's iteration count is unavailable when the wrapper stops the run
        "fun_evals": count[0],
        "grad_evals": 0,
        "final_rel_loss": sig(best[0] / f0),
        "run_s": sig(time.perf_counter() - t),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="sizes (5,2), (10,2); smaller budgets (< 2 min)"
    )
    ap.add_argument("--seed", type=int, default=0, help="instance seed")
    ap.add_argument(
        "--nm-maxfev", type=int, default=None, help="Nelder–Mead budget (default 2e5; quick 5e4)"
    )
    args = ap.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    nm_maxfev = args.nm_maxfev or (50_000 if args.quick else 200_000)
    gd_steps = 20_000
    zo_steps = 50_000 if args.quick else 200_000
    cg_steps = 2_000 if args.quick else 5_000
    emit(environment(seed=args.seed, tol=TOL, sizes=sizes, nm_maxfev=nm_maxfev, quick=args.quick))

    for n_pts, d in sizes:
        p = problems.make("mds", jax.random.key(args.seed), num_points=n_pts, dim=d)
        x0, n = p.init, n_pts * d
        f0 = float(p.loss(x0))
        run = dict(key=jax.random.key(args.seed + 1), tol=TOL, f_star=0.0)

        lr_sgd, grid_sgd = _best_lr(p, x0, optax.sgd, SGD_GRID, gd_steps)
        lr_adam, grid_adam = _best_lr(p, x0, optax.adam, ADAM_GRID, gd_steps)
        for name, lr, make, grid in [
            ("gd_exact_sgd", lr_sgd, optax.sgd, grid_sgd),
            ("gd_exact_adam", lr_adam, optax.adam, grid_adam),
        ]:
            if lr is None:
                emit({"bench": "mds_methods", "method": name, "N": n_pts, "d": d, "lr_grid": grid})
                continue
            descent.clear_cache()  # so that compile_s is measured
            h = descent.run(p.loss, x0, grads.exact(), make(lr), num_steps=gd_steps, **run)
            emit(_row(name, n_pts, d, h, f0, lr=lr, lr_grid=grid))

        lr = lr_sgd if lr_sgd is not None else min(SGD_GRID)
        for name, strategy, step in [
            ("zo_sphere_k1", grads.two_point(num_directions=1), lr / n),
            ("zo_orth_kn", grads.two_point(num_directions=n, distribution="orthogonal"), lr),
        ]:
            h = descent.run(p.loss, x0, strategy, optax.sgd(step), num_steps=zo_steps, **run)
            emit(_row(name, n_pts, d, h, f0, lr=sig(step)))

        for name, kw in [("fd_cg", {}), ("fd_cg_restart1", {"restart_every": 1})]:
            h = descent.fd_cg(p.loss, x0, num_steps=cg_steps, tol=TOL, f_star=0.0, **kw)
            emit(_row(name, n_pts, d, h, f0))

        nm = _nelder_mead(p, x0, f0, nm_maxfev)
        emit(
            {
                "bench": "mds_methods",
                "method": "scipy_nelder_mead",
                "N": n_pts,
                "d": d,
                "n": n,
                **nm,
            }
        )


if __name__ == "__main__":
    main()
