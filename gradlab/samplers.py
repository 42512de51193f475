"""Random directions for zero-order and forward-gradient estimators (floor 2).

One signature, as in matfree's samplers: ``sampler(like, *, num) -> sample`` where ``sample(key)`` returns a
``(num, d)`` array of flat directions with the dtype of ``like`` (a pytree or an array; ``d`` is its total
size, the length of ``jax.flatten_util.ravel_pytree(like)[0]``). The returned :class:`Sampler` is a pure
callable and also draws single directions, ``sample.direction(key, i)`` (shape ``(d,)``), for the
memory-lean mode of :func:`gradlab.grads.two_point`.

Key scheme: for ``sphere``, ``gaussian`` and ``rademacher`` direction ``i`` is drawn from
``jax.random.fold_in(key, i)``, and ``sample(key)[i] == sample.direction(key, i)`` exactly, so a loop that
regenerates directions one at a time sees the same directions as one block. ``coordinate`` draws one random
permutation from ``key`` and takes its first ``num`` entries; ``orthogonal`` draws the whole frame at once
(its ``direction`` recomputes the frame: correct but not lean).

Second moments (``sample.second_moment`` is the ``m`` in ``E[v vᵀ] = m I`` for a single direction ``v``):

========== ======================================================= ==========================
name       direction                                               ``E[v vᵀ]``
========== ======================================================= ==========================
sphere     uniform on the unit sphere, ``v = z / ‖z‖``, z ~ N(0,I) ``I / d``
gaussian   ``v ~ N(0, I)``                                         ``I``
rademacher ``v ∈ {±1}^d`` uniform                                  ``I``
orthogonal a uniform random k-frame (``VVᵀ = I_k``), each row       ``I / d``; ``Σ_i v_i v_iᵀ``
           marginally uniform on the sphere                        has mean ``(k/d) I``
coordinate ``k`` distinct uniformly random coordinates ``e_j``     ``I / d``; likewise
========== ======================================================= ==========================

So for any of them ``(1/(k m)) Σ_i v_i v_iᵀ`` has mean ``I``: that is the scale that makes the zero-order
estimators in :mod:`gradlab.grads` unbiased (up to the smoothing bias).

>>> import jax, jax.numpy as jnp
>>> sample = orthogonal(jnp.zeros(6), num=3)
>>> V = sample(jax.random.key(0))
>>> V.shape, V.dtype
((3, 6), dtype('float64'))
>>> bool(jnp.allclose(V @ V.T, jnp.eye(3), atol=1e-12))
True
>>> s = sphere({"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}, num=4)
>>> bool(jnp.array_equal(s(jax.random.key(1))[2], s.direction(jax.random.key(1), 2)))
True

References: Nesterov & Spokoiny (2017), "Random gradient-free minimization of convex functions", FoCM
17:527–566; Duchi, Jordan, Wainwright & Wibisono (2015), "Optimal rates for zero-order convex optimization:
the power of two function evaluations", IEEE Trans. Inf. Theory 61(5); Malladi et al. (2023), "Fine-tuning
language models with just forward passes" (MeZO).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gradlab import _prng
from gradlab._validate import OptionError, ShapeError, check_choice, check_positive_int

__all__ = [
    "Sampler",
    "coordinate",
    "gaussian",
    "make",
    "names",
    "orthogonal",
    "rademacher",
    "sphere",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A direction sampler: ``sample(key) -> (num, d)`` flat directions; ``sample.direction(key, i) -> (d,)``.

    Attributes:
      name: the registry name (:func:`names`).
      num: number of directions per draw.
      dim: ``d``, the total size of the parameters.
      dtype: the floating dtype of the directions (that of the parameters).
      second_moment: ``m`` with ``E[v vᵀ] = m I`` for one direction.
      lean: whether ``direction`` costs O(d) memory (so a loop over it never holds the ``num × d`` block).
    """

    name: str
    num: int
    dim: int
    dtype: Any
    second_moment: float
    lean: bool
    _block: Callable[[Any], jax.Array]
    _single: Callable[[Any, Any], jax.Array]

    def __call__(self, key: Any, /) -> jax.Array:
        """The ``(num, d)`` block of directions for ``key``."""
        return self._block(_prng.unrolled(key))

    def direction(self, key: Any, i: Any, /) -> jax.Array:
        """Direction ``i`` (a ``(d,)`` array), equal to ``self(key)[i]``; ``i`` may be traced."""
        return self._single(_prng.unrolled(key), i)


