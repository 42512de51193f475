"""Curvature of a loss: Hessian-vector products, Hessian trace, diagonal and spectrum, on pytrees (floor 3).

Everything here works on a *linear operator* given as a function ``matvec(v) -> A v`` of pytrees shaped like
the parameters (``like=``), for example the HVP operator of a loss, :func:`hvp_operator`. Internally the
operator acts on the ravelled vector ``v ∈ R^n`` (``n`` = total size of ``like``, the order of
``jax.flatten_util.ravel_pytree``); results that are matrices (:func:`hessian`) are over that ravelled
vector, results that are vectors (:func:`diagonal`, eigenvectors) come back as pytrees.

- :func:`hvp` — ``∇²f(x) v`` by forward-over-reverse, reverse-over-forward or reverse-over-reverse AD
  (Pearlmutter 1994); :func:`hvp_operator` linearizes ``∇f`` once and applies it many times;
  :func:`hessian` is the dense ``n × n`` Hessian (small problems, test oracle).
- :func:`trace` / :func:`hessian_trace` — stochastic trace estimation: Hutchinson (1989), Hutch++ (Meyer,
  Musco, Musco & Woodruff 2021), XTrace and XNysTrace (Epperly, Tropp & Webber 2024), and ``auto``, which
  picks between Hutchinson and the variance-reduced methods from a first block of probes. Every estimate
  carries a calibrated standard error and the number of matvecs it used; ``rtol=`` stops early.
- :func:`diagonal` — Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad 2007) and XDiag (Epperly,
  Tropp & Webber 2024).
- :func:`eigenvalues` — extreme eigenvalues by Lanczos with full reorthogonalization.
- :func:`spectral_density` — stochastic Lanczos quadrature (Golub & Meurant 2010; Ubaru, Chen & Saad 2017).

Probes go through the operator in chunks: ``batch_size=None`` applies a whole block with one ``vmap``
(best for matrices), ``batch_size=b`` uses ``lax.map`` over chunks of ``b`` (bounded memory: on CPU one
``vmap`` over 100 HVPs costs more per HVP and ~50× the temporaries of a loop). ``mesh=`` (a
``jax.sharding.Mesh`` with one axis) spreads a probe block over the devices with ``shard_map``. The
LAPACK-based reductions (QR, eigh) run once on the gathered block, never vmapped across seeds.

Standard errors: ``value ± 1.96·std_error`` is a 95% interval. For quadratic forms ``zᵀRz``
(Hutchinson, the Hutch++ residual) ``std_error`` comes from the structure of their variance,
``2(‖R‖_F² − Σ r_jj²)/m`` (Rademacher; Gaussian ``2‖R‖_F²/m``, sphere ``2n/(n+2)·(‖R‖_F² − (tr R)²/n)/m``),
with ``‖R‖_F²`` estimated from the products ``‖Rz‖²`` that the estimator computes anyway (steadier than
the terms' sample variance, which collapses exactly when a skewed mean falls short), and a Student
``t`` critical value with that estimate's degrees of freedom. The
leave-one-out terms of XTrace/XNysTrace are positively correlated through their shared sketch, so
their naive standard error under-covers; gradlab adds an unbiased estimate of that covariance from
leave-two-out terms (see :func:`trace`).

>>> import jax, jax.numpy as jnp
>>> A = jnp.diag(jnp.arange(1.0, 11.0))
>>> est = trace(lambda v: A @ v, jax.random.key(0), like=jnp.zeros(10), num_matvecs=10)
>>> float(est.value), int(est.num_matvecs)   # exact with n = 10 matvecs
(55.0, 10)
>>> bool(est.std_error == 2 * jnp.finfo(jnp.float64).eps * 55.0)   # the rounding floor, not 0
True
>>> f = lambda p: jnp.sum(p["w"] ** 4) / 4 + p["b"] ** 2
>>> x = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
>>> hvp(f, x, {"w": jnp.ones(2), "b": jnp.array(1.0)})["w"]
Array([ 3., 12.], dtype=float64)

References: Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Comput. 6(1); Hutchinson
(1989), A stochastic estimator of the trace of the influence matrix for Laplacian smoothing splines,
Commun. Stat. Simul. Comput. 18(3); Meyer, Musco, Musco & Woodruff (2021), Hutch++: optimal stochastic
trace estimation, SOSA; Epperly, Tropp & Webber (2024), XTrace: making the most of every sample in
stochastic trace estimation, SIAM J. Matrix Anal. Appl. 45(1); Bekas, Kokiopoulou & Saad (2007), An
estimator for the diagonal of a matrix, Appl. Numer. Math. 57; Golub & Meurant (2010), Matrices, Moments
and Quadrature with Applications; Ubaru, Chen & Saad (2017), Fast estimation of tr(f(A)) via stochastic
Lanczos quadrature, SIAM J. Matrix Anal. Appl. 38(4); Ghorbani, Krishnan & Xiao (2019), An investigation
into neural net optimization via Hessian eigenvalue density, ICML; Hall (1992), The Bootstrap and
Edgeworth Expansion, Springer; Efron & Stein (1981), The jackknife estimate of variance, Ann. Stat. 9(3).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradlab import samplers
from gradlab._backend import platform
from gradlab._validate import (
    GradlabError,
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
    "DIAGONAL_METHODS",
    "HVP_MODES",
    "SAMPLERS",
    "TRACE_METHODS",
    "DiagonalEstimate",
    "Eigenvalues",
    "Estimate",
    "SpectralDensity",
    "diagonal",
    "eigenvalues",
    "hessian",
    "hessian_trace",
    "hvp",
    "hvp_operator",
    "spectral_density",
    "trace",
]

HVP_MODES = ("fwd_rev", "rev_fwd", "rev_rev")
"""The AD compositions :func:`hvp` accepts (forward-over-reverse, reverse-over-forward, reverse-over-reverse)."""

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "xnystrace", "auto")
"""The trace estimators of :func:`trace`."""

DIAGONAL_METHODS = ("hutchinson", "xdiag")
"""The diagonal estimators of :func:`diagonal`."""

SAMPLERS = ("rademacher", "gaussian", "sphere")
"""Probe distributions; all are scaled so that ``E[z zᵀ] = I`` (``sphere``: radius ``√n``)."""

_ROTATION_INVARIANT = ("gaussian", "sphere")
_MIN_MATVECS = {"hutchinson": 2, "hutch++": 4, "xtrace": 4, "xnystrace": 2, "auto": 8}
_DEFAULT_SAMPLER = {
    "hutchinson": "rademacher",
    "hutch++": "rademacher",
    "xtrace": "sphere",
    "xnystrace": "sphere",
    "auto": "sphere",
}
_SYM_RTOL = 1e-6  # relative asymmetry of Ωᵀ A Ω above which the operator is "not symmetric"
_DEFAULT_BLOCK = 10  # the fewest probes per block (and first sketch) of the rtol stopping rule
# the smallest standard error reported, in units of eps·|value|: on an exactly low-rank operator the
# sketch captures everything and the stochastic part is rounding, while the rounding error of the
# low-rank part itself (0.5–5 ulps, measured) is not in it (coverage 0.07–0.9 before this floor)
_ROUNDING_FLOOR = 2.0


class Estimate(NamedTuple):
    """A stochastic estimate of a scalar: ``value ± 1.96·std_error`` is a 95% interval.

    Attributes:
      value: the estimate (a 0-d array).
      std_error: its calibrated standard error, never below the rounding floor ``2·eps·|value|``
        (the floor alone where the result is exact: ``num_matvecs ≥ n``).
      num_matvecs: the number of operator applications used (an int array; with ``rtol`` it can be
        below the budget).
    """

    value: jax.Array
    std_error: jax.Array
    num_matvecs: jax.Array


class DiagonalEstimate(NamedTuple):
    """An estimate of ``diag(A)`` as a pytree like the parameters, with per-entry standard errors."""

    value: Any
    std_error: Any
    num_matvecs: jax.Array


class Eigenvalues(NamedTuple):
    """Ritz pairs from Lanczos.

    Attributes:
      values: ``(k,)`` eigenvalue estimates, sorted (descending for ``"largest"``/``"magnitude"``,
        ascending for ``"smallest"``).
      vectors: the Ritz vectors, a pytree like the parameters with a leading axis ``k``.
      residuals: ``(k,)`` residual norms ``‖A u − θ u‖``: some eigenvalue of ``A`` lies within it of
        each value (not necessarily the k-th: see :func:`eigenvalues` on multiplicities).
      num_matvecs: operator applications used (the Lanczos iterations).
    """

    values: jax.Array
    vectors: Any
    residuals: jax.Array
    num_matvecs: jax.Array


class SpectralDensity(NamedTuple):
    """A smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
      grid: ``(num_points,)`` evaluation points.
      density: ``(num_points,)`` density values; ``∫ density ≈ 1`` (trapezoid on ``grid``).
      nodes: ``(num_probes, num_iters)`` Gauss quadrature nodes (Ritz values) per probe.
      weights: ``(num_probes, num_iters)`` quadrature weights (each row sums to 1).
      num_matvecs: operator applications used.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    num_matvecs: jax.Array


# --------------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------------


def _check_loss(f: Callable, x: Any) -> None:
    check_float_params("x", x)
    check_scalar_output("f", jax.eval_shape(f, x))


def _check_direction(v: Any, x: Any) -> None:
    """``v`` must be a direction at ``x``: its structure, leaf shapes and dtypes."""
    check_same_structure("v", v, x, dtypes=True)


def _hvp_fwd_rev(f, x, v):
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


def _hvp_rev_fwd(f, x, v):
    return jax.grad(lambda y: jax.jvp(f, (y,), (v,))[1])(x)


def _hvp_rev_rev(f, x, v):
    return jax.vjp(jax.grad(f), x)[1](v)[0]


_HVP = {"fwd_rev": _hvp_fwd_rev, "rev_fwd": _hvp_rev_fwd, "rev_rev": _hvp_rev_rev}


def hvp(f: Callable[[Any], Any], x: Any, v: Any, /, *, mode: str = "fwd_rev") -> Any:
    """The Hessian-vector product ``∇²f(x) v`` without forming the Hessian.

    Math (Pearlmutter 1994): ``∇²f(x) v = ∇_x ⟨∇f(x), v⟩ = d/dt ∇f(x + t v)|₀``. The three AD
    compositions cost a small multiple of one gradient (at most 2; 1.01–1.29 measured on a 100k-parameter
    MLP, ``benchmarks/hvp_cost.py``):

    - ``"fwd_rev"``: ``jvp(grad f)(x; v)`` — forward over reverse (least memory; the default);
    - ``"rev_fwd"``: ``grad(y ↦ jvp(f)(y; v))(x)`` — reverse over forward;
    - ``"rev_rev"``: ``vjp(grad f)(x)(v)`` — reverse over reverse (``∇²f`` is symmetric).

    Args:
      f: ``f(x) -> scalar``.
      x: the point, any pytree of real floating arrays.
      v: the direction, a pytree like ``x``.
      mode: one of :data:`HVP_MODES`.

    Returns:
      ``∇²f(x) v``, a pytree like ``x``.

    >>> import jax.numpy as jnp
    >>> f = lambda x: jnp.sum(x**3) / 3
    >>> x, v = jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])
    >>> [hvp(f, x, v, mode=m).tolist() for m in HVP_MODES]
    [[2.0, 4.0], [2.0, 4.0], [2.0, 4.0]]

    Reference: Pearlmutter, Fast exact multiplication by the Hessian, *Neural Computation* 6 (1994); the
      JAX autodiff cookbook (forward-over-reverse and the other compositions).
    """
    mode = check_choice("mode", mode, HVP_MODES)
    _check_loss(f, x)
    _check_direction(v, x)
    return _HVP[mode](f, x, v)


def hvp_operator(f: Callable[[Any], Any], x: Any, /) -> Callable[[Any], Any]:
    """The linear map ``v ↦ ∇²f(x) v``, linearized once and applied many times.

    ``jax.linearize(jax.grad(f), x)`` evaluates the gradient and stores the linearization's residuals
    once; each application is then one JVP of the stored linear map — cheaper per product than
    :func:`hvp` (0.61–0.71 gradients per product over 100 products on a 100k-parameter MLP, where one
    :func:`hvp` costs 1.01–1.29; ``benchmarks/hvp_cost.py``). Pass it as the ``matvec`` of :func:`trace`,
    :func:`diagonal`, :func:`eigenvalues`, :func:`spectral_density`.

    Args:
      f: ``f(x) -> scalar``.
      x: the point, any pytree of real floating arrays.

    Returns:
      ``matvec(v) -> ∇²f(x) v``, pytrees like ``x`` in and out.

    >>> import jax.numpy as jnp
    >>> H = hvp_operator(lambda p: p["a"] ** 2 * p["b"], {"a": jnp.array(1.0), "b": jnp.array(2.0)})
    >>> {k: float(t) for k, t in H({"a": jnp.array(1.0), "b": jnp.array(0.0)}).items()}
    {'a': 4.0, 'b': 2.0}

    Reference: Pearlmutter, *Neural Computation* 6 (1994); the JAX documentation of ``jax.linearize``
      (linearize once, apply many times).
    """
    _check_loss(f, x)
    linear = jax.linearize(jax.grad(f), x)[1]

    def matvec(v: Any) -> Any:
        _check_direction(v, x)  # shapes and dtypes only: free under jit, vmap and lax.map
        return linear(v)

    return matvec


def hessian(f: Callable[[Any], Any], x: Any, /, *, batch_size: int | None = None) -> jax.Array:
    """The dense Hessian ``∇²f(x)`` as an ``n × n`` matrix over the *ravelled* parameters.

    Row/column ``i`` is entry ``i`` of ``jax.flatten_util.ravel_pytree(x)[0]``. Built column by column
    from :func:`hvp_operator` applied to the unit vectors (``n`` products, ``n²`` memory): for small
    problems and as a test oracle. ``batch_size`` chunks the columns (``lax.map``).

    >>> import jax.numpy as jnp
    >>> hessian(lambda p: p["a"] ** 2 * p["b"], {"a": jnp.array(1.0), "b": jnp.array(2.0)}).tolist()
    [[4.0, 2.0], [2.0, 0.0]]

    Reference: the JAX autodiff cookbook (``jacfwd(jacrev(f))``; here as batched HVPs against the
      identity).
    """
    batch_size = _check_batch_size(batch_size)
    flat, unravel = ravel_pytree(x)
    op = hvp_operator(lambda z: f(unravel(z)), flat)
    cols = _apply(op, jnp.eye(flat.size, dtype=flat.dtype), batch_size=batch_size, mesh=None)
    return cols.T


