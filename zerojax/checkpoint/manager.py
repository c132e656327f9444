"""`CheckpointManager`: saves a ZeRO run's state with orbax and restores it onto any plan (see the package
docstring for the layout of a step, its atomicity, integrity and restore semantics).

At about 570 lines it is over the project's 400: one class whose save, restore, verification and
best-step bookkeeping share one orbax manager, writer lock and step list. Splitting restore (with its
reshard and precision conversion helpers, the lower third) into its own module is the next step.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils

from zerojax.checkpoint import integrity
from zerojax.checkpoint.errors import (
    CheckpointError,
    CheckpointLockedError,
    CorruptCheckpointError,
    read_errors,
    write_errors,
)
from zerojax.checkpoint.lazy import LazyTensor
from zerojax.checkpoint.lock import WriterLock
from zerojax.checkpoint.options import CheckpointOptions, KeepBestAndLatest, best_index, ranking
from zerojax.checkpoint.steps import CheckedMetrics, StepsOnly, numbered_folders
from zerojax.offload import check_host_memory
from zerojax.plan import TrainState, ZeroPlan, weights_field
from zerojax._paths import path_key
from zerojax.structure import stacked_leaves

STATE = "state"
META = "meta"
FORMAT = "zerojax-checkpoint/1"


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
    """Saves and restores a ZeRO run's checkpoints under `directory` (see the `zerojax.checkpoint` docstring).

    `read_only=True` opens an existing checkpoint folder (an error if it is missing or holds no
    complete step) and never writes or deletes anything. A writable manager holds the folder's writer
    lock (`zerojax.checkpoint.lock`, taken by process 0) until `close()`: a second writer of the same
    folder gets `CheckpointLockedError`.
    """

    def __init__(self, directory: str | os.PathLike, options: CheckpointOptions = CheckpointOptions(), *,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.options = options
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint folder {self.directory} does not exist; expected a folder "
                                  "written by zerojax.checkpoint.CheckpointManager.")
        self._rank = rank = ranking(options)
        self._read_only = read_only
        self._format = StepsOnly()
        self._lock = None
        if not read_only:  # before orbax, which deletes temporary folders: another writer's saves
            with write_errors(self, None):
                os.makedirs(self.directory, exist_ok=True)
            self._lock = _writer_lock(self.directory)
        self._saving: int | None = None  # the step being written (for the integrity hook)
        self._verified: set[int] = set()
        try:
            self._open_orbax(options, rank, read_only)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        ignored = sorted(set(numbered_folders(self.directory)) - set(self.all_steps()))
        if ignored:
            warnings.warn(f"checkpoint folder {self.directory}: the numbered folder(s) {ignored} hold no checkpoint "
                          "step (an empty folder, an export, or the remains of a deleted step) and are ignored; "
                          "move them out of the checkpoint folder.", stacklevel=2)
        if read_only and not self.all_steps():
            raise CheckpointError(f"checkpoint folder {self.directory} holds no complete checkpoint step; "
                                  "expected step folders written by zerojax.checkpoint.CheckpointManager.")

    def _open_orbax(self, options: CheckpointOptions, rank, read_only: bool) -> None:
        """Opens orbax's manager on the folder (a writable one deletes leftover temporary folders)."""
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
            step_name_format=self._format,
        )
        with write_errors(self, None):
            self._mngr = _Orbax(
                self.directory,
                CheckedMetrics(self.directory),
                options=mngr_options,
                item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()},
            )

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
        if os.path.lexists(folder := os.path.join(self.directory, str(step))):
            raise CheckpointError(f"cannot save checkpoint step {step}: {folder} exists and holds no checkpoint "
                                  "step; move it out of the checkpoint folder.")
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
        with write_errors(self, step):
            saved = self._mngr.save(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(tree, save_args=_save_args(tree)),
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
        integrity.write_manifest(folders[-1])

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk (and old steps are rotated); raises
        `CheckpointWriteError` if it could not be written."""
        with write_errors(self, self._saving):
            self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves (raising `CheckpointWriteError` if one failed) and releases the manager
        and its writer lock."""
        try:
            with write_errors(self, self._saving):
                self._mngr.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- steps --------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps on disk, oldest first (a save still being written, and a numbered folder that
        holds no step, are not listed; a listed step may still fail its integrity check)."""
        return sorted(m.step for m in self._format.find_all(self.directory))

    def latest_step(self) -> int | None:
        """The newest committed step: always a complete checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step ranked best by `metric_for_best_model` (the options', else the one the steps were
        saved with); None without a metric or without steps saved with metrics."""
        steps = self.all_steps()
        rank = self._rank if self._rank is not None else self._saved_ranking(steps)
        if rank is None:
            return None
        best = best_index([self._mngr.metrics(s) for s in steps], rank)
        return None if best is None else steps[best]

    def _saved_ranking(self, steps: list[int]):
        """The ranking of the run that saved `steps` (from the newest step whose metadata reads), or None."""
        for step in reversed(steps):
            try:
                meta = self.metadata(step)
            except CheckpointError:
                continue
            if meta.get("metric_for_best_model") is None:
                return None
            return ranking(CheckpointOptions(metric_for_best_model=meta["metric_for_best_model"],
                                             greater_is_better=meta["greater_is_better"]))
        return None

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
        if not os.path.isdir(os.path.join(self.directory, str(step), META)):
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: its folder {META} is "
                                         f"missing; {self.fallback_hint(step)}", step, META)
        with read_errors(self, step):
            meta = self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"step {step} in {self.directory} is not a zerojax checkpoint (its metadata "
                                  f"has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                                  f"expected {FORMAT!r}).")
        return meta

    def saved_tensors(self, step: int | str | None = "latest") -> dict:
        """The saved state's tree (dicts and lists) with orbax `ArrayMetadata` leaves (name, shape, dtype)."""
        step = self.resolve_step(step)
        with read_errors(self, step):
            return self._mngr.item_metadata(step)[STATE].tree

    # --- integrity ----------------------------------------------------------------------------
    def verify(self, step: int | str | None = "latest") -> int:
        """Checks that `step` has a well-formed `integrity.json` listing every file it holds, and every
        file against it (size, then SHA-256); returns the step number, or raises `CorruptCheckpointError`
        naming the step and the first file that fails (the manifest itself when it is missing or
        malformed: every step zerojax writes has one)."""
        step = self.resolve_step(step)
        if step in self._verified:
            return step
        folder = os.path.join(self.directory, str(step))
        fallback = self.fallback_hint(step)
        try:
            expected = integrity.read_manifest(folder)
        except ValueError as e:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt: its file {integrity.INTEGRITY} {e}, so "
                f"its files cannot be verified; {fallback} If you trust its files, CheckpointOptions("
                "verify_integrity=False) restores it unchecked.", step, integrity.INTEGRITY) from None
        if damage := integrity.first_damage(folder, expected):
            name, what = damage
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: file {name} {what}; "
                                         f"{fallback}", step, name)
        self._verified.add(step)
        return step

    def fallback_hint(self, step: int) -> str:
        """What to do when `step` is damaged: the older step to restore, or that none is left."""
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
        check_host_memory(abstract, f"restore of step {step}")
        source = weights_field(saved)
        item = {source: abstract.weights, "opt_state": abstract.opt_state,
                "step": abstract.step, "skipped": abstract.skipped}
        if "skips_in_a_row" in saved:  # absent from checkpoints older than the count: none then
            item["skips_in_a_row"] = abstract.skips_in_a_row
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
        in_a_row = got.get("skips_in_a_row")
        if in_a_row is None:
            in_a_row = jax.device_put(np.zeros((), np.int32), abstract.skips_in_a_row.sharding)
        state = TrainState(step=got["step"], params=params, master=master, opt_state=got["opt_state"],
                           loss_scale=got.get("loss_scale"), skipped=got["skipped"], skips_in_a_row=in_a_row)
        return Restored(step, state, _decode_rng(meta["rng"]), meta["data_position"], meta["config"],
                        meta["hf_config"], meta["metrics"])

    def restore_weights(self, target: ZeroPlan | TrainState, step: int | str | None = "latest") -> tuple[Any, Any]:
        """`(params, master)` of `step` on the target's shardings (master None for a target without one);
        works for `save_only_model` checkpoints too."""
        step = self._checked(step)
        saved = self.saved_tensors(step)
        abstract = _abstract(target)
        check_host_memory((abstract.params, abstract.master), f"restore of step {step}")
        source = weights_field(saved)
        got = self._read(step, {source: abstract.weights}, saved)
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
        source = weights_field(saved)
        return jax.tree.map(lambda m: LazyTensor(self, step, m.name, tuple(m.shape), np.dtype(m.dtype)), saved[source])

    def _checked(self, step: int | str | None) -> int:
        step = self.resolve_step(step)
        return self.verify(step) if self.options.verify_integrity else step

    def _read(self, step: int, item: dict, saved: dict) -> dict:
        _check_shapes(item, saved, self.directory, step)
        args = ocp.checkpoint_utils.construct_restore_args(item)
        with read_errors(self, step):
            return self._mngr.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True)}))[STATE]

    def open_tensor(self, step: int, name: str):
        """The saved tensor `name` of `step` as a tensorstore array, read directly from orbax's OCDBT
        store (nothing is read until it is indexed and read)."""
        store = {"driver": "ocdbt", "base": f"file://{os.path.join(self.directory, str(step), STATE)}", "path": name}
        with read_errors(self, step):
            return ts.open({"driver": "auto", "kvstore": store}, read=True).result()


