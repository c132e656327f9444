"""Gather on use: a parameter becomes whole where the model uses it, and its gradient leaves as a shard.

Inside the train step a rank holds only its shard of a stage-3 parameter: `gather` casts it to the
compute dtype and all-gathers it, and its gradient is reduce-scattered straight back to the shard's
size (in the reduce dtype). A parameter that is whole already (stages 0–2, persistent parameters) is
used as is, and `scatter_grad` reduce-scatters its gradient over the gradient axes (none at stages
0–1). Either way neither the full parameter nor its full gradient outlives its use.

The gradient does not flow back into the stored parameter (which may be the fp32 master weights):
it lands in a *carrier*, a zero placeholder of the gradient shard's shape in the reduce dtype that
the train step differentiates with respect to. So the backward pass of a scanned model stacks 16-bit
gradient shards, never fp32 copies.

Models that scan over stacked layers call `gather_on_use` on each layer's parameters inside the scan
body; the train step then hands those parameters to the model as `Sharded` nodes, and only one layer
is ever gathered at a time. Outside a train step there are no `Sharded` leaves and `gather_on_use`
returns its input unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zerojax import zeropp
from zerojax.offload import fetch
from zerojax.zeropp import Quantization


def reduce_scatter(g: jax.Array, axes: tuple[str, ...], dim: int, quant: Quantization) -> jax.Array:
    """`g` summed over mesh `axes` and scattered along `dim` (unchanged when `axes` is empty), moved as
    quantized blocks when `quant.gradients` (qgZ, `zerojax.zeropp`)."""
    if not axes:
        return g
    if quant.gradients:
        return zeropp.reduce_scatter(g, axes, dim, quant.gradient_bits, quant.gradient_block).astype(g.dtype)
    return lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)


def _scatter(g: jax.Array, axes: tuple[str, ...], dim: int, dtype, on_host: bool, quant: Quantization) -> jax.Array:
    """`g` reduce-scattered over `axes` along `dim` in `dtype` (a carrier's), in host memory if `on_host`."""
    g = reduce_scatter(g.astype(dtype), axes, dim, quant)
    return jax.device_put(g, jax.memory.Space.Host) if on_host else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def gather(x: jax.Array, carrier: jax.Array, axes: tuple[str, ...], dim: int, dtype, on_host: bool,
           quant: Quantization) -> jax.Array:
    """All-gathers `x` over mesh `axes` along `dim` (as int8 blocks when `quant.weights`: qwZ); the
    gradient is reduce-scattered into `carrier` (of `dtype`, in host memory if `on_host`)."""
    if quant.weights:
        return zeropp.all_gather(x, axes, dim, quant.weight_block)
    return lax.all_gather(x, axes, axis=dim, tiled=True)


gather.defvjp(
    lambda x, carrier, *static: (gather(x, carrier, *static), None),
    lambda axes, dim, dtype, on_host, quant, _, g: (None, _scatter(g, axes, dim, dtype, on_host, quant)),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def scatter_grad(full: jax.Array, carrier: jax.Array, axes: tuple[str, ...], dim: int, dtype, on_host: bool,
                 quant: Quantization) -> jax.Array:
    """Returns the whole `full` unchanged; its gradient is reduce-scattered over `axes` (none: only cast)
    along `dim` into `carrier` (as for `gather`)."""
    return full


scatter_grad.defvjp(
    lambda full, carrier, *static: (full, None),
    lambda axes, dim, dtype, on_host, quant, _, g: (None, _scatter(g, axes, dim, dtype, on_host, quant)),
)


@jax.custom_vjp
def settled(carrier: jax.Array) -> jax.Array:
    """`carrier` unchanged; the gradient that reaches it becomes a buffer of its own where the backward
    pass makes it (an optimization barrier). For a parameter outside the layer scan: XLA:TPU on 64
    chips lowers a reduce-scatter to an all-reduce and a slice, and fuses the slice into each consumer
    of the shard, the optimizer update at the end of the step among them, so without this the whole
    summed gradient (250 MiB for Llama-2-7B's output projection) is held through the backward pass."""
    return carrier


settled.defvjp(lambda carrier: (carrier, None), lambda _, g: (lax.optimization_barrier(g),))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sharded:
    """A parameter as one rank holds it inside the train step, made whole by `gather_on_use`.

    `value` is what the rank stores: its shard when `gathered` (stage 3), else the whole tensor. Using
    it casts `value` to `compute_dtype` (first copying it to device memory when `on_host`: parameter
    offload, one layer at a time), all-gathers it over `axes` when `gathered`, and routes the gradient,
    reduce-scattered over `axes`, to `carrier`; `quant` says which of the two move quantized (ZeRO++).
    `flat_gather`: a shard along the major dimension is gathered as one flat vector (for XLA:TPU, see `use`).
    `dim` counts from the last dimension (negative), so it stays right when `lax.scan` strips the leading
    layer axis.
    """

    value: jax.Array
    carrier: jax.Array
    axes: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    dim: int = dataclasses.field(metadata=dict(static=True))
    gathered: bool = dataclasses.field(metadata=dict(static=True))
    compute_dtype: Any = dataclasses.field(metadata=dict(static=True))
    on_host: bool = dataclasses.field(default=False, metadata=dict(static=True))
    quant: Quantization = dataclasses.field(default=Quantization(), metadata=dict(static=True))
    flat_gather: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the whole tensor."""
        shape = list(self.value.shape)
        if self.gathered:
            shape[self.dim] *= _axes_size(self.axes)
        return tuple(shape)

    @property
    def dtype(self):
        return np.dtype(self.compute_dtype)

    def use(self) -> jax.Array:
        """The whole tensor in the compute dtype, with the gradient routed to `carrier`."""
        x = fetch(self.value) if self.on_host else self.value
        x = _narrow(x, np.dtype(self.compute_dtype))
        dim = self.dim % x.ndim
        static = (self.axes, dim, np.dtype(self.carrier.dtype), self.on_host, self.quant)
        if not self.gathered:
            return scatter_grad(x, self.carrier, *static)
        if self.flat_gather and dim == 0 and not self.on_host and not self.quant.weights:
            # A shard along the major dimension is a contiguous block. Gathered as a flat vector, the
            # layout XLA:TPU prefers for the whole tensor costs a copy of the gathered tensor where it
            # is used, not a copy of every layer's stacked shard held through the step (the attention
            # weights of Llama-2-7B: 0.32 GiB on 8 v5p chips). XLA:GPU gains nothing from it.
            whole = (x.shape[0] * _axes_size(self.axes),) + x.shape[1:]
            flat = gather(x.reshape(-1), self.carrier.reshape(-1), self.axes, 0, *static[2:])
            return flat.reshape(whole)
        return gather(x, self.carrier, *static)


def _narrow(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """`x.astype(dtype)`; fp32 to bf16 as round-to-nearest-even then the high half of each word, which
    XLA:TPU keeps inside the model's scan (a plain convert it hoists out of the loop, holding a 16-bit
    copy of every layer's shard at once)."""
    if x.dtype != np.float32 or dtype != jnp.bfloat16:
        return x.astype(dtype)
    halves = lax.bitcast_convert_type(lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7), jnp.uint16)
    return lax.bitcast_convert_type(halves[..., 1], jnp.bfloat16)  # little-endian: [..., 1] is the high half


def _axes_size(axes) -> int:
    return int(np.prod([lax.axis_size(a) for a in axes])) if axes else 1


def _is_sharded(x) -> bool:
    return isinstance(x, Sharded)


def gather_on_use(tree: Any) -> Any:
    """Every `Sharded` leaf of `tree` gathered into its full tensor; other leaves unchanged."""
    return jax.tree.map(lambda x: x.use() if _is_sharded(x) else x, tree, is_leaf=_is_sharded)
