"""Where computations go, for the choices that depend on it (loop unrolling, batch widths, clocks).

``jax.default_backend()`` names the default *backend*; inside ``with jax.default_device(cpu)`` on a GPU
host the computations run on the CPU all the same. :func:`platform` answers for the device they go to.
"""

from __future__ import annotations

from typing import Any

import jax


def platform() -> str:
    """The platform of the default device (``jax.default_device``) if one is set, else the default
    backend's: ``"cpu"``, ``"gpu"``, ``"tpu"``, ...

    >>> import jax
    >>> with jax.default_device(jax.devices("cpu")[0]):
    ...     platform()
    'cpu'
    """
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    if isinstance(device, str):  # a platform name
        return jax.devices(device)[0].platform
    return device.platform


def trace_context() -> tuple[Any, ...]:
    """What a compiled executable depends on beyond its arguments' shapes: x64, the default matmul
    precision (TF32 or full float32 on a GPU) and the default device. Part of every executable-cache
    key, so that a run under ``jax.enable_x64``, ``jax.default_matmul_precision`` or
    ``jax.default_device`` compiles anew instead of reusing an executable built for another setting."""
    device = jax.config.jax_default_device
    return (
        bool(jax.config.jax_enable_x64),
        str(jax.config.jax_default_matmul_precision),
        None if device is None else str(device),
    )
