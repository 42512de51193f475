"""AD modes: what forward and reverse mode cost, the Jacobian crossover, and a Jacobian that picks its mode.

For ``f: R^n → R^m`` with Jacobian ``J = ∂f/∂x ∈ R^{m×n}`` (pytrees count by their total number of
elements, ``n = Σ_leaves size(x)``, ``m = Σ_leaves size(f(x))``):

- **forward mode** pushes a tangent forward: one ``jvp`` gives ``J v`` (a column combination) at a small
  constant times the cost of ``f``; the full Jacobian (``jax.jacfwd``: ``vmap`` of ``jvp`` over the ``n``
  basis vectors) costs about ``n`` JVPs;
- **reverse mode** pulls a cotangent back: one ``vjp`` gives ``uᵀ J`` (a row combination), also a small
  constant times ``f`` but with the forward values kept on a tape; the full Jacobian (``jax.jacrev``: ``vmap``
  of the pullback over the ``m`` basis cotangents) costs about ``m`` VJPs.

So the Jacobian costs ``∝ n`` forward and ``∝ m`` reverse, and the cheaper mode is **forward when n ≤ m,
reverse when n > m**: :func:`jacobian` with ``mode="auto"`` applies that rule to the shapes (ties go to
forward mode, which keeps no tape). For ``f(x) = A x`` with ``A ∈ R^{m×n}`` the rule is exact in FLOPs —
``jacfwd`` computes ``A · I_n`` (``2mn²`` FLOPs) and ``jacrev`` computes ``I_m · A`` (``2m²n``), equal at
``m = n`` — and :func:`crossover` measures it: the seeds' figure with ``n = 100`` fixed and ``m`` varied
(measured crossover of run time ≈ 100 on CPU in float32 and float64, see ``benchmarks/jacobian_modes.py``).

**Cheap gradient principle.** For a scalar ``f`` (``m = 1``) reverse mode returns the whole gradient for a
small constant times the cost of ``f`` — at most about 4–5 in the operation-count model, ≈ 3 for dense
layers (one forward matmul, two backward ones) — however large ``n`` is (Griewank & Walther 2008, §4.6).
:func:`cheap_gradient_ratio` measures ``grad ÷ forward`` in time and FLOPs on a small MLP (:func:`mlp`).

:func:`costs` measures any of ``forward``, ``jvp``, ``vjp``, ``grad``, ``jacfwd``, ``jacrev`` and ``jacobian``
(auto) for a function at a point: compile time apart from run time, FLOPs counted from the compiled HLO
(:func:`gradlab.remat.hlo_flops`, through :func:`gradlab.remat.measure`) and ratios to the forward pass. Run
times are medians of rounds timed side by side (interleaved), so that a change of load on a shared machine
hits every operation alike.

>>> import jax, jax.numpy as jnp
>>> from gradlab import admodes
>>> A = jnp.arange(6.0).reshape(3, 2)                        # m = 3 outputs, n = 2 inputs
>>> f = lambda x: jnp.tanh(A @ x)
>>> x = jnp.array([0.1, -0.2])
>>> admodes.choose_mode(f, x), admodes.sizes(f, x)
('forward', (2, 3))
>>> J = admodes.jacobian(f, x)
>>> J.shape, bool(jnp.allclose(J, admodes.jacobian(f, x, mode="reverse")))
((3, 2), True)
>>> c = admodes.costs(lambda x: A @ x, x, ops=("jacfwd", "jacrev"), repeats=1)
>>> c["jacfwd"].dot_flops, c["jacrev"].dot_flops               # 2·m·n² vs 2·m²·n
(24.0, 36.0)

References:
  A. Griewank & A. Walther (2008), *Evaluating Derivatives: Principles and Techniques of Algorithmic
  Differentiation*, 2nd ed., SIAM, ch. 3 (forward and reverse modes, their complexity) and ch. 4 (the
  cheap gradient principle, §4.6).
  A. G. Baydin, B. A. Pearlmutter, A. A. Radul & J. M. Siskind (2018), "Automatic differentiation in machine
  learning: a survey", *JMLR* 18(153), §3.
  JAX documentation, "The Autodiff Cookbook" (jvp, vjp, jacfwd vs jacrev).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab._backend import platform
from gradlab._validate import (
    NotScalarError,
    OptionError,
    check_choice,
    check_key,
    check_positive,
    check_positive_int,
)
from gradlab.remat import measure

__all__ = [
    "MODES",
    "OPS",
    "CheapGradient",
    "Crossover",
    "OpCost",
    "cheap_gradient_ratio",
    "choose_mode",
    "costs",
    "crossing",
    "crossover",
    "jacobian",
    "mlp",
    "sizes",
]

MODES = ("auto", "forward", "reverse")
OPS = ("forward", "jvp", "vjp", "grad", "jacfwd", "jacrev", "jacobian")
DEFAULT_MS = (10, 20, 50, 80, 100, 125, 200, 500, 1000)

# ---------------------------------------------------------------------------------------------------------
# The Jacobian with a mode chosen from the shapes
# ---------------------------------------------------------------------------------------------------------


def _check_inexact(argument: str, x: Any) -> None:
    for i, leaf in enumerate(jax.tree.leaves(x)):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise OptionError(
                f"{argument}: differentiation needs real floating-point inputs; leaf {i} has dtype "
                f"{dtype}. Cast it, e.g. jnp.asarray(x, dtype=float)."
            )


def sizes(f: Callable, x: Any, /) -> tuple[int, int]:
    """``(n, m)``: the number of input and output elements of ``f`` at ``x`` (pytrees summed over leaves).

    Only shapes are traced (``jax.eval_shape``); nothing runs.

    >>> sizes(lambda p: {"y": p["a"] @ p["b"]}, {"a": jnp.ones((4, 3)), "b": jnp.ones(3)})
    (15, 4)

    Reference: Griewank & Walther (2008), *Evaluating Derivatives*, ch. 3 (the cost of a Jacobian
    grows with ``n`` in forward mode and with ``m`` in reverse mode).
    """
    n = sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(x))
    out = jax.eval_shape(f, x)
    m = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(out))
    return int(n), int(m)


def choose_mode(f: Callable, x: Any, /) -> str:
    """The mode ``jacobian(f, x, mode="auto")`` uses: ``"forward"`` if ``n ≤ m``, else ``"reverse"``.

    ``n`` and ``m`` are the input and output sizes (:func:`sizes`). ``jacfwd`` costs about ``n`` JVPs and
    ``jacrev`` about ``m`` VJPs of similar unit cost, so the smaller of ``n`` and ``m`` wins; a tie goes to
    forward mode (no tape to store). On ``f(x) = A x`` the measured crossover of run time is ``m* ≈ n``
    (``benchmarks/jacobian_modes.py``), so the rule needs no calibration constant.

    >>> choose_mode(jnp.sum, jnp.ones(5)), choose_mode(lambda x: jnp.outer(x, x), jnp.ones(5))
    ('reverse', 'forward')

    Reference: Griewank & Walther (2008), *Evaluating Derivatives*, ch. 3; Baydin et al. (2018),
    *JMLR* 18(153), §3; Merkulov's lecture, "Choose your fighter" (which mode for which Jacobian).
    """
    n, m = sizes(f, x)
    return "forward" if n <= m else "reverse"


def jacobian(f: Callable, x: Any, /, *, mode: str = "auto") -> Any:
    """The Jacobian ``∂f/∂x`` at ``x`` by forward mode (``jax.jacfwd``), reverse mode (``jax.jacrev``) or
    ``mode="auto"``: forward if the input size ``n`` ≤ the output size ``m``, reverse otherwise
    (:func:`choose_mode`).

    Shapes: for an array ``x`` of shape ``S_in`` and output of shape ``S_out`` the result has shape
    ``S_out + S_in`` (``(m, n)`` for vectors). For pytrees, as JAX returns it: the output's structure with,
    at each output leaf, the input's structure of blocks ``out_leaf.shape + in_leaf.shape`` — the same for
    both modes. The choice is made from static shapes, so ``jacobian`` composes with ``jax.jit`` and
    ``jax.vmap``.

    >>> f = lambda p: {"y": p["w"] * p["s"]}
    >>> J = jacobian(f, {"w": jnp.arange(3.0), "s": jnp.float64(2.0)})
    >>> J["y"]["w"].shape, J["y"]["s"].shape
    ((3, 3), (3,))
    >>> jacobian(f, {"w": jnp.arange(3.0), "s": jnp.float64(2.0)}, mode="backward")
    Traceback (most recent call last):
    ...
    gradlab._validate.UnknownNameError: mode: unknown name 'backward'; expected one of [...]...

    Reference: JAX documentation, "The Autodiff Cookbook" (``jacfwd`` vs ``jacrev``); Griewank &
    Walther (2008), *Evaluating Derivatives*, ch. 3.
    """
    check_choice("mode", mode, MODES)
    _check_inexact("x", x)
    if mode == "auto":
        mode = choose_mode(f, x)
    jac = jax.jacfwd if mode == "forward" else jax.jacrev
    return jac(f)(x)


# ---------------------------------------------------------------------------------------------------------
# Cost measurement
# ---------------------------------------------------------------------------------------------------------


class OpCost(NamedTuple):
    """What one AD operation costs at one point.

    ``run_s`` is the median and ``min_s`` the minimum of ``repeats`` interleaved rounds (seconds per call);
    ``compile_s`` is apart. ``flops`` counts the compiled HLO with loop trip counts
    (:func:`gradlab.remat.hlo_flops`; ``dot_flops`` its matmul part, ``xla_flops`` XLA's own
    ``cost_analysis``); ``memory_bytes`` = compiled temp + output bytes. ``time_ratio`` and ``flops_ratio``
    are ÷ the ``forward`` operation measured in the same call (``None`` when timing was off).
    ``uncounted`` names ops whose work ``flops`` leaves out (library calls, FFTs).
    """

    op: str
    compile_s: float
    run_s: float | None
    min_s: float | None
    flops: float
    dot_flops: float
    xla_flops: float
    memory_bytes: int
    time_ratio: float | None
    flops_ratio: float
    uncounted: tuple[str, ...] = ()


def _op_fn(op: str, f: Callable) -> Callable:
    """``fn(x, v, u, args)``: the operation on ``f(x, *args)``; tangent ``v`` and cotangent ``u`` are jit
    arguments (not constants), so XLA cannot simplify them away."""

    def fx(args):
        return lambda x: f(x, *args)

    if op == "forward":
        return lambda x, v, u, args: f(x, *args)
    if op == "jvp":
        return lambda x, v, u, args: jax.jvp(fx(args), (x,), (v,))
    if op == "vjp":

        def vjp(x, v, u, args):
            y, pullback = jax.vjp(fx(args), x)
            return y, pullback(u)

        return vjp
    if op == "grad":
        return lambda x, v, u, args: jax.grad(fx(args))(x)
    if op == "jacfwd":
        return lambda x, v, u, args: jax.jacfwd(fx(args))(x)
    if op == "jacrev":
        return lambda x, v, u, args: jax.jacrev(fx(args))(x)
    return lambda x, v, u, args: jacobian(fx(args), x, mode="auto")


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _check_clock(clock: Any) -> str:
    """``clock`` validated: ``"cpu"`` (the process CPU time) only where JAX computes on the CPU; on a
    GPU or TPU that time misses what the device spends and measures dispatch or spin-waiting."""
    check_choice("clock", clock, _CLOCKS)
    if clock == "cpu" and platform() != "cpu":
        raise OptionError(
            f"clock: 'cpu' reads the host's process CPU time, which does not see the time the "
            f"{platform()} device spends; use clock='wall' on this backend."
        )
    return clock


def _interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    min_sample_s: float,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument call, ``repeats`` samples each, timed round-robin.

    Each call is warmed up once (that compiles it); the order rotates from round to round; one sample is
    ``k`` back-to-back calls, ``k`` calibrated (from the fastest of 5 calls) so that a sample lasts
    ≥ ``min_sample_s`` (a single call of a µs-scale function measures dispatch).
    ``clock="cpu"`` reads the process CPU time (all threads) instead of the wall clock.
    """
    now = _CLOCKS[clock]
    number = {}
    for name, call in calls.items():
        jax.block_until_ready(call())
        once = []
        for _ in range(5):  # the minimum of 5 calls: one preempted call must not set k
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            once.append(time.perf_counter() - t0)
        number[name] = max(1, min(1000, math.ceil(min_sample_s / min(once))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        # Rotate the order each round: a call never always follows the same one (whose cache footprint
        # or turbo state would otherwise bias it).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            call = calls[name]
            t0 = now()
            for _ in range(number[name]):
                out = call()
            jax.block_until_ready(out)
            samples[name].append((now() - t0) / number[name])
    return samples


def costs(
    f: Callable,
    x: Any,
    /,
    *args: Any,
    ops: Sequence[str] | None = None,
    repeats: int = 7,
    min_sample_s: float = 2e-3,
    timed: bool = True,
    clock: str = "wall",
) -> dict[str, OpCost]:
    """Compile, count and time AD operations on ``f(x, *args)``, differentiating with respect to ``x``.

    ``ops`` ⊆ :data:`OPS`: ``forward`` (``f`` itself), ``jvp`` (``(f(x), J v)``), ``vjp`` (``(f(x), uᵀJ)``),
    ``grad`` (``∇f``, scalar ``f`` only), ``jacfwd``, ``jacrev`` and ``jacobian`` (``mode="auto"``); the
    default is all of them (``grad`` only when ``f`` returns a scalar). ``forward`` is always measured: it is
    the denominator of the ratios. ``args`` are passed to the compiled functions as arguments (not baked in
    as constants); the tangent and cotangent are ones, also passed as arguments. Each operation is compiled
    once through :func:`gradlab.remat.measure` (compile time, HLO FLOPs, memory), then all are timed
    round-robin for ``repeats`` rounds (``timed=False`` skips timing: FLOPs only). ``clock="cpu"`` times
    with the process CPU time instead of the wall clock: far steadier on a loaded shared machine, and equal
    to the wall time of a single-threaded run (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``).

    Returns ``{op: OpCost}`` in the order of ``ops`` (``forward`` first).

    >>> c = costs(lambda x, A: jnp.sum(jnp.tanh(A @ x)), jnp.ones(4), jnp.ones((3, 4)), timed=False)
    >>> list(c), c["forward"].flops_ratio
    (['forward', 'jvp', 'vjp', 'grad', 'jacfwd', 'jacrev', 'jacobian'], 1.0)
    >>> costs(lambda x: x, jnp.ones(2), ops=("grad",))
    Traceback (most recent call last):
    ...
    gradlab._validate.NotScalarError: ops: 'grad' needs f to return a scalar, got shape (2,). ...

    Reference: Griewank & Walther (2008), *Evaluating Derivatives*, ch. 4 (complexity of tangent
    and gradient propagation); JAX documentation, "The Autodiff Cookbook" (jvp and vjp).
    """
    check_positive_int("repeats", repeats)
    check_positive("min_sample_s", min_sample_s)
    _check_clock(clock)
    _check_inexact("x", x)
    if isinstance(ops, str):
        raise OptionError(
            f"ops: expected a sequence of names from {list(OPS)}, got the string {ops!r}."
        )
    out = jax.eval_shape(lambda x: f(x, *args), x)
    leaves = jax.tree.leaves(out)
    scalar = (
        len(leaves) == 1 and leaves[0].shape == () and jnp.issubdtype(leaves[0].dtype, jnp.floating)
    )
    if ops is None:
        ops = [op for op in OPS if op != "grad" or scalar]
    for op in ops:
        check_choice("ops", op, OPS)
    if "grad" in ops and not scalar:
        shape = leaves[0].shape if len(leaves) == 1 else f"a pytree of {len(leaves)} leaves"
        raise NotScalarError(
            f"ops: 'grad' needs f to return a scalar, got shape {shape}. Drop 'grad' from ops (use "
            "'vjp' or 'jacrev'), or reduce the output, e.g. with jnp.sum."
        )
    ops = ["forward", *[op for op in dict.fromkeys(ops) if op != "forward"]]
    v = jax.tree.map(jnp.ones_like, x)
    u = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), out)
    fns = {op: _op_fn(op, f) for op in ops}
    measured = {op: measure(fn, x, v, u, args, run=False) for op, fn in fns.items()}
    med = mins = None
    if timed:
        jitted = {op: jax.jit(fn) for op, fn in fns.items()}
        samples = _interleaved(
            {op: (lambda j=j: j(x, v, u, args)) for op, j in jitted.items()},
            repeats=repeats,
            min_sample_s=min_sample_s,
            clock=clock,
        )
        med = {op: statistics.median(s) for op, s in samples.items()}
        mins = {op: min(s) for op, s in samples.items()}
    base = measured["forward"].flops
    return {
        op: OpCost(
            op=op,
            compile_s=m.compile_s,
            run_s=None if med is None else med[op],
            min_s=None if mins is None else mins[op],
            flops=m.flops,
            dot_flops=m.dot_flops,
            xla_flops=m.xla_flops,
            memory_bytes=m.memory_bytes,
            time_ratio=None if med is None else med[op] / med["forward"],
            flops_ratio=m.flops / base if base > 0 else float("nan"),
            uncounted=m.uncounted,
        )
        for op, m in measured.items()
    }


