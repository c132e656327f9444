"""Checkpoints of a ZeRO run on orbax: sharded, asynchronous, atomic, restored onto any plan.

A checkpoint step is a folder `DIR/<step>` with two orbax items:

- `state`: the `TrainState` as a dict `{step, params, master, opt_state, loss_scale, skipped}` (absent
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
and the file; `restore_latest_good` falls back to the newest step that verifies.

Restoring reads onto the shardings of a *target* (a `ZeroPlan`, or a `TrainState` of arrays or
`ShapeDtypeStruct`s): another device count, stage or mesh shape; each process reads only its shards.
Precision may change between save and restore. The weights come from the saved fp32 master when there
is one, else from the saved parameters; a target with a master gets them as its master and its compute
copy is cast from it (what every step does), a target without one gets them as its parameters. A
saved loss-scaler state is dropped when the target runs without loss scaling; a target with loss
scaling needs a checkpoint that has one (error otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import glob
import hashlib
import json
import os
import re
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from zerojax import models
from zerojax.hf import export_hf
from zerojax.plan import TrainState, ZeroPlan
from zerojax.rules import path_key

STATE = "state"
META = "meta"
FORMAT = "zerojax-checkpoint/1"
INTEGRITY = "integrity.json"
INTEGRITY_FORMAT = "zerojax-integrity/1"
# Not in the manifest: the manifest itself, and the two files orbax writes at the commit, after the
# manifest: the step's metadata (handler names, metrics, commit time) and its commit marker.
UNCHECKED = (INTEGRITY, INTEGRITY + ".tmp", "_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointError(ValueError):
    """A checkpoint folder, step or content that does not fit the request."""


class CheckpointWriteError(CheckpointError):
    """A save that could not be written (disk full, read-only or missing folder); older steps are intact."""


class CorruptCheckpointError(CheckpointError):
    """A committed step whose files are damaged (checksum, size or format): `step` and `file` name it."""

    def __init__(self, message: str, step: int, file: str | None):
        super().__init__(message)
        self.step, self.file = step, file


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """What to keep and how to save, with Hugging Face `TrainingArguments` names and defaults.

    `save_total_limit`: keep at most this many steps (None: all); the best step is never deleted, and
    with a limit of 1 the latest is kept besides the best (Transformers' rule). `metric_for_best_model`
    names the metric that ranks steps (looked up as given, then with the `eval_` prefix); it defaults
    to `"loss"` when `load_best_model_at_end` is set. `greater_is_better` defaults to False for names
    ending in `loss`, else True. `save_only_model`: save the compute-dtype parameters only (no master,
    optimizer or scaler state: the step cannot be resumed). `async_save`: `save` returns once the
    arrays are copied off the training buffers; the files are written in a background thread.
    `verify_integrity`: check each step's file checksums before restoring it (reads the step's files
    once more; the manifest is written either way).
    """

    save_total_limit: int | None = None
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False
    save_only_model: bool = False
    async_save: bool = True
    verify_integrity: bool = True

    def __post_init__(self):
        limit = self.save_total_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(
                f"CheckpointOptions: save_total_limit={limit!r} must be a positive integer, or None to keep "
                "every checkpoint."
            )
        if self.save_only_model and self.load_best_model_at_end:
            raise ValueError(
                "CheckpointOptions: ZeRO checkpoints can't be used with `save_only_model` along with "
                "`load_best_model_at_end` (Transformers raises the same for DeepSpeed/FSDP); set "
                "save_only_model=False or load_best_model_at_end=False."
            )
        metric = self.metric_for_best_model
        if metric is None and self.load_best_model_at_end:
            object.__setattr__(self, "metric_for_best_model", metric := "loss")
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ValueError(
                f"CheckpointOptions: metric_for_best_model={metric!r} must be a metric name such as 'loss'."
            )
        if self.greater_is_better is None and metric is not None:
            object.__setattr__(self, "greater_is_better", not metric.endswith("loss"))

    def metric_value(self, metrics: dict) -> float:
        """The ranking metric from a step's `metrics` (`name`, else `eval_<name>`)."""
        name = self.metric_for_best_model
        for key in (name, f"eval_{name}"):
            if key in metrics:
                return float(metrics[key])
        raise KeyError(
            f"metric_for_best_model={name!r} is not in the metrics passed to save ({sorted(metrics)}); "
            f"pass metrics={{'{name}': value}} or change metric_for_best_model."
        )


