"""Shared helpers for the benchmarks: environment line, JSON output, compile-then-time, interleaved timing.

Import this module *before* any other JAX work: it switches float64 on. Conventions (STYLE.md, item 12):
every timed callable is compiled first (``jax.jit(f).lower(*args).compile()``, reported as compile time),
called once to warm up, then timed with ``block_until_ready``; variants compared side by side are timed
round-robin (interleaved) so that a change of load on the shared machine affects them alike, and we report
the median (and the minimum) over rounds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

from gradlab.lab.runner import cpu_info  # noqa: E402  (after the x64 switch)


def environment(**extra: Any) -> dict:
    """The first JSON line of every benchmark: versions, backend, devices, CPU count, x64, load."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "bench": "environment",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "x64": bool(jax.config.jax_enable_x64),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "loadavg_1_5_15": load,
        **extra,
    }


def emit(line: dict) -> None:
    """Print one measurement as one JSON line (flushed, so partial runs keep their output)."""
    print(json.dumps(line, default=_jsonable), flush=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (for readable JSON)."""
    return float(f"{x:.{digits}g}")


def compile_timed(fn: Callable, *args: Any, options: dict | None = None) -> tuple[Any, float]:
    """``(compiled, seconds)`` for ``jax.jit(fn).lower(*args).compile(options)`` (``options``: XLA
    compiler options, e.g. the ones ``descent.run`` compiles with)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(options)
    return compiled, time.perf_counter() - start


def interleaved(
    calls: Mapping[str, Callable[[], Any]], *, repeats: int, min_sample_s: float = 5e-3
) -> dict[str, list[float]]:
    """Time zero-argument ``calls`` round-robin; per call seconds, one list of ``repeats`` samples each.

    Each call is warmed up once; one sample is ``number`` back-to-back calls (calibrated so a sample lasts
    ≥ ``min_sample_s``) divided by ``number``; results are ``block_until_ready``-ed. Every round visits the
    calls in a new order (a seeded shuffle, the same in every run): in a fixed order the call that opens
    each round follows the round's last one, and a few-millisecond call measured there came out ≈ 10%
    slower than the very same executable timed later in the round (``descent_overhead.py``: the default
    engine and ``unroll=1``, one cached executable, read 1.57 and 1.42).
    """
    number = {}
    for name, call in calls.items():
        jax.block_until_ready(call())  # warm-up, not timed
        start = time.perf_counter()
        jax.block_until_ready(call())
        number[name] = max(1, min(1000, math.ceil(min_sample_s / (time.perf_counter() - start))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            call = calls[name]
            start = time.perf_counter()
            for _ in range(number[name]):
                out = call()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / number[name])
    return samples


def summarize(samples: Mapping[str, list[float]]) -> dict:
    """Median and minimum seconds per variant."""
    return {
        "median_s": {k: sig(statistics.median(v)) for k, v in samples.items()},
        "min_s": {k: sig(min(v)) for k, v in samples.items()},
        "repeats": len(next(iter(samples.values()))),
    }
