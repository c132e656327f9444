"""DeepSpeed configs for zerojax: `load_config` reads a ds_config (file, dict, base64 or Accelerate YAML),
resolves "auto" from `TrainingArguments` and the model's hidden size, validates every key, and returns a
frozen `ZeroConfig` that builds the mesh shape, `ZeroRules`, `Precision` and the optax optimizer."""

from __future__ import annotations

import os
from typing import Any

from zerojax.args import TrainingArguments
from zerojax.config.auto import resolve_auto
from zerojax.config.deprecated import apply_deprecations
from zerojax.config.errors import ConfigDeprecationWarning, ConfigError, ConfigWarning, shown
from zerojax.config.loading import read_source
from zerojax.config.schema import AUTO_ORDER, BF16, FP16, OffloadBlock, ZeroConfig, ZeroOptimization, build

__all__ = [
    "AUTO_ORDER", "BF16", "FP16", "ConfigDeprecationWarning", "ConfigError", "ConfigWarning", "OffloadBlock", "ZeroConfig",
    "ZeroOptimization", "load_config",
]


def load_config(
    source: str | os.PathLike | dict,
    training_args: TrainingArguments | None = None,
    model_config: Any = None,
    world_size: int | None = None,
) -> ZeroConfig:
    """Load, resolve and validate a DeepSpeed config; raise one `ConfigError` listing every problem.

    `source`: a path (JSON/hjson, or an Accelerate YAML), a dict, or a base64-encoded JSON string.
    `model_config`: anything with `hidden_size` (or `hidden_sizes`, or either under `text_config`), as an
    object or a dict, for the hidden-size "auto" values. `world_size`: the data-parallel size the batch
    sizes are resolved for; None means `jax.device_count()`.
    """
    if training_args is not None and not isinstance(training_args, TrainingArguments):
        raise ConfigError(
            f"training_args must be zerojax.args.TrainingArguments, got {type(training_args).__name__}; build "
            "one with TrainingArguments.from_dict(...)."
        )
    if world_size is None:
        import jax

        world_size = jax.device_count()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={shown(world_size)} must be a positive integer (the data-parallel size).")
    raw, hints = read_source(source)
    problems: list[str] = []
    raw = apply_deprecations(raw, problems)
    raw = resolve_auto(raw, training_args, model_config, world_size, hints, problems)
    return build(raw, training_args, world_size, problems)
