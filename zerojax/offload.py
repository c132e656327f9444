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
                    raise ValueError(f"Offload: {device.platform} devices have no host memory kind; drop the offload.")
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


def to_memory(tree, shardings, kind: str):
    """Each leaf of `tree` moved to memory `kind`, keeping its sharding (inside `jit`)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind(kind)), tree, shardings)


@jax.custom_vjp
def fetch(x: jax.Array) -> jax.Array:
    """`x` (in host memory, inside a traced function) copied to device memory; its cotangent goes back
    to host memory, the memory space of `x`."""
    return jax.device_put(x, jax.memory.Space.Device)


fetch.defvjp(lambda x: (fetch(x), None), lambda _, g: (jax.device_put(g, jax.memory.Space.Host),))


def on_device(tree, shardings):
    """The leaves of `tree` that live in host memory (per `shardings`) brought to device memory."""
    return jax.tree.map(
        lambda x, s: jax.device_put(x, s.with_memory_kind("device")) if s.memory_kind in HOST_KINDS else x,
        tree, shardings,
    )
