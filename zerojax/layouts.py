"""How the train state is laid out in an accelerator's memory: row-major, or as its compiler prefers.

XLA:TPU stores arrays in tiles and, for some stacked weights, prefers a dimension order other than
row-major: given row-major state it can copy those leaves into its order at the start of every step
and hold the copies to the end (for Llama-2-7B on 8 v5p chips, 1 GiB of fp32 attention weights, until
the stage-3 gathers went flat on TPU, `zerojax.gather`, which keeps its order from reaching the state).
Letting the compiler choose the layout of the state it takes and returns (`jax.jit` with
`Layout.AUTO`) removes such copies. A chosen layout is kept only where it pads nothing (a tiled
dimension smaller than its tile would grow the leaf for good); the other leaves stay row-major. With
offloaded state everything stays row-major: XLA:TPU refuses a chosen layout beside host-resident
parameters. XLA:CPU and XLA:GPU choose row-major, so there this changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental.layout import Format, Layout


def padded_bytes(shape: tuple[int, ...], itemsize: int, layout: Layout) -> int:
    """Bytes of an array of `shape` stored in `layout`: its minor dimensions rounded up to the first tile."""
    dims = [shape[d] for d in layout.major_to_minor]
    tile = tuple(layout.tiling[0]) if layout.tiling else ()
    dims = [1] * (len(tile) - len(dims)) + dims  # fewer dimensions than the tile: a row of it
    for k, t in zip(range(len(dims) - len(tile), len(dims)), tile):
        dims[k] = -(-dims[k] // t) * t
    return math.prod(dims) * itemsize


def automatic(shardings: Any) -> Any:
    """The state's shardings with the layout left to the compiler."""
    return jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings)


def unpadded(chosen: Any, abstract: Any, shardings: Any) -> Any:
    """Per leaf: the compiler's `chosen` format where it pads nothing, else the row-major `shardings`."""

    def pick(fmt, x, s):
        if fmt is None or not isinstance(fmt.layout, Layout):
            return s
        shard, itemsize = s.shard_shape(x.shape), np.dtype(x.dtype).itemsize
        return fmt if padded_bytes(shard, itemsize, fmt.layout) <= math.prod(shard) * itemsize else s

    return jax.tree.map(pick, chosen, abstract, shardings, is_leaf=lambda f: isinstance(f, Format))


def relayout(state: Any, formats: Any) -> Any:
    """`state` with each leaf in its format: unchanged where it already is, else copied leaf by leaf,
    the old buffer donated (so the copy costs one leaf's memory at a time, not the state's)."""

    def put(x, f):
        if not isinstance(f, Format) or x.format == f:
            return x
        return jax.device_put(x, f, donate=True)

    return jax.tree.map(put, state, formats, is_leaf=lambda f: isinstance(f, Format))
