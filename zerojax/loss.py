"""How a step weighs the items of its global batch: each micro-batch alike, or each token alike.

A plain `loss_fn(params, batch) -> mean loss` weighs every micro-batch of every rank the same, as
DeepSpeed's engine does (each rank averages its own loss; gradients are averaged over ranks and
accumulation steps). With padding that over-weighs the tokens of sparse micro-batches. A `TokenLoss`
(a summed loss, and a function of the batch counting what it sums) weighs every token of the global
batch the same, as Hugging Face's Trainer does with `num_items_in_batch` and
`average_tokens_across_devices`: the step counts the tokens of all micro-batches on all ranks first and
divides each micro-batch's summed loss by that count (or, `across_ranks=False`, by its rank's count).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class TokenLoss:
    """`total(params, batch[, key])`: the loss summed over a batch's items; `count(batch)`: how many
    items `total` sums (a function of the batch alone, e.g. the targets that are not -100)."""

    total: Callable[..., jax.Array]
    count: Callable[[Any], jax.Array]
    across_ranks: bool = True  # False: each rank divides by its own count (average_tokens_across_devices=False)


def token_weight(loss_fn, micro: Any, axes: tuple[str, ...], ranks: int) -> jax.Array | None:
    """The factor that turns a micro-batch's summed loss into its share of the step's loss (inside the
    step's `shard_map`, `micro` with the micro-batches on its leading axis), scaled by ranks ×
    micro-batches (the step divides the summed gradients by that); None for a plain mean loss."""
    if not isinstance(loss_fn, TokenLoss):
        return None
    counts = jax.vmap(lambda b: jnp.asarray(loss_fn.count(b), jnp.float32))(micro)
    total, share = jnp.sum(counts), counts.shape[0]
    if loss_fn.across_ranks:
        total, share = (lax.psum(total, axes) if axes else total), ranks * share
    return share / jnp.maximum(total, 1.0)


def value(loss_fn, args: tuple, weight) -> jax.Array:
    """The loss the step differentiates for one micro-batch, as fp32: `loss_fn(*args)` (`args`: params,
    batch and, for a loss that takes one, a key), times `weight` for a `TokenLoss`."""
    fn = loss_fn.total if isinstance(loss_fn, TokenLoss) else loss_fn
    out = jnp.asarray(fn(*args), jnp.float32)
    return out if weight is None else out * weight


def batch_mean(loss_fn, args: tuple, axes: tuple[str, ...], ranks: int) -> jax.Array:
    """The loss of a whole global batch (inside `shard_map`, `args` as for `value`): the mean over ranks
    of a plain loss, or a `TokenLoss`'s sum over every rank divided by its count over every rank."""
    if not isinstance(loss_fn, TokenLoss):
        loss = value(loss_fn, args, None)
        return (lax.psum(loss, axes) if axes else loss) / ranks
    both = jnp.stack([value(loss_fn, args, None), jnp.asarray(loss_fn.count(args[1]), jnp.float32)])
    both = lax.psum(both, axes) if axes else both
    return both[0] / jnp.maximum(both[1], 1.0)