@dataclasses.dataclass
class KeepBestAndLatest(ocm.PreservationPolicy):
    """Transformers' rotation: keep the best step and the newest ones, `limit` steps in all (the best
    plus the newest when `limit` is 1 and the best is not the newest); ties keep the earlier step."""

    limit: int | None
    rank: Callable[[dict], float] | None  # larger is better; None: no best tracking

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        order = list(range(len(checkpoints)))
        best = _best_index([c.metrics for c in checkpoints], self.rank)
        if best is not None and best < len(order) - 1:
            order.remove(best)
            order.insert(len(order) - 1, best)  # just before the newest: deleted last
        limit = self.limit if self.limit is not None else len(order)
        if best is not None and limit == 1 and best != len(checkpoints) - 1:
            limit = 2
        dropped = set(order[: max(0, len(order) - limit)])
        return [i not in dropped for i in range(len(checkpoints))]


def _ranking(options: CheckpointOptions) -> Callable[[dict], float] | None:
    """A step's metrics -> a number that is larger for a better step (None: no metric to rank by)."""
    if options.metric_for_best_model is None:
        return None
    sign = 1.0 if options.greater_is_better else -1.0
    return lambda metrics: sign * options.metric_value(metrics)


def _best_index(metrics: Sequence[dict | None], rank) -> int | None:
    best, best_value = None, None
    for i, m in enumerate(metrics):
        if rank is None or m is None:
            continue
        value = rank(m)
        if best_value is None or value > best_value:
            best, best_value = i, value
    return best


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored step: the state on the target's shardings and the run's metadata."""

    step: int
    state: TrainState
    rng: Any
    data_position: Any
    config: Any
    hf_config: dict | None
    metrics: dict | None


class CheckpointManager:
    """Saves and restores a ZeRO run's checkpoints under `directory` (see the module docstring).

    `read_only=True` opens an existing checkpoint folder (an error if it is missing or holds no
    complete step) and never writes or deletes anything.
    """

    def __init__(self, directory: str | os.PathLike, options: CheckpointOptions = CheckpointOptions(), *,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.options = options
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint folder {self.directory} does not exist; expected a folder "
                                  "written by zerojax.checkpoint.CheckpointManager.")
        self._rank = rank = _ranking(options)
        self._read_only = read_only
        self._saving: int | None = None  # the step being written (for the integrity hook)
        self._verified: set[int] = set()
        mngr_options = ocp.CheckpointManagerOptions(
            best_fn=rank,
            best_mode="max",
            preservation_policy=KeepBestAndLatest(options.save_total_limit, rank),
            # always the async checkpointer (its post-finalization hook writes the integrity manifest
            # before the commit rename); `async_save=False` waits in `save`.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_integrity),
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
        with _write_errors(self, None):
            self._mngr = ocp.CheckpointManager(
                self.directory,
                options=mngr_options,
                item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()},
            )
        if read_only and not self.all_steps():
            raise CheckpointError(f"checkpoint folder {self.directory} holds no complete checkpoint step; "
                                  "expected step folders written by zerojax.checkpoint.CheckpointManager.")

    # --- saving -------------------------------------------------------------------------------
    def save(self, state: TrainState, *, rng: Any = None, data_position: Any = None, config: Any = None,
             hf_config: dict | None = None, metrics: dict | None = None) -> bool:
        """Saves `state` as step `int(state.step)` (returns False, with a warning, if that step already
        exists: a step is never overwritten).

        `rng`: a JAX PRNG key (typed or raw uint32); `data_position`, `config`, `hf_config`: JSON-able
        values (a dataclass config is stored as its dict); `metrics`: the step's evaluation metrics,
        used to rank steps by `metric_for_best_model`. With `async_save` the call returns before the
        files are written; `wait()` blocks until they are.
        """
        step = int(state.step)
        if step in self.all_steps():
            warnings.warn(f"checkpoint step {step} already exists in {self.directory}; it was not overwritten "
                          "(resume from it, or use a new folder for a new run).", stacklevel=2)
            return False
        if metrics is not None and self._rank is not None:
            self.options.metric_value(metrics)  # fail now, not in the background thread
        if self.options.save_only_model:
            tree = {"params": state.params}
        else:
            tree = {k: v for k, v in state._asdict().items() if v is not None}
        meta = {
            "format": FORMAT,
            "save_only_model": self.options.save_only_model,
            "rng": _encode_rng(rng),
            "data_position": _jsonable("data_position", data_position),
            "config": _jsonable("config", config),
            "hf_config": _jsonable("hf_config", hf_config),
            "metrics": _jsonable("metrics", metrics),
            "metric_for_best_model": self.options.metric_for_best_model,
            "greater_is_better": self.options.greater_is_better,
        }
        self.wait()  # one save in flight at a time: the integrity hook knows its step
        self._saving = step
        with _write_errors(self, step):
            saved = self._mngr.save(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(tree, save_args=_save_args(tree, hf_config)),
                                           META: ocp.args.JsonSave(meta)}),
                metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
                force=True,
            )
        if not self.options.async_save:
            self.wait()
        return saved

    def _write_integrity(self) -> None:
        """Orbax's post-finalization hook (primary process, every process done, before the rename):
        writes the checksum manifest of the step being saved into its temporary folder."""
        pattern = os.path.join(self.directory, f"{self._saving}{ocp.path.atomicity_types.TMP_DIR_SUFFIX}*")
        folders = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not folders:
            raise CheckpointError(f"save of step {self._saving}: its temporary folder ({pattern}) is gone; "
                                  "is another process writing checkpoints into the same folder?")
        folder = folders[-1]
        manifest = {"format": INTEGRITY_FORMAT, "algorithm": "sha256", "files": _checksums(folder)}
        with open(os.path.join(folder, INTEGRITY + ".tmp"), "w") as f:
            json.dump(manifest, f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(folder, INTEGRITY + ".tmp"), os.path.join(folder, INTEGRITY))

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk (and old steps are rotated); raises
        `CheckpointWriteError` if it could not be written."""
        with _write_errors(self, self._saving):
            self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves (raising `CheckpointWriteError` if one failed) and releases the manager."""
        with _write_errors(self, self._saving):
            self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- steps --------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps on disk, oldest first (a save still being written is not listed)."""
        return sorted(ocp.step.checkpoint_steps(self.directory))

    def latest_step(self) -> int | None:
        """The newest committed step: always a complete checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step ranked best by `metric_for_best_model` (the options', else the one the steps were
        saved with); None without a metric or without steps saved with metrics."""
        steps = self.all_steps()
        rank = self._rank
        if rank is None and steps:  # opened without options: rank as the run that saved the steps did
            meta = self.metadata(steps[-1])
            if meta.get("metric_for_best_model") is not None:
                rank = _ranking(CheckpointOptions(metric_for_best_model=meta["metric_for_best_model"],
                                                  greater_is_better=meta["greater_is_better"]))
        if rank is None:
            return None
        best = _best_index([self._mngr.metrics(s) for s in steps], rank)
        return None if best is None else steps[best]

    def resolve_step(self, step: int | str | None = "latest") -> int:
        """`step` as an existing step number: an int, `'latest'` (or None) or `'best'`."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"checkpoint folder {self.directory} holds no complete checkpoint step; save one "
                                  "first, or start without resuming (resume_from_checkpoint=None).")
        if step is None or step == "latest":
            return steps[-1]
        if step == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(
                    f"step='best': no step in {self.directory} was saved with metrics ranked by a "
                    "metric_for_best_model; pass metrics to save "
                    "and metric_for_best_model to CheckpointOptions, or ask for 'latest' or a step number."
                )
            return best
        if isinstance(step, str) and step.isdigit():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int):
            raise CheckpointError(f"step={step!r} is not a step; use a step number, 'latest' or 'best'.")
        if step not in steps:
            raise CheckpointError(f"step {step} is not in {self.directory}; available steps: {steps}; pass one of "
                                  "them, 'latest' or 'best'.")
        return step

    def metadata(self, step: int | str | None = "latest") -> dict:
        """The JSON metadata of a step (rng, data_position, config, hf_config, metrics, ...)."""
        step = self.resolve_step(step)
        with _read_errors(self, step):
            meta = self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"step {step} in {self.directory} is not a zerojax checkpoint (its metadata "
                                  f"has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                                  f"expected {FORMAT!r}).")
        return meta

    def saved_tensors(self, step: int | str | None = "latest") -> dict:
        """The saved state's tree (dicts and lists) with orbax `ArrayMetadata` leaves (name, shape, dtype)."""
        step = self.resolve_step(step)
        with _read_errors(self, step):
            return self._mngr.item_metadata(step)[STATE].tree

    # --- integrity ----------------------------------------------------------------------------
    def verify(self, step: int | str | None = "latest") -> int:
        """Checks every file of `step` against its `integrity.json` (size, then SHA-256) and returns the
        step number; raises `CorruptCheckpointError` naming the step and the first damaged or missing
        file. A step without a manifest (saved by an older zerojax) is accepted with a warning."""
        step = self.resolve_step(step)
        if step in self._verified:
            return step
        folder = os.path.join(self.directory, str(step))
        path = os.path.join(folder, INTEGRITY)
        fallback = self._fallback_hint(step)
        if not os.path.exists(path):
            warnings.warn(f"checkpoint step {step} in {self.directory} has no {INTEGRITY} (saved by an older "
                          "zerojax): its files cannot be verified.", stacklevel=2)
            self._verified.add(step)
            return step
        try:
            with open(path) as f:
                manifest = json.load(f)
            expected = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: its file "
                                         f"{INTEGRITY} is unreadable ({e}); {fallback}", step, INTEGRITY) from None
        for name, (size, digest) in sorted(expected.items()):
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: file {name} "
                                             f"is missing; {fallback}", step, name)
            found = os.path.getsize(file)
            if found != size:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt: file {name} has {found} bytes, "
                    f"{size} were written (truncated or overwritten); {fallback}", step, name)
            if _sha256(file) != digest:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt: file {name} fails its SHA-256 "
                    f"check (its bytes changed after the save); {fallback}", step, name)
        self._verified.add(step)
        return step

    def _fallback_hint(self, step: int) -> str:
        older = [s for s in self.all_steps() if s < step]
        if not older:
            return "no older step is left in the folder; start from scratch or restore from a copy."
        return (f"restore an older step (step={older[-1]}; available {older}) or call "
                "restore_latest_good(), which skips damaged steps.")

    def restore_latest_good(self, target: ZeroPlan | TrainState, *, set_aside: bool = False) -> Restored:
        """Restores the newest step that verifies and reads cleanly, warning about each newer step skipped
        as corrupt; raises `CorruptCheckpointError` if none does. `set_aside=True` (writable manager
        only) renames each skipped step's folder to `<step>.corrupt` (nothing is deleted) so that the
        resumed run can save those steps again."""
        if set_aside and self._read_only:
            raise CheckpointError("restore_latest_good(set_aside=True) renames folders; open the manager "
                                  "without read_only=True, or pass set_aside=False.")
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(target, step)
            except CorruptCheckpointError as e:
                skipped.append((step, e.file))
                continue
            if skipped:
                moved = ""
                if set_aside:
                    if jax.process_index() == 0:
                        for s, _ in skipped:
                            os.rename(os.path.join(self.directory, str(s)), _aside(self.directory, s))
                    if jax.process_count() > 1:
                        multihost_utils.sync_global_devices(f"zerojax.set_aside:{self.directory}")
                    self._mngr.reload()
                    moved = " (their folders are renamed <step>.corrupt)"
                warnings.warn(
                    f"checkpoint {self.directory}: skipped corrupt step(s) "
                    + ", ".join(f"{s} (file {f})" for s, f in skipped) + f"{moved}; restored step {step}.",
                    stacklevel=2)
            return restored
        raise CorruptCheckpointError(f"checkpoint {self.directory}: every step is corrupt ("
                                     + ", ".join(f"{s}: file {f}" for s, f in skipped)
                                     + "); start from scratch or restore from a copy.",
                                     skipped[-1][0] if skipped else -1, skipped[-1][1] if skipped else None)

    # --- restoring ----------------------------------------------------------------------------
    def restore(self, target: ZeroPlan | TrainState, step: int | str | None = "latest") -> Restored:
        """The full training state of `step` on the shardings of `target`, with the run's metadata
        (the step's files are verified first unless `verify_integrity=False`)."""
        step = self._checked(step)
        meta = self.metadata(step)
        saved = self.saved_tensors(step)
        if "opt_state" not in saved:
            raise CheckpointError(
                f"step {step} in {self.directory} was saved with save_only_model=True: it holds the model "
                "weights but no optimizer state, so training cannot resume from it; load the weights with "
                "restore_weights(), or save with save_only_model=False."
            )
        abstract = _abstract(target)
        source = "master" if "master" in saved else "params"
        item = {source: _weights_target(abstract), "opt_state": abstract.opt_state,
                "step": abstract.step, "skipped": abstract.skipped}
        if abstract.loss_scale is not None:
            if "loss_scale" not in saved:
                raise CheckpointError(
                    f"step {step} in {self.directory} has no loss-scaler state (it was not trained with fp16 "
                    "loss scaling) but the target plan scales the loss; restore into a plan without "
                    "loss_scale, or restore with it and set state._replace(loss_scale=precision.loss_scale.init())."
                )
            item["loss_scale"] = abstract.loss_scale
        got = self._read(step, item, saved)
        params, master = _weights(got[source], abstract)
        state = TrainState(step=got["step"], params=params, master=master, opt_state=got["opt_state"],
                           loss_scale=got.get("loss_scale"), skipped=got["skipped"])
        return Restored(step, state, _decode_rng(meta["rng"]), meta["data_position"], meta["config"],
                        meta["hf_config"], meta["metrics"])

    def restore_weights(self, target: ZeroPlan | TrainState, step: int | str | None = "latest") -> tuple[Any, Any]:
        """`(params, master)` of `step` on the target's shardings (master None for a target without one);
        works for `save_only_model` checkpoints too."""
        step = self._checked(step)
        saved = self.saved_tensors(step)
        abstract = _abstract(target)
        source = "master" if "master" in saved else "params"
        got = self._read(step, {source: _weights_target(abstract)}, saved)
        return _weights(got[source], abstract)

    def load_best_model(self, state: TrainState) -> TrainState:
        """`state` with the weights of the best step (its optimizer state and counters kept), as
        Transformers does at the end of training with `load_best_model_at_end`."""
        self.wait()
        params, master = self.restore_weights(state, self.resolve_step("best"))
        return state._replace(params=params, master=master)

    def end_training(self, state: TrainState) -> TrainState:
        """Waits for pending saves; returns the best model's state if `load_best_model_at_end`, else `state`."""
        self.wait()
        return self.load_best_model(state) if self.options.load_best_model_at_end else state

    def lazy_weights(self, step: int | str | None = "latest") -> Any:
        """The step's full-precision weights (the master if saved, else the parameters) as a tree of
        `LazyTensor`s: each reads its one tensor as numpy when called; nothing but the checksums is
        read before."""
        step = self._checked(step)
        saved = self.saved_tensors(step)
        source = "master" if "master" in saved else "params"
        return jax.tree.map(lambda m: LazyTensor(self, step, m.name, tuple(m.shape), np.dtype(m.dtype)), saved[source])

    def _checked(self, step: int | str | None) -> int:
        step = self.resolve_step(step)
        return self.verify(step) if self.options.verify_integrity else step

    def _read(self, step: int, item: dict, saved: dict) -> dict:
        _check_shapes(item, saved, self.directory, step)
        args = ocp.checkpoint_utils.construct_restore_args(item)
        with _read_errors(self, step):
            return self._mngr.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True)}))[STATE]

    def _open_tensor(self, step: int, name: str):
        """The saved tensor `name` of `step` as a tensorstore array, read directly from orbax's OCDBT
        store (nothing is read until it is indexed and read)."""
        store = {"driver": "ocdbt", "base": f"file://{os.path.join(self.directory, str(step), STATE)}", "path": name}
        with _read_errors(self, step):
            return ts.open({"driver": "auto", "kvstore": store}, read=True).result()

