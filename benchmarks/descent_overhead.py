"""Overhead of the descent engine: exact-gradient GD through ``descent.run`` ÷ a hand-written jitted loop.

Problem (ANCHORS.md): least squares ``f(w) = ½‖Aw − b‖²``, ``A ∈ R^{2d×d}``, ``A_ij ~ N(0, 1/(2d))``,
``b = A w_true + 0.1 z``, ``w0 = 0``, ``d = 100``; 1000 steps of gradient descent with step ``1/L``
(``L = σ_max(A)²``), no tolerance (all 1000 steps run).

Variants, run side by side in one process and timed round-robin (median of ``--repeats`` rounds):

- ``descent.run``: ``descent.run(f, w0, grads.exact(), optax.sgd(1/L), num_steps=1000)`` with its
  defaults (one executable: the start and one ``lax.while_loop`` segment; the loss recorded at every step
  from the exact strategy's value), timed as the whole Python call (executables cached after the first
  call; its ``compile_time`` is reported).
- ``descent.run[unroll=8]``: blocks of 8 steps per loop iteration (one buffer write and stop test per block).
- ``descent.run[monitor_every=10]`` (and ``,unroll=20``): the loss recorded and the stop tested every 10
  steps; the other losses are never computed (dead code for ``value_and_grad``).
- ``descent.run[monitor_every=1000]``: nothing recorded but the last step's loss (like for like with
  ``hand``, which records nothing): the engine's own overhead (dispatch, History, the stop machinery).
- ``hand``: ``jax.jit`` of a ``lax.scan`` of ``x ← x − jax.grad(f)(x)/L`` (the baseline of the ratio).
- ``hand+optax``: the same loop with the ``optax.sgd(1/L)`` update instead of the hand-written one.
- ``hand+loss``: the hand loop that also records ``f(x_{k+1})`` at every step (what ``descent.run``
  monitors: one extra forward pass per step).
- ``hand+loss+cond``: ``hand+loss`` with the engine's per-step ``lax.cond(active, step, identity)`` and
  stop flag (isolates the cost of gating every step).
- ``hand+loss_from_value``: records ``f(x_k)`` from ``jax.value_and_grad`` (free: the forward pass of the
  gradient), i.e. what the engine does for strategies whose ``value`` is exact.
- ``hand[engine options]``, ``hand+loss_from_value[engine options]``: the same two loops compiled with
  the XLA options ``descent.run`` compiles its own loop with (``descent._compiler_options()``; on the
  CPU copy insertion with region analysis): the floor of a loop that records the loss, on equal terms.

Output: one JSON line with compile times (separate), median/min per run, and ``ratio`` =
median(``descent.run``) ÷ median(``hand``) (goal ≤ 1.10), ``like_for_like_ratio`` (the same for
``monitor_every=1000``), plus the ratios of every variant.
``--quick``: fewer rounds (< 2 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common  # noqa: F401  (switches x64 on before anything else touches JAX)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import compile_timed, emit, environment, interleaved, sig, summarize
from jax import lax

from gradlab import descent, grads


def least_squares(d: int, seed: int):
    """ANCHORS construction (NumPy generator ``seed``): returns ``(f, A, b, L, f_star)``."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((2 * d, d)) / np.sqrt(2 * d)
    b = A @ rng.standard_normal(d) + 0.1 * rng.standard_normal(2 * d)
    w_star = np.linalg.lstsq(A, b, rcond=None)[0]
    f_star = 0.5 * float(np.sum((A @ w_star - b) ** 2))
    L = float(np.linalg.norm(A, 2) ** 2)
    A_j, b_j = jnp.asarray(A), jnp.asarray(b)

    def f(w):
        r = A_j @ w - b_j
        return 0.5 * jnp.dot(r, r)

    return f, A_j, b_j, L, f_star


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds (< 2 minutes)")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (7 if args.quick else 31)
    d, n = args.dim, args.steps
    emit(environment())

    f, _A, _b, L, _f_star = least_squares(d, seed=0)
    lr = 1.0 / L
    w0 = jnp.zeros(d)
    g = jax.grad(f)
    opt = optax.sgd(lr)
    strat = grads.exact()

    def hand(w):
        def body(w, _):
            return w - lr * g(w), None

        return lax.scan(body, w, None, length=n)[0]

    def hand_optax(w):
        def body(c, _):
            w, s = c
            u, s = opt.update(g(w), s, w)
            return (optax.apply_updates(w, u), s), None

        return lax.scan(body, (w, opt.init(w)), None, length=n)[0][0]

    def hand_loss(w):
        def body(w, _):
            w = w - lr * g(w)
            return w, f(w)

        return lax.scan(body, w, None, length=n)

    def hand_loss_from_value(w):
        def body(w, _):
            v, gw = jax.value_and_grad(f)(w)
            return w - lr * gw, v

        w, losses = lax.scan(body, w, None, length=n)
        return w, jnp.append(losses, f(w))  # f(x_n) for the last point: one extra pass per run

    def hand_loss_cond(w):
        # the engine's per-step shape: lax.cond(active, step, identity), a stop flag, the loss recorded
        def step(c):
            w, _, _ = c
            w = w - lr * g(w)
            v = f(w)
            return w, v, v <= -1.0  # never true: a stand-in for the tolerance check

        def body(c, i):
            active = jnp.logical_and(~c[2], i < n)
            c = lax.cond(active, step, lambda c: c, c)
            return c, (c[1], active)

        return lax.scan(body, (w, f(w), jnp.zeros((), bool)), jnp.arange(n))

    def hand_unrolled(w):  # the same loop, 8 steps per loop iteration (XLA:GPU pays per iteration)
        def body(w, _):
            return w - lr * g(w), None

        return lax.scan(body, w, None, length=n, unroll=8)[0]

    compiled, compile_s = {}, {}
    for name, fn in {
        "hand": hand,
        "hand[unroll=8]": hand_unrolled,
        "hand+optax": hand_optax,
        "hand+loss": hand_loss,
        "hand+loss_from_value": hand_loss_from_value,
        "hand+loss+cond": hand_loss_cond,
    }.items():
        compiled[name], compile_s[name] = compile_timed(fn, w0)
    # the same loops compiled with the engine's XLA options (descent._compiler_options: on the CPU,
    # copy insertion with region analysis): what a hand-written loop costs under equal terms
    engine_options = descent._compiler_options()
    for name, fn in {"hand": hand, "hand+loss_from_value": hand_loss_from_value}.items():
        name = f"{name}[engine options]"
        compiled[name], compile_s[name] = compile_timed(fn, w0, options=engine_options)

    # descent.run compiles on its first call (cached afterwards): that call's compile_time is reported.
    engines = {
        "descent.run": {},  # unroll: 1 on the CPU backend, 8 elsewhere
        "descent.run[unroll=1]": {"unroll": 1},
        "descent.run[unroll=8]": {"unroll": 8},
        "descent.run[unroll=16]": {"unroll": 16},
        "descent.run[monitor_every=10]": {"monitor_every": 10},
        "descent.run[monitor_every=10,unroll=20]": {"monitor_every": 10, "unroll": 20},
        # like for like with `hand`, which records nothing: the loss and stop test at the last step only
        "descent.run[monitor_every=1000]": {"monitor_every": n},
    }

    key = jax.random.key(0)  # built once, as w0 is (creating a key costs ≈ 60 µs, 2% of a run)

    def run_engine(options):
        return descent.run(f, w0, strat, opt, key=key, num_steps=n, **options)

    engine_internal_run_s: dict[str, list[float]] = {name: [] for name in engines}
    for name, options in engines.items():
        t0 = time.perf_counter()
        h = run_engine(options)
        compile_s[name] = h.compile_time
        compile_s[name + " (first call, total)"] = time.perf_counter() - t0

    # Correctness: the engine and the hand loop reach the same point.
    w_hand = compiled["hand"](w0)
    max_diff = max(
        float(jnp.max(jnp.abs(w_hand - run_engine(options).params))) for options in engines.values()
    )

    def engine_call(name, options):
        def call():
            h = run_engine(options)
            engine_internal_run_s[name].append(h.run_time)
            return h.params

        return call

    calls = {
        **{name: engine_call(name, options) for name, options in engines.items()},
        **{name: (lambda c=c: c(w0)) for name, c in compiled.items()},
    }
    samples = interleaved(calls, repeats=repeats, min_sample_s=0.0)
    summary = summarize(samples)
    med = summary["median_s"]
    emit(
        {
            "bench": "descent_overhead",
            "problem": "least_squares",
            "d": d,
            "steps": n,
            "optimizer": "optax.sgd(1/L)",
            "ratio": sig(med["descent.run"] / med["hand"], 3),
            "goal": "ratio <= 1.10",
            "goal_met": med["descent.run"] / med["hand"] <= 1.10,
            "like_for_like_ratio": sig(med["descent.run[monitor_every=1000]"] / med["hand"], 3),
            "like_for_like_goal_met": med["descent.run[monitor_every=1000]"] / med["hand"] <= 1.10,
            "ratio_vs_hand": {k: sig(v / med["hand"], 3) for k, v in med.items()},
            "min_ratio_vs_hand": {
                k: sig(v / summary["min_s"]["hand"], 3) for k, v in summary["min_s"].items()
            },
            "engine_internal_run_time_median_s": {
                k: sig(statistics.median(v)) for k, v in engine_internal_run_s.items() if v
            },
            **summary,
            "compile_s": {k: sig(v) for k, v in compile_s.items()},
            "max_abs_diff_engine_vs_hand": max_diff,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
