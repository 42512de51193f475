"""Threefry keys drawn through an unrolled hash: the same bits as ``jax.random``, without the rolled loop.

JAX 0.10 lowers the Threefry-2x32 hash of its default key on CPU as a *rolled* ``fori_loop`` of five
iterations (``jax/_src/random/threefry2x32.py``; JAX 0.11.2's CPU lowering still uses the rolled loop).
On XLA's CPU thunk runtime every loop iteration pays a fixed cost and the loop blocks fusion, so a draw
costs microseconds however few numbers it makes — ten times an exact gradient step of a small problem,
and the larger part of a zero-order step (``benchmarks/prng_cost.py``).

This module defines a PRNG implementation (``jax.extend.random.define_prng_impl``) whose ``fold_in``,
``split`` and ``random_bits`` compute Threefry-2x32 (Salmon et al. 2011, 20 rounds) with the key
schedule and counter layout of JAX's partitionable Threefry, written as plain elementwise ``uint32``
arithmetic that XLA fuses into one kernel. It gives *bit-identical* results to the default key
(``tests/test_prng.py`` checks fold_in, split, bits of every width, normal, uniform, Rademacher and
permutation). gradlab applies it inside its samplers and the descent loop only:

- :func:`unrolled` re-wraps a Threefry key's data under this implementation (free: no computation);
  any other key (``rbg``, a custom implementation, or Threefry with ``jax_threefry_partitionable``
  switched off) is returned unchanged, so results never depend on this module.
- :func:`fold_in` is ``jax.random.fold_in`` with the same bits and the same kind of key out (typed or raw).

Arrays of ``2³²`` or more numbers go through JAX's own Threefry (the counter layout needs 64-bit counts).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import define_prng_impl

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_BUILTIN = "threefry2x32"


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def _hash(
    k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds: key words ``(k1, k2)``, counter words ``(x1, x2)`` (uint32, any
    broadcastable shapes); 5 groups of 4 rounds, a key injection after each."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotl(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _counts(shape: tuple[int, ...]) -> jax.Array:
    """The low words of the row-major index of every entry (the high words are 0 below 2³²)."""
    return lax.iota(np.uint32, math.prod(shape)).reshape(shape)


def _too_big(shape: tuple[int, ...]) -> bool:
    return math.prod(shape) >= 2**32


def _builtin(key: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key, impl=_BUILTIN)


def _seed(seed: jax.Array) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed, impl=_BUILTIN))


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if _too_big(shape):
        return jax.random.key_data(jax.random.split(_builtin(key), shape))
    c = _counts(shape)
    b1, b2 = _hash(key[0], key[1], jnp.zeros_like(c), c)
    return jnp.stack([b1, b2], axis=b1.ndim)


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    b1, b2 = _hash(key[0], key[1], jnp.zeros((), np.uint32), jnp.asarray(data, np.uint32))
    return jnp.stack([b1, b2])


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[bit_width]
    if _too_big(shape):
        return jax.random.bits(_builtin(key), shape, dtype)
    c = _counts(shape)
    b1, b2 = _hash(key[0], key[1], jnp.zeros_like(c), c)
    if bit_width == 64:
        return lax.shift_left(b1.astype(dtype), dtype(32)) | b2.astype(dtype)
    return (b1 ^ b2).astype(dtype)


UNROLLED = define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="threefry2x32_unrolled",
    tag="fru",
)


_ENABLED = True


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Trace with JAX's own (rolled) Threefry inside the block: for the tests and the benchmark that
    compare both (results are the same bit for bit; only speed differs). Not thread-safe."""
    global _ENABLED
    saved, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = saved


def _is_threefry(key: Any) -> bool:
    if not _ENABLED or not jax.config.jax_threefry_partitionable:
        return False
    try:
        return jax.random.key_impl(key) == _BUILTIN
    except (TypeError, ValueError):
        return False


def unrolled(key: Any) -> Any:
    """``key`` under the unrolled Threefry implementation (same data, same bits), or ``key`` unchanged
    when it is not a partitionable Threefry key. Typed or raw ``uint32[..., 2]`` keys."""
    if not _is_threefry(key):
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=UNROLLED)


def fold_in(key: Any, data: Any) -> Any:
    """``jax.random.fold_in(key, data)``: the same key bits, and the same kind of key (typed or raw),
    computed with the unrolled hash for Threefry keys."""
    if not _is_threefry(key):
        return jax.random.fold_in(key, data)
    out = jax.random.key_data(jax.random.fold_in(unrolled(key), data))
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(out, impl=_BUILTIN)
    return out
