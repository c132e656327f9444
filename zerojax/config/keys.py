"""Every DeepSpeed config key zerojax knows: its type, default, range, and what it does here.

The tables below are the single source for validation, for `ZeroConfig.to_dict()` (defaults filled in)
and for docs/config.md. `effect` says what a key maps to in zerojax, or why it has no effect under XLA.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from typing import Any

from zerojax.config.errors import MAX_LISTED, ConfigWarning, key_text, listed, shown

MAPPED, NO_EFFECT, ERROR = "mapped", "no effect", "error"


class _Unresolved:
    """Marks an "auto" that could not be resolved (already reported); validation skips it."""

    def __repr__(self) -> str:
        return "'auto'"


UNRESOLVED = _Unresolved()


@dataclasses.dataclass(frozen=True)
class Key:
    """One DeepSpeed key: `name` is DeepSpeed's spelling (what `to_dict` writes); `aliases` also accepted;
    `old_names`: deprecated spellings, accepted too (`deprecated.py` warns about them)."""

    name: str
    kind: str  # bool | int | number | str | dict | list | any
    default: Any
    status: str
    effect: str
    aliases: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    old_names: tuple[str, ...] = ()


def _k(name, kind, default, status, effect, **kw) -> Key:
    return Key(name, kind, default, status, effect, **kw)


_TUNING = "a PyTorch bucketing/memory knob; XLA schedules and fuses collectives itself"

OFFLOAD_PARAM = (
    _k("device", "str", "none", MAPPED, "`cpu`: stage-3 parameters live in `pinned_host` memory; `nvme` is an error",
       choices=("none", "cpu", "nvme")),
    _k("nvme_path", "str", None, NO_EFFECT, "NVMe offload is not supported", nullable=True),
    _k("buffer_count", "int", 5, NO_EFFECT, "NVMe buffer pool", minimum=0),
    _k("buffer_size", "int", 100_000_000, NO_EFFECT, "NVMe buffer pool", minimum=0),
    _k("max_in_cpu", "int", 1_000_000_000, NO_EFFECT, "NVMe staging", minimum=0),
    _k("pin_memory", "bool", True, MAPPED, "`pinned_host` (true) or `unpinned_host` (false) memory kind"),
)
OFFLOAD_OPTIMIZER = (
    _k("device", "str", "none", MAPPED, "`cpu`: fp32 master and optimizer state live in host memory; `nvme` is an error",
       choices=("none", "cpu", "nvme")),
    _k("nvme_path", "str", None, NO_EFFECT, "NVMe offload is not supported", nullable=True),
    _k("buffer_count", "int", 4, NO_EFFECT, "NVMe buffer pool", minimum=0),
    _k("pin_memory", "bool", True, MAPPED, "`pinned_host` (true) or `unpinned_host` (false) memory kind"),
    _k("pipeline_read", "bool", False, NO_EFFECT, "NVMe pipelining"),
    _k("pipeline_write", "bool", False, NO_EFFECT, "NVMe pipelining"),
    _k("fast_init", "bool", False, NO_EFFECT, "NVMe initialisation"),
    _k("ratio", "number", 1.0, MAPPED, "fraction of optimizer state offloaded (stage 3 only below 1.0)",
       minimum=0.0, maximum=1.0),
    _k("super_offload", "bool", False, NO_EFFECT, "Superchip-specific CPU Adam scheduling"),
    _k("cpuadam_cores_perc", "number", 0.8, NO_EFFECT, "CPU Adam threading; XLA runs the host update",
       minimum=0.0, maximum=1.0),
)
ZERO = (
    _k("stage", "int", 0, MAPPED, "`ZeroRules(stage=...)`; \"auto\": the Trainer compiles each option and takes the cheapest that fits",
       minimum=0, maximum=3),
    _k("contiguous_gradients", "bool", True, NO_EFFECT, _TUNING),
    _k("reduce_scatter", "bool", True, NO_EFFECT, "zerojax always reduce-scatters sharded gradients"),
    _k("reduce_bucket_size", "int", 500_000_000, MAPPED,
       "XLA reduce-scatter/all-reduce combine thresholds (`zerojax.xla_flags`)", minimum=0),
    _k("use_multi_rank_bucket_allreduce", "bool", True, NO_EFFECT, _TUNING),
    _k("allgather_partitions", "bool", True, NO_EFFECT, "zerojax always all-gathers partitions"),
    _k("allgather_bucket_size", "int", 500_000_000, MAPPED, "XLA all-gather combine threshold (`zerojax.xla_flags`)",
       minimum=0),
    _k("overlap_comm", "bool", None, MAPPED, "XLA latency-hiding scheduler (`zerojax.xla_flags`); default true at stage 3",
       nullable=True),
    _k("load_from_fp32_weights", "bool", True, NO_EFFECT, "zerojax checkpoints always restore the fp32 master"),
    _k("elastic_checkpoint", "bool", False, NO_EFFECT, "orbax restores onto any mesh"),
    _k("offload_param", "dict", None, MAPPED, "see offload_param.* below", nullable=True),
    _k("offload_optimizer", "dict", None, MAPPED, "see offload_optimizer.* below", nullable=True),
    _k("zenflow", "dict", None, NO_EFFECT, "ZenFlow asynchronous CPU updates are not implemented", nullable=True),
    _k("sub_group_size", "int", 1_000_000_000, NO_EFFECT, _TUNING, minimum=0),
    _k("stage3_prefetch_bucket_size", "int", 50_000_000, MAPPED,
       "XLA all-gather combine threshold at stage 3 (`zerojax.xla_flags`)", aliases=("prefetch_bucket_size",),
       minimum=0),
    _k("stage3_param_persistence_threshold", "int", 100_000, MAPPED, "`ZeroRules(persistence_threshold=...)`",
       aliases=("param_persistence_threshold",), minimum=0),
    _k("stage3_model_persistence_threshold", "int", 9223372036854775807, NO_EFFECT,
       "a cap on persistent bytes; zerojax applies the per-tensor threshold only",
       aliases=("model_persistence_threshold",), minimum=0),
    _k("stage3_max_live_parameters", "int", 1_000_000_000, NO_EFFECT, "XLA frees gathered weights after use",
       aliases=("max_live_parameters",), minimum=0),
    _k("stage3_max_reuse_distance", "int", 1_000_000_000, NO_EFFECT, "XLA frees gathered weights after use",
       aliases=("max_reuse_distance",), minimum=0),
    _k("stage3_gather_16bit_weights_on_model_save", "bool", False, MAPPED,
       "`ZeroConfig.gather_16bit_weights_on_model_save` (export consolidates the 16-bit weights)",
       aliases=("gather_16bit_weights_on_model_save",), old_names=("stage3_gather_fp16_weights_on_model_save",)),
    _k("stage3_module_granularity_threshold", "int", 0, NO_EFFECT, "PyTorch hook granularity",
       aliases=("module_granularity_threshold",)),
    _k("stage3_use_all_reduce_for_fetch_params", "bool", False, NO_EFFECT, "zerojax gathers with all-gather",
       aliases=("use_all_reduce_for_fetch_params",)),
    _k("stage3_allgather_sequential", "bool", False, NO_EFFECT, _TUNING, aliases=("allgather_sequential",)),
    _k("ignore_unused_parameters", "bool", True, NO_EFFECT, "JAX gives unused parameters zero gradients"),
    _k("legacy_stage1", "bool", False, NO_EFFECT, "a PyTorch implementation choice"),
    _k("round_robin_gradients", "bool", False, NO_EFFECT, _TUNING),
    _k("zero_hpz_partition_size", "int", 1, MAPPED,
       "ZeRO++ hpZ: mesh `fsdp` = this size, `replica` = world / size, `ZeRO rules hierarchy='hpz'`", minimum=0),
    _k("zero_quantized_weights", "bool", False, MAPPED, "ZeRO++ qwZ: `Quantization(weights=True)`, the stage-3 "
       "weight all-gather as int8 blocks of 2048 with an fp32 scale each (`zerojax.zeropp`); stage 3 only"),
    _k("zero_quantized_nontrainable_weights", "bool", False, NO_EFFECT, "zerojax trains every weight it gathers; "
       "zero_quantized_weights quantizes their gathers"),
    _k("zero_quantized_gradients", "bool", False, MAPPED, "ZeRO++ qgZ: `Quantization(gradients=True)`, the gradient "
       "reduce-scatter as int4 blocks of 256 with an fp32 scale each through all-to-all, summed in fp32; "
       "stages 1-3 (all-reduces stay exact)"),
    _k("zeropp_loco_param", "dict", None, NO_EFFECT, "LoCo error feedback for quantized gradients", nullable=True),
    _k("mics_shard_size", "int", -1, MAPPED, "MiCS: mesh `fsdp` = this size, `replica` = world / size, "
       "`hierarchy='mics'`; -1 disables", minimum=-1),
    _k("mics_hierarchical_params_gather", "bool", False, NO_EFFECT, "XLA picks the all-gather algorithm"),
    _k("memory_efficient_linear", "bool", True, NO_EFFECT, "a PyTorch autograd function"),
    _k("pipeline_loading_checkpoint", "bool", False, NO_EFFECT, "a PyTorch loading path"),
    _k("override_module_apply", "bool", True, NO_EFFECT, "PyTorch module hooks"),
    _k("log_trace_cache_warnings", "bool", False, NO_EFFECT, "PyTorch trace cache"),
    _k("enable_sanity_checks", "bool", False, NO_EFFECT, "PyTorch hook checks"),
    _k("save_muon_momentum_buffer_in_memory", "bool", False, NO_EFFECT, "Muon is not supported"),
    _k("leaf_module", "dict", None, NO_EFFECT, "PyTorch module hooks; XLA sees the whole step", nullable=True),
)
FP16 = (
    _k("enabled", "bool", False, MAPPED, "`Precision.fp16`: fp16 compute copy, fp32 master"),
    _k("auto_cast", "bool", False, NO_EFFECT, "inputs are cast by the model's own dtype policy"),
    _k("loss_scale", "number", 0.0, MAPPED, "0: dynamic `LossScale`; > 0: `LossScale(static=...)`", minimum=0.0),
    _k("initial_scale_power", "int", 16, MAPPED, "`LossScale.initial_scale_power`", minimum=0, maximum=126),
    _k("loss_scale_window", "int", 1000, MAPPED, "`LossScale.window`", minimum=1, maximum=2**31 - 1),
    _k("hysteresis", "int", 2, MAPPED, "`LossScale.hysteresis`", minimum=1, maximum=2**31 - 1),
    _k("consecutive_hysteresis", "bool", False, MAPPED, "`LossScale.consecutive_hysteresis`"),
    _k("min_loss_scale", "number", 1, MAPPED, "`LossScale.min_scale`", minimum=0.0),
    _k("fp16_master_weights_and_grads", "bool", False, MAPPED, "`Precision(master_dtype='fp16')`: no fp32 master"),
)
BF16 = (
    _k("enabled", "bool", False, MAPPED, "`Precision.bf16`: bf16 compute copy, fp32 master"),
    _k("immediate_grad_update", "bool", False, NO_EFFECT, "gradients are reduced inside the compiled step"),
    _k("check_grad_overflow", "bool", True, NO_EFFECT, "zerojax always skips steps with inf/nan gradients"),
    _k("bf16_master_weights_and_grads", "bool", False, MAPPED, "`Precision(master_dtype='bf16')`: no fp32 master"),
    _k("bf16_optimizer_states", "bool", False, NO_EFFECT, "optimizer state dtype follows the optax optimizer"),
)
ACTIVATION_CHECKPOINTING = (
    _k("cpu_checkpointing", "bool", False, MAPPED, "each layer's saved input in pinned host memory, the rest "
       "recomputed (`remat=\"offload\"` on the model; the Trainer turns remat on)"),
    _k("partition_activations", "bool", False, NO_EFFECT, "each device already holds only its own batch's "
       "activations; DeepSpeed splits them over model-parallel ranks"),
    _k("contiguous_memory_optimization", "bool", False, NO_EFFECT, "XLA assigns the buffers"),
    _k("number_checkpoints", "int", None, NO_EFFECT, "sizes DeepSpeed's contiguous buffer", minimum=1, nullable=True),
    _k("synchronize_checkpoint_boundary", "bool", False, NO_EFFECT, "a CUDA synchronize"),
    _k("profile", "bool", False, NO_EFFECT, "use the JAX profiler"),
)
DATA_TYPES = (
    _k("grad_accum_dtype", "str", None, MAPPED, "`Precision.accum_dtype` (default fp32)",
       choices=("fp32", "fp16", "bf16"), nullable=True),
)
TOP = (
    _k("train_batch_size", "int", None, MAPPED, "global batch = micro × accumulation × world size", minimum=1,
       nullable=True),
    _k("train_micro_batch_size_per_gpu", "int", None, MAPPED, "per-device micro-batch", minimum=1, nullable=True),
    _k("gradient_accumulation_steps", "int", None, MAPPED, "`make_train_step(micro_batches=...)`", minimum=1,
       nullable=True),
    _k("gradient_clipping", "number", 1.0, MAPPED, "`make_train_step(max_grad_norm=...)`; 0 disables "
       "(default 1.0 as in DeepSpeed >= 0.19.3)", minimum=0.0),
    _k("communication_data_type", "str", None, MAPPED, "`Precision.reduce_dtype` ('bfp16' accepted as bf16)",
       choices=("fp16", "bf16", "fp32"), nullable=True),
    _k("fp32_allreduce", "bool", False, MAPPED, "true: `Precision.reduce_dtype = fp32`"),
    _k("seq_parallel_communication_data_type", "str", None, NO_EFFECT, "sequence parallelism is not implemented",
       nullable=True),
    _k("prescale_gradients", "bool", False, NO_EFFECT, "zerojax reduces sums and divides once in fp32"),
    _k("gradient_predivide_factor", "number", 1.0, NO_EFFECT, "zerojax reduces sums and divides once in fp32"),
    _k("steps_per_print", "number", 10, NO_EFFECT, "logging is the trainer's job"),
    _k("wall_clock_breakdown", "bool", False, NO_EFFECT, "use the JAX profiler"),
    _k("memory_breakdown", "bool", False, NO_EFFECT, "use `compiled.memory_analysis()`"),
    _k("dump_state", "bool", False, NO_EFFECT, "debug printing"),
    _k("sparse_gradients", "bool", False, NO_EFFECT, "JAX gradients are dense"),
    _k("zero_allow_untested_optimizer", "bool", False, NO_EFFECT, "every optax optimizer works with ZeRO rules"),
    _k("zero_force_ds_cpu_optimizer", "bool", True, NO_EFFECT, "the host update is the same optax optimizer"),
    _k("disable_allgather", "bool", False, NO_EFFECT, "a legacy PyTorch switch"),
    _k("optimizer", "dict", None, MAPPED, "`ZeroConfig.optimizer()` → optax (zerojax.optim)", nullable=True),
    _k("scheduler", "dict", None, MAPPED, "learning-rate schedule inside `ZeroConfig.optimizer()`", nullable=True),
    _k("zero_optimization", "dict", None, MAPPED, "see zero_optimization.* below", nullable=True),
    _k("fp16", "dict", None, MAPPED, "see fp16.* below", nullable=True),
    _k("bf16", "dict", None, MAPPED, "see bf16.* below (old name `bfloat16`)", nullable=True, old_names=("bfloat16",)),
    _k("data_types", "dict", None, MAPPED, "see data_types.* below", nullable=True),
    _k("amp", "dict", None, ERROR, "NVIDIA Apex AMP: enabled is an error, use fp16 or bf16", nullable=True),
    _k("activation_checkpointing", "dict", None, MAPPED, "see activation_checkpointing.* below", nullable=True),
    _k("flops_profiler", "dict", None, NO_EFFECT, "use `compiled.cost_analysis()`", nullable=True),
    _k("sparse_attention", "dict", None, NO_EFFECT, "a model-side PyTorch kernel", nullable=True),
    _k("aio", "dict", None, NO_EFFECT, "NVMe I/O settings; NVMe offload is not supported", nullable=True),
    _k("comms_logger", "dict", None, NO_EFFECT, "read collectives from the lowered HLO", nullable=True),
    _k("checkpoint", "dict", None, NO_EFFECT, "orbax checkpoints reshard on restore", nullable=True),
    _k("tensorboard", "dict", None, NO_EFFECT, "monitoring is the trainer's job", nullable=True),
    _k("wandb", "dict", None, NO_EFFECT, "monitoring is the trainer's job", nullable=True),
    _k("csv_monitor", "dict", None, NO_EFFECT, "monitoring is the trainer's job", nullable=True),
    _k("comet", "dict", None, NO_EFFECT, "monitoring is the trainer's job", nullable=True),
    _k("elasticity", "dict", None, NO_EFFECT, "elastic batch sizing is not implemented", nullable=True),
    _k("autotuning", "dict", None, NO_EFFECT, "DeepSpeed's autotuner", nullable=True),
    _k("compression_training", "dict", None, NO_EFFECT, "DeepSpeed compression", nullable=True),
    _k("data_efficiency", "dict", None, NO_EFFECT, "DeepSpeed data sampling/routing", nullable=True),
    _k("curriculum_learning", "dict", None, NO_EFFECT, "DeepSpeed data sampling", nullable=True),
    _k("pipeline", "dict", None, NO_EFFECT, "pipeline parallelism is not implemented", nullable=True),
    _k("nebula", "dict", None, NO_EFFECT, "Azure checkpoint service", nullable=True),
    _k("eigenvalue", "dict", None, NO_EFFECT, "DeepSpeed eigenvalue estimation", nullable=True),
    _k("progressive_layer_drop", "dict", None, NO_EFFECT, "DeepSpeed layer drop", nullable=True),
    _k("torch_autocast", "dict", None, NO_EFFECT, "PyTorch autocast; precision comes from fp16/bf16", nullable=True),
    _k("compile", "dict", None, NO_EFFECT, "torch.compile; the step is always XLA-compiled", nullable=True),
)
BLOCKS = {
    "": TOP, "zero_optimization": ZERO, "zero_optimization.offload_param": OFFLOAD_PARAM,
    "zero_optimization.offload_optimizer": OFFLOAD_OPTIMIZER, "fp16": FP16, "bf16": BF16, "data_types": DATA_TYPES,
    "activation_checkpointing": ACTIVATION_CHECKPOINTING,
}


def by_name(spec: tuple[Key, ...]) -> dict[str, Key]:
    """Each accepted spelling (name, aliases and old names) → its `Key`."""
    return {n: k for k in spec for n in (k.name, *k.aliases, *k.old_names)}


def spelled(raw: dict, spec: tuple[Key, ...], name: str) -> str:
    """How `raw` spells the key `name` of `spec` (its first accepted spelling present), else `name`."""
    key = by_name(spec)[name]
    return next((n for n in (key.name, *key.aliases, *key.old_names) if n in raw), name)


def did_you_mean(word: str, candidates) -> str:
    """' (did you mean X?)' for the closest candidate, else '' (also for words too long to be a typo)."""
    if len(word) > 64:
        return ""
    close = difflib.get_close_matches(word.lstrip("_"), list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(key: Key, path: str, value: Any, problems: list[str]) -> Any:
    """`value` converted to `key`'s type (integral floats such as 1e9 → int); a problem is recorded if not."""
    if value is None and key.nullable:
        return None
    if value is UNRESOLVED:
        return key.default
    bad = None
    if key.kind == "bool":
        if not isinstance(value, bool):
            bad = "true or false"
    elif key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad = "an integer"
        elif isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                bad = "an integer"
            else:
                value = int(value)
    elif key.kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad = "a finite number"
    elif key.kind == "str":
        if not isinstance(value, str):
            bad = "a string"
        elif key.choices and value.lower() not in key.choices:
            bad = f"one of {list(key.choices)}"
        else:
            value = value.lower() if key.choices else value
    elif key.kind == "dict" and not isinstance(value, dict):
        bad = "an object"
    if bad is None and key.minimum is not None and value < key.minimum:
        bad = f">= {key.minimum}"
    if bad is None and key.maximum is not None and value > key.maximum:
        bad = f"<= {key.maximum}"
    if bad is not None:
        hint = ' ("auto" here needs training_args / model_config to resolve it)' if value == "auto" else ""
        problems.append(f"{path}={shown(value)} is invalid: it must be {bad}{hint}.")
        return key.default
    return value


