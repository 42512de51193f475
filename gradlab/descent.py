"""The descent engine: any gradient strategy × any optax optimizer, compiled once, with honest costs.

One step of :func:`run` is::

    est = strategy(fn, params, jax.random.fold_in(key, step))          # the gradient (estimate) and its cost
    updates, opt_state = optimizer.update(est.grad, opt_state, params)  # any optax GradientTransformation
    params = optax.apply_updates(params, updates)

The strategy contract (:mod:`gradlab.grads`): ``strategy(fn, params, key) -> grads.GradEstimate`` with fields
``value``, ``grad`` (the pytree of ``params``), ``num_fun_evals``, ``num_grads``, ``num_jvps`` (the cost of
this one estimate) and ``std_error``.

Steps run as a jitted ``lax.while_loop`` over a segment of at most ``chunk_size`` steps that exits at the
tolerance or at the first non-finite loss, compiled once (per ``fn``, ``strategy``, ``optimizer`` object,
parameter shapes and settings; later calls with new parameter values or keys reuse the executable;
the cache holds the 32 most recent and keys on object identity: a new but equal ``grads.two_point(...)``
or optimizer compiles anew, so build them once and reuse them. Arrays that ``fn`` closes over are
compile-time constants of the cached executable: for other data (a new minibatch) build a new ``fn``,
which compiles anew, never mutate what a cached ``fn`` captured — the cache would run the old data);
by default a whole run is one segment. The monitoring — the true loss ``f(x_k)`` at every step, and
``‖∇f(x_k)‖`` by ``jax.grad`` when asked — is not counted as cost. Where the strategy's ``value`` is the
exact ``f(x_k)`` (:data:`EXACT_VALUE_STRATEGIES`) it is the monitored loss, so monitoring costs nothing;
otherwise ``fn`` is evaluated once more per step.

>>> import jax, optax
>>> from gradlab import grads, problems
>>> p = problems.make("least_squares", jax.random.key(0), dim=5, num_samples=10)
>>> h = run(p.loss, p.init, grads.exact(), optax.sgd(1 / p.smoothness), key=jax.random.key(1),
...         num_steps=2000, tol=1e-6, f_star=p.min_value)
>>> h.steps_to_tol == h.steps_run, h.loss.shape == (h.steps_run + 1,), int(h.num_grads[-1]) == h.steps_run
(True, True, True)
>>> bool(h.relative_gap[-1] <= 1e-6), h.diverged
(True, False)

References: optax's ``GradientTransformation`` (init/update pair) and ``GradientTransformationExtraArgs``;
Nesterov (2004), *Introductory Lectures on Convex Optimization*, §2.1 (the rates these runs are held
against, see :mod:`gradlab.theory`).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradlab import _prng
from gradlab._backend import platform, trace_context
from gradlab._tree import tree_norm
from gradlab._validate import (
    OptionError,
    ShapeError,
    check_float_params,
    check_key,
    check_positive,
    check_positive_int,
    check_same_structure,
    check_scalar_output,
)

__all__ = ["History", "clear_cache", "fd_cg", "run"]

DEFAULT_CHUNK_SIZE = 256
# steps per loop iteration when `unroll` is not given: on the CPU backend, and elsewhere (an XLA:GPU loop
# iteration pays kernel launches and a read of its predicate on the host); see _default_unroll
DEFAULT_UNROLL = 1
ACCELERATOR_UNROLL = 8
_SILENT_UNROLL = (
    8  # unrecorded steps between two records: traced one by one up to this many, else a loop
)
MAX_CHUNK_SIZE = 1 << 16
_CACHE_SIZE = 32


@dataclasses.dataclass(frozen=True, eq=False)
class History:
    """The record of one :func:`run`; per-step arrays are NumPy and end at the stopping step.

    Attributes:
      loss: ``f(x_k)`` for ``k = 0..steps_run`` (length ``steps_run + 1``; the true loss, not the
        strategy's estimate).
      num_fun_evals, num_grads, num_jvps: cumulative costs after ``k`` steps (length ``steps_run + 1``,
        starting at 0); line-search evaluations are included (see :func:`run`).
      grad_norm: ``‖∇f(x_k)‖`` (length ``steps_run + 1``), or ``None`` if not recorded.
      steps_run: the number of steps taken.
      steps_to_tol: the first ``k`` where the stopping criterion held, or ``None``.
      fun_evals_to_tol: ``num_fun_evals[steps_to_tol]``, or ``None``.
      diverged: whether a non-finite loss stopped the run; ``diverged_step`` is that ``k`` (else ``None``).
      compile_time: seconds to trace, lower and compile (0.0 when the executable came from the cache).
      run_time: seconds of execution (after compilation), ``block_until_ready`` included.
      params: the final parameters ``x_{steps_run}``.
      f_star: the optimal value passed to :func:`run` (``None`` if not given).
      tol: the tolerance passed to :func:`run`.
      criterion: ``"relative_gap"``, ``"grad_norm"`` or ``None`` (no tolerance).
      steps: the step ``k`` of each entry of the per-step arrays: ``0..steps_run`` by default;
        ``0, e, 2e, …, steps_run`` with ``run(..., monitor_every=e)``.
    """

    loss: np.ndarray
    num_fun_evals: np.ndarray
    num_grads: np.ndarray
    num_jvps: np.ndarray
    grad_norm: np.ndarray | None
    steps_run: int
    steps_to_tol: int | None
    fun_evals_to_tol: int | None
    diverged: bool
    diverged_step: int | None
    compile_time: float
    run_time: float
    params: Any
    f_star: float | None = None
    tol: float | None = None
    criterion: str | None = None
    steps: np.ndarray | None = None

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", np.arange(len(self.loss)))

    @property
    def relative_gap(self) -> np.ndarray:
        """``(f(x_k) − f*)/(f(x_0) − f*)`` per step (needs ``f_star``)."""
        if self.f_star is None:
            raise OptionError(
                "relative_gap: this run had no f_star. Pass f_star=... to descent.run."
            )
        num, den = self.loss - self.f_star, self.loss[0] - self.f_star
        # started at f*: 0 where the loss stays there, ±inf where it left, NaN stays NaN
        if den == 0:
            return np.where(
                num == 0, 0.0, np.where(np.isnan(num), np.nan, np.copysign(np.inf, num))
            )
        return num / den

    def summary(self) -> str:
        """One readable line: steps, loss from start to end, where the tolerance was met, timings."""
        stop = (
            f"diverged at step {self.diverged_step}"
            if self.diverged
            else (
                f"tol reached at step {self.steps_to_tol} ({self.fun_evals_to_tol} fun evals)"
                if self.steps_to_tol is not None
                else "tol not reached"
                if self.tol is not None
                else "no tol"
            )
        )
        return (
            f"History(steps_run={self.steps_run}, loss {self.loss[0]:.3e} -> {self.loss[-1]:.3e}, {stop}, "
            f"cost fun_evals={int(self.num_fun_evals[-1])} grads={int(self.num_grads[-1])} "
            f"jvps={int(self.num_jvps[-1])}, compile {self.compile_time:.3f} s, run {self.run_time:.3f} s)"
        )

    __repr__ = summary


# ---------------------------------------------------------------------------------------------------------
# Validation


def _check_not_traced(who: str, **arrays: Any) -> None:
    """``run`` and ``fd_cg`` drive compiled loop segments from the host (the early stop, the History's
    NumPy arrays): inside ``jax.jit``, ``vmap`` or ``grad`` their arguments are tracers, which would
    fail later with JAX's TracerArrayConversionError."""
    for name, tree in arrays.items():
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree)):
            raise OptionError(
                f"{name}: {who} got a traced value: it cannot run inside jax.jit, jax.vmap or jax.grad "
                "(it drives compiled loop segments from the host and returns NumPy arrays). Call it "
                "outside the transformation; it compiles its loop itself (once per configuration). "
                "To vmap or differentiate an optimisation, write its loop with lax.scan."
            )


