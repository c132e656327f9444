"""`TrainingArguments`: every field of Hugging Face's `transformers.TrainingArguments`, with its name and default.

The fields zerojax uses do what they do in Transformers (the DeepSpeed config's "auto" values, the
Trainer's schedule, logging, evaluation, checkpoints, TensorBoard, gradient checkpointing). The others
are accepted so that arguments written for Transformers (or its `to_json_string()`) load unchanged; a
field set to a value that would change what Transformers does, but has no effect here, is named with the
reason in one `ArgsWarning` (`TrainingArguments.no_effect()`; the Trainer issues it once per run).
`from_dict` also reads the names Transformers 4 wrote (`evaluation_strategy`, `logging_dir`, ...).

Its length (over 500 lines) is the 114 fields of Transformers' dataclass and their checks, kept in one
place so that the field list can be compared with Transformers' own at a glance.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from zerojax._text import shown as _shown

LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
INTERVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
REPORTERS = ("tensorboard",)  # report_to integrations zerojax writes
_MAX_INT = 2**63 - 1


class ArgsWarning(UserWarning):
    """`TrainingArguments` fields set to values that have no effect in zerojax."""


@dataclasses.dataclass(frozen=True)
class TrainingArguments:
    """`transformers.TrainingArguments` (Transformers 5), every field, the same names and defaults.

    `warmup_steps` follows Transformers 5: a value >= 1 is a step count, a value in (0, 1) a fraction of
    the total steps; `logging_steps`, `eval_steps` and `save_steps` below 1 are fractions of the total
    steps too. `warmup_ratio` is the Transformers 4 spelling of the warmup fraction, `logging_dir` the
    Transformers 4 TensorBoard folder. Fields not in Transformers: `train_dataset_size` (training samples
    per epoch; the Trainer sets it from its data), and `eval_strategy=None`, the default here: evaluate
    every `eval_steps` and at the last step when the Trainer has an eval_dataset (Transformers' "no"
    evaluates only when asked). See docs/config.md for what each field does in zerojax.
    """

    # --- used by zerojax ---------------------------------------------------------------------------
    output_dir: str | None = None
    per_device_train_batch_size: int = 8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    gradient_accumulation_steps: int = 1
    average_tokens_across_devices: bool = True
    max_grad_norm: float = 1.0
    bf16: bool = False
    fp16: bool = False
    activation_checkpointing: bool | None = None
    gradient_checkpointing: bool | None = None
    logging_strategy: str = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    disable_tqdm: bool | None = None
    report_to: str | list | None = "none"
    run_name: str | None = None
    eval_strategy: str | None = None
    eval_steps: float | None = None
    eval_delay: float = 0
    per_device_eval_batch_size: int = 8
    prediction_loss_only: bool = False
    eval_on_start: bool = False
    save_only_model: bool = False
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    enable_jit_checkpoint: bool = False
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    ignore_data_skip: bool = False
    full_determinism: bool = False
    seed: int = 42
    data_seed: int | None = None
    dataloader_drop_last: bool = False
    remove_unused_columns: bool = True
    label_names: list | None = None
    train_sampling_strategy: str = "random"
    deepspeed: str | dict | None = None
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    resume_from_checkpoint: str | None = None
    local_rank: int = -1
    # --- accepted, no effect in zerojax (see NO_EFFECT) ----------------------------------------------
    lr_scheduler_kwargs: dict | str | None = None
    optim: str = "adamw_torch_fused"
    optim_args: str | None = None
    optim_target_modules: str | list | None = None
    label_smoothing_factor: float = 0.0
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: bool | None = None
    activation_checkpointing_kwargs: dict | str | None = None
    gradient_checkpointing_kwargs: dict | str | None = None
    torch_compile: bool = False
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    use_liger_kernel: bool = False
    liger_kernel_config: dict | None = None
    use_cache: bool = False
    neftune_noise_alpha: float | None = None
    torch_empty_cache_steps: int | None = None
    auto_find_batch_size: bool = False
    log_on_each_node: bool = True
    logging_nan_inf_filter: bool = True
    include_num_input_tokens_seen: str | bool = "no"
    log_level: str = "passive"
    log_level_replica: str = "warning"
    project: str = "huggingface"
    trackio_space_id: str | None = None
    trackio_bucket_id: str | None = None
    trackio_static_space_id: str | None = None
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    eval_accumulation_steps: int | None = None
    include_for_metrics: list = dataclasses.field(default_factory=list)
    batch_eval_metrics: bool = False
    save_on_each_node: bool = False
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_model_id: str | None = None
    hub_strategy: str = "every_save"
    hub_always_push: bool = False
    hub_revision: str | None = None
    restore_callback_states_from_checkpoint: bool = False
    use_cpu: bool = False
    accelerator_config: dict | str | None = None
    parallelism_config: Any = None
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    dataloader_multiprocessing_context: str | None = None
    dataloader_in_order: bool = True
    length_column_name: str = "length"
    ddp_find_unused_parameters: bool | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_static_graph: bool | None = None
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    fsdp: str | list | None = None
    fsdp_config: dict | str | None = None
    debug: str | list = ""
    skip_memory_metrics: bool = True
    # --- not in Transformers 5 ------------------------------------------------------------------------
    warmup_ratio: float = 0.0
    logging_dir: str | None = None
    train_dataset_size: int | None = None
    transformers4_fields: dict = dataclasses.field(default_factory=dict, repr=False)  # from_dict's old names

    def __post_init__(self):
        for name, check in _CHECKS.items():
            check(name, getattr(self, name))
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError(
                f"TrainingArguments: warmup_steps={self.warmup_steps!r} and warmup_ratio={self.warmup_ratio!r} are "
                "both set; set one (warmup_steps < 1 is a ratio, as in Transformers 5)."
            )
        if self.fp16 and self.bf16:
            raise ValueError("TrainingArguments: fp16=True and bf16=True; choose one.")
        if self.save_only_model and self.load_best_model_at_end:
            raise ValueError(
                "TrainingArguments: save_only_model=True with load_best_model_at_end=True cannot resume the best "
                "model's optimizer state; set one of them to False (Transformers refuses this too)."
            )
        if self.save_strategy == "best" and self.eval_strategy == "no":
            raise ValueError(
                'TrainingArguments: save_strategy="best" saves when an evaluation improves metric_for_best_model, '
                'but eval_strategy="no" never evaluates; set eval_strategy to "steps" or "epoch".'
            )
        unknown = sorted(set(self.reporters) - set(REPORTERS) - set(_OTHER_REPORTERS))
        if unknown:
            raise ValueError(
                f"TrainingArguments: report_to={_shown(self.report_to)} names {unknown}, not an integration "
                f'Transformers knows; use "tensorboard" (written by zerojax), "none", or another integration name.'
            )

    # --- reading ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingArguments":
        """From a dict of field values, such as `json.loads(hf_args.to_json_string())`. Transformers 4
        names are read too (`evaluation_strategy` as `eval_strategy`; the others are accepted and named
        by `no_effect` when set). An unknown field or a bad value is a ValueError naming the field."""
        if not isinstance(values, dict):
            raise ValueError(f"TrainingArguments.from_dict: expected a dict of fields, got {type(values).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(values)
        if "evaluation_strategy" in values:  # Transformers < 4.46
            old = values.pop("evaluation_strategy")
            if values.get("eval_strategy") is None:
                values["eval_strategy"] = old
        legacy = {k: values.pop(k) for k in list(values) if k in _TRANSFORMERS4 and k not in names}
        unknown = sorted((k for k in values if k not in names), key=str)
        if unknown:
            hints = [repr(m[0]) for k in unknown[:5] if (m := _close(k, names))]
            raise ValueError(
                f"TrainingArguments: unknown fields {shown_list(unknown)}"
                + (f" (did you mean: {', '.join(hints)}?)" if hints else "")
                + "; the fields are transformers.TrainingArguments' (Transformers 5, or 4 when read from a dict)."
            )
        return cls(**values, **({"transformers4_fields": legacy} if legacy else {}))

    # --- what the fields mean here ---------------------------------------------------------------------
    @property
    def gradient_checkpointing_enabled(self) -> bool:
        """`activation_checkpointing` (Transformers 5) or its older name `gradient_checkpointing`."""
        return bool(self.activation_checkpointing or self.gradient_checkpointing)

    @property
    def reporters(self) -> list[str]:
        """`report_to` as a list ("none" and None: empty; "all": every integration zerojax writes)."""
        value = self.report_to
        items = [] if value is None else [value] if isinstance(value, str) else list(value)
        if "all" in items:
            return list(REPORTERS)
        return [r for r in items if r != "none"]

    def no_effect(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to a value that would change what Transformers does but has no
        effect in zerojax (defaults, and the placeholders `to_json_string()` writes, are not listed)."""
        out = [(name, reason) for name, reason in NO_EFFECT.items()
               if not _inert(name, getattr(self, name), _DEFAULTS.get(name))]
        out += [(f"report_to={r!r}", "zerojax writes TensorBoard event files only")
                for r in self.reporters if r not in REPORTERS]
        for name, value in self.transformers4_fields.items():
            if not _inert(name, value, _TRANSFORMERS4.get(name)):
                out.append((name, "a Transformers 4 field without a Transformers 5 counterpart here"))
        return out

    def warn_no_effect(self, extra: list[tuple[str, str]] = (), stacklevel: int = 3) -> None:
        """One `ArgsWarning` naming every field of `no_effect()` (and `extra`) with its reason."""
        items = [*self.no_effect(), *extra]
        if items:
            listed = "; ".join(f"{name} ({why})" for name, why in items)
            warnings.warn(f"TrainingArguments: {len(items)} field(s) have no effect in zerojax: {listed}.",
                          ArgsWarning, stacklevel=stacklevel)

    def total_steps(self, world_size: int) -> int | None:
        """Optimizer steps of the run as the Trainer counts them, or None when nothing determines it."""
        if self.max_steps > 0:
            return self.max_steps
        if self.train_dataset_size is None:
            return None
        batches = math.ceil(self.train_dataset_size / (self.per_device_train_batch_size * world_size))
        per_epoch = max(math.ceil(batches / self.gradient_accumulation_steps), 1)
        return math.ceil(self.num_train_epochs * per_epoch)

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps: `warmup_steps` if >= 1, else ceil(total × fraction) (Transformers' rule)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * (self.warmup_steps or self.warmup_ratio))


def interval(value: float | None, total: int | None) -> int:
    """`logging_steps`/`eval_steps`/`save_steps` as a step count: >= 1 as given, below 1 a fraction of
    `total` (rounded up, as Transformers does); 0 or None: 0 (never)."""
    if not value:
        return 0
    if value >= 1:
        return int(value)
    if total is None:
        raise ValueError(f"TrainingArguments: a step interval of {value!r} is a fraction of the total steps, which "
                         "are unknown (an iterable dataset without max_steps); give a step count >= 1.")
    return max(1, math.ceil(total * value))


# --- why each accepted field has no effect ------------------------------------------------------------
_DDP = "zerojax runs no DDP; the mesh and the DeepSpeed config decide how work is split"
_LOADER = "batches are read in the training process (zerojax.data), there is no DataLoader"
_HUB = "zerojax does not push to the Hub; upload the folder Trainer.save_model writes"
_TORCH = "a PyTorch switch; the step is one XLA program"
_LOG = "zerojax logs from process 0 only"
NO_EFFECT: dict[str, str] = {
    "lr_scheduler_kwargs": "the schedule comes from the DeepSpeed scheduler block or lr_scheduler_type",
    "optim": "the optimizer comes from the DeepSpeed optimizer block, else AdamW (zerojax.optim)",
    "optim_args": "the optimizer comes from the DeepSpeed optimizer block",
    "optim_target_modules": "GaLore/APOLLO are not implemented",
    "label_smoothing_factor": "the default loss has no label smoothing; pass a loss_fn that smooths",
    "bf16_full_eval": "evaluation runs in the training compute dtype",
    "fp16_full_eval": "evaluation runs in the training compute dtype",
    "tf32": "set jax_default_matmul_precision instead",
    "activation_checkpointing_kwargs": "jax.checkpoint has no reentrant variant; the policy is the model's remat",
    "gradient_checkpointing_kwargs": "jax.checkpoint has no reentrant variant; the policy is the model's remat",
    "torch_compile": _TORCH, "torch_compile_backend": _TORCH, "torch_compile_mode": _TORCH,
    "use_liger_kernel": "Liger kernels are PyTorch kernels", "liger_kernel_config": "Liger kernels are PyTorch kernels",
    "use_cache": "training never uses a KV cache here",
    "neftune_noise_alpha": "NEFTune embedding noise is not implemented",
    "torch_empty_cache_steps": _TORCH,
    "auto_find_batch_size": "the batch size is the DeepSpeed config's; stage 'auto' picks what fits",
    "log_on_each_node": _LOG, "logging_nan_inf_filter": "zerojax logs each logged step's own loss",
    "include_num_input_tokens_seen": "zerojax logs tokens_per_s instead",
    "log_level": "zerojax uses warnings and stderr, not transformers.logging",
    "log_level_replica": "zerojax uses warnings and stderr, not transformers.logging",
    "project": "Trackio is not supported", "trackio_space_id": "Trackio is not supported",
    "trackio_bucket_id": "Trackio is not supported", "trackio_static_space_id": "Trackio is not supported",
    "eval_do_concat_batches": "evaluation returns losses only, no predictions",
    "eval_use_gather_object": "evaluation returns losses only, no predictions",
    "eval_accumulation_steps": "evaluation returns losses only, no predictions",
    "include_for_metrics": "evaluation returns losses only, no predictions",
    "batch_eval_metrics": "evaluation returns losses only, no predictions",
    "save_on_each_node": "process 0 writes the shared parts of a checkpoint; orbax writes each process's shards",
    "push_to_hub": _HUB, "hub_private_repo": _HUB, "hub_model_id": _HUB, "hub_strategy": _HUB,
    "hub_always_push": _HUB, "hub_revision": _HUB, "hub_token": _HUB,
    "restore_callback_states_from_checkpoint": "callback state is not saved in checkpoints",
    "use_cpu": "choose the platform with JAX_PLATFORMS=cpu",
    "accelerator_config": "there is no Accelerate here; the DeepSpeed config and the mesh decide",
    "parallelism_config": "the DeepSpeed config and the mesh decide the parallelism",
    "dataloader_num_workers": _LOADER, "dataloader_pin_memory": _LOADER, "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER, "dataloader_multiprocessing_context": _LOADER,
    "dataloader_in_order": _LOADER,
    "length_column_name": "group_by_length sampling is not implemented",
    "ddp_find_unused_parameters": _DDP, "ddp_bucket_cap_mb": _DDP, "ddp_broadcast_buffers": _DDP,
    "ddp_static_graph": _DDP, "ddp_backend": _DDP, "ddp_timeout": _DDP,
    "fsdp": "ZeRO is configured by the DeepSpeed config (stage 3 is FSDP's full sharding)",
    "fsdp_config": "ZeRO is configured by the DeepSpeed config (stage 3 is FSDP's full sharding)",
    "debug": "PyTorch/XLA debug options",
    "skip_memory_metrics": "device memory is logged whenever the platform reports it",
    "label_names": "the default loss reads the labels column (pass a loss_fn for other names)",
    "train_sampling_strategy": "group_by_length sampling is not implemented",
}
# Not listed, because what they ask is what zerojax does anyway or Transformers' Trainer ignores them too:
# logging_first_step (the first step is always logged), prediction_loss_only (evaluation gives losses),
# enable_jit_checkpoint (SIGTERM always saves at the next step boundary), full_determinism (XLA steps are
# deterministic), dataloader_drop_last (a partial last batch is always dropped: static shapes), do_train /
# do_eval / do_predict / resume_from_checkpoint (read by scripts, not by Transformers' Trainer), local_rank
# (set by PyTorch launchers; zerojax.distributed decides ranks).

_OTHER_REPORTERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "mlflow",
                    "neptune", "swanlab", "trackio", "wandb", "kubeflow")