# ---------------------------------------------------------------------------------------------------------
# The seeds' figure: Jacobian of f(x) = A x, n fixed, m varied
# ---------------------------------------------------------------------------------------------------------


class Crossover(NamedTuple):
    """Jacobian of ``f(x) = A x`` (``A ∈ R^{m×n}``) by ``jacfwd``, ``jacrev`` and ``mode="auto"``, per ``m``.

    Times are medians (``*_s``) and minima (``*_min_s``) of interleaved rounds, seconds per call (``None``
    when ``timed=False``); FLOPs from the compiled HLO. ``auto_mode`` is the mode ``jacobian`` chose;
    ``auto_slowdown`` = auto ÷ the faster fixed mode (by median), paired round by round, median of the
    per-round ratios. ``m_star_time`` and ``m_star_flops`` are
    where ``jacrev ÷ jacfwd`` crosses 1, interpolated in log–log between grid points (the median if noise
    makes several crossings; ``nan`` if none on the grid). FLOPs cross at exactly ``m = n``.
    """

    n: int
    ms: tuple[int, ...]
    dtype: str
    forward_s: tuple[float, ...] | None
    reverse_s: tuple[float, ...] | None
    auto_s: tuple[float, ...] | None
    forward_min_s: tuple[float, ...] | None
    reverse_min_s: tuple[float, ...] | None
    auto_min_s: tuple[float, ...] | None
    forward_flops: tuple[float, ...]
    reverse_flops: tuple[float, ...]
    auto_flops: tuple[float, ...]
    auto_mode: tuple[str, ...]
    auto_slowdown: tuple[float, ...] | None
    m_star_time: float | None
    m_star_flops: float