def _check_callables(fn: Any, strategy: Any, optimizer: Any) -> None:
    if not callable(fn):
        raise OptionError(
            f"fn: expected a callable loss fn(params) -> scalar, got {type(fn).__name__}."
        )
    if not callable(strategy):
        raise OptionError(
            f"strategy: expected a callable strategy(fn, params, key) -> GradEstimate (e.g. grads.exact()), "
            f"got {type(strategy).__name__}. Build one with a constructor from gradlab.grads."
        )
    if getattr(strategy, "__module__", None) == "gradlab.grads" and inspect.isfunction(strategy):
        name = strategy.__name__
        raise OptionError(
            f"strategy: got the constructor grads.{name} itself; call it to build the strategy, "
            f"e.g. grads.{name}() (options go in the call)."
        )
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise OptionError(
            f"optimizer: expected an optax GradientTransformation (with init and update), got "
            f"{type(optimizer).__name__}. Pass e.g. optax.sgd(1 / L)."
        )


def _validate_shapes(fn, params, strategy, key) -> None:
    check_float_params("params", params)
    check_scalar_output("fn", jax.eval_shape(fn, params))
    est = jax.eval_shape(lambda p, k: strategy(fn, p, k), params, key)
    missing = [f for f in ("grad", "num_fun_evals", "num_grads", "num_jvps") if not hasattr(est, f)]
    if missing:
        raise OptionError(
            f"strategy: its result lacks the field(s) {missing}; expected a GradEstimate with value, grad, "
            "num_fun_evals, num_grads, num_jvps, std_error (see gradlab.grads)."
        )
    try:
        check_same_structure("strategy(...).grad", est.grad, params)
    except ShapeError as err:
        raise ShapeError(
            f"{err} The strategy's gradient must have the structure of params."
        ) from None


# ---------------------------------------------------------------------------------------------------------
# The compiled pieces


def _linesearch_cost(opt_state: Any, dtype: Any) -> tuple[Any, Any]:
    """Extra (function evaluations, gradients) spent by optax line searches in this update.

    optax's line searches report ``num_linesearch_steps`` in their state's ``info``. Backtracking
    evaluates ``value_fn`` once per step; zoom evaluates ``value_and_grad(value_fn)`` once per step.
    """
    fe = jnp.zeros((), dtype)
    gr = jnp.zeros((), dtype)

    def is_info(x):
        return hasattr(x, "num_linesearch_steps") and hasattr(x, "_fields")

    for info in jax.tree.leaves(opt_state, is_leaf=is_info):
        if is_info(info):
            n = jnp.asarray(info.num_linesearch_steps, dtype)
            fe = fe + n
            if "zoom" in type(info).__name__.lower():
                gr = gr + n
    return fe, gr


# Strategies whose ``GradEstimate.value`` is the exact ``f(x)`` (see :class:`gradlab.grads.GradEstimate`):
# the engine then records it as the monitored loss instead of evaluating ``fn`` again. ``two_point`` and
# ``central_difference`` return the O(h²) mean of the ± evaluations, so ``fn`` is evaluated for them. A
# strategy can also declare itself with an ``exact_value`` attribute (which takes precedence).
EXACT_VALUE_STRATEGIES = frozenset(
    {"exact", "forward_mode", "forward_difference", "forward_gradient"}
)


def _value_is_exact(strategy: Any) -> bool:
    flag = getattr(strategy, "exact_value", None)
    if flag is not None:
        return bool(flag)
    return getattr(strategy, "name", None) in EXACT_VALUE_STRATEGIES


def _static_cost(fn, strategy, optimizer, params, key) -> np.ndarray | None:
    """The per-step cost ``[fun_evals, grads, jvps]`` when it does not depend on the point or the key (and no
    line search adds to it), else ``None``; found by a dependency walk over the strategy's jaxpr."""

    def is_info(x):
        return hasattr(x, "num_linesearch_steps") and hasattr(x, "_fields")

    state = jax.eval_shape(optimizer.init, params)
    if any(is_info(x) for x in jax.tree.leaves(state, is_leaf=is_info)):
        return None

    def cost(p, k):
        est = strategy(fn, p, k)
        return [
            jnp.asarray(getattr(est, f), jnp.int32)
            for f in ("num_fun_evals", "num_grads", "num_jvps")
        ]

    closed = jax.make_jaxpr(cost)(params, key)
    dep = set(closed.jaxpr.invars)
    for eqn in closed.jaxpr.eqns:
        if any(v in dep for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)):
            dep.update(eqn.outvars)
    if any(v in dep for v in closed.jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)):
        return None
    return np.asarray(jax.jit(cost)(params, key), np.int64).reshape(3)


class _Config(NamedTuple):
    capacity: int
    record_grad_norm: bool
    criterion: str | None
    extra_args: bool
    exact_value: bool
    unroll: int
    monitor_every: int


def _update_reads_value(optimizer: Any, fn: Any, params: Any) -> bool:
    """Whether ``optimizer.update(..., value=v, ...)`` can depend on ``v`` (traced once, abstractly).

    ``optax.sgd``/``optax.adam`` accept the extra arguments but never read them: then the value of a step
    that records nothing is dead code (:func:`_build`'s ``silent``). Conservative: ``v`` passed into any
    equation (a nested call included) counts as read.
    """
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
    dtype = jax.eval_shape(fn, like).dtype

    def update(v, p):
        state = optimizer.init(p)
        return optimizer.update(p, state, p, value=v, grad=p, value_fn=fn)

    try:
        jaxpr = jax.make_jaxpr(update)(jax.ShapeDtypeStruct((), dtype), like).jaxpr
    except Exception:  # an optimizer that cannot be traced this way: assume it reads the value
        return True
    v = jaxpr.invars[0]
    return any(x is v for e in jaxpr.eqns for x in e.invars) or any(x is v for x in jaxpr.outvars)