_JSON_PLACEHOLDERS = ("<HUB_TOKEN>", "<PUSH_TO_HUB_TOKEN>")
# AcceleratorConfig() as `to_json_string()` writes it
_ACCELERATOR_DEFAULTS = {"split_batches": False, "dispatch_batches": None, "even_batches": True,
                         "use_seedable_sampler": True, "non_blocking": False, "gradient_accumulation_kwargs": None}

# Transformers 4 fields (and Seq2SeqTrainingArguments') that Transformers 5 dropped, with their defaults
_TRANSFORMERS4: dict[str, Any] = {
    "overwrite_output_dir": False, "per_gpu_train_batch_size": None, "per_gpu_eval_batch_size": None,
    "save_safetensors": True, "no_cuda": False, "use_mps_device": False, "jit_mode_eval": False, "use_ipex": False,
    "half_precision_backend": "auto", "fp16_opt_level": "O1", "fp16_backend": "auto",
    "tpu_num_cores": None, "tpu_metrics_debug": False, "past_index": -1, "ray_scope": "last",
    "include_inputs_for_metrics": False, "include_tokens_per_second": False, "dispatch_batches": None,
    "split_batches": None, "push_to_hub_model_id": None, "push_to_hub_organization": None,
    "push_to_hub_token": None, "mp_parameters": "", "use_legacy_prediction_loop": False, "torchdynamo": None,
    "xpu_backend": None, "sharded_ddp": "", "fsdp_min_num_params": 0, "fsdp_transformer_layer_cls_to_wrap": None,
    "group_by_length": False, "tp_size": 0, "sortish_sampler": False, "predict_with_generate": False,
    "generation_max_length": None, "generation_num_beams": None, "generation_config": None,
}


