"""Small pytree helpers (floor 1: no gradlab imports).

gradlab is pytree-generic by ravelling at the boundary with :func:`jax.flatten_util.ravel_pytree`; these
helpers are the few named operations that the rest of the package shares.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

__all__ = ["leaf_paths", "ravel", "relative_error", "tree_dot", "tree_norm", "tree_random_normal"]


def ravel(tree: Any):
    """Flatten a pytree into one vector; return ``(vector, unravel)``.

    >>> v, unravel = ravel({"a": jnp.ones(2), "b": jnp.zeros((1, 2))})
    >>> v.shape
    (4,)
    >>> unravel(v)["b"].shape
    (1, 2)
    """
    return ravel_pytree(tree)


def tree_dot(a: Any, b: Any) -> jax.Array:
    """Euclidean inner product ⟨a, b⟩ = Σ_leaves Σ_i a_i b_i of two pytrees with one structure."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves, start=jnp.zeros((), dtype=jnp.result_type(*leaves) if leaves else float))


def tree_norm(a: Any) -> jax.Array:
    """Euclidean norm ‖a‖₂ of a pytree (all leaves stacked into one vector)."""
    return jnp.sqrt(jnp.real(tree_dot(a, a)))


def relative_error(estimate: Any, reference: Any) -> jax.Array:
    """‖estimate − reference‖ / max(‖reference‖, tiny) over whole pytrees.

    >>> float(relative_error(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0])))
    0.0
    """
    diff = jax.tree.map(lambda x, y: x - y, estimate, reference)
    den = tree_norm(reference)
    tiny = jnp.finfo(den.dtype).tiny
    return tree_norm(diff) / jnp.maximum(den, tiny)


def tree_random_normal(key: jax.Array, like: Any) -> Any:
    """A standard-normal pytree with the structure, shapes and dtypes of ``like``."""
    flat, unravel = ravel_pytree(like)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def leaf_paths(tree: Any) -> list[str]:
    """Readable names of the leaves of ``tree`` (``"['A']"``, ``"[0]"``, or ``""`` for a bare array)."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
