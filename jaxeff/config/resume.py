"""Which settings may change when a run is resumed from its checkpoints.

Orbax reshards on restore and the data order does not depend on the mesh or the process count, so
how a run is executed (mesh, microbatches, remat, compute dtype, kernel implementation and block
size, cadences, logging, the optimiser's schedule) may change. What defines the model's parameters,
the data order or the random streams (model shapes and structure, vocabulary, global batch, data,
seeds) may not: a workdir saved with other values belongs to another run.

A field may change when its annotation carries `MAY_CHANGE` or its section sets
`may_change_on_resume`; docs/config.md shows the same marks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel

from jaxeff.config.base import ConfigError, MayChangeOnResume, Section
from jaxeff.config.sections import Config


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.key} {self.saved!r} -> {self.now!r}"


def may_change_on_resume(section: type[Section], field: str) -> bool:
    if section.may_change_on_resume:
        return True
    return any(isinstance(m, MayChangeOnResume) for m in section.model_fields[field].metadata)


def _changes(saved: BaseModel, now: BaseModel, prefix: str = "") -> list[tuple[Change, bool]]:
    """(change, may it change?) for every leaf setting that differs, in field order."""
    out = []
    for name in type(now).model_fields:
        a, b, key = getattr(saved, name), getattr(now, name), f"{prefix}{name}"
        if isinstance(b, BaseModel):
            out += _changes(a, b, f"{key}.")
        elif a != b:
            out.append((Change(key, a, b), may_change_on_resume(type(now), name)))
    return out


def _structural_changes(saved: Config, now: Config) -> list[Change]:
    """Changes to a field that may change in general but, here, would change the optimizer state's layout."""
    if (saved.train.grad_clip > 0) != (now.train.grad_clip > 0):  # clipping adds a stage to the optax chain
        return [Change("train.grad_clip", saved.train.grad_clip, now.train.grad_clip)]
    return []


def check_resume(saved: Config, now: Config, workdir) -> list[Change]:
    """The allowed changes between the saved config and this one; ConfigError naming any other."""
    changes = _changes(saved, now)
    refused = [c for c, allowed in changes if not allowed] + _structural_changes(saved, now)
    if refused:
        detail = ", ".join(f"{c.key}: {c.saved!r} -> {c.now!r}" for c in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(f"the workdir {workdir} holds checkpoints of a different run ({detail}{more}); these "
                          "settings define the model, its data or its seeds: use a new --workdir, or the saved values "
                          f"(in {workdir}/config.yaml) to resume")
    return [c for c, _ in changes]
