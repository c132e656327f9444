"""The frozen, typed `ZeroConfig` and its blocks, built from a config dict whose "auto" are resolved."""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Any, Mapping

from zerojax.args import TrainingArguments
from zerojax.config import keys, mapping
from zerojax.config.auto import AUTO, resolve_batch
from zerojax.config.errors import ConfigError
from zerojax.config.optimizer import OPTIMIZER_NAMES, OptimizerSpec, SchedulerSpec, check_optimizer, check_scheduler


@dataclasses.dataclass(frozen=True)
class OffloadBlock:
    """An `offload_optimizer` / `offload_param` block: `device` 'none' or 'cpu' (host memory)."""

    device: str = "none"
    pin_memory: bool = True
    ratio: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.device == "cpu"

    @property
    def memory_kind(self) -> str | None:
        """The JAX memory kind the offloaded arrays live in, or None when not offloaded."""
        if not self.enabled:
            return None
        return "pinned_host" if self.pin_memory else "unpinned_host"


# `zero_optimization.stage: "auto"` tries (stage, offload optimizer, offload params) in this order, cheapest
# first as the Hugging Face DeepSpeed guide ranks speed: 0 > 1 > 2 > 2+offload > 3 > 3+offload.
AUTO_ORDER: tuple[tuple[int, bool, bool], ...] = (
    (0, False, False), (1, False, False), (2, False, False), (2, True, False),
    (3, False, False), (3, True, False), (3, True, True),
)


@dataclasses.dataclass(frozen=True)
class ZeroOptimization:
    """The `zero_optimization` keys that change what zerojax does (`stage` may be "auto": see
    `ZeroConfig.stage_options`)."""

    stage: int | str = 0
    stage3_param_persistence_threshold: int = 100_000
    zero_hpz_partition_size: int = 1
    mics_shard_size: int = -1
    overlap_comm: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    offload_optimizer: OffloadBlock = OffloadBlock()
    offload_param: OffloadBlock = OffloadBlock()
    stage3_gather_16bit_weights_on_model_save: bool = False
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False


@dataclasses.dataclass(frozen=True)
class FP16:
    """The `fp16` block."""

    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    fp16_master_weights_and_grads: bool = False


@dataclasses.dataclass(frozen=True)
class BF16:
    """The `bf16` block (old name `bfloat16`)."""

    enabled: bool = False
    bf16_master_weights_and_grads: bool = False


