"""Checkpoints of a ZeRO run on orbax: sharded, asynchronous, atomic, restored onto any plan.

Modules: `manager` (`CheckpointManager`), `options` (what to keep), `integrity` (checksum manifests),
`steps` (which numbered folders are steps; checked metrics), `lock` (one writer per folder), `errors`,
`lazy` (`LazyTensor`), `export` (Hugging Face folders from a step or the live state).

A checkpoint step is a folder `DIR/<step>` with two orbax items:

- `state`: the `TrainState` as a dict `{step, params, master, opt_state, loss_scale, skipped, skips_in_a_row}` (absent
  entries omitted) saved shard by shard from every process; with `save_only_model` only `params`.
- `meta`: JSON — RNG key, data position, the resolved config, the model's Hugging Face config (so an
  export needs nothing but the folder), the metrics of the step and what was saved.

Orbax writes each step into a temporary folder and renames it when every item is complete, so a crash
mid-save leaves the previous steps intact and `latest_step` is always a complete checkpoint (leftover
temporary folders are deleted when a writable manager opens the folder).

Integrity: orbax/tensorstore checksum their index (OCDBT b-tree nodes carry CRC-32C) and JSON files fail
to parse when damaged, but the array data itself has no checksum, so a flipped byte in a tensor restores
silently. Every step therefore holds `integrity.json`, the SHA-256 and size of each of its files, written
by the primary process inside the temporary folder after all processes finished writing and before the
rename (orbax's post-finalization hook), so the manifest is committed atomically with the step. Every
restore verifies it first (once per manager and step) and raises `CorruptCheckpointError` naming the step
and the file; `restore_latest_good` falls back to the newest step that verifies. A step verifies only
with a well-formed manifest that lists every file it holds (its metrics included); a missing, partial or
malformed manifest is corruption. Steps are ranked for `best` by metrics that match their manifest only
(a step whose metrics fail is left out, with a warning), so one damaged step never blocks the others.
A numbered folder holding nothing a save writes (an empty folder, an export) is not a step: ignored,
with one warning.

One writer per folder: a writable manager holds an exclusive lock on `DIR/.zerojax-writer.lock` (taken
by process 0, released by `close()` or by the OS when the writer dies); a second writer gets
`CheckpointLockedError` naming the holder's pid.

Restoring reads onto the shardings of a *target* (a `ZeroPlan`, or a `TrainState` of arrays or
`ShapeDtypeStruct`s): another device count, stage or mesh shape; each process reads only its shards.
Precision may change between save and restore. The weights come from the saved fp32 master when there
is one, else from the saved parameters; a target with a master gets them as its master and its compute
copy is cast from it (what every step does), a target without one gets them as its parameters. A
saved loss-scaler state is dropped when the target runs without loss scaling; a target with loss
scaling needs a checkpoint that has one (error otherwise).
"""

from zerojax.checkpoint.errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointWriteError,
    CorruptCheckpointError,
    file_write_errors,
)
from zerojax.checkpoint.export import export_checkpoint, save_model
from zerojax.checkpoint.integrity import INTEGRITY
from zerojax.checkpoint.lazy import LazyTensor
from zerojax.checkpoint.manager import CheckpointManager, Restored
from zerojax.checkpoint.options import CheckpointOptions

__all__ = [
    "INTEGRITY", "CheckpointError", "CheckpointLockedError", "CheckpointManager", "CheckpointOptions",
    "CheckpointWriteError",
    "CorruptCheckpointError", "LazyTensor", "Restored", "export_checkpoint", "file_write_errors", "save_model",
]
