"""GPT-2 causal LM in Flax NNX, configured from a Hugging Face `config.json` dict, with its name map.

Hugging Face's GPT-2 uses `Conv1D` layers whose weight is stored (in, out), the same layout as a Flax
kernel, so its map renames without transposing. The output projection is always tied to `wte`.
Blocks are stored stacked: every block parameter has a leading axis of `n_layer`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax.hf.mapping import HFTensor
from zerojax.models.layers import Embed, LayerNorm, Linear, attention, remat_policy, run_layers

ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of a Hugging Face GPT-2 config that define the computation."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict) -> "GPT2Config":
        """Reads a Hugging Face GPT-2 config dict; unsupported options raise naming the field."""
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if config.get(key) is None:
                raise ValueError(f"gpt2 config: required field {key!r} is missing; add it to config.json.")
        act = config.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"gpt2 config: activation_function={act!r} is unsupported; use one of {sorted(ACTIVATIONS)}.")
        for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                               ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if config.get(key, supported) != supported:
                raise ValueError(f"gpt2 config: {key}={config[key]!r} is unsupported; zerojax's GPT-2 needs {supported}.")
        if config.get("tie_word_embeddings", True) is False:
            raise ValueError("gpt2 config: tie_word_embeddings=False is unsupported; GPT-2 ties lm_head to wte.")
        return cls(
            vocab_size=config["vocab_size"],
            n_positions=config["n_positions"],
            n_embd=config["n_embd"],
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            n_inner=config.get("n_inner") or 4 * config["n_embd"],
            activation=act,
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            initializer_range=float(config.get("initializer_range", 0.02)),
        )


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, lin):
        self.c_attn = lin(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.c_proj = lin(cfg.n_embd, cfg.n_embd, bias=True)
        self.n_head = cfg.n_head

    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = (y.reshape(b, t, self.n_head, d // self.n_head) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        return self.c_proj(attention(q, k, v, mask).reshape(b, t, d))


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, lin):
        self.c_fc = lin(cfg.n_embd, cfg.n_inner, bias=True)
        self.c_proj = lin(cfg.n_inner, cfg.n_embd, bias=True)
        self.activation = cfg.activation

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class GPT2Block(nnx.Module):
    """One pre-norm transformer block; `stack` prepends the layer axis to its parameters."""

    def __init__(self, cfg: GPT2Config, *, dtype, rngs: nnx.Rngs, stack: tuple = ()):
        lin = functools.partial(Linear, dtype=dtype, rngs=rngs, stack=stack, std=cfg.initializer_range)
        norm = functools.partial(LayerNorm, cfg.n_embd, eps=cfg.layer_norm_epsilon, dtype=dtype, stack=stack)
        self.ln_1 = norm()
        self.attn = GPT2Attention(cfg, lin)
        self.ln_2 = norm()
        self.mlp = GPT2MLP(cfg, lin)

    def __call__(self, h, mask):
        h = h + self.attn(self.ln_1(h), mask)
        return h + self.mlp(self.ln_2(h))


class GPT2(nnx.Module):
    """`GPT2(cfg, dtype=..., rngs=...)(input_ids, attention_mask=None) -> logits (B, T, vocab)`.

    Same conventions as `zerojax.models.llama.Llama` (`scan_layers`, `remat`, parameter dtype).
    """

    def __init__(self, cfg: GPT2Config, *, dtype, rngs: nnx.Rngs, scan_layers: bool = True, remat: str | None = None):
        remat_policy(remat)
        self.config, self.scan_layers, self.remat = cfg, scan_layers, remat
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.wpe = Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.h = GPT2Block(cfg, dtype=dtype, rngs=rngs, stack=(cfg.n_layer,))
        self.ln_f = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        t = input_ids.shape[1]
        if t > self.config.n_positions:
            raise ValueError(f"GPT2: sequence length {t} exceeds n_positions={self.config.n_positions}.")
        h = self.wte(input_ids) + self.wpe(jnp.arange(t))[None]
        h = run_layers(self.h, h, attention_mask, scan=self.scan_layers, remat=self.remat)
        return self.wte.attend(self.ln_f(h))


_PARAM = re.compile(
    r"(wte|wpe)\.embedding|ln_f\.(scale|bias)|h\.("
    r"ln_[12]\.(scale|bias)|attn\.c_(attn|proj)\.(kernel|bias)|mlp\.c_(fc|proj)\.(kernel|bias))"
)


def hf_tensors(path: str, shape: tuple) -> list[HFTensor]:
    """The Hugging Face tensors of one `GPT2` parameter (see `zerojax.hf.mapping`).

    Names get the `transformer.` prefix, stacked `h.X` becomes `transformer.h.{i}.X`, and `kernel`,
    `scale`, `embedding` become `weight`. Conv1D keeps (in, out): nothing is transposed.
    """
    if not _PARAM.fullmatch(path):
        raise KeyError(path)
    name = re.sub(r"\.(kernel|scale|embedding)$", ".weight", path)
    if path.startswith("h."):
        return [HFTensor(f"transformer.h.{i}.{name[2:]}", path, layer=i) for i in range(shape[0])]
    return [HFTensor(f"transformer.{name}", path)]