def crossing(ms: Sequence[float], forward: Sequence[float], reverse: Sequence[float]) -> float:
    """Where ``reverse ÷ forward`` crosses 1 going up in ``m``, interpolated linearly in ``log m`` and
    ``log(reverse/forward)``; the median of the crossings if there are several, ``nan`` if there is none.

    >>> crossing([50, 100, 200], [1.0, 2.0, 4.0], [0.5, 2.0, 8.0])  # equal at m = 100
    100.0
    >>> round(crossing([10, 1000], [1.0, 1.0], [0.1, 10.0]), 6)
    100.0

    Reference: Merkulov's lecture, "Choose your fighter" (the figure whose crossover this locates);
    linear interpolation on log–log axes.
    """
    lm = np.log(np.asarray(ms, dtype=float))
    r = np.log(np.asarray(reverse, dtype=float) / np.asarray(forward, dtype=float))
    found = []
    for i in range(len(lm)):
        if r[i] == 0 and (i == 0 or r[i - 1] < 0) and (i + 1 == len(lm) or r[i + 1] >= 0):
            found.append(float(ms[i]))
        elif i + 1 < len(lm) and r[i] < 0 < r[i + 1]:
            t = -r[i] / (r[i + 1] - r[i])
            found.append(float(np.exp(lm[i] + t * (lm[i + 1] - lm[i]))))
    return float(statistics.median(found)) if found else float("nan")