# Read errors that mean damaged files: decode errors, and tensorstore's reports of unreadable data.
DAMAGE = re.compile(r"DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|[Ee]rror (reading|opening|decoding)|checksum")


@contextlib.contextmanager
def _write_errors(manager: CheckpointManager, step: int | None):
    """An OSError or tensorstore write error while writing `step` (None: creating the folder) becomes one
    `CheckpointWriteError` that says why and what to do; anything else passes unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, OSError) as error:
        code = getattr(error, "errno", None)
        found = re.search(r"os_error_code='?(\d+)", str(error))
        if code is None and found:
            code = int(found.group(1))
        if code is None and not isinstance(error, OSError):
            raise
        reason = os.strerror(code) if code else str(error)
        what = "create the checkpoint folder" if step is None else f"write checkpoint step {step}"
        steps = [] if step is None else manager.all_steps()
        kept = f" (the steps already saved, {steps}, are intact)" if steps else ""
        fix = {errno.ENOSPC: "free disk space or point the checkpoints at a larger disk",
               errno.EROFS: "choose a writable output folder", errno.EACCES: "choose a folder you can write to",
               errno.EDQUOT: "free quota or point the checkpoints at another disk"}.get(code, "check the folder and the disk")
        raise CheckpointWriteError(f"cannot {what} in {manager.directory}: {reason}{kept}; {fix}.") from error


@contextlib.contextmanager
def _read_errors(manager: CheckpointManager, step: int):
    """A read error that means damaged files (of a step without a usable manifest) becomes one
    `CorruptCheckpointError` naming the step and, when the message has it, the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, OSError) as error:
        if not isinstance(error, (OSError, UnicodeDecodeError, json.JSONDecodeError)) and not DAMAGE.search(str(error)):
            raise
        found = re.search(r'file "([^"]+)"', str(error))
        folder = os.path.join(manager.directory, str(step)) + os.sep
        file = found.group(1).replace(folder, "") if found else None
        where = f"file {file}" if file else "one of its files"
        first = " ".join(str(error).split())[:200]
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {manager.directory} is corrupt: reading {where} failed ({first}); "
            f"{manager._fallback_hint(step)}", step, file) from error


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One saved tensor, read as numpy on the host only when called (whole) or when one layer of a
    stacked tensor is asked for (`layer(i)`): a lazy leaf for `export_hf`."""

    manager: CheckpointManager
    step: int
    name: str  # the tensor's name in the checkpoint, e.g. 'master.layers.mlp.gate_proj.kernel.value'
    shape: tuple[int, ...]
    dtype: np.dtype

    @functools.cached_property
    def _array(self):
        """The tensor in orbax's store, opened once (its metadata only) for every read that follows."""
        return self.manager._open_tensor(self.step, self.name)

    def __call__(self) -> np.ndarray:
        return self._read(self._array)

    def layer(self, i: int) -> np.ndarray:
        """`self()[i]`, reading only the chunks that hold layer `i` (one chunk per layer and shard in
        checkpoints saved with the model's `hf_config`)."""
        return self._read(self._array[i])

    def _read(self, array) -> np.ndarray:
        """`array` as numpy, read one band of chunks along its first axis at a time, so that decoding
        holds one band beside the result, not a second copy of the tensor."""
        with _read_errors(self.manager, self.step):
            if array.rank == 0:
                return np.asarray(array.read().result())
            out = np.empty(array.shape, array.dtype.numpy_dtype)
            band = array.chunk_layout.read_chunk.shape[0]
            for start in range(0, array.shape[0], band):
                out[start:start + band] = array[start:start + band].read().result()
            return out


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | str = "latest",
                      dtype: str = "fp32", max_shard_size: int | str = "5GB", overwrite: bool = False,
                      progress: bool = True):
    """Writes a checkpoint step as a Hugging Face folder (`config.json` + safetensors), one tensor in
    memory at a time, from the checkpoint folder alone (the model's `hf_config` is in its metadata);
    needs no mesh and no accelerator. Returns the folder's path."""
    manager = CheckpointManager(ckpt_dir, read_only=True)
    step = manager.resolve_step(step)
    hf_config = manager.metadata(step)["hf_config"]
    if not hf_config:
        raise CheckpointError(
            f"step {step} in {manager.directory} has no hf_config in its metadata, so the Hugging Face model "
            "is unknown; save with CheckpointManager.save(..., hf_config=<the model's config dict>)."
        )
    try:
        return export_hf(manager.lazy_weights(step), hf_config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                         overwrite=overwrite, progress=progress)
    except FileExistsError:
        raise
    except OSError as e:  # the partial folder is already removed; the checkpoint is untouched
        raise CheckpointWriteError(f"cannot export step {step}: {e}") from e


