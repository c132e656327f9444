"""ZeRO++ quantized communication: int8 weight gathers (qwZ) and int4/int8 gradient reduction (qgZ).

A tensor travels as blocks of consecutive elements (its flattened shard cut into the fewest equal
blocks of at most the block size, the last zero-padded by under two elements a block), each quantized
symmetrically: an fp32 scale `max|x| / qmax` per block and integers
`round(x / scale)` in [-qmax, qmax] (qmax 127 for int8, 7 for int4, two int4 values packed per byte).
Dequantizing gives `q * scale`, within `scale / 2` of `x` elementwise. A block holding a NaN or an
infinity gets a NaN scale, so every value of it dequantizes to NaN: the train step's non-finite skip
still fires.

- `all_gather`: each rank quantizes its shard, the integers and scales are all-gathered, and every rank
  dequantizes the whole tensor (qwZ). Only the wire is quantized: the stored weights never are.
- `reduce_scatter`: each rank quantizes the chunk of its gradient destined for every other rank and
  sends it with an all-to-all; the receiver dequantizes and sums the chunks in fp32 (qgZ). Over several
  mesh axes this runs one axis at a time, the intra-node `fsdp` axis first as the ZeRO++ paper does, the
  partial sums re-quantized before the next axis; the result is the shard `lax.psum_scatter` gives.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from zerojax.mesh import FSDP

WEIGHT_BLOCK = 8000  # DeepSpeed's qwZ target group size (CUDAQuantizer.target_group_size)
GRADIENT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Which ZeRO collectives move quantized blocks (DeepSpeed's `zero_quantized_weights`,
    `zero_quantized_gradients`): the stage-3 weight all-gather as int8 (`weights`), the gradient
    reduce-scatter as `gradient_bits`-bit integers through all-to-all (`gradients`); blocks of at most
    `weight_block` and `gradient_block` elements, each with one fp32 scale. int8 gradients are the
    default: DeepSpeed's int4 moves half the bytes again but, measured on a small Llama, leaves the
    step's update at cosine similarity 0.983 to the exact one (int8: 0.99995; benchmarks/results/zeropp.md)."""

    weights: bool = False
    gradients: bool = False
    gradient_bits: int = 8
    weight_block: int = WEIGHT_BLOCK
    gradient_block: int = GRADIENT_BLOCK

    def __post_init__(self):
        if self.gradient_bits not in (4, 8):
            raise ValueError(f"Quantization: gradient_bits={self.gradient_bits!r} is not supported; use 8 or 4 "
                             "(DeepSpeed's qgZ, two values a byte).")
        for name in ("weight_block", "gradient_block"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
                raise ValueError(f"Quantization: {name}={size!r} must be an even integer >= 2 (elements "
                                 "sharing one scale).")


def quantize(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """(int8 values, fp32 scales) of `x` quantized symmetrically to `bits` bits along its last axis
    (one block a row)."""
    qmax = 2 ** (bits - 1) - 1
    x = x.astype(jnp.float32)
    # NaN for a block holding a NaN or an infinity, said outright: a fused max need not propagate NaN
    scale = jnp.where(jnp.all(jnp.isfinite(x), axis=-1), jnp.max(jnp.abs(x), axis=-1) / qmax, jnp.nan)
    inverse = jnp.where(scale > 0, 1 / scale, 0.0)[..., None]
    q = jnp.clip(jnp.round(x * inverse), -qmax, qmax)
    return jnp.where(jnp.isfinite(q), q, 0).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """fp32 values of blocks `q` (last axis) with their `scale`s."""
    return q.astype(jnp.float32) * scale[..., None]


def pack4(q: jax.Array) -> jax.Array:
    """int8 values in [-7, 7] along an even last axis, two to a uint8: the first half of the axis in the low
    nibbles, the second in the high ones (contiguous halves: XLA:TPU pads a minor axis of 2 to 128 lanes, so
    pairing neighbours doubled the step's peak there)."""
    u = (q + 8).astype(jnp.uint8)
    half = u.shape[-1] // 2
    return u[..., :half] | (u[..., half:] << 4)


def unpack4(packed: jax.Array) -> jax.Array:
    """The int8 values `pack4` packed."""
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(jnp.int8) - 8


def _blocks(x: jax.Array, lead: int, block: int) -> jax.Array:
    """`x` (its first `lead` axes kept) as (*lead axes, blocks, size): each row flattened, cut into the
    fewest blocks of at most `block` elements, of one even size, and zero-padded to fill them."""
    rows = x.reshape(*x.shape[:lead], -1)
    n = rows.shape[-1]
    count = -(-n // block)
    size = -(-n // count)
    size += size % 2
    rows = jnp.pad(rows, [(0, 0)] * lead + [(0, count * size - n)])
    return rows.reshape(*rows.shape[:-1], count, size)


def _unblock(blocks: jax.Array, lead: int, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `_blocks`: rows of `math.prod(shape)` elements reshaped to `shape`."""
    rows = blocks.reshape(*blocks.shape[:lead], -1)[..., : math.prod(shape)]
    return rows.reshape(*blocks.shape[:lead], *shape)


def all_gather(x: jax.Array, axes: tuple[str, ...], dim: int, block: int) -> jax.Array:
    """`lax.all_gather(x, axes, axis=dim, tiled=True)` sent as int8 blocks with fp32 scales, in `x`'s dtype."""
    q, scale = quantize(_blocks(x, 0, block), 8)
    q, scale = lax.all_gather(q, axes), lax.all_gather(scale, axes)  # (ranks, blocks, block), (ranks, blocks)
    shards = _unblock(dequantize(q, scale).astype(x.dtype), 1, x.shape)  # (ranks, *x.shape)
    whole = jnp.moveaxis(shards, 0, dim)  # the rank axis just before `dim`
    return whole.reshape(*x.shape[:dim], -1, *x.shape[dim + 1:])


def hop_order(axes) -> list[str]:
    """The mesh axes qgZ reduces over, in the order it reduces them: the intra-node `fsdp` axis first."""
    return sorted(axes, key=lambda a: a != FSDP)


def reduce_scatter(g: jax.Array, axes: tuple[str, ...], dim: int, bits: int, block: int) -> jax.Array:
    """`lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)` in fp32, each rank's chunks sent
    as `bits`-bit blocks with fp32 scales through one all-to-all per axis (see the module docstring)."""
    sizes = [lax.axis_size(a) for a in axes]
    chunk = (g.shape[dim] // math.prod(sizes), *g.shape[:dim], *g.shape[dim + 1:])
    # Chunk i (rank i's shard) of `g` along `dim` as row i; the rows indexed by one axis per mesh axis.
    rows = _blocks(jnp.moveaxis(g, dim, 0).reshape(*sizes, -1), len(sizes), block)
    for i in map(axes.index, hop_order(axes)):
        q, scale = quantize(rows, bits)
        packed = pack4(q) if bits == 4 else q
        packed = lax.all_to_all(packed, axes[i], i, i, tiled=True)  # axis i now: the sending rank
        scale = lax.all_to_all(scale, axes[i], i, i, tiled=True)
        rows = jnp.sum(dequantize(unpack4(packed) if bits == 4 else packed, scale), axis=i, keepdims=True)
    shard = _unblock(rows.reshape(rows.shape[len(sizes):]), 0, chunk)
    return jnp.moveaxis(shard, 0, dim)


def wire_itemsize(bits: int, block: int) -> float:
    """Bytes an element takes on the wire as `bits`-bit blocks of `block` elements with fp32 scales."""
    return bits / 8 + 4 / block
