"""The gradient checker: AD modes, finite differences, the complex step and closed forms, side by side.

Every check compares gradients of one scalar function ``f`` at one point ``x`` (any pytree) against
reverse mode (``jax.grad``), which is the baseline:

- ``"reverse"``: ``jax.grad`` (the baseline; its error is 0 by definition);
- ``"forward"``: forward mode, one JVP ``⟨∇f(x), e_i⟩`` per coordinate;
- ``"forward_diff"``: forward differences ``(f(x + h e_i) − f(x)) / h``: truncation error
  ``h f_ii/2 = O(h)``, round-off ``2ε|f|/h``; the best step is ``h ≈ √ε`` (Nocedal & Wright §8.1);
- ``"central_diff"``: central differences ``(f(x + h e_i) − f(x − h e_i)) / 2h``: truncation
  ``h² f_iii/6 = O(h²)``, round-off ``ε|f|/h``; the best step is ``h ≈ ε^{1/3}``;
- ``"complex_step"``: ``Im f(x + i h e_i) / h`` for a real-analytic ``f``: no subtraction, hence no
  cancellation, so ``h = 1e-20`` gives the derivative to machine precision (Squire & Trapp 1998;
  Martins, Sturdza & Alonso 2003);
- ``"reference"``: the user's closed-form gradient (a value, or a callable ``reference(x)``).

**Precision.** Every check runs with float32 matrix products in full float32
(``jax.default_matmul_precision("highest")``, seen by ``f`` when it is traced): on GPUs JAX's default
multiplies float32 matrices in TF32 (relative error 3e-4 on an H100, 1.5e-7 in full float32), which the
float32 tolerances below do not allow for. On CPUs the setting changes nothing. Off the CPU the
complex step runs one coordinate at a time: vmapped, XLA:GPU (jax 0.11.2, H100) lost its imaginary
part through the first layer of the ``mlp`` problem.

Steps are scaled per coordinate, ``h_i = δ·max(1, |x_i|)``, and made exactly representable
(``h_i = (x_i + h_i) − x_i``), as in Nocedal & Wright §8.1. :func:`step_sweep` measures the V-shaped
error-vs-step curve behind the choice of ``δ``; :func:`hvp` checks a Hessian-vector product against
the dense Hessian; :func:`catalog` runs both on every problem of :mod:`gradlab.problems` (the table
``gradlab check`` prints).

>>> import jax.numpy as jnp
>>> from gradlab import checks
>>> f = lambda x: jnp.sum(jnp.sin(x) * x)
>>> x = jnp.array([0.5, -1.0, 2.0])
>>> checks.gradient(f, x, reference=lambda x: jnp.sin(x) + x * jnp.cos(x)).ok
True
>>> bad = checks.gradient(f, x, reference=lambda x: 0.5 * (jnp.sin(x) + x * jnp.cos(x)))
>>> bad.ok
False
>>> "a missing factor 2?" in bad.message
True

References:
  J. Nocedal & S. J. Wright, *Numerical Optimization*, 2nd ed., Springer 2006, ch. 8.
  W. Squire & G. Trapp, Using complex variables to estimate derivatives of real functions, SIAM Review
  40(1), 1998. J. R. R. A. Martins, P. Sturdza & J. J. Alonso, The complex-step derivative
  approximation, ACM TOMS 29(3), 2003. A. Griewank & A. Walther, *Evaluating Derivatives*, 2nd ed.,
  SIAM 2008.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradlab._backend import platform
from gradlab._tree import leaf_paths, tree_random_normal
from gradlab._validate import (
    OptionError,
    ShapeError,
    check_choice,
    check_float_params,
    check_key,
    check_positive,
    check_positive_int,
    check_same_structure,
    check_scalar_output,
)

__all__ = [
    "HVP_MODES",
    "METHODS",
    "CatalogCheck",
    "CatalogRow",
    "GradCheck",
    "HVPCheck",
    "StepSweep",
    "catalog",
    "gradient",
    "hvp",
    "step_sweep",
]

METHODS = ("reverse", "forward", "forward_diff", "central_diff", "complex_step", "reference")
"""The gradient methods :func:`gradient` compares (``"reverse"`` is the baseline)."""

HVP_MODES = ("fwd_rev", "rev_fwd", "rev_rev")
"""The AD compositions :func:`hvp` accepts by name (forward-over-reverse, ...)."""

_SWEEP_METHODS = ("forward", "central")
_AD_METHODS = ("reverse", "forward", "complex_step")
_FD_METHODS = ("forward_diff", "central_diff")
_LABELS = {
    "reverse": "reverse mode",
    "forward": "forward mode",
    "forward_diff": "forward differences",
    "central_diff": "central differences",
    "complex_step": "complex step",
    "reference": "reference",
}
# Tolerance constants (see `_tolerances`): AD-like methods agree with reverse mode to rounding; finite
# differences within C_FD times their own error (Richardson estimate + round-off model); closed forms
# within rtol.
_C_AD = 1e3
_C_FD = 10.0
_FD_WEAK_TOL = 0.1  # a difference tolerance beyond this cannot vouch for a gradient
_CHUNK = 4  # coordinates per vmapped batch (×5 difference points = 20): batched LAPACK deadlocked
# at ≳ 30 in jaxlib 0.10.2 on CPU, so batches stay below that there
_CHUNK_ACCELERATOR = 64  # on a GPU/TPU: wide batches keep the device busy (no CPU LAPACK involved)


def _full_precision(fn: Callable) -> Callable:
    """Run ``fn`` under ``jax.default_matmul_precision("highest")`` (a thread-local setting: worker
    threads need their own)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper


def _chunk() -> int:
    """Coordinates per vmapped batch of the difference methods: small on the CPU backend (see
    ``_CHUNK``), wide elsewhere, where n/4 sequential small batches would leave the device idle."""
    return _CHUNK if platform() == "cpu" else _CHUNK_ACCELERATOR


_COMPLEX_DELTA = 1e-20
# Checks of small problems are dominated by XLA:CPU compile time. Without the MLIR fusion emitters and
# with LLVM at -O0 it drops 3-5× (MLP problem: 2.2 s → 0.7 s; the run goes 7 → 28 ms); bigger problems
# (more entries than this) keep the default, fully optimised compile.
_FAST_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_FAST_MAX_SIZE = 4096


@functools.cache
def _fast_options() -> tuple[tuple[str, Any], ...]:
    """The fast-compile options where this backend takes them (probed once), else none."""
    if jax.default_backend() != "cpu":
        return ()
    try:
        jax.jit(lambda a: a + 1).lower(jnp.zeros(())).compile(dict(_FAST_OPTIONS))
    except Exception:  # an XLA without these debug options: compile normally
        return ()
    return tuple(_FAST_OPTIONS.items())


@functools.cache
def _jit(fn: Callable, static: tuple[str, ...], fast: bool) -> Callable:
    """``jax.jit(fn)`` with ``static`` argument names, fast-compiling if ``fast`` (cached)."""
    options = dict(_fast_options()) if fast else None
    return jax.jit(fn, static_argnames=static, compiler_options=options)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