# --------------------------------------------------------------------------------------------------
# Operators on ravelled vectors, probe blocks, sharding
# --------------------------------------------------------------------------------------------------


def _concrete_like(like: Any) -> Any:
    """``like`` fixes shapes and dtypes only: ``jax.ShapeDtypeStruct`` leaves stand for zero arrays."""
    return jax.tree.map(
        lambda t: jnp.zeros(t.shape, t.dtype) if isinstance(t, jax.ShapeDtypeStruct) else t, like
    )


def _flat_operator(matvec: Callable, like: Any) -> tuple[Callable, int, Any]:
    """``(mv, n, dtype)``: ``matvec`` on ravelled vectors; raise if it is not square."""
    if not callable(matvec):
        raise OptionError(f"matvec: expected a callable v -> A v, got {type(matvec).__name__}.")
    like = _concrete_like(like)
    flat, unravel = ravel_pytree(like)
    if flat.size == 0:
        raise ShapeError(
            f"like: expected a pytree with at least one entry, got {flat.size} entries (structure "
            f"{jax.tree.structure(like)}). Pass the parameters the operator acts on."
        )
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise OptionError(
            f"like: expected floating-point arrays, got dtype {flat.dtype}. "
            "Pass the parameters (or jnp.zeros of their shape) in a float dtype."
        )
    try:
        out = jax.eval_shape(lambda v: matvec(unravel(v)), flat)
    except (TypeError, ValueError) as e:  # shapes or structure the operator does not accept
        raise ShapeError(
            f"like: the operator cannot be applied to a pytree like `like` ({flat.size} entries, "
            f"structure {jax.tree.structure(like)}): {type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0].rstrip('.')}. Pass like= with the operator's input structure and shapes (e.g. the parameters x)."
        ) from None
    in_def, out_def = jax.tree.structure(like), jax.tree.structure(out)
    out_size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(out))
    in_shapes = [jnp.shape(t) for t in jax.tree.leaves(like)]
    out_shapes = [leaf.shape for leaf in jax.tree.leaves(out)]
    if in_def != out_def or in_shapes != out_shapes:
        raise ShapeError(
            f"matvec: expected a square operator mapping pytrees like `like` ({flat.size} entries, "
            f"structure {in_def}) to the same structure; got {out_size} entries with structure "
            f"{out_def} and leaf shapes {out_shapes}. Pass like= with the operator's input structure, "
            "or wrap the operator so it returns a pytree like its input."
        )
    # Half-precision operators (bfloat16/float16 parameters) are estimated in float32: the probes
    # are rounded to the parameters' dtype on the way in, the products promoted on the way out, and
    # the linear algebra (QR, eigh: LAPACK has no half-precision kernels) runs in float32. The
    # symmetry test allows the rounding of the least precise leaf, in or out (a bfloat16 bias next
    # to float32 weights makes ΩᵀAΩ asymmetric by ~1e-3 through rounding alone).
    leaf_dtypes = [jnp.result_type(t) for t in (*jax.tree.leaves(like), *jax.tree.leaves(out))]
    eps_op = max(float(jnp.finfo(d).eps) for d in leaf_dtypes if jnp.issubdtype(d, jnp.floating))
    in_dtype = flat.dtype
    dtype = jnp.promote_types(in_dtype, jnp.float32)

    def mv(v):
        return ravel_pytree(matvec(unravel(v.astype(in_dtype))))[0].astype(dtype)

    mv.sym_rtol = max(_SYM_RTOL, 10.0 * eps_op)

    # the rounding of each entry's products: its leaf's eps, in or out (the coarser); the error-bar
    # floors use these per entry (exact paths) or their mean (a trace is a sum over the entries)
    def leaf_eps(a: Any, b: Any) -> np.ndarray:
        e = max(
            float(jnp.finfo(jnp.result_type(t)).eps)
            for t in (a, b)
            if jnp.issubdtype(jnp.result_type(t), jnp.floating)
        )
        return np.full(math.prod(jnp.shape(a)), e)

    parts = jax.tree.leaves(jax.tree.map(leaf_eps, like, out))
    mv.eps_entries = np.concatenate(parts) if parts else np.zeros(0)
    mv.eps_op = float(np.mean(mv.eps_entries))
    return mv, int(flat.size), dtype


def _apply(mv: Callable, V: jax.Array, *, batch_size: int | None, mesh: Any) -> jax.Array:
    """Rows of ``V`` (shape ``(k, n)``) through ``mv``: one vmap, ``lax.map`` chunks, or shard_map."""
    if mesh is not None:
        return _apply_sharded(mv, V, batch_size=batch_size, mesh=mesh)
    k = V.shape[0]
    if batch_size is None or batch_size >= k:
        return jax.vmap(mv)(V)
    return jax.lax.map(mv, V, batch_size=batch_size)


def _apply_sharded(mv: Callable, V: jax.Array, *, batch_size: int | None, mesh: Any) -> jax.Array:
    from jax.sharding import NamedSharding, PartitionSpec

    (axis,) = mesh.axis_names
    k, size = V.shape[0], mesh.size
    pad = (-k) % size
    Vp = jax.device_put(jnp.pad(V, ((0, pad), (0, 0))), NamedSharding(mesh, PartitionSpec(axis)))
    local = jax.shard_map(
        lambda Vl: _apply(mv, Vl, batch_size=batch_size, mesh=None),
        mesh=mesh,
        in_specs=PartitionSpec(axis),
        out_specs=PartitionSpec(axis),
        check_vma=False,
    )
    out = jax.device_put(local(Vp), NamedSharding(mesh, PartitionSpec()))
    return jax.lax.slice_in_dim(out, 0, k)


def _check_mesh(mesh: Any) -> Any:
    """The mesh, validated, with its axis made ``Auto``: ``jax.make_mesh`` makes ``Explicit`` axes
    by default, and an eager estimator that mixes the mesh-replicated products with single-device
    buffers then fails ("Length of device assignment 1 is not equal to the size of the mesh")."""
    if mesh is None:
        return None
    names = getattr(mesh, "axis_names", None)
    if names is None or len(names) != 1:
        raise OptionError(
            f"mesh: expected a jax.sharding.Mesh with exactly one axis, got {mesh!r}. "
            'Build one with jax.make_mesh((jax.device_count(),), ("probes",)).'
        )
    from jax.sharding import AxisType, Mesh

    if tuple(getattr(mesh, "axis_types", ())) == (AxisType.Auto,):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,))


def _check_batch_size(batch_size: Any) -> int | None:
    return None if batch_size is None else check_positive_int("batch_size", batch_size)


def _probe_sampler(name: str, flat_like: jax.Array, num: int) -> samplers.Sampler:
    return samplers.make(name, flat_like, num=num)


def _probes(sampler: samplers.Sampler, key: Any, start: Any, num: int) -> jax.Array:
    """Probes ``start, …, start+num−1`` (rows), scaled so ``E[z zᵀ] = I``."""
    return _probe_rows(sampler.name, sampler.dim, jnp.dtype(sampler.dtype), key, start, num)


# The array-only pieces of the estimators are jitted with their options static (as jax.numpy's
# functions are): an eager ``trace`` call then compiles a handful of programs, cached by shape across
# calls, instead of hundreds of single operations (12 s → 2 s for a first eager XNysTrace call);
# under an outer ``jit`` they are inlined.
def _jit(fn: Callable) -> Callable:
    """``jax.jit`` with the arguments named ``name``, ``n``, ``dim``, ``dtype``, ``num``, ``psd`` static."""
    static = ("name", "n", "dim", "dtype", "num", "psd")
    params = inspect.signature(fn).parameters
    return functools.wraps(fn)(jax.jit(fn, static_argnames=[a for a in static if a in params]))


@_jit
def _probe_rows(name: str, dim: int, dtype: Any, key: Any, start: Any, num: int) -> jax.Array:
    sampler = _probe_sampler(name, jnp.zeros(dim, dtype), 1)
    idx = start + jnp.arange(num)
    scale = 1.0 / math.sqrt(sampler.second_moment)
    return scale * jax.vmap(sampler.direction, in_axes=(None, 0))(key, idx)


def _t_ratio(dof: Any) -> jax.Array:
    """``t_{0.975,ν} / 1.96`` (Cornish–Fisher expansion; exact for ν = 1, 2); 1 for ν → ∞."""
    z = 1.959963984540054
    nu = jnp.asarray(dof)  # keeps a float32 estimate's dtype; integers become the default float
    nu = jnp.maximum(nu if jnp.issubdtype(nu.dtype, jnp.floating) else nu.astype(float), 1.0)
    t = (
        z
        + (z**3 + z) / (4 * nu)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * nu**4)
    )
    t = jnp.where(nu < 1.5, 12.706204736174698, jnp.where(nu < 2.5, 4.302652729749464, t))
    return t / z


def _quantile_ratio(k: Any, m2: Any, m3: Any, m4: Any, *, dof: Any = None) -> jax.Array:
    """``q/1.96``: the two-sided 95% critical value ``q`` of a studentized mean of ``k`` terms.

    To second order (Hall 1992, §2.6; the ``k^{−1/2}`` skewness terms cancel for a symmetric
    interval): ``q = t_{0.975,ν} + (z/k)·(γ²(z⁴ + 2z² − 3)/18 − κ(z² − 3)/12)``, ``z = 1.96``,
    ``ν = dof`` (default ``k − 1``), with the
    sample skewness ``γ = m3/m2^{3/2}`` and excess kurtosis ``κ = m4/m2² − 3`` of the terms (central
    moments ``m2, m3, m4``, divisor ``k``). Right-skewed terms (quadratic forms dominated by a few
    eigenvalues) make the plain ``t`` interval under-cover.
    """
    z = 1.959963984540054
    m2, m3, m4 = jnp.asarray(m2), jnp.asarray(m3), jnp.asarray(m4)
    k = jnp.asarray(k, dtype=m2.dtype)
    pos = m2 > 0
    m2s = jnp.where(pos, m2, 1.0)
    gamma2 = jnp.where(pos, m3 * m3 / m2s**3, 0.0)
    kappa = jnp.where(pos, m4 / m2s**2 - 3.0, 0.0)
    corr = (z / k) * (gamma2 * (z**4 + 2 * z**2 - 3) / 18 - kappa * (z**2 - 3) / 12)
    return _t_ratio(k - 1 if dof is None else dof) + corr / z


def _moments(terms: jax.Array) -> tuple:
    c = terms - jnp.mean(terms)
    c2 = c * c
    return jnp.mean(c2), jnp.mean(c2 * c), jnp.mean(c2 * c2)


def _exact(mv: Callable, n: int, dtype: Any, *, batch_size: int | None, mesh: Any) -> Estimate:
    """The trace from the ``n`` unit vectors; its error is rounding alone, so its standard error is the
    rounding floor of :func:`_floored` (``2·eps·|value|``), not 0."""
    cols = _apply(mv, jnp.eye(n, dtype=dtype), batch_size=batch_size, mesh=mesh)
    diag = jnp.diagonal(cols)
    est = Estimate(jnp.sum(diag), jnp.zeros((), dtype), jnp.asarray(n))
    # 2·eps·|value|, eps the entries' own (their leaves'), weighted by |a_ii|: one eps for one dtype
    e = mv.eps_entries
    if np.all(e == e[0]):
        eps_w = jnp.asarray(e[0], dtype)
    else:
        w = jnp.abs(diag)
        eps_w = jnp.sum(jnp.asarray(e, dtype) * w) / jnp.maximum(jnp.sum(w), jnp.finfo(dtype).tiny)
    floor = _ROUNDING_FLOOR * jnp.maximum(eps_w, jnp.finfo(dtype).eps) * jnp.abs(est.value)
    return est._replace(std_error=floor)


# --------------------------------------------------------------------------------------------------
# Trace estimators on ravelled operators
# --------------------------------------------------------------------------------------------------


@_jit
def _quad_stats(Z: jax.Array, RZ: jax.Array) -> tuple:
    """Per-probe quadratic forms ``t_i = z_iᵀRz_i``, squared norms ``c_i = ‖Rz_i‖²``, the summed
    diagonal products ``Σ_i z_i ⊙ Rz_i`` and ``e_i = ‖Rz_i − (t_i/‖z_i‖²) z_i‖² = c_i − t_i²/‖z_i‖²``
    (the part of ``Rz_i`` orthogonal to ``z_i``, without cancellation; rows of ``Z``, ``RZ``: the
    probes and their products)."""
    t = jnp.sum(Z * RZ, axis=1)
    zz = jnp.sum(Z * Z, axis=1)
    orth = RZ - (t / jnp.where(zz > 0, zz, 1.0))[:, None] * Z
    return t, jnp.sum(RZ * RZ, axis=1), jnp.sum(Z * RZ, axis=0), jnp.sum(orth * orth, axis=1)