@dataclasses.dataclass(frozen=True)
class ZeroConfig:
    """A DeepSpeed config, validated and resolved: every "auto" replaced, every default filled in.

    Build it with `zerojax.config.load_config`. `to_dict()` is the resolved config in DeepSpeed's own
    layout; the methods build zerojax's core objects from it.
    """

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int
    gradient_clipping: float
    zero_optimization: ZeroOptimization
    fp16: FP16
    bf16: BF16
    communication_data_type: str | None
    grad_accum_dtype: str | None
    cpu_checkpointing: bool
    optimizer_spec: OptimizerSpec | None
    scheduler_spec: SchedulerSpec | None
    training_args: TrainingArguments | None
    total_steps: int | None
    resolved: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def stage(self) -> int | str:
        return self.zero_optimization.stage

    def stage_options(self) -> tuple[tuple[int, bool, bool], ...]:
        """`(stage, offload_optimizer, offload_param)` choices, cheapest first: for stage "auto" the
        `AUTO_ORDER` entries the rest of the config allows (an offload block with device "cpu" is kept,
        hpZ, quantized weights and a partial offload `ratio` need stage 3, MiCS and quantized gradients stage 1
        or more), else the configured one."""
        opt, par = self.offload_optimizer.enabled, self.offload_param.enabled
        if self.stage != AUTO:
            return ((self.stage, opt, par),)
        zero = self.zero_optimization
        lowest = max(3 if self.offload_optimizer.ratio < 1 or zero.zero_quantized_weights else 0,
                     1 if zero.zero_quantized_gradients else 0, {"hpz": 3, "mics": 1}.get(self.hierarchy, 0))
        return tuple(o for o in AUTO_ORDER if o[0] >= lowest and o[1] >= opt and o[2] >= par)

    def with_stage(self, stage: int, offload_optimizer: bool = False, offload_param: bool = False) -> ZeroConfig:
        """This config with `stage` and the offload devices set ("cpu" when true, else as configured),
        validated again: how a stage "auto" is resolved once one option is chosen."""
        raw = self.to_dict()
        zero = raw["zero_optimization"] = {k: v for k, v in raw["zero_optimization"].items() if v is not None}
        zero["stage"] = stage
        for which, on in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
            if on:
                zero[which] = {**(zero.get(which) or {}), "device": "cpu"}
        return build(raw, self.training_args, self.world_size, [])

    @property
    def offload_optimizer(self) -> OffloadBlock:
        return self.zero_optimization.offload_optimizer

    @property
    def offload_param(self) -> OffloadBlock:
        return self.zero_optimization.offload_param

    @property
    def gather_16bit_weights_on_model_save(self) -> bool:
        return self.zero_optimization.stage3_gather_16bit_weights_on_model_save

    @property
    def hierarchy(self) -> str:
        """'hpz' (zero_hpz_partition_size > 1), 'mics' (mics_shard_size > 0) or 'none'."""
        return mapping.hierarchy(self)

    def to_dict(self) -> dict:
        """The resolved config in DeepSpeed's key layout (a fresh copy; JSON-serialisable)."""
        return copy.deepcopy(dict(self.resolved))

    def mesh_shape(self, n_devices: int) -> dict[str, int]:
        """`dict(replica=, fsdp=)` for `zerojax.make_mesh(**...)` on `n_devices` data-parallel devices."""
        return mapping.mesh_shape(self, n_devices)

    def zero_rules(self, mesh) -> Any:
        """`zerojax.ZeroRules` for `mesh`: stage, persistence threshold, hierarchy."""
        return mapping.zero_rules(self, mesh)

    def precision(self) -> Any:
        """`zerojax.Precision` from fp16/bf16, communication_data_type and data_types.grad_accum_dtype."""
        return mapping.precision(self)

    def optimizer(self, total_steps: int | None = None, weight_decay_mask: Any = None) -> Any:
        """The optax optimizer with its learning-rate schedule (see `zerojax.optim`)."""
        return mapping.optimizer(self, total_steps, weight_decay_mask)

    def offload(self) -> Any:
        """`zerojax.offload.Offload`: the memory kinds of the offloaded optimizer state and parameters."""
        return mapping.offload(self)

    def xla_flags(self) -> str:
        """The XLA GPU flags for overlap_comm and the bucket sizes (set before JAX starts)."""
        from zerojax.config.xla_flags import xla_flags

        return xla_flags(self)