def crossover(
    n: int = 100,
    ms: Sequence[int] = DEFAULT_MS,
    *,
    key: jax.Array,
    repeats: int = 7,
    dtype: str = "float32",
    min_sample_s: float = 2e-3,
    timed: bool = True,
    clock: str = "wall",
) -> Crossover:
    """The seeds' figure: time and FLOPs of the Jacobian of ``f(x) = A x``, ``A ∈ R^{m×n}``, ``n`` fixed,
    for each ``m`` in ``ms``, by ``jacfwd`` (``∝ n``), ``jacrev`` (``∝ m``) and ``jacobian(mode="auto")``.

    ``A`` (the first ``m`` rows of one ``(max(ms) + 1) × n`` standard normal draw from ``key``, whose last
    row is ``x``) and ``x`` are jit arguments, not constants.
    ``jacfwd`` computes ``A·I_n`` (``2mn²`` FLOPs), ``jacrev`` ``I_m·A`` (``2m²n``). For each ``m`` the
    three are compiled, then timed round-robin for ``repeats`` rounds (``timed=False``: FLOPs only;
    ``clock="cpu"``: process CPU time, see :func:`costs`).

    >>> c = crossover(8, (4, 8, 16), key=jax.random.key(0), timed=False)
    >>> round(c.m_star_flops, 9), c.auto_mode
    (8.0, ('reverse', 'forward', 'forward'))

    Reference: Merkulov's lecture, "Choose your fighter" (the figure: ``n = 100``, ``f(x) = Ax``);
    Baydin et al. (2018), *JMLR* 18(153), §3; JAX documentation, "The Autodiff Cookbook".
    """
    n = check_positive_int("n", n)
    check_key(key, "crossover")
    if isinstance(ms, int) or len(ms) < 2:
        raise OptionError(f"ms: expected a sequence of at least 2 output sizes m ≥ 1, got {ms!r}.")
    ms = tuple(check_positive_int("ms", m) for m in ms)
    if list(ms) != sorted(set(ms)):
        raise OptionError(f"ms: expected increasing distinct sizes, got {ms!r}; sort them.")
    check_choice("dtype", dtype, ("float32", "float64"))
    check_positive_int("repeats", repeats)
    _check_clock(clock)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise OptionError(
            "dtype: 'float64' needs jax.config.update('jax_enable_x64', True); or use 'float32'."
        )

    def jac(mode):
        return lambda A, x: jacobian(lambda x: A @ x, x, mode=mode)

    fns = {mode: jac(mode) for mode in ("forward", "reverse", "auto")}
    # One draw for the whole grid (each new random shape costs a compile): A = the first m rows.
    z = np.asarray(jax.random.normal(key, (ms[-1] + 1, n), dtype=dtype))
    x = jnp.asarray(z[-1])
    rows = []
    for m in ms:
        A = jnp.asarray(z[:m])
        flops = {mode: measure(fn, A, x, run=False).flops for mode, fn in fns.items()}
        row = {
            "flops": flops,
            "auto_mode": choose_mode(lambda x, A=A: A @ x, x),
        }
        if timed:
            jitted = {mode: jax.jit(fn) for mode, fn in fns.items()}
            samples = _interleaved(
                {mode: (lambda j=j, A=A, x=x: j(A, x)) for mode, j in jitted.items()},
                repeats=repeats,
                min_sample_s=min_sample_s,
                clock=clock,
            )
            row["med"] = {k: statistics.median(s) for k, s in samples.items()}
            row["min"] = {k: min(s) for k, s in samples.items()}
            # Paired: auto ÷ the faster fixed mode (by median) round by round, so that a change of load
            # between rounds cancels; the median of those ratios.
            best = min(("forward", "reverse"), key=lambda k: row["med"][k])
            row["slowdown"] = statistics.median(
                a / b for a, b in zip(samples["auto"], samples[best], strict=True)
            )
        rows.append(row)

    def col(what, mode):
        return tuple(r[what][mode] for r in rows) if timed else None

    fwd_flops = tuple(r["flops"]["forward"] for r in rows)
    rev_flops = tuple(r["flops"]["reverse"] for r in rows)
    fwd_s, rev_s, auto_s = col("med", "forward"), col("med", "reverse"), col("med", "auto")
    return Crossover(
        n=n,
        ms=ms,
        dtype=dtype,
        forward_s=fwd_s,
        reverse_s=rev_s,
        auto_s=auto_s,
        forward_min_s=col("min", "forward"),
        reverse_min_s=col("min", "reverse"),
        auto_min_s=col("min", "auto"),
        forward_flops=fwd_flops,
        reverse_flops=rev_flops,
        auto_flops=tuple(r["flops"]["auto"] for r in rows),
        auto_mode=tuple(r["auto_mode"] for r in rows),
        auto_slowdown=tuple(r["slowdown"] for r in rows) if timed else None,
        m_star_time=crossing(ms, fwd_s, rev_s) if timed else None,
        m_star_flops=crossing(ms, fwd_flops, rev_flops),
    )


