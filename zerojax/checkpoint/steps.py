"""Which numbered folders of a checkpoint folder are steps, and the metrics of a step that may rank it.

A numbered folder is a step when it holds something a save writes at its top (the manifest, orbax's
step metadata, the `state` or `meta` item); anything else (an empty folder, an export, the remains of a
deleted step without those) is not a step: orbax neither lists, restores, ranks nor rotates it. A step
is then trusted only when its manifest verifies (`CheckpointManager.verify`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator

from orbax.checkpoint import path as ocp_path

from zerojax.checkpoint import integrity

STEP_ENTRIES = (integrity.INTEGRITY, "_CHECKPOINT_METADATA", "state", "meta")
METRICS = "metrics/metrics"


def is_step(folder: str | os.PathLike) -> bool:
    """Whether the folder holds any of the entries a save writes at its top (`STEP_ENTRIES`)."""
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, e)) for e in STEP_ENTRIES)


def numbered_folders(directory: str) -> list[int]:
    """The step numbers that name folders in `directory` (as orbax writes them: no leading zeros)."""
    if not os.path.isdir(directory):
        return []
    return [int(n) for n in os.listdir(directory)
            if n.isdigit() and n == str(int(n)) and os.path.isdir(os.path.join(directory, n))]


@dataclasses.dataclass(frozen=True)
class StepsOnly:
    """Orbax's standard step naming, listing and finding only the numbered folders that are steps."""

    base: ocp_path.step.NameFormat = dataclasses.field(default_factory=ocp_path.step.standard_name_format)

    def build_name(self, step: int) -> str:
        return self.base.build_name(step)

    def find_all(self, base_path) -> Iterator:
        return (m for m in self.base.find_all(base_path) if is_step(m.path))

    def find_step(self, base_path, step: int):
        found = self.base.find_step(base_path, step)
        if not is_step(found.path):
            raise ValueError(f"{found.path} holds no checkpoint step.")
        return found


class CheckedMetrics:
    """The metrics a step was saved with, used only when its manifest lists the metrics file with the
    size and SHA-256 it has; a step whose metrics fail that check ranks as a step without metrics, with
    one warning per step."""

    def __init__(self, directory: str):
        self.directory = directory
        self._warned: set[int] = set()

    def __call__(self, step: int) -> dict | None:
        """The step's metrics, or None when it has none or they fail their check."""
        folder = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(folder, METRICS)):
            return None
        try:
            entry = integrity.read_manifest(folder).get(METRICS)
        except ValueError as e:
            what = f"cannot be checked: its {integrity.INTEGRITY} {e}"
        else:
            what = "is not in its manifest" if entry is None else integrity.file_damage(folder, METRICS, *entry)
        if what is None:
            with open(os.path.join(folder, METRICS), "rb") as f:
                return json.load(f)
        if step not in self._warned:
            self._warned.add(step)
            warnings.warn(f"checkpoint step {step} in {self.directory}: its metrics file {METRICS} {what}; the step "
                          "is left out of the ranking by metric_for_best_model (restore it by number, or restore "
                          "another step).", stacklevel=2)
        return None