def build(raw: dict, args: TrainingArguments | None, world_size: int, problems: list[str]) -> ZeroConfig:
    """Validate `raw` (auto already resolved) and build the `ZeroConfig`; raise every problem at once."""
    ignored: list[str] = []
    unknown: list[str] = []
    top = keys.validate_block("", raw, problems, ignored, unknown)
    zero_raw = _block(top, "zero_optimization", problems)
    auto_stage = zero_raw.get("stage") == AUTO  # resolved later by `ZeroConfig.with_stage`
    if auto_stage:
        zero_raw = {k: v for k, v in zero_raw.items() if k != "stage"}
    offloads = {w: _block(zero_raw, w, problems, "zero_optimization.") for w in ("offload_optimizer", "offload_param")}
    zero = keys.validate_block("zero_optimization", zero_raw, problems, ignored)
    if auto_stage:
        zero["stage"] = AUTO
    for which, block in offloads.items():
        zero[which] = (keys.validate_block(f"zero_optimization.{which}", block, problems, ignored)
                       if zero_raw.get(which) is not None else None)
    fp16 = keys.validate_block("fp16", _block(top, "fp16", problems), problems, ignored)
    bf16_raw = _block(top, "bf16", problems)
    bf16_name = keys.spelled(raw, keys.TOP, "bf16")  # or its old name bfloat16
    fp16_names = set(keys.by_name(keys.FP16)) - set(keys.by_name(keys.BF16))
    misplaced = [f"{bf16_name}.{k}" for k in bf16_raw if k in fp16_names]
    bf16 = keys.validate_block("bf16", {k: v for k, v in bf16_raw.items() if k not in fp16_names}, problems, ignored,
                               where=bf16_name)
    data_types = keys.validate_block("data_types", _block(top, "data_types", problems), problems, ignored)
    checkpointing = keys.validate_block("activation_checkpointing", _block(top, "activation_checkpointing", problems),
                                        problems, ignored)
    optimizer = check_optimizer(top["optimizer"], problems)
    scheduler = check_scheduler(top["scheduler"], problems)
    amp = top.get("amp")
    if isinstance(amp, dict) and amp.get("enabled"):
        problems.append("amp.enabled=true: NVIDIA Apex AMP is not supported; use fp16 or bf16 instead.")
    _check_consistency(top, zero, fp16, bf16, world_size, problems)

    batch_raw = [raw.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                      "gradient_accumulation_steps")]
    batch = [top["train_batch_size"], top["train_micro_batch_size_per_gpu"], top["gradient_accumulation_steps"]]
    if all(r is None or b is not None for r, b in zip(batch_raw, batch)):
        train, micro, gas = resolve_batch(*batch, world_size, problems)
    else:
        train = micro = gas = 1
    if problems:
        raise ConfigError(problems)
    keys.warn_once("keys with no effect in zerojax (see docs/config.md)", ignored)
    keys.warn_once("fp16 loss-scaling keys in the bf16 block have no effect (DeepSpeed >= 0.17 rejects them)",
                   misplaced)
    zero_names = set(keys.by_name(keys.ZERO))
    keys.warn_once("zero_optimization keys at the top level, ignored there as DeepSpeed ignores them; move them "
                   "into zero_optimization", [k for k in unknown if k in zero_names])
    keys.warn_once("unknown top-level keys, ignored as DeepSpeed ignores them",
                   [k for k in unknown if k not in zero_names])

    if top["fp32_allreduce"] and top["communication_data_type"] is None:
        top["communication_data_type"] = "fp32"
    if zero["overlap_comm"] is None and not auto_stage:
        zero["overlap_comm"] = zero["stage"] == 3
    top.update(train_batch_size=train, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
               zero_optimization=zero, fp16=fp16, bf16=bf16, data_types=data_types,
               activation_checkpointing=checkpointing)
    for name, spec in (("optimizer", optimizer), ("scheduler", scheduler)):
        top[name] = None if spec is None else {"type": OPTIMIZER_NAMES.get(spec.type, spec.type),
                                               "params": _jsonable(spec.params)}
    resolved = {k: v for k, v in top.items() if v is not None}

    def offload(block):
        if block is None:
            return OffloadBlock()
        return OffloadBlock(block["device"], block["pin_memory"], block.get("ratio", 1.0))

    return ZeroConfig(
        train_batch_size=train, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
        world_size=world_size, gradient_clipping=float(top["gradient_clipping"]),
        zero_optimization=ZeroOptimization(
            stage=zero["stage"], stage3_param_persistence_threshold=zero["stage3_param_persistence_threshold"],
            zero_hpz_partition_size=zero["zero_hpz_partition_size"], mics_shard_size=zero["mics_shard_size"],
            overlap_comm=zero["overlap_comm"], reduce_bucket_size=zero["reduce_bucket_size"],
            allgather_bucket_size=zero["allgather_bucket_size"],
            stage3_prefetch_bucket_size=zero["stage3_prefetch_bucket_size"],
            offload_optimizer=offload(zero["offload_optimizer"]), offload_param=offload(zero["offload_param"]),
            stage3_gather_16bit_weights_on_model_save=zero["stage3_gather_16bit_weights_on_model_save"],
            zero_quantized_weights=zero["zero_quantized_weights"],
            zero_quantized_gradients=zero["zero_quantized_gradients"],
        ),
        fp16=FP16(**{f.name: fp16[f.name] for f in dataclasses.fields(FP16)}),
        bf16=BF16(bf16["enabled"], bf16["bf16_master_weights_and_grads"]),
        communication_data_type=top["communication_data_type"], grad_accum_dtype=data_types["grad_accum_dtype"],
        cpu_checkpointing=checkpointing["cpu_checkpointing"],
        optimizer_spec=optimizer, scheduler_spec=scheduler, training_args=args,
        total_steps=args.total_steps(world_size) if args is not None else None,
        resolved=types.MappingProxyType(resolved),
    )


