"""Ctrl-C that lands where Python cannot raise it.

A ``KeyboardInterrupt`` raised inside a finalizer or a garbage-collector callback (JAX registers one)
cannot propagate: Python hands it to ``sys.unraisablehook``, whose default prints "Exception ignored
in ..." with a traceback, and the program carries on as if nothing had been pressed.
:func:`redeliver_interrupts` raises it again in the main thread instead.
"""

from __future__ import annotations

import _thread
import contextlib
import sys
from collections.abc import Iterator
from typing import Any


def redeliver(unraisable: Any) -> None:
    """``sys.unraisablehook``: a ``KeyboardInterrupt`` is raised again in the main thread (at its next
    bytecode); anything else goes to Python's default hook."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _thread.interrupt_main()
        return
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def redeliver_interrupts() -> Iterator[None]:
    """Install :func:`redeliver` as ``sys.unraisablehook`` for the ``with`` block, then restore the
    previous hook.

    >>> import sys
    >>> with redeliver_interrupts():
    ...     sys.unraisablehook is redeliver
    True
    >>> sys.unraisablehook is redeliver
    False
    """
    previous, sys.unraisablehook = sys.unraisablehook, redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous
