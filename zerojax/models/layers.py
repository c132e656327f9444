"""Building blocks shared by the models: linear, embedding and norm layers whose parameters may carry a
leading layer axis, and the loop that runs a stack of layers (scanned or unrolled, optionally remat).

Parameter names follow Flax (`kernel` stored (in, out), `bias`, `scale`, `embedding`) so the Hugging
Face name maps beside each model only rename and transpose. A parameter with a layer axis says so in its
metadata (`nnx.Param(..., stacked=True)`, `zerojax.structure`), which is how a plan knows to gather it one
layer at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zerojax.gather import gather_on_use
from zerojax.structure import STACKED

INIT_STD = 0.02
ATTENTION_CHUNK = 512  # queries per block for long sequences (see `attention`)


def _normal(rngs: nnx.Rngs, shape, dtype, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _param(value: jax.Array, stack: tuple) -> nnx.Param:
    """A parameter whose leading axis is the layer axis when `stack` is given (`stacked` metadata)."""
    return nnx.Param(value, **{STACKED: True}) if stack else nnx.Param(value)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel (in, out); `stack` prepends a layer axis to every parameter."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs, stack: tuple = (), std=INIT_STD):
        self.kernel = _param(_normal(rngs, (*stack, d_in, d_out), dtype, std), stack)
        self.bias = _param(jnp.zeros((*stack, d_out), dtype), stack) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class Embed(nnx.Module):
    """A lookup table (num, features); `attend` is the tied output projection `x @ embedding.T`."""

    def __init__(self, num: int, features: int, *, dtype, rngs: nnx.Rngs, std=INIT_STD):
        self.embedding = nnx.Param(_normal(rngs, (num, features), dtype, std))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return x @ self.embedding[...].T


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by `scale`."""

    def __init__(self, dim: int, *, eps: float, dtype, stack: tuple = ()):
        self.scale = _param(jnp.ones((*stack, dim), dtype), stack)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation with `scale` and `bias`, statistics in fp32."""

    def __init__(self, dim: int, *, eps: float, dtype, stack: tuple = ()):
        self.scale = _param(jnp.ones((*stack, dim), dtype), stack)
        self.bias = _param(jnp.zeros((*stack, dim), dtype), stack)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * self.scale[...] + self.bias[...]


REMAT_POLICIES = (
    "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "dots_saveable", "dots_with_no_batch_dims_saveable",
    "everything_saveable", "nothing_saveable",
)
OFFLOAD = "offload"  # DeepSpeed's activation_checkpointing.cpu_checkpointing
LAYER_INPUT = "zerojax_layer_input"


def remat_policy(name: str | None) -> Callable | None:
    """`None` or `'full'`: plain `jax.checkpoint` (save nothing); `'offload'`: save nothing but each layer's
    input, and that in pinned host memory (DeepSpeed's `cpu_checkpointing`); else a `jax.checkpoint_policies`
    name."""
    if name is None or name == "full":
        return None
    if name == OFFLOAD:
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host")
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"remat={name!r} is not a rematerialisation policy; use None (no remat), 'full' (save "
            f"nothing), 'offload' (layer inputs saved in host memory) or one of {list(REMAT_POLICIES)}."
        )
    return getattr(jax.checkpoint_policies, name)


def run_layers(layers: nnx.Module, h: jax.Array, *args: Any, scan: bool, remat: str | None) -> jax.Array:
    """Applies a stacked layer module (parameters with a leading layer axis) to `h`, layer by layer.

    `layers(h, *args)` is called on a copy of `layers` holding one layer's parameter slices, gathered on
    use inside a ZeRO-3 train step (`zerojax.gather_on_use`); with `scan` the layers run inside one
    `jax.lax.scan`, otherwise as an unrolled Python loop. `remat` wraps each layer in `jax.checkpoint`
    with the named policy (see `remat_policy`).
    """
    graphdef, state = nnx.split(layers)

    def one(h, layer_state):
        return nnx.merge(graphdef, gather_on_use(layer_state))(checkpoint_name(h, LAYER_INPUT), *args)

    if remat is not None:
        one = jax.checkpoint(one, policy=remat_policy(remat))
    if scan:
        return jax.lax.scan(lambda h, s: (one(h, s), None), h, state)[0]
    count = jax.tree.leaves(state)[0].shape[0]
    for i in range(count):
        h = one(h, jax.tree.map(lambda x: x[i], state))
    return h


def attention(q, k, v, attention_mask, *, window: int | None = None) -> jax.Array:
    """Causal (optionally sliding-window) attention; q (B, T, N, H), k/v (B, T, K, H) with K | N.

    `attention_mask` (B, T), 1 for real tokens and 0 for padding, masks keys. Softmax runs in fp32.
    Sequences longer than `ATTENTION_CHUNK` (and divisible by it) run one block of queries at a time,
    each block rematerialised in the backward pass, so the fp32 scores held at once are
    (B, N, ATTENTION_CHUNK, T) rather than (B, N, T, T): the same result, a fraction of the memory on
    backends without fused attention.
    """
    b, t, n, h = q.shape
    if t <= ATTENTION_CHUNK or t % ATTENTION_CHUNK:
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                            implementation="xla")
    blocks = q.reshape(b, t // ATTENTION_CHUNK, ATTENTION_CHUNK, n, h).swapaxes(0, 1)
    starts = jnp.arange(t // ATTENTION_CHUNK) * ATTENTION_CHUNK
    one = jax.checkpoint(lambda block: _query_block(block[0], block[1], k, v, attention_mask, window))
    return jax.lax.map(one, (blocks, starts)).swapaxes(0, 1).reshape(b, t, n, h)


def _query_block(q, start, k, v, attention_mask, window: int | None) -> jax.Array:
    """Attention of the queries at positions `start + i` to every key, causal and windowed by position."""
    q_pos = start + jnp.arange(q.shape[1])[:, None]
    k_pos = jnp.arange(k.shape[1])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    mask = allowed[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