def _flat_spec(like: Any) -> tuple[int, Any]:
    spec = jax.eval_shape(lambda t: ravel_pytree(t)[0], like)
    if not jnp.issubdtype(spec.dtype, jnp.floating):
        raise OptionError(
            f"like: expected floating-point parameters, got dtype {spec.dtype}. "
            "Cast the parameters to a float dtype, e.g. jnp.asarray(x, jnp.float64)."
        )
    if math.prod(spec.shape) == 0:
        raise ShapeError(
            "like: expected parameters with at least one entry, got a pytree of total size 0; "
            "directions in R^0 do not exist."
        )
    return int(math.prod(spec.shape)), spec.dtype


def _iid(
    name: str, draw: Callable[[Any, int, Any], jax.Array], second_moment: Callable[[int], float]
):
    def sampler(like: Any, /, *, num: int) -> Sampler:
        num = check_positive_int("num", num)
        d, dtype = _flat_spec(like)

        def single(key, i):
            return draw(jax.random.fold_in(key, i), d, dtype)

        def block(key):
            return jax.vmap(single, in_axes=(None, 0))(key, jnp.arange(num))

        return Sampler(name, num, d, dtype, second_moment(d), True, block, single)

    sampler.__name__ = sampler.__qualname__ = name
    return sampler


def _draw_sphere(key, d, dtype):
    z = jax.random.normal(key, (d,), dtype)
    return z / jnp.linalg.norm(z)


def _draw_gaussian(key, d, dtype):
    return jax.random.normal(key, (d,), dtype)


def _draw_rademacher(key, d, dtype):
    return jax.random.rademacher(key, (d,), dtype)


sphere = _iid("sphere", _draw_sphere, lambda d: 1.0 / d)
sphere.__doc__ = """Directions uniform on the unit sphere in R^d (``v = z/‖z‖``); ``E[v vᵀ] = I/d``.

    ``like``: pytree or array fixing ``d`` and the dtype; ``num``: directions per draw. Direction ``i`` comes
    from ``fold_in(key, i)``.

    >>> import jax, jax.numpy as jnp
    >>> V = sphere(jnp.zeros(5), num=3)(jax.random.key(0))
    >>> [round(float(n), 12) for n in jnp.linalg.norm(V, axis=1)]
    [1.0, 1.0, 1.0]

    Reference: Muller, A note on a method for generating points uniformly on n-dimensional spheres,
      *Comm. ACM* 2 (1959).
    """
gaussian = _iid("gaussian", _draw_gaussian, lambda d: 1.0)
gaussian.__doc__ = """Standard Gaussian directions ``v ~ N(0, I_d)``; ``E[v vᵀ] = I``, ``E‖v‖² = d``.

    Direction ``i`` comes from ``fold_in(key, i)``.

    >>> import jax, jax.numpy as jnp
    >>> gaussian(jnp.zeros(4, jnp.float32), num=2)(jax.random.key(0)).dtype
    dtype('float32')

    Reference: Nesterov & Spokoiny, *Found. Comput. Math.* 17 (2017) (Gaussian smoothing directions).
    """
rademacher = _iid("rademacher", _draw_rademacher, lambda d: 1.0)
rademacher.__doc__ = """Rademacher directions ``v ∈ {±1}^d`` (independent fair signs); ``E[v vᵀ] = I``.

    Direction ``i`` comes from ``fold_in(key, i)``.

    >>> import jax, jax.numpy as jnp
    >>> sorted(set(rademacher(jnp.zeros(8), num=4)(jax.random.key(0)).ravel().tolist()))
    [-1.0, 1.0]

    Reference: Hutchinson, *Comm. Stat. Simul. Comput.* 18 (1989); Avron & Toledo, *J. ACM* 58 (2011).
    """


# samplers whose ``num ≤ d`` directions are distinct members of one random basis (drawn without
# replacement): at most ``d`` of them, and a mean over them needs the finite-population correction
DISTINCT = frozenset({"orthogonal", "coordinate"})


