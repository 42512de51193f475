"""Forward vs reverse mode: the Jacobian of f(x) = A x (n fixed, m varied), jacobian(mode="auto"), and the
cheap gradient ratio of an MLP.

The seeds' figure: ``A ∈ R^{m×n}``, ``n = 100``, ``m`` over a grid; ``jax.jacfwd`` (``A·I_n``, ``2mn²``
FLOPs), ``jax.jacrev`` (``I_m·A``, ``2m²n``) and ``admodes.jacobian(mode="auto")`` (forward iff ``n ≤ m``)
are compiled (compile time apart) and timed round-robin per ``m`` (``admodes.crossover``: median and minimum
of ``--repeats`` rounds, each round ≥ ``--min-sample`` = 20 ms of back-to-back calls). FLOPs are counted from the compiled HLO
(``remat.hlo_flops``). Goals: the measured crossover ``m*`` (where ``jacrev ÷ jacfwd`` crosses 1, log–log
interpolation) lies in ``[0.5n, 2n]``; auto is never more than 1.2× slower than the better fixed mode on the
grid (the median over rounds of the paired per-round ratio auto ÷ better mode; the auto program is also
checked to be the chosen mode's optimized HLO, text-identical, so any gap is timing noise). Then ``admodes.costs`` on an MLP (widths 256-512-512-10, batch 256): forward, jvp, vjp and
grad, time and FLOPs ÷ forward (cheap gradient principle: grad ÷ forward a small constant, ≈ 3 in FLOPs).

Timing is single-threaded by default (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``, set before JAX is
imported unless ``XLA_FLAGS`` is already set or ``--multithread`` is given) and read from the process CPU
time (``--clock cpu``, the default then): on a loaded shared 2-core machine the wall clock of two identical
programs timed side by side differed by 0.4–1.8× between rounds, their CPU times by 0.8–1.14×. With
``--multithread`` the default clock is the wall clock (CPU time would sum the pool's threads). Output: one JSON line per ``m``, one crossover
summary with the goals, one MLP line.
"""

from __future__ import annotations

import os
import sys

if "--multithread" not in sys.argv and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import re

import _common  # noqa: F401  (x64 on)
import jax
import jax.numpy as jnp
from _common import emit, environment, sig

from gradlab import admodes

QUICK_MS = (10, 20, 50, 80, 100, 125, 200, 500, 1000)
FULL_MS = (5, 10, 20, 50, 80, 100, 125, 160, 200, 500, 1000, 2000, 5000)


def _program(hlo_text: str) -> str:
    """Optimized HLO without source locations (tables, ``metadata={...}``, stack frame ids)."""
    keep, skipping = [], False
    for line in hlo_text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            skipping = True
        elif skipping and not line.strip():
            skipping = False
        elif not skipping:
            keep.append(re.sub(r",? ?(metadata=\{[^}]*\}|stack_frame_id=\d+)", "", line))
    return "\n".join(keep)


def _auto_program_is(n: int, m: int, dtype: str) -> str | None:
    """Which fixed mode's optimized HLO the auto Jacobian's is identical to, if any."""

    def text(mode):
        fn = lambda A, x: admodes.jacobian(lambda x: A @ x, x, mode=mode)  # noqa: E731
        args = jnp.zeros((m, n), dtype), jnp.zeros(n, dtype)
        return _program(jax.jit(fn).lower(*args).compile().as_text())

    auto = text("auto")
    return next((name for name, mode in MODES if text(mode) == auto), None)