def _structural_se(
    name: str,
    k: Any,
    fro: Any,
    c_var: Any,
    zd_mean: jax.Array,
    e_mean: Any = None,
    t_m2: Any = None,
    d_var: Any = None,
) -> jax.Array:
    """Standard error of the mean of ``k`` iid quadratic forms ``zᵀRz`` from the structure of their variance.

    For Rademacher probes ``Var(zᵀRz) = 2(‖R‖_F² − Σ_j r_jj²)``, for Gaussian ``2‖R‖_F²``, for
    ``√n``-sphere probes ``2n/(n + 2)·(‖R‖_F² − (tr R)²/n)`` (``R`` symmetric; for a non-symmetric
    ``R`` these bound the variance, which involves ``(R + Rᵀ)/2``). ``‖R‖_F² = E‖Rz‖²`` is estimated
    by ``fro`` = mean ``c_i`` and ``Σ r_jj²`` from the Hutchinson diagonal ``d̂ = mean z_i ⊙ Rz_i``
    (``zd_mean``), bias-corrected with ``E Σ d̂_j² = Σ r_jj² + (‖R‖_F² − Σ r_jj²)/k`` (exact for a
    diagonal ``R``: then ``d̂ = diag R`` and the error is 0). Sphere: ``‖R‖_F² − (tr R)²/n`` is
    estimated as ``e_mean + t_m2/n`` (``e_mean`` the mean of :func:`_quad_stats`'s ``e_i = c_i −
    t_i²/n``, ``t_m2`` the terms' variance with divisor ``k``: equal to ``fro − t̄²/n`` but free of
    its cancellation, so an exact case such as ``R = cI`` gets a 0 error bar), and the Satterthwaite
    degrees of freedom use ``d_var``, the sample variance of ``c_i − (2t̄/n)·t_i`` (the delta
    method). ``n = len(zd_mean)``.

    Why not the sample standard deviation of the terms: where a few eigenvalues dominate ``R`` the
    terms are ``χ²₁``-like and their sample variance (a fourth moment) is small exactly when the mean
    is too low, so with 10 terms a ``t`` interval covers 0.90 instead of 0.95 (Hutch++'s residual
    after a sketch that missed a direction, Hutchinson on ``1/k²``). ``‖Rz_i‖²`` is a second moment,
    far steadier. Its own uncertainty sets the critical value: Student's ``t`` with the
    Satterthwaite degrees of freedom of ``fro``, ``ν = 2k·fro²/s_c²`` (``s_c²``, ``c_var``: the sample
    variance of the ``c_i``): ``ν ≈ k`` where one direction dominates (``c_i`` are ``χ²₁``-like),
    ``ν ≫ k`` on flat spectra (``c_i`` nearly constant), so the interval widens only where the
    variance estimate is itself unsure. ``±1.96·std_error`` then covers 0.93–0.96 of 1000 seeds for
    Hutchinson and Hutch++ at ``m = 10`` and ``30`` on eight spectra (n = 200; the sample-variance
    interval: 0.90–0.93 on the fast-decaying ones).
    """
    k_f = jnp.asarray(k, dtype=fro.dtype)
    # (base, base_var): the estimated quantity the variance is proportional to, and the sample
    # variance of its per-probe terms, for the Satterthwaite degrees of freedom
    if name == "sphere":
        n = zd_mean.shape[0]
        spread = e_mean + t_m2 / n
        var = 2.0 * n / (n + 2.0) * spread
        base, base_var = spread, d_var
    elif name == "gaussian":
        var = 2.0 * fro
        base, base_var = fro, c_var
    else:
        s = jnp.sum(zd_mean * zd_mean)
        diag_sq = jnp.maximum((s - fro / k_f) / jnp.maximum(1.0 - 1.0 / k_f, 0.5), 0.0)
        var = 2.0 * jnp.maximum(fro - diag_sq, 0.0)
        base, base_var = fro, c_var
    tiny = jnp.finfo(fro.dtype).tiny
    dof = 2.0 * k_f * base * base / jnp.maximum(base_var, tiny)
    return jnp.sqrt(var / k_f) * _t_ratio(jnp.clip(dof, 1.0, 1e6))


@_jit
def _quad_estimate(name: str, t: jax.Array, c: jax.Array, zd: jax.Array, e: jax.Array) -> tuple:
    """Mean and standard error (:func:`_structural_se`) of iid quadratic forms, from
    :func:`_quad_stats` ``(t, c, zd, e)``."""
    k, n = t.shape[0], zd.shape[0]
    t_mean = jnp.mean(t)
    d_var = jnp.var(c - (2.0 * t_mean / n) * t, ddof=1)
    c_var = jnp.var(c, ddof=1)
    se = _structural_se(name, k, jnp.mean(c), c_var, zd / k, jnp.mean(e), jnp.var(t), d_var)
    return t_mean, se


def _hutchinson(mv, key, sampler, m, *, batch_size, mesh, rtol):
    if rtol is None:
        Z = _probes(sampler, key, 0, m)
        AZ = _apply(mv, Z, batch_size=batch_size, mesh=mesh)
        value, se = _quad_estimate(sampler.name, *_quad_stats(Z, AZ))
        return Estimate(value, se, jnp.asarray(m))
    return _sequential(
        lambda start, num: _quad_terms(mv, key, sampler, start, num, batch_size, mesh),
        jnp.zeros((), sampler.dtype),
        m,
        batch_size=batch_size,
        rtol=rtol,
        offset=0,
        name=sampler.name,
    )


def _quad_terms(mv, key, sampler, start, num, batch_size, mesh):
    Z = _probes(sampler, key, start, num)
    return _quad_stats(Z, _apply(mv, Z, batch_size=batch_size, mesh=mesh))


def _sequential(terms_fn, base, budget, *, batch_size, rtol, offset, name, block=None):
    """Blocks of iid terms until ``std_error < rtol·|value|`` or the budget (of terms) runs out.

    ``terms_fn(start, num)`` returns :func:`_quad_stats` of a block. ``value = base + mean(terms)``;
    ``offset`` matvecs were spent before the loop. The standard error is that of
    :func:`_quad_estimate` for the sampler ``name``, from running sums of ``u_i = t_i − c₀`` and
    ``u_i²`` (``c₀`` the first block's mean: stable when the terms vary little around a large mean),
    ``c_i``, ``c_i²``, ``c_i u_i``, ``e_i`` and ``z_i ⊙ Rz_i``.

    Blocks hold ``max(10, batch_size)`` terms (capped by the budget): the stop is tested on at least
    10 new terms whatever the memory setting (``batch_size`` only chunks the products), and the
    ``budget mod block`` terms left over form one last, smaller block, so a run that never stops spends
    the whole budget on the same probes as a one-shot estimate. ``block`` overrides the block size
    (``auto`` continues in blocks of its first block's size).
    """
    block = min(budget, block or max(_DEFAULT_BLOCK, batch_size or 0))
    num_blocks, rest = divmod(budget, block)  # whole blocks share one compiled shape
    dtype = base.dtype

    def stats(state):
        _, k, c, s1, s2, sc, sc2, szd, scu, se_ = state
        k = jnp.maximum(k, 1).astype(dtype)
        d = s1 / k
        n = szd.shape[0]
        c_var = jnp.maximum(sc2 - sc * sc / k, 0.0) / jnp.maximum(k - 1, 1.0)
        # the sample variance of c_i − a·t_i (sphere's dof), from the sums of c, c², c·u, u, u² with
        # u = t − c₀: Σ(c − a t) = sc − a(s1 + k c₀), Σ(c − a t)² = sc2 − 2aΣct + a²Σt²
        a = 2.0 * (c + d) / n
        st, stt = s1 + k * c, s2 + 2 * c * s1 + k * c * c
        sct = scu + c * sc
        sd, sdd = sc - a * st, sc2 - 2 * a * sct + a * a * stt
        d_var = jnp.maximum(sdd - sd * sd / k, 0.0) / jnp.maximum(k - 1, 1.0)
        t_m2 = jnp.maximum(s2 / k - d * d, 0.0)
        return c + d, _structural_se(name, k, sc / k, c_var, szd / k, se_ / k, t_m2, d_var)

    def add(state, num):
        """The next ``num`` terms (probes ``k … k + num − 1``) into the running sums."""
        b, k, c, s1, s2, sc, sc2, szd, scu, se_ = state
        t, cc, zd, e = terms_fn(k, num)
        c = jnp.where(b == 0, jnp.mean(t), c)
        u = t - c
        return (
            b + 1,
            k + num,
            c,
            s1 + jnp.sum(u),
            s2 + jnp.sum(u * u),
            sc + jnp.sum(cc),
            sc2 + jnp.sum(cc * cc),
            szd + zd,
            scu + jnp.sum(cc * u),
            se_ + jnp.sum(e),
        )

    def done(state):
        mean, se = stats(state)
        return (state[0] >= 1) & (se < rtol * jnp.abs(base + mean))

    def cond(state):
        return (state[0] < num_blocks) & ~done(state)

    zero = jnp.zeros((), dtype)
    zd_shape = jax.eval_shape(lambda: terms_fn(0, block)[2])
    count = jnp.asarray(0)  # the default integer dtype, as every num_matvecs
    init = (count, count, *[zero] * 5, jnp.zeros(zd_shape.shape, dtype), zero, zero)
    final = jax.lax.while_loop(cond, lambda st: add(st, block), init)
    if rest:
        final = _cond(done(final), lambda st: st, lambda st: add(st, rest), final)
    mean, se = stats(final)
    return Estimate(base + mean, se, offset + final[1])


def _orth(Y):
    return jnp.linalg.qr(Y, mode="reduced")