# --- helpers ------------------------------------------------------------------------------------
class _Orbax(ocp.CheckpointManager):
    """Orbax's manager, whose step metrics (for `best_fn` and rotation) are the checked ones: a step
    whose metrics fail their check ranks as a step without metrics instead of failing to open."""

    def __init__(self, directory: str, metrics: CheckedMetrics, **kwargs):
        self._checked_metrics = metrics
        super().__init__(directory, **kwargs)

    def metrics(self, step: int) -> dict | None:
        return self._checked_metrics(step)


def _writer_lock(directory: str) -> WriterLock | None:
    """Process 0's writer lock on `directory` (None on other processes); when process 0 cannot take it,
    every process raises, so none goes on to write."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WriterLock(directory)
        except CheckpointError as e:
            error = e
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise CheckpointLockedError(f"checkpoint folder {directory}: process 0 could not lock it for writing "
                                        "(its error says why); fix that, then start every process again.", None)
    if error is not None:
        raise error
    return lock


def _save_args(tree: dict) -> dict:
    """Orbax save arguments for `tree`: the weights of stacked layers (`nnx.Param(..., stacked=True)`,
    `zerojax.structure`) are stored one chunk per layer and shard, so an export reads one layer without
    decoding the stack."""
    stacked = iter(stacked_leaves(tree))

    def args(path, x):
        layered = next(stacked) and path_key(path)[0] in ("params", "master") and x.ndim > 1
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


def _weights(weights, abstract: TrainState) -> tuple[Any, Any]:
    """(params, master) of the target from restored full-precision weights."""
    if weights_field(abstract._asdict()) == "params":
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