# ---------------------------------------------------------------------------------------------------------
# The cheap gradient principle
# ---------------------------------------------------------------------------------------------------------


class CheapGradient(NamedTuple):
    """``grad ÷ forward`` of a scalar loss: ``time_ratio`` (medians of interleaved rounds; ``None`` if not
    timed) and ``flops_ratio`` (compiled HLO), with the underlying numbers; ``uncounted`` names ops
    of either program whose work the FLOP count leaves out (then ``flops_ratio`` is partial)."""

    time_ratio: float | None
    flops_ratio: float
    forward_s: float | None
    grad_s: float | None
    forward_flops: float
    grad_flops: float
    uncounted: tuple[str, ...] = ()


def mlp(
    key: jax.Array,
    *,
    widths: Sequence[int] = (256, 512, 512, 10),
    batch: int = 256,
    dtype: str = "float32",
) -> tuple[Callable, dict, tuple[jax.Array, jax.Array]]:
    """A small tanh MLP regression problem: ``(loss, params, (inputs, targets))``.

    ``loss(params, inputs, targets) = mean‖MLP(inputs) − targets‖²/2`` with layers
    ``h ← tanh(h W_i + b_i)`` (no tanh on the last), ``W_i ∈ R^{widths[i]×widths[i+1]}`` (Glorot-scaled
    normal), ``inputs ∈ R^{batch×widths[0]}``, ``targets ∈ R^{batch×widths[-1]}``.

    >>> loss, params, data = mlp(jax.random.key(0), widths=(3, 4, 2), batch=5)
    >>> [w.shape for w in params["w"]], loss(params, *data).shape
    ([(3, 4), (4, 2)], ())

    Reference: X. Glorot & Y. Bengio, "Understanding the difficulty of training deep feedforward
    neural networks", AISTATS 2010 (the weight variance ``2/(fan_in + fan_out)``).
    """
    if isinstance(widths, int) or len(widths) < 2:
        raise OptionError(f"widths: expected at least 2 layer widths (in, …, out), got {widths!r}.")
    widths = [check_positive_int("widths", w) for w in widths]
    batch = check_positive_int("batch", batch)
    check_choice("dtype", dtype, ("float32", "float64"))

    # One normal draw sliced into every array: one compile (each eager random shape compiles threefry).
    shapes = list(itertools.pairwise(widths))
    shapes += [(batch, widths[0]), (batch, widths[-1])]
    z = np.asarray(jax.random.normal(key, (sum(a * b for a, b in shapes),), dtype=dtype))
    arrays, start = [], 0
    for a, b in shapes:
        arrays.append(z[start : start + a * b].reshape(a, b))
        start += a * b
    params = {
        "w": [jnp.asarray(w * np.sqrt(2.0 / sum(w.shape)).astype(dtype)) for w in arrays[:-2]],
        "b": [jnp.zeros(b, dtype=dtype) for b in widths[1:]],
    }
    data = (jnp.asarray(arrays[-2]), jnp.asarray(arrays[-1]))

    def loss(params, inputs, targets):
        h = inputs
        for i, (w, b) in enumerate(zip(params["w"], params["b"], strict=True)):
            h = h @ w + b[None, :]
            if i + 1 < len(params["w"]):
                h = jnp.tanh(h)
        return 0.5 * jnp.mean(jnp.sum((h - targets) ** 2, axis=-1))

    return loss, params, data