def _build(fn, strategy, optimizer, cfg: _Config):
    """The pure functions that get compiled: ``first`` (start + first segment) and ``segment``.

    The loop is rotated so that the estimate at ``x_k`` is computed once and serves twice: its value is the
    monitored loss ``f(x_k)`` (when exact) that decides the stop, and its gradient makes the step
    ``x_k → x_{k+1}``. The carry holds the pending estimate (gradient, value, cost) at the current point.
    When the per-step cost is a trace-time constant (no line search), it is not accumulated in the loop:
    ``info["static_cost"]`` holds it and the driver rebuilds the cumulative counts on the host.

    Steps run in *blocks* of ``cfg.unroll`` steps (the body traced that many times): a block records its
    losses with one buffer write and tests the stop on all of them at once, so the per-step bookkeeping of
    a loop iteration (counter, bounds test, buffer write, stop test) is paid once per block. A block is
    speculative: if the stop holds at any recorded step but its last, the block is undone (one select per
    leaf) and a step-by-step loop replays it up to the stopping step, so results stop exactly where a
    step-by-step loop would. The same step-by-step loop runs the last ``< unroll`` steps of a segment.

    The step-by-step loop keeps its per-step work to what a hand-written loop that records the loss
    does: its stop test sits in the loop's condition and reads the last record back from the buffer
    (the loss then has one consumer in the body, the buffer write, into which XLA fuses its
    reduction), and the pending value is not carried where the optimizer does not read it
    (:func:`_update_reads_value`). On the CPU each kernel of the loop body costs a fixed ≈ 0.1–0.4 µs,
    so at d = 100 these two took the compiled loop from 1.19 to 1.05 × a loop that records nothing.
    """
    count_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    info: dict[str, Any] = {}
    u, m = cfg.unroll, cfg.monitor_every

    def estimate(params, key, t):
        est = strategy(fn, params, _prng.fold_in(key, t))
        cost = jnp.stack(
            [
                jnp.asarray(est.num_fun_evals, count_dtype),
                jnp.asarray(est.num_grads, count_dtype),
                jnp.asarray(est.num_jvps, count_dtype),
            ]
        )
        if cfg.record_grad_norm:
            v, g = jax.value_and_grad(fn)(params)
            loss, gnorm = v, tree_norm(g).astype(v.dtype)
        else:
            loss = est.value if cfg.exact_value else fn(params)
            gnorm = None
        return (est.grad, est.value, cost), loss, gnorm

    def stops(loss, gnorm, tol, f0, f_star):
        """The stop test, elementwise: a non-finite loss, or the criterion."""
        stop = ~jnp.isfinite(loss)
        if cfg.criterion == "relative_gap":
            stop = stop | ((loss - f_star) <= tol * (f0 - f_star))
        elif cfg.criterion == "grad_norm":
            stop = stop | (gnorm <= tol)
        return stop

    def step_cost(cost, new_state):
        ls_fe, ls_gr = _linesearch_cost(new_state, count_dtype)
        return cost + jnp.stack([ls_fe, ls_gr, jnp.zeros((), count_dtype)])

    def advance(t, state, key, dtype):
        """One step from ``x_t`` (no stop test, no recording): the state at ``t + 1`` and ``f(x_{t+1})``."""
        params, opt_state, counts, pending = state
        grad, value, cost = pending if counts is not None else (*pending, None)
        if cfg.extra_args:
            updates, new_state = optimizer.update(
                grad, opt_state, params, value=value, grad=grad, value_fn=fn
            )
        else:
            updates, new_state = optimizer.update(grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda n, o: n.astype(o.dtype), new_params, params)
        new_pending, loss, gnorm = estimate(new_params, key, t + 1)
        if counts is not None:
            counts = counts + step_cost(cost, new_state)
        else:
            new_pending = new_pending[:2]
        gnorm = None if gnorm is None else gnorm.astype(dtype)
        return (new_params, new_state, counts, new_pending), loss.astype(dtype), gnorm

    def silent(t, state, key, dtype):
        """:func:`advance` for a step that records nothing. Unless the optimizer reads the value
        (:func:`_update_reads_value`), the incoming value is carried on unchanged, so that the estimate's value (for
        ``exact``, the loss reduction of ``value_and_grad``) is dead code in a loop of such steps."""
        new, _, _ = advance(t, state, key, dtype)
        if reads_value(state[0]):
            return new
        pending = new[3]
        return (*new[:3], (pending[0], state[3][1], *pending[2:]))

    def reads_value(params):
        """Whether the optimizer's update reads the pending value (traced once per compilation)."""
        if not cfg.extra_args:
            return False
        if "reads_value" not in info:
            info["reads_value"] = _update_reads_value(optimizer, fn, params)
        return info["reads_value"]

    def forget_value(state):
        """``state`` with the pending value replaced by a constant where nothing reads it: a value
        carried from one loop iteration to the next is an output XLA computes and stores at every
        step (on the CPU a separate kernel for the loss reduction), although the record has it."""
        if reads_value(state[0]):
            return state
        pending = state[3]
        # tree.map: a strategy's value may be None or a pytree (the loss is then fn(params) itself)
        return (*state[:3], (pending[0], jax.tree.map(jnp.zeros_like, pending[1]), *pending[2:]))

    def write(bufs, i, loss, gnorm, counts):
        """Write records (leading axis) at record slot ``i``."""
        bl, bg, bc = bufs
        i = i.astype(jnp.int32)
        bl = lax.dynamic_update_slice(bl, loss, (i,))
        if bg is not None:
            bg = lax.dynamic_update_slice(bg, gnorm, (i,))
        if bc is not None:
            bc = lax.dynamic_update_slice(bc, counts, (i, jnp.zeros((), jnp.int32)))
        return bl, bg, bc

    def segment(carry, key, start, end, tol, f0, f_star):
        """Steps ``t = start, ..., end − 1`` (at most ``capacity``), ending early at a stop.

        Step ``t`` applies the pending estimate at ``x_t``, then estimates at ``x_{t+1}``. Every
        ``monitor_every`` steps (and at ``end``) it records ``f(x_{t+1})`` (and the costs since the previous record) at
        record slot ``ceil((t + 1 − start)/monitor_every) − 1`` and tests the stop. Returns the carry, the
        buffers and the number of steps taken. ``start`` is a multiple of ``monitor_every``.
        """
        dtype = f0.dtype
        static = info.get("static_cost") is not None
        slots = -(-cfg.capacity // m)
        bufs = (
            jnp.zeros((slots,), dtype),
            jnp.zeros((slots,), dtype) if cfg.record_grad_norm else None,
            None if static else jnp.zeros((slots, 3), count_dtype),
        )
        params, opt_state, counts, pending, stop = carry
        if static:  # a constant cost need not travel through the loop
            state = (params, opt_state, None, pending[:2])
        else:
            state = (params, opt_state, counts, pending)

        def block_cond(s):
            t, _, _, stop, replay = s
            return (t + u <= end) & ~stop & ~replay

        def block_body(s):
            t, state, bufs, _, _ = s
            new = state
            rec_l, rec_g, rec_c = [], [], []
            for i in range(u // m):
                t0 = t + i * m
                if m - 1 > _SILENT_UNROLL:  # a loop of the unrecorded steps, traced once
                    new = lax.fori_loop(
                        t0, t0 + m - 1, lambda tt, st: silent(tt, st, key, dtype), new
                    )
                else:
                    for j in range(m - 1):
                        new = silent(t0 + j, new, key, dtype)
                new, loss, gnorm = advance(t0 + m - 1, new, key, dtype)
                rec_l.append(loss)
                rec_g.append(gnorm)
                rec_c.append(new[2])
                if new[2] is not None:  # records hold increments (see step_body)
                    new = (new[0], new[1], jnp.zeros_like(new[2]), new[3])
            losses = jnp.stack(rec_l)
            gnorms = None if rec_g[0] is None else jnp.stack(rec_g)
            cums = None if rec_c[0] is None else jnp.stack(rec_c)
            hit = stops(losses, gnorms, tol, f0, f_star)
            bufs = write(bufs, (t - start) // m, losses, gnorms, cums)
            # a stop before the block's last record: undo the block and let the step loop replay it
            replay = jnp.any(hit[:-1]) if hit.shape[0] > 1 else jnp.zeros((), bool)
            state = jax.tree.map(lambda old, n: jnp.where(replay, old, n), state, new)
            t = jnp.where(replay, t, t + u)
            return t, state, bufs, hit[-1] & ~replay, replay

        def recorded_stop(t, bufs, entry, stop_in):
            """The stop after step ``t − 1`` of the step loop, read back from the last record: the
            stop test lives in the loop's condition, so the loss has one consumer in the body (the
            buffer write, which fuses its reduction) and no stop flag is carried."""
            at_record = ((t - start) % m == 0) | (t == end)
            slot = jnp.maximum((t - start - 1) // m, 0).astype(jnp.int32)
            loss = lax.dynamic_index_in_dim(bufs[0], slot, keepdims=False)
            gnorm = None
            if bufs[1] is not None:
                gnorm = lax.dynamic_index_in_dim(bufs[1], slot, keepdims=False)
            return jnp.where(t == entry, stop_in, at_record & stops(loss, gnorm, tol, f0, f_star))

        def step_cond(s):
            t, _, bufs, entry, stop_in = s
            return (t < end) & ~recorded_stop(t, bufs, entry, stop_in)

        def step_body(s):
            t, state, bufs, entry, stop_in = s
            state, loss, gnorm = advance(t, state, key, dtype)
            state = forget_value(state)
            t = t + 1
            at_record = ((t - start) % m == 0) | (t == end)
            bufs = write(
                bufs,
                (t - start - 1) // m,
                loss[None],
                None if gnorm is None else gnorm[None],
                None if state[2] is None else state[2][None],
            )
            if state[2] is not None:
                # A record holds the cost since the previous record, not the running total: without
                # x64 the counts are int32 and a total (a million JVPs a step) would wrap; the
                # driver sums the increments in int64.
                state = (
                    *state[:2],
                    jnp.where(at_record, jnp.zeros_like(state[2]), state[2]),
                    state[3],
                )
            return t, state, bufs, entry, stop_in

        t = start
        if u > 1:
            no = jnp.zeros((), bool)
            t, state, bufs, stop, _ = lax.while_loop(
                block_cond, block_body, (t, state, bufs, stop, no)
            )
        # where nothing reads the pending value, it enters the loop as the body leaves it (a
        # placeholder), and stays one for the next segment, whose optimizer does not read it either
        state = forget_value(state)
        entry = t
        t, state, bufs, _, _ = lax.while_loop(step_cond, step_body, (t, state, bufs, entry, stop))
        stop = recorded_stop(t, bufs, entry, stop)
        n = t - start
        params, opt_state, counts_out, pending_out = state
        if static:
            counts = counts + n.astype(count_dtype) * jnp.asarray(info["static_cost"], count_dtype)
            pending_out = (*pending_out, pending[2])
        else:
            counts = counts_out
        return (params, opt_state, counts, pending_out, stop), bufs, n

    def pack(prefix, bufs, n, stop, ok):
        """What the host reads after a segment, in at most three arrays (each array fetched costs
        ≈ 10 µs, a fifth of a 1000-step run's whole overhead): the losses (after ``prefix``) and
        gradient norms in one, ``[steps taken, stopped, resolvable]`` in another, the cost records."""
        bl, bg, bc = bufs
        floats = jnp.concatenate([*prefix, bl, *([] if bg is None else [bg])])
        ints = jnp.stack([n.astype(count_dtype), stop.astype(count_dtype), ok.astype(count_dtype)])
        return floats, ints, bc

    def segment_call(carry, key, start, end, tol, f0, f_star):
        """A later segment: the carry and what the host reads (see :func:`pack`)."""
        carry, bufs, n = segment(carry, key, start, end, tol, f0, f_star)
        return carry, pack((), bufs, n, carry[-1], jnp.ones((), bool))

    def first(params, key, end, tol, f_star):
        """The start (optimizer state, the estimate at ``x_0``, the stop test at ``x_0``) and the first
        segment, in one executable (one dispatch, no host round trip for ``f(x_0)``)."""
        opt_state = optimizer.init(params)
        pending, loss0, gnorm0 = estimate(params, key, jnp.zeros((), count_dtype))
        dtype = loss0.dtype
        if gnorm0 is None:
            gnorm0 = jnp.full((), jnp.nan, dtype)
        gnorm0 = gnorm0.astype(dtype)
        tol, f_star = tol.astype(dtype), f_star.astype(dtype)
        stop0 = stops(loss0, gnorm0, tol, loss0, f_star)
        resolvable = jnp.ones((), bool)
        if cfg.criterion == "relative_gap":
            # The gap the tolerance asks for must exceed the rounding of a loss near f*: below it
            # the loss rounds onto (or under) f* and the test passes by rounding alone (float32: a
            # tol of 1e-12 "reached" at a true gap of 3e-7). Where it does not, no step is run and
            # the driver raises, naming the smallest tolerance that can be resolved.
            resolvable = ~_f_star_above(loss0, f_star) & (
                stop0 | _gap_resolvable(tol, loss0, f_star)
            )
            end = jnp.where(resolvable, end, jnp.zeros_like(end))
        carry = (params, opt_state, jnp.zeros((3,), count_dtype), pending, stop0)
        carry, bufs, n = segment(carry, key, jnp.zeros((), count_dtype), end, tol, loss0, f_star)
        return loss0, carry, pack((loss0[None], gnorm0[None]), bufs, n, carry[-1], resolvable)

    return first, segment_call, info


_CACHE: collections.OrderedDict = collections.OrderedDict()


def _compiler_options() -> dict[str, Any] | None:
    """XLA options for the engine's executables. On the CPU backend, copy insertion with region
    analysis, which proves more of a ``while`` loop's buffers safe to update in place: a loop that
    records the loss at every step then runs without a copy per iteration (least squares d = 100,
    1000 steps: 1.16 → 1.05 × a loop that records nothing). Arithmetic is unchanged."""
    if platform() == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return None


def _leaf_signature(x: Any) -> tuple:
    if isinstance(x, (jax.Array, np.ndarray)):  # the common case, without dtype promotion's cost
        return (x.shape, x.dtype)
    return (jnp.shape(x), jnp.result_type(x))


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple(_leaf_signature(x) for x in leaves))


class _Executables:
    """The compiled ``first`` and (compiled on first need: runs longer than one segment) ``segment``."""

    def __init__(self, fn, strategy, optimizer, cfg: _Config, params, key):
        _validate_shapes(fn, params, strategy, key)
        first, self._segment, info = _build(fn, strategy, optimizer, cfg)
        t0 = time.perf_counter()
        info["static_cost"] = _static_cost(fn, strategy, optimizer, params, key)
        self.static_cost = info.get("static_cost")
        count_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        dtype = jax.eval_shape(fn, params).dtype
        self._int = jax.ShapeDtypeStruct((), count_dtype)
        self._real = jax.ShapeDtypeStruct((), dtype)
        self.first = (
            jax.jit(first)
            .lower(params, key, self._int, self._real, self._real)
            .compile(_compiler_options())
        )
        self.segment = None
        self._carry = jax.eval_shape(first, params, key, self._int, self._real, self._real)[1]
        self._key = key
        self.compile_time = time.perf_counter() - t0
        # strong references keep the ids of fn, strategy, optimizer from being reused while cached
        self._refs = (fn, strategy, optimizer)

    def get_segment(self) -> tuple[Any, float]:
        if self.segment is not None:
            return self.segment, 0.0
        t0 = time.perf_counter()
        i, r = self._int, self._real
        self.segment = (
            jax.jit(self._segment)
            .lower(self._carry, self._key, i, i, r, r, r)
            .compile(_compiler_options())
        )
        return self.segment, time.perf_counter() - t0


def _compiled(fn, strategy, optimizer, cfg: _Config, params, key) -> tuple[_Executables, float]:
    """Return ``(executables, compile_time)``, compiling on a cache miss (compile_time 0.0 on a hit)."""
    cache_key = (
        id(fn),
        id(strategy),
        id(optimizer),
        cfg,
        _signature(params),
        _signature(key),
        trace_context(),  # x64, matmul precision, default device: another setting compiles anew
    )
    hit = _CACHE.get(cache_key)
    if hit is not None:
        _CACHE.move_to_end(cache_key)
        return hit, 0.0
    exe = _Executables(fn, strategy, optimizer, cfg, params, key)
    _CACHE[cache_key] = exe
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return exe, exe.compile_time


def clear_cache() -> None:
    """Drop the compiled executables that :func:`run` and :func:`fd_cg` keep between calls.

    A second call of :func:`run` with the same ``fn``, strategy, optimizer, options and parameter
    shapes reuses the executables (``History.compile_time`` 0); after ``clear_cache()`` it compiles
    anew (to time compilation, or to free the memory of many cached configurations).

    >>> import jax, jax.numpy as jnp, optax
    >>> from gradlab import grads
    >>> f, opt, strategy = lambda x: jnp.sum(x**2), optax.sgd(0.1), grads.exact()
    >>> run_ = lambda: run(f, jnp.ones(3), strategy, opt, key=jax.random.key(0), num_steps=5)
    >>> first, again = run_(), run_()
    >>> first.compile_time > 0, again.compile_time == 0
    (True, True)
    >>> clear_cache(); run_().compile_time > 0
    True
    """
    _CACHE.clear()
    _FD_CG_CACHE.clear()


# ---------------------------------------------------------------------------------------------------------
# The driver


_GAP_ROUNDING = 2.0  # a relative gap is resolvable down to this many ε·|f*| / (f(x₀) − f*)


def _gap_resolvable(tol: Any, f0: Any, f_star: Any) -> Any:
    """Whether the relative gap ``tol`` asks for exceeds the rounding of a loss near ``f*``
    (``tol·(f₀ − f*) ≥ 2ε|f*|``, in the loss's dtype); true where ``f₀ ≤ f*`` (``f*`` is no lower
    bound there, and the run goes on as it always did)."""
    floor = _GAP_ROUNDING * jnp.finfo(f0.dtype).eps * jnp.abs(f_star)
    return (f0 <= f_star) | (tol * (f0 - f_star) >= floor)


def _f_star_above(f0: Any, f_star: Any) -> Any:
    """Whether ``f*`` lies above ``f(x₀)`` by more than rounding (``2ε·max(|f*|, |f(x₀)|)``): then it is
    no lower bound, the relative gap starts negative and its test would pass at once."""
    floor = _GAP_ROUNDING * jnp.finfo(f0.dtype).eps * jnp.maximum(jnp.abs(f_star), jnp.abs(f0))
    return f_star - f0 > floor


def _raise_unresolvable(tol: float, f_star: float, f0: float, dtype: Any) -> None:
    if f0 < f_star:  # _f_star_above held
        raise OptionError(
            f"f_star={f_star:.6g}: above the loss at the start, f(x₀) = {f0:.6g}; f_star must be the "
            "optimal value (a lower bound), or the relative gap (f(x) − f*)/(f(x₀) − f*) means nothing. "
            "Pass the true minimum (e.g. problem.min_value), or f_star=None to stop on the gradient "
            "norm instead."
        )
    eps = float(np.finfo(dtype).eps)
    smallest = _GAP_ROUNDING * eps * abs(f_star) / (f0 - f_star)
    e = math.floor(math.log10(smallest)) - 1
    smallest = (
        math.ceil(smallest / 10**e) * 10**e
    )  # two digits, rounded up: the value printed passes
    raise OptionError(
        f"tol={tol:g}: in {np.dtype(dtype).name} the relative gap (f(x) − f*)/(f(x₀) − f*) cannot be "
        f"resolved below about {smallest:.2g} here (f* = {f_star:.6g}, f(x₀) = {f0:.6g}, ε = {eps:.2g}): "
        "a loss that close to f* rounds onto it, so the test would pass by rounding. Use tol ≥ "
        f"{smallest:.2g}, or float64 parameters (jax_enable_x64)."
    )


def _check_stop_args(num_steps, tol, f_star):
    """Validate the arguments ``run`` and ``fd_cg`` share; return them normalised."""
    num_steps = check_positive_int("num_steps", num_steps)
    if tol is not None:
        tol = check_positive("tol", tol)
    if f_star is not None:
        try:
            f_star = float(f_star)
        except (TypeError, ValueError):
            raise OptionError(
                f"f_star: expected a real number (the optimal value), got {f_star!r}."
            ) from None
        if not math.isfinite(f_star):
            raise OptionError(
                f"f_star: expected a finite optimal value, got {f_star!r}; pass None where f* is unknown."
            )
    return num_steps, tol, f_star


def _default_unroll() -> int:
    """``DEFAULT_UNROLL`` on the CPU backend, ``ACCELERATOR_UNROLL`` on others. On an H100 (jax 0.11.2,
    least squares d = 100, 1000 exact-gradient steps) one step per loop iteration took 1.9× a
    hand-written ``lax.scan`` and 8 steps per iteration 0.70× (``benchmarks/descent_overhead.py``)."""
    return DEFAULT_UNROLL if platform() == "cpu" else ACCELERATOR_UNROLL


def run(
    fn: Callable[[Any], Any],
    params: Any,
    strategy: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    /,
    *,
    key: Any,
    num_steps: int,
    tol: float | None = None,
    f_star: float | None = None,
    chunk_size: int | None = None,
    record_grad_norm: bool = False,
    monitor_every: int = 1,
    unroll: int | None = None,
) -> History:
    """Minimise ``fn`` from ``params`` with gradients from ``strategy`` and steps from ``optimizer``.

    Math: ``x_{k+1} = x_k + U(G_k)``, ``G_k = strategy(fn, x_k, fold_in(key, k)).grad``, ``U`` the optax
    update. Stops after ``num_steps`` steps, or at the first ``k`` where

    - ``(f(x_k) − f*)/(f(x_0) − f*) ≤ tol`` when ``f_star`` is given (the relative gap), or
    - ``‖∇f(x_k)‖ ≤ tol`` when ``f_star`` is ``None`` (the gradient norm is then recorded: exact, by
      ``jax.grad``, not counted as cost — ``record_grad_norm`` is switched on), or
    - ``f(x_k)`` is NaN or ±inf (``diverged=True``, ``diverged_step=k``).

    Args:
      fn: the loss, ``fn(params) -> real scalar``; a pure JAX function.
      params: the starting point ``x_0``, any pytree of float arrays.
      strategy: ``strategy(fn, params, key) -> GradEstimate`` (:mod:`gradlab.grads`).
      optimizer: an optax ``GradientTransformation``. If it is a ``GradientTransformationExtraArgs``
        (``optax.sgd``, ``optax.adam``, ``optax.lbfgs`` ...), ``value=est.value, grad=est.grad,
        value_fn=fn`` are passed to ``update`` (transforms that do not take them ignore them), so line
        searches work. Their extra evaluations are counted from optax's ``num_linesearch_steps``: one
        function evaluation per step (backtracking), one function evaluation and one gradient per step
        (zoom, as in ``optax.lbfgs``). Limitation: a line search evaluates the *true* ``fn`` (and zoom its
        exact gradient by AD), so with a zero-order strategy it is no longer zero-order.
      key: a ``jax.random.key`` — required; step ``k`` uses ``jax.random.fold_in(key, k)``.
      num_steps: the maximum number of steps, an integer ≥ 1.
      tol: the stopping tolerance (> 0), or ``None`` to run all ``num_steps`` steps.
      f_star: the optimal value ``f*`` (e.g. ``problem.min_value``), or ``None``. It must be a lower
        bound: with ``tol``, an ``f*`` above ``f(x₀)`` (beyond rounding) is an ``OptionError``, since
        the relative gap would start negative and its test pass at once.
      chunk_size: the most steps per call of the compiled loop (the host checks in between). Default: the
        whole run, rounded up to a power of two (at least 256, at most 65536), so that runs of similar
        lengths share one executable; the loop exits at the stop, so no step past it is computed.
      record_grad_norm: also record ``‖∇f(x_k)‖`` at every monitored step.
      monitor_every: record the loss (and costs, gradient norm) and test the stop only at every
        ``monitor_every``-th step (and the last one); default 1, every step. Larger values make cheap
        steps cheaper: the unrecorded steps run as an inner loop (more than 8 of them) or one by one,
        and unless the optimizer reads ``value`` (a line search; not ``optax.sgd``/``adam``) their
        losses are never computed. ``History.steps`` lists the recorded steps, and a tolerance is then
        met at a multiple of ``monitor_every`` (or at the last step). Without x64 the costs a line
        search adds are counted on the device in 32 bits between two records, so the cost of
        ``monitor_every`` steps must stay below 2³² evaluations (the totals are summed in int64).
      unroll: steps per block of the compiled loop (rounded up to a multiple of ``monitor_every``;
        default 1 on the CPU backend, 8 on others): the loop's per-iteration bookkeeping (counter,
        bounds and stop tests, buffer write; on a GPU kernel launches and the read of the loop's
        predicate on the host: one-step iterations took 12–20 µs on an H100) is paid once per block,
        at the price of tracing the step ``unroll/monitor_every + 1`` times (plus the inner loop's
        body; compiles 1.5–3× longer at 8). On a CPU the step-by-step loop already costs what a
        hand-written loop recording the loss costs, and blocks do not pay there (least squares
        d = 100, 1000 steps: ``unroll=8`` 1.19–1.24 × a hand loop, the default 1.14–1.18). Results do
        not depend on it beyond floating-point reassociation by XLA.

    Returns:
      A :class:`History`. Shapes: ``loss``, the cumulative costs, ``grad_norm`` and ``steps`` have length
      ``steps_run + 1`` (with ``monitor_every = e``: ``ceil(steps_run / e) + 1``); ``params`` has the
      structure of the input.

    Raises:
      NotScalarError: ``fn`` does not return a real scalar (checked with ``jax.eval_shape`` before compiling).
      OptionError: a missing/invalid ``key``, ``num_steps < 1``, ``tol ≤ 0``, a non-callable strategy ...;
        a relative-gap ``tol`` below what the loss's dtype resolves, ``2ε|f*|/(f(x₀) − f*)`` (checked
        once ``f(x₀)`` is known, before any step: in float32 the loss would round onto ``f*`` first);
        an ``f_star`` above ``f(x₀)`` (with ``tol``); integer ``params``; a ``gradlab.grads`` constructor passed
        uncalled as the strategy.
      ShapeError: the strategy's gradient does not have the structure of ``params``.

    Compile-once: the executables are cached per (``fn``, ``strategy``, ``optimizer``) object, parameter
    shapes/dtypes and settings; build the optimizer once and a second call with new values does not retrace.
    ``compile_time`` is the lower + compile time (0.0 on a cache hit); ``run_time`` the execution time.

    >>> import jax, jax.numpy as jnp, optax
    >>> from gradlab import grads
    >>> h = run(lambda x: jnp.sum(x**2), jnp.ones(3), grads.exact(), optax.sgd(0.25), key=jax.random.key(0),
    ...         num_steps=100, tol=1e-8)
    >>> h.steps_run, round(float(h.loss[1]), 4), h.criterion
    (29, 0.75, 'grad_norm')

    Reference: Nesterov, *Introductory Lectures on Convex Optimization*, 2004, §2.1 (gradient descent,
      step 1/L); Nesterov & Spokoiny, *Found. Comput. Math.* 17 (2017) (with zero-order oracles); the
      optax documentation (``GradientTransformationExtraArgs``, line searches).
    """
    _check_callables(fn, strategy, optimizer)
    _check_not_traced("descent.run", params=params, key=key, tol=tol, f_star=f_star)
    check_key(key, "descent.run")
    num_steps, tol, f_star = _check_stop_args(num_steps, tol, f_star)
    every = check_positive_int("monitor_every", monitor_every)
    unroll = check_positive_int("unroll", _default_unroll() if unroll is None else unroll)
    unroll = every * -(-unroll // every)  # blocks hold whole monitoring intervals
    if chunk_size is None:
        # one segment for the whole run where it fits; capacities are powers of two (≥ 256) so that runs of
        # similar lengths share one executable
        chunk_size = min(max(DEFAULT_CHUNK_SIZE, 1 << (num_steps - 1).bit_length()), MAX_CHUNK_SIZE)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    chunk_size = every * -(-chunk_size // every)  # segments start on a monitored step
    unroll = min(unroll, chunk_size)  # a block fits in a segment
    criterion = None if tol is None else ("relative_gap" if f_star is not None else "grad_norm")
    record = bool(record_grad_norm) or criterion == "grad_norm"
    extra = isinstance(optimizer, optax.GradientTransformationExtraArgs)
    cfg = _Config(chunk_size, record, criterion, extra, _value_is_exact(strategy), unroll, every)

    exe, compile_time = _compiled(fn, strategy, optimizer, cfg, params, key)
    static_cost = exe.static_cost

    count_dtype = np.int64 if jax.config.jax_enable_x64 else np.int32
    real = np.dtype(exe._real.dtype)
    tol_arr = np.asarray(np.inf if tol is None else tol, real)
    fstar_arr = np.asarray(np.nan if f_star is None else f_star, real)
    steps_run = 0
    steps_to_tol = diverged_step = None
    steps, losses, gnorms, counts = [np.zeros(1, np.int64)], [], [], [np.zeros((1, 3), np.int64)]

    t0 = time.perf_counter()
    end = min(chunk_size, num_steps)
    loss0, carry, host = exe.first(params, key, np.asarray(end, count_dtype), tol_arr, fstar_arr)
    slots = -(-chunk_size // every)  # records per segment
    start = 0
    while True:
        floats, ints, cum = jax.device_get(host)  # one transfer per array (see _build's pack)
        n, stopped, ok = (int(v) for v in ints)
        if start == 0:
            f0, g0, floats = floats[0], floats[1], floats[2:]
            if not ok:
                _raise_unresolvable(tol, f_star, float(f0), real)
        loss, gnorm = floats[:slots], floats[slots:]
        if start == 0:
            losses.append(np.asarray([f0], real))
            gnorms.append(np.asarray([g0], real))
            if n == 0 and stopped:  # the start point itself: non-finite, or already within tol
                if np.isfinite(f0):
                    steps_to_tol = 0
                else:
                    diverged_step = 0
                break
        rec = -(-n // every)
        at = start + np.minimum(every * np.arange(1, rec + 1), n)
        steps.append(at)
        losses.append(loss[:rec])
        if record:
            gnorms.append(gnorm[:rec])
        if static_cost is None:  # the records are increments since the previous record
            inc = cum[:rec]
            if inc.dtype == np.int32:  # without x64: never negative, so read as uint32 (2³² range)
                inc = inc.view(np.uint32)
            running = counts[-1][-1] + np.cumsum(inc.astype(np.int64), axis=0)
            counts.append(running)
        else:  # a constant cost per step: the cumulative counts are rebuilt here
            counts.append(at[:, None] * static_cost[None, :])
        steps_run = start + n
        if stopped:  # a non-finite loss, or the criterion held
            if np.isfinite(loss[rec - 1]):
                steps_to_tol = steps_run
            else:
                diverged_step = steps_run
            break
        if steps_run >= num_steps:
            break
        segment_exe, seconds = exe.get_segment()
        compile_time += seconds
        start, end = steps_run, min(steps_run + chunk_size, num_steps)
        carry, host = segment_exe(
            carry,
            key,
            np.asarray(start, count_dtype),
            np.asarray(end, count_dtype),
            tol_arr,
            loss0,
            fstar_arr,
        )
    params_out = jax.block_until_ready(carry[0])
    run_time = time.perf_counter() - t0

    cum = np.concatenate(counts)
    return History(
        loss=np.concatenate(losses),
        num_fun_evals=cum[:, 0],
        num_grads=cum[:, 1],
        num_jvps=cum[:, 2],
        grad_norm=np.concatenate(gnorms) if record else None,
        steps_run=steps_run,
        steps_to_tol=steps_to_tol,
        fun_evals_to_tol=None if steps_to_tol is None else int(cum[-1, 0]),
        diverged=diverged_step is not None,
        diverged_step=diverged_step,
        compile_time=compile_time,
        run_time=run_time,
        params=params_out,
        f_star=f_star,
        tol=tol,
        criterion=criterion,
        steps=np.concatenate(steps),
    )


# ---------------------------------------------------------------------------------------------------------
# A derivative-free method: forward differences + Polak–Ribière+ conjugate directions + secant steps


class _FdCgConfig(NamedTuple):
    num_steps: int
    step: float | None
    restart_every: int
    check_decrease: bool
    criterion: str | None


_FD_CG_CACHE: collections.OrderedDict = collections.OrderedDict()


def _build_fd_cg(f, cfg: _FdCgConfig):
    """The pure function that gets compiled: ``(x0, tol, f_star) -> (x, loss, gnorm, evals, n, stop, div)``."""
    count_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    cap = cfg.num_steps

    def fd_grad(y, f_y):
        s = jnp.sqrt(jnp.finfo(y.dtype).eps) if cfg.step is None else cfg.step
        h = jnp.asarray(s, y.dtype) * jnp.maximum(1.0, jnp.abs(y))
        h = (y + h) - y  # the step actually represented (Nocedal & Wright §8.1)
        fp = jax.vmap(lambda i: f(y.at[i].add(h[i])))(jnp.arange(y.size))
        return (fp - f_y) / h

    def pr_plus(g_new, g, p):
        beta = jnp.maximum(0.0, jnp.dot(g_new, g_new - g) / jnp.dot(g, g))
        p_new = -g_new + beta * p
        return jnp.where(jnp.dot(g_new, p_new) < 0, p_new, -g_new)

    def run_fd_cg(x0, tol, f_star):
        d = x0.size
        dt = x0.dtype
        f0 = f(x0).astype(dt)
        g0 = fd_grad(x0, f0)

        def stop_test(loss, gnorm):
            bad = ~jnp.isfinite(loss)
            if cfg.criterion == "relative_gap":
                return bad | ((loss - f_star) <= tol * (f0 - f_star))
            if cfg.criterion == "grad_norm":
                return bad | (gnorm <= tol)
            return bad

        def cond(c):
            return (c["k"] < cap) & ~c["stop"]

        def body(c):
            x, g, p, a0, fx = c["x"], c["g"], c["p"], c["a0"], c["fx"]
            # Keep the trial displacement ‖a0·p‖ within [1e-4, 1]·max(1, ‖x‖∞): far above the FD step
            # (so the secant curvature is not FD noise) and not far out on a non-quadratic loss. For a
            # quadratic the secant curvature is exact for any trial length, so this changes nothing there.
            scale = jnp.maximum(1.0, jnp.max(jnp.abs(x)))
            p_len = jnp.maximum(jnp.linalg.norm(p), jnp.finfo(dt).tiny)
            trial = jnp.abs(a0) * p_len
            trial = jnp.where(jnp.isfinite(trial), jnp.clip(trial, 1e-4 * scale, scale), scale)
            a0 = (trial / p_len).astype(dt)
            y = x + a0 * p
            fy = f(y).astype(dt)
            gy = fd_grad(y, fy)
            evals = d + 1
            slope = jnp.dot(g, p)
            curv = jnp.dot(gy - g, p) / a0  # pᵀ∇²f p along the segment (exact for a quadratic)
            alpha = -slope / curv
            x_c = x + alpha * p
            g_c = g + (alpha / a0) * (
                gy - g
            )  # the secant-interpolated gradient at the line minimum
            ok = (curv > 0) & jnp.isfinite(alpha)
            if cfg.check_decrease:
                f_c = f(x_c).astype(dt)
                evals = evals + 1
                ok = ok & (f_c <= fx)
            else:
                f_c = fx  # unknown; the monitored loss is taken below

            def accept(_):
                restart = c["since"] + 1 >= cfg.restart_every
                p_new = jnp.where(restart, -g_c, pr_plus(g_c, g, p))
                since = jnp.where(restart, 0, c["since"] + 1)
                return x_c, g_c, p_new, alpha, f_c, since, jnp.zeros((), count_dtype)

            def fallback(_):
                # f(x) is known when decreases are checked; otherwise it is evaluated (one more)
                fx_known = fx if cfg.check_decrease else f(x).astype(dt)
                extra0 = 0 if cfg.check_decrease else 1
                move = fy < fx_known  # the trial point, with its fresh FD gradient, is better

                def to_y(_):
                    return y, gy, fy, jnp.asarray(extra0, count_dtype)

                def stay(_):
                    return x, fd_grad(x, fx_known), fx_known, jnp.asarray(extra0 + d, count_dtype)

                x_n, g_n, f_n, extra = lax.cond(move, to_y, stay, None)
                p_n = -g_n
                length = jnp.abs(a0) * jnp.linalg.norm(p) * jnp.where(move, 2.0, 0.25)
                a_n = length / jnp.maximum(jnp.linalg.norm(p_n), jnp.finfo(dt).tiny)
                return x_n, g_n, p_n, a_n.astype(dt), f_n, jnp.zeros_like(c["since"]), extra

            x_n, g_n, p_n, a_n, f_n, since, extra = lax.cond(ok, accept, fallback, None)
            loss = f_n if cfg.check_decrease else f(x_n).astype(dt)  # monitoring: not counted
            gnorm = jnp.linalg.norm(g_n).astype(dt)
            k = c["k"] + 1
            step_evals = jnp.asarray(evals + extra, count_dtype)
            i = k - 1
            return {
                "x": x_n,
                "g": g_n,
                "p": p_n,
                "a0": a_n,
                "fx": loss,
                "since": since,
                "k": k,
                "stop": stop_test(loss, gnorm),
                "loss": c["loss"].at[i].set(loss),
                "gnorm": c["gnorm"].at[i].set(gnorm),
                # per step, not cumulative: the host sums in int64 (int32 without x64 would wrap)
                "counts": c["counts"].at[i].set(step_evals),
            }

        gnorm0 = jnp.linalg.norm(g0).astype(dt)
        init = {
            "x": x0,
            "g": g0,
            "p": -g0,
            "a0": jnp.ones((), dt),
            "fx": f0,
            "since": jnp.zeros((), jnp.int32),
            "k": jnp.zeros((), jnp.int32),
            "stop": stop_test(f0, gnorm0),
            "loss": jnp.zeros((cap,), dt),
            "gnorm": jnp.zeros((cap,), dt),
            "counts": jnp.zeros((cap,), count_dtype),
        }
        if cfg.criterion == "relative_gap":  # as in run(): no step when tol is below the rounding
            resolvable = ~_f_star_above(f0, f_star) & (
                init["stop"] | _gap_resolvable(tol, f0, f_star)
            )
            init["stop"] = init["stop"] | ~resolvable
        else:
            resolvable = jnp.ones((), bool)
        out = lax.while_loop(cond, body, init)
        return out["x"], f0, gnorm0, out["loss"], out["gnorm"], out["counts"], out["k"], resolvable

    return run_fd_cg


def fd_cg(
    fn: Callable[[Any], Any],
    params: Any,
    /,
    *,
    num_steps: int,
    tol: float | None = None,
    f_star: float | None = None,
    step: float | None = None,
    restart_every: int | None = None,
    check_decrease: bool = True,
) -> History:
    """Derivative-free minimisation: forward-difference gradients, Polak–Ribière+ directions, secant steps.

    Math (``x ∈ R^d``, ``params`` ravelled with :func:`jax.flatten_util.ravel_pytree`):

    - forward differences sharing the base value: ``ĝ(y)_i = (f(y + h_i e_i) − f(y)) / h_i`` with
      ``h_i = s·max(1, |y_i|)``, ``s = step`` or ``√ε`` (as :func:`gradlab.grads.forward_difference`):
      ``d + 1`` evaluations;
    - Polak–Ribière+ conjugate directions ``p_{k+1} = −g_{k+1} + β p_k``, ``β = max(0, g_{k+1}ᵀ(g_{k+1} −
      g_k)/‖g_k‖²)``, reset to ``−g_{k+1}`` when not a descent direction and every ``restart_every``
      iterations (default ``d``);
    - a secant line search that needs no gradient at ``x_k`` beyond the one carried: the FD gradient is taken
      at a trial point ``y = x_k + α₀ p_k`` only (``α₀`` the previous step, 1 at first); the curvature along
      ``p_k`` is ``c = (ĝ(y) − g_k)ᵀp_k / α₀``, the step ``α = −g_kᵀp_k / c`` (the zero of the secant of
      ``φ'(α) = ∇f(x_k + αp_k)ᵀp_k``), ``x_{k+1} = x_k + αp_k`` and ``g_{k+1} = g_k + (α/α₀)(ĝ(y) − g_k)``
      (linear interpolation of the gradient). On a quadratic this is the exact line search of linear CG,
      up to the O(√ε) FD error.

    Cost (``History.num_fun_evals``, exact): the first iteration also pays ``f(x_0)`` and ``ĝ(x_0)`` (``d +
    1``); each iteration ``d + 1`` (``f(y)`` and ``ĝ(y)``), plus 1 for ``f(x_{k+1})`` when
    ``check_decrease`` (the default). Safeguard: if ``c ≤ 0`` or (``check_decrease``) ``f(x_{k+1}) >
    f(x_k)``, the iteration falls back to a steepest-descent restart — to ``y`` with its fresh FD gradient
    when ``f(y) < f(x_k)`` (no extra evaluation), else staying at ``x_k`` with a fresh FD gradient there
    (``d`` more), the trial length ×2 or ×¼; without ``check_decrease`` the fallback also evaluates
    ``f(x_k)`` (1 more). ``check_decrease=False`` is the ``d + 1`` per iteration configuration for
    convex quadratics (least squares), where the curvature test is the only safeguard needed.

    The stopping test (not counted, as in :func:`run`): the relative gap of the monitored ``f(x_k)`` when
    ``f_star`` is given, else ``‖g_k‖ ≤ tol`` on the method's own gradient estimate (recorded in
    ``History.grad_norm``; it is not ``jax.grad``). Without ``check_decrease`` the monitored ``f(x_k)`` is an
    extra uncounted evaluation, used only to record and stop (never to steer). One ``lax.while_loop``,
    compiled once per (``fn``, parameter shapes/dtypes, settings); ``num_grads``/``num_jvps`` are zeros.

    Args:
      fn: the loss, ``fn(params) -> real scalar``.
      params: the starting point, any pytree of float arrays.
      num_steps: the maximum number of iterations, an integer ≥ 1.
      tol: the stopping tolerance (> 0), or ``None``. With ``f_star``, a tolerance below what the
        dtype resolves is an ``OptionError``, as in :func:`run`.
      f_star: the optimal value (the relative-gap criterion), or ``None``; above ``f(x₀)`` it is an
        ``OptionError``, as in :func:`run`.
      step: the relative FD step ``s`` (> 0), default ``√ε`` of the params dtype.
      restart_every: restart the conjugate direction every this many iterations (integer ≥ 1; default ``d``).
      check_decrease: evaluate (and count) ``f(x_{k+1})`` and fall back when it increased.

    >>> import jax, jax.numpy as jnp  # float64 (jax_enable_x64), as in the test set-up
    >>> A = jnp.diag(jnp.arange(1.0, 6.0))
    >>> h = fd_cg(lambda x: 0.5 * x @ A @ x - x.sum(), jnp.zeros(5), num_steps=50, tol=1e-8,
    ...           f_star=-0.5 * float(jnp.sum(1 / jnp.arange(1.0, 6.0))), check_decrease=False)
    >>> h.steps_to_tol, h.fun_evals_to_tol, [int(n) for n in h.num_fun_evals[:3]], h.num_grads.max()
    (5, 36, [0, 12, 18], np.int64(0))
    >>> [round(float(v), 6) for v in h.params]
    [1.0, 0.5, 0.333333, 0.25, 0.2]

    References: Nocedal & Wright (2006), *Numerical Optimization*, ch. 5 (conjugate gradients, PR+) and
    ch. 8 (finite differences); Polak & Ribière (1969), *Rev. Fr. Inform. Rech. Opér.* 3(16); Powell (1977),
    "Restart procedures for the conjugate gradient method", *Math. Programming* 12.
    """
    if not callable(fn):
        raise OptionError(
            f"fn: expected a callable loss fn(params) -> scalar, got {type(fn).__name__}."
        )
    _check_not_traced("descent.fd_cg", params=params, tol=tol, f_star=f_star)
    num_steps, tol, f_star = _check_stop_args(num_steps, tol, f_star)
    if step is not None:
        step = check_positive("step", step)
    if not isinstance(check_decrease, bool):
        raise OptionError(f"check_decrease: expected True or False, got {check_decrease!r}.")
    check_float_params("params", params)  # per leaf: ravel_pytree promotes a mixed tree
    x0, unravel = jax.flatten_util.ravel_pytree(params)
    if x0.size == 0:
        raise OptionError("params: expected a non-empty pytree of float arrays, got size 0.")
    restart_every = x0.size if restart_every is None else restart_every
    restart_every = check_positive_int("restart_every", restart_every)
    check_scalar_output("fn", jax.eval_shape(fn, params))
    criterion = None if tol is None else ("relative_gap" if f_star is not None else "grad_norm")
    cfg = _FdCgConfig(num_steps, step, restart_every, check_decrease, criterion)

    dtype = x0.dtype
    cache_key = (id(fn), cfg, _signature(params), trace_context())
    hit = _FD_CG_CACHE.get(cache_key)
    scalar = jax.ShapeDtypeStruct((), dtype)
    if hit is not None:
        _FD_CG_CACHE.move_to_end(cache_key)
        exe, compile_time = hit[0], 0.0
    else:
        t0 = time.perf_counter()
        exe = (
            jax.jit(_build_fd_cg(lambda v: fn(unravel(v)), cfg)).lower(x0, scalar, scalar).compile()
        )
        compile_time = time.perf_counter() - t0
        _FD_CG_CACHE[cache_key] = (exe, fn)  # the reference keeps fn's id from being reused
        while len(_FD_CG_CACHE) > _CACHE_SIZE:
            _FD_CG_CACHE.popitem(last=False)

    t0 = time.perf_counter()
    res = exe(
        x0,
        np.asarray(np.inf if tol is None else tol, dtype),
        np.asarray(np.nan if f_star is None else f_star, dtype),
    )
    x, f0, gnorm0, loss, gnorm, counts, n, resolvable = jax.block_until_ready(res)
    run_time = time.perf_counter() - t0
    if not bool(resolvable):
        _raise_unresolvable(tol, f_star, float(f0), np.dtype(dtype))
    n = int(n)
    # in the loss's dtype, as run() records it
    loss = np.concatenate([np.asarray(f0)[None], np.asarray(loss[:n])])
    gnorm = np.concatenate([np.asarray(gnorm0)[None], np.asarray(gnorm[:n])])
    evals = np.concatenate(
        [[0], x0.size + 1 + np.cumsum(np.asarray(counts[:n], np.int64))]
    )  # d + 1: f(x₀) and its FD gradient
    zeros = np.zeros_like(evals)

    steps_to_tol = diverged_step = None
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        diverged_step = int(bad[0])
    elif criterion is not None:
        if criterion == "relative_gap":
            met = np.flatnonzero(loss - f_star <= tol * (loss[0] - f_star))
        else:
            met = np.flatnonzero(gnorm <= tol)
        steps_to_tol = int(met[0]) if met.size else None
    return History(
        loss=loss,
        num_fun_evals=evals,
        num_grads=zeros,
        num_jvps=zeros.copy(),
        grad_norm=gnorm,
        steps_run=n,
        steps_to_tol=steps_to_tol,
        fun_evals_to_tol=None if steps_to_tol is None else int(evals[steps_to_tol]),
        diverged=diverged_step is not None,
        diverged_step=diverged_step,
        compile_time=compile_time,
        run_time=run_time,
        params=unravel(x),
        f_star=f_star,
        tol=tol,
        criterion=criterion,
    )
