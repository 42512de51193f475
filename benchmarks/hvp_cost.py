"""HVP cost in gradients: each ``curvature.hvp`` mode, and 100 products through ``hvp_operator`` + chunks.

Loss: a tanh MLP ``784 → 128 → 10`` (≈ 101k parameters, a dict pytree), softmax cross-entropy, batch 256.
Timed side by side in one process (interleaved rounds, median; compile time apart, ``_common``):

- ``grad``: ``jax.grad(loss)``; ``hvp[mode]``: one :func:`gradlab.curvature.hvp` per mode.
- ``operator[100,batch=b]``: ``hvp_operator`` (one linearization) applied to 100 vectors with
  ``lax.map(batch_size=b)``, reported per HVP; ``vmap[100]``: ``jax.vmap`` of ``hvp`` over the 100.

Goals: ``hvp[mode] / grad ≤ 2.0`` for every mode; per-HVP ``operator / grad ≤ 1.5``. Temp memory from
``memory_analysis()``. Run with ``OPENBLAS_NUM_THREADS=1``. ``--quick``: fewer rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import _common  # noqa: F401  (x64 on)
import jax
import jax.numpy as jnp
from _common import compile_timed, emit, environment, interleaved, sig, summarize

from gradlab import curvature


def make_problem(batch: int = 256, din: int = 784, hidden: int = 128, dout: int = 10):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "W1": jax.random.normal(k[0], (din, hidden)) / jnp.sqrt(din),
        "b1": jnp.zeros(hidden),
        "W2": jax.random.normal(k[1], (hidden, dout)) / jnp.sqrt(hidden),
        "b2": jnp.zeros(dout),
    }
    X = jax.random.normal(k[2], (batch, din))
    y = jax.random.randint(k[3], (batch,), 0, dout)

    def loss(p, X, y):
        h = jnp.tanh(X @ p["W1"] + p["b1"])
        logits = h @ p["W2"] + p["b2"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return loss, params, X, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    emit(environment(openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS")))
    loss, p, X, y = make_problem()
    num_params = sum(t.size for t in jax.tree.leaves(p))
    V = jax.tree.map(lambda t: jax.random.normal(jax.random.key(5), (args.num, *t.shape)), p)
    v1 = jax.tree.map(lambda t: t[0], V)

    fns = {"grad": (lambda p, X, y, v, V: jax.grad(loss)(p, X, y))}
    for mode in curvature.HVP_MODES:
        fns[f"hvp[{mode}]"] = lambda p, X, y, v, V, mode=mode: curvature.hvp(
            lambda q: loss(q, X, y), p, v, mode=mode
        )
    for b in (1, 10):
        fns[f"operator[{args.num},batch={b}]"] = lambda p, X, y, v, V, b=b: jax.lax.map(
            curvature.hvp_operator(lambda q: loss(q, X, y), p), V, batch_size=b
        )
    fns[f"vmap[{args.num}]"] = lambda p, X, y, v, V: jax.vmap(
        lambda u: curvature.hvp(lambda q: loss(q, X, y), p, u)
    )(V)
    compiled, compile_s, temp = {}, {}, {}
    for name, fn in fns.items():
        compiled[name], compile_s[name] = compile_timed(fn, p, X, y, v1, V)
        temp[name] = int(compiled[name].memory_analysis().temp_size_in_bytes)
    calls = {name: (lambda c=c: c(p, X, y, v1, V)) for name, c in compiled.items()}
    summary = summarize(interleaved(calls, repeats=repeats))
    med = summary["median_s"]
    g = med["grad"]
    per_hvp = {
        n: sig(t / g / (args.num if ("operator" in n or "vmap" in n) else 1), 3)
        for n, t in med.items()
    }
    hvp_ok = all(per_hvp[f"hvp[{m}]"] <= 2.0 for m in curvature.HVP_MODES)
    op_best = min(v for n, v in per_hvp.items() if n.startswith("operator"))
    emit(
        {
            "bench": "hvp_cost",
            "num_params": num_params,
            "cost_in_gradients": per_hvp,
            "goal_hvp<=2.0_each_mode": hvp_ok,
            "goal_operator_per_hvp<=1.5": op_best <= 1.5,
            "temp_bytes": temp,
            **summary,
            "compile_s": {n: sig(t) for n, t in compile_s.items()},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
