"""Benchmark gradlab.rules against the JAX functions they replace, side by side in one process.

Run ``python benchmarks/rules.py`` (or ``make bench``); ``--quick`` uses small sizes and few repeats
(< 60 s on 2 CPU cores). Output: one JSON line per comparison, with the environment on the first line.

Timing: each variant is compiled first (``jax.jit(f).lower(*args).compile()``; the compile time is
reported separately), called once to warm up, then timed for ``--repeats`` rounds with
``block_until_ready``; the variants are interleaved round by round so that a change of machine load
affects them alike. We report the median and the minimum per call, and their ratios to gradlab's rule.

Accuracy of the linear solve (float64): ``A = U diag(s) Vᵀ`` with ``U, V`` signed permutations of a
normalised Hadamard matrix (entries ±2⁻³ for n = 64: exactly orthogonal in floating point) and ``s``
powers of two, so that ``A``, ``b = U (s ∘ c)`` and the solution ``x = V c`` (``c`` small integers) are
exact floating-point numbers, and so are the true gradients of ``L(x) = ⟨w, x⟩`` (``w`` small
integers): ``b̄ = A⁻ᵀ w = U diag(1/s) Vᵀ w`` and ``Ā = −b̄ xᵀ`` (one rounding). No extended precision is
needed for the reference. We report the relative forward errors of ``x``, ``b̄`` and ``Ā`` and the normwise
backward errors ``‖A x̂ − b‖/(‖A‖‖x̂‖)`` and ``‖Aᵀ b̄ − w‖/(‖A‖‖b̄‖)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gradlab import rules  # noqa: E402

SOLVERS: dict[str, Callable] = {
    "rules.solve": rules.solve,
    "jnp.linalg.solve": jnp.linalg.solve,
    "inv(A) @ b": lambda A, b: jnp.linalg.inv(A) @ b,
}


# --------------------------------------------------------------------------------------------------
# timing


def compare_times(
    variants: Mapping[str, Callable], args: tuple, *, repeats: int, baseline: str
) -> dict:
    """Compile each variant, warm it up, then time the variants round-robin; medians and ratios.

    One sample is ``number`` back-to-back calls (calibrated so that a sample takes ≥ 5 ms, as timeit
    does), divided by ``number``. We report the median and the minimum per call: on a shared machine
    the minimum is the better estimate of the cost, the median of what one sees.
    """
    compiled, compile_s, number = {}, {}, {}
    for name, fn in variants.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        compile_s[name] = time.perf_counter() - start
        jax.block_until_ready(compiled[name](*args))  # warm-up call, not timed
        start = time.perf_counter()
        jax.block_until_ready(compiled[name](*args))
        number[name] = max(1, min(1000, math.ceil(5e-3 / (time.perf_counter() - start))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in compiled.items():
            start = time.perf_counter()
            for _ in range(number[name]):
                out = call(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / number[name])
    median = {name: statistics.median(ts) for name, ts in samples.items()}
    best = {name: min(ts) for name, ts in samples.items()}
    return {
        "median_s": _round(median),
        "min_s": _round(best),
        "compile_s": _round(compile_s),
        f"median_ratio_vs_{baseline}": {
            n: round(t / median[baseline], 3) for n, t in median.items()
        },
        f"min_ratio_vs_{baseline}": {n: round(t / best[baseline], 3) for n, t in best.items()},
        "repeats": repeats,
        "calls_per_sample": number,
    }


def _round(d: Mapping[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.4g}") for k, v in d.items()}


# --------------------------------------------------------------------------------------------------
# (a) solve: value + gradient time, and accuracy on an exactly known system


def _value_and_grad_of(solver: Callable) -> Callable:
    def loss(A, b):
        return jnp.sum(jnp.sin(solver(A, b)))

    return jax.value_and_grad(loss, argnums=(0, 1))


def bench_solve_time(n: int, k: int | None, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((n, n)) + n**0.5 * np.eye(n))
    b = jnp.asarray(rng.standard_normal((n,) if k is None else (n, k)))
    variants = {name: _value_and_grad_of(s) for name, s in SOLVERS.items()}
    out = compare_times(variants, (A, b), repeats=repeats, baseline="rules.solve")
    return {"bench": "solve_value_and_grad_time", "n": n, "k": k or 1, **out}


def _hadamard(n: int) -> np.ndarray:
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def _exact_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A signed row permutation of H/√n; exactly orthogonal in floating point when n is a power of 4."""
    signs = rng.choice([-1.0, 1.0], size=n)[:, None]
    return signs * (_hadamard(n) / np.sqrt(n))[rng.permutation(n)]


def exact_system(cond_log2: int, n: int = 64, seed: int = 0):
    """A, b, w and the exact x, b̄ = A⁻ᵀw, Ā = −b̄xᵀ (see the module docstring)."""
    rng = np.random.default_rng(seed)
    U, V = _exact_orthogonal(rng, n), _exact_orthogonal(rng, n)
    assert np.array_equal(U @ U.T, np.eye(n)) and np.array_equal(V @ V.T, np.eye(n))
    s = 2.0 ** -np.round(np.linspace(0.0, cond_log2, n))
    c = rng.integers(-3, 4, size=n).astype(np.float64)
    w = rng.integers(-3, 4, size=n).astype(np.float64)
    A = (U * s[None, :]) @ V.T
    b = U @ (s * c)
    x = V @ c
    b_bar = U @ ((V.T @ w) / s)
    return A, b, w, {"x": x, "b_bar": b_bar, "A_bar": -np.outer(b_bar, x)}