def validate_block(block: str, raw: dict, problems: list[str], ignored: list[str],
                   unknown: list[str] | None = None, where: str | None = None) -> dict:
    """`raw` checked against the block's keys: canonical names, types, every default filled in.

    Unknown keys are problems with a did-you-mean, or one problem listing them when there are more than
    `MAX_LISTED` (when `unknown` is a list they are collected there instead); keys set explicitly that have
    no effect here are appended to `ignored`. Nested blocks come back as given. `where` is the block's path
    as the config spells it (default: `block`).
    """
    spec = BLOCKS[block]
    names = by_name(spec)
    prefix = f"{block if where is None else where}." if block else ""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    typos: list[str] = []
    for name, value in raw.items():
        key = names.get(name)
        if key is None and unknown is not None:
            unknown.append(prefix + name)
            continue
        if key is None:
            typos.append(name)
            continue
        if key.name in seen:
            problems.append(
                f"{prefix}{seen[key.name]} and {prefix}{name} are the same setting given twice; keep one of them."
            )
            continue
        seen[key.name] = name
        out[key.name] = coerce(key, prefix + name, value, problems)
        if key.status == NO_EFFECT and value not in (None, False, key.default):
            ignored.append(prefix + name)
    kind = f"DeepSpeed {block or 'top-level'} key"
    if len(typos) > MAX_LISTED:
        problems.append(f"{where or block or 'the config'} has {len(typos):,} keys that are not {kind}s: {listed(typos)}; "
                        "fix or remove them.")
    else:
        problems.extend(f"{prefix}{key_text(n)} is not a {kind}{did_you_mean(n, names)}; fix or remove it." for n in typos)
    for key in spec:
        out.setdefault(key.name, key.default)
    return out


def warn_once(message: str, names: list[str]) -> None:
    """One `ConfigWarning` listing `names` (nothing when empty)."""
    if names:
        warnings.warn(f"{message}: {listed(sorted(names))}.", ConfigWarning, stacklevel=4)


def key_table() -> str:
    """The markdown table of every key: name, default, status, what it maps to or why it has no effect."""
    rows = ["| key | default | status | zerojax |", "|---|---|---|---|"]
    for block, spec in BLOCKS.items():
        for key in spec:
            name = f"{block}.{key.name}" if block else key.name
            also = f" (also `{'`, `'.join(key.aliases)}`)" if key.aliases else ""
            rows.append(f"| `{name}`{also} | `{key.default!r}` | {key.status} | {key.effect} |")
    return "\n".join(rows)
