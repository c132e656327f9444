"""A Hugging Face-style Trainer for Flax NNX causal language models, configured by a DeepSpeed config.

    trainer = Trainer(model, TrainingArguments(output_dir="out", deepspeed="ds_config.json", ...),
                      train_dataset=train_windows, eval_dataset=eval_windows, hf_config=config)
    trainer.train()            # checkpoints every save_steps, evaluation every eval_steps
    trainer.evaluate()         # {"eval_loss": ...}
    trainer.save_model("out/hf")

The config decides the mesh, the ZeRO stage, precision, offload, optimizer and schedule; the
TrainingArguments fill its "auto" values (a disagreement is an error). Datasets follow the batch
contract of `zerojax.data` (numpy `(N, T)` token ids, or a dict of such arrays).

Its length (about 440 lines) is the Hugging Face surface: the training loop with its strategies,
callbacks, logging, signals and resume, beside `evaluate`, `save_model` and `plot_loss`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import process_allgather
from tqdm.auto import tqdm

from zerojax.args import TrainingArguments
from zerojax._folders import refuse_overlap
from zerojax.checkpoint import CheckpointManager, CheckpointOptions, file_write_errors, save_model
from zerojax.config import ConfigError, ConfigWarning, ZeroConfig, load_config
from zerojax.callbacks import (CallbackHandler, TrainerControl, TrainerState, default_callbacks, improved,
                               resolve_intervals)
from zerojax.data import IterableBatches, as_columns, is_iterable_of_batches, make_batches, num_examples
from zerojax import configured
from zerojax.compiled import DeviceMemoryExceeded, compile_train_step
from zerojax.estimate import option_name, parse_bytes
from zerojax.models.layers import OFFLOAD
from zerojax.plan import TrainState, init_state
from zerojax.step import make_eval_step
from zerojax.targets import resolve as resolve_target

DEFAULT_CONFIG = {"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    global_step: int
    training_loss: float
    metrics: dict
    interrupted: bool = False


class _StopOnSignal:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was asked to stop: every process stops at the same step boundary."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Trainer:
    """Trains a Flax NNX model with ZeRO as its DeepSpeed config says (see the module docstring).

    `model`: an `nnx.Module` (its `nnx.Param` state is trained); `hf_config`: the model's Hugging Face
    config dict (for "auto" bucket sizes and `save_model`); `loss_fn(params, batch)` or a
    `zerojax.TokenLoss`: defaults to next-token cross-entropy with every target token of the global batch
    weighing the same (labels of -100 and padding excluded), as Hugging Face's Trainer does (the layers the
    model marks `nnx.Param(..., stacked=True)` are gathered one at a time, `zerojax.structure`);
    `max_consecutive_skips`: steps in a row skipped for non-finite gradients before training stops with
    an error instead of silently diverging; `device_memory` (bytes or a size such as "80GB"): what
    `zero_optimization.stage: "auto"` must fit per device, by default the device's own limit (CPU
    devices report none); `target` (a `zerojax.targets` name such as "h100" or "tpu-v5p"): stage "auto"
    compiles each option for that many devices of that accelerator instead (its memory the default
    `device_memory`), so a run is sized for the cluster it will go to from any machine.
    """

    def __init__(self, model: nnx.Module, args: TrainingArguments, train_dataset: Any, eval_dataset: Any = None,
                 *, hf_config: dict | None = None, loss_fn: Callable | None = None,
                 devices: list | None = None, max_consecutive_skips: int = 20,
                 device_memory: int | str | None = None, target=None, callbacks: list | None = None):
        devices = list(devices or jax.devices())
        self.hf_config = hf_config
        train_dataset, eval_dataset = (as_columns(data, name=name, remove_unused_columns=args.remove_unused_columns)
                                       for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)))
        if loss_fn is None:
            for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                if data is None or is_iterable_of_batches(data):
                    continue  # an iterable's batches are checked as they are read
                for column in (data.values() if isinstance(data, dict) else [data]):
                    dtype = column.dtype if hasattr(column, "dtype") else np.asarray(column).dtype
                    if not np.issubdtype(dtype, np.integer):
                        raise TypeError(
                            f"Trainer: {name} has dtype {dtype}; the language-model loss needs "
                            "integer token ids (e.g. zerojax.data.text_dataset), or pass your own loss_fn."
                        )
        self.args = dataclasses.replace(args, train_dataset_size=num_examples(train_dataset))
        if self.args.train_dataset_size is None and self.args.max_steps <= 0:
            raise ValueError("Trainer: an iterable train_dataset has no length to count epochs by; set "
                             "TrainingArguments.max_steps.")
        config = self.args.deepspeed if self.args.deepspeed is not None else DEFAULT_CONFIG
        self.config = load_config(config, training_args=self.args, model_config=hf_config, world_size=len(devices))
        no_effect = _checkpointing(model, args, self.config)  # before the model is split: remat is static
        self.graphdef, params, other = nnx.split(model, nnx.Param, ...)
        # a model with RNG streams (dropout) trains with a key folded per step, rank and micro-batch
        self.key = jax.random.key(args.seed) if jax.tree.leaves(nnx.state(model, nnx.RngState)) else None
        self.mesh = configured.mesh(self.config, devices)
        self.total_steps = self.args.total_steps(len(devices))
        tx = configured.optimizer(self.config, params, self.total_steps)
        self.loss_fn = loss_fn
        if loss_fn is None:  # next-token cross-entropy, every token alike as in HF (its RNG streams: dropout)
            self.loss_fn = configured.default_loss(self.graphdef, other, across_ranks=self.args.average_tokens_across_devices)
        self.train_batches = make_batches(
            train_dataset, self.config.train_batch_size, name="train_dataset", skip=not self.args.ignore_data_skip,
            seed=self.args.seed if self.args.data_seed is None else self.args.data_seed,
            shuffle=self.args.train_sampling_strategy != "sequential")
        if self.config.stage == "auto":
            mesh = self.mesh
            if target is not None:
                target = resolve_target(target)
                mesh = configured.mesh(self.config, target.devices(len(devices)))
                device_memory = device_memory or target.memory_bytes
            memory = _memory_budget(devices[0], device_memory)
            self.config = self._choose_stage(params, tx, memory, mesh)
        self.plan, self.train_step = self._build(self.config, params, tx)
        self.eval_step = make_eval_step(self.loss_fn, self.plan, rng=self.key is not None)
        self.state: TrainState = init_state(params, self.plan)
        self.eval_batches = None
        if eval_dataset is not None:
            ranks = self.plan.rules.data_size
            size = num_examples(eval_dataset)
            per_eval = None if size is None else min(self.args.per_device_eval_batch_size * ranks, size // ranks * ranks)
            self.eval_batches = make_batches(eval_dataset, per_eval, shuffle=False, name="eval_dataset", ranks=ranks,
                                             eval=True)
        self.max_consecutive_skips = max_consecutive_skips
        self.callback_handler = CallbackHandler([*default_callbacks(self.args), *(callbacks or [])])
        self.control = TrainerControl()  # what the callbacks asked for last
        self.trainer_state = TrainerState(max_steps=self.total_steps, is_world_process_zero=jax.process_index() == 0,
                                          steps_per_epoch=getattr(self.train_batches, "steps_per_epoch", None))
        resolve_intervals(self.args, self.trainer_state)
        if "epoch" in (self.args.logging_strategy, self.args.eval_strategy, self.args.save_strategy) \
                and isinstance(self.train_batches, IterableBatches):
            raise ValueError('Trainer: a strategy of "epoch" needs a train_dataset with a length; an iterable has '
                             'no epochs (use "steps").')
        self.args.warn_no_effect(no_effect)
        self.output_dir = Path(self.args.output_dir) if self.args.output_dir else None
        self.history: list[dict] = []

    def _build(self, config: ZeroConfig, params: Any, tx, mesh=None):
        """The plan and train step of `config` (its stage resolved) on `mesh` (default: the Trainer's)."""
        plan = configured.plan(config, params, tx, mesh or self.mesh)
        return plan, configured.train_step(config, plan, self.loss_fn, rng=self.key is not None)

    def _choose_stage(self, params: Any, tx, device_memory: int, mesh) -> ZeroConfig:
        """`zero_optimization.stage: "auto"` (`zerojax.configured.search_stage`): compiles this Trainer's step
        ahead of time (nothing allocated) on `mesh` for each of the config's stage options, cheapest first, and
        takes the first whose compiled peak bytes per device fit `device_memory`; prints the choice and every
        peak it compiled (an option the mesh's devices cannot compile, such as offload on a GPU target, is
        skipped with its reason)."""
        batch = configured.abstract_batch(self.train_batches.batch(0), mesh)

        def measure(config, built):
            try:
                return compile_train_step(built[1], built[0], batch).peak_bytes
            except DeviceMemoryExceeded as e:  # the target's compiler refuses what cannot fit
                return e

        fits = lambda peak: not isinstance(peak, DeviceMemoryExceeded) and peak <= device_memory
        chosen, tried = configured.search_stage(self.config, lambda config: self._build(config, params, tx, mesh), measure, fits)
        peaks = "; ".join(_peak(t) for t in tried)
        if chosen is None:
            raise ConfigError(
                f'zero_optimization.stage "auto": no option fits device_memory={device_memory / 2**30:.3f} GiB per '
                f"device (compiled peaks: {peaks}); use more devices, a smaller micro-batch or shorter sequences."
            )
        if jax.process_index() == 0:
            print(f'zero_optimization.stage "auto": {option_name(*chosen.option)} fits {device_memory / 2**30:.3f} GiB '
                  f"per device (compiled peaks: {peaks})", flush=True)
        return chosen.config

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """`{"eval_loss": mean loss over the whole eval set (full batches only), "eval_perplexity":
        exp(eval_loss), "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}`; callbacks'
        `on_evaluate` get them as `metrics`."""
        if self.eval_batches is None:
            raise ValueError("Trainer.evaluate: no eval_dataset was given to the Trainer.")
        start, losses, samples = time.perf_counter(), [], 0
        for batch in self.eval_batches.epoch(self.mesh):
            losses.append(float(self.eval_step(self.state.params, batch)))
            samples += len(next(iter(batch.values())))
        if not losses:
            raise ValueError("Trainer.evaluate: the eval_dataset gave no batch.")
        loss, runtime = float(np.mean(losses)), time.perf_counter() - start
        metrics = {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 700.0))),
                   "eval_runtime": round(runtime, 4), "eval_samples_per_second": round(samples / max(runtime, 1e-9), 3),
                   "eval_steps_per_second": round(len(losses) / max(runtime, 1e-9), 3)}
        self.control = self.callback_handler.call("on_evaluate", self.args, self.trainer_state,
                                                  self.control, metrics=metrics)
        return metrics

    # --- training -------------------------------------------------------------------------------
    def _checkpoints(self) -> CheckpointManager | None:
        if self.output_dir is None:
            return None
        return CheckpointManager(self.output_dir / "checkpoints", CheckpointOptions(
            save_total_limit=self.args.save_total_limit, metric_for_best_model=self.args.metric_for_best_model,
            greater_is_better=self.args.greater_is_better, load_best_model_at_end=self.args.load_best_model_at_end,
            save_only_model=self.args.save_only_model,
        ))

    def _save(self, manager, metrics: dict | None) -> None:
        manager.save(self.state, data_position=int(self.state.step), config=self.config.to_dict(),
                     hf_config=self.hf_config, metrics=metrics)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        self.trainer_state.log_history.append(record)
        self.control = self.callback_handler.call("on_log", self.args, self.trainer_state,
                                                  self.control, logs=record)
        if self.output_dir is not None and jax.process_index() == 0:
            with file_write_errors(self.output_dir / "metrics.jsonl"):
                self.output_dir.mkdir(parents=True, exist_ok=True)
                with open(self.output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")

    def train(self, resume_from_checkpoint: bool | int | str | None = None) -> TrainOutput:
        """Runs to `total_steps`; `resume_from_checkpoint` True/"latest"/a step resumes from output_dir,
        `"latest_good"` from the newest step that passes its integrity check (corrupt ones set aside).

        SIGTERM or SIGINT saves a checkpoint at the next step boundary and returns with
        `interrupted=True`. An output_dir that already holds checkpoints needs a resume, and a Trainer
        writing one holds its lock until `train` returns or raises: two runs are never mixed in one folder.
        """
        manager = self._checkpoints()
        try:
            return self._train(manager, resume_from_checkpoint)
        except BaseException:
            if manager is not None:
                with contextlib.suppress(Exception):  # the error that stopped training is the one to see
                    manager.close()
            raise

    def _train(self, manager: CheckpointManager | None, resume_from_checkpoint) -> TrainOutput:
        """`train`, writing through `manager` (None without an output_dir)."""
        resume = resume_from_checkpoint not in (None, False)
        if resume and manager is None:
            raise ValueError("Trainer.train: resume_from_checkpoint needs TrainingArguments.output_dir.")
        if not resume and manager is not None and manager.all_steps():
            raise FileExistsError(
                f"Trainer.train: {self.output_dir / 'checkpoints'} already holds checkpoints (steps "
                f"{manager.all_steps()[-3:]}...); pass resume_from_checkpoint=True to continue that run, or "
                "choose a new output_dir."
            )
        if resume:
            step = "latest" if resume_from_checkpoint is True else resume_from_checkpoint
            if step == "latest_good":
                self.state = manager.restore_latest_good(self.plan, set_aside=True).state
            else:
                self.state = manager.restore(self.plan, step).state
        args, total, state, handler = self.args, self.total_steps, self.trainer_state, self.callback_handler
        tokens = self.config.train_batch_size * int(np.prod(np.shape(self.train_batches.batch(0)[self.train_batches.key])[1:]))
        start, metrics, loss, interrupted = int(self.state.step), {}, float("nan"), False
        bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0 or bool(args.disable_tqdm), desc="train",
                   dynamic_ncols=True)
        state.global_step = start
        self.control = handler.call("on_train_begin", args, state, TrainerControl())
        if args.eval_on_start and self.eval_batches is not None and start == 0:
            metrics = self.evaluate()
            self._log({"step": 0, **metrics})
        tick, last = time.perf_counter(), start
        with _StopOnSignal() as stop:
            for s in range(start, total):
                batch = self.train_batches.global_batch(s, self.mesh)
                self.state, out = self.train_step(self.state, batch, *(() if self.key is None else (self.key,)))
                skips_in_a_row = int(self.state.skips_in_a_row)  # kept in the state: a resume continues it
                if skips_in_a_row >= self.max_consecutive_skips:
                    raise FloatingPointError(
                        f"Trainer: {skips_in_a_row} steps in a row (up to step {s + 1}) had non-finite "
                        f"gradients and were skipped (loss scale {float(out['loss_scale'])}); lower the "
                        "learning rate, check the data, or resume from an earlier checkpoint."
                    )
                state.global_step, spe = s + 1, state.steps_per_epoch
                state.epoch = (s + 1) / spe if spe else 0.0
                control = handler.call("on_step_end", args, state, self.control, first=s == start)
                if spe and (s + 1) % spe == 0:
                    control = handler.call("on_epoch_end", args, state, control)
                self.control = control
                if s + 1 == total:
                    loss = float(out["loss"])
                if control.should_log:
                    control.should_log = False
                    loss = float(out["loss"])
                    elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                    rate = tokens * (s + 1 - last) / max(elapsed, 1e-9)
                    record = {"step": s + 1, "loss": loss, "learning_rate": learning_rate(self.state),
                              "grad_norm": float(out["grad_norm"]), "skipped": int(self.state.skipped),
                              "tokens_per_s": round(rate, 1)}
                    last = s + 1
                    memory = device_memory()
                    if memory is not None:
                        record["device_memory_gib"] = memory
                    self._log(record)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", **({"mem_gib": memory} if memory else {}))
                if control.should_evaluate and self.eval_batches is not None:
                    metrics = self.evaluate()  # its callbacks may change self.control (early stopping)
                    control = self.control
                    self._log({"step": s + 1, **metrics})
                    if args.save_strategy == "best" and improved(args, state, metrics):
                        control.should_save = True
                control.should_evaluate = False
                stopping = stop.agreed()
                asked_to_stop = control.should_training_stop and s + 1 < total  # by a callback
                if manager is not None and args.save_strategy != "no" and (control.should_save or stopping
                                                                            or asked_to_stop):
                    self._save(manager, metrics if manager.options.metric_for_best_model else None)
                    control = handler.call("on_save", args, state, control)
                control.should_save = False
                self.control = control
                bar.update(1)
                if stopping or asked_to_stop:
                    interrupted = True
                    break
        bar.close()
        self.control = handler.call("on_train_end", args, state, self.control)
        if manager is not None:
            manager.wait()
            if args.load_best_model_at_end and not interrupted:
                self.state = manager.load_best_model(self.state)
            manager.close()
        return TrainOutput(int(self.state.step), loss, metrics, interrupted)

    def plot_loss(self, path: str | os.PathLike) -> Path:
        """Writes the training (and evaluation) loss curve of this run to a PNG file (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib import pyplot as plt
        except ImportError:
            raise ImportError("Trainer.plot_loss needs matplotlib: pip install matplotlib (or '.[test]').") from None
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
            points = [(r["step"], r[key]) for r in self.history if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)

    def save_model(self, out_dir: str | os.PathLike | None = None, *, dtype: str | None = None,
                   overwrite: bool = False) -> Path:
        """Writes the model as a Hugging Face folder (default `output_dir/hf`), 16-bit when training was;
        an existing non-empty folder is replaced only with `overwrite`."""
        if self.hf_config is None:
            raise ValueError("Trainer.save_model: pass hf_config to the Trainer to export a Hugging Face folder.")
        out = Path(out_dir) if out_dir is not None else (self.output_dir or Path(".")) / "hf"
        if self.output_dir is not None:  # replacing the run's checkpoints with an export would lose them
            refuse_overlap("Trainer.save_model", out, [self.output_dir / "checkpoints"])
        dtype = dtype or {"bfloat16": "bf16", "float16": "fp16"}.get(self.plan.precision.compute_dtype.name, "fp32")
        save_model(self.state, self.hf_config, out, dtype=dtype, overwrite=overwrite)
        return out


def _checkpointing(model: Any, args: TrainingArguments, config: ZeroConfig) -> list[tuple[str, str]]:
    """`gradient_checkpointing` (or `activation_checkpointing`): every layer of the model rematerialised in the
    backward pass; the config's `activation_checkpointing.cpu_checkpointing`: the same, with each layer's saved
    input in host memory. A model built with a `remat` attribute (the bundled Llama and GPT-2) gets
    `remat="full"` unless it already has a policy, or `remat="offload"` with cpu_checkpointing (a model with
    another policy is refused: the two disagree); for any other model the setting is named in the no-effect
    warning (wrap its layers in `nnx.remat` / `jax.checkpoint` yourself). Returns the (field, why) pairs for
    that warning (a model without `remat` warns of cpu_checkpointing itself)."""
    if config.cpu_checkpointing:
        name, wanted = "activation_checkpointing.cpu_checkpointing", OFFLOAD
    elif args.gradient_checkpointing_enabled:
        name = "activation_checkpointing" if args.activation_checkpointing else "gradient_checkpointing"
        wanted = "full"
    else:
        return []
    if not hasattr(model, "remat"):
        if wanted != OFFLOAD:
            return [(name, f"{type(model).__name__} has no remat attribute; wrap its layers in nnx.remat yourself")]
        warnings.warn(f"{name} has no effect: {type(model).__name__} has no remat attribute; save its layers' inputs "
                      "in host memory yourself (jax.checkpoint_policies.save_and_offload_only_these_names).",
                      ConfigWarning, stacklevel=3)
        return []
    if wanted == OFFLOAD and model.remat not in (None, "full", OFFLOAD):
        raise ConfigError(
            f"activation_checkpointing.cpu_checkpointing=true saves each layer's input in host memory, but the "
            f"model was built with remat={model.remat!r}; build it with remat=None or 'full', or drop cpu_checkpointing."
        )
    if model.remat is None or wanted == OFFLOAD:
        model.remat = wanted
    return []


def learning_rate(state: TrainState) -> float:
    """The learning rate of the step just taken (optax's injected hyperparameter), NaN if not injected."""
    lr = (getattr(state.opt_state, "hyperparams", None) or {}).get("learning_rate")
    return float("nan") if lr is None else float(np.asarray(lr))


def device_memory() -> float | None:
    """GiB in use on the first local device, where the platform reports it (GPUs and TPUs do)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or "bytes_in_use" not in stats else round(stats["bytes_in_use"] / 2**30, 3)


def _memory_budget(device, given: int | str | None) -> int:
    """Bytes per device for stage "auto": `given`, else the device's reported limit."""
    if given is not None:
        return parse_bytes(given, "device_memory")
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        raise ConfigError(
            f'zero_optimization.stage is "auto" but {device.platform} devices report no memory limit; pass '
            'Trainer(..., device_memory="16GB") (bytes per device) or write a stage.'
        )
    return int(limit)


def _peak(tried) -> str:
    """One stage-"auto" option as the Trainer reports it: its compiled peak, the compiler's refusal, or
    why it was not compiled."""
    name = option_name(*tried.option)
    if tried.skipped is not None:
        return f"{name} not compiled: {tried.skipped}"
    if isinstance(tried.result, DeviceMemoryExceeded):
        return f"{name} over {tried.result.temp_bytes / 2**30:.3f} GiB (compiler refused)"
    return f"{name} {tried.result / 2**30:.3f} GiB"