# --- validation: every field, one line naming it ----------------------------------------------------------
def _fail(name: str, value: Any, must: str):
    raise ValueError(f"TrainingArguments: {name}={_shown(value)} {must}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT - 1 <= value <= _MAX_INT


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        math.isfinite(value) if isinstance(value, float) else abs(value) <= _MAX_INT)


def _optional(check):
    """`check`, with None also accepted."""
    return lambda name, value: value is None or check(name, value)


def _positive_int(name, value):
    if not _is_int(value) or value < 1:
        _fail(name, value, "must be a positive integer")


def _int(lo: int):
    def check(name, value):
        if not _is_int(value) or value < lo:
            _fail(name, value, f"must be an integer >= {lo}")
    return check


def _seed(name, value):
    if value is not None and (not _is_int(value) or not 0 <= value < 2**32):
        _fail(name, value, "must be an integer in [0, 2**32)")


def _nonneg(name, value):
    if not _is_num(value) or value < 0:
        _fail(name, value, "must be a finite number >= 0")


def _fraction_or_steps(name, value):
    if not _is_num(value) or value < 0:
        _fail(name, value, "must be a step count >= 1, a fraction of the total steps in (0, 1), or 0")


def _beta(name, value):
    if not _is_num(value) or not 0 <= value < 1:
        _fail(name, value, "must be in [0, 1)")