def _hutchpp(mv, key, sampler, m, *, batch_size, mesh, rtol, n):
    k = max(1, m // 3)
    k = min(k, n)
    g = m - 2 * k
    k_sketch, k_res = jax.random.split(key)
    S = _probes(sampler, k_sketch, 0, k)
    Q = _orth(_apply(mv, S, batch_size=batch_size, mesh=mesh).T)[0].T  # rows: (k, n)
    AQ = _apply(mv, Q, batch_size=batch_size, mesh=mesh)  # (k, n)
    low_rank = jnp.sum(Q * AQ)

    def residual_terms(start, num):
        # gᵀRg with R = PAP, P = I − QQᵀ: R g = P(Ag − AQ Qᵀg), no extra matvec
        G = _probes(sampler, k_res, start, num)  # (num, n)
        AG = _apply(mv, G, batch_size=batch_size, mesh=mesh)
        C = G @ Q.T
        APG = AG - C @ AQ
        return _quad_stats(G, APG - (APG @ Q.T) @ Q)

    if rtol is None:
        mean, se = _quad_estimate(sampler.name, *residual_terms(0, g))
        return Estimate(low_rank + mean, se, jnp.asarray(m))
    return _sequential(
        residual_terms,
        low_rank,
        g,
        batch_size=batch_size,
        rtol=rtol,
        offset=2 * k,
        name=sampler.name,
    )


def _loo_se(terms, pair_terms):
    """Standard error of the mean of ``k`` exchangeable leave-one-out terms (XTrace, XNysTrace).

    ``terms[i] = t_i`` uses probe ``i`` as the Hutchinson probe of the residual left by a sketch of the
    other ``k − 1`` probes; ``pair_terms[i, j] = t_i^{(−j)}`` is the same term with probe ``j`` also
    removed from the sketch (the diagonal is ignored). Each term is unbiased *given the probes of its
    sketch*, ``E[t_i | ω_{−i}] = tr A`` (resphering makes the left-out probe isotropic on the
    complement of the sketch). For the mean ``T = (1/k) Σ t_i`` of exchangeable terms,
    ``Var T = Var(t)/k + (1 − 1/k)·C`` and ``E[s²] = Var(t) − C`` (``s²``: the sample variance of the
    terms, ``C = Cov(t_i, t_j)``), so ``Var T = E[s²]/k + C``: the naive ``s²/k`` (matfree's standard
    error) misses exactly ``C``, which is positive because the terms share their sketches. With
    ``Δ_ij = t_i − t_i^{(−j)}``, ``C = E[Δ_ij Δ_ji]`` exactly: ``t_i^{(−j)}`` and ``t_j^{(−i)}`` are
    independent and unbiased given ``ω_{−ij}``, and ``E[Δ_ji | ω_{−j}] = 0``. Hence

    ``V̂ = s²/k + max(Ĉ, 0)``, ``Ĉ = (1/(k(k−1))) Σ_{i≠j} Δ_ij Δ_ji``,

    unbiased but for the positive part (clipping the noisy ``Ĉ`` at 0, where ``C ≥ 0``, only lowers
    its mean-square error). ``std_error = √V̂ · q/1.96`` with the second-order critical value ``q`` of
    :func:`_quantile_ratio` (Student's ``t`` at the Satterthwaite degrees of freedom of ``V̂``, at
    least ``k − 1``, plus the terms' skewness and kurtosis correction). The
    jackknife variance, in contrast, is biased upwards by the statistic's interactions (Efron & Stein
    1981): 1.2–20× the true variance on the benchmark spectra at ``m = 30``.

    Limitation: with a PSD ``A`` of rank within a few of ``k`` (XNysTrace), all terms share one large
    error that ``Ĉ`` sees only in some draws; coverage falls (0.87 at ``k = rank A``, n = 200).
    """
    k = terms.shape[0]
    off = ~jnp.eye(k, dtype=bool)
    delta = terms[:, None] - pair_terms
    prod = delta * delta.T  # symmetric: one product per unordered pair
    cov = jnp.sum(jnp.where(off, prod, 0.0)) / (k * (k - 1))
    m2, m3, m4 = _moments(terms)
    spread = m2 / (k - 1)  # s²/k
    var = spread + jnp.maximum(cov, 0.0)
    # Satterthwaite degrees of freedom of V̂ = s²/k + Ĉ: s² has k − 1; Ĉ, a mean of k(k−1)/2 pair
    # products, is far steadier when they agree (a sketch that misses the same directions for
    # every probe), which a t_{k−1} critical value ignores (XTrace, 5 probes, rank 10 + noise:
    # coverage 0.98). Var(Ĉ) ≈ their sample variance / their number.
    iu = jnp.triu_indices(k, 1)
    if len(iu[0]) >= 2:
        var_c = jnp.var(prod[iu], ddof=1) / len(iu[0])
        var_c = jnp.where(cov > 0, var_c, 0.0)
        tiny = jnp.finfo(var.dtype).tiny
        dof = var * var / jnp.maximum(spread * spread / (k - 1) + var_c, tiny)
        dof = jnp.clip(dof, k - 1, 1e6)
    else:
        dof = None
    return jnp.sqrt(var) * _quantile_ratio(k, m2, m3, m4, dof=dof)


def _loo_factor(R):
    """Columns ``s_i`` with ``Q_{−i} Q_{−i}ᵀ = Q (I − s_i s_iᵀ) Qᵀ`` (unit columns of ``R^{−T}``)."""
    eye = jnp.eye(R.shape[0], dtype=R.dtype)
    Rinv_T = jax.scipy.linalg.solve_triangular(R, eye, trans="T", lower=False)
    return Rinv_T / jnp.linalg.norm(Rinv_T, axis=0, keepdims=True)


def _sym_rtol(mv: Callable) -> float:
    """The relative asymmetry of ``ΩᵀAΩ`` above which ``mv`` is "not symmetric" (set by
    :func:`_flat_operator` from its dtypes; ``_SYM_RTOL`` for other callables)."""
    return getattr(mv, "sym_rtol", _SYM_RTOL)


def _asymmetry(G):
    """``‖G − Gᵀ‖_F / ‖G‖_F`` for ``G = ΩᵀAΩ``."""
    return jnp.linalg.norm(G - G.T) / jnp.maximum(jnp.linalg.norm(G), jnp.finfo(G.dtype).tiny)


def _positive(x):
    return jnp.where(x > 0, x, 1.0)


def _xtrace_terms(H, W, R, omega_sq, n):
    """Leave-one-out and leave-two-out XTrace terms, in the coordinates of the sketch basis ``Q``.

    ``Y = AΩ = QR`` (``Ω``: n × k), ``H = QᵀAQ``, ``W = QᵀΩ``, ``omega_sq = ‖ω_i‖²``; ``A`` symmetric.
    For a set ``E`` of probes left out, ``span Y_{−E} = Q·span{s_e : e ∈ E}^⊥`` with ``s_e`` the columns
    of ``R^{−T}`` (``s_eᵀR_i = 0`` for ``i ≠ e``; :func:`_loo_factor` normalizes them), so the projector is
    ``Π_{−E} = Q(I − P_E)Qᵀ`` with ``P_E = S_E(S_EᵀS_E)^{−1}S_Eᵀ``, rank ``|E| ≤ 2``. Probe ``i ∈ E``
    gives ``tr(Π_{−E}A) + (n − k + |E|)·((I−Π_{−E})ω_i)ᵀA(I−Π_{−E})ω_i / ‖(I−Π_{−E})ω_i‖²`` (the residual
    quadratic form, resphered to the complement's dimension), with ``tr(Π_{−E}A) = tr H − tr(P_E H)``
    and, for ``x = (I − P_E)W_i``, ``(ω_i − Qx)ᵀA(ω_i − Qx) = W_iᵀR_i − 2xᵀR_i + xᵀHx``. Everything is
    a ``2 × 2`` solve on entries of ``K = SᵀS``, ``SᵀHS``, ``SᵀW``, ``SᵀHW``: ``O(k³)`` for all pairs.

    Returns ``(t, t2)``: ``t[i]`` (``E = {i}``, the XTrace terms) and ``t2[i, j]`` (``E = {i, j}``,
    probe ``i`` with ``j`` also out of the sketch; diagonal meaningless).
    """
    k = W.shape[1]
    S = _loo_factor(R)
    HW = H @ W
    K, M, N, L = S.T @ S, S.T @ (H @ S), S.T @ W, S.T @ HW
    r = jnp.sum(S * R, axis=0)  # s_iᵀR_i
    d = jnp.sum(W * R, axis=0)  # ω_iᵀAω_i
    b = jnp.sum(W * HW, axis=0)  # W_iᵀHW_i
    w = jnp.sum(W * W, axis=0)  # ‖Π ω_i‖²
    tr_h = jnp.trace(H)
    md, nd, ld = jnp.diagonal(M), jnp.diagonal(N), jnp.diagonal(L)
    # E = {i}: P_E = s_i s_iᵀ, x = W_i − c s_i with c = s_iᵀW_i
    quad = -d + 2 * nd * r + b - 2 * nd * ld + nd * nd * md
    t = tr_h - md + (n - k + 1) / _positive(omega_sq - w + nd * nd) * quad
    # E = {i, j}: x = W_i − c1 s_i − c2 s_j, (c1, c2) = (S_EᵀS_E)⁻¹ S_EᵀW_i
    det = jnp.where(jnp.eye(k, dtype=bool), 1.0, 1.0 - K * K)
    nji = N.T  # [i, j] = s_jᵀW_i
    c1 = (nd[:, None] - K * nji) / det
    c2 = (nji - K * nd[:, None]) / det
    tr2 = tr_h - (md[:, None] - 2 * K * M + md[None, :]) / det
    quad2 = (
        -d[:, None]
        + 2 * c1 * r[:, None]
        + b[:, None]
        - 2 * (c1 * ld[:, None] + c2 * L.T)
        + c1 * c1 * md[:, None]
        + 2 * c1 * c2 * M
        + c2 * c2 * md[None, :]
    )
    outside2 = omega_sq[:, None] - w[:, None] + c1 * nd[:, None] + c2 * nji
    t2 = tr2 + (n - k + 2) / _positive(outside2) * quad2
    return t, t2


def _xtrace(mv, key, sampler, m, *, batch_size, mesh, n):
    k = m // 2
    Omega = _probes(sampler, key, 0, k)  # probes, Y = AΩ, Q and AQ are held as rows: (k, n)
    Y = _apply(mv, Omega, batch_size=batch_size, mesh=mesh)
    Q, R = _orth(Y.T)
    Z = _apply(mv, Q.T, batch_size=batch_size, mesh=mesh)
    est, W = _xtrace_finish(Omega, Q.T, R, Z, n)
    return est, _asymmetry(W.T @ R), None  # ΩᵀY = ΩᵀQR = WᵀR


@_jit
def _xtrace_finish(Omega, Q, R, Z, n):
    """The XTrace estimate from ``Y = AΩ = QR`` and ``Z = AQ``; exact (``tr QᵀAQ``) if ``Y`` is rank-deficient.

    ``Omega``, ``Q``, ``Z``: rows ``(k, n)`` (the transposes of ``Ω``, ``Q``, ``AQ``); ``R``: ``(k, k)``.
    """
    k = Omega.shape[0]
    H, W, omega_sq = Q @ Z.T, Q @ Omega.T, jnp.sum(Omega * Omega, axis=1)
    t, t2 = _xtrace_terms(H, W, R, omega_sq, n)
    r_abs = jnp.abs(jnp.diagonal(R))
    # range(A) ⊆ span Q when Y = AΩ is rank-deficient (rank A < k): then tr(QᵀAQ) = tr A exactly
    deficient = jnp.min(r_abs) <= k * jnp.finfo(R.dtype).eps * jnp.max(r_abs)
    value = jnp.where(deficient, jnp.trace(H), jnp.mean(t))
    se = jnp.where(deficient, 0.0, _loo_se(t, t2))
    return Estimate(value, se, jnp.asarray(2 * k)), W


def _switch(index: Any, branches: list[Callable], *operands: Any) -> Any:
    """``lax.switch(index, branches, *operands)``, or, for a concrete ``index`` (an eager call),
    only the chosen branch: eagerly ``lax.switch`` traces and compiles every branch on each call
    (their closures are new arrays), which made an eager ``trace(..., method="auto")`` take seconds
    per call; under ``jit`` it is ``lax.switch``."""
    try:
        i = int(index)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return jax.lax.switch(index, branches, *operands)
    return branches[i](*operands)


def _cond(pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
    """``lax.cond`` that runs only the taken branch for a concrete ``pred`` (see :func:`_switch`)."""
    return _switch(jnp.asarray(pred, jnp.int32), [false_fn, true_fn], *operands)


def _doubling(total: int, first: int) -> list[int]:
    """Static sketch sizes of the X-methods' stopping rule: ``first, 2·first, 4·first, …, total``."""
    sizes = [min(total, first)]
    while sizes[-1] < total:
        sizes.append(min(total, 2 * sizes[-1]))
    return sizes


def _grow(sizes, init, extend, done):
    """Run ``extend(carry, start, stop)`` for the sizes after the first until ``done(carry)``.

    The sizes are static (one traced branch per level, each skipped with :func:`_cond` once done), so
    the loop is jit-compatible with fixed shapes and compiles ``len(sizes)`` finishing computations.
    """
    carry = init
    prev = None
    for start, stop in itertools.pairwise(sizes):
        carry = _cond(
            done(carry, prev), lambda c: c, lambda c, a=start, b=stop: extend(c, a, b), carry
        )
        prev = carry[1]
    return carry


def _settled(est, prev, rtol):
    """The X-methods' stop test: ``std_error < rtol·|value|``, and the previous (half-size) sketch's
    estimate within 1.96 of its standard errors of this one. The second condition guards against
    stopping where a small sketch's standard error happens to be small (optional stopping); there is
    no stop at the first size."""
    small = est.std_error < rtol * jnp.abs(est.value)
    if prev is None:
        return jnp.zeros((), bool)
    return small & (jnp.abs(est.value - prev.value) <= 1.96 * prev.std_error)


def _xtrace_rtol(mv, key, sampler, m, *, batch_size, mesh, n, rtol, first, start=None):
    """XTrace with the stopping rule: the sketch grows by doubling until ``std_error < rtol·|value|``.

    The probes are those of a one-shot run (probe ``i`` is drawn from ``(key, i)``), so a run that
    never stops early equals :func:`_xtrace` (to rounding). Growing from ``a`` to ``b`` probes costs
    ``2(b − a)`` matvecs: ``Y_new = AΩ_new``, then block Gram–Schmidt (twice, for orthogonality)
    extends ``Y = QR`` by ``Q_new`` with ``R`` kept upper triangular, and only ``AQ_new`` is new.
    Buffers are ``(m/2, n)`` (those of a one-shot run); rows past the current size are zero.
    ``start``: the first size's probes and products ``(Ω₀, AΩ₀)`` when already computed (``auto``).
    """
    K = m // 2
    sizes = _doubling(K, max(2, first))
    dtype = sampler.dtype
    s0 = sizes[0]
    if start is None:
        Om0 = _probes(sampler, key, 0, s0)
        Y0 = _apply(mv, Om0, batch_size=batch_size, mesh=mesh)
    else:
        Om0, Y0 = start
    Q0, R0 = _orth(Y0.T)
    Z0 = _apply(mv, Q0.T, batch_size=batch_size, mesh=mesh)

    def pad(x, rows):
        return jnp.zeros((rows, *x.shape[1:]), dtype).at[: x.shape[0]].set(x)

    def finish(Om, Q, R, Z, s):
        est, W = _xtrace_finish(Om[:s], Q[:s], R[:s, :s], Z[:s], n)
        return est, _asymmetry(W.T @ R[:s, :s])

    R0full = jnp.zeros((K, K), dtype).at[:s0, :s0].set(R0)
    bufs = (pad(Om0, K), pad(Q0.T, K), R0full, pad(Z0, K))
    init = (bufs, *finish(*bufs, s0))

    def extend(carry, a, b):
        (Om, Q, R, Z), _, _ = carry
        Om_new = _probes(sampler, key, a, b - a)
        Y_new = _apply(mv, Om_new, batch_size=batch_size, mesh=mesh)
        Q_old = Q[:a]
        C1 = Q_old @ Y_new.T  # (a, b − a)
        V = Y_new - C1.T @ Q_old
        C2 = Q_old @ V.T
        V = V - C2.T @ Q_old
        Q_new, R_new = _orth(V.T)
        Z_new = _apply(mv, Q_new.T, batch_size=batch_size, mesh=mesh)
        Om = Om.at[a:b].set(Om_new)
        Q = Q.at[a:b].set(Q_new.T)
        R = R.at[:a, a:b].set(C1 + C2).at[a:b, a:b].set(R_new)
        Z = Z.at[a:b].set(Z_new)
        bufs = (Om, Q, R, Z)
        return (bufs, *finish(*bufs, b))

    def done(carry, prev):
        _, est, asym = carry
        return _settled(est, prev, rtol) | (asym > _sym_rtol(mv))

    _, est, asym = _grow(sizes, init, extend, done)
    return est, asym, None


def _xnystrace_rtol(mv, key, sampler, m, *, batch_size, mesh, n, rtol, first, start=None):
    """XNysTrace with the stopping rule: probes are added by doubling (``b − a`` matvecs from ``a`` to
    ``b`` probes; the Gram matrices grow by blocks) until ``std_error < rtol·|value|``. The probes are
    those of a one-shot run, so a run that never stops equals :func:`_xnystrace`."""
    sizes = _doubling(m, max(2, first))
    dtype = sampler.dtype
    s0 = sizes[0]

    def finish(Hm, YtY, OtO, s):
        return _xnystrace_finish(Hm[:s, :s], YtY[:s, :s], OtO[:s, :s], n)

    if start is None:
        Om0 = _probes(sampler, key, 0, s0)
        Y0 = _apply(mv, Om0, batch_size=batch_size, mesh=mesh)
    else:
        Om0, Y0 = start
    Om = jnp.zeros((m, n), dtype).at[:s0].set(Om0)
    Y = jnp.zeros((m, n), dtype).at[:s0].set(Y0)
    G = tuple(jnp.zeros((m, m), dtype).at[:s0, :s0].set(g) for g in _grams(Om0, Y0))
    init = ((Om, Y, G), *finish(*G, s0))

    def extend(carry, a, b):
        (Om, Y, (Hm, YtY, OtO)), *_ = carry
        Om_new = _probes(sampler, key, a, b - a)
        Y_new = _apply(mv, Om_new, batch_size=batch_size, mesh=mesh)
        Om, Y = Om.at[a:b].set(Om_new), Y.at[a:b].set(Y_new)
        # new rows/columns a:b of ΩᵀY, YᵀY, ΩᵀΩ against all b probes (and ΩᵀY's transposed block)
        # Ω_newᵀ·Y, Y_newᵀ·Y, Ω_newᵀ·Ω
        h_row, y_row, o_row = Om_new @ Y[:b].T, Y_new @ Y[:b].T, Om_new @ Om[:b].T
        h_col = Om[:a] @ Y_new.T  # Ω_oldᵀ·Y_new
        Hm = Hm.at[a:b, :b].set(h_row).at[:a, a:b].set(h_col)
        YtY = YtY.at[a:b, :b].set(y_row).at[:a, a:b].set(y_row[:, :a].T)
        OtO = OtO.at[a:b, :b].set(o_row).at[:a, a:b].set(o_row[:, :a].T)
        G = (Hm, YtY, OtO)
        return ((Om, Y, G), *finish(*G, b))

    def done(carry, prev):
        _, est, asym, not_psd = carry
        return _settled(est, prev, rtol) | (asym > _sym_rtol(mv)) | not_psd

    _, est, asym, not_psd = _grow(sizes, init, extend, done)
    return est, asym, not_psd


def _nystrom_core(Hm, YtY):
    """Eigen-decomposition of the sketch for the Nyström approximation ``Â = Y(ΩᵀY)⁺Yᵀ``.

    ``Hm = ΩᵀY`` (symmetrized), ``YtY = YᵀY``. Returns ``(lam, V, keep, B)`` with ``Hm = V diag(lam) Vᵀ``
    (ascending), ``keep`` the eigenvalues above ``k·eps·λ_max`` (the pseudo-inverse's support) and
    ``B = VᵀYᵀYV``, so that ``Â = FFᵀ`` with ``F = YVΛ^{−1/2}`` has ``FᵀF = Λ^{−1/2}BΛ^{−1/2}``.
    """
    k = Hm.shape[0]
    lam, V = jnp.linalg.eigh((Hm + Hm.T) / 2)
    keep = lam > k * jnp.finfo(lam.dtype).eps * jnp.abs(lam[-1])
    return lam, V, keep, V.T @ YtY @ V


def _nystrom_terms(core, OtO, n):
    """Leave-one-out and leave-two-out XNysTrace terms from the ``k × k`` Gram matrices of ``[Ω, Y]``.

    ``core = _nystrom_core(ΩᵀY, YᵀY)``, ``OtO = ΩᵀΩ``. With ``P = (ΩᵀY)⁺`` (eigen pseudo-inverse),
    ``Â = YPYᵀ`` and ``tr Â = tr(PYᵀY)``. Leaving probe ``i`` out (Albert 1969) removes
    ``z_i z_iᵀ`` with ``z_i = YPe_i/√P_ii`` when ``i`` is essential (projection leverage ``≈ 1``),
    nothing otherwise; the residual ``A − Â_{−i}`` vanishes on ``span Ω_{−i}``, so its quadratic form
    at ``ω_i`` is ``(z_iᵀω_i)² = (ΩᵀYP)_ii²/P_ii``, resphered by ``(n − k + 1)·((ΩᵀΩ)⁻¹)_ii``
    (``= (n − k + 1)/‖P_⊥(Ω_{−i})ω_i‖²``). Leaving out ``E = {i, j}`` (full rank): ``tr Â_{−E} =
    tr Â − tr(P_EE⁻¹ (PYᵀYP)_EE)``, the quadratic form of probe ``i`` is ``(P_EE⁻¹)_ii`` and its
    resphering scale ``(n − k + 2)(G_ii − G_ij²/G_jj)``, ``G = (ΩᵀΩ)⁻¹``.

    Returns ``(t, t2)``: the ``k`` XNysTrace terms and the ``k × k`` leave-two-out terms ``t2[i, j]``
    (equal to ``t[i]`` when ``ΩᵀY`` is singular, where the covariance estimate is then skipped).
    """
    lam, V, keep, B = core
    k = lam.shape[0]
    eps = jnp.finfo(lam.dtype).eps
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    E = V * inv[None, :]
    P = E @ V.T  # (ΩᵀY)⁺
    M = E @ B @ E.T  # P YᵀY P
    tr_full = jnp.sum(jnp.diagonal(B) * inv)  # tr Â, a sum of non-negative terms
    p, mm = jnp.diagonal(P), jnp.diagonal(M)
    lev = jnp.sum(jnp.where(keep[None, :], V * V, 0.0), axis=1)  # (ΩᵀY P)_ii = (V_keep V_keepᵀ)_ii
    essential = lev > 1.0 - jnp.sqrt(eps)
    p_safe = jnp.where(essential & (p > 0), p, 1.0)
    G = jnp.linalg.inv(OtO)
    G = (G + G.T) / 2
    g = jnp.diagonal(G)
    low_rank = tr_full - jnp.where(essential, mm / p_safe, 0.0)
    residual = jnp.where(essential, lev * lev / p_safe, 0.0)
    t = low_rank + (n - k + 1) * g * residual
    det = jnp.where(jnp.eye(k, dtype=bool), 1.0, p[:, None] * p[None, :] - P * P)
    tr_drop = (p[None, :] * mm[:, None] - 2 * P * M + p[:, None] * mm[None, :]) / det
    scale = (n - k + 2) * (g[:, None] - G * G / g[None, :])
    t2 = tr_full - tr_drop + scale * p[None, :] / det
    t2 = jnp.where(jnp.all(keep), t2, t[:, None])
    return t, t2


@_jit
def _grams(Omega, Y):
    """``(ΩᵀY, YᵀY, ΩᵀΩ)`` from the rows ``(k, n)`` of ``Ω`` and ``Y`` (contracting their contiguous axis)."""
    return Omega @ Y.T, Y @ Y.T, Omega @ Omega.T


def _xnystrace(mv, key, sampler, m, *, batch_size, mesh, n):
    Omega = _probes(sampler, key, 0, m)  # rows: (m, n)
    Y = _apply(mv, Omega, batch_size=batch_size, mesh=mesh)
    return _xnystrace_finish(*_grams(Omega, Y), n)


@_jit
def _xnystrace_finish(Hm, YtY, OtO, n):
    """``(estimate, asymmetry, not_psd)`` of XNysTrace from the Gram matrices of :func:`_grams`."""
    core = _nystrom_core(Hm, YtY)
    t, t2 = _nystrom_terms(core, OtO, n)
    est = Estimate(jnp.mean(t), _loo_se(t, t2), jnp.asarray(Hm.shape[0]))
    return est, _asymmetry(Hm), _nystrom_not_psd(core)


def _nystrom_mu(core):
    """The eigenvalues ``μ₁ ≥ μ₂ ≥ …`` of the Nyström approximation ``Â = FFᵀ``, ``F = YVΛ^{−1/2}``: those
    of ``FᵀF = Λ^{−1/2}BΛ^{−1/2}`` (:func:`_nystrom_core`), descending."""
    lam, _, keep, B = core
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return jnp.linalg.eigvalsh(inv_sqrt[:, None] * B * inv_sqrt[None, :])[::-1]


_GAP = 4.0  # a Nyström eigenvalue ratio above which (before a flat floor) auto prefers XTrace
_FLOOR = 1.5  # "flat": the eigenvalues after the gap within this factor of each other


def _gap_to_floor(core):
    """Whether the sketch's Nyström eigenvalues drop by more than ``_GAP`` onto a flat floor.

    With ``μ`` the Nyström eigenvalues (:func:`_nystrom_mu`), only the leading ``J = ⌊3k/4⌋ + 1`` are
    used (the last ones are the least accurate). True if for some ``j`` with at least two eigenvalues
    after it, ``μ_j/μ_{j+1} > 4`` and ``μ_{j+1}/μ_J < 1.5``: a few large eigenvalues above a noise
    floor (low rank plus noise), where XTrace's sketch ``range(AΩ)`` (one more power of ``A``) separates
    the large eigenvalues from the floor and XNysTrace's ``range(A^{1/2}Ω)`` mixes them (10 eigenvalues
    1 and 990 at 0.01, m = 30..300: XTrace 4–30× more accurate). Power laws ``1/k^p`` have a ratio
    ``2^p`` at ``j = 1`` but no floor after it; there XNysTrace is 1.2–1.6× better (p = 1, 1.5, 2, 3,
    ``e^{−k/10}``, flat; 100–200 seeds at n = 1000), so the floor condition keeps them on XNysTrace.
    """
    mu = _nystrom_mu(core)
    k = mu.shape[0]
    J = min(k, max(2, (3 * k) // 4 + 1))
    tiny = jnp.finfo(mu.dtype).tiny
    ratio = mu[: J - 1] / jnp.maximum(mu[1:J], tiny)  # ratio[j] = μ_j / μ_{j+1}, j < J − 1
    floor = mu[1:J] / jnp.maximum(mu[J - 1], tiny)  # μ_{j+1} / μ_J
    room = jnp.arange(J - 1) + 1 <= J - 2  # at least two eigenvalues after the gap
    return jnp.any((ratio > _GAP) & (floor < _FLOOR) & room)


def _nystrom_not_psd(core):
    """Evidence from the sketch that ``A`` is not positive semi-definite.

    ``ΩᵀAΩ`` has an eigenvalue below ``−10³·eps·λ_max``, or one of the directions ``v`` that the
    pseudo-inverse drops (``vᵀΩᵀAΩv ≈ 0``) has ``‖AΩv‖² > √eps·max_j ‖AΩv_j‖²``: for a PSD ``A``,
    ``‖AΩv‖² ≤ ‖A‖·vᵀΩᵀAΩv`` vanishes with the quadratic form, for an indefinite one it need not.
    Quadratic forms can never certify PSD (a random ``k``-dimensional compression of a Hessian with a
    few small negative eigenvalues is usually positive definite), hence ``psd=`` in :func:`trace`.
    """
    lam, _, keep, B = core
    eps = jnp.finfo(lam.dtype).eps
    b = jnp.diagonal(B)
    negative = lam[0] < -1e3 * eps * jnp.abs(lam[-1])
    lost = jnp.any(~keep & (b > jnp.sqrt(eps) * jnp.max(b)))
    return negative | lost


@_jit
def _auto_decide(G0, YtY0, OtO0, Y0, sym_rtol, *, n, psd):
    """``(use_x, use_nys)``: a sketch rather than Hutchinson, and XNysTrace rather than XTrace, from
    a first block ``Y₀ = AΩ₀`` (``G₀ = Ω₀ᵀY₀``, ``YtY₀``, ``OtO₀`` its Gram matrices); see :func:`_auto`."""
    k0 = G0.shape[0]
    h = jnp.diagonal(G0)
    var_h = jnp.var(h, ddof=1)
    core0 = _nystrom_core(G0, YtY0)
    looks_psd = (_asymmetry(G0) < sym_rtol) & ~_nystrom_not_psd(core0)

    def var_nys():  # the sample variance of the first block's leave-one-out XNysTrace terms
        return jnp.var(_nystrom_terms(core0, OtO0, n)[0], ddof=1)

    def var_res():  # 2·mean_i dist(y_i, span Y_{0,−i})², from Y₀ = QR
        R0 = jnp.linalg.qr(Y0.T, mode="r")
        Rinv = jax.scipy.linalg.solve_triangular(R0, jnp.eye(k0, dtype=R0.dtype), lower=False)
        return 2.0 * jnp.mean(1.0 / jnp.sum(Rinv * Rinv, axis=1))

    # without the declaration the Nyström branch is never taken (and its gap test not computed)
    use_nys = (looks_psd & ~_gap_to_floor(core0)) if psd else jnp.zeros((), bool)
    # the sketch's per-probe variance of the method that would run: a statistic of XNysTrace's terms
    # says nothing about XTrace (with psd=False on a flat spectrum it chose XTrace 2/3 of the time,
    # 1.2–1.6× Hutchinson's error)
    var_x = _cond(use_nys, var_nys, var_res)
    use_x = var_x < var_h
    return use_x, use_nys


def _auto_rtol(mv, key, sampler, m, *, batch_size, mesh, n, psd, rtol, first):
    """``auto`` with the stopping rule: the choice (:func:`_auto_decide`) is made from the first
    ``s₀ = min(first, m/2)`` probes, which the chosen method then continues from (no matvec wasted):
    Hutchinson in blocks of ``s₀`` probes, or the doubling sketch of XTrace / XNysTrace. The probes are
    those of the chosen method's own rtol run, which this reproduces. Returns ``(estimate, branch,
    bad)`` as :func:`_auto`."""
    s0 = min(first, m // 2)
    Om0 = _probes(sampler, key, 0, s0)
    Y0 = _apply(mv, Om0, batch_size=batch_size, mesh=mesh)
    G0, YtY0, OtO0 = _grams(Om0, Y0)
    use_x, use_nys = _auto_decide(G0, YtY0, OtO0, Y0, _sym_rtol(mv), n=n, psd=psd)
    false = jnp.zeros((), bool)
    common = {"batch_size": batch_size, "mesh": mesh, "n": n, "rtol": rtol, "first": s0}

    def hutch_branch():
        first_block = _quad_stats(Om0, Y0)

        def terms(start, num):
            fresh = lambda: _quad_terms(mv, key, sampler, start, num, batch_size, mesh)  # noqa: E731
            if num != s0:  # the last, smaller block: never the first (both branches need its shape)
                return fresh()
            return _cond(start == 0, lambda: first_block, fresh)

        # blocks of s0 probes, the first block's size (fewer than 10 when m < 20: the first block
        # already is m/2)
        est = _sequential(
            terms,
            jnp.zeros((), sampler.dtype),
            m,
            batch_size=batch_size,
            rtol=rtol,
            offset=0,
            name=sampler.name,
            block=s0,
        )
        return est, false

    def nys_branch():
        est, asym, not_psd = _xnystrace_rtol(mv, key, sampler, m, start=(Om0, Y0), **common)
        return est, not_psd | (asym > _sym_rtol(mv))

    def xtrace_branch():
        est, _, _ = _xtrace_rtol(mv, key, sampler, m, start=(Om0, Y0), **common)
        return est, false

    branch = jnp.where(use_x, jnp.where(use_nys, 1, 2), 0)
    est, bad = _switch(branch, [hutch_branch, nys_branch, xtrace_branch])
    return est, branch, bad


def _auto(mv, key, sampler, m, *, batch_size, mesh, n, psd=False):
    """Hutchinson, XTrace or (``psd=True`` only) XNysTrace, decided from the first half of the probes.

    All probes are ``√n``-sphere vectors ``ω_i`` from one key. The first ``k = m/2`` probes
    (``Y₀ = AΩ₀``) are shared by the candidates: Hutchinson and XNysTrace continue with ``m/2`` more
    probes, XTrace spends the other half on ``AQ`` with ``Q = orth(Y₀)``; no matvec is wasted.

    1. The candidate sketch, XNysTrace or XTrace: XNysTrace (on average 1.2–1.6× more accurate than
       XTrace on PSD power-law, exponential and flat spectra) only if ``psd=True`` was declared, the
       sketch shows no sign of indefiniteness (:func:`_nystrom_not_psd`) and its Nyström eigenvalues
       do not drop onto a flat floor (:func:`_gap_to_floor`: low rank plus noise, where XTrace is
       4–30× better). A PSD operator cannot be recognised from quadratic forms: a trained network's
       Hessian (48 of 195 eigenvalues slightly negative) had a positive definite 50-probe sketch, and
       XNysTrace's pseudo-inverse then dropped the negative directions and reported a standard error
       of 1e-16 at a 6e-3 relative error. Without the declaration the candidate is XTrace.
    2. The candidate or Hutchinson: the Hutchinson terms ``h_i = ω_iᵀy_i`` give the per-probe
       variance ``s_H²``; the candidate's per-probe variance ``s_X²`` is the sample variance of the
       first half's leave-one-out XNysTrace terms (XNysTrace), or ``2·mean_i dist(y_i, span
       Y_{0,−i})²``, the Hutch++ residual variance bound ``2‖(I − Π)A‖_F²`` (XTrace). The sketch if
       ``s_X² < s_H²`` (it is then at least as good per probe, and improves faster with ``m``). Each
       statistic belongs to the method it selects: with psd=False, judging XTrace by the Nyström
       terms chose it on a flat spectrum (n = 1000, 100 seeds) in 53–100% of the seeds, 1.06–1.57×
       Hutchinson's median error; by its own residual bound it chooses Hutchinson there every time
       and is within 1.09× of the better of the two on all four benchmark spectra.

    Returns ``(estimate, branch, bad)``: ``branch`` 0 Hutchinson, 1 XNysTrace, 2 XTrace; ``bad`` is
    True where XNysTrace was chosen and the full sketch contradicts the declared ``psd``.
    """
    k0 = m // 2
    Om0 = _probes(sampler, key, 0, k0)  # rows: (k0, n)
    Y0 = _apply(mv, Om0, batch_size=batch_size, mesh=mesh)
    G0, YtY0, OtO0 = _grams(Om0, Y0)
    use_x, use_nys = _auto_decide(G0, YtY0, OtO0, Y0, _sym_rtol(mv), n=n, psd=psd)
    false = jnp.zeros((), bool)

    def rest_probes():
        Om1 = _probes(sampler, key, k0, m - k0)
        return Om1, _apply(mv, Om1, batch_size=batch_size, mesh=mesh)

    def hutch_branch():
        Om1, Y1 = rest_probes()
        # The value is the mean of all m terms; its standard error is the structural one (from
        # ‖Aω_i‖², not the terms' spread) estimated from the second half alone, the probes the
        # decision did not see, scaled from m − k₀ to m terms: the decision chose Hutchinson because
        # the first half's terms spread little, which biases any statistic of them low given the
        # choice. On 1/k at m = 10, n = 200 (1000 seeds) the Hutchinson branch covered 0.918 with the
        # terms' sample variance, 0.885 with the structural error of all m probes, 0.917 with this.
        value = jnp.mean(jnp.concatenate([jnp.sum(Om0 * Y0, axis=1), jnp.sum(Om1 * Y1, axis=1)]))
        _, se1 = _quad_estimate(sampler.name, *_quad_stats(Om1, Y1))
        se = se1 * jnp.sqrt(jnp.asarray((m - k0) / m, se1.dtype))
        return Estimate(value, se, jnp.asarray(m)), false

    def nys_branch():
        Om1, Y1 = rest_probes()
        # the Gram matrices of [Ω₀ Ω₁], [Y₀ Y₁] by blocks (the Ω₀/Y₀ blocks are known)
        Hm = jnp.block([[G0, Om0 @ Y1.T], [Om1 @ Y0.T, Om1 @ Y1.T]])
        Y01 = Y0 @ Y1.T
        YtY = jnp.block([[YtY0, Y01], [Y01.T, Y1 @ Y1.T]])
        O01 = Om0 @ Om1.T
        OtO = jnp.block([[OtO0, O01], [O01.T, Om1 @ Om1.T]])
        est, asym, not_psd = _xnystrace_finish(Hm, YtY, OtO, n)
        return est, not_psd | (asym > _sym_rtol(mv))

    def xtrace_branch():
        Q0, R0 = _orth(Y0.T)
        Z = _apply(mv, Q0.T, batch_size=batch_size, mesh=mesh)
        return _xtrace_finish(Om0, Q0.T, R0, Z, n)[0], false

    branch = jnp.where(use_x, jnp.where(use_nys, 1, 2), 0)
    est, bad = _switch(branch, [hutch_branch, nys_branch, xtrace_branch])
    return est, branch, bad


def _floored(est: Estimate, eps_op: float | None = None) -> Estimate:
    """``est`` with ``std_error ≥ 2·eps·|value|``: a computed trace carries rounding error of a few
    ulps that no sampling statistic sees (on an exactly low-rank operator the sketch leaves a
    residual of pure rounding, and XTrace/XNysTrace report 0); the floor is far below any sampling
    error otherwise. ``eps`` is the coarser of the estimate's and the operator's (``eps_op``, the
    mean over the entries of their leaves' eps: a bfloat16 operator is estimated in float32, but its
    products carry bfloat16 rounding; one bfloat16 leaf among float32 ones counts for its share)."""
    eps = jnp.finfo(est.value.dtype).eps
    if eps_op is not None:
        eps = max(float(eps), float(eps_op))
    floor = _ROUNDING_FLOOR * eps * jnp.abs(est.value)
    return est._replace(std_error=jnp.maximum(est.std_error, floor))


def _nan_where(bad: Any, est: Estimate) -> Estimate:
    """``est`` with its value and standard error replaced by NaN where ``bad`` (the traced check)."""
    return est._replace(
        value=jnp.where(bad, jnp.nan, est.value), std_error=jnp.where(bad, jnp.nan, est.std_error)
    )


def _raise_if_concrete(flag: Any, message: Callable[[], str]) -> None:
    """Raise ``GradlabError`` if ``flag`` is a concrete True (under ``jit`` the check is skipped)."""
    try:
        bad = bool(flag)
    except jax.errors.ConcretizationTypeError:
        return
    if bad:
        raise GradlabError(message())


def trace(
    matvec: Callable[[Any], Any],
    key: Any,
    /,
    *,
    like: Any,
    num_matvecs: int,
    method: str = "hutchinson",
    sampler: str | None = None,
    rtol: float | None = None,
    batch_size: int | None = None,
    mesh: Any = None,
    psd: bool = False,
) -> Estimate:
    """Estimate ``tr(A)`` from ``num_matvecs`` products ``v ↦ A v``.

    Methods (``m`` = ``num_matvecs``, ``n`` = size of ``like``; probes ``z`` with ``E[z zᵀ] = I``):

    - ``"hutchinson"`` (Hutchinson 1989): ``(1/m) Σ z_iᵀ A z_i``. Rademacher probes have per-probe
      variance ``2(‖A‖_F² − Σ a_ii²)``, Gaussian ``2‖A‖_F²``; error ``O(1/√m)``. Any square ``A``.
    - ``"hutch++"`` (Meyer et al. 2021): ``m/3`` probes sketch ``Q = orth(A S)``, ``m/3`` give ``AQ``,
      the rest estimate the residual by Hutchinson: ``tr(QᵀAQ) + (1/g) Σ gᵢᵀ(I−QQᵀ)A(I−QQᵀ)gᵢ``.
      Error ``O(1/m)`` on fast-decaying spectra. Any square ``A``.
    - ``"xtrace"`` (Epperly, Tropp & Webber 2024): ``m/2`` probes, each used both in the low-rank
      sketch and, left out of it, as a Hutchinson probe of the residual; ``A`` symmetric.
    - ``"xnystrace"``: the same exchangeable construction on the Nyström approximation
      ``AΩ(ΩᵀAΩ)⁺ΩᵀA`` with all ``m`` probes; ``A`` symmetric positive semi-definite.
    - ``"auto"``: decides from the first half of the probes whether the operator is in the
      Hutchinson regime (flat spectrum) or the low-rank regime (decaying spectrum), and then between
      XTrace and, only for an operator declared ``psd=True``, XNysTrace (unless the sketch's Nyström
      eigenvalues drop onto a flat floor, where XTrace's extra power of ``A`` pays); see ``_auto``.
      No matvec is wasted on the decision. Positive semi-definiteness cannot be read off quadratic
      forms (a trained network's Hessian with a few small negative eigenvalues has positive definite
      sketches), so it must be declared.

    X-methods use the "resphering" of Epperly (2025): each left-out probe is rescaled within the
    complement of the other probes, so they need rotation-invariant probes (``"sphere"`` or
    ``"gaussian"``).

    With ``num_matvecs ≥ n`` every method returns the exact trace from the ``n`` unit vectors.

    Standard error (``value ± 1.96·std_error`` is a 95% interval): Hutchinson-type terms
    ``t_i = z_iᵀRz_i`` are iid. With Rademacher (Gaussian) probes their variance is ``2(‖R‖_F² −
    Σ r_jj²)`` (``2‖R‖_F²``); gradlab estimates ``‖R‖_F²`` by the mean of ``‖Rz_i‖²`` (free: ``Rz_i``
    is computed) and ``Σ r_jj²`` from the bias-corrected Hutchinson diagonal, with Student's ``t`` at
    the Satterthwaite degrees of freedom of that Frobenius estimate (:func:`_structural_se`). Sphere
    probes: ``2n/(n + 2)·(‖R‖_F² − (tr R)²/n)``, the second part from the terms themselves, computed
    without cancellation. The ``k`` leave-one-out terms ``t_i`` of XTrace/XNysTrace are each unbiased given the
    other probes but correlated through the shared sketch: ``Var(mean t) = E[s²]/k + Cov(t_i, t_j)``,
    and the covariance equals ``E[Δ_ij Δ_ji]`` with ``Δ_ij = t_i − t_i^{(−j)}`` (``t_i^{(−j)}``: probe
    ``i``'s term with probe ``j`` also left out of the sketch, closed form in ``O(k³)``). So
    ``std_error² = (s²/k + max(0, mean_{i≠j} Δ_ij Δ_ji))·(q/1.96)²`` (:func:`_loo_se`), unbiased
    where the naive ``s²/k`` is 0.25–0.85 of the variance and the jackknife 1.2–20×, with ``q`` from
    Student's ``t`` at the Satterthwaite degrees of freedom of that variance estimate. Coverage of
    ``±1.96·std_error`` over 1000 seeds is 0.93–0.97 for every method on spectra ``∝ 1/k²``, ``1/k``,
    flat and low rank plus noise at n = 1000 and m = 10, 30, 100, 300, and at n = 200 with m = 10 and
    30 (also ``e^{−k/10}``, ``1/√k``, ``1/k³`` for Hutchinson and Hutch++). Where ``auto`` picks
    Hutchinson its value is the mean of all ``m`` terms, but its standard error is the structural one
    of the second half alone (scaled to ``m`` terms): the first half's small spread is what chose
    Hutchinson, so any statistic of the first half is biased low given the choice (on ``1/k`` at
    n = 200, m = 10, psd=False, the Hutchinson branch covered 0.918 with the terms' sample variance,
    0.885 with the structural error of all probes, 0.917 with the second half's; ``auto`` overall
    0.929 → 0.937). The standard error is never below ``2·eps·|value|``: on an exactly
    low-rank operator the sketch captures it all and no sampling statistic sees the few ulps of
    rounding left (XTrace and XNysTrace reported 0 there, Hutch++ the residual's rounding only).

    Stopping rule (``rtol``): probes are drawn in blocks of ``max(10, batch_size)`` until
    ``std_error < rtol·|value|`` or the budget is spent (the last block takes what is left of it);
    ``num_matvecs`` reports what was used. For
    ``hutch++`` the sketch is spent first and the residual probes are drawn in blocks. For ``xtrace``
    and ``xnystrace`` every probe enters the sketch, so the sketch grows instead, doubling from
    ``max(10, batch_size)`` probes (10, 20, 40, … up to the budget; XTrace extends its QR factorization by block
    Gram–Schmidt, so only the new ``AQ`` columns cost matvecs), the same probes as a one-shot run
    (which a run that never stops reproduces). They stop at a size where ``std_error < rtol·|value|``
    *and* the half-size sketch's estimate lies within 1.96 of its standard errors of the new one: a
    guard against optional stopping where a small sketch's error bar is accidentally small (with it,
    coverage of stopped estimates over 500 seeds, n = 200, rtol 3e-2..3e-3, is 0.93–0.96 on the
    calibration spectra; without it 0.87–0.96). ``auto`` with ``rtol`` decides from the first
    ``max(10, batch_size)`` probes (instead of half the budget) and continues the chosen method's
    stopping rule from them, reproducing that method's own ``rtol`` run.

    Args:
      matvec: ``v -> A v`` on pytrees like ``like`` (e.g. :func:`hvp_operator`), JAX-traceable.
      key: a ``jax.random.key``.
      like: a pytree fixing the structure, size ``n`` and dtype of the probes. Half-precision
        (bfloat16/float16) leaves are estimated in float32 (probes rounded to the leaves' dtype on
        the way in, products promoted on the way out; LAPACK has no half-precision QR/eigh), so the
        estimate and its error bar are float32; the same holds for :func:`diagonal`,
        :func:`eigenvalues` and :func:`spectral_density`.
      num_matvecs: the budget ``m`` (at least 2 for Hutchinson and XNysTrace, 4 for Hutch++ and XTrace,
        8 for auto).
      method: one of :data:`TRACE_METHODS`.
      sampler: one of :data:`SAMPLERS`; default Rademacher for Hutchinson/Hutch++, sphere otherwise.
      rtol: relative standard-error target of the stopping rule (``None``: spend the budget).
      batch_size: probes per chunk through the operator (``None``: one vmap per block).
      mesh: a one-axis ``jax.sharding.Mesh`` to spread probe blocks over devices.
      psd: declare ``A`` symmetric positive semi-definite (a covariance, a Gauss–Newton or Fisher
        matrix, a convex loss's Hessian): lets ``auto`` use XNysTrace. Other methods ignore it
        (``xnystrace`` itself is that declaration).

    Returns:
      an :class:`Estimate`.

    Raises:
      UnknownNameError: an unknown ``method`` or ``sampler``.
      OptionError: a budget too small for the method, a sampler the method cannot use, a bad
        ``rtol`` or ``mesh``.
      ShapeError: ``matvec`` does not map ``like``-shaped pytrees to ``like``-shaped pytrees.
      GradlabError: (outside ``jit``) ``xtrace``/``xnystrace`` on a non-symmetric operator, or
        ``xnystrace`` (or ``auto`` with ``psd=True`` where it chose XNysTrace) on one that is not
        positive semi-definite (under ``jit`` the value is NaN).

    >>> import jax, jax.numpy as jnp
    >>> lam = 1.0 / jnp.arange(1.0, 201.0) ** 2
    >>> U = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (200, 200)))[0]
    >>> A = (U * lam[None, :]) @ U.T
    >>> est = trace(lambda v: A @ v, jax.random.key(0), like=jnp.zeros(200), num_matvecs=40,
    ...             method="xnystrace")
    >>> bool(abs(est.value - lam.sum()) < 3 * est.std_error), int(est.num_matvecs)
    (True, 40)

    Over many seeds use ``lax.map`` (as the calibration tests do): on XLA:CPU (JAX 0.10.2)
    ``jax.jit(jax.vmap(...))`` of ``method="auto"`` over more than 256 keys deadlocks in XLA's CPU
    runtime. ``rtol`` stops on the data: a ``trace`` with it is not reverse-differentiable. The
    X-methods resphere their probes, so ``sampler="gaussian"`` and ``"sphere"`` give the same estimate
    for them.

    Under ``jax.jit`` the whole estimator compiles into one program (an eager call runs op by op;
    with ``rtol``, whose sketch sizes change, that is many small compilations):

    >>> run = jax.jit(lambda key, A: trace(lambda v: A @ v, key, like=jnp.zeros(200),
    ...                                    num_matvecs=160, method="xtrace", rtol=1e-2))
    >>> est = run(jax.random.key(0), A)   # stops when the error bar is 1% of the value
    >>> bool(est.std_error < 1e-2 * est.value), int(est.num_matvecs) < 160
    (True, True)

    References: Hutchinson (1989); Meyer, Musco, Musco & Woodruff (2021); Epperly, Tropp & Webber
    (2024), SIAM J. Matrix Anal. Appl. 45(1); Epperly (2025), PhD thesis, arXiv:2512.15929.
    """
    method = check_choice("method", method, TRACE_METHODS)
    sampler = _DEFAULT_SAMPLER[method] if sampler is None else sampler
    sampler = check_choice("sampler", sampler, SAMPLERS)
    m = check_positive_int("num_matvecs", num_matvecs)
    batch_size = _check_batch_size(batch_size)
    mesh = _check_mesh(mesh)
    if not isinstance(psd, bool):
        raise OptionError(f"psd: expected True or False, got {psd!r}.")
    if rtol is not None:
        rtol = check_positive("rtol", rtol)
    if method in ("xtrace", "xnystrace", "auto") and sampler not in _ROTATION_INVARIANT:
        raise OptionError(
            f"sampler: method={method!r} needs rotation-invariant probes, one of "
            f"{list(_ROTATION_INVARIANT)}; got {sampler!r}. Use sampler='sphere' (the default)."
        )
    check_key(key, "trace")
    mv, n, dtype = _flat_operator(matvec, like)
    if m >= n:
        return _exact(mv, n, dtype, batch_size=batch_size, mesh=mesh)
    if m < _MIN_MATVECS[method]:
        raise OptionError(
            f"num_matvecs: method={method!r} needs at least {_MIN_MATVECS[method]} matvecs "
            f"(for a standard error), got {m}. Raise num_matvecs."
        )
    samp = _probe_sampler(sampler, jnp.zeros(n, dtype), 1)
    common = {"batch_size": batch_size, "mesh": mesh}
    first = max(_DEFAULT_BLOCK, batch_size or 0)  # the X-methods' first sketch size under rtol
    if method == "hutchinson":
        return _floored(_hutchinson(mv, key, samp, m, rtol=rtol, **common), mv.eps_op)
    if method == "hutch++":
        return _floored(_hutchpp(mv, key, samp, m, rtol=rtol, n=n, **common), mv.eps_op)
    if method == "auto":
        if rtol is None:
            est, _, bad = _auto(mv, key, samp, m, n=n, psd=psd, **common)
        else:
            est, _, bad = _auto_rtol(
                mv, key, samp, m, n=n, psd=psd, rtol=rtol, first=first, **common
            )
        _raise_if_concrete(
            bad,
            lambda: (
                "psd: method='auto' with psd=True chose XNysTrace, but the sketch ΩᵀAΩ is not "
                "positive semi-definite (a negative eigenvalue, or a null direction v with AΩv ≠ 0). "
                "Drop psd=True for an indefinite operator such as the Hessian of a non-convex loss."
            ),
        )
        return _nan_where(bad, _floored(est, mv.eps_op))
    if rtol is None:
        fn = _xtrace if method == "xtrace" else _xnystrace
        est, asym, not_psd = fn(mv, key, samp, m, n=n, **common)
    else:
        fn = _xtrace_rtol if method == "xtrace" else _xnystrace_rtol
        est, asym, not_psd = fn(mv, key, samp, m, n=n, rtol=rtol, first=first, **common)
    bad = asym > _sym_rtol(mv)
    _raise_if_concrete(
        bad,
        lambda: (
            f"matvec: method={method!r} needs a symmetric operator, but ΩᵀAΩ is asymmetric "
            f"(relative asymmetry {float(asym):.2e}). "
            "Use method='hutchinson' or 'hutch++' for a non-symmetric operator."
        ),
    )
    if not_psd is not None:
        _raise_if_concrete(
            not_psd,
            lambda: (
                "matvec: method='xnystrace' needs a positive semi-definite operator, but ΩᵀAΩ has a "
                "negative eigenvalue. Use method='xtrace' (symmetric) or 'hutch++' for an indefinite "
                "operator such as the Hessian of a non-convex loss."
            ),
        )
        bad = bad | not_psd
    return _nan_where(bad, _floored(est, mv.eps_op))


def hessian_trace(
    f: Callable[[Any], Any],
    x: Any,
    key: Any,
    /,
    *,
    num_matvecs: int,
    method: str = "hutchinson",
    sampler: str | None = None,
    rtol: float | None = None,
    batch_size: int | None = None,
    mesh: Any = None,
    psd: bool = False,
) -> Estimate:
    """Estimate ``tr ∇²f(x)`` with :func:`trace` over :func:`hvp_operator` (one linearization).

    ``batch_size`` (``None``: the backend's default) is 1 on the CPU backend, where a ``lax.map`` over
    single HVPs is the cheapest per product (one vmap over 100 HVPs cost 3–5× more per product, with
    50× the temporaries), and all probes in one vmap on a GPU or TPU, where a sequential loop of small
    kernels would leave the device idle; pass an integer to choose. Other options as in
    :func:`trace`; a non-convex loss has an
    indefinite Hessian, so use ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"auto"`` there (and
    ``psd=True`` only for a convex loss).

    >>> import jax, jax.numpy as jnp
    >>> f = lambda p: jnp.sum(p["a"] ** 2) + 3 * jnp.sum(p["b"] ** 2)
    >>> x = {"a": jnp.ones(3), "b": jnp.ones(2)}
    >>> float(hessian_trace(f, x, jax.random.key(0), num_matvecs=5).value)   # 2·3 + 6·2, exact (m = n)
    18.0

    Reference: Hutchinson, *Comm. Stat. Simul. Comput.* 18 (1989); Meyer, Musco, Musco & Woodruff,
      Hutch++, SOSA 2021; Epperly, Tropp & Webber, XTrace, *SIAM J. Matrix Anal. Appl.* 45 (2024); see
      :func:`trace`.
    """
    if batch_size is None and platform() == "cpu":
        batch_size = 1
    return trace(
        hvp_operator(f, x),
        key,
        like=x,
        num_matvecs=num_matvecs,
        method=method,
        sampler=sampler,
        rtol=rtol,
        batch_size=batch_size,
        mesh=mesh,
        psd=psd,
    )


# --------------------------------------------------------------------------------------------------
# Diagonal
# --------------------------------------------------------------------------------------------------


def diagonal(
    matvec: Callable[[Any], Any],
    key: Any,
    /,
    *,
    like: Any,
    num_matvecs: int,
    method: str = "hutchinson",
    batch_size: int | None = None,
    mesh: Any = None,
) -> DiagonalEstimate:
    """Estimate ``diag(A)`` (as a pytree like ``like``) from ``num_matvecs`` products.

    - ``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): ``(1/m) Σ z_i ⊙ A z_i`` with Rademacher
      probes (``z ⊙ z = 1``); entry ``j`` has variance ``Σ_{l≠j} a_jl²`` per probe.
    - ``"xdiag"`` (Epperly, Tropp & Webber 2024): ``m/2`` Rademacher probes build ``Q = orth(AΩ)``;
      each probe, left out of the sketch, estimates the residual's diagonal:
      ``diag(Q_{−i}Q_{−i}ᵀA) + ω_i ⊙ (I − Q_{−i}Q_{−i}ᵀ)Aω_i``. ``A`` symmetric.

    ``std_error`` is per entry (the t-calibrated sample standard error of the terms). With
    ``num_matvecs ≥ n`` the diagonal is exact, and its standard error is the rounding floor
    ``2·eps·|value|`` per entry, as for :func:`trace`.

    >>> import jax, jax.numpy as jnp
    >>> A = jnp.array([[2.0, 0.1], [0.1, 3.0]])
    >>> d = diagonal(lambda v: A @ v, jax.random.key(0), like=jnp.zeros(2), num_matvecs=2)
    >>> eps = jnp.finfo(d.value.dtype).eps
    >>> d.value.tolist(), bool(jnp.all(d.std_error == 2 * eps * d.value))
    ([2.0, 3.0], True)

    References: Bekas, Kokiopoulou & Saad (2007), Appl. Numer. Math. 57(11–12); Epperly, Tropp &
    Webber (2024), SIAM J. Matrix Anal. Appl. 45(1).
    """
    method = check_choice("method", method, DIAGONAL_METHODS)
    m = check_positive_int("num_matvecs", num_matvecs)
    batch_size = _check_batch_size(batch_size)
    mesh = _check_mesh(mesh)
    check_key(key, "diagonal")
    mv, n, dtype = _flat_operator(matvec, like)
    # leaves like `like`, in their dtypes promoted to at least float32 (half precision is estimated
    # in float32, see _flat_operator; unravelling into bfloat16 leaves would round the estimate)
    unravel = ravel_pytree(
        jax.tree.map(
            lambda t: jnp.zeros(jnp.shape(t), jnp.promote_types(jnp.result_type(t), jnp.float32)),
            like,
        )
    )[1]
    if m >= n:
        cols = _apply(mv, jnp.eye(n, dtype=dtype), batch_size=batch_size, mesh=mesh)
        d = jnp.diagonal(cols)
        eps = jnp.maximum(jnp.finfo(d.dtype).eps, jnp.asarray(mv.eps_entries, d.dtype))
        floor = _ROUNDING_FLOOR * eps * jnp.abs(d)  # each entry's rounding, as for the trace
        return DiagonalEstimate(unravel(d), unravel(floor), jnp.asarray(n))
    need = 2 if method == "hutchinson" else 4
    if m < need:
        raise OptionError(
            f"num_matvecs: method={method!r} needs at least {need} matvecs, got {m}. "
            "Raise num_matvecs."
        )
    samp = _probe_sampler("rademacher", jnp.zeros(n, dtype), 1)
    if method == "hutchinson":
        Z = _probes(samp, key, 0, m)
        terms = Z * _apply(mv, Z, batch_size=batch_size, mesh=mesh)
        used = m
    else:
        k = m // 2
        Omega = _probes(samp, key, 0, k).T
        Y = _apply(mv, Omega.T, batch_size=batch_size, mesh=mesh).T
        Q, R = _orth(Y)
        Z = _apply(mv, Q.T, batch_size=batch_size, mesh=mesh).T
        S = _loo_factor(R)
        QS = Q @ S
        full = jnp.sum(Q * Z, axis=1)
        terms = (full[:, None] - QS * (Z @ S) + QS * jnp.sum(S * R, axis=0)[None, :] * Omega).T
        used = 2 * k
    k_terms = terms.shape[0]
    mean = jnp.mean(terms, axis=0)
    se = (
        jnp.std(terms, axis=0, ddof=1)
        / math.sqrt(k_terms)
        * _t_ratio(jnp.asarray(k_terms - 1, terms.dtype))
    )
    return DiagonalEstimate(unravel(mean), unravel(se), jnp.asarray(used))


# --------------------------------------------------------------------------------------------------
# Lanczos: extreme eigenvalues and spectral density
# --------------------------------------------------------------------------------------------------


def _lanczos(mv_block, V0, q, key):
    """Lanczos with full reorthogonalization on a block of ``p`` independent start vectors.

    ``V0``: ``(p, n)`` start vectors; ``mv_block``: ``(p, n) -> (p, n)``. Returns ``(alpha, beta,
    basis)`` with shapes ``(p, q)``, ``(p, q)`` (``beta[:, j]`` couples ``j`` and ``j+1``) and
    ``(p, q, n)``. Classical Gram–Schmidt twice against the stored basis; on breakdown a random
    vector orthogonal to the basis continues the iteration (with a zero coupling).
    """
    p, n = V0.shape
    dtype = V0.dtype
    basis = (
        jnp.zeros((p, q, n), dtype).at[:, 0].set(V0 / jnp.linalg.norm(V0, axis=1, keepdims=True))
    )
    tiny = jnp.finfo(dtype).eps ** 0.75

    def orth(w, basis):
        for _ in range(2):
            w = w - jnp.einsum("pq,pqn->pn", jnp.einsum("pqn,pn->pq", basis, w), basis)
        return w

    def step(j, state):
        basis, alpha, beta = state
        v = basis[:, j]
        w = mv_block(v)
        a = jnp.sum(v * w, axis=1)
        w = orth(w, basis)  # basis rows beyond j are zero, so this is full reorthogonalization
        b = jnp.linalg.norm(w, axis=1)
        fresh = orth(jax.random.normal(jax.random.fold_in(key, j), (p, n), dtype), basis)
        broke = b < tiny * jnp.maximum(jnp.abs(a), 1.0)
        w = jnp.where(broke[:, None], fresh, w)
        nxt = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        b = jnp.where(broke, 0.0, b)
        basis = jnp.where(j + 1 < q, basis.at[:, (j + 1) % q].set(nxt), basis)
        return basis, alpha.at[:, j].set(a), beta.at[:, j].set(b)

    init = (basis, jnp.zeros((p, q), dtype), jnp.zeros((p, q), dtype))
    basis, alpha, beta = jax.lax.fori_loop(0, q, step, init)
    return alpha, beta, basis


def _tridiag(alpha, beta):
    q = alpha.shape[0]
    off = beta[: q - 1]
    return jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _block_lanczos(mv_rows, V0, s, key):
    """Block Lanczos with full reorthogonalization: ``s`` blocks of ``b`` orthonormal rows.

    ``V0``: ``(b, n)`` start rows; ``mv_rows``: ``(b, n) -> (b, n)`` (rows ``A v``). Block ``j + 1``
    is ``orth(A V_j)`` against every earlier row (classical Gram–Schmidt twice, then a QR within the
    block); a direction that vanishes there (``|R_ii|`` at rounding level: the block Krylov space has
    no new direction of it) is replaced by a random one orthogonal to the basis. Returns ``(basis,
    AV)``, both ``(s b, n)``: the rows and their images, from which the caller forms the Rayleigh
    quotient ``H = basis AVᵀ`` (block tridiagonal up to rounding) and exact residuals.
    """
    b, n = V0.shape
    dtype = V0.dtype
    q = s * b
    tiny = jnp.finfo(dtype).eps ** 0.75

    def orth(W, basis):  # rows of W against the rows of basis (zero rows beyond the filled ones)
        for _ in range(2):
            W = W - (W @ basis.T) @ basis
        return W

    def orthonormal_block(W, basis, j):
        scale = jnp.max(jnp.linalg.norm(W, axis=1))  # the block's size before projection
        W = orth(W, basis)
        _, R = jnp.linalg.qr(W.T, mode="reduced")
        lost = jnp.abs(jnp.diagonal(R)) <= tiny * scale
        fresh = orth(jax.random.normal(jax.random.fold_in(key, j), (b, n), dtype), basis)
        W = orth(jnp.where(lost[:, None], fresh, W), basis)
        return jnp.linalg.qr(W.T, mode="reduced")[0].T

    basis = jnp.zeros((q, n), dtype).at[:b].set(orthonormal_block(V0, jnp.zeros((q, n), dtype), 0))
    AV = jnp.zeros((q, n), dtype)

    def step(j, state):
        basis, AV = state
        V = jax.lax.dynamic_slice_in_dim(basis, j * b, b)
        W = mv_rows(V)
        AV = jax.lax.dynamic_update_slice_in_dim(AV, W, j * b, axis=0)
        nxt = orthonormal_block(W, basis, j + 1)
        start = jnp.minimum((j + 1) * b, q - b)  # the last step's block is not needed
        basis = jnp.where(
            j + 1 < s, jax.lax.dynamic_update_slice_in_dim(basis, nxt, start, axis=0), basis
        )
        return basis, AV

    return jax.lax.fori_loop(0, s, step, (basis, AV))


def eigenvalues(
    matvec: Callable[[Any], Any],
    key: Any,
    /,
    *,
    like: Any,
    k: int,
    which: str = "largest",
    num_iters: int | None = None,
    batch_size: int | None = None,
    block_size: int = 1,
) -> Eigenvalues:
    """The ``k`` extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalization.

    ``q = num_iters`` Lanczos steps (default ``min(n, max(2k + 20, 3k))``) from a random start build an
    orthonormal Krylov basis ``V`` (each new vector re-orthogonalized against all previous ones, twice)
    and the tridiagonal ``T = VᵀAV``; the Ritz values (eigenvalues of ``T``) converge first at the ends
    of the spectrum. ``which``: ``"largest"`` / ``"smallest"`` (algebraic) or ``"magnitude"``.
    Returns Ritz vectors as a pytree with a leading axis ``k`` and the residual norms
    ``‖A u − θ u‖ = |β_q s_q|``. Cost: ``q`` matvecs and ``O(q n)`` memory.

    Limits of single-vector Lanczos: (1) *multiplicities*: in exact arithmetic a Krylov space holds
    one direction of each eigenspace, so a repeated eigenvalue is found once (its copies appear only
    through rounding, or once the basis spans everything, ``num_iters = n``); the k values returned
    are then the k largest *distinct* ones, and a small residual says only that ``θ`` is near *some*
    eigenvalue, not that it is the k-th. Where multiplicities matter (a network's Hessian can have
    many), use ``block_size`` (below), ``num_iters = n`` at small ``n`` or the dense :func:`hessian`.
    (2) *Symmetry* is assumed and not checked (a check costs extra products): a non-symmetric
    operator gives meaningless values; :func:`trace` with the X-methods does check.

    ``block_size = b > 1``: block Lanczos, ``⌈q/b⌉`` steps of ``b`` products from ``b`` random start
    vectors (the same matvec budget, up to rounding ``q`` up to a multiple of ``b``, at most ``n``).
    A block Krylov space holds up to ``b`` directions of each eigenspace, so an eigenvalue of
    multiplicity up to ``b`` is found that many times; the Ritz pairs come from the Rayleigh quotient
    ``H = VᵀAV`` of the stored basis and its images (memory ``2qn``; the residuals are then computed
    exactly, ``‖AVs − θVs‖``). The ``b`` products of a step go through ``batch_size`` chunks as in
    :func:`trace`. Per product, a block converges more slowly than single-vector Lanczos on a
    spectrum without multiplicities (its Krylov degree is ``q/b``), so use the smallest ``b`` that
    covers the multiplicities expected.

    >>> import jax, jax.numpy as jnp
    >>> A = jnp.diag(jnp.arange(1.0, 51.0))
    >>> top3 = jax.jit(lambda key, A: eigenvalues(lambda v: A @ v, key, like=jnp.zeros(50), k=3,
    ...                                           num_iters=50))
    >>> ev = top3(jax.random.key(0), A)
    >>> [round(float(t), 8) for t in ev.values]
    [50.0, 49.0, 48.0]

    An eigenvalue of multiplicity 3 (10, 10, 10, 8, then 46 values in [0, 4]): single-vector
    Lanczos sees it once, a block of 3 three times, for the same 21 products.

    >>> B = jnp.diag(jnp.concatenate([jnp.array([10.0, 10.0, 10.0, 8.0]), jnp.linspace(4.0, 0.0, 46)]))
    >>> top = lambda b: eigenvalues(lambda v: B @ v, jax.random.key(0), like=jnp.zeros(50), k=3,
    ...                             num_iters=21, block_size=b).values
    >>> [round(float(t), 3) for t in top(1)], [round(float(t), 3) for t in top(3)]
    ([10.0, 8.0, 4.0], [10.0, 10.0, 10.0])

    References: Lanczos (1950); Golub & Van Loan, *Matrix Computations* (4th ed.), §10.1 (and
    §10.3.6, block Lanczos); Parlett, *The Symmetric Eigenvalue Problem* (1998), ch. 13; Golub &
    Underwood (1977), "The block Lanczos method for computing eigenvalues".
    """
    k = check_positive_int("k", k)
    which = check_choice("which", which, ("largest", "smallest", "magnitude"))
    batch_size = _check_batch_size(batch_size)
    check_key(key, "eigenvalues")
    mv, n, dtype = _flat_operator(matvec, like)
    if k > n:
        raise OptionError(f"k: at most n = {n} eigenvalues exist, got k={k}. Use k ≤ {n}.")
    q = min(n, max(2 * k + 20, 3 * k)) if num_iters is None else num_iters
    q = check_positive_int("num_iters", q, minimum=k)
    q = min(q, n)
    b = check_positive_int("block_size", block_size)
    if b > n:
        raise OptionError(
            f"block_size: at most n = {n} start vectors, got {b}. Use block_size ≤ {n}."
        )
    k_start, k_lanczos = jax.random.split(key)
    unravel = ravel_pytree(_concrete_like(like))[1]
    if b > 1:
        return _block_eigenvalues(
            mv, k_start, k_lanczos, n, dtype, k, which, q, b, batch_size, unravel
        )
    v0 = jax.random.normal(k_start, (1, n), dtype)
    alpha, beta, basis = _lanczos(
        lambda V: _apply(mv, V, batch_size=batch_size, mesh=None), v0, q, k_lanczos
    )
    theta, S = jnp.linalg.eigh(_tridiag(alpha[0], beta[0]))
    idx = _ritz_order(theta, which)[:k]
    vecs = (S[:, idx].T @ basis[0]).astype(dtype)  # (k, n)
    resid = jnp.abs(beta[0, q - 1] * S[q - 1, idx])
    resid = jnp.where(q == n, 0.0, resid)
    return Eigenvalues(theta[idx], jax.vmap(unravel)(vecs), resid, jnp.asarray(q))


def _ritz_order(theta: jax.Array, which: str) -> jax.Array:
    if which == "largest":
        return jnp.argsort(-theta)
    if which == "smallest":
        return jnp.argsort(theta)
    return jnp.argsort(-jnp.abs(theta))


def _block_eigenvalues(mv, k_start, k_lanczos, n, dtype, k, which, q, b, batch_size, unravel):
    """:func:`eigenvalues` with ``block_size = b > 1`` (see there)."""
    s = max(-(-q // b), -(-k // b))  # blocks: the budget rounded up, at least k Ritz values
    s = min(s, n // b)  # the basis cannot exceed n rows
    if s * b < k:
        raise OptionError(
            f"block_size: {b} start vectors fit only {n // b} whole blocks ({(n // b) * b} Ritz "
            f"values) in n = {n}, fewer than k={k}. Use a block_size that divides n, or block_size=1."
        )
    V0 = jax.random.normal(k_start, (b, n), dtype)
    basis, AV = _block_lanczos(
        lambda V: _apply(mv, V, batch_size=batch_size, mesh=None), V0, s, k_lanczos
    )
    H = basis @ AV.T
    theta, S = jnp.linalg.eigh((H + H.T) / 2)
    idx = _ritz_order(theta, which)[:k]
    Sk = S[:, idx]  # (s b, k)
    vecs = Sk.T @ basis  # (k, n)
    resid = jnp.linalg.norm(Sk.T @ AV - theta[idx][:, None] * vecs, axis=1)
    return Eigenvalues(theta[idx], jax.vmap(unravel)(vecs.astype(dtype)), resid, jnp.asarray(s * b))


def spectral_density(
    matvec: Callable[[Any], Any],
    key: Any,
    /,
    *,
    like: Any,
    num_probes: int = 10,
    num_iters: int = 30,
    num_points: int = 512,
    sigma: float | None = None,
    grid: Any = None,
    batch_size: int | None = None,
) -> SpectralDensity:
    """The spectral density ``(1/n) Σ_j δ(t − λ_j)`` of a symmetric operator, by stochastic Lanczos quadrature.

    For each of ``num_probes`` Rademacher probes ``z`` (normalized), ``q = num_iters`` Lanczos steps give
    ``T = S Θ Sᵀ``; the Gauss quadrature nodes ``θ_j`` with weights ``w_j = S_{0j}²`` satisfy
    ``Σ_j w_j θ_j^p = zᵀA^p z/‖z‖²`` exactly for ``p ≤ 2q − 1``, whose mean over probes is an unbiased
    estimate of ``tr(A^p)/n``. The density is the average of Gaussians of width ``sigma`` (default
    ``max((θ_max − θ_min)/100, √ε·max(|θ_max|, 1))``: the floor keeps a one-point spectrum finite)
    centred on the nodes with those weights, evaluated on ``grid`` (default ``num_points`` points
    from ``θ_min − 5σ`` to ``θ_max + 5σ``), so it integrates to 1 and its mean is the quadrature's
    first moment — up to the trapezoid rule's error on the grid: the default 512 points resolve
    ``σ``; a grid coarser than ``σ`` (a few points, or a width of your own far below the spacing)
    does not integrate to 1. Cost: ``num_probes · num_iters`` matvecs (the probes go through the
    operator together as one block; ``batch_size`` chunks it; there is no ``mesh=``: the Lanczos
    recurrences are sequential). The operator must be symmetric; it is not checked (see
    :func:`eigenvalues`).

    >>> import jax, jax.numpy as jnp
    >>> A = jnp.diag(jnp.linspace(1.0, 2.0, 40))
    >>> sd = spectral_density(lambda v: A @ v, jax.random.key(0), like=jnp.zeros(40), num_iters=10)
    >>> round(float(jnp.trapezoid(sd.density, sd.grid)), 6)
    1.0

    References: Golub & Meurant (2010); Ubaru, Chen & Saad (2017), SIAM J. Matrix Anal. Appl. 38(4);
    Lin, Saad & Yang (2016), Approximating spectral densities of large matrices, SIAM Rev. 58(1);
    Ghorbani, Krishnan & Xiao (2019), ICML.
    """
    p = check_positive_int("num_probes", num_probes)
    q = check_positive_int("num_iters", num_iters)
    num_points = check_positive_int("num_points", num_points, minimum=2)
    if grid is not None and (jnp.ndim(grid) != 1 or jnp.size(grid) < 1):
        raise ShapeError(
            f"grid: expected a 1-D array of evaluation points, got shape {jnp.shape(grid)}. "
            "Pass e.g. grid=jnp.linspace(lo, hi, 512), or leave it None."
        )
    batch_size = _check_batch_size(batch_size)
    check_key(key, "spectral_density")
    mv, n, dtype = _flat_operator(matvec, like)
    q = min(q, n)
    k_probe, k_lanczos = jax.random.split(key)
    Z = jax.random.rademacher(k_probe, (p, n), dtype)
    alpha, beta, _ = _lanczos(
        lambda V: _apply(mv, V, batch_size=batch_size, mesh=None), Z, q, k_lanczos
    )
    # one small eigh per probe, sequentially (never a batched LAPACK call across probes on CPU)
    theta, S = jax.lax.map(lambda ab: jnp.linalg.eigh(_tridiag(*ab)), (alpha, beta))
    weights = S[:, 0, :] ** 2
    lo, hi = jnp.min(theta), jnp.max(theta)
    if sigma is None:
        width = jnp.maximum(
            (hi - lo) / 100, jnp.finfo(dtype).eps ** 0.5 * jnp.maximum(jnp.abs(hi), 1)
        )
    else:
        width = jnp.asarray(check_positive("sigma", sigma), dtype)
    if grid is None:
        grid = jnp.linspace(lo - 5 * width, hi + 5 * width, num_points, dtype=dtype)
    else:
        grid = jnp.asarray(grid, dtype)
    u = (grid[:, None, None] - theta[None]) / width
    kernel = jnp.exp(-0.5 * u * u) / (width * math.sqrt(2 * math.pi))
    density = jnp.sum(kernel * weights[None], axis=(1, 2)) / p
    return SpectralDensity(grid, density, theta, weights, jnp.asarray(p * q))