def _solution_and_gradients(solver: Callable) -> Callable:
    """(A, b, w) ↦ (x, ∇_{A,b} ⟨w, x⟩), compiled once per solver and reused for every condition."""

    def run(A, b, w):
        grads = jax.grad(lambda A, b: jnp.vdot(w, solver(A, b)), argnums=(0, 1))(A, b)
        return solver(A, b), grads

    return jax.jit(run)


_ACCURACY_RUNS = {name: _solution_and_gradients(solver) for name, solver in SOLVERS.items()}


def bench_solve_accuracy(cond_log2: int) -> dict:
    A, b, w, exact = exact_system(cond_log2)
    norm_A = np.linalg.norm(A, 2)
    result: dict = {
        "bench": "solve_accuracy",
        "n": A.shape[0],
        "cond": float(f"{np.linalg.cond(A):.3g}"),
    }
    metrics: dict[str, dict[str, float]] = {
        "x_rel_err": {},
        "grad_b_rel_err": {},
        "grad_A_rel_err": {},
        "x_backward_err": {},
        "grad_b_backward_err": {},
    }
    for name in SOLVERS:
        x, (A_bar, b_bar) = jax.tree.map(np.asarray, _ACCURACY_RUNS[name](A, b, w))
        metrics["x_rel_err"][name] = _rel(x, exact["x"])
        metrics["grad_b_rel_err"][name] = _rel(b_bar, exact["b_bar"])
        metrics["grad_A_rel_err"][name] = _rel(A_bar, exact["A_bar"])
        metrics["x_backward_err"][name] = float(
            np.linalg.norm(A @ x - b) / (norm_A * np.linalg.norm(x))
        )
        metrics["grad_b_backward_err"][name] = float(
            np.linalg.norm(A.T @ b_bar - w) / (norm_A * np.linalg.norm(b_bar))
        )
    for key, values in metrics.items():
        result[key] = {k: float(f"{v:.3g}") for k, v in values.items()}
    base = metrics["x_backward_err"]["rules.solve"]
    result["x_backward_err_ratio_vs_rules.solve"] = {
        k: float(f"{v / base:.3g}") for k, v in metrics["x_backward_err"].items()
    }
    return result


def _rel(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(got - exact) / np.linalg.norm(exact))


# --------------------------------------------------------------------------------------------------
# (b) singular values, (c) sigmoid


def bench_singular_values(m: int, n: int, repeats: int) -> dict:
    W = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)))

    def grad_of(svals):
        return jax.grad(lambda W: jnp.sum(jnp.sqrt(svals(W))))

    variants = {
        "rules.singular_values": grad_of(rules.singular_values),
        "jnp.linalg.svd(compute_uv=False)": grad_of(lambda W: jnp.linalg.svd(W, compute_uv=False)),
    }
    out = compare_times(variants, (W,), repeats=repeats, baseline="rules.singular_values")
    return {"bench": "singular_values_grad_time", "m": m, "n": n, **out}


def bench_sigmoid(size: int, repeats: int) -> dict:
    x = jnp.asarray(4.0 * np.random.default_rng(2).standard_normal(size))

    def grad_of(sig):
        return jax.grad(lambda x: jnp.sum(sig(x) ** 2))

    variants = {"rules.sigmoid": grad_of(rules.sigmoid), "jax.nn.sigmoid": grad_of(jax.nn.sigmoid)}
    out = compare_times(variants, (x,), repeats=repeats, baseline="rules.sigmoid")
    return {"bench": "sigmoid_grad_time", "size": size, **out}


# --------------------------------------------------------------------------------------------------


def environment() -> dict:
    return {
        "bench": "environment",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 60 s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    parser.add_argument(
        "--single-thread",
        action="store_true",
        help="run XLA's CPU kernels on one thread (steadier timings on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.single_thread:  # read when the CPU backend starts, i.e. at the first computation
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        ).strip()
    repeats = args.repeats or (9 if args.quick else 25)
    solve_sizes = (64, 256) if args.quick else (64, 256, 1024)
    svd_shapes = ((64, 32), (256, 128)) if args.quick else ((64, 32), (256, 128), (1024, 512))
    sigmoid_sizes = (10_000, 1_000_000) if args.quick else (10_000, 1_000_000, 10_000_000)

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)

    emit(environment())
    for cond_log2 in (7, 27, 40):  # cond ≈ 1.3e2, 1.3e8, 1.1e12
        emit(bench_solve_accuracy(cond_log2))
    for n in solve_sizes:
        emit(bench_solve_time(n, None, repeats))
    emit(bench_solve_time(solve_sizes[-1], 16, repeats))
    for m, n in svd_shapes:
        emit(bench_singular_values(m, n, repeats))
    for size in sigmoid_sizes:
        emit(bench_sigmoid(size, repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
