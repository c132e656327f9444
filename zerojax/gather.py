"""Gather on use: a parameter becomes whole where the model uses it, and its gradient leaves as a shard.

Inside the train step a rank holds only its shard of a stage-3 parameter: `gather` all-gathers it in
the compute dtype, and its gradient is reduce-scattered straight back to the shard (in the reduce
dtype). A stage-2 parameter is whole already: `scatter_grad` uses it as is and reduce-scatters its
gradient. Either way neither the full parameter nor its full gradient outlives its use.

Models that scan over stacked layers call `gather_on_use` on each layer's parameters inside the scan
body; the train step then hands those parameters to the model as `Sharded` shards (see
`make_plan(scanned=...)`), and only one layer is ever gathered at a time. Outside a train step
there are no `Sharded` leaves and `gather_on_use` returns its input unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax import lax

from zerojax.offload import fetch


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gather(x: jax.Array, axes: tuple[str, ...], dim: int, reduce_dtype: np.dtype) -> jax.Array:
    """All-gathers `x` over mesh `axes` along `dim`; the gradient is reduce-scattered back in `reduce_dtype`."""
    return lax.all_gather(x, axes, axis=dim, tiled=True)


def _gather_fwd(x, axes, dim, reduce_dtype):
    return gather(x, axes, dim, reduce_dtype), None


def _gather_bwd(axes, dim, reduce_dtype, _, g):
    shard = lax.psum_scatter(g.astype(reduce_dtype), axes, scatter_dimension=dim, tiled=True)
    return (shard.astype(g.dtype),)


gather.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def scatter_grad(full: jax.Array, placeholder: jax.Array, axes, dim: int, reduce_dtype) -> jax.Array:
    """Returns the replicated `full` unchanged; its gradient is reduce-scattered over `axes` along
    `dim` and handed to `placeholder` (a zero array of the gradient shard's shape, `full`'s dtype)."""
    return full


def _scatter_grad_fwd(full, placeholder, axes, dim, reduce_dtype):
    return full, None


def _scatter_grad_bwd(axes, dim, reduce_dtype, _, g):
    shard = lax.psum_scatter(g.astype(reduce_dtype), axes, scatter_dimension=dim, tiled=True)
    return None, shard.astype(g.dtype)


scatter_grad.defvjp(_scatter_grad_fwd, _scatter_grad_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sharded:
    """A parameter as one rank holds it inside the train step, made whole by `gather_on_use`.

    Stage 3: `shard` is the rank's shard and `full` is None; using it all-gathers the shard (first
    copying it to device memory when `on_host`: parameter offload, one layer at a time).
    Stage 2: `full` is the replicated tensor and `shard` a zero placeholder of its gradient shard's
    shape; using it returns `full`, and its gradient is reduce-scattered into `shard`'s gradient.
    `dim` counts from the last dimension (negative), so it stays right when `lax.scan` strips the
    leading layer axis.
    """

    shard: jax.Array
    full: jax.Array | None
    axes: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    dim: int = dataclasses.field(metadata=dict(static=True))
    reduce_dtype: Any = dataclasses.field(metadata=dict(static=True))
    on_host: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the whole tensor."""
        if self.full is not None:
            return tuple(self.full.shape)
        shape = list(self.shard.shape)
        shape[self.dim] *= _axes_size(self.axes)
        return tuple(shape)

    @property
    def dtype(self):
        return self.shard.dtype

    def use(self) -> jax.Array:
        """The whole tensor, with the gradient routed to `shard`."""
        dim = self.dim % self.shard.ndim
        if self.full is None:
            return gather(fetch(self.shard) if self.on_host else self.shard, self.axes, dim, self.reduce_dtype)
        return scatter_grad(self.full, self.shard, self.axes, dim, self.reduce_dtype)


def _axes_size(axes) -> int:
    return int(np.prod([lax.axis_size(a) for a in axes])) if axes else 1


def _is_sharded(x) -> bool:
    return isinstance(x, Sharded)


def gather_on_use(tree: Any) -> Any:
    """Every `Sharded` leaf of `tree` gathered into its full tensor; other leaves unchanged."""
    return jax.tree.map(lambda x: x.use() if _is_sharded(x) else x, tree, is_leaf=_is_sharded)