def save_model(state: TrainState, hf_config: dict, out_dir: str | os.PathLike, *, dtype: str = "bf16",
               max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True):
    """DeepSpeed's `stage3_gather_16bit_weights_on_model_save`: the live state's weights (the fp32 master
    when there is one) gathered tensor by tensor into a consolidated Hugging Face folder in `dtype`."""
    weights = state.master if state.master is not None else state.params
    return export_hf(weights, hf_config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite, progress=progress)


# --- helpers ------------------------------------------------------------------------------------
def _save_args(tree: dict, hf_config: dict | None) -> dict:
    """Orbax save arguments for `tree`: when the model is known (`hf_config`), its stacked-layer weights
    are stored one chunk per layer and shard, so an export reads one layer without decoding the stack."""
    prefixes = [tuple(p.split(".")) for p in models.stacked_layers(hf_config)] if hf_config else []

    def args(path, x):
        key = path_key(path)
        layered = key[0] in ("params", "master") and any(key[1:1 + len(p)] == p for p in prefixes) and x.ndim > 1
        return ocp.SaveArgs(shard_axes=(0,) if layered else ())

    return jax.tree_util.tree_map_with_path(args, tree)


def _abstract(target: ZeroPlan | TrainState) -> TrainState:
    if isinstance(target, ZeroPlan):
        return target.abstract_state()
    if not isinstance(target, TrainState):
        raise TypeError(f"restore: target is a {type(target).__name__}; pass the target ZeroPlan, or a TrainState "
                        "(arrays or ShapeDtypeStructs with shardings), e.g. plan.abstract_state().")

    def spec(x):
        if getattr(x, "sharding", None) is None:
            raise TypeError("restore: the target TrainState has a leaf without a sharding; pass "
                            "plan.abstract_state() or a state of placed arrays.")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(spec, target)


