"""DeepSpeed optimizers and learning-rate schedulers as optax, with DeepSpeed's exact semantics.

This package is the public namespace; each name lives in the module that has its job, imported on
first use: the update rules and the optimizers chained from them in `zerojax.optim.transforms`, the
schedules in `zerojax.optim.schedules`, and the `optimizer`/`scheduler` blocks (parameters, defaults,
validation, the optax optimizer a block denotes) in the config layer, `zerojax.config.optimizer`.
"""

from zerojax._lazy import lazy_exports

_BLOCKS = "zerojax.config.optimizer"
_SCHEDULES = "zerojax.optim.schedules"
_TRANSFORMS = "zerojax.optim.transforms"

# Each public name and the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("OPTIMIZER_ALIASES", "OPTIMIZER_NAMES", "OPTIMIZER_PARAMS", "SCHEDULER_PARAMS", "OptimizerSpec",
                     "SchedulerSpec", "build_optimizer", "canonical_optimizer", "check_optimizer", "check_params",
                     "check_scheduler"), _BLOCKS),
    **dict.fromkeys(("as_float", "ds_schedule", "hf_schedule", "one_cycle_momentum", "optax_schedule"), _SCHEDULES),
    **dict.fromkeys(("AdagradState", "fused_adam", "fused_lamb", "scale_by_adam_uncorrected", "scale_by_ds_lamb",
                     "scale_by_torch_adagrad", "torch_adagrad", "torch_sgd"), _TRANSFORMS),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
