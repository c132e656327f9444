"""The former home of `zerojax.config.xla_flags` (DeepSpeed communication knobs → XLA GPU flags), kept so
that `from zerojax.xla_flags import merge_flags` goes on working."""

from zerojax.config.xla_flags import FLAG_NAMES, merge_flags, xla_flags

__all__ = ["FLAG_NAMES", "merge_flags", "xla_flags"]
