"""gradlab: a JAX lab for matrix calculus and gradient strategies.

The package exposes module namespaces, one per concept::

    from gradlab import problems, checks, rules, grads, descent

- :mod:`gradlab.problems` — the matrix-calculus catalog (losses with hand-derived gradients and HVPs).
- :mod:`gradlab.checks` — the gradient checker (AD modes, finite differences, complex step, closed forms).
- :mod:`gradlab.rules` — custom_vjp rules from the lecture notes (solve, singular values, sigmoid, ...).
- :mod:`gradlab.pitfalls` — the classic matrix-calculus pitfalls, computed with the numbers JAX gives.
- :mod:`gradlab.samplers` — direction samplers (sphere, Gaussian, Rademacher, orthogonal frames, coordinates).
- :mod:`gradlab.grads` — gradient strategies: exact, forward mode, finite differences, zero-order 2-point,
  forward gradients; each returns the estimate with its cost.
- :mod:`gradlab.descent` — gradient descent with any strategy and any optax optimizer, compiled once.
- :mod:`gradlab.theory` — step sizes and rate curves to overlay on measurements.
- :mod:`gradlab.remat` — remat strategies for layer chains (per-layer, √L segments, recursive halving,
  Revolve-optimal binomial), the planner, and memory/FLOPs measurement that proves the recompute.
- :mod:`gradlab.admodes` — forward vs reverse mode: costs (time, HLO FLOPs) of jvp/vjp/grad/jacfwd/jacrev,
  the Jacobian crossover of f(x) = Ax, the cheap-gradient ratio, ``jacobian(f, x, mode="auto")``.
- :mod:`gradlab.curvature` — Hessian-vector products (three AD modes, a linearize-once operator), the dense
  Hessian; Hessian trace (Hutchinson, Hutch++, XTrace, XNysTrace, auto) with error bars, diagonal,
  Lanczos eigenvalues and the SLQ spectral density, chunked and sharded over devices.
- :mod:`gradlab.lab` — the experiment lab: TOML config → sweep of runs → report folder.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "problems",
    "checks",
    "rules",
    "pitfalls",
    "samplers",
    "grads",
    "descent",
    "theory",
    "remat",
    "admodes",
    "curvature",
    "lab",
    "cli",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"gradlab.{name}")
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