def _check_at_most_d(name: str, num: int, d: int) -> None:
    if num > d:
        raise OptionError(
            f"num: the {name!r} sampler draws at most d = {d} distinct directions, got num={num}. "
            f"Use num ≤ {d}, or an iid sampler ('sphere', 'gaussian', 'rademacher')."
        )


def orthogonal(like: Any, /, *, num: int) -> Sampler:
    """``num ≤ d`` orthonormal directions: a uniformly random k-frame of R^d (rows of a ``(k, d)`` array).

    Built from the QR factorisation of a ``d × k`` Gaussian matrix, ``Z = QR``, with the signs of ``R``'s
    diagonal moved into ``Q`` so the frame is Haar-distributed: O(d k²) work, never a ``d × d`` QR. Each row
    is marginally uniform on the sphere (``E[v vᵀ] = I/d``) and ``E[Σ_i v_i v_iᵀ] = (k/d) I``.
    ``direction(key, i)`` recomputes the whole frame, so this sampler has no lean mode.

    >>> import jax, jax.numpy as jnp
    >>> V = orthogonal(jnp.zeros(1000), num=4)(jax.random.key(0))
    >>> bool(jnp.allclose(V @ V.T, jnp.eye(4), atol=1e-12))
    True

    Reference: Mezzadri, How to generate random matrices from the classical compact groups, *Notices
      AMS* 54 (2007) (QR of a Gaussian block with the sign fix).
    """
    num = check_positive_int("num", num)
    d, dtype = _flat_spec(like)
    _check_at_most_d("orthogonal", num, d)

    # QR has no half-precision kernels: bfloat16 / float16 frames are built in float32, then cast
    work = dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32

    def block(key):
        z = jax.random.normal(key, (d, num), work)
        q, r = jnp.linalg.qr(z, mode="reduced")
        signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(work)
        return (q * signs[None, :]).T.astype(dtype)

    def single(key, i):
        return block(key)[i]

    return Sampler("orthogonal", num, d, dtype, 1.0 / d, False, block, single)


def coordinate(like: Any, /, *, num: int) -> Sampler:
    """``num ≤ d`` distinct uniformly random coordinate directions ``e_j`` (one-hot rows).

    The coordinates are the first ``num`` entries of ``jax.random.permutation(key, d)``; ``E[v vᵀ] = I/d``
    and ``E[Σ_i v_i v_iᵀ] = (k/d) I``.

    >>> import jax, jax.numpy as jnp
    >>> V = coordinate(jnp.zeros(5), num=5)(jax.random.key(0))
    >>> bool(jnp.array_equal(V.sum(axis=0), jnp.ones(5)))
    True

    Reference: Nesterov, Efficiency of coordinate descent methods on huge-scale optimization problems,
      *SIAM J. Optim.* 22 (2012).
    """
    num = check_positive_int("num", num)
    d, dtype = _flat_spec(like)
    _check_at_most_d("coordinate", num, d)

    def indices(key):
        return jax.random.permutation(key, d)[:num]

    def block(key):
        return jax.nn.one_hot(indices(key), d, dtype=dtype)

    def single(key, i):
        return jax.nn.one_hot(indices(key)[i], d, dtype=dtype)

    return Sampler("coordinate", num, d, dtype, 1.0 / d, True, block, single)


_REGISTRY: dict[str, Callable[..., Sampler]] = {
    "sphere": sphere,
    "gaussian": gaussian,
    "rademacher": rademacher,
    "orthogonal": orthogonal,
    "coordinate": coordinate,
}


def names() -> list[str]:
    """The sampler names, sorted.

    >>> names()
    ['coordinate', 'gaussian', 'orthogonal', 'rademacher', 'sphere']

    Reference: the samplers' own docstrings.
    """
    return sorted(_REGISTRY)


def make(name: str, like: Any, /, *, num: int) -> Sampler:
    """The sampler ``name`` (one of :func:`names`) for parameters shaped like ``like``.

    >>> import jax.numpy as jnp
    >>> make("gaussian", jnp.zeros(3), num=2).second_moment
    1.0

    Reference: the samplers' own docstrings.
    """
    check_choice("name", name, _REGISTRY)
    return _REGISTRY[name](like, num=num)