class _Static:
    """Wrap a function so that jit can take it as a static argument, hashed by identity."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and other.fn is self.fn


def _as_point(argument: str, x: Any) -> Any:
    """Leaves as arrays; every leaf real floating; at least one entry."""
    x = jax.tree.map(jnp.asarray, x)
    leaves = jax.tree.leaves(x)
    if not leaves or sum(leaf.size for leaf in leaves) == 0:
        raise ShapeError(f"{argument}: expected a pytree with at least one entry, got {x!r}.")
    check_float_params(argument, x)
    return x


def _coarsest_dtype(x: Any) -> np.dtype:
    """The least precise floating dtype among the leaves (it sets ε)."""
    dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(x)}
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def _check_loss(argument: str, f: Callable, x: Any) -> None:
    if not callable(f):
        raise OptionError(f"{argument}: expected a callable f(x) -> scalar, got {f!r}.")
    out = jax.eval_shape(f, x)
    check_scalar_output(argument, out)


def _checked_like(argument: str, tree: Any, like: Any) -> Any:
    """``tree`` with arrays as leaves, after a structure/shape check that spots transposed shapes."""
    tree = jax.tree.map(lambda a: a if hasattr(a, "shape") else jnp.asarray(a), tree)
    try:
        check_same_structure(argument, tree, like)
    except ShapeError as e:
        hint = ""
        t_leaves, l_leaves = jax.tree.leaves(tree), jax.tree.leaves(like)
        if len(t_leaves) == len(l_leaves):
            for path, a, b in zip(leaf_paths(like), t_leaves, l_leaves, strict=True):
                if a.ndim == 2 and a.shape != b.shape and a.shape == b.shape[::-1]:
                    hint = (
                        f" Leaf {('x' + path)!r} has the TRANSPOSED shape {a.shape}: return G.T "
                        "(∂f/∂X_ij belongs at [i, j], the shape of X)."
                    )
                    break
        raise ShapeError(f"{e}{hint}") from None
    return tree


class _Layout:
    """Leaf paths, shapes and offsets of a pytree, to name the entries of its ravelled vector."""

    def __init__(self, x: Any) -> None:
        leaves = jax.tree.leaves(x)
        self.paths = ["x" + p for p in leaf_paths(x)]
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        sizes = [int(leaf.size) for leaf in leaves]
        self.offsets = np.cumsum([0, *sizes])

    def entry(self, j: int) -> str:
        k = int(np.searchsorted(self.offsets, j, side="right") - 1)
        shape = self.shapes[k]
        if not shape:
            return self.paths[k]
        idx = np.unravel_index(j - int(self.offsets[k]), shape)
        return f"{self.paths[k]}[{', '.join(str(int(i)) for i in idx)}]"

    def leaves(self, flat: np.ndarray) -> list[np.ndarray]:
        return [
            flat[self.offsets[k] : self.offsets[k + 1]].reshape(self.shapes[k])
            for k in range(len(self.shapes))
        ]


def _norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a.ravel())) if a.size else 0.0


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖/‖b‖ (absolute when ‖b‖ = 0), in float64; NaN when either has a non-finite entry."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    den = _norm(b)
    return _norm(a - b) / den if den > 0 else _norm(a - b)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _ratio_phrase(alpha: float, label: str, base: str) -> str:
    if abs(alpha + 1) < 1e-3:
        return f"{label} ≈ −1 × {base}: sign flipped"
    if abs(alpha) < 1e-12:
        return f"{label} ≈ 0: a missing term?"
    a = f"{alpha:.4g}"
    if abs(alpha) < 1:
        inv = 1 / abs(alpha)
        factor = f"{round(inv)}" if abs(inv - round(inv)) < 1e-3 * inv else f"{inv:.4g}"
        sign = " and a flipped sign" if alpha < 0 else ""
        return f"{label} ≈ {a} × {base}: a missing factor {factor}{sign}?"
    factor = (
        f"{round(abs(alpha))}" if abs(abs(alpha) - round(abs(alpha))) < 1e-3 else f"{alpha:.4g}"
    )
    sign = " and a flipped sign" if alpha < 0 else ""
    return f"{label} ≈ {a} × {base}: an extra factor {factor}{sign}?"


def _scale_of(got: np.ndarray, exp: np.ndarray) -> float | None:
    """α if ``got ≈ α·exp`` (to 1e-3 relative) with α ≠ 1, else None. Any two numbers are proportional,
    so for a single entry α is returned only when it is a telling factor (±n or ±1/n, n ≤ 16): a ratio
    of 2.2 between two numbers is no pattern (the entry listing shows it anyway)."""
    if exp.size < 2:
        g, e = float(got.reshape(-1)[0]), float(exp.reshape(-1)[0])
        if e == 0 or g == 0:
            return None
        r = abs(g / e)
        if not math.isfinite(r):  # a subnormal expected value: no ratio to read
            return None
        n = r if r >= 1 else 1 / r
        telling = round(n) <= 16 and abs(n - round(n)) < 1e-3 * n
        return g / e if telling and abs(g / e - 1) > 1e-3 else None
    ee = float(np.vdot(exp, exp))
    gn = _norm(got)
    if ee == 0 or gn == 0:
        return None
    alpha = float(np.vdot(got, exp)) / ee
    if _norm(got - alpha * exp) <= 1e-3 * gn and abs(alpha - 1) > 1e-3:
        return alpha
    return None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    nb = _norm(b)
    return nb > 0 and _norm(a - b) <= 1e-3 * nb


def _matrix_patterns(
    got: np.ndarray, exp: np.ndarray, where: str, label: str, noun: str = "gradient"
) -> str | None:
    """Recognise the classic matrix-calculus slips in one square 2-D leaf."""
    if got.ndim != 2 or got.shape[0] != got.shape[1] or got.shape[0] < 2:
        return None
    if _close(exp, exp.T):  # symmetric gradient: transposes are invisible
        return None
    if _close(got, exp.T):
        return f"{label} matches the TRANSPOSE of the {noun} in {where}: return G.T " + (
            "(∂f/∂X_ij belongs at [i, j]; read G off df = ⟨G, dX⟩ = tr(Gᵀ dX))"
            if noun == "gradient"
            else f"(the {noun} is indexed like x: read it off d⟨∇f, V⟩ = ⟨HV, dX⟩)"
        )
    if _close(got, (exp + exp.T) / 2):
        return (
            f"{label} matches the symmetric part (G + Gᵀ)/2 of the {noun} in {where}: "
            "was the matrix assumed symmetric?"
        )
    if _close(got, exp + exp.T - np.diag(np.diag(exp))):
        return (
            f"{label} matches G + Gᵀ − diag(G) in {where}: the symmetric-matrix convention; jax.grad "
            "treats every entry as free"
        )
    return None


def _diagnose(
    got: np.ndarray,
    exp: np.ndarray,
    layout: _Layout,
    tol: float,
    label: str,
    base: str,
    noun: str = "gradient",
) -> list[str]:
    """Lines that say what is wrong: a pattern where recognisable, then the worst entries."""
    lines: list[str] = []
    for name, arr in ((base, exp), (label, got)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            shown = ", ".join(f"{layout.entry(int(j))} = {arr[j]}" for j in bad[:3])
            lines.append(f"{name} has {bad.size} non-finite entries: {shown}")
    if lines:
        return lines
    if not np.any(got):
        lines.append(f"{label} is identically zero: a missing term, or a {noun} never filled in?")
    elif (alpha := _scale_of(got, exp)) is not None:
        lines.append(_ratio_phrase(alpha, label, base))
    else:
        exp_leaves, got_leaves = layout.leaves(exp), layout.leaves(got)
        for where, g, e in zip(layout.paths, got_leaves, exp_leaves, strict=True):
            if _rel(g, e) <= tol:
                continue
            found = _matrix_patterns(g, e, where, label, noun)
            if found is None and len(layout.paths) > 1 and (a := _scale_of(g, e)) is not None:
                found = f"in {where}: " + _ratio_phrase(a, label, base)
            if found is not None:
                lines.append(found)
    # the entries that disagree most
    diff = got - exp
    scale = max(float(np.max(np.abs(exp))), np.finfo(np.float64).tiny)
    disagree = np.flatnonzero(np.abs(diff) > tol * scale)
    order = disagree[np.argsort(-np.abs(diff[disagree]), kind="stable")]
    if order.size == 0:
        order = np.argsort(-np.abs(diff), kind="stable")[:1]
    lines.append(
        f"{disagree.size} of {got.size} entries disagree (|Δ| > tolerance × max|{base}|); "
        f"the largest:"
    )
    for j in order[:5]:
        ratio = (
            f", ratio {float(got[j]) / float(exp[j]):.4g}" if exp[j] != 0 else ""
        )  # inf, no warning
        lines.append(
            f"  {layout.entry(int(j))}: expected {_fmt(exp[j])} ({base}), got {_fmt(got[j])}, "
            f"Δ = {_fmt(diff[j])}{ratio}"
        )
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """A fixed-width table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _e(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


# --------------------------------------------------------------------------------------------------
# gradient
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class GradCheck:
    """The result of :func:`gradient`.

    Attributes:
      ok: every method is within its tolerance.
      errors: method → relative error ``‖g_m − g_rev‖/‖g_rev‖`` against reverse mode.
      tolerances: method → the tolerance its error is held to.
      grads: method → its gradient (a pytree like ``x``).
      value: ``f(x)``.
      dtype: the dtype that sets ε (the least precise leaf of ``x``).
      steps: method → the steps ``h_i`` used (a pytree like ``x``), for the difference methods.
      message: what failed and where (empty when ``ok``).
      notes: remarks that are not failures (a method skipped, and why).
      conclusive: whether some method independent of the AD rules (differences, the complex step, a
        reference) was accurate enough to vouch for the gradient (tolerance ≤ 0.1). Reverse and
        forward mode share every custom rule, so their agreement alone cannot catch a wrong one;
        near a minimum, or where ``|f| ≫ ‖∇f‖``, the differences' round-off can hide a factor 2.
        ``ok and not conclusive`` prints as INCONCLUSIVE; :attr:`verified` is ``ok and conclusive``
        and :attr:`status` the three-way verdict.
    """

    ok: bool
    errors: dict[str, float]
    tolerances: dict[str, float]
    grads: dict[str, Any]
    value: Any
    dtype: Any
    steps: dict[str, Any]
    message: str
    notes: tuple[str, ...] = ()
    conclusive: bool = True

    def table(self) -> str:
        """A fixed-width table: method, relative error vs reverse mode, tolerance, ok."""
        rows = [
            [m, f"{self.errors[m]:.1e}", f"{self.tolerances[m]:.1e}", _ok(self.errors[m], t)]
            for m, t in self.tolerances.items()
        ]
        out = _table(["method", "rel. error", "tolerance", "ok"], rows)
        weak = [m for m, t in self.tolerances.items() if m in _FD_METHODS and t > _FD_WEAK_TOL]
        if weak and self.conclusive:  # (an inconclusive check says so in its notes)
            out += (
                f"\n(note: {', '.join(weak)}: too inaccurate here to vouch for the gradient "
                "(round-off of f or steep derivatives); use float64 or the complex step.)"
            )
        for note in self.notes:
            out += f"\n(note: {note})"
        return out

    @property
    def verified(self) -> bool:
        """``ok and conclusive``: no method disagrees, and one independent of the AD rules was
        accurate enough to vouch for the gradient. Test this rather than ``ok`` where the dtype may be
        low (bfloat16, float16: a factor-2 rule can pass every tolerance there)."""
        return self.ok and self.conclusive

    @property
    def status(self) -> str:
        """``"ok"``, ``"inconclusive"`` or ``"failed"`` (what ``str(check)`` prints as the verdict)."""
        return "failed" if not self.ok else "ok" if self.conclusive else "inconclusive"

    def raise_if_failed(self, *, allow_inconclusive: bool = False) -> GradCheck:
        """Raise ``AssertionError(message)`` unless ``ok`` — and, unless ``allow_inconclusive``,
        unless ``conclusive`` too; return ``self`` (for chaining)."""
        if not self.ok:
            raise AssertionError(self.message)
        if not self.conclusive and not allow_inconclusive:
            raise AssertionError(
                "gradient check inconclusive: "
                + "; ".join(self.notes[-1:])
                + " (raise_if_failed(allow_inconclusive=True) accepts it.)"
            )
        return self

    def __str__(self) -> str:
        verdict = {"failed": "FAILED", "ok": "ok", "inconclusive": "INCONCLUSIVE"}[self.status]
        head = f"gradient check ({self.dtype}, f(x) = {float(self.value):.6g}): {verdict}"
        return "\n".join(filter(None, [head, self.table(), self.message]))


def _ok(err: float, tol: float) -> str:
    return "ok" if err <= tol else "FAIL"


def _map_coords(body: Callable, n: int, *, one_at_a_time: bool = False) -> Any:
    """``body(i)`` for ``i = 0..n-1``, vmapped over chunks of ``_CHUNK`` coordinates inside a scan
    (``one_at_a_time``: a plain scan, no vmap).

    The index list is padded to a multiple of the chunk, so the body is compiled once (lax.map would
    compile a second copy for a remainder).
    """
    if one_at_a_time:
        return jax.lax.map(body, jnp.arange(n))
    b = min(_chunk(), n)
    idx = jnp.minimum(jnp.arange(-(-n // b) * b), n - 1)
    out = jax.lax.map(body, idx, batch_size=b)
    return jax.tree.map(lambda a: a[:n], out)


def _core_impl(
    fn: _Static,
    x: Any,
    deltas: dict[str, Any],
    v: Any,
    key: Any,
    *,
    want: tuple[str, ...],
    ref: _Static | None = None,
    hvp_fn: _Static | str | None = None,
    fwd: bool = True,
) -> dict[str, Any]:
    """Everything one check needs, in one compiled function (flat vectors).

    ``want``: the coordinate-wise methods (forward mode, the differences, the complex step); ``ref``:
    a traceable closed-form gradient; ``hvp_fn``: a traceable closed-form HVP or a mode name (or
    ``"dense"``: no HVP, only the oracle), checked against the dense Hessian times ``v`` (drawn from
    ``key`` when ``v`` is None); ``fwd=False`` where ``f`` has no JVP (a ``custom_vjp``): the
    Hessian's columns then come from reverse over reverse. Returns flat vectors (for the numbers)
    and, under ``"trees"``, the same as pytrees like ``x``.
    """
    f = fn.fn
    flat, unravel = ravel_pytree(x)
    n = flat.shape[0]

    def ff(y):
        return f(unravel(y))

    def roundtrip(y):  # the values the leaves really hold (mixed-precision pytrees)
        return ravel_pytree(unravel(y))[0]

    def unravel_complex(z):
        return jax.tree.map(jax.lax.complex, unravel(jnp.real(z)), unravel(jnp.imag(z)))

    lin = hlin = hvjp = None
    if hvp_fn is not None and fwd:
        # one linearisation of (f, ∇f) gives forward mode (the value's tangent ⟨∇f, e_i⟩) and the
        # Hessian's columns (the gradient's tangent H e_i) from the same compiled JVP
        (value, g_rev), hlin = jax.linearize(jax.value_and_grad(ff), flat)
    elif hvp_fn is not None:
        value, g_rev = jax.value_and_grad(ff)(flat)
        hvjp = jax.vjp(jax.grad(ff), flat)[1]  # H is symmetric: eᵢᵀH = (H eᵢ)ᵀ
    else:
        value, g_rev = jax.value_and_grad(ff)(flat)
        if "forward" in want:
            lin = jax.linearize(ff, flat)[1]
    out = {"value": value, "reverse": g_rev}
    scale = jnp.maximum(jnp.abs(flat), 1.0)
    pts = {}  # the points x + h e_i (by coordinate) of the difference formulas
    if "forward_diff" in want or "central_diff" in want:
        # both formulas, and central differences at 2h to estimate their errors (Richardson)
        hf, hc = deltas["forward_diff"] * scale, deltas["central_diff"] * scale
        pts["fp"] = roundtrip(flat + hf)
        pts["cp"], pts["cm"] = roundtrip(flat + hc), roundtrip(flat - hc)
        pts["c2p"], pts["c2m"] = roundtrip(flat + 2 * hc), roundtrip(flat - 2 * hc)
        out["step:forward_diff"] = pts["fp"] - flat
        out["step:central_diff"] = (pts["cp"] - pts["cm"]) / 2
    if "complex_step" in want:
        hcs = deltas["complex_step"] * scale
        out["step:complex_step"] = hcs
    names = list(pts)
    # XLA:GPU (jax 0.11.2, H100) lost the imaginary part of a *vmapped* complex step through the MLP
    # problem's first layer (48 of 98 entries 0); one coordinate at a time it was exact. Off the CPU
    # the complex step therefore runs in a scan of its own, the other methods stay vmapped.
    lone = "complex_step" in want and platform() != "cpu"

    def complex_step(i):
        z = jax.lax.complex(flat, hcs * (jnp.arange(n) == i).astype(flat.dtype))
        return jnp.imag(f(unravel_complex(z))) / hcs[i]

    def body(i):
        onehot = (jnp.arange(n) == i).astype(flat.dtype)
        r = {}
        if lin is not None:
            r["forward"] = lin(onehot)
        if hlin is not None:
            r["forward"], r["hessian"] = hlin(onehot)  # ⟨∇f, e_i⟩ and H e_i, the i-th column
        if hvjp is not None:
            r["hessian"] = hvjp(onehot)[0]
        if names:
            stacked = jnp.stack([jnp.where(onehot > 0, pts[k], flat) for k in names])
            r["f"] = jax.vmap(ff)(stacked)
        if "complex_step" in want and not lone:
            r["complex_step"] = complex_step(i)
        return r

    hessian = hvp_fn is not None
    if want or hessian:
        others = hessian or any(m != "complex_step" for m in want)
        res = dict(_map_coords(body, n)) if others or not lone else {}
        if lone:
            res["complex_step"] = _map_coords(complex_step, n, one_at_a_time=True)
        if "forward" in want:
            out["forward"] = res["forward"]
        if names:
            fx = {k: res["f"][:, j] for j, k in enumerate(names)}
            d_f = (fx["fp"] - value) / out["step:forward_diff"]
            d_c = (fx["cp"] - fx["cm"]) / (pts["cp"] - pts["cm"])
            d_c2 = (fx["c2p"] - fx["c2m"]) / (pts["c2p"] - pts["c2m"])
            # Richardson: D(2h) − D(h) ≈ 3·(h²/6)·f⁽³⁾ estimates the truncation error of D(h); the
            # extrapolated D(h) + (D(h) − D(2h))/3 is O(h⁴), good enough to measure D_f's error.
            out["est:central_diff"] = jnp.abs(d_c2 - d_c) / 3
            out["est:forward_diff"] = jnp.abs(d_f - (d_c + (d_c - d_c2) / 3))
            out["forward_diff"], out["central_diff"] = d_f, d_c
        if "complex_step" in want:
            out["complex_step"] = res["complex_step"]
        if hessian:
            if v is None:
                v = tree_random_normal(key, x)
            out["v"] = ravel_pytree(v)[0]
            out["hv_expected"] = out["v"] @ res["hessian"]  # Σ_j H[:, j] v_j
            out["hessian_norm"] = jnp.linalg.norm(res["hessian"])
            if isinstance(hvp_fn, _Static):
                out["hvp"] = ravel_pytree(hvp_fn.fn(x, v))[0]
            elif hvp_fn in _HVP_FNS:
                out["hvp"] = ravel_pytree(_HVP_FNS[hvp_fn](f, x, v))[0]
    if ref is not None:
        out["reference"] = ravel_pytree(ref.fn(x))[0]
    out["trees"] = {
        k: unravel(a.astype(flat.dtype))
        for k, a in out.items()
        if k not in ("value", "hessian_norm") and not k.startswith("est:")
    }
    return out


def _np_flat(tree: Any) -> np.ndarray:
    """All leaves of ``tree`` in one float64 NumPy vector (the order of ``ravel_pytree``)."""
    leaves = [np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _flat_dtype(x: Any) -> np.dtype:
    return np.dtype(jnp.result_type(*jax.tree.leaves(x)))


_STATIC = ("fn", "want", "ref", "hvp_fn", "fwd")


def _core(fn: _Static, x: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    size = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(x))
    return _jit(_core_impl, _STATIC, size <= _FAST_MAX_SIZE)(fn, x, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _jvp_probe(fn: _Static, y: Any) -> Any:
    return jax.jvp(fn.fn, (y,), (y,))[1]


def _closed_form_impl(fn: _Static, x: Any, v: Any = None) -> Any:
    return fn.fn(x) if v is None else fn.fn(x, v)


def _closed_form(fn: _Static, x: Any, v: Any = None) -> Any:
    """A closed form (reference gradient or HVP), compiled apart from the checked function."""
    return _jit(_closed_form_impl, ("fn",), True)(fn, x, v)


def _forward_ok(f: Callable, x: Any) -> bool:
    """Whether forward mode applies to ``f`` (not where it uses a ``custom_vjp``)."""
    try:
        _jvp_probe.trace(_Static(f), x).lower()  # (JAX 0.10 raises at lowering, not tracing)
    except TypeError as e:
        if "custom_vjp" in str(e):
            return False
        raise
    return True


def _traceable(argument: str, fn: Callable, *args: Any, like: Any) -> tuple[_Static | None, Any]:
    """``(_Static(fn), None)`` if ``fn(*args)`` traces (shape-checked against ``like``); otherwise
    ``(None, value)`` with the value computed eagerly (closed forms written with NumPy, say)."""
    try:
        shapes = jax.eval_shape(fn, *args)
    except (jax.errors.JAXTypeError, jax.errors.JAXIndexError):
        return None, _checked_like(argument, fn(*args), like)
    _checked_like(argument, shapes, like)
    return _Static(fn), None


def _resolve_methods(
    methods: Sequence[str] | str | None, *, reference: bool, complex_step: bool
) -> list[str]:
    if methods is None:
        chosen = ["reverse", "forward", "forward_diff", "central_diff"]
        if complex_step:
            chosen.append("complex_step")
        if reference:
            chosen.append("reference")
        return chosen
    if isinstance(methods, str):
        methods = [methods]
    for m in methods:
        check_choice("methods", m, METHODS)
    if "reference" in methods and not reference:
        raise OptionError(
            "methods: 'reference' was asked for but no reference was given. Pass "
            "reference=<gradient value or callable>."
        )
    chosen = ["reverse", *(m for m in METHODS[1:] if m in methods)]
    if complex_step and "complex_step" not in chosen:
        chosen.append("complex_step")
    if reference and "reference" not in chosen:
        chosen.append("reference")
    return chosen


def _default_deltas(eps: float, step: Any) -> dict[str, float]:
    deltas = {
        "forward_diff": math.sqrt(eps),
        "central_diff": eps ** (1 / 3),
        "complex_step": _COMPLEX_DELTA,
    }
    if step is None:
        return deltas
    if isinstance(step, Mapping):
        for k, v in step.items():
            check_choice("step", k, deltas)
            deltas[k] = check_positive(f"step[{k!r}]", v)
        return deltas
    s = check_positive("step", step)
    deltas["forward_diff"] = deltas["central_diff"] = s
    return deltas


def _default_rtol(eps: float) -> float:
    """Tolerance of a closed form against AD: 1e-8 in float64, 1e-4 in float32, 10ε below that
    (float16, bfloat16: 1e-4 is under their ε)."""
    return 1e-8 if eps < 1e-10 else max(1e-4, 10 * eps)


def _check_rtol(rtol: Any, methods: Sequence[str]) -> dict[str, float]:
    """The tolerances ``rtol`` sets, by method; raises where it names a method that is not run, or is a
    single number with no ``reference`` to apply to (both used to be ignored silently)."""
    out: dict[str, float] = {}
    if isinstance(rtol, Mapping):
        for k, v in rtol.items():
            check_choice("rtol", k, METHODS)
            if k not in methods:
                raise OptionError(
                    f"rtol[{k!r}]: the method {k!r} is not run in this check (it runs "
                    f"{', '.join(sorted(methods))}); add it to methods= (or pass reference= / "
                    "complex_step=True), or drop the entry."
                )
            out[k] = check_positive(f"rtol[{k!r}]", v)
    elif rtol is not None:
        r = check_positive("rtol", rtol)
        if "reference" not in methods:
            raise OptionError(
                f"rtol={rtol!r}: a single tolerance applies to the closed-form reference, but no "
                "reference= was given. Pass reference=..., or a mapping method → tolerance such as "
                "rtol={'central_diff': 1e-6} to change another method's tolerance."
            )
        out["reference"] = r
    return out


def _tolerances(
    methods: Sequence[str],
    eps: float,
    deltas: Mapping[str, float],
    rho: float,
    est: Mapping[str, float],
    rtol: Any,
) -> dict[str, float]:
    """Tolerance per method: rounding for AD; truncation (measured) + round-off for differences.

    Differences: ``C·(τ + κερ/δ)`` (at least ``1e3·ε``; ``C = 10``), with ``δ`` the relative step,
    ``ρ = |f|·‖1/s‖/‖∇f‖`` (``s_i = max(1, |x_i|)``: the round-off of ``f`` relative to the gradient),
    ``κ = 2`` (forward) or ``1`` (central), and ``τ`` the truncation error estimated from the
    differences alone (Richardson: ``‖D_c(2h) − D_c(h)‖/3`` for central, ``‖D_f − D_R‖`` for forward,
    relative to ``‖∇f‖``). The estimate never uses AD, so a wrong AD rule still shows; where it is
    large (> 0.1, e.g. forward differences in float32 of an ``f`` with a large value), the
    differences cannot vouch for the gradient, and :meth:`GradCheck.table` says so.
    """
    tol = {}
    for m in methods:
        if m in _AD_METHODS:
            tol[m] = _C_AD * eps
        elif m in ("forward_diff", "central_diff"):
            kappa = 2.0 if m == "forward_diff" else 1.0
            t = _C_FD * (est.get(m, 0.0) + kappa * eps * rho / deltas[m])
            tol[m] = max(t, _C_AD * eps)
        else:
            tol[m] = _default_rtol(eps)
    tol.update(_check_rtol(rtol, methods))
    return tol


@_full_precision
def gradient(
    f: Callable[[Any], Any],
    x: Any,
    /,
    *,
    reference: Any = None,
    methods: Sequence[str] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    complex_step: bool = False,
    step: float | Mapping[str, float] | None = None,
) -> GradCheck:
    """Check the gradient of a scalar ``f`` at ``x`` by every method against reverse mode.

    Math:
      The baseline is reverse mode ``g_rev = jax.grad(f)(x)``; each method ``m`` gives ``g_m`` and its
      relative error ``‖g_m − g_rev‖₂/‖g_rev‖₂`` (over the whole pytree) is held to a tolerance:

      - forward mode (``jvp`` per coordinate) and the complex step: rounding only, ``1e3·ε``;
      - forward differences, ``h_i = √ε·s_i``, ``s_i = max(1, |x_i|)``: truncation ``(h/2)f_ii = O(h)``
        plus round-off ``O(ε|f|/h)``, balanced at ``h ~ √ε``, error ``~√ε``;
      - central differences, ``h_i = ε^{1/3}·s_i``: truncation ``(h²/6)f_iii = O(h²)``, round-off
        ``O(ε|f|/h)``, balanced at ``h ~ ε^{1/3}``, error ``~ε^{2/3}``;
      - the tolerance of a difference formula is ``10·(τ + κερ/δ)``: ``τ``, its truncation error,
        measured without AD by Richardson extrapolation (central differences at ``h`` and ``2h``),
        plus the round-off model, ``δ`` the relative step, ``κ = 2`` (forward) or ``1`` (central),
        ``ρ = |f|·‖1/s‖/‖g_rev‖`` (a large ``|f|`` next to the gradient makes round-off matter);
      - complex step (``complex_step=True``, analytic ``f`` only): ``Im f(x + i h e_i)/h`` with
        ``h_i = 1e-20·s_i``; no difference is taken, so no cancellation: error ``O(h²) + O(ε)``;
      - ``reference``: ``rtol`` (default ``1e-8`` in float64, ``1e-4`` in float32).

      ε is the machine epsilon of the least precise leaf of ``x``. Steps are made exactly
      representable, ``h_i = (x_i + h_i) − x_i``. Relative errors are meaningless where
      ``g_rev = 0``: check at a generic point, not a stationary one.

    Cost: one gradient, ``n`` JVPs, ``5n + 1`` evaluations of ``f`` (and ``n`` complex ones), for
    ``n`` the number of entries of ``x``, all in one compiled function (vmapped over chunks of
    coordinates); a second call with the same ``f`` and new values of ``x`` does not recompile.

    Args:
      f: ``f(x) -> scalar``, a JAX-traceable function with a real scalar output.
      x: the point, any pytree of real floating arrays.
      reference: a closed-form gradient to check: a pytree like ``x``, or a callable ``reference(x)``.
      methods: a subset of :data:`METHODS`; default: reverse, forward, both differences, plus the
        complex step if ``complex_step`` and the reference if given. Reverse mode is always run.
      rtol: the reference's tolerance (needs ``reference``), or a mapping method → tolerance that
        overrides the defaults of methods this check runs.
      complex_step: also use the complex step (only valid for real-analytic ``f``: no ``abs``,
        ``maximum``, ``real``, norms or SVDs).
      step: the relative step ``δ`` of both difference formulas, or a mapping such as
        ``{"central_diff": 1e-6}``.

    Returns:
      a :class:`GradCheck`; ``.ok``, ``.errors``, ``.tolerances``, ``.message``, ``.table()``.

    Raises:
      NotScalarError: ``f(x)`` is not a real scalar.
      UnknownNameError: a method that is not in :data:`METHODS`.
      ShapeError: ``reference`` does not have the structure and shapes of ``x``.
      OptionError: ``complex_step=True`` but ``f`` cannot take complex inputs; a bad step; a number
        ``rtol`` without ``reference``, or an ``rtol`` entry for a method that is not run.

    >>> import jax.numpy as jnp
    >>> f = lambda p: jnp.sum(jnp.exp(p["w"]) * p["b"])
    >>> x = {"w": jnp.array([0.1, -0.3]), "b": jnp.array([2.0, 1.0])}
    >>> check = gradient(f, x, complex_step=True)
    >>> check.ok, sorted(check.errors)
    (True, ['central_diff', 'complex_step', 'forward', 'forward_diff', 'reverse'])
    >>> check.errors["complex_step"] < 1e-15, 1e-12 < check.errors["central_diff"] < 1e-9
    (True, True)

    References:
      Nocedal & Wright, *Numerical Optimization*, 2006, §8.1; Squire & Trapp, SIAM Review 1998;
      Martins, Sturdza & Alonso, ACM TOMS 2003; Griewank & Walther, *Evaluating Derivatives*, 2008.
    """
    setup = _gradient_setup(f, x, reference, methods, complex_step, step)
    _check_rtol(rtol, setup.chosen)  # before any compilation
    raw = _core(
        _Static(f), setup.x, setup.deltas, None, None, want=setup.want, ref=None, fwd=setup.fwd
    )
    if setup.ref is not None:  # compiled on its own, so that a new reference reuses f's compile
        ref_value = _closed_form(setup.ref, setup.x)
        setup = dataclasses.replace(setup, ref=None, ref_value=ref_value)
    return _gradient_finish(setup, raw, rtol)


@dataclasses.dataclass(frozen=True)
class _GradSetup:
    x: Any
    chosen: list[str]
    want: tuple[str, ...]
    dtype: np.dtype
    eps: float
    deltas: dict[str, Any]  # the relative steps δ of the methods run, as arrays of x's dtype
    ref: _Static | None  # a traceable reference, evaluated inside _core
    ref_value: Any  # or its value (given as a value, or computed eagerly)
    fwd: bool  # whether f has a JVP
    notes: tuple[str, ...]


def _gradient_setup(f, x, reference, methods, complex_step, step) -> _GradSetup:
    x = _as_point("x", x)
    _check_loss("f", f, x)
    want_ref = reference is not None
    chosen = _resolve_methods(methods, reference=want_ref, complex_step=complex_step)
    notes = []
    fwd = _forward_ok(f, x)
    if not fwd and "forward" in chosen:
        if methods is not None and "forward" in methods:
            raise OptionError(
                "methods: 'forward' needs a JVP of f, but f uses a jax.custom_vjp rule, which defines "
                "only the VJP. Leave 'forward' out, or give the rule a custom_jvp."
            )
        chosen.remove("forward")
        notes.append("forward mode skipped: f uses a custom_vjp rule (it has no JVP).")
    dtype = _coarsest_dtype(x)
    eps = float(jnp.finfo(dtype).eps)
    deltas = _default_deltas(eps, step)
    if "complex_step" in chosen:
        _check_complex(f, x)
    ref, ref_value = None, None
    if want_ref:
        if callable(reference):
            ref, ref_value = _traceable("reference", reference, x, like=x)
        else:
            ref_value = _checked_like("reference", reference, x)
    want = tuple(m for m in chosen if m not in ("reverse", "reference"))
    fd = ("forward_diff", "central_diff") if {"forward_diff", "central_diff"} & set(want) else ()
    flat_dtype = _flat_dtype(x)
    return _GradSetup(
        x=x,
        chosen=chosen,
        want=want,
        dtype=dtype,
        eps=eps,
        deltas={k: jnp.asarray(deltas[k], flat_dtype) for k in deltas if k in want or k in fd},
        ref=ref,
        ref_value=ref_value,
        fwd=fwd,
        notes=tuple(notes),
    )


def _gradient_finish(setup: _GradSetup, raw: Mapping[str, Any], rtol: Any) -> GradCheck:
    x, chosen = setup.x, setup.chosen
    flat_x = _np_flat(x)
    g = {m: np.asarray(raw[m], np.float64) for m in chosen if m in raw}
    if setup.ref_value is not None:
        g["reference"] = _np_flat(setup.ref_value)
    base = g["reverse"]
    gnorm = _norm(base) if np.all(np.isfinite(base)) else float("nan")
    den = gnorm if gnorm > 0 else 1.0  # at a stationary point, errors are absolute (see _rel)
    inv_s = _norm(1 / np.maximum(np.abs(flat_x), 1.0))
    rho = abs(float(raw["value"])) * inv_s / den
    deltas = {k: float(v) for k, v in setup.deltas.items()}
    est = {
        m: _norm(np.asarray(raw["est:" + m], np.float64)) / den
        for m in ("forward_diff", "central_diff")
        if "est:" + m in raw
    }
    tolerances = _tolerances(chosen, setup.eps, deltas, rho, est, rtol)
    errors = {m: _rel(g[m], base) for m in chosen}
    errors["reverse"] = 0.0 if np.isfinite(gnorm) else float("nan")
    ok = all(errors[m] <= tolerances[m] for m in chosen)
    message = ""
    if not ok:
        message = _gradient_message(chosen, errors, tolerances, g, _Layout(x), gnorm, deltas)
    notes = list(setup.notes)
    independent = [m for m in chosen if m not in ("reverse", "forward")]
    conclusive = not independent or any(tolerances[m] <= _FD_WEAK_TOL for m in independent)
    if not conclusive:
        weak = ", ".join(f"{m} (tolerance {tolerances[m]:.1e})" for m in independent)
        notes.append(
            f"no method independent of the AD rules is accurate enough here to vouch for the "
            f"gradient: {weak}. Round-off of f swamps the differences (near a minimum, or where "
            "|f| ≫ ‖∇f‖), so a wrong custom rule could pass; check at another point, in float64, "
            "with complex_step=True, or against a reference."
        )
    trees = raw["trees"]
    grads = {m: trees[m] for m in chosen if m in trees}
    if setup.ref_value is not None:
        grads["reference"] = setup.ref_value
    return GradCheck(
        ok=ok,
        errors=errors,
        tolerances=tolerances,
        grads=grads,
        value=raw["value"],
        dtype=setup.dtype,
        steps={k[5:]: v for k, v in trees.items() if k.startswith("step:") and k[5:] in chosen},
        message=message,
        notes=tuple(notes),
        conclusive=conclusive,
    )


def _check_complex(f: Callable, x: Any) -> None:
    xc = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.result_type(a, 1j)), x)
    try:
        out = jax.eval_shape(f, xc)
    except Exception as e:  # any failure to trace at complex inputs means: not usable
        raise OptionError(
            f"complex_step: f cannot be evaluated at complex inputs ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The complex step needs a real-analytic f "
            "written with complex-safe operations; pass complex_step=False."
        ) from None
    if not jnp.issubdtype(out.dtype, jnp.complexfloating):
        raise OptionError(
            f"complex_step: f returns a real {out.dtype} value at complex inputs, so it drops the "
            "imaginary part (abs, real, norm, maximum ...) and is not analytic there. "
            "Pass complex_step=False."
        )


def _gradient_message(
    chosen: Sequence[str],
    errors: Mapping[str, float],
    tolerances: Mapping[str, float],
    g: Mapping[str, np.ndarray],
    layout: _Layout,
    gnorm: float,
    deltas: Mapping[str, float],
) -> str:
    failed = [m for m in chosen if not errors[m] <= tolerances[m]]
    base = _LABELS["reverse"]
    if not np.isfinite(gnorm):
        bad = np.flatnonzero(~np.isfinite(g["reverse"]))
        shown = ", ".join(f"{layout.entry(int(j))} = {g['reverse'][j]}" for j in bad[:3])
        lines = [
            f"gradient check failed: the reverse-mode gradient (the baseline) has {bad.size} "
            f"non-finite entries: {shown}{', ...' if bad.size > 3 else ''}. f is not "
            "differentiable at x, or its derivative overflows there (sqrt, norm or log at 0?): "
            "check at another point."
        ]
        for m in chosen[1:]:
            k = int(np.sum(~np.isfinite(g[m])))
            lines.append(f"  {m}: {k} non-finite entries" if k else f"  {m}: finite")
        return "\n".join(lines)
    lines = [
        f"gradient check failed: {', '.join(failed)} disagree"
        f"{'s' if len(failed) == 1 else ''} with reverse mode (jax.grad)."
    ]
    if gnorm == 0:
        lines.append(
            "note: the reverse-mode gradient is exactly zero here, so errors are absolute; check at "
            "a generic point (e.g. problem.random_point(key)), not at a stationary one."
        )
    others = [m for m in chosen if m not in ("reverse", "reference")]
    if len(others) >= 2 and all(m in failed for m in others):
        lines.append(
            "every other method disagrees with reverse mode: suspect the reverse-mode gradient "
            "itself (a wrong custom_vjp rule?) or a non-differentiable point."
        )
    for m in failed:
        lines.append(
            f"{m}: relative error {errors[m]:.2e} > tolerance {tolerances[m]:.2e} "
            f"({_LABELS[m]} vs {base})."
        )
        if (
            m in ("forward_diff", "central_diff")
            and "forward" in chosen
            and "forward" not in failed
        ):
            lines.append(
                f"  AD modes agree but {_LABELS[m]} do not: f may have a kink or a jump within "
                f"h ≈ {deltas[m]:.1e}·max(1, |x_i|) of x, or a wrong custom_jvp/custom_vjp rule."
            )
        if m == "complex_step":
            lines.append(
                "  is f real-analytic? abs, maximum, where on x, norms, SVDs and eigh break the "
                "complex step; pass complex_step=False for such f."
            )
        lines.extend(
            "  " + s for s in _diagnose(g[m], g["reverse"], layout, tolerances[m], m, base)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# step_sweep
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StepSweep:
    """The result of :func:`step_sweep`: relative error of difference quotients vs the step.

    Attributes:
      steps: the steps ``h`` (a 1-D float64 array, increasing).
      errors: method → array of relative errors ``|D_h − D|/|D|``, one per step.
      best_step: method → the measured optimal step: the minimiser ``(a/(p·b))^{1/(p+1)}`` of the
        V fitted to the measured errors, ``a/h + b·h^p`` (``p = 1`` forward, ``2`` central); the
        argmin of the errors where they have no truncation arm (``b`` NaN).
      predicted_step: method → ``√ε·scale`` (forward) or ``ε^{1/3}·scale`` (central).
      fit: method → ``(a, b)``: the round-off and truncation constants read off the two arms of the
        measured V (medians of ``e·h`` left of the optimum and of ``e/h^p`` right of it); ``b`` is
        NaN where the errors have no arm rising like ``h^p`` (the quotient is exact up to rounding,
        as central differences of a quadratic, or jumps at a kink of a piecewise-smooth ``f``).
      exact: ``D = ⟨∇f(x), v⟩`` from ``jax.jvp``.
      direction: the unit direction ``v`` (a pytree like ``x``).
      scale: ``max(1, ‖x‖∞)``.
      dtype: the dtype that sets ε.
    """

    steps: np.ndarray
    errors: dict[str, np.ndarray]
    best_step: dict[str, float]
    predicted_step: dict[str, float]
    fit: dict[str, tuple[float, float]]
    exact: float
    direction: Any
    scale: float
    dtype: Any

    def table(self) -> str:
        """One row per step: the error of each method; the best and predicted steps are marked."""
        methods = list(self.errors)
        rows = []
        for k, h in enumerate(self.steps):
            notes = []
            for m in methods:
                if k == int(np.argmin(np.abs(np.log(self.steps / self.best_step[m])))):
                    notes.append(f"≈ best {m}")
                if k == int(np.argmin(np.abs(np.log(self.steps / self.predicted_step[m])))):
                    notes.append(f"≈ predicted {m}")
            rows.append(
                [f"{h:.2e}", *(f"{self.errors[m][k]:.1e}" for m in methods), ", ".join(notes)]
            )
        summary = [
            f"{m}: best step {self.best_step[m]:.2e} (min error {np.min(self.errors[m]):.1e}), "
            f"predicted {self.predicted_step[m]:.2e}"
            for m in methods
        ]
        return _table(["step", *methods, "note"], rows, left=0) + "\n" + "\n".join(summary)

    def __str__(self) -> str:
        return self.table()


def _sweep_core(fn: _Static, x: Any, v: Any, steps: jax.Array):
    f = fn.fn
    flat, unravel = ravel_pytree(x)
    vflat = ravel_pytree(v)[0]
    value, exact = jax.jvp(f, (x,), (v,))

    def body(h):
        return f(unravel(flat + h * vflat)), f(unravel(flat - h * vflat))

    plus, minus = jax.lax.map(body, steps, batch_size=min(_chunk(), steps.shape[0]))
    return value, exact, plus, minus


def _fit_v(hs: np.ndarray, errs: np.ndarray, p: int) -> tuple[float, float, float]:
    """Fit ``e(h) ≈ a/h + b·h^p`` to a measured V; return ``(h*, a, b)``, ``h*`` its minimiser.

    The raw argmin of a measured V is noisy (round-off errors scatter by orders of magnitude), so the
    constants are read off the arms: ``a`` = median of ``e·h`` well left of the optimum, ``b`` =
    median of ``e/h^p`` well right of it (errors in ``(0, 0.5)`` only: beyond that the quotient is
    saturated or no longer asymptotic); then ``h* = (a/(p·b))^{1/(p+1)}``, iterated from the argmin.
    Falls back to the argmin where an arm is missing (``b`` is still read off a right arm alone).

    A truncation arm must *be* one: at least 2 points, rising like ``h^p`` over its upper half (the
    lower end may still be round-off): log-log slope at least ``p/2``, and ``e/h^p`` within a factor
    30 there. Otherwise — a single point of rounding noise (central differences of a quadratic), the
    plateau or the jump of a stencil that straddles a kink of a piecewise-smooth ``f`` — ``b`` is NaN,
    the errors have no interior optimum to fit, and ``h*`` is the argmin of the errors.
    """
    usable = np.isfinite(errs) & (errs > 0) & (errs < 0.5)
    h_argmin = float(hs[int(np.nanargmin(np.where(np.isfinite(errs), errs, np.inf)))])
    nan = float("nan")

    def truncation(right: np.ndarray) -> float:
        idx = np.flatnonzero(right)
        if idx.size < 2:
            return nan
        top = idx[idx.size // 2 :] if idx.size >= 4 else idx
        ratio = errs[top] / hs[top] ** p
        slope = np.polyfit(np.log(hs[top]), np.log(errs[top]), 1)[0]
        if slope < p / 2 or ratio.max() > 30 * ratio.min():
            return nan
        return float(np.median(errs[right] / hs[right] ** p))

    h_best, a = h_argmin, nan
    b = truncation(usable & (hs > h_best * 4))  # even where the round-off arm is missing
    for _ in range(5):
        if not math.isfinite(b):
            return h_argmin, a, nan
        left, right = usable & (hs < h_best / 4), usable & (hs > h_best * 4)
        if not left.any():
            break
        a = float(np.median(errs[left] * hs[left]))
        b = truncation(right)
        if not math.isfinite(b):
            return h_argmin, a, nan
        h_new = float(np.clip((a / (p * b)) ** (1 / (p + 1)), hs[0], hs[-1]))
        converged = abs(math.log(h_new / h_best)) < 1e-3
        h_best = h_new
        if converged:
            break
    return h_best, a, b


@_full_precision
def step_sweep(
    f: Callable[[Any], Any],
    x: Any,
    /,
    *,
    direction: Any = None,
    steps: Any = None,
    methods: Sequence[str] = _SWEEP_METHODS,
    key: Any = None,
) -> StepSweep:
    """The V-shaped error-vs-step curve of forward and central differences along one direction.

    Math:
      For the directional derivative ``D = ⟨∇f(x), v⟩`` (``‖v‖ = 1``, exact from ``jax.jvp``):

      - forward: ``(f(x + hv) − f(x))/h = D + (h/2) f'' + O(ε|f|/h)``: the error falls like ``h``
        (right arm, slope 1) until round-off ``~ε|f|/h`` takes over (left arm, slope −1); the two
        meet near ``h* = 2√(ε|f|/|f''|) ~ √ε``;
      - central: ``(f(x + hv) − f(x − hv))/2h = D + (h²/6) f''' + O(ε|f|/h)``: right arm of slope 2,
        ``h* = (3ε|f|/|f'''|)^{1/3} ~ ε^{1/3}``.

      The predictions are ``√ε·scale`` and ``ε^{1/3}·scale`` with ``scale = max(1, ‖x‖∞)``; they
      hold up to the factor ``(|f|/|f'''|)^{1/3}`` (or ``(|f|/|f''|)^{1/2}``), i.e. for functions
      whose value and derivatives along ``v`` are of one size.

    Args:
      f: ``f(x) -> scalar``, JAX-traceable.
      x: the point, any pytree of real floating arrays.
      direction: ``v``, a pytree like ``x`` (normalised here). Default: a random unit direction from
        ``key`` if given, else the normalised all-ones pytree.
      steps: the steps ``h`` (positive; used as given). Default: 61 steps log-spaced over
        ``[1e-16, 1e-1]·scale`` (4 per decade).
      methods: a subset of ``("forward", "central")``.
      key: a ``jax.random.key`` for a random direction (only used when ``direction`` is None).

    Returns:
      a :class:`StepSweep` (``.steps``, ``.errors``, ``.best_step``, ``.predicted_step``, ``.table()``).

    >>> import jax.numpy as jnp
    >>> f = lambda x: jnp.sum(jnp.tanh(x))
    >>> sweep = step_sweep(f, jnp.array([0.3, -0.2, 0.5]))
    >>> ratio = sweep.best_step["central"] / sweep.predicted_step["central"]
    >>> bool(1 / 3 <= ratio <= 3)
    True
    >>> bool(np.min(sweep.errors["central"]) < 1e-9 < np.min(sweep.errors["forward"]))
    True
    >>> print(sweep.table().splitlines()[-1])
    central: best step ...e-06 (min error ...e-12), predicted 6.06e-06

    References:
      Nocedal & Wright, *Numerical Optimization*, 2006, §8.1 (the forward/central step analysis);
      Griewank & Walther, *Evaluating Derivatives*, 2008, ch. 1.
    """
    x = _as_point("x", x)
    _check_loss("f", f, x)
    if isinstance(methods, str):
        methods = [methods]
    methods = [check_choice("methods", m, _SWEEP_METHODS) for m in methods]
    if not methods:
        raise OptionError("methods: expected at least one of ('forward', 'central'), got none.")
    dtype = _coarsest_dtype(x)
    eps = float(jnp.finfo(dtype).eps)
    flat, unravel = ravel_pytree(x)
    if direction is None:
        if key is not None:
            check_key(key, "step_sweep")
            direction = tree_random_normal(key, x)
        else:
            direction = jax.tree.map(jnp.ones_like, x)
    direction = _checked_like("direction", direction, x)
    vflat = np.asarray(ravel_pytree(direction)[0], np.float64)
    vnorm = _norm(vflat)
    if not vnorm > 0 or not np.isfinite(vnorm):
        raise OptionError(f"direction: expected a nonzero finite direction, got norm {vnorm}.")
    v = unravel(jnp.asarray(vflat / vnorm, flat.dtype))
    scale = max(1.0, float(np.max(np.abs(np.asarray(flat, np.float64)))))
    if steps is None:
        hs = np.logspace(-16, -1, 61) * scale
    else:
        hs = np.sort(np.asarray(steps, np.float64).ravel())
        if hs.size == 0 or not np.all(hs > 0) or not np.all(np.isfinite(hs)):
            raise OptionError(f"steps: expected positive finite steps, got {steps!r}.")
    core = _jit(_sweep_core, ("fn",), True)
    value, exact, plus, minus = core(_Static(f), x, v, jnp.asarray(hs, flat.dtype))
    hs_used = np.asarray(jnp.asarray(hs, flat.dtype), np.float64)
    value, exact = float(value), float(exact)
    plus, minus = np.asarray(plus, np.float64), np.asarray(minus, np.float64)
    den = max(abs(exact), np.finfo(np.float64).tiny)
    approx = {"forward": (plus - value) / hs_used, "central": (plus - minus) / (2 * hs_used)}
    errors = {m: np.abs(approx[m] - exact) / den for m in methods}
    predicted = {"forward": math.sqrt(eps) * scale, "central": eps ** (1 / 3) * scale}
    fits = {m: _fit_v(hs_used, errors[m], 1 if m == "forward" else 2) for m in methods}
    return StepSweep(
        steps=hs_used,
        errors=errors,
        best_step={m: fits[m][0] for m in methods},
        predicted_step={m: predicted[m] for m in methods},
        fit={m: fits[m][1:] for m in methods},
        exact=exact,
        direction=v,
        scale=scale,
        dtype=dtype,
    )


# --------------------------------------------------------------------------------------------------
# hvp
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class HVPCheck:
    """The result of :func:`hvp`.

    Attributes:
      ok: ``error <= tolerance``.
      error: ``‖Hv_got − H v‖/‖H v‖`` against the dense Hessian.
      tolerance: the tolerance.
      message: what failed and where (empty when ``ok``).
      mode: the AD mode name, or ``"closed form"``.
      value: the checked HVP (a pytree like ``x``).
      expected: ``H v`` from the dense Hessian (a pytree like ``x``).
      v: the direction used.
      dtype: the dtype that sets ε.
      oracle_suspect: a failed check whose oracle is itself in doubt: central differences of
        ``jax.grad`` agree with the checked HVP, not with the dense Hessian (see the message).
    """

    ok: bool
    error: float
    tolerance: float
    message: str
    mode: str
    value: Any
    expected: Any
    v: Any
    dtype: Any
    oracle_suspect: bool = False

    def __str__(self) -> str:
        head = (
            f"hvp check ({self.mode}, {self.dtype}): relative error {self.error:.1e}, tolerance "
            f"{self.tolerance:.1e}: {'ok' if self.ok else 'FAILED'}"
        )
        return "\n".join(filter(None, [head, self.message]))


# the three AD compositions of an HVP, shared with gradlab.curvature.hvp
from gradlab.curvature import _HVP as _HVP_FNS  # noqa: E402

_DENSE_ONLY = "dense"  # _core: only the dense H·v (the HVP itself was evaluated eagerly)


@_full_precision
def hvp(
    f: Callable[[Any], Any],
    x: Any,
    hvp_fn: Callable[[Any, Any], Any] | str,
    /,
    *,
    v: Any = None,
    key: Any = None,
    rtol: float | None = None,
) -> HVPCheck:
    """Check a Hessian-vector product ``∇²f(x) v`` against the dense Hessian.

    Math:
      The oracle is the dense Hessian ``H = ∇²f(x)`` of the ravelled function (``jax.hessian``'s
      forward-over-reverse, ``n`` JVPs of ``jax.grad``, evaluated in chunks; reverse-over-reverse
      where ``f`` uses a ``custom_vjp``, which has no JVP), times ``v``. The checked
      HVP is a closed form ``hvp_fn(x, v)`` or an AD composition by name: ``"fwd_rev"``
      ``= jvp(grad f)(x; v)``, ``"rev_fwd"`` ``= grad(x ↦ ⟨∇f(x), v⟩ by jvp)``, ``"rev_rev"``
      ``= vjp(grad f)(x)(v)`` (``H`` is symmetric, so a VJP of the gradient is an HVP). Each costs a
      small multiple of a gradient (Griewank & Walther 2008, ch. 5; Pearlmutter 1994). The error
      ``‖hv − Hv‖/‖Hv‖`` is held to ``rtol``: default ``1e3·ε`` for the AD modes, and ``1e-8``
      (float64) / ``1e-4`` (float32) for closed forms. Where ``‖Hv‖ ≪ ‖H‖‖v‖`` (``v`` near the null
      space of ``H``) the relative error is rounding noise, and the message says so.

    Cost: ``n`` HVPs and ``n²`` memory for the dense Hessian — for small problems.

    Args:
      f: ``f(x) -> scalar``, JAX-traceable.
      x: the point, any pytree of real floating arrays.
      hvp_fn: a closed form ``hvp_fn(x, v) -> pytree like x``, or one of :data:`HVP_MODES`.
      v: the direction, a pytree like ``x``; default a standard normal draw from ``key``.
      key: a ``jax.random.key``; required when ``v`` is None.
      rtol: the tolerance (see above for the default).

    Returns:
      an :class:`HVPCheck` (``.ok``, ``.error``, ``.tolerance``, ``.message``).

    >>> import jax, jax.numpy as jnp
    >>> f = lambda x: jnp.sum(x**4) / 4
    >>> x = jnp.array([1.0, -2.0, 0.5])
    >>> [hvp(f, x, m, key=jax.random.key(0)).ok for m in HVP_MODES]
    [True, True, True]
    >>> hvp(f, x, lambda x, v: 3 * x**2 * v, key=jax.random.key(0)).ok
    True
    >>> hvp(f, x, lambda x, v: 2 * x**2 * v, key=jax.random.key(0)).ok
    False

    References:
      B. A. Pearlmutter, Fast exact multiplication by the Hessian, Neural Computation 6(1), 1994;
      Griewank & Walther, *Evaluating Derivatives*, 2008.
    """
    setup = _hvp_setup(f, x, hvp_fn, v, key)
    closed = setup.hvp_fn if isinstance(setup.hvp_fn, _Static) else None
    raw = _core(
        _Static(f),
        setup.x,
        {},
        setup.v,
        setup.key,
        want=(),
        ref=None,
        hvp_fn=_DENSE_ONLY if closed else setup.hvp_fn,
        fwd=setup.fwd,
    )
    if closed is not None:  # compiled on its own, so that a new closed form reuses f's compile
        value = _closed_form(closed, setup.x, raw["trees"]["v"])
        setup = dataclasses.replace(setup, hvp_value=value)
    check = _hvp_finish(setup, raw, rtol)
    if not check.ok:
        check = _second_opinion(f, setup, check)
    return check


def _second_opinion(f: Callable, setup: _HVPSetup, check: HVPCheck) -> HVPCheck:
    """A failed HVP check, with the oracle itself put to the test: central differences of
    ``jax.grad`` along ``v`` (step ``ε^{1/3}·max(1, ‖x‖)/‖v‖``, no second-order AD). When the checked
    HVP agrees with them and the dense Hessian does not (JAX's SVD and eigh rules are undefined at
    repeated values, where a closed form can still be right), the message says the oracle is suspect."""
    flat_x, unravel = ravel_pytree(setup.x)
    flat_v = ravel_pytree(check.v)[0].astype(flat_x.dtype)

    def grad_flat(z):
        return ravel_pytree(jax.grad(f)(unravel(z)))[0].astype(flat_x.dtype)

    vnorm = float(jnp.linalg.norm(flat_v))
    if vnorm == 0:
        return check
    h = setup.eps ** (1 / 3) * max(1.0, float(jnp.linalg.norm(flat_x))) / vnorm
    fd = np.asarray((grad_flat(flat_x + h * flat_v) - grad_flat(flat_x - h * flat_v)) / (2 * h))
    got, exp = _np_flat(check.value), _np_flat(check.expected)
    e_got, e_exp = _rel(got, fd), _rel(exp, fd)
    e_exp = e_exp if np.isfinite(e_exp) else float("inf")
    if not (np.isfinite(e_got) and e_got <= 1e-3 and e_got <= 0.1 * e_exp):
        return check
    note = (
        f"  the oracle is suspect here: central differences of jax.grad along v agree with "
        f"{check.mode} (relative error {e_got:.1e}) but not with the dense Hessian times v "
        f"({e_exp:.1e}). JAX's derivatives of SVD/eigh are undefined at repeated singular values "
        "or eigenvalues; check at a point where they are distinct."
    )
    return dataclasses.replace(check, message=check.message + "\n" + note, oracle_suspect=True)


@dataclasses.dataclass(frozen=True)
class _HVPSetup:
    x: Any
    v: Any  # None: drawn from key inside _core
    key: Any
    mode: str | None
    hvp_fn: _Static | str  # what _core evaluates (a mode name, or a traceable closed form)
    hvp_value: Any  # the closed form's value, when it had to be computed eagerly
    dtype: np.dtype
    eps: float
    fwd: bool  # whether f has a JVP (else the dense Hessian is reverse over reverse)


def _hvp_setup(f, x, hvp_fn, v, key) -> _HVPSetup:
    x = _as_point("x", x)
    _check_loss("f", f, x)
    if isinstance(hvp_fn, str):
        mode = check_choice("hvp_fn", hvp_fn, HVP_MODES)
    elif callable(hvp_fn):
        mode = None
    else:
        raise OptionError(
            f"hvp_fn: expected a callable hvp_fn(x, v) or one of {list(HVP_MODES)}, got {hvp_fn!r}."
        )
    if v is None:
        if key is None:
            raise OptionError(
                "key: a jax.random.key is required when v is None (the direction is random). "
                "Pass key=jax.random.key(seed), or v=<a pytree like x>."
            )
        check_key(key, "hvp")
    else:
        v = _checked_like("v", v, x)
    dtype = _coarsest_dtype(x)
    fwd = _forward_ok(f, x)
    if not fwd and mode in ("fwd_rev", "rev_fwd"):
        raise OptionError(
            f"hvp_fn: {mode!r} needs a JVP of f, but f uses a jax.custom_vjp rule (VJP only). "
            "Use 'rev_rev'."
        )
    static, value = mode, None
    if mode is None:
        v_like = (
            v
            if v is not None
            else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
        )
        static, value = _traceable("hvp_fn(x, v)", hvp_fn, x, v_like, like=x)
        if static is None and v is None:  # evaluated eagerly: it needs the direction now
            v = tree_random_normal(key, x)
            value = _checked_like("hvp_fn(x, v)", hvp_fn(x, v), x)
    return _HVPSetup(
        x=x,
        v=v,
        key=key,
        mode=mode,
        hvp_fn=static if static is not None else _DENSE_ONLY,
        hvp_value=value,
        dtype=dtype,
        eps=float(jnp.finfo(dtype).eps),
        fwd=fwd,
    )


def _hvp_finish(setup: _HVPSetup, raw: Mapping[str, Any], rtol: Any) -> HVPCheck:
    eps, mode = setup.eps, setup.mode
    trees = raw["trees"]
    got = raw["hvp"] if setup.hvp_value is None else _np_flat(setup.hvp_value)
    if rtol is None:
        tol = _C_AD * eps if mode is not None else _default_rtol(eps)
    else:
        tol = check_positive("rtol", rtol)
    exp_np, got_np = np.asarray(raw["hv_expected"], np.float64), np.asarray(got, np.float64)
    error = _rel(got_np, exp_np)
    ok = bool(error <= tol)
    label = mode or "hvp_fn"
    message = ""
    if not ok:
        lines = [
            f"hvp check failed: {label} has relative error {error:.2e} > tolerance {tol:.2e} "
            "against the dense Hessian (jax.hessian) times v."
        ]
        hv, hnorm, vnorm = _norm(exp_np), float(raw["hessian_norm"]), _norm(np.asarray(raw["v"]))
        if hv <= 1e-8 * hnorm * vnorm or hnorm == 0:
            lines.append(
                f"  note: ‖H v‖ = {hv:.1e} is tiny next to ‖H‖_F‖v‖ = {hnorm * vnorm:.1e}: v lies "
                "(nearly) in the null space of H (e.g. v ∝ x for a positively homogeneous f), so "
                "the relative error is rounding noise. Check with another v."
            )
        lines += [
            "  " + s
            for s in _diagnose(
                got_np, exp_np, _Layout(setup.x), tol, label, "dense H·v", "Hessian-vector product"
            )
        ]
        message = "\n".join(lines)
    return HVPCheck(
        ok=ok,
        error=error,
        tolerance=tol,
        message=message,
        mode=mode or "closed form",
        value=trees["hvp"] if setup.hvp_value is None else setup.hvp_value,
        expected=trees["hv_expected"],
        v=trees["v"],
        dtype=setup.dtype,
    )


# --------------------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogRow:
    """One problem of :func:`catalog`: its gradient check, its HVP check (or None), and ``ok``."""

    name: str
    errors: dict[str, float]
    tolerances: dict[str, float]
    hvp_error: float | None
    hvp_tolerance: float | None
    ok: bool
    message: str
    seconds: float


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogCheck:
    """The result of :func:`catalog`: one :class:`CatalogRow` per problem."""

    rows: list[CatalogRow]
    ok: bool
    dtype: Any

    def table(self) -> str:
        """The catalog table (``gradlab check``), then the messages of the rows that failed.

        Columns: ``problem``, each method's relative error vs reverse mode, ``hvp`` (vs the dense
        Hessian; ``-`` where the problem has no closed-form HVP), ``ok``. ``-`` marks a method not
        run (the complex step runs only for analytic problems).
        """
        methods = [m for m in METHODS if any(m in r.errors for r in self.rows)]
        body = [
            [
                r.name,
                *(_e(r.errors.get(m)) for m in methods),
                _e(r.hvp_error),
                "ok" if r.ok else "FAIL",
            ]
            for r in self.rows
        ]
        out = _table(["problem", *methods, "hvp", "ok"], body)
        failed = [r for r in self.rows if not r.ok]
        out += f"\n{len(self.rows) - len(failed)} of {len(self.rows)} problems ok ({self.dtype})."
        for r in failed:
            out += f"\n\n{r.name}:\n{r.message}"
        return out

    def __str__(self) -> str:
        return self.table()


@_full_precision
def _catalog_row(problems: Any, name: str, subkey: Any, dtype: Any, methods: Any) -> CatalogRow:
    """Make problem ``name``, check it in one compiled function, and summarise it in a row."""
    t0 = time.perf_counter()
    k_make, k_point, k_v = jax.random.split(subkey, 3)
    try:
        p = problems.make(name, k_make, **({} if dtype is None else {"dtype": dtype}))
        x = p.random_point(k_point) if p.random_point is not None else p.init
        gs = _gradient_setup(p.loss, x, p.grad, methods, p.analytic, None)
        hs = _hvp_setup(p.loss, gs.x, p.hvp, None, k_v) if p.hvp is not None else None
        raw = _core(
            _Static(p.loss),
            gs.x,
            gs.deltas,
            hs.v if hs else None,
            hs.key if hs else None,
            want=gs.want,
            ref=gs.ref,
            hvp_fn=hs.hvp_fn if hs else None,
            fwd=gs.fwd,
        )
        g = _gradient_finish(gs, raw, None)
        h = _hvp_finish(hs, raw, None) if hs else None
    except Exception as e:  # a broken problem is a failed row, not a crashed table
        return CatalogRow(
            name=name,
            errors={},
            tolerances={},
            hvp_error=None,
            hvp_tolerance=None,
            ok=False,
            message=f"error: {type(e).__name__}: {e}",
            seconds=time.perf_counter() - t0,
        )
    return CatalogRow(
        name=name,
        errors=g.errors,
        tolerances=g.tolerances,
        hvp_error=h.error if h else None,
        hvp_tolerance=h.tolerance if h else None,
        ok=g.ok and (h.ok if h else True),
        message="\n".join(filter(None, [g.message, h.message if h else ""])),
        seconds=time.perf_counter() - t0,
    )


@_full_precision
def catalog(
    names: Sequence[str] | str | None = None,
    /,
    *,
    key: Any,
    dtype: Any = None,
    methods: Sequence[str] | None = None,
    workers: int | None = None,
) -> CatalogCheck:
    """Check every catalog problem's closed-form gradient (and HVP) at a random point.

    For problem number ``i`` of :func:`gradlab.problems.names` (its index in the full sorted list, so a
    row does not depend on which others are run), ``subkey = fold_in(key, i)`` is split three ways:
    the instance key (``problems.make``), the point key (``problem.random_point``) and the HVP
    direction key. (Independent keys matter: with ``v = x`` a positively homogeneous loss such as the
    nuclear norm has ``H v = 0``.) Then :func:`gradient` runs with ``reference=problem.grad`` and
    ``complex_step=problem.analytic``, and :func:`hvp` with ``problem.hvp`` where it is not None, in
    one compiled function per problem. A problem that raises is reported as a failed row with the
    exception.

    Args:
      names: problem names (default: all of :func:`gradlab.problems.names`).
      key: a ``jax.random.key`` (required).
      dtype: passed to ``problems.make`` (e.g. ``"float32"``); default JAX's default float.
      methods: passed to :func:`gradient` (the reference is always checked).
      workers: problems checked at once in threads (XLA compiles outside the GIL); default
        ``min(2, os.cpu_count())``. Rows come back in order and do not depend on it.

    Returns:
      a :class:`CatalogCheck` (``.rows``, ``.ok``, ``.table()``).

    >>> import jax
    >>> result = catalog(["quadratic"], key=jax.random.key(0))
    >>> result.ok, result.rows[0].name
    (True, 'quadratic')

    Reference: each problem's ``Problem.reference``; the tolerances as in :func:`gradient` and
      :func:`hvp`.
    """
    from gradlab import problems

    check_key(key, "catalog")
    all_names = problems.names()
    if names is None:
        names = all_names
    elif isinstance(names, str):
        names = [names]
    names = [check_choice("names", n, all_names) for n in names]
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = check_positive_int("workers", workers)

    def row(name: str) -> CatalogRow:
        subkey = jax.random.fold_in(key, all_names.index(name))
        return _catalog_row(problems, name, subkey, dtype, methods)

    _fast_options()  # probe once, before any thread does
    if workers == 1 or len(names) == 1:
        rows = [row(n) for n in names]
    else:
        # XLA compiles outside the GIL: two problems compile at once on two cores
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(row, names))
    dt = np.dtype(dtype) if dtype is not None else np.dtype(jnp.zeros(()).dtype)
    return CatalogCheck(rows=rows, ok=all(r.ok for r in rows), dtype=dt)
