"""Checkpoints of a ZeRO run on orbax: sharded, asynchronous, atomic, restored onto any plan.

A checkpoint step is a folder `DIR/<step>` with two orbax items:

- `state`: the `TrainState` as a dict `{step, params, master, opt_state, loss_scale, skipped}` (absent
  entries omitted) saved shard by shard from every process; with `save_only_model` only `params`.
- `meta`: JSON — RNG key, data position, the resolved config, the model's Hugging Face config (so an
  export needs nothing but the folder), the metrics of the step and what was saved.

Orbax writes each step into a temporary folder and renames it when every item is complete, so a crash
mid-save leaves the previous steps intact and `latest_step` is always a complete checkpoint.

Restoring reads onto the shardings of a *target* (a `ZeroPlan`, or a `TrainState` of arrays or
`ShapeDtypeStruct`s): another device count, stage or mesh shape; each process reads only its shards.
Precision may change between save and restore. The weights come from the saved fp32 master when there
is one, else from the saved parameters; a target with a master gets them as its master and its compute
copy is cast from it (what every step does), a target without one gets them as its parameters. A
saved loss-scaler state is dropped when the target runs without loss scaling; a target with loss
scaling needs a checkpoint that has one (error otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from zerojax.hf import export_hf
from zerojax.plan import TrainState, ZeroPlan

STATE = "state"
META = "meta"
FORMAT = "zerojax-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint folder, step or content that does not fit the request."""


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
    """

    save_total_limit: int | None = None
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False
    save_only_model: bool = False
    async_save: bool = True

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
        mngr_options = ocp.CheckpointManagerOptions(
            best_fn=rank,
            best_mode="max",
            preservation_policy=KeepBestAndLatest(options.save_total_limit, rank),
            enable_async_checkpointing=options.async_save,
            read_only=read_only,
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
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
        """Saves `state` as step `int(state.step)` (returns False if that step already exists).

        `rng`: a JAX PRNG key (typed or raw uint32); `data_position`, `config`, `hf_config`: JSON-able
        values (a dataclass config is stored as its dict); `metrics`: the step's evaluation metrics,
        used to rank steps by `metric_for_best_model`. With `async_save` the call returns before the
        files are written; `wait()` blocks until they are.
        """
        step = int(state.step)
        if step in self.all_steps():
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
        return self._mngr.save(
            step,
            args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(tree), META: ocp.args.JsonSave(meta)}),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True,
        )

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk (and old steps are rotated)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
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
            raise CheckpointError(f"checkpoint folder {self.directory} holds no complete checkpoint step.")
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
            raise CheckpointError(f"step {step} is not in {self.directory}; available steps: {steps}.")
        return step

    def metadata(self, step: int | str | None = "latest") -> dict:
        """The JSON metadata of a step (rng, data_position, config, hf_config, metrics, ...)."""
        step = self.resolve_step(step)
        meta = self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"step {step} in {self.directory} is not a zerojax checkpoint (its metadata "
                                  f"has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                                  f"expected {FORMAT!r}).")
        return meta

    def saved_tensors(self, step: int | str | None = "latest") -> dict:
        """The saved state's tree (dicts and lists) with orbax `ArrayMetadata` leaves (name, shape, dtype)."""
        step = self.resolve_step(step)
        return self._mngr.item_metadata(step)[STATE].tree

    # --- restoring ----------------------------------------------------------------------------
    def restore(self, target: ZeroPlan | TrainState, step: int | str | None = "latest") -> Restored:
        """The full training state of `step` on the shardings of `target`, with the run's metadata."""
        step = self.resolve_step(step)
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
        step = self.resolve_step(step)
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
        `LazyTensor`s: each reads its one tensor as numpy when called; nothing is read before."""
        step = self.resolve_step(step)
        saved = self.saved_tensors(step)
        source = "master" if "master" in saved else "params"
        return jax.tree.map(lambda m: LazyTensor(self, step, saved, m.name, tuple(m.shape), np.dtype(m.dtype)),
                            saved[source])

    def _read(self, step: int, item: dict, saved: dict) -> dict:
        _check_shapes(item, saved, self.directory, step)
        args = ocp.checkpoint_utils.construct_restore_args(item)
        return self._mngr.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True)}))[STATE]

    def _read_numpy(self, step: int, saved: dict, name: str) -> np.ndarray:
        keys = name.split(".")
        branch = _branch(saved, keys)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), branch)
        got = self._mngr.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeRestore(branch, restore_args=args, partial_restore=True)}))[STATE]
        return np.asarray(_pick(got, keys))


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One saved tensor, read (alone, as numpy, on the host) when called: a lazy leaf for `export_hf`."""

    manager: CheckpointManager
    step: int
    saved: Any
    name: str  # dotted name in the checkpoint, e.g. 'master.layers.0.w'
    shape: tuple[int, ...]
    dtype: np.dtype

    def __call__(self) -> np.ndarray:
        return self.manager._read_numpy(self.step, self.saved, self.name)


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
    return export_hf(manager.lazy_weights(step), hf_config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite, progress=progress)


def save_model(state: TrainState, hf_config: dict, out_dir: str | os.PathLike, *, dtype: str = "bf16",
               max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True):
    """DeepSpeed's `stage3_gather_16bit_weights_on_model_save`: the live state's weights (the fp32 master
    when there is one) gathered tensor by tensor into a consolidated Hugging Face folder in `dtype`."""
    weights = state.master if state.master is not None else state.params
    return export_hf(weights, hf_config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite, progress=progress)


# --- helpers ------------------------------------------------------------------------------------
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
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


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


def _branch(tree, keys: list[str]):
    """The minimal sub-tree of `tree` holding only the leaf at `keys` (lists padded with None)."""
    if not keys:
        return 0
    head, rest = keys[0], keys[1:]
    if isinstance(tree, dict) and head in tree:
        return {head: _branch(tree[head], rest)}
    if isinstance(tree, (list, tuple)) and head.isdigit() and int(head) < len(tree):
        return [None] * int(head) + [_branch(tree[int(head)], rest)]
    raise CheckpointError(f"the checkpoint holds no tensor named {'.'.join(keys)!r} at {head!r}.")


def _pick(tree, keys: list[str]):
    for k in keys:
        tree = tree[int(k)] if isinstance(tree, list) else tree[k]
    return tree


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
