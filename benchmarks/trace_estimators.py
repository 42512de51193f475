"""Trace estimators side by side: gradlab.curvature.trace vs matfree 0.6.3 on 1000×1000 SPD spectra.

Matrices ``A = U diag(λ) Uᵀ`` (``U`` a Haar-random orthogonal matrix, fixed seed) with spectra ``λ_k ∝ 1/k²``,
``∝ 1/k``, flat uniform in ``[1, 2]``, and low rank plus noise (10 eigenvalues 1, the rest 1e-2). For every
budget ``m`` (``--budgets``, default 10/30/100/300 matvecs) and estimator, ``--seeds`` independent estimates
(20) run inside one jitted ``lax.map`` over keys (never a vmap over seeds: batched LAPACK deadlocked in jaxlib
0.10.2 on CPU). Every estimator is compiled first (compile time reported apart); then all estimators of one
(spectrum, budget) are timed round-robin (``_common.interleaved``, ``--repeats`` rounds, median and minimum),
so a change of load on the shared machine affects gradlab and matfree alike. Same matrices, same budgets and
dtype (float64) for both libraries; ``A`` is an argument of the compiled function.

Per (spectrum, budget, estimator) one JSON line: median relative error over seeds, seconds per estimate
(median over rounds, and the minimum), 95% coverage of ``±1.96·std_error``. Then one summary line per
(spectrum, budget): gradlab's best vs matfree's best median error (goal ≤ 1.1×; with a 90% bootstrap
interval over seeds, and the largest difference of the two libraries' XTrace / XNysTrace fed the same
probes, which tells the implementations apart from the probe streams) and its time ratio (goal ≤ 0.5×,
medians), ``auto`` ÷ best gradlab fixed method (goal ≤ 1.5×), and gradlab ÷ matfree time for
each method both implement (the like-for-like comparison); the auto ratio comes with a 90% paired-bootstrap
interval over seeds (20 seeds measure a median only to about ±30%). gradlab's ``auto`` is told
``psd=True`` (the matrices are SPD by construction), which lets it choose XNysTrace. ``--libraries
gradlab --seeds 200`` re-measures the auto comparison alone with more seeds; ``--no-psd`` runs auto without
the declaration (candidates Hutchinson and XTrace, compared with the best fixed method but XNysTrace). Run with ``OPENBLAS_NUM_THREADS=1``
(threaded LAPACK under contention slowed the X-methods 5–10×). ``--quick``: 5 seeds, budgets 10/30/100,
3 rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import _common  # noqa: F401  (x64 on)
import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, environment, interleaved, sig

from gradlab import curvature


def spectra(n: int) -> dict[str, np.ndarray]:
    k = np.arange(1, n + 1)
    return {
        "inv_k2": 1.0 / k**2,
        "inv_k": 1.0 / k,
        "flat": np.sort(np.random.default_rng(0).uniform(1.0, 2.0, n))[::-1],
        "lowrank_noise": np.concatenate([np.ones(10), 1e-2 * np.ones(n - 10)]),
    }


def gradlab_estimators(n: int, m: int, *, psd: bool = True) -> dict:
    out = {}
    for method in curvature.TRACE_METHODS:

        def est(A, key, method=method):
            e = curvature.trace(
                lambda v: A @ v,
                key,
                like=jnp.zeros(n, A.dtype),
                num_matvecs=m,
                method=method,
                psd=psd,  # the matrices are SPD by construction (psd=True lets auto use XNysTrace)
            )
            return e.value, e.std_error

        out[f"gradlab:{method}"] = est
    return out


def matfree_estimators(n: int, m: int) -> dict:
    from matfree import stochtrace as st

    like = jnp.zeros(n)
    out = {}
    hutch = st.estimator_monte_carlo_mean_and_sem(
        st.monte_carlo_trace(), st.sampler_signs(like, num=m)
    )
    xtrace = st.estimator_leave_one_out_mean_and_sem(
        st.leave_one_out_xtrace(), st.sampler_sphere(like, num=m // 2)
    )
    xnys = st.estimator_leave_one_out_mean_and_sem(
        st.leave_one_out_xnystrace(), st.sampler_sphere(like, num=m)
    )
    for name, fn in [("hutchinson", hutch), ("xtrace", xtrace), ("xnystrace", xnys)]:

        def est(A, key, fn=fn):
            return fn(lambda v: A @ v, key)

        out[f"matfree:{name}"] = est
    return out


def same_probe_differences(A, keys, n: int, m: int, gradlab_values: dict) -> dict:
    """Largest relative difference between gradlab's and matfree's XTrace / XNysTrace *given the same
    probes*: matfree's integrands fed the probes gradlab drew for each key, against gradlab's estimates
    for those keys (``gradlab_values[name]``, already computed). Separates the implementations from
    the probe streams, whose 20–100-seed medians differ by up to 1.5× on their own. Uses gradlab's
    private probe generator (``curvature._probes``), which is what ``trace`` draws for a key."""
    from matfree import stochtrace as st

    samp = curvature._probe_sampler("sphere", jnp.zeros(n, A.dtype), 1)
    integrands = {
        "xtrace": (st.leave_one_out_xtrace(), m // 2),
        "xnystrace": (st.leave_one_out_xnystrace(), m),
    }

    def one(key):
        return {
            name: jnp.mean(integrand(lambda v: A @ v, curvature._probes(samp, key, 0, k)))
            for name, (integrand, k) in integrands.items()
        }

    mf = jax.jit(lambda ks: jax.lax.map(one, ks))(keys)
    return {
        name: sig(float(np.max(np.abs(gradlab_values[name] - v) / np.abs(v))), 2)
        for name, v in ((name, np.asarray(v)) for name, v in mf.items())
    }


def _bootstrap_interval(stat, groups, *, paired, draws=2000, level=0.9):
    """Percentile interval of ``stat(*resampled groups)`` over ``draws`` bootstrap resamples of the
    seeds: one index set shared by all groups (``paired``: the same seeds, e.g. gradlab's methods on the
    same matrices), or one per group (independent samples, e.g. two libraries' own seeds)."""
    rng = np.random.default_rng(0)
    if paired:
        idx = rng.integers(0, groups[0].shape[0], size=(draws, groups[0].shape[0]))
        resampled = [g[idx] for g in groups]
    else:
        resampled = [g[rng.integers(0, g.shape[0], size=(draws, g.shape[0]))] for g in groups]
    return tuple(np.quantile(stat(*resampled), [(1 - level) / 2, (1 + level) / 2]))


def _error_ratio_interval(g_rel, m_rel):
    """``median(g_rel) / median(m_rel)``, seeds resampled independently per library."""
    return _bootstrap_interval(
        lambda g, m: np.median(g, axis=1) / np.median(m, axis=1), [g_rel, m_rel], paired=False
    )


def _auto_ratio_interval(auto, fixed):
    """Paired bootstrap over seeds of ``median(auto) / min_method median(method)``: an interval that
    shows how much of a ratio is the seeds' noise (20 seeds measure a median to about ±30%)."""

    def stat(a, *fs):
        return np.median(a, axis=1) / np.min([np.median(f, axis=1) for f in fs], axis=0)

    return _bootstrap_interval(stat, [auto, *fixed], paired=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 seeds, budgets 10/30/100, 3 rounds")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--spectra", default="inv_k2,inv_k,flat,lowrank_noise")
    parser.add_argument("--budgets", default=None, help="comma-separated matvec budgets")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timing rounds (default 5, quick 3)"
    )
    parser.add_argument(
        "--libraries",
        default="gradlab,matfree",
        help="'gradlab' alone: the auto-vs-fixed comparison with many seeds, without the peer",
    )
    parser.add_argument(
        "--no-psd",
        action="store_true",
        help="auto without psd=True (its candidates are Hutchinson and XTrace; the auto ratio is then "
        "taken against the best fixed method other than XNysTrace)",
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or (5 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.budgets:
        budgets = tuple(int(b) for b in args.budgets.split(","))
    else:
        budgets = (10, 30, 100) if args.quick else (10, 30, 100, 300)
    n = args.n
    with_matfree = "matfree" in args.libraries.split(",")
    emit(environment(openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS")))
    U = np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))[0]
    keys = jax.random.split(jax.random.key(0), seeds)
    all_spectra = spectra(n)
    summaries = []
    for name in args.spectra.split(","):
        lam = all_spectra[name]
        A = jnp.asarray((U * lam) @ U.T)
        tr = float(lam.sum())
        for m in budgets:
            rows, compiled, outputs, compile_s = {}, {}, {}, {}
            ests = dict(gradlab_estimators(n, m, psd=not args.no_psd))
            if with_matfree:
                ests.update(matfree_estimators(n, m))
            for label, est in ests.items():
                run = jax.jit(lambda A, ks, est=est: jax.lax.map(lambda key_: est(A, key_), ks))
                t0 = time.perf_counter()
                compiled[label] = run.lower(A, keys).compile()
                compile_s[label] = time.perf_counter() - t0
                outputs[label] = jax.block_until_ready(compiled[label](A, keys))
            calls = {label: (lambda c=c, A=A: c(A, keys)) for label, c in compiled.items()}
            times = interleaved(calls, repeats=repeats)
            for label in ests:
                v, s = (np.asarray(x) for x in outputs[label])
                per = float(np.median(times[label])) / seeds
                per_min = float(np.min(times[label])) / seeds
                rel = np.abs(v - tr) / tr
                rows[label] = {
                    "median_rel_error": float(np.median(rel)),
                    "s_per_estimate": per,
                    "rel": rel,
                }
                emit(
                    {
                        "bench": "trace_estimators",
                        "spectrum": name,
                        "budget": m,
                        "estimator": label,
                        "median_rel_error": sig(float(np.median(rel)), 3),
                        "coverage_95": sig(float(np.mean(np.abs(v - tr) <= 1.96 * s)), 3),
                        "s_per_estimate": sig(per, 3),
                        "s_per_estimate_min": sig(per_min, 3),
                        "compile_s": sig(compile_s[label], 3),
                    }
                )
            g = {k: r for k, r in rows.items() if k.startswith("gradlab:")}
            excluded = {"gradlab:auto"} | ({"gradlab:xnystrace"} if args.no_psd else set())
            fixed = {k: r for k, r in g.items() if k not in excluded}
            fbest = min(fixed, key=lambda k: fixed[k]["median_rel_error"])
            auto_ratio = g["gradlab:auto"]["median_rel_error"] / fixed[fbest]["median_rel_error"]
            lo, hi = _auto_ratio_interval(
                g["gradlab:auto"]["rel"], [r["rel"] for r in fixed.values()]
            )
            line = {
                "bench": "trace_estimators.summary",
                "spectrum": name,
                "budget": m,
                "seeds": seeds,
                "auto_psd": not args.no_psd,
                "gradlab_best_fixed": fbest,
                "auto_vs_best_fixed": sig(auto_ratio, 3),
                "auto_vs_best_fixed_90ci": [sig(lo, 3), sig(hi, 3)],
                "goals_met": {"auto<=1.5": auto_ratio <= 1.5},
            }
            if with_matfree:
                mf = {k: r for k, r in rows.items() if k.startswith("matfree:")}
                gbest = min(g, key=lambda k: g[k]["median_rel_error"])
                mbest = min(mf, key=lambda k: mf[k]["median_rel_error"])
                err_ratio = g[gbest]["median_rel_error"] / mf[mbest]["median_rel_error"]
                time_ratio = g[gbest]["s_per_estimate"] / mf[mbest]["s_per_estimate"]
                elo, ehi = _error_ratio_interval(g[gbest]["rel"], mf[mbest]["rel"])
                line.update(
                    {
                        "gradlab_best": gbest,
                        "matfree_best": mbest,
                        "error_ratio": sig(err_ratio, 3),
                        "error_ratio_90ci": [sig(elo, 3), sig(ehi, 3)],
                        "same_probes_max_rel_diff": same_probe_differences(
                            A,
                            keys,
                            n,
                            m,
                            {
                                k: np.asarray(outputs[f"gradlab:{k}"][0])
                                for k in ("xtrace", "xnystrace")
                            },
                        ),
                        "time_ratio": sig(time_ratio, 3),
                        "same_method_time_ratio": {
                            meth: sig(
                                g[f"gradlab:{meth}"]["s_per_estimate"] / r["s_per_estimate"], 3
                            )
                            for meth, r in ((k.split(":")[1], r) for k, r in mf.items())
                        },
                    }
                )
                line["goals_met"].update(
                    {"error_ratio<=1.1": err_ratio <= 1.1, "time_ratio<=0.5": time_ratio <= 0.5}
                )
            summaries.append(line)
            emit(line)
    goals = {"bench": "trace_estimators.goals"}
    for goal in summaries[0]["goals_met"]:
        goals[f"all_{goal}"] = all(s["goals_met"][goal] for s in summaries)
    emit(goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