def _bool(name, value):
    if not isinstance(value, bool):
        _fail(name, value, "must be true or false")


def _str(name, value):
    if not isinstance(value, str) or len(value) > 4096:
        _fail(name, value, "must be a string (at most 4096 characters)")


def _choice(options, optional: bool = False):
    def check(name, value):
        if optional and value is None:
            return
        if not isinstance(value, str) or value not in options:
            _fail(name, value, f"must be one of {list(options)}" + (" or None" if optional else ""))
    return check


def _scheduler(name, value):
    if not isinstance(value, str) or value not in LR_SCHEDULER_TYPES:
        _fail(name, value, f"is not supported; use one of {list(LR_SCHEDULER_TYPES)} (or a DeepSpeed scheduler block)")


def _report_to(name, value):
    items = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if value is not None and (items is None or len(items) > 20 or not all(isinstance(i, str) for i in items)):
        _fail(name, value, 'must be an integration name ("tensorboard", "none", "all", ...) or a list of them')


def _types(*types, what: str):
    def check(name, value):
        if value is not None and not isinstance(value, types):
            _fail(name, value, f"must be {what}")
    return check


_json = _types(dict, str, what="a dict, a JSON string or null")
_str_or_list = _types(str, list, tuple, what="a string, a list or null")
_opt_positive_int, _opt_nonneg, _opt_bool, _opt_str = map(_optional, (_positive_int, _nonneg, _bool, _str))
_CHECKS: dict[str, Any] = {
    "output_dir": _opt_str, "per_device_train_batch_size": _positive_int, "per_device_eval_batch_size": _positive_int,
    "gradient_accumulation_steps": _positive_int, "num_train_epochs": _nonneg, "max_steps": _int(-1),
    "learning_rate": _nonneg, "weight_decay": _nonneg, "adam_epsilon": _nonneg, "max_grad_norm": _nonneg,
    "adam_beta1": _beta, "adam_beta2": _beta, "lr_scheduler_type": _scheduler,
    "warmup_steps": _fraction_or_steps, "warmup_ratio": _beta, "bf16": _bool, "fp16": _bool,
    "average_tokens_across_devices": _bool, "activation_checkpointing": _opt_bool, "gradient_checkpointing": _opt_bool,
    "logging_strategy": _choice(INTERVAL_STRATEGIES), "logging_steps": _fraction_or_steps,
    "logging_first_step": _bool, "disable_tqdm": _opt_bool, "report_to": _report_to, "run_name": _opt_str,
    "eval_strategy": _choice(INTERVAL_STRATEGIES, optional=True), "eval_steps": _opt_nonneg, "eval_delay": _nonneg,
    "prediction_loss_only": _bool, "eval_on_start": _bool, "save_only_model": _bool,
    "save_strategy": _choice(SAVE_STRATEGIES), "save_steps": _fraction_or_steps,
    "save_total_limit": _opt_positive_int, "enable_jit_checkpoint": _bool, "load_best_model_at_end": _bool,
    "metric_for_best_model": _opt_str, "greater_is_better": _opt_bool, "ignore_data_skip": _bool,
    "full_determinism": _bool, "seed": _seed, "data_seed": _seed, "dataloader_drop_last": _bool,
    "remove_unused_columns": _bool, "label_names": _types(list, tuple, what="a list of column names or null"),
    "train_sampling_strategy": _choice(("random", "sequential", "group_by_length", "batch_rebalance")),
    "deepspeed": _types(dict, str, what="a DeepSpeed config path, a dict or null"), "do_train": _bool, "do_eval": _bool, "do_predict": _bool,
    "resume_from_checkpoint": _types(str, bool, what="a path, true or null"), "local_rank": _int(-1),
    "lr_scheduler_kwargs": _json, "optim": _str, "optim_args": _opt_str, "optim_target_modules": _str_or_list,
    "label_smoothing_factor": _beta, "bf16_full_eval": _bool, "fp16_full_eval": _bool, "tf32": _opt_bool,
    "activation_checkpointing_kwargs": _json, "gradient_checkpointing_kwargs": _json, "torch_compile": _bool,
    "torch_compile_backend": _opt_str, "torch_compile_mode": _opt_str, "use_liger_kernel": _bool,
    "liger_kernel_config": _json, "use_cache": _bool, "neftune_noise_alpha": _opt_nonneg,
    "torch_empty_cache_steps": _opt_positive_int, "auto_find_batch_size": _bool, "log_on_each_node": _bool,
    "logging_nan_inf_filter": _bool, "include_num_input_tokens_seen": _types(str, bool, what="'no', 'all', "
                                                                              "'non_padding' or a bool"),
    "log_level": _str, "log_level_replica": _str, "project": _opt_str, "trackio_space_id": _opt_str,
    "trackio_bucket_id": _opt_str, "trackio_static_space_id": _opt_str, "eval_do_concat_batches": _bool,
    "eval_use_gather_object": _bool, "eval_accumulation_steps": _opt_positive_int,
    "include_for_metrics": _types(list, tuple, what="a list"), "batch_eval_metrics": _bool,
    "save_on_each_node": _bool, "push_to_hub": _bool, "hub_token": _opt_str, "hub_private_repo": _opt_bool,
    "hub_model_id": _opt_str, "hub_strategy": _str, "hub_always_push": _bool, "hub_revision": _opt_str,
    "restore_callback_states_from_checkpoint": _bool, "use_cpu": _bool, "accelerator_config": _json,
    "dataloader_num_workers": _int(0), "dataloader_pin_memory": _bool, "dataloader_persistent_workers": _bool,
    "dataloader_prefetch_factor": _opt_positive_int, "dataloader_multiprocessing_context": _opt_str,
    "dataloader_in_order": _bool, "length_column_name": _str, "ddp_find_unused_parameters": _opt_bool,
    "ddp_bucket_cap_mb": _opt_positive_int, "ddp_broadcast_buffers": _opt_bool, "ddp_static_graph": _opt_bool,
    "ddp_backend": _opt_str, "ddp_timeout": _int(0), "fsdp": _str_or_list, "fsdp_config": _json,
    "debug": _str_or_list, "skip_memory_metrics": _bool, "logging_dir": _opt_str,
    "transformers4_fields": _types(dict, what="a dict"),
    "train_dataset_size": _opt_positive_int, "parallelism_config": lambda name, value: None,
}
_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(TrainingArguments)}
assert set(_CHECKS) == set(_DEFAULTS), set(_CHECKS) ^ set(_DEFAULTS)


