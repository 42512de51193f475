"""Rematerialization (activation checkpointing) of a layer chain: strategies, an optimal planner, measurement.

A chain ``x_{i+1} = layer(p_i, x_i)``, ``i = 0 … L−1``, with the layer parameters stacked on a leading axis
(any pytree whose leaves have shape ``(L, …)``), differentiated in reverse mode. Reverse mode needs the
*tape* of every layer (the residuals its VJP reads) in reverse order. The seeds' three regimes:

- **vanilla** backprop stores every tape: ``L`` evaluations, memory ``c·L`` activations (``c`` = the tape of one
  layer in units of one activation; for ``tanh(x W + b)`` JAX ≤ 0.10 saves ``x``, ``tanh`` and ``1 − tanh``,
  ``c = 3``, and JAX 0.11 ``x`` and ``1 − tanh²``, ``c = 2``);
- **memory-poor** backprop stores nothing and recomputes every state from ``x_0``: ``L(L+1)/2`` evaluations;
- **checkpointed** backprop stores some states (*snapshots*) and recomputes the rest from the nearest one.

Strategies of :func:`scan_layers` (``names()``): ``none``; ``per_layer`` (``jax.checkpoint`` on every layer);
``every_k`` / ``sqrt`` (segments of ``k`` / ≈ ``√L`` layers, JAX's nested-scan remat: memory ``L/k + c·k``, one
extra forward pass); ``recursive`` (binary halving, ≈ ``log₂L`` snapshots, ``½·log₂L`` extra passes);
``binomial`` (the optimal schedule of :func:`plan` for a number of snapshots, as in Revolve); and every JAX
named policy (``dots_saveable``, ``nothing_saveable``, ``save_only_these_names`` with ``names=``, …) applied to
each layer.

**Revolve.** With ``s`` snapshots and at most ``t`` repeated evaluations of each step, at most
``β(s, t) = C(s+t, s)`` steps can be reversed, and for ``β(s, t−1) < L ≤ β(s, t)`` the minimal number of
repeated (advance) evaluations is ``t·L − C(s+t, t−1)`` (Griewank 1992; Griewank & Walther 2000). :func:`plan`
solves the recursion ``T(l, s) = min_m [m + T(l−m, s−1) + T(m, s)]`` (advance ``m`` steps, keep the state,
reverse the rest with one snapshot less, then the first ``m`` with all of them) by dynamic programming;
``model="revolve"`` reproduces Revolve's bound exactly, and the default ``model="chain"`` also lets a run of
``k`` layers be taped at once when ``c·(k−1)`` snapshots' worth of memory is free, which on a chain is never
worse (with ``c = 1`` it reverses ``C(s+t+1, s)`` steps with ``t`` repetitions); calibrated, when the run's
tape and working buffers fit the memory of ``s`` snapshots beyond one layer's reversal.

**Memory model.** Reverse mode keeps, per taped layer, the residuals JAX saves (``c`` activations), plus
working buffers. :func:`calibrate` reads both from compiled memory analyses of plain backprop on 1–3 layers
(``c`` = the slope in ``L``, ``working`` = the rest, ``single`` = one layer reversed alone, whose tape XLA
fuses away); :func:`plan` with ``calibration=`` then predicts every strategy's memory (temp + output
bytes of ``memory_analysis()`` on the tanh chain, width 128, batch 4096: within 19% at L = 8, 6% at
L = 128). **Cheaper tapes**: JAX's tape of ``tanh(x W + b)`` is ``x``, ``tanh`` and ``1 − tanh``
(``c = 3``); with ``layer_vjp=(p, x, y, ct) -> (dp, dx)``, the layer's VJP from its input and output (for
tanh: ``dz = ct·(1 − y²)``, ``dW = xᵀdz``, ``dx = dz Wᵀ``), ``none``, ``recursive`` and ``binomial`` tape
one state per layer (``c = 1``, as Revolve assumes) with no extra matmul.

**Why scans.** XLA on CPU undoes ``jax.checkpoint`` on unrolled code: once the optimization barriers are
expanded its CSE pass merges the recomputation into the forward pass (FLOPs equal plain, memory can get
worse). Every recomputation here lives in a loop body or a ``custom_vjp`` backward that is not identical to the
forward loop, and :func:`measure` counts FLOPs with loop trip counts (``cost_analysis`` counts a loop body
once), so the recomputation is proved, not assumed.

>>> import jax, jax.numpy as jnp
>>> from gradlab import remat
>>> layer = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])
>>> L, d = 6, 3
>>> params = {"w": 0.5 * jnp.ones((L, d, d)), "b": 0.1 * jnp.ones((L, d))}
>>> loss = lambda params, x, **opts: jnp.sum(remat.scan_layers(layer, params, x, **opts))
>>> x = jnp.ones(d)
>>> g0 = jax.grad(loss)(params, x)
>>> g1 = jax.grad(loss)(params, x, strategy="binomial", snapshots=1)
>>> bool(jnp.allclose(g0["w"], g1["w"], rtol=1e-12, atol=0))
True
>>> p = remat.plan(10, snapshots=3, model="revolve")  # C(3+2, 3) = 10 steps: at most 2 repeats each
>>> p.max_evals_per_layer - 1, p.recomputations, remat.revolve_advances(10, 3)
(2, 15, 15)

References:
  A. Griewank (1992), "Achieving logarithmic growth of temporal and spatial complexity in reverse automatic
  differentiation", *Optimization Methods and Software* 1:35–54.
  A. Griewank & A. Walther (2000), "Algorithm 799: Revolve: an implementation of checkpointing for the
  reverse or adjoint mode of computational differentiation", *ACM TOMS* 26(1):19–45.
  T. Chen, B. Xu, C. Zhang & C. Guestrin (2016), "Training deep nets with sublinear memory cost",
  arXiv:1604.06174.
  A. G. Baydin, B. A. Pearlmutter, A. A. Radul & J. M. Siskind (2018), "Automatic differentiation in machine
  learning: a survey", *JMLR* 18(153).
  JAX documentation, "Gradient checkpointing with jax.checkpoint" and autodidax.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from gradlab._validate import (
    OptionError,
    ShapeError,
    check_choice,
    check_options,
    check_positive,
    check_positive_int,
)

__all__ = [
    "Calibration",
    "Measurement",
    "Plan",
    "Split",
    "Tape",
    "calibrate",
    "hlo_flops",
    "measure",
    "names",
    "plan",
    "policy",
    "revolve_advances",
    "revolve_capacity",
    "scan_layers",
    "tape_cost",
]

# ---------------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------------

_cp = jax.checkpoint_policies
_POLICIES: dict[str, Any] = {
    "everything_saveable": _cp.everything_saveable,
    "nothing_saveable": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,
    "checkpoint_dots": _cp.dots_saveable,
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "checkpoint_dots_with_no_batch_dims": _cp.dots_with_no_batch_dims_saveable,
}
# Policies built from a tuple of checkpoint_name labels (``names=``).
_NAMED_POLICIES: dict[str, Any] = {
    "save_only_these_names": _cp.save_only_these_names,
    "save_any_names_but_these": _cp.save_any_names_but_these,
    "save_anything_except_these_names": _cp.save_anything_except_these_names,
}
_SCHEDULES = ("none", "per_layer", "every_k", "sqrt", "recursive", "binomial")
_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {"layer_vjp": None},
    "per_layer": {},
    "every_k": {"k": None},
    "sqrt": {},
    "recursive": {"layer_vjp": None},
    "binomial": {
        "snapshots": None,
        "model": "chain",
        "tape_cost": None,
        "calibration": None,
        "layer_vjp": None,
    },
    **{n: {} for n in _POLICIES},
    **{n: {"names": None} for n in _NAMED_POLICIES},
}
_MODELS = ("chain", "revolve")


def names() -> list[str]:
    """The strategy names :func:`scan_layers` accepts (schedules and JAX named policies).

    >>> "binomial" in names() and "dots_saveable" in names()
    True

    Reference: JAX documentation, "Gradient checkpointing with jax.checkpoint" (the named policies);
    Chen et al. (2016) (``sqrt``); Griewank & Walther (2000), Revolve (``binomial``).
    """
    return sorted(_OPTIONS)


def policy(name: str, *, names: Sequence[str] | None = None) -> Callable:
    """The ``jax.checkpoint`` policy registered as ``name`` (a plain function, as in ``jax.checkpoint_policies``).

    ``save_only_these_names`` / ``save_any_names_but_these`` / ``save_anything_except_these_names`` need
    ``names=`` (the labels given with ``jax.ad_checkpoint.checkpoint_name`` inside the layer).

    >>> policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    True
    >>> policy("dots_savable")
    Traceback (most recent call last):
    ...
    gradlab._validate.UnknownNameError: policy: unknown name 'dots_savable'; expected one of [...]. Did you mean 'dots_saveable'?

    Reference: JAX documentation, "Gradient checkpointing with jax.checkpoint"
    (``jax.checkpoint_policies`` and ``jax.ad_checkpoint.checkpoint_name``).
    """
    check_choice("policy", name, [*_POLICIES, *_NAMED_POLICIES])
    if name in _NAMED_POLICIES:
        if not names or isinstance(names, str):
            raise OptionError(
                f"names: the policy {name!r} needs names=('label', ...), the checkpoint_name labels used "
                f"inside the layer; got {names!r}."
            )
        return _NAMED_POLICIES[name](*names)
    if names is not None:
        raise OptionError(f"names: the policy {name!r} takes no names; drop names={names!r}.")
    return _POLICIES[name]


# ---------------------------------------------------------------------------------------------------------
# Schedules and the planner
# ---------------------------------------------------------------------------------------------------------


class Tape(NamedTuple):
    """Layers ``start … stop−1`` taped together (vanilla backprop over the run) from the state at ``start``."""

    start: int
    stop: int


class Split(NamedTuple):
    """Advance ``start → mid`` without taping, keep the state at ``mid`` (one snapshot), reverse ``right`` =
    ``[mid, stop)``, drop the snapshot, then reverse ``left`` = ``[start, mid)`` from the state at ``start``."""

    start: int
    mid: int
    stop: int
    left: Any
    right: Any


class Plan(NamedTuple):
    """A remat schedule with its predicted costs (units: one layer evaluation, one activation).

    ``peak_activations`` is the predicted peak of activation memory: the stored activations (snapshots +
    the tape being reversed) plus, when the plan is calibrated (``working``, ``single``; see
    :func:`calibrate`), the working buffers of the reversal — not the input, the parameters or the
    gradient outputs. Uncalibrated (the default) it counts stored activations only, as Revolve does.
    ``forward_evals`` counts every layer evaluation in one forward + backward (``L`` for vanilla);
    ``flops_ratio = (forward_evals + 2L) / 3L`` counts a backward layer as two forward layers;
    ``memory_ratio`` is ``peak_activations`` ÷ vanilla's (``tape_cost · L + working``); ``peak_bytes`` is
    ``peak_activations × activation_bytes`` (predicted temporary memory: add the gradient outputs' bytes to
    compare with :func:`measure`'s ``memory_bytes``).
    """

    strategy: str
    num_layers: int
    schedule: Any
    snapshots: int | None
    tape_cost: float
    peak_activations: float
    forward_evals: int
    recomputations: int
    max_evals_per_layer: int
    flops_ratio: float
    memory_ratio: float
    peak_bytes: float | None
    working: float = 0.0
    single: float | None = None


class Calibration(NamedTuple):
    """The memory model of one layer, from compiled memory analyses of plain backprop (:func:`calibrate`).

    Units are activations (``activation_bytes``, the bytes of one layer output). ``tape_cost``: activations
    per taped layer (the slope of plain backprop's temporaries in ``L``); ``working``: plain backprop's
    temporaries beyond ``tape_cost · L`` (the state and cotangent in flight, loop buffers), which the
    reversal of any multi-layer tape needs too; ``single``: the temporaries of reversing one layer on its
    own (no scan, so XLA fuses its tape away: the layer's input and cotangent, about 2 for a tanh layer).
    Pass it to :func:`plan` as ``calibration=``.
    """

    tape_cost: float
    working: float
    single: float
    activation_bytes: int


def revolve_capacity(snapshots: int, repeats: int) -> int:
    """``β(s, t) = C(s + t, s)``: the most steps reversible with ``s`` snapshots and ≤ ``t`` repeats per step.

    >>> revolve_capacity(3, 2), revolve_capacity(1, 4)
    (10, 5)

    Reference: Griewank (1992), *Optim. Methods Softw.* 1:35–54; Griewank & Walther (2000),
    "Algorithm 799: Revolve", *ACM TOMS* 26(1):19–45.
    """
    s = check_positive_int("snapshots", snapshots)
    t = check_positive_int("repeats", repeats, minimum=0)
    return math.comb(s + t, s)


def revolve_advances(num_steps: int, snapshots: int) -> int:
    """Revolve's minimal number of advance (re-)evaluations to reverse ``l`` steps with ``s`` snapshots.

    ``t·l − C(s+t, t−1)`` for ``β(s, t−1) < l ≤ β(s, t)`` (Griewank & Walther 2000, Prop. 1); the first
    forward sweep's ``l − 1`` advances are included, the tapes are not.

    >>> revolve_advances(10, 3), revolve_advances(4, 1)  # memory-poor: 3 + 2 + 1
    (15, 6)

    Reference: Griewank & Walther, Algorithm 799: Revolve, *ACM Trans. Math. Softw.* 26 (2000).
    """
    l = check_positive_int("num_steps", num_steps)
    s = check_positive_int("snapshots", snapshots)
    t = 0
    while math.comb(s + t, s) < l:
        t += 1
    return t * l - math.comb(s + t, t - 1) if t > 0 else 0


def _tape_peak(l: int, c: float, working: float, single: float | None) -> float:
    """Activations held while a run of ``l`` layers is taped and reversed (residuals + working buffers)."""
    if l == 1 and single is not None:
        return single
    return c * l + working


def _dp(num_layers: int, snapshots: int, tape_cost: float, model: str, working=0.0, single=None):
    """Tables ``cost[s, l]`` (evaluations), ``peak[s, l]`` and the split ``arg[s, l]`` (0 = tape the run)."""
    inf = np.iinfo(np.int64).max // 4
    L, S = num_layers, snapshots
    floor = _tape_peak(1, tape_cost, working, single)
    cost = np.full((S + 1, L + 1), inf, dtype=np.int64)
    peak = np.full((S + 1, L + 1), np.inf)
    arg = np.zeros((S + 1, L + 1), dtype=np.int64)
    for s in range(S + 1):
        for l in range(1, L + 1):
            # a run is taped at once when its tape fits the memory of s snapshots beyond one layer's
            # reversal (uncalibrated: c·(l − 1) ≤ s)
            tp = _tape_peak(l, tape_cost, working, single)
            if (l == 1 or model == "chain") and tp <= s + floor + 1e-9:
                cost[s, l], peak[s, l] = l, tp
                continue
            if s == 0:
                continue
            m = np.arange(1, l)
            c = m + cost[s - 1, l - m] + cost[s, m]
            c = np.where((cost[s - 1, l - m] >= inf) | (cost[s, m] >= inf), inf, c)
            best = c.min()
            if best >= inf:
                continue
            ties = np.flatnonzero(c == best)
            pk = np.maximum(1 + peak[s - 1, l - m[ties]], peak[s, m[ties]])
            j = ties[int(np.argmin(pk))]
            cost[s, l], peak[s, l], arg[s, l] = best, pk.min(), m[j]
    return cost, peak, arg


def _build(arg, s: int, start: int, stop: int):
    m = int(arg[s, stop - start])
    if m == 0:
        return Tape(start, stop)
    mid = start + m
    return Split(start, mid, stop, _build(arg, s, start, mid), _build(arg, s - 1, mid, stop))


def _recursive_tree(start: int, stop: int):
    if stop - start <= 2:
        return Tape(start, stop)
    mid = (
        start + (stop - start + 1) // 2
    )  # the first (checkpointed) half is the larger, as in the JAX docs
    return Split(start, mid, stop, _recursive_tree(start, mid), _recursive_tree(mid, stop))


def _tree_costs(tree, tape_cost: float, num_layers: int, working=0.0, single=None):
    """(evaluations, peak activations, evaluations per layer) of a schedule tree."""
    counts = np.zeros(num_layers, dtype=np.int64)

    def walk(node):
        if isinstance(node, Tape):
            counts[node.start : node.stop] += 1
            l = node.stop - node.start
            return l, _tape_peak(l, tape_cost, working, single)
        counts[node.start : node.mid] += 1
        er, pr = walk(node.right)
        el, pl = walk(node.left)
        return (node.mid - node.start) + er + el, max(1 + pr, pl)

    evals, peak = walk(tree)
    return int(evals), float(peak), counts


def _sqrt_k(num_layers: int) -> int:
    r = math.sqrt(num_layers)
    divisors = [k for k in range(1, num_layers + 1) if num_layers % k == 0 and r / 2 <= k <= 2 * r]
    return min(divisors, key=lambda k: (abs(k - r), k)) if divisors else max(1, round(r))


def plan(
    num_layers: int,
    *,
    strategy: str = "binomial",
    snapshots: int | None = None,
    memory_budget: float | None = None,
    activation_bytes: float | None = None,
    tape_cost: float | None = None,
    k: int | None = None,
    model: str = "chain",
    working: float | None = None,
    single: float | None = None,
    calibration: Calibration | None = None,
) -> Plan:
    """The schedule of ``strategy`` for ``num_layers`` layers, with predicted peak memory and evaluations.

    ``strategy="binomial"`` (default) is the optimal schedule for ``snapshots`` stored states (dynamic
    programming over ``T(l, s) = min_m [m + T(l−m, s−1) + T(m, s)]``; Revolve's bound is met exactly with
    ``model="revolve"``). With ``memory_budget`` (bytes) and ``activation_bytes`` (bytes of one layer output)
    instead, it returns the cheapest schedule — over ``none``, ``per_layer``, ``every_k`` (all ``k``),
    ``sqrt``, ``recursive`` and ``binomial`` — whose predicted peak fits the budget. Other strategies
    (``none``, ``per_layer``, ``every_k`` with ``k=``, ``sqrt``, ``recursive``) return their own predictions.

    The memory model, in activations: a snapshot holds 1; a run of ``l ≥ 2`` layers taped and reversed holds
    ``tape_cost · l + working``; one layer reversed alone holds ``single`` (its tape is fused away). Peaks:
    ``none`` ``c·L + w``; ``per_layer`` ``L + w`` (``L + c`` uncalibrated); ``every_k`` ``L/k + c·k + w``;
    ``recursive`` / ``binomial`` the largest (snapshots held + tape) over the schedule. ``tape_cost``
    (default 1) comes from :func:`tape_cost` (JAX's residuals) or, with the working buffers, from
    :func:`calibrate` (pass ``calibration=``, which also sets ``activation_bytes``). Uncalibrated
    (``working=None``) the peak counts stored activations only, as Revolve does.

    >>> p = plan(8, snapshots=2)
    >>> p.forward_evals, p.peak_activations, p.max_evals_per_layer
    (18, 3.0, 3)
    >>> plan(128, strategy="sqrt", tape_cost=3).memory_ratio < 0.2
    True
    >>> cal = Calibration(tape_cost=3.0, working=3.0, single=2.0, activation_bytes=2**21)
    >>> plan(64, snapshots=1, calibration=cal).peak_activations  # memory-poor: 1 snapshot + 1 layer
    3.0
    >>> plan(0)
    Traceback (most recent call last):
    ...
    gradlab._validate.OptionError: num_layers: expected an integer ≥ 1, got 0.

    Reference: Griewank & Walther (2000), "Algorithm 799: Revolve", *ACM TOMS* 26(1); Griewank &
    Walther (2008), *Evaluating Derivatives*, §12.3; Chen et al. (2016), arXiv:1604.06174 (sqrt).
    """
    L = check_positive_int("num_layers", num_layers)
    if calibration is not None:
        given = {"tape_cost": tape_cost, "working": working, "single": single}
        clash = [n for n, v in given.items() if v is not None]
        if activation_bytes is not None:
            clash.append("activation_bytes")
        if clash:
            raise OptionError(
                f"calibration: it sets tape_cost, working, single and activation_bytes; drop "
                f"{', '.join(f'{n}=' for n in clash)} or the calibration."
            )
        tape_cost, working, single = calibration.tape_cost, calibration.working, calibration.single
        activation_bytes = calibration.activation_bytes
    c = check_positive("tape_cost", 1.0 if tape_cost is None else tape_cost)
    w = None if working is None else _check_nonnegative("working", working)
    one = None if single is None else check_positive("single", single)
    check_choice("model", model, _MODELS)
    if memory_budget is not None:
        return _plan_budget(L, memory_budget, activation_bytes, c, model, w, one)
    check_choice("strategy", strategy, _SCHEDULES)
    act = None if activation_bytes is None else check_positive("activation_bytes", activation_bytes)
    if strategy != "binomial" and snapshots is not None:
        raise OptionError(
            f"snapshots: only strategy='binomial' takes snapshots; got strategy={strategy!r}."
        )
    if strategy != "every_k" and k is not None:
        raise OptionError(f"k: only strategy='every_k' takes k; got strategy={strategy!r}.")
    wk = 0.0 if w is None else w
    make = partial(_make_plan, L=L, c=c, act=act, working=wk, single=one)
    if strategy == "none":
        return make("none", Tape(0, L), None, _tape_peak(L, c, wk, one), L, np.ones(L, int))
    if strategy == "per_layer":
        # L stored inputs; the backward loop recomputes and reverses one layer at a time
        return make("per_layer", None, None, L + (c if w is None else wk), 2 * L, np.full(L, 2))
    if strategy in ("every_k", "sqrt"):
        if strategy == "sqrt":
            k = _sqrt_k(L)
        elif k is None:
            raise OptionError(
                "k: strategy='every_k' needs k=, the segment length (1 ≤ k ≤ num_layers)."
            )
        k = check_positive_int("k", k)
        if k > L:
            raise OptionError(
                f"k: expected 1 ≤ k ≤ num_layers = {L}, got {k}. Pass a shorter segment."
            )
        n, r = divmod(L, k)
        counts = np.concatenate([np.full(n * k, 2), np.ones(r, int)]).astype(np.int64)
        seg = c * k + wk if (k > 1 or w is None) else wk  # k = 1 is per_layer's loop
        return make(strategy, (k, n, r), None, n + seg, int(counts.sum()), counts)
    if strategy == "recursive":
        tree = _recursive_tree(0, L)
        evals, peak, counts = _tree_costs(tree, c, L, wk, one)
        return make("recursive", tree, None, peak, evals, counts)
    # binomial
    floor = _tape_peak(1, c, wk, one)
    full = math.ceil(_tape_peak(L, c, wk, one) - floor - 1e-9) if model == "chain" else L - 1
    if snapshots is None:  # about the memory of sqrt
        ref = plan(L, strategy="sqrt", tape_cost=c, working=w, single=one)
        snapshots = max(1, round(ref.peak_activations - floor))
    s = check_positive_int("snapshots", snapshots)
    s_eff = min(s, max(full, 1))
    _, _, arg = _dp(L, s_eff, c, model, wk, one)
    tree = _build(arg, s_eff, 0, L)
    evals, peak, counts = _tree_costs(tree, c, L, wk, one)
    return make("binomial", tree, s, peak, evals, counts)


def _check_nonnegative(argument: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{argument}: expected a number ≥ 0, got {value!r}.") from None
    if not (0 <= x < float("inf")):
        raise OptionError(f"{argument}: expected a finite number ≥ 0, got {value!r}.")
    return x


def _make_plan(strategy, schedule, snapshots, peak, evals, counts, *, L, c, act, working, single):
    return Plan(
        strategy=strategy,
        num_layers=L,
        schedule=schedule,
        snapshots=snapshots,
        tape_cost=c,
        peak_activations=float(peak),
        forward_evals=int(evals),
        recomputations=int(evals - L),
        max_evals_per_layer=int(np.max(counts)) if counts is not None else 0,
        flops_ratio=(evals + 2 * L) / (3 * L),
        memory_ratio=float(peak) / _tape_peak(L, c, working, single),
        peak_bytes=None if act is None else float(peak) * act,
        working=working,
        single=single,
    )


def _plan_budget(L, budget, act, c, model, w, one) -> Plan:
    budget = check_positive("memory_budget", budget)
    if act is None:
        raise OptionError(
            "activation_bytes: memory_budget needs activation_bytes=, the bytes of one layer output "
            "(e.g. x.size * x.dtype.itemsize)."
        )
    act = check_positive("activation_bytes", act)
    units = budget / act
    least = _tape_peak(1, c, 0.0 if w is None else w, one)
    if units < least:
        raise OptionError(
            f"memory_budget: {budget:g} bytes hold {units:.3g} activations, less than one layer's tape "
            f"({least:g} activations of {act:g} bytes = {least * act:g} bytes). Pass a budget ≥ "
            f"{least * act:g} bytes."
        )
    kw = {"tape_cost": c, "working": w, "single": one}
    candidates = [plan(L, strategy=n, **kw) for n in ("none", "per_layer", "sqrt", "recursive")]
    candidates += [plan(L, strategy="every_k", k=k, **kw) for k in range(1, L + 1)]
    # binomial: the schedule for s snapshots peaks at most at s + one layer's reversal
    s = math.floor(units - least + 1e-9)
    if s >= 1:
        candidates.append(plan(L, snapshots=s, model=model, **kw))
    fits = [p for p in candidates if p.peak_activations <= units + 1e-9]
    if not fits:
        raise OptionError(
            f"memory_budget: no schedule of {L} layers fits {budget:g} bytes ({units:.3g} activations); "
            f"the leanest needs {min(p.peak_activations for p in candidates):.3g}. Raise the budget."
        )
    best = min(fits, key=lambda p: (p.forward_evals, p.peak_activations))
    return best._replace(peak_bytes=best.peak_activations * act)


# ---------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------


def _num_layers(params) -> int:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ShapeError(
            "params: expected a pytree of arrays stacked on a leading layer axis, got no arrays."
        )
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ShapeError(
            "params: every leaf must be stacked on a leading layer axis of the same length L; got leading "
            f"sizes {sorted(map(str, sizes))}. Stack per-layer parameters with jax.tree.map(jnp.stack, ...)."
        )
    L = sizes.pop()
    if L < 1:
        raise ShapeError("params: the layer axis has length 0; expected L ≥ 1 layers.")
    return int(L)


def _slice(params, lo: int, hi: int):
    return jax.tree.map(lambda a: a[lo:hi], params)


def _chain(layer, params, x, policy=None):
    def run(params, x):
        return lax.scan(lambda c, p: (layer(p, c), None), x, params)[0]

    return jax.checkpoint(run, policy=policy)(params, x) if policy is not None else run(params, x)


def _every_k(layer, params, x, k: int):
    L = _num_layers(params)
    n, r = divmod(L, k)
    head = jax.tree.map(lambda a: a[: n * k].reshape(n, k, *a.shape[1:]), params)
    segment = jax.checkpoint(partial(_chain, layer))
    x = lax.scan(lambda c, p: (segment(p, c), None), x, head)[0]
    if r:  # the remainder is taped plainly (an unrolled checkpoint here would be merged back by XLA's CSE)
        x = _chain(layer, _slice(params, n * k, L), x)
    return x


def _zero_from(ct) -> jax.Array:
    """A scalar ``0·ct[0]`` that XLA cannot fold away (floating ``0·c`` is NaN for NaN ``c``)."""
    leaf = jax.tree.leaves(ct)[0]
    return jnp.zeros((), leaf.dtype) * jnp.reshape(leaf, (-1,))[0]


def _after(tree, zero):
    """``tree + 0``, made to depend on the cotangent in flight through ``zero`` (see :func:`_zero_from`).

    Without it XLA:CPU hoists every recomputation of the backward pass (and every parameter slice it reads)
    up into the forward pass — optimization barriers are expanded before scheduling — and keeps all the
    recomputed states alive at once."""

    def add(a):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return a
        return a + zero.astype(a.dtype)

    return jax.tree.map(add, tree)


def _fenced(zero, fn: Callable, *args):
    """``fn(*args)`` inside ``lax.cond(zero == 0, …)``: a fence XLA cannot hoist code out of.

    The tape of a run allocates its stacked residual buffers with operand-free broadcasts, which XLA:CPU
    would otherwise schedule at the very start (all tapes alive at once). ``zero`` is ``0·ct[0]`` (see
    :func:`_zero_from`), so the other branch — NaNs of the right shapes — runs only for a NaN cotangent,
    whose gradient is NaN anyway."""
    shapes = jax.eval_shape(fn, *args)

    def nans(*_):
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)

    return lax.cond(zero == 0, fn, nans, *args)


def _advance(layer, params, x, lo: int, hi: int):
    """The primal chain over layers ``lo … hi−1``, reading the layer parameters in place (no slice copy)."""

    def body(c, i):
        return layer(_index(params, i), c), None

    return lax.scan(body, x, jnp.arange(lo, hi))[0]


def _index(tree, i):
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _tapes(layer, layer_vjp):
    """``(record, reverse)`` of a tape over layers ``lo … hi−1``: ``record(params, lo, hi, xs) -> (y, res)``
    and ``reverse(params, lo, hi, res, ct) -> (parameter cotangents (hi−lo, …), cotangent of xs)``.

    Without ``layer_vjp`` the tape is JAX's (``jax.vjp`` of the scan: the residuals JAX saves, ``tape_cost``
    activations per layer). With ``layer_vjp(p, x, y, ct) -> (dp, dx)`` — the layer's VJP from its input
    and output, no recomputation — the tape stores each layer's input once (the next layer's input is this
    layer's output, so one activation per layer) and a reverse loop calls ``layer_vjp``."""
    if layer_vjp is None:

        def record(params, lo, hi, xs):
            return jax.vjp(partial(_chain, layer), _slice(params, lo, hi), xs)

        def reverse(params, lo, hi, res, ct):
            return res(ct)

        return record, reverse

    def record(params, lo, hi, xs):
        def body(c, i):
            return layer(_index(params, i), c), c

        y, inputs = lax.scan(body, xs, jnp.arange(lo, hi))
        return y, (inputs, y)

    def reverse(params, lo, hi, res, ct):
        inputs, y = res

        def body(carry, i):
            ct, y = carry
            x = _index(inputs, i - lo)
            dp, dx = layer_vjp(_index(params, i), x, y, ct)
            return (dx, x), dp

        (ct, _), pieces = lax.scan(body, (ct, y), jnp.arange(lo, hi), reverse=True)
        return pieces, ct

    return record, reverse


def _execute(layer, params, x, tree, layer_vjp=None):
    """Run a schedule tree with a custom VJP: advances and tapes are separate scans, as planned."""
    spine = []
    node = tree
    while isinstance(node, Split):
        spine.append(node)
        node = node.right
    last = node
    record, reverse_tape = _tapes(layer, layer_vjp)

    @jax.custom_vjp
    def run(params, x):
        return _chain(layer, params, x)

    def fwd(params, x):
        snaps = []
        cur = x
        for sp in spine:
            cur = _advance(layer, params, cur, sp.start, sp.mid)
            snaps.append(cur)
        y, res_last = record(params, last.start, last.stop, cur)
        return y, (params, x, tuple(snaps), res_last)

    def bwd(res, ct):
        params, x, snaps, res_last = res
        grads = jax.tree.map(jnp.zeros_like, params)

        def put(grads, piece, start):
            return jax.tree.map(
                lambda g, d: lax.dynamic_update_slice_in_dim(g, d.astype(g.dtype), start, 0),
                grads,
                piece,
            )

        def taped(node):
            def fn(xs, ct):
                return reverse_tape(
                    params, node.start, node.stop, record(params, node.start, node.stop, xs)[1], ct
                )

            return fn

        def reverse(node, stored, ct, grads):
            # ``stored`` is the state as stored (a snapshot, the input or an advance's output), never an
            # earlier ``_after`` of it: a chain ``x + 0·ct₁[0] + 0·ct₂[0] + …`` down the left spine is
            # fused by XLA into one kernel that reads every ct₁, ct₂, … and so keeps one cotangent alive
            # per level (memory-poor backprop then held ~L activations instead of 1 + c).
            zero = _zero_from(ct)
            xs = _after(stored, zero)
            if isinstance(node, Tape):
                piece, ct = _fenced(zero, taped(node), xs, ct)
                return ct, put(grads, piece, node.start)
            # fenced too: an advance of one layer is a trip-count-1 loop that XLA unrolls, and the
            # parameter slice it then reads would be hoisted to the start of the program (one slice per
            # such advance alive at once: +0.02·L activations at width 128, batch 4096)
            xm = _fenced(zero, lambda xs: _advance(layer, params, xs, node.start, node.mid), xs)
            ct, grads = reverse(node.right, xm, ct, grads)
            return reverse(node.left, stored, ct, grads)

        piece, ct = reverse_tape(params, last.start, last.stop, res_last, ct)
        grads = put(grads, piece, last.start)
        starts = (x, *snaps)[: len(spine)]
        for sp, xs in zip(reversed(spine), reversed(starts), strict=True):
            ct, grads = reverse(sp.left, xs, ct, grads)
        return grads, ct

    run.defvjp(fwd, bwd)
    return run(params, x)


def scan_layers(
    layer: Callable, params: Any, x: Any, /, *, strategy: str = "none", **options: Any
) -> Any:
    """``x ← layer(p_i, x)`` for ``i = 0 … L−1`` (``params`` stacked on a leading axis), differentiably,
    under a remat ``strategy``.

    Shapes: every leaf of ``params`` is ``(L, …)``; ``x`` is any array (or pytree) that ``layer`` maps to the
    same shape and dtype. Strategies (:func:`names`) and their options:

    - ``none``: plain ``lax.scan`` (vanilla backprop); ``per_layer``: ``jax.checkpoint`` on each layer;
    - ``every_k`` (``k=``) and ``sqrt``: an outer scan over segments whose body is a checkpointed inner scan;
    - ``recursive`` and ``binomial`` (``snapshots=``, ``model=``, ``tape_cost=``, ``calibration=``): the
      schedule tree of :func:`plan`, run by a ``custom_vjp`` whose advances and tapes are separate scans,
      each tape fenced in a ``lax.cond`` so that XLA keeps the planned order (reverse mode only: ``jax.jvp``
      through them is not defined; parameters must be floating). ``tape_cost`` defaults to
      :func:`tape_cost` of the layer (1 with ``layer_vjp``); with ``calibration=`` (:func:`calibrate`) the
      schedule is the one :func:`plan` predicts with that calibration;
    - ``layer_vjp=(p, x, y, ct) -> (dp, dx)`` (``none``, ``recursive``, ``binomial``): the layer's VJP from
      its input ``x`` and output ``y``; tapes then store one state per layer instead of JAX's residuals;
    - a JAX named policy (``dots_saveable``, ``nothing_saveable``, ``save_only_these_names`` with
      ``names=``, …): ``jax.checkpoint(layer, policy=…)`` on each layer.

    Gradients agree with ``strategy="none"`` to rounding (the same per-layer VJPs in the same order).

    >>> layer = lambda p, x: jnp.tanh(p * x)
    >>> params = jnp.linspace(0.5, 1.5, 8)
    >>> f = lambda p, s, **o: scan_layers(layer, p, jnp.float64(0.3), strategy=s, **o)
    >>> g = [jax.grad(f)(params, s) for s in ("none", "sqrt", "recursive")]
    >>> g.append(jax.grad(f)(params, "every_k", k=3))
    >>> all(bool(jnp.allclose(g[0], gi, rtol=1e-13)) for gi in g)
    True
    >>> scan_layers(layer, params, 0.3, strategy="sqrtt")
    Traceback (most recent call last):
    ...
    gradlab._validate.UnknownNameError: strategy: unknown name 'sqrtt'; expected one of [...]. Did you mean 'sqrt'?

    Reference: JAX documentation, "Gradient checkpointing with jax.checkpoint" (remat of scans,
    recursive checkpointing); Chen et al. (2016); Griewank & Walther (2000), Revolve.
    """
    check_choice("strategy", strategy, _OPTIONS)
    check_options(f"scan_layers(strategy={strategy!r})", options, _OPTIONS[strategy])
    L = _num_layers(params)
    layer_vjp = options.get("layer_vjp")
    if layer_vjp is not None and not callable(layer_vjp):
        raise OptionError(
            f"layer_vjp: expected a function (p, x, y, ct) -> (dp, dx), got {type(layer_vjp).__name__}."
        )
    if strategy == "none":
        return (
            _chain(layer, params, x)
            if layer_vjp is None
            else _execute(layer, params, x, Tape(0, L), layer_vjp)
        )
    if strategy == "per_layer":
        return lax.scan(lambda c, p: (jax.checkpoint(layer)(p, c), None), x, params)[0]
    if strategy in _POLICIES or strategy in _NAMED_POLICIES:
        pol = policy(strategy, **options)
        return lax.scan(lambda c, p: (jax.checkpoint(layer, policy=pol)(p, c), None), x, params)[0]
    if strategy in ("every_k", "sqrt"):
        k = _sqrt_k(L) if strategy == "sqrt" else options.get("k")
        if k is None:
            raise OptionError("k: strategy='every_k' needs k=, the segment length (1 ≤ k ≤ L).")
        k = check_positive_int("k", k)
        if k > L:
            raise OptionError(f"k: expected 1 ≤ k ≤ L = {L} (the number of layers), got {k}.")
        return _every_k(layer, params, x, k)
    if strategy == "recursive":
        tree = _recursive_tree(0, L)
    else:
        cal, c = options.get("calibration"), options.get("tape_cost")
        if cal is None and c is None:
            c = 1.0 if layer_vjp is not None else tape_cost(layer, _slice(params, 0, 1), x)
        tree = plan(
            L,
            snapshots=options.get("snapshots"),
            tape_cost=c,
            model=options.get("model", "chain"),
            calibration=cal,
        ).schedule
    if isinstance(tree, Tape) and layer_vjp is None:
        return _chain(layer, params, x)
    return _execute(layer, params, x, tree, layer_vjp)


def tape_cost(layer: Callable, params: Any, x: Any, /, *, policy: str | None = None) -> float:
    """Activations one layer's tape keeps (residual bytes per layer ÷ bytes of ``x``), from JAX's residuals.

    Computed from ``jax.ad_checkpoint.print_saved_residuals`` (abstractly, nothing runs) as the residual
    bytes of a 3-layer minus a 2-layer scan, leaving out residuals that are arguments (the parameters); the
    floor is 1/64 (a layer with no residuals, e.g. a bias shift). ``params``: a stack with at least one layer (the first is used).

    >>> layer = lambda p, x: jnp.tanh(x @ p)
    >>> tape_cost(layer, jnp.ones((1, 4, 4)), jnp.ones((2, 4))) in (3.0, 2.0)  # see below
    True

    JAX ≤ 0.10 saves ``x``, ``tanh(·)`` and ``1 − tanh(·)`` (3.0); JAX 0.11 ``x`` and ``1 − tanh(·)²``
    (2.0): the tape depends on JAX's differentiation rules, not on the backend.
    >>> tape_cost(layer, jnp.ones((1, 4, 4)), jnp.ones((2, 4)), policy="dots_saveable")
    1.0

    Reference: JAX documentation, "Gradient checkpointing with jax.checkpoint"
    (``print_saved_residuals``); Griewank & Walther (2008), *Evaluating Derivatives*, ch. 4.
    """
    pol = None if policy is None else globals()["policy"](policy)
    one = _slice(params, 0, 1)
    x_bytes = sum(
        a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(lambda x: x, x))
    )

    def residual_bytes(n):
        stack = jax.tree.map(lambda a: jnp.concatenate([a] * n), one)
        return sum(
            _residual_line_bytes(line)
            for line in _saved_residual_lines(lambda p, x: _chain(layer, p, x, pol), stack, x)
            if "from the argument" not in line
        )

    return max(float((residual_bytes(3) - residual_bytes(2)) / x_bytes), 1 / 64)


def calibrate(
    layer: Callable, params: Any, x: Any, /, *, layer_vjp: Callable | None = None
) -> Calibration:
    """The memory model of ``layer`` on ``x`` (:class:`Calibration`), from compiled plain backprop.

    Compiles (never runs) the gradient of ``sum(scan_layers(layer, p, x))`` with respect to ``p`` and ``x``
    for 1, 2 and 3 copies of the first layer (with ``layer_vjp``: its output-based tape), and reads the
    temporaries ``t₁, t₂, t₃`` of ``memory_analysis()`` in activations (bytes of ``x``): ``tape_cost =
    t₃ − t₂`` (what XLA really keeps per taped layer), ``working = t₂ − 2·tape_cost`` (plain backprop's
    buffers beyond its tape) and ``single = t₁ + 1`` (one layer reversed alone, plus its cotangent output,
    which inside a chain is a temporary). :func:`plan` with ``calibration=`` then predicts the temporaries
    of every strategy; add the gradient outputs (the same for all) to compare with ``memory_bytes``.

    >>> layer = lambda p, x: jnp.tanh(x @ p)
    >>> cal = calibrate(layer, jnp.ones((1, 16, 16), jnp.float32), jnp.ones((512, 16), jnp.float32))
    >>> cal.tape_cost == tape_cost(layer, jnp.ones((1, 16, 16)), jnp.ones((512, 16)))  # 3.0 or 2.0
    True
    >>> round(cal.working, 1), cal.single  # state, cotangent, …; one layer reversed alone
    (3.0, 2.0)

    Reference: JAX documentation, "Ahead-of-time lowering and compilation" and
    ``jax.stages.Compiled.memory_analysis``; Griewank & Walther (2008), ch. 4 (memory of the tape).
    """
    act = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(lambda x: x, x)))
    one = _slice(params, 0, 1)

    def temp(n):
        stack = jax.tree.map(lambda a: jnp.concatenate([a] * n), one)

        def loss(p, x):
            y = scan_layers(layer, p, x, layer_vjp=layer_vjp)
            return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(y))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(stack, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes / act

    t1, t2, t3 = temp(1), temp(2), temp(3)
    c = max(t3 - t2, 1 / 64)
    return Calibration(
        tape_cost=float(c),
        working=float(max(t2 - 2 * c, 0.0)),
        single=float(t1 + 1),
        activation_bytes=int(act),
    )


def _saved_residual_lines(fn: Callable, *args: Any) -> tuple[str, ...]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    return tuple(line for line in buf.getvalue().splitlines() if line.strip())


def _residual_line_bytes(line: str) -> int:
    """Bytes of a ``print_saved_residuals`` line such as ``f32[4,16,16] from ...``."""
    m = re.match(r"\s*([a-z]+)(\d*)\[([0-9,]*)\]", line)
    if not m:
        return 0
    bits = int(m.group(2)) if m.group(2) else (8 if m.group(1) in ("bool", "pred") else 32)
    return int(np.prod(_dims(m.group(3)))) * max(bits // 8, 1)


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


class Measurement(NamedTuple):
    """What one compiled function costs.

    ``memory_bytes = temp_bytes + output_bytes`` (the peak estimate that matched the RSS rise on CPU;
    ``memory_analysis().peak_memory_in_bytes`` ignores temporaries there). ``flops`` counts loop bodies times
    their trip counts (:func:`hlo_flops`); ``xla_flops`` is ``cost_analysis()['flops']``, which counts a
    loop body once. ``rss_rise_bytes`` is the VmHWM rise of one run (``None`` unless ``rss=True``).
    ``uncounted`` names the ops whose work ``flops`` leaves out (library calls, FFTs: see
    :func:`hlo_flops`); empty when the count is complete.
    """

    temp_bytes: int
    output_bytes: int
    argument_bytes: int
    memory_bytes: int
    flops: float
    dot_flops: float
    xla_flops: float
    unknown_trip_counts: int
    compile_s: float
    run_s: float | None
    saved_residuals: tuple[str, ...]
    rss_rise_bytes: int | None
    uncounted: tuple[str, ...] = ()


def measure(
    fn: Callable,
    /,
    *args: Any,
    repeats: int = 3,
    run: bool = True,
    rss: bool = False,
    primal: Callable | None = None,
) -> Measurement:
    """Compile ``jax.jit(fn)`` on ``args`` once and measure memory, FLOPs and time.

    Memory from ``compiled.memory_analysis()``; FLOPs from the optimized HLO with loop trip counts
    (:func:`hlo_flops`) beside XLA's own ``cost_analysis()``; compile time apart from run time (the median
    of ``repeats`` runs after one warm-up, ``block_until_ready``); with ``primal=`` the residuals JAX saves
    to differentiate ``primal(*args)`` (``jax.ad_checkpoint.print_saved_residuals``); with ``rss=True`` the
    rise of the peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) over one run.

    >>> f = lambda x: jnp.sum(lax.scan(lambda c, _: (jnp.sin(c) @ x, None), x, None, length=4)[0])
    >>> m = measure(f, jnp.ones((8, 8)), run=False)
    >>> m.dot_flops == 4 * 2 * 8**3, m.xla_flops < m.flops  # the loop body runs 4 times
    (True, True)

    Reference: JAX documentation, "Ahead-of-time lowering and compilation" (``cost_analysis``,
    ``memory_analysis``), "Asynchronous dispatch" (timing with ``block_until_ready``).
    """
    check_positive_int("repeats", repeats)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):  # older JAX returned one dict per device
        ca = ca[0] if ca else {}
    counted = hlo_flops(compiled.as_text())
    run_s = rss_rise = None
    if run or rss:
        jax.block_until_ready(compiled(*args))
    if rss:
        rss_rise = _rss_rise(lambda: jax.block_until_ready(compiled(*args)))
    if run:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        run_s = statistics.median(times)
    residuals = _saved_residual_lines(primal, *args) if primal is not None else ()
    return Measurement(
        temp_bytes=int(ma.temp_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes),
        argument_bytes=int(ma.argument_size_in_bytes),
        memory_bytes=int(ma.temp_size_in_bytes + ma.output_size_in_bytes),
        flops=counted["flops"],
        dot_flops=counted["dot_flops"],
        xla_flops=float(ca.get("flops", float("nan"))),
        unknown_trip_counts=int(counted["unknown_trip_counts"]),
        uncounted=counted["uncounted"],
        compile_s=compile_s,
        run_s=run_s,
        saved_residuals=residuals,
        rss_rise_bytes=rss_rise,
    )


def _vmhwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_rise(call: Callable[[], Any]) -> int | None:
    """VmHWM rise over one call (needs Linux; set MALLOC_MMAP_THRESHOLD_=65536 so freed buffers return)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _vmhwm()
    call()
    after = _vmhwm()
    return None if before is None or after is None else max(0, after - before)


# --- FLOPs from optimized HLO text, with loop trip counts ------------------------------------------------

_ELEMENTWISE = frozenset(
    """add subtract multiply divide maximum minimum negate abs compare select clamp and or xor not
    remainder sign floor ceil round-nearest-afz round-nearest-even""".split()
)
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s+[a-z0-9]+\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s+=\s+(.*)$")
_ARRAY = re.compile(r"^[a-z][a-z0-9]*\[([0-9,]*)\](?:\{[^}]*\})?\s+")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _split_instr(rest: str):
    """(dims or None for tuples, opcode, operand text, attribute text, dims of the result or of its first
    tuple element) of an instruction's right side."""
    if rest.startswith("("):
        depth = 0
        end = 0
        for end, ch in enumerate(rest):  # noqa: B007
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        first = re.match(r"\s*[a-z][a-z0-9]*\[([0-9,]*)\]", rest[1:end])
        head = _dims(first.group(1)) if first else None
        dims, rest = None, rest[end + 1 :].lstrip()
    else:
        m = _ARRAY.match(rest)
        if not m:
            return None
        dims, rest = _dims(m.group(1)), rest[m.end() :]
        head = dims
    m = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if not m:
        return None
    depth, j = 0, m.end() - 1
    for j in range(m.end() - 1, len(rest)):
        depth += rest[j] == "("
        depth -= rest[j] == ")"
        if depth == 0:
            break
    return dims, m.group(1), rest[m.end() : j], rest[j + 1 :], head


# ops whose work the HLO count cannot see (library calls and algorithms with data-dependent cost)
_UNCOUNTED = frozenset({"custom-call", "fft", "triangular-solve", "cholesky", "sort"})
_GEMM_TARGETS = (
    "__cublas$gemm",
    "__cublas$lt$matmul",
)  # GPU matmuls (and their prefixes' variants)
# cuDNN convolutions (XLA:GPU emits every `convolution` as one of these): which tensor is the result
_CUDNN_CONV = {
    "__cudnn$convForward": "forward",
    "__cudnn$convBiasActivationForward": "forward",
    "__cudnn$convBackwardInput": "input",
    "__cudnn$convBackwardFilter": "filter",
}
# XLA rewrites small dots (matrix-vector on GPU; contraction size 1 anywhere) as a multiply (and a
# reduce) that keep the dot's name
_FROM_DOT = re.compile(r'op_name="[^"]*dot_general"')


def _library_flops(
    operands: str, attrs: str, head: tuple[int, ...] | None, table: Mapping[str, tuple[int, ...]]
) -> tuple[float, float] | None:
    """(FLOPs, dot FLOPs) of a GPU library call that ``hlo_flops`` can count from shapes; ``None`` for
    any other custom call (it then stays uncounted).

    - cuBLAS GEMMs (``__cublas$gemm``, ``__cublas$lt$matmul``): ``2 × lhs elements × rhs free
      elements``, the free dimensions read off ``dot_dimension_numbers`` in the ``backend_config``.
    - cuDNN convolutions (``__cudnn$conv…``): ``2 × |output| × |filter| / O`` — each of the ``|output|``
      entries of the *forward* convolution is a dot product over one output feature's ``|filter|/O``
      kernel entries (padding included), and the two backward kinds do the same multiply-adds. The
      forward output and the filter are found by kind: forward ``(input, filter) → output``, backward
      input ``(output, filter) → input``, backward filter ``(input, output) → filter``; ``O`` is the
      filter's ``o`` dimension in ``dim_labels``. A fused bias-activation call adds one FLOP per
      output entry for each stage its ``backend_config`` holds (a result scale ≠ 1, the bias, a side
      input with a nonzero scale, an activation).
    """
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    if not target:
        return None
    args = re.findall(r"%([\w.\-]+)", operands)
    known = len(args) >= 2 and args[0] in table and args[1] in table
    if target.group(1).startswith(_GEMM_TARGETS) and known:

        def dims(field: str) -> list[int] | None:
            m = re.search(rf'"{field}":\[([^\]]*)\]', attrs)
            return None if m is None else [int(v) for v in re.findall(r"\d+", m.group(1))]

        rc, rb = dims("rhs_contracting_dimensions"), dims("rhs_batch_dimensions")
        if rc is None or rb is None:
            return None
        lhs, rhs = table[args[0]], table[args[1]]
        rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
        f = 2.0 * float(np.prod(lhs)) * float(np.prod(rhs_free))
        return f, f
    kind = _CUDNN_CONV.get(target.group(1))
    labels = re.search(r"dim_labels=[^_]*_([^-]*)->", attrs)
    if kind is None or not known or head is None or labels is None or "o" not in labels.group(1):
        return None
    out, filt = {
        "forward": (head, table[args[1]]),
        "input": (table[args[0]], table[args[1]]),
        "filter": (table[args[1]], head),
    }[kind]
    if len(filt) != len(labels.group(1)):
        return None
    f = 2.0 * float(np.prod(out)) * float(np.prod(filt)) / filt[labels.group(1).index("o")]
    extra = 0.0
    if target.group(1).endswith("BiasActivationForward"):  # fused elementwise stages, one FLOP each

        def field(name: str, default: float) -> float:
            m = re.search(rf'"{name}":\s*"?(-?[0-9.eE+-]+)', attrs)
            return float(m.group(1)) if m else default

        stages = (
            (field("conv_result_scale", 1.0) != 1.0)  # the scale
            + (len(args) > 2)  # the bias
            + (len(args) > 3 and field("side_input_scale", 0.0) != 0.0)  # the side input
            + ('"activation_mode":"kNone"' not in attrs.replace(" ", ""))  # the activation
        )
        extra = stages * float(np.prod(out))
    return f + extra, f


def hlo_flops(hlo_text: str) -> dict[str, Any]:
    """FLOPs of an optimized HLO module, multiplying loop bodies by their ``known_trip_count``.

    Counts ``dot`` as ``2 × output elements × contracted size``, ``convolution`` as ``2 × output
    elements × kernel elements per output feature`` (padding included, so slightly above XLA's
    count), elementwise arithmetic and ``compare`` / ``select`` as one per output element, ``reduce`` as
    one per input element, and recurses into fusions, calls, conditionals (the costliest branch) and
    while loops (body and condition × trip count; a loop without a known trip count is counted once
    and reported in ``unknown_trip_counts``). Transcendentals (``tanh``, ``exp``, …) are not FLOPs, as
    in XLA's cost analysis. Work this count cannot see — library calls (``custom-call``: LAPACK's
    Cholesky, QR, eigh, SVD on CPU; cuSOLVER on GPU), ``fft``, ``triangular-solve``, ``sort`` — is
    listed by op name in ``uncounted``, so a ratio built on ``flops`` can say what it leaves out. The
    exceptions, on a GPU: cuBLAS GEMM calls are counted as dots (from their operands' shapes and
    ``dot_dimension_numbers``), cuDNN convolutions as convolutions (forward, backward input and
    backward filter alike), Triton GEMM fusions by the ``dot`` inside them, and the multiply + reduce
    that XLA:GPU makes of a small dot (both keep the ``dot_general`` name) as that dot; a dot that
    XLA turns into a bare multiply (contraction size 1) counts one dot FLOP per product, so
    ``dot_flops ≤ flops`` always. Grouped, batch-grouped and input-dilated convolutions that XLA:CPU
    lowers to a dense convolution are counted as that dense convolution (2–4× the useful work).
    Returns ``flops``, ``dot_flops`` (dots and convolutions), ``unknown_trip_counts`` and
    ``uncounted``.

    >>> f = jax.jit(lambda a, b: a @ b + 1.0)
    >>> hlo_flops(f.lower(jnp.ones((4, 3)), jnp.ones((3, 5))).compile().as_text())["dot_flops"]
    120.0
    >>> conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    ...     x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    >>> hlo_flops(conv.lower(jnp.ones((2, 16, 8)), jnp.ones((3, 8, 4))).compile().as_text())["flops"]
    6144.0
    >>> fft = jax.jit(lambda x: jnp.fft.fft(x).real.sum())
    >>> hlo_flops(fft.lower(jnp.ones(256)).compile().as_text())["uncounted"]
    ('fft',)

    Reference: XLA, ``HloCostAnalysis`` (xla/service/hlo_cost_analysis.cc: a multiply-add is 2
    FLOPs, transcendentals are counted apart, a while body once); XLA docs, "Operation semantics".
    """
    comps: dict[str, list[tuple]] = {}
    dot_products: dict[str, set[str]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(1)
            comps[current], shapes[current] = [], {}
            for name, d in _PARAM.findall(h.group(2)):
                shapes[current][name] = _dims(d)
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        mi = _INSTR.match(line)
        if not mi:
            continue
        parsed = _split_instr(mi.group(2))
        if parsed is None:
            continue
        dims, op, operands, attrs, head = parsed
        if dims is not None:
            shapes[current][mi.group(1)] = dims
        comps[current].append((mi.group(1), dims, op, operands, attrs, head))
        if op == "reduce" and _FROM_DOT.search(attrs):  # its input: the products of a rewritten dot
            src = re.findall(r"%([\w.\-]+)", operands)
            if src:
                dot_products.setdefault(current, set()).add(src[0])

    memo: dict[str, tuple[float, float, int, frozenset]] = {}

    def cost(name: str) -> tuple[float, float, int, frozenset]:
        if name in memo:
            return memo[name]
        memo[name] = (0.0, 0.0, 0, frozenset())  # guards against cycles
        total = dots = 0.0
        unknown = 0
        missed: set[str] = set()
        table = shapes.get(name, {})
        products = dot_products.get(name, set())
        for iname, dims, op, operands, attrs, head in comps.get(name, []):
            n_out = float(np.prod(dims)) if dims is not None else 0.0
            lib = _library_flops(operands, attrs, head, table) if op == "custom-call" else None
            if lib is not None:
                total += lib[0]
                dots += lib[1]
            elif op in _UNCOUNTED:
                missed.add(op)
            elif op == "convolution":
                args = re.findall(r"%([\w.\-]+)", operands)
                labels = re.search(r"dim_labels=[^_]*_([^-]*)->", attrs)
                rhs = table.get(args[1], ()) if len(args) > 1 else ()
                if labels and rhs and "o" in labels.group(1):
                    k = float(np.prod(rhs)) / rhs[labels.group(1).index("o")]
                    total += 2 * n_out * k
                    dots += 2 * n_out * k
                else:
                    missed.add(op)
            elif op == "dot":
                lhs = re.findall(r"%([\w.\-]+)", operands)
                contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
                lhs_dims = table.get(lhs[0], ()) if lhs else ()
                k = 1.0
                if contract and lhs_dims:
                    k = float(np.prod([lhs_dims[int(i)] for i in _dims(contract.group(1))]))
                total += 2 * n_out * k
                dots += 2 * n_out * k
            elif op in _ELEMENTWISE:
                total += n_out
                if op == "multiply" and _FROM_DOT.search(attrs):  # a dot rewritten as a multiply
                    # summed by a reduce of the dot: a multiply-add each (2 dot FLOPs, in `flops` the
                    # multiply and the reduce's add); alone (contraction size 1): one FLOP each
                    dots += 2 * n_out if iname in products else n_out
            elif op == "reduce":
                src = re.findall(r"%([\w.\-]+)", operands)
                total += float(np.prod(table.get(src[0], ()))) if src else 0.0
            elif op == "fusion" or op == "call":
                callee = re.search(r"(?:calls|to_apply)=%([\w.\-]+)", attrs)
                if callee:
                    t, d, u, m = cost(callee.group(1))
                    total, dots, unknown = total + t, dots + d, unknown + u
                    missed |= m
            elif op == "while":
                body = re.search(r"body=%([\w.\-]+)", attrs)
                cond = re.search(r"condition=%([\w.\-]+)", attrs)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
                n = float(trip.group(1)) if trip else 1.0
                unknown += 0 if trip else 1
                for callee in (body, cond):
                    if callee:
                        t, d, u, m = cost(callee.group(1))
                        total, dots, unknown = total + n * t, dots + n * d, unknown + u
                        missed |= m
            elif op == "conditional":
                branches = re.findall(
                    r"%([\w.\-]+)",
                    " ".join(
                        re.findall(
                            r"(?:branch_computations=\{[^}]*\}|true_computation=%[\w.\-]+|false_computation=%[\w.\-]+)",
                            attrs,
                        )
                    ),
                )
                if branches:
                    best = max((cost(b) for b in branches), key=lambda c: c[0])
                    total, dots, unknown = total + best[0], dots + best[1], unknown + best[2]
                    missed |= best[3]
        memo[name] = (total, dots, unknown, frozenset(missed))
        return memo[name]

    if entry is None:
        raise ShapeError(
            "hlo_text: no ENTRY computation found; pass compiled.as_text() of a jitted function."
        )
    total, dots, unknown, missed = cost(entry)
    return {
        "flops": total,
        "dot_flops": dots,
        "unknown_trip_counts": unknown,
        "uncounted": tuple(sorted(missed)),
    }
