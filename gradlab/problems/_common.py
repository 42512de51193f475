"""Helpers shared by the catalog modules: dtypes and random instances (no registry here)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradlab._validate import OptionError


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """``None`` → JAX's default float (float64 under x64); otherwise a real floating dtype.

    Asking for float64 while x64 is off is an error rather than a silent float32.
    """
    if dtype is None:
        return jnp.zeros(()).dtype
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise OptionError(
            f"dtype: expected a float dtype such as 'float32' or 'float64', got {dtype!r}."
        ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise OptionError(f"dtype: expected a real floating dtype, got {dt}.")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise OptionError(
            "dtype: float64 was asked for but JAX runs in 32-bit mode. "
            "Call jax.config.update('jax_enable_x64', True) first, or use dtype='float32'."
        )
    return dt


def random_spd(key: Any, n: int, *, cond: float = 10.0, dtype: Any = None) -> jax.Array:
    """A random symmetric positive definite ``n × n`` matrix with eigenvalues log-spaced in [1, cond]."""
    dt = resolve_dtype(dtype)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n), dt))
    eig = jnp.logspace(0.0, jnp.log10(cond), n, dtype=dt) if n > 1 else jnp.ones((1,), dt)
    a = (q * eig[None, :]) @ q.T
    return (a + a.T) / 2