def _weights_target(abstract: TrainState):
    return abstract.master if abstract.master is not None else abstract.params


def _weights(weights, abstract: TrainState) -> tuple[Any, Any]:
    """(params, master) of the target from restored full-precision weights."""
    if abstract.master is None:
        return weights, None
    cast = jax.jit(
        lambda w: jax.tree.map(lambda x, a: x.astype(a.dtype), w, abstract.params),
        out_shardings=jax.tree.map(lambda a: a.sharding, abstract.params),
    )
    return cast(weights), weights


def _dotted(path) -> str:
    return ".".join(str(k) for k in path_key(path))


def _check_shapes(item: dict, saved: dict, directory: str, step: int) -> None:
    """Raises on the first target tensor the checkpoint lacks or holds with another shape."""
    found = {m.name: tuple(m.shape) for m in jax.tree.leaves(saved) if hasattr(m, "shape")}
    weights_first = {k: item[k] for k in sorted(item, key=lambda k: k not in ("params", "master"))}
    for path, leaf in _flatten_in_order(weights_first):
        name = _dotted(path)
        if name not in found:
            raise CheckpointError(
                f"checkpoint {directory} step {step} was written by a different model or optimizer: the "
                f"target expects tensor {name!r} {tuple(leaf.shape)}, the checkpoint has none "
                f"(it has e.g. {sorted(found)[:4]})."
            )
        if found[name] != tuple(leaf.shape):
            raise CheckpointError(
                f"checkpoint {directory} step {step} was written by a different model: tensor {name!r} "
                f"expected shape {tuple(leaf.shape)}, found {found[name]}."
            )


