"""What the random directions cost a zero-order step on CPU: JAX's rolled Threefry vs gradlab's unrolled one.

JAX 0.10.2 lowers the ``threefry2x32`` hash (the default key) on CPU as a *rolled* loop of 5 iterations
(``jax/_src/random/threefry2x32.py``; upstream unrolled it in jax-ml/jax#37872, not in 0.10.2): on XLA's
CPU thunk runtime every iteration pays a fixed cost and the loop blocks fusion, so a draw of a few hundred
numbers costs microseconds — more than a small problem's whole gradient. gradlab's samplers and descent
loop draw Threefry keys through ``gradlab._prng`` (the same hash unrolled into elementwise ``uint32``
arithmetic, bit-identical). This script measures, side by side in one process:

- ``draw``: ``samplers.sphere(x, num=k)(fold_in(key, t))`` summed over its ``k`` rows, inside a
  ``lax.scan`` of ``--steps`` steps: ``[unrolled]`` as gradlab runs it, ``[rolled]`` the same code traced
  with ``gradlab._prng`` switched off (JAX's own lowering), ``[rbg]`` with a ``jax.random.key(0,
  impl="rbg")`` key; beside one exact gradient step of the same least-squares problem (``f = ½‖Aw − b‖²``,
  ``A ∈ R^{2d×d}``) in the same scan;
- ``descent``: ``descent.run(f, 0, grads.two_point(num_directions=k), optax.sgd(...))`` per step, the
  same three ways (``[rolled]`` compiled with ``gradlab._prng`` switched off).

Output: one JSON line per ``(d, k)`` with microseconds per step (median over interleaved rounds; compile
time excluded), the speedups rolled ÷ unrolled, and ``bit_identical`` (the rolled and unrolled runs'
losses are equal bit for bit). ``--quick``: two sizes, fewer rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import _common  # noqa: F401  (x64 on)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import emit, environment, interleaved, sig

from gradlab import _prng, descent, grads, samplers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="two sizes, fewer rounds (< 2 minutes)"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    sizes = (
        [(20, 1), (100, 8)] if args.quick else [(20, 1), (100, 1), (100, 8), (1000, 1), (1000, 8)]
    )
    n = args.steps
    emit(environment())

    for d, k in sizes:
        rng = np.random.default_rng(0)
        A = jnp.asarray(rng.standard_normal((2 * d, d)) / np.sqrt(2 * d))
        b = jnp.asarray(rng.standard_normal(2 * d))
        x0 = jnp.zeros(d)
        sphere = samplers.sphere(x0, num=k)

        def f(w, A=A, b=b):
            r = A @ w - b
            return 0.5 * jnp.dot(r, r)

        def scan(body, x0=x0):
            """A jitted ``lax.scan`` of ``n`` steps of ``body(c, key_t)`` (a fresh function: its own trace)."""

            def run(root):
                def step(c, t):
                    return body(c, _prng.fold_in(root, t)), None

                return jax.lax.scan(step, x0, jnp.arange(n))[0]

            return jax.jit(run)

        opt = optax.sgd(0.1 / d)
        fry, rbg = jax.random.key(0), jax.random.key(0, impl="rbg")
        compile_s, calls = {}, {}
        variants = {"unrolled": (fry, False), "rolled": (fry, True), "rbg": (rbg, False)}
        for name, (key, rolled) in variants.items():
            strategy = grads.two_point(num_directions=k)  # its own executable per variant
            with _prng.switched_off() if rolled else contextlib.nullcontext():
                draw = scan(lambda c, key, s=sphere: c + s(key).sum(axis=0))
                compiled = draw.lower(key).compile()
                h = descent.run(f, x0, strategy, opt, key=key, num_steps=n)
            compile_s[f"descent[{name}]"] = sig(h.compile_time)
            calls[f"draw[{name}]"] = lambda c=compiled, key=key: c(key)
            calls[f"descent[{name}]"] = lambda s=strategy, key=key, x0=x0, opt=opt: (
                descent.run(f, x0, s, opt, key=key, num_steps=n).loss
            )
        exact = scan(lambda c, key, f=f: c - 1e-3 * jax.grad(f)(c)).lower(fry).compile()
        calls["exact_grad_step"] = lambda exact=exact, fry=fry: exact(fry)
        same = bool(np.array_equal(calls["descent[rolled]"](), calls["descent[unrolled]"]()))
        same = same and bool(np.array_equal(calls["draw[rolled]"](), calls["draw[unrolled]"]()))
        samples = interleaved(calls, repeats=repeats)
        us = {name: sig(statistics.median(v) / n * 1e6, 3) for name, v in samples.items()}
        emit(
            {
                "bench": "prng_cost",
                "d": d,
                "k": k,
                "steps": n,
                "us_per_step_median": us,
                "draw_rolled_over_unrolled": sig(us["draw[rolled]"] / us["draw[unrolled]"], 3),
                "descent_rolled_over_unrolled": sig(
                    us["descent[rolled]"] / us["descent[unrolled]"], 3
                ),
                "bit_identical": same,
                "compile_s": compile_s,
                "repeats": repeats,
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
