"""DeepSpeed's communication knobs as the XLA GPU flags that control the same thing.

| DeepSpeed key | XLA flag |
|---|---|
| `overlap_comm` | `--xla_gpu_enable_latency_hiding_scheduler` (overlap collectives with compute) |
| `reduce_bucket_size` (elements) | `--xla_gpu_reduce_scatter_combine_threshold_bytes` and `--xla_gpu_all_reduce_combine_threshold_bytes` (× bytes of the reduce dtype) |
| `allgather_bucket_size` (stages 1–2), `stage3_prefetch_bucket_size` (stage 3) | `--xla_gpu_all_gather_combine_threshold_bytes` (× bytes of the compute dtype) |

DeepSpeed buckets count elements; XLA's combiners merge collectives up to a byte threshold, so the
element counts are converted with the dtype the collective moves. XLA reads `XLA_FLAGS` once, when the
backend starts: set the string before the first JAX computation. The flags affect the GPU compiler
only; XLA:CPU accepts and ignores them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zerojax.config.schema import ZeroConfig

FLAG_NAMES = (
    "xla_gpu_enable_latency_hiding_scheduler",
    "xla_gpu_reduce_scatter_combine_threshold_bytes",
    "xla_gpu_all_reduce_combine_threshold_bytes",
    "xla_gpu_all_gather_combine_threshold_bytes",
)


def xla_flags(cfg: ZeroConfig) -> str:
    """The `XLA_FLAGS` entries (space-separated) for the config's overlap_comm and bucket sizes (for a
    stage "auto", set before the stage is chosen: the stage-3 values)."""
    zero = cfg.zero_optimization
    prec = cfg.precision()
    stage3 = zero.stage in (3, "auto")
    reduce_bytes = zero.reduce_bucket_size * prec.reduce_dtype.itemsize
    gather_elements = zero.stage3_prefetch_bucket_size if stage3 else zero.allgather_bucket_size
    values = (
        "true" if zero.overlap_comm or (zero.overlap_comm is None and stage3) else "false",
        reduce_bytes,
        reduce_bytes,
        gather_elements * prec.compute_dtype.itemsize,
    )
    return " ".join(f"--{name}={value}" for name, value in zip(FLAG_NAMES, values))


def merge_flags(existing: str, flags: str) -> str:
    """`existing` XLA_FLAGS with `flags` added; a flag in both takes the value from `flags`."""
    def name(entry: str) -> str:
        return entry.split("=", 1)[0]

    new = flags.split()
    replaced = {name(f) for f in new}
    return " ".join([f for f in existing.split() if name(f) not in replaced] + new)
