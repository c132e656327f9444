"""Flax NNX causal LMs with Hugging Face layouts, built from a Hugging Face `config.json` dict.

    model = from_hf_config(config, dtype="fp32", seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = causal_lm_loss(graphdef)          # what zerojax.make_train_step takes

The model code is single-device: the ZeRO train step runs `loss_fn` per device on the local batch
with gathered parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zerojax.hf.mapping import TensorMap
from zerojax.loss import TokenLoss
from zerojax.models import gpt2, llama
from zerojax.precision import dtype_of

# model_type -> (config class, model class, Hugging Face tensor map)
ARCHS: dict[str, tuple[type, type, TensorMap]] = {
    "llama": (llama.LlamaConfig, llama.Llama, llama.hf_tensors),
    "mistral": (llama.LlamaConfig, llama.Llama, llama.hf_tensors),
    "qwen2": (llama.LlamaConfig, llama.Llama, llama.hf_tensors),
    "gpt2": (gpt2.GPT2Config, gpt2.GPT2, gpt2.hf_tensors),
}
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}


def model_type(config: dict) -> str:
    """The supported `model_type` of a Hugging Face config, from `model_type` or else `architectures`."""
    mt = config.get("model_type")
    if mt is not None:
        if mt not in ARCHS:
            raise ValueError(
                f"config: model_type={mt!r} is unsupported; zerojax supports model_type in {sorted(ARCHS)}."
            )
        return mt
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise ValueError(
        f"config: architectures={archs!r} (and no model_type) is unsupported; zerojax supports "
        f"architectures in {sorted(ARCHITECTURES)} (model_type in {sorted(ARCHS)})."
    )


def from_hf_config(
    config: dict,
    *,
    dtype="fp32",
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    scan_layers: bool = True,
    remat: str | None = None,
) -> nnx.Module:
    """A randomly initialised model for a Hugging Face config dict (`rngs`, else `nnx.Rngs(seed)`).

    `remat`: None (no rematerialisation), `'full'`, `'offload'` (the layer inputs saved in host memory) or a
    `jax.checkpoint_policies` name, per layer.
    """
    config_cls, model_cls, _ = ARCHS[model_type(config)]
    return model_cls(
        config_cls.from_hf(config), dtype=dtype_of(dtype), rngs=rngs or nnx.Rngs(seed),
        scan_layers=scan_layers, remat=remat,
    )


def abstract_model(config: dict, *, dtype="fp32", scan_layers: bool = True, remat: str | None = None):
    """`(graphdef, params)` with `jax.ShapeDtypeStruct` leaves: the model's structure, nothing allocated."""
    model = nnx.eval_shape(lambda: from_hf_config(config, dtype=dtype, scan_layers=scan_layers, remat=remat))
    return nnx.split(model, nnx.Param)


def tensor_map(config: dict) -> TensorMap:
    """The Hugging Face tensor map of the config's architecture (see `zerojax.hf.mapping`)."""
    return ARCHS[model_type(config)][2]


def merge(graphdef: nnx.GraphDef, params: Any, other: Any = None, key: jax.Array | None = None) -> nnx.Module:
    """The model from its parameters and the rest of its state (`other`, as `nnx.split(model, nnx.Param,
    ...)` leaves it: RNG streams). With `key` every RNG stream is reseeded from it (training: dropout
    draws from `key`); without, the model runs in eval mode (deterministic)."""
    # `other` rebuilt here, so that its variables belong to the trace that reseeds them
    model = nnx.merge(graphdef, params) if other is None else nnx.merge(graphdef, params, jax.tree.map(lambda x: x, other))
    if key is None:
        model.eval()
        return model
    streams = sorted({s.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
    nnx.reseed(model, **{name: jax.random.fold_in(key, i) for i, name in enumerate(streams)})
    return model


def logits(graphdef: nnx.GraphDef, params: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None,
           other: Any = None, key: jax.Array | None = None) -> jax.Array:
    """The model's fp32 logits (B, T, vocab) for `input_ids` (B, T) with `params` (an `nnx.Param` state),
    and `other` state and `key` as `merge` takes them."""
    return merge(graphdef, params, other, key)(input_ids, attention_mask).astype(jnp.float32)


def causal_lm_loss(graphdef: nnx.GraphDef, *, per_token: bool = False,
                   other: Any = None) -> Callable[[Any, dict], jax.Array] | TokenLoss:
    """`loss_fn(params, batch)`: mean next-token cross-entropy of `batch["input_ids"]` (B, T).

    Targets are the next input ids, or with `batch["labels"]` the next labels, where -100 marks a
    position that does not count (Hugging Face's convention; labels are shifted here, as its models
    do). With `batch["attention_mask"]` (1 = token, 0 = padding) padding keys are masked and, without
    labels, only targets that are real tokens count. `per_token`: a `zerojax.TokenLoss` instead (the
    summed loss and the count of targets), so that the train step weighs every token of the global
    batch the same, as Hugging Face's Trainer does. `other`: the model's state beside its parameters
    (RNG streams for dropout): the loss then takes a key, `loss_fn(params, batch, key)`, and runs the
    model in training mode with it (`key=None`: eval mode), for `make_train_step(..., rng=True)`.
    """

    def targets(batch):
        """The target ids (B, T-1) and each one's weight (1 counts, 0 does not)."""
        labels = batch.get("labels")
        if labels is not None:
            counted = labels[:, 1:] != -100
            return jnp.where(counted, labels[:, 1:], 0), counted.astype(jnp.float32)
        mask = batch.get("attention_mask")
        ids = batch["input_ids"][:, 1:]
        return ids, jnp.ones(ids.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)

    def summed(params, batch, key=None):
        ids, weight = targets(batch)
        out = logits(graphdef, params, batch["input_ids"], batch.get("attention_mask"), other, key)[:, :-1]
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(out, ids) * weight)

    def count(batch):
        return jnp.sum(targets(batch)[1])

    if per_token:
        return TokenLoss(summed, count)
    return lambda params, batch, *key: summed(params, batch, *key) / jnp.maximum(count(batch), 1.0)


def generate(graphdef: nnx.GraphDef, params: Any, input_ids: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: `input_ids` (B, T) followed by `max_new_tokens` argmax tokens, (B, T + new).

    Each step reruns the full causal forward pass on a fixed-length buffer (no KV cache): meant for
    tests and small demos, not for serving.
    """
    b, t = input_ids.shape
    total = t + max_new_tokens
    buf = jnp.zeros((b, total), jnp.int32).at[:, :t].set(input_ids.astype(jnp.int32))

    @jax.jit
    def run(params, buf):
        def step(i, buf):
            nxt = jnp.argmax(logits(graphdef, params, buf)[:, i - 1], axis=-1).astype(jnp.int32)
            return buf.at[:, i].set(nxt)

        return jax.lax.fori_loop(t, total, step, buf)

    return run(params, buf)


__all__ = [
    "ARCHITECTURES", "ARCHS", "abstract_model", "causal_lm_loss", "from_hf_config", "generate", "gpt2",
    "llama", "logits", "merge", "model_type", "tensor_map",
]
