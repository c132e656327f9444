"""Host offload as memory kinds: which state lives in host memory between steps, and how it is updated."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import jax

HOST_KINDS = ("pinned_host", "unpinned_host")
MODES = ("streamed", "host")


@dataclasses.dataclass(frozen=True)
class Offload:
    """Host placement of the optimizer state (with the fp32 master weights) and of stage-3 parameters.

    `optimizer` / `params`: None (device), `'pinned_host'` (DeepSpeed `pin_memory: true`) or
    `'unpinned_host'`. `ratio`: the fraction of optimizer-state bytes offloaded (DeepSpeed
    `offload_optimizer.ratio`), largest leaves first. `mode`: `'streamed'` moves the offloaded state to
    the device inside the step, updates it there and moves it back (the JAX/MaxText pattern);
    `'host'` runs the optimizer update on the host, as DeepSpeed's CPU Adam does.
    """

    optimizer: str | None = None
    params: str | None = None
    ratio: float = 1.0
    mode: Literal["streamed", "host"] = "streamed"

    def __post_init__(self):
        for field in ("optimizer", "params"):
            kind = getattr(self, field)
            if kind is not None and kind not in HOST_KINDS:
                raise ValueError(
                    f"Offload: {field}={kind!r} is not a host memory kind; use 'pinned_host', "
                    "'unpinned_host' or None (NVMe offload is not supported: use device 'cpu')."
                )
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(
                f"Offload: ratio={self.ratio!r} must be in (0, 1] (offload_optimizer.ratio: the fraction "
                "of optimizer state kept in host memory)."
            )
        if self.mode not in MODES:
            raise ValueError(f"Offload: mode={self.mode!r} is unknown; use 'streamed' or 'host'.")
        if self.mode == "host" and self.ratio < 1:
            raise ValueError(
                f"Offload: ratio={self.ratio} needs mode='streamed'; the host-computed update runs the "
                "whole optimizer on the host (set ratio=1.0 or mode='streamed')."
            )
        if self.mode == "host" and self.optimizer is None:
            raise ValueError("Offload: mode='host' computes the optimizer update on the host; set optimizer='pinned_host'.")

    def resolved(self, device: jax.Device | None = None) -> "Offload":
        """This offload with each kind the platform lacks replaced by one it has (with one warning)."""
        device = device or jax.devices()[0]
        kinds = {m.kind for m in device.addressable_memories()}
        swap = {}
        for field in ("optimizer", "params"):
            kind = getattr(self, field)
            if kind is not None and kind not in kinds:
                fallback = next((k for k in HOST_KINDS if k in kinds), None)
                if fallback is None:
                    raise ValueError(
                        f"Offload: {device.platform} device {device.device_kind!r} has no host memory kind (compile-only "
                        "CUDA devices, a GPU target compiled without the GPU, drop memory kinds), so the offload cannot "
                        "be compiled; drop it, compile on a machine with that GPU, or estimate offload on a TPU target."
                    )
                warnings.warn(f"Offload: {device.platform} has no {kind!r} memory; using {fallback!r} instead.")
                swap[field] = fallback
        return dataclasses.replace(self, **swap) if swap else self


def offloaded_leaves(sizes: list[int], ratio: float) -> list[bool]:
    """Which leaves, given their byte sizes, go to the host: the largest first, until `ratio` of all bytes."""
    chosen, moved, total = [False] * len(sizes), 0, sum(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if moved >= ratio * total:
            break
        chosen[i], moved = True, moved + sizes[i]
    return chosen


def leaf_bytes(x) -> int:
    return math.prod(x.shape) * x.dtype.itemsize


def host_bytes_in_process(tree) -> dict[str, int]:
    """Bytes per host memory kind that this process holds for `tree` (arrays or ShapeDtypeStructs with
    shardings): every addressable shard of a leaf placed in `pinned_host` or `unpinned_host`."""
    out = dict.fromkeys(HOST_KINDS, 0)
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and sharding.memory_kind in HOST_KINDS:
            shard = math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
            out[sharding.memory_kind] += shard * len(sharding.addressable_devices)
    return out


def machine_memory() -> tuple[int, int] | None:
    """(total, available) bytes of this machine's RAM, within the process's cgroup limit where one is set;
    None where the platform does not say (no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        total, available = info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit.isdigit():
            total, available = min(total, int(limit)), min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return total, available


def check_host_memory(tree, where: str) -> None:
    """Before `tree`'s host-offloaded leaves are allocated: an error when their pinned bytes exceed this
    machine's RAM (pinned memory cannot be swapped: the process would be killed), one warning when all
    their host bytes exceed the RAM available now."""
    need = host_bytes_in_process(tree)
    memory = machine_memory()
    if memory is None or not sum(need.values()):
        return
    total, available = memory
    if need["pinned_host"] > total:
        raise ValueError(
            f"{where}: the offloaded state needs {_size(need['pinned_host'])} of pinned host memory in this process, "
            f"more than this machine's {_size(total)}; offload less (offload_optimizer.ratio below 1, no "
            "offload_param) or spread the run over more machines so that each process holds a smaller shard."
        )
    if sum(need.values()) > available:
        warnings.warn(
            f"{where}: the offloaded state needs {_size(sum(need.values()))} of host memory in this process but "
            f"only {_size(available)} of {_size(total)} is available now; the process may be killed for memory. "
            "Free memory, or offload less.", stacklevel=3)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def to_memory(tree, shardings, kind: str):
    """Each leaf of `tree` moved to memory `kind`, keeping its sharding (inside `jit`)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind(kind)), tree, shardings)


def fetch(x: jax.Array) -> jax.Array:
    """`x` (in host memory, inside a traced function) copied to device memory. (The train step never
    differentiates it: gradients land in their carriers, see `zerojax.gather`.)"""
    return jax.device_put(x, jax.memory.Space.Device)


def on_device(tree, shardings):
    """The leaves of `tree` that live in host memory (per `shardings`) brought to device memory."""
    return jax.tree.map(
        lambda x, s: jax.device_put(x, s.with_memory_kind("device")) if s.memory_kind in HOST_KINDS else x,
        tree, shardings,
    )