def _check_consistency(top, zero, fp16, bf16, world_size, problems) -> None:
    """Cross-key rules: precision, offload and hierarchy combinations DeepSpeed or zerojax refuse (with
    stage "auto" the stage rules narrow `stage_options` instead)."""
    stage = 3 if zero["stage"] == AUTO else zero["stage"]
    if fp16["enabled"] and bf16["enabled"]:
        problems.append("fp16.enabled and bf16.enabled are both true; enable one of them.")
    if fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["min_loss_scale"] <= 0:
        problems.append(f"fp16.min_loss_scale={fp16['min_loss_scale']!r} must be > 0 with dynamic loss scaling.")
    for which in ("offload_optimizer", "offload_param"):
        block = zero[which]
        if block is None:
            continue
        path = f"zero_optimization.{which}"
        if block["device"] == "nvme":
            problems.append(
                f"{path}.device='nvme' is not supported in zerojax (no NVMe tier under XLA); use \"cpu\" "
                "to offload to host memory."
            )
        if block["device"] != "none" and which == "offload_param" and stage != 3:
            problems.append(f"{path} needs stage 3 (parameters are partitioned only at stage 3), but stage={stage}.")
        if block["device"] != "none" and which == "offload_optimizer" and stage == 0:
            problems.append(f"{path} needs stage 1, 2 or 3 (ZeRO-Offload), but stage=0.")
        if block.get("ratio", 1.0) < 1.0 and stage != 3:
            problems.append(f"{path}.ratio={block['ratio']} < 1 (partial offload) needs stage 3.")
    hpz, mics = zero["zero_hpz_partition_size"], zero["mics_shard_size"]
    if hpz > 1 and mics > 0:
        problems.append("zero_hpz_partition_size and mics_shard_size are both set; choose one hierarchy.")
    if hpz > 1 and stage != 3:
        problems.append(f"zero_optimization.zero_hpz_partition_size={hpz} (hpZ) needs stage 3, but stage={stage}.")
    if mics > 0 and stage == 0:
        problems.append(f"zero_optimization.mics_shard_size={mics} needs stage 1, 2 or 3.")
    if zero["zero_quantized_weights"] and stage != 3:
        problems.append(f"zero_optimization.zero_quantized_weights (qwZ) quantizes the stage-3 weight all-gather, "
                        f"but stage={stage} gathers no weights; use stage 3 or drop it.")
    if zero["zero_quantized_gradients"] and stage == 0:
        problems.append("zero_optimization.zero_quantized_gradients (qgZ) quantizes the gradient reduce-scatter, "
                        "but stage=0 all-reduces gradients; use stage 1, 2 or 3, or drop it.")
    if mics == 0 or mics < -1:
        problems.append(f"zero_optimization.mics_shard_size={mics} must be a positive group size or -1 (off).")
    for name, size in (("zero_hpz_partition_size", hpz), ("mics_shard_size", mics)):
        if size > 1 and world_size % size:
            problems.append(
                f"zero_optimization.{name}={size} does not divide the data-parallel world size {world_size}; "
                "use a divisor of it (usually the devices per host)."
            )


def _block(parent: dict, name: str, problems: list[str], prefix: str = "") -> dict:
    value = parent.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{prefix}{name} must be an object, got {type(value).__name__}.")
        return {}
    return value


def _jsonable(params: Mapping[str, Any]) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
