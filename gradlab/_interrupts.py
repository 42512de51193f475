"""Ctrl-C that lands where Python cannot raise it.

A ``KeyboardInterrupt`` raised inside a finalizer or a garbage-collector callback (JAX registers one)
cannot propagate: Python hands it to ``sys.unraisablehook``, whose default prints "Exception ignored
in ..." with a traceback, and the program carries on as if nothing had been pressed.
:func:`redeliver_interrupts` raises it again in the main thread instead.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any


def redeliver(unraisable: Any, previous: Any = None) -> None:
    """``sys.unraisablehook``: a ``KeyboardInterrupt`` is raised again in the main thread (at its next
    bytecode); anything else goes to ``previous`` (the hook installed before, Python's default if
    ``None``)."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _thread.interrupt_main()
        return
    (previous or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def redeliver_interrupts() -> Iterator[None]:
    """Install :func:`redeliver` as ``sys.unraisablehook`` for the ``with`` block (other unraisable
    exceptions still reach the hook installed before), then restore that hook.

    >>> import sys
    >>> before = sys.unraisablehook
    >>> with redeliver_interrupts():
    ...     sys.unraisablehook is before
    False
    >>> sys.unraisablehook is before
    True
    """
    previous = sys.unraisablehook
    sys.unraisablehook = functools.partial(redeliver, previous=previous)
    try:
        yield
    finally:
        sys.unraisablehook = previous