def _inert(name: str, value: Any, default: Any) -> bool:
    """Whether `value` asks for nothing beyond the default (incl. the forms `to_json_string()` writes)."""
    if value == default or value in _JSON_PLACEHOLDERS:
        return True
    if value is None or value is False or (isinstance(value, (str, list, tuple, dict)) and not value):
        return default in (None, False, "", [], {}, ())
    if name == "accelerator_config" and isinstance(value, dict):
        return all(_ACCELERATOR_DEFAULTS.get(k, object()) == v for k, v in value.items())
    if name == "optim":
        return isinstance(value, str) and value.startswith("adamw_") and "8bit" not in value \
            and "4bit" not in value and "anyprecision" not in value
    if name == "label_names":
        return list(value) == ["labels"]
    if name == "train_sampling_strategy":
        return value in ("random", "sequential")
    return False


def shown_list(names: list) -> str:
    """`['a', 'b', ...]`: at most 5 names, each shortened, and how many more there are."""
    head = "[" + ", ".join(_shown(n) for n in names[:5]) + "]"
    return head if len(names) <= 5 else f"{head} and {len(names) - 5} more"


def _close(name: str, names) -> list[str]:
    import difflib

    if not isinstance(name, str) or len(name) > 100:
        return []
    return difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.8)