def _flatten_in_order(tree: dict) -> list:
    """`(path, leaf)` pairs of a dict's entries in the dict's own key order."""
    return [((jax.tree_util.DictKey(k), *path), leaf) for k, v in tree.items()
            for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]]


def _aside(directory: str, step: int) -> str:
    """A new name `<step>.corrupt[.N]` for a corrupt step's folder (an existing one is never replaced)."""
    name, n = os.path.join(directory, f"{step}.corrupt"), 1
    while os.path.exists(name):
        name, n = os.path.join(directory, f"{step}.corrupt.{n}"), n + 1
    return name


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksums(folder: str) -> dict[str, list]:
    """`{relative path: [size, sha256]}` of every file under `folder` but those in `UNCHECKED`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel not in UNCHECKED:
                out[rel] = [os.path.getsize(path), _sha256(path)]
    return out


def _jsonable(name: str, value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save: {name} must be JSON-serializable (dicts, lists, numbers, strings): {e}") from None


def _encode_rng(key) -> dict | None:
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    impl = str(jax.random.key_impl(key)) if typed else None
    return {"typed": typed, "impl": impl, "data": np.asarray(data).tolist(), "dtype": str(np.asarray(data).dtype)}


def _decode_rng(rng: dict | None):
    if rng is None:
        return None
    data = np.asarray(rng["data"], dtype=rng["dtype"])
    return jax.random.wrap_key_data(data, impl=rng["impl"]) if rng["typed"] else jax.numpy.asarray(data)