MODES = (("jacfwd", "forward"), ("jacrev", "reverse"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="coarser grid, fewer rounds (< 2 minutes)"
    )
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--ms", type=int, nargs="+", default=None)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--multithread", action="store_true", help="keep XLA's Eigen thread pool")
    parser.add_argument("--no-mlp", action="store_true")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="process CPU time (default when single-threaded) or wall time (default with --multithread)",
    )
    parser.add_argument(
        "--min-sample",
        type=float,
        default=0.02,
        help="seconds of back-to-back calls per timed sample (µs-scale programs need many calls)",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (21 if args.quick else 41)
    ms = tuple(args.ms) if args.ms else (QUICK_MS if args.quick else FULL_MS)
    n = args.n
    clock = args.clock or ("wall" if args.multithread else "cpu")
    emit(environment(threads="multi" if args.multithread else "single", clock=clock))

    c = admodes.crossover(
        n,
        ms,
        key=jax.random.key(0),
        repeats=repeats,
        dtype=args.dtype,
        min_sample_s=args.min_sample,
        clock=clock,
    )
    same = {m: _auto_program_is(n, m, args.dtype) for m in c.ms}
    for i, m in enumerate(c.ms):
        emit(
            {
                "bench": "jacobian_modes.point",
                "n": n,
                "m": m,
                "dtype": c.dtype,
                "median_s": {
                    "jacfwd": sig(c.forward_s[i]),
                    "jacrev": sig(c.reverse_s[i]),
                    "auto": sig(c.auto_s[i]),
                },
                "min_s": {
                    "jacfwd": sig(c.forward_min_s[i]),
                    "jacrev": sig(c.reverse_min_s[i]),
                    "auto": sig(c.auto_min_s[i]),
                },
                "flops": {
                    "jacfwd": c.forward_flops[i],
                    "jacrev": c.reverse_flops[i],
                    "auto": c.auto_flops[i],
                },
                "rev_over_fwd_time": sig(c.reverse_s[i] / c.forward_s[i], 3),
                "rev_over_fwd_flops": sig(c.reverse_flops[i] / c.forward_flops[i], 3),
                "auto_mode": c.auto_mode[i],
                "auto_hlo_identical_to": same[m],
                "auto_slowdown": sig(c.auto_slowdown[i], 3),
                "auto_slowdown_min": sig(
                    c.auto_min_s[i] / min(c.forward_min_s[i], c.reverse_min_s[i]), 3
                ),
                "repeats": repeats,
            }
        )
    worst = max(c.auto_slowdown)
    in_range = 0.5 * n <= c.m_star_time <= 2 * n  # False for nan
    emit(
        {
            "bench": "jacobian_modes.crossover",
            "n": n,
            "ms": list(c.ms),
            "dtype": c.dtype,
            "m_star_time": sig(c.m_star_time, 4),
            "m_star_flops": sig(c.m_star_flops, 4),
            "m_star_min_time": sig(admodes.crossing(c.ms, c.forward_min_s, c.reverse_min_s), 4),
            "goal_crossover": "0.5 n <= m*_time <= 2 n",
            "goal_crossover_met": bool(in_range),
            "auto_worst_slowdown": sig(worst, 3),
            "auto_same_program_as_chosen_mode_at_every_m": all(
                same[m] == ("jacfwd" if mode == "forward" else "jacrev")
                for m, mode in zip(c.ms, c.auto_mode, strict=True)
            ),
            "auto_worst_at_m": c.ms[c.auto_slowdown.index(worst)],
            "goal_auto": "auto <= 1.2 x the better fixed mode at every m (medians)",
            "goal_auto_met": bool(worst <= 1.2),
            "rev_over_fwd_at_largest_m": sig(c.reverse_s[-1] / c.forward_s[-1], 3),
        }
    )

    if not args.no_mlp:
        loss, params, data = admodes.mlp(jax.random.key(1), dtype=args.dtype)
        costs = admodes.costs(
            loss,
            params,
            *data,
            ops=("forward", "jvp", "vjp", "grad"),
            repeats=repeats,
            min_sample_s=2e-3,
            clock=clock,
        )
        grad = costs["grad"]
        emit(
            {
                "bench": "jacobian_modes.cheap_gradient",
                "model": "mlp",
                "widths": [256, 512, 512, 10],
                "batch": 256,
                "dtype": args.dtype,
                "num_params": sum(x.size for x in jax.tree.leaves(params)),
                "time_ratio": {op: sig(k.time_ratio, 3) for op, k in costs.items()},
                "flops_ratio": {op: sig(k.flops_ratio, 3) for op, k in costs.items()},
                "xla_flops_ratio": {
                    op: sig(k.xla_flops / costs["forward"].xla_flops, 3) for op, k in costs.items()
                },
                "median_s": {op: sig(k.run_s) for op, k in costs.items()},
                "min_s": {op: sig(k.min_s) for op, k in costs.items()},
                "compile_s": {op: sig(k.compile_s) for op, k in costs.items()},
                "goal": "grad / forward <= 5 in FLOPs (cheap gradient principle)",
                "goal_met": bool(grad.flops_ratio <= 5),
                "repeats": repeats,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