def cheap_gradient_ratio(
    loss: Callable,
    params: Any,
    /,
    *args: Any,
    repeats: int = 7,
    min_sample_s: float = 2e-3,
    timed: bool = True,
    clock: str = "wall",
) -> CheapGradient:
    """``grad ÷ forward`` for a scalar ``loss(params, *args)``, gradient with respect to ``params``.

    The cheap gradient principle bounds the FLOPs ratio by a small constant independent of the number of
    parameters (≈ 3 for dense layers: the backward pass does two matmuls per forward one); measured with
    :func:`costs` (compiled HLO FLOPs; run times interleaved, medians).

    >>> loss, params, data = mlp(jax.random.key(0), widths=(16, 32, 32, 4), batch=64)
    >>> r = cheap_gradient_ratio(loss, params, *data, timed=False)
    >>> 2 < r.flops_ratio < 4
    True

    Reference: Griewank & Walther (2008), *Evaluating Derivatives*, §4.6 (the cheap gradient
    principle); Baydin et al. (2018), *JMLR* 18(153), §3.
    """
    c = costs(
        loss,
        params,
        *args,
        ops=("forward", "grad"),
        repeats=repeats,
        min_sample_s=min_sample_s,
        timed=timed,
        clock=clock,
    )
    fwd, grad = c["forward"], c["grad"]
    return CheapGradient(
        time_ratio=grad.time_ratio,
        flops_ratio=grad.flops_ratio,
        forward_s=fwd.run_s,
        grad_s=grad.run_s,
        forward_flops=fwd.flops,
        grad_flops=grad.flops,
        uncounted=tuple(sorted(set(fwd.uncounted) | set(grad.uncounted))),
    )
