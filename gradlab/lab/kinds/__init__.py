"""The experiment kinds: one module each, one registry entry each.

A kind module defines:

- ``NAME`` and ``SUMMARY`` (one line for ``gradlab list``);
- ``Section``: the pydantic model of its config section (``[descent]``, ``[gradcheck]`` ...);
- ``check(section, experiment, raw) -> list[str]``: semantic checks that need the registries (unknown
  problem names, options a problem does not take ...), as ``path: message`` lines;
- ``expand(resolved) -> list[dict]``: the run specs (JSON-able; a run's id hashes its spec);
- ``execute(spec) -> dict``: one run → ``{"status", "summary", "points", "timing"}`` (pure of the file
  system: the runner writes the result);
- ``report(frame, resolved) -> list[Block]``: the report's sections (tables, figures, text) from the tidy
  rows of every run.

Adding a kind is adding one module and one line to ``_MODULES``.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from gradlab._validate import check_choice

__all__ = ["Resolved", "get", "names"]

_MODULES = {
    "admodes": "gradlab.lab.kinds.admodes",
    "curvature": "gradlab.lab.kinds.curvature",
    "descent": "gradlab.lab.kinds.descent",
    "gradcheck": "gradlab.lab.kinds.gradcheck",
    "remat": "gradlab.lab.kinds.remat",
}


def names() -> list[str]:
    """The registered experiment kinds.

    >>> names()
    ['admodes', 'curvature', 'descent', 'gradcheck', 'remat']
    """
    return sorted(_MODULES)


def get(name: str) -> ModuleType:
    """The module of kind ``name`` (raises :class:`~gradlab._validate.UnknownNameError`).

    >>> get("descent").NAME
    'descent'
    >>> get("decsent")
    Traceback (most recent call last):
    ...
    gradlab._validate.UnknownNameError: kind: unknown name 'decsent'; expected one of [...]. Did you mean 'descent'?
    """
    check_choice("kind", name, _MODULES)
    module = importlib.import_module(_MODULES[name])
    return module


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A validated config: the top-level keys, the kind's section, the kind module, the file."""

    experiment: Any
    section: Any
    kind: ModuleType
    source: str | None = None
    checked: bool = True  # whether the kind's deep instance checks ran

    @property
    def name(self) -> str:
        return self.experiment.name

    def to_json(self) -> dict[str, Any]:
        """The config with every default filled in (written back into the report as config.json)."""
        return {
            **self.experiment.model_dump(mode="json"),
            self.kind.NAME: self.section.model_dump(mode="json"),
        }

    def specs(self) -> list[dict[str, Any]]:
        """The run specs of the sweep (see the kind's ``expand``), each once: a value repeated in an
        axis (``dim = [5, 5]``) is one run."""
        from gradlab.lab.kinds._common import canonical

        unique = {canonical(s): s for s in reversed(self.kind.expand(self))}
        return list(reversed(unique.values()))
