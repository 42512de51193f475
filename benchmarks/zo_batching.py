"""Batching of zero-order queries: one ``grads.two_point`` step (vmapped, jitted) ÷ a Python loop of 2k calls.

Problem: least squares ``f(w) = ½‖Aw − b‖²`` (ANCHORS construction, ``A ∈ R^{2d×d}``), ``d = 1000``, at a
random point. One 2-point estimate with ``k = 64`` sphere directions:

- ``two_point[vmap]``: ``jax.jit`` of ``grads.two_point(num_directions=64)`` (the ``2k`` evaluations are
  one vmapped batch: a matrix–matrix product).
- ``python_loop``: the directions drawn by one jitted call, then a Python loop of ``2k`` calls of a jitted
  ``f(x + s·μ·v)``, then one jitted combination ``(d/k) Σ c_i v_i`` (what a user without ``vmap`` writes).
- ``two_point[lean]`` and ``two_point[lean,batch=8]``: the MeZO mode (directions regenerated from the key in
  a ``lax.scan``, 1 or 8 at a time), and ``two_point[batch=8]`` (non-lean ``lax.map`` in chunks of 8).

Timings are interleaved (median of ``--repeats`` rounds), compile time reported apart. Memory: compiled
``temp_size_in_bytes`` (+ ``output_size_in_bytes``) from ``memory_analysis()`` of each jitted variant (the
matrix ``A`` is an argument, not a temporary). Output: one JSON line with ``speedup`` =
median(python_loop) ÷ median(two_point[vmap]) (goal ≥ 10), the lean times and temp memory vs non-lean.
"""

from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (x64 on)
import jax
import jax.numpy as jnp
import numpy as np
from _common import compile_timed, emit, environment, interleaved, sig, summarize

from gradlab import grads, samplers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (< 2 minutes)")
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 21)
    d, k = args.dim, args.k
    emit(environment())

    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((2 * d, d)) / np.sqrt(2 * d))
    b = A @ jnp.asarray(rng.standard_normal(d)) + 0.1 * jnp.asarray(rng.standard_normal(2 * d))
    x = jnp.asarray(rng.standard_normal(d))
    key = jax.random.key(1)

    def loss(w, A, b):
        r = A @ w - b
        return 0.5 * jnp.dot(r, r)

    def strategy_fn(**opts):
        s = grads.two_point(num_directions=k, distribution="sphere", **opts)

        def one_step(x, A, b, key):
            return s(lambda w: loss(w, A, b), x, key).grad

        return one_step

    variants = {
        "two_point[vmap]": strategy_fn(),
        "two_point[batch=8]": strategy_fn(batch_size=8),
        "two_point[lean]": strategy_fn(lean=True),
        "two_point[lean,batch=8]": strategy_fn(lean=True, batch_size=8),
    }
    compiled, compile_s, memory = {}, {}, {}
    for name, fn in variants.items():
        compiled[name], compile_s[name] = compile_timed(fn, x, A, b, key)
        ma = compiled[name].memory_analysis()
        memory[name] = {
            "temp_bytes": int(ma.temp_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes),
        }

    # The Python-loop baseline: same directions, same smoothing μ as grads.two_point.
    sampler = samplers.make("sphere", x, num=k)
    draw, compile_s["python_loop.draw"] = compile_timed(sampler, key)
    f_at, compile_s["python_loop.f"] = compile_timed(
        lambda x, v, t, A, b: loss(x + t * v, A, b), x, x, jnp.float64(1.0), A, b
    )
    combine, compile_s["python_loop.combine"] = compile_timed(
        lambda fp, fm, V, mu: (d / k) * (((fp - fm) / (2 * mu)) @ V),
        jnp.zeros(k),
        jnp.zeros(k),
        jnp.zeros((k, d)),
        jnp.float64(1.0),
    )
    mu = jnp.float64(np.finfo(np.float64).eps ** (1 / 3) * max(1.0, float(jnp.max(jnp.abs(x)))))

    def python_loop():
        V = draw(key)
        fp = [f_at(x, V[i], mu, A, b) for i in range(k)]
        fm = [f_at(x, V[i], -mu, A, b) for i in range(k)]
        return combine(jnp.stack(fp), jnp.stack(fm), V, mu)

    ref = compiled["two_point[vmap]"](x, A, b, key)
    agree = {
        name: sig(float(jnp.linalg.norm(c(x, A, b, key) - ref) / jnp.linalg.norm(ref)), 3)
        for name, c in compiled.items()
    }
    agree["python_loop"] = sig(
        float(jnp.linalg.norm(python_loop() - ref) / jnp.linalg.norm(ref)), 3
    )

    calls = {name: (lambda c=c: c(x, A, b, key)) for name, c in compiled.items()}
    calls["python_loop"] = python_loop
    summary = summarize(interleaved(calls, repeats=repeats))
    med = summary["median_s"]
    base_mem = memory["two_point[vmap]"]["temp_bytes"]
    emit(
        {
            "bench": "zo_batching",
            "problem": "least_squares",
            "d": d,
            "k": k,
            "fun_evals_per_step": 2 * k,
            "speedup": sig(med["python_loop"] / med["two_point[vmap]"], 3),
            "goal": "speedup >= 10",
            "goal_met": med["python_loop"] / med["two_point[vmap]"] >= 10,
            "time_vs_vmap": {n: sig(t / med["two_point[vmap]"], 3) for n, t in med.items()},
            "lean_time_ratio": sig(med["two_point[lean]"] / med["two_point[vmap]"], 3),
            "lean_temp_bytes": memory["two_point[lean]"]["temp_bytes"],
            "nonlean_temp_bytes": base_mem,
            "temp_ratio_vs_vmap": {
                n: sig(m["temp_bytes"] / base_mem, 3) if base_mem else None
                for n, m in memory.items()
            },
            "memory": memory,
            **summary,
            "compile_s": {n: sig(t) for n, t in compile_s.items()},
            "rel_diff_vs_vmap": agree,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
