"""From a `ZeroConfig` to zerojax's core objects: mesh shape, `ZeroRules`, `Precision`, the optax optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optax

from zerojax import optim
from zerojax.config.errors import ConfigError, shown
from zerojax.precision import LossScale, Precision
from zerojax.rules import ZeroRules
from zerojax.zeropp import Quantization

if TYPE_CHECKING:
    from zerojax.config.schema import ZeroConfig

_BETA_OPTIMIZERS = ("adam", "adamw", "lamb", "lion")  # optimizers whose betas OneCycle cycles


def hierarchy(cfg: ZeroConfig) -> str:
    """'hpz' when zero_hpz_partition_size > 1, 'mics' when mics_shard_size > 0, else 'none'."""
    zero = cfg.zero_optimization
    if zero.zero_hpz_partition_size > 1:
        return "hpz"
    if zero.mics_shard_size > 0:
        return "mics"
    return "none"


def mesh_shape(cfg: ZeroConfig, n_devices: int) -> dict[str, int]:
    """`dict(replica=, fsdp=)`: hpZ/MiCS groups of their size on `fsdp`, replicated across `replica`."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ConfigError(f"mesh_shape: n_devices={shown(n_devices)} must be a positive integer.")
    zero = cfg.zero_optimization
    name, size = {"hpz": ("zero_hpz_partition_size", zero.zero_hpz_partition_size),
                  "mics": ("mics_shard_size", zero.mics_shard_size)}.get(cfg.hierarchy, (None, n_devices))
    if n_devices % size:
        raise ConfigError(
            f"zero_optimization.{name}={size} does not divide the {n_devices} data-parallel devices; use a "
            "divisor of the device count (usually the devices per host)."
        )
    return {"replica": n_devices // size, "fsdp": size}


def resolved_stage(cfg: ZeroConfig) -> int:
    """The config's stage; a ConfigError while it is still "auto"."""
    if cfg.stage == "auto":
        raise ConfigError(
            'zero_optimization.stage is "auto": it is chosen by compiling the train step, which zerojax.Trainer '
            "does; outside the Trainer pick one of config.stage_options() with config.with_stage(...), or write a stage."
        )
    return cfg.stage


def zero_rules(cfg: ZeroConfig, mesh) -> ZeroRules:
    """The `ZeroRules` of the config's stage, persistence threshold (stage 3), hierarchy and ZeRO++
    quantization over `mesh`."""
    stage = resolved_stage(cfg)
    zero = cfg.zero_optimization
    threshold = zero.stage3_param_persistence_threshold if stage == 3 else 0
    quantization = Quantization(weights=zero.zero_quantized_weights, gradients=zero.zero_quantized_gradients)
    return ZeroRules(mesh, stage=stage, persistence_threshold=threshold, hierarchy=cfg.hierarchy,
                     quantization=quantization)


def precision(cfg: ZeroConfig) -> Precision:
    """fp16 (with the fp16 block's loss scaler), bf16 or fp32; reduce/accumulate dtypes from the config."""
    kw: dict[str, Any] = {"reduce_dtype": cfg.communication_data_type, "accum_dtype": cfg.grad_accum_dtype or "fp32"}
    fp16, bf16 = cfg.fp16, cfg.bf16
    if fp16.enabled:
        scale = (LossScale(static=float(fp16.loss_scale)) if fp16.loss_scale > 0 else LossScale(
            initial_scale_power=fp16.initial_scale_power, window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis, consecutive_hysteresis=fp16.consecutive_hysteresis,
            min_scale=float(fp16.min_loss_scale)))
        master = "fp16" if fp16.fp16_master_weights_and_grads else "fp32"
        return Precision(compute_dtype="fp16", master_dtype=master, loss_scale=scale, **kw)
    if bf16.enabled:
        master = "bf16" if bf16.bf16_master_weights_and_grads else "fp32"
        return Precision(compute_dtype="bf16", master_dtype=master, **kw)
    return Precision(**kw)


def offload(cfg: ZeroConfig) -> Any:
    """`Offload(optimizer=, params=, ratio=)` with the memory kinds of the two offload blocks."""
    from zerojax.offload import Offload

    resolved_stage(cfg)
    opt, par = cfg.offload_optimizer, cfg.offload_param
    optimizer_kind = opt.memory_kind if opt.ratio > 0 else None
    return Offload(optimizer=optimizer_kind, params=par.memory_kind, ratio=opt.ratio if optimizer_kind else 1.0)


def optimizer(cfg: ZeroConfig, total_steps: int | None, weight_decay_mask: Any) -> optax.GradientTransformation:
    """The config's optimizer and schedule; without an optimizer block, Hugging Face's AdamW from the
    TrainingArguments (with their `lr_scheduler_type` when there is no scheduler block)."""
    args = cfg.training_args
    spec = cfg.optimizer_spec
    if spec is None:
        if args is None:
            raise ConfigError(
                "the config has no optimizer block; add one (e.g. {\"type\": \"AdamW\", \"params\": {...}}) or "
                "pass training_args so zerojax builds Hugging Face's default AdamW."
            )
        spec = optim.OptimizerSpec("adamw", {**optim.OPTIMIZER_PARAMS["adamw"], "lr": float(args.learning_rate),
                                             "betas": (float(args.adam_beta1), float(args.adam_beta2)),
                                             "eps": float(args.adam_epsilon), "weight_decay": float(args.weight_decay)})
    lr = spec.params["lr"]
    sched = cfg.scheduler_spec
    beta1 = beta2 = None
    if sched is not None:
        schedule = optim.optax_schedule(sched.type, sched.params, lr)
        if sched.type == "OneCycle" and sched.params["cycle_momentum"] and spec.type in _BETA_OPTIMIZERS:
            momentum = optim.one_cycle_momentum(sched.params)
            beta1, beta2 = (lambda count: momentum(optim.as_float(count) - 1)), 0.99
    elif args is not None:
        total = total_steps if total_steps is not None else cfg.total_steps
        fraction = args.warmup_steps < 1 and (args.warmup_steps or args.warmup_ratio)
        if total is None and fraction and args.lr_scheduler_type != "constant":
            raise ConfigError(
                "TrainingArguments give warmup as a fraction of the total steps, which are unknown; set "
                "max_steps or train_dataset_size, or pass total_steps."
            )
        warmup = args.warmup_steps_for(total) if total is not None else int(args.warmup_steps)
        try:
            schedule = optim.hf_schedule(args.lr_scheduler_type, lr, total, warmup)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        schedule = None
    return optim.build_optimizer(spec, schedule, beta1, beta2, weight_decay_mask)
