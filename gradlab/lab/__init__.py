"""The experiment lab: a TOML config → a sweep of runs → a report folder.

>>> from gradlab import lab
>>> cfg = lab.parse({"kind": "descent", "descent": {
...     "problem": [{"name": "quadratic", "dim": [4, 8]}],
...     "strategy": [{"name": "exact"}, {"name": "two_point", "num_directions": [1, 4]}]}})
>>> len(cfg.specs())  # 2 problems × (1 exact + 2 two_point): the num_directions list multiplies two_point only
6
>>> lab.kinds.names()
['admodes', 'curvature', 'descent', 'gradcheck', 'remat']

Modules: :mod:`gradlab.lab.config` (pydantic models, TOML loading, field-path errors),
:mod:`gradlab.lab.kinds` (one module per experiment kind), :mod:`gradlab.lab.runner` (content-addressed,
resumable, parallel runs), :mod:`gradlab.lab.report` (tidy results, Markdown, offline HTML, figures).

Reference: the design follows benchopt (Moreau et al. 2022, "Benchopt: reproducible, efficient and
collaborative optimization benchmarks"), fixing what its users hit: the cache keys the whole source,
compile time is kept apart from run time, JAX and devices are recorded, the HTML works offline.
"""

from __future__ import annotations

from gradlab.lab import kinds
from gradlab.lab.config import ConfigError, load, parse
from gradlab.lab.runner import Sweep, environment, rerender, run, run_id, source_fingerprint

__all__ = [
    "ConfigError",
    "Sweep",
    "environment",
    "kinds",
    "load",
    "parse",
    "rerender",
    "run",
    "run_id",
    "source_fingerprint",
]
