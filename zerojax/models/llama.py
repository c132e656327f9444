"""Llama-family causal LM (Llama 2/3, Mistral, Qwen2) in Flax NNX, configured from a Hugging Face
`config.json` dict, with its Hugging Face name map.

The variants differ by configuration only: grouped-query attention (`num_key_value_heads`),
`rope_theta` and `rope_scaling` of type `llama3`, attention biases (Qwen2: q/k/v; Llama
`attention_bias`: q/k/v/o), `mlp_bias`, tied embeddings, an explicit `head_dim`, and Mistral's
sliding window. RoPE uses Hugging Face's rotate-half convention, so q/k projections need no
permutation when converting. Decoder layers are stored stacked: every layer parameter has a leading
axis of `num_hidden_layers`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zerojax.hf.mapping import HFTensor
from zerojax.models.layers import Embed, Linear, RMSNorm, attention, remat_policy, run_layers

MODEL_TYPES = ("llama", "mistral", "qwen2")


def _field(config: dict, key: str, model_type: str):
    if config.get(key) is None:
        raise ValueError(f"{model_type} config: required field {key!r} is missing; add it to config.json.")
    return config[key]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama/Mistral/Qwen2 config that define the computation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_llama3: tuple[float, float, float, int] | None = None  # factor, low/high freq factor, original max pos
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict) -> "LlamaConfig":
        """Reads a Hugging Face config dict; unsupported options raise naming the field."""
        mt = config.get("model_type", "llama")
        if mt not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig: model_type={mt!r} is not one of {MODEL_TYPES}.")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{mt} config: hidden_act={act!r} is unsupported; zerojax's Llama uses 'silu'.")
        get = functools.partial(_field, config, model_type=mt)
        heads = get("num_attention_heads")
        qkv_bias = {"llama": bool(config.get("attention_bias", False)), "qwen2": True, "mistral": False}[mt]
        sliding = None
        if mt == "mistral":
            sliding = config.get("sliding_window")
        elif mt == "qwen2" and (
            config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ())
        ):
            raise ValueError(
                "qwen2 config: use_sliding_window=True (per-layer sliding attention) is unsupported; set "
                "use_sliding_window to false."
            )
        theta, llama3 = _rope(config, mt)
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or get("hidden_size") // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_llama3=llama3,
            qkv_bias=qkv_bias,
            o_bias=mt == "llama" and bool(config.get("attention_bias", False)),
            mlp_bias=mt == "llama" and bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            initializer_range=float(config.get("initializer_range", 0.02)),
        )


def _rope(config: dict, mt: str) -> tuple[float, tuple | None]:
    """`(rope_theta, llama3 scaling or None)` from `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (transformers 4)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{mt} config: partial_rotary_factor={params['partial_rotary_factor']} is unsupported (1.0 only).")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ValueError(f"{mt} config: rope_scaling of type llama3 lacks {missing}.")
        return theta, tuple(float(params[k]) for k in keys[:3]) + (int(params[keys[3]]),)
    raise ValueError(
        f"{mt} config: rope_scaling rope_type={kind!r} is unsupported; zerojax supports 'default' and 'llama3'."
    )


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,) in fp32, with Llama 3 scaling when configured."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    if cfg.rope_llama3 is None:
        return inv
    factor, low, high, old_len = cfg.rope_llama3
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (T, head_dim) in the rotate-half layout (frequencies repeated twice)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` for x (B, T, N, H), as Hugging Face's `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lin):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = lin(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = lin(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = lin(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = lin(cfg.num_heads * hd, d, bias=cfg.o_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.window = cfg.sliding_window

    def __call__(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        out = attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask, window=self.window)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lin):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = lin(d, f, bias=cfg.mlp_bias)
        self.up_proj = lin(d, f, bias=cfg.mlp_bias)
        self.down_proj = lin(f, d, bias=cfg.mlp_bias)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    """One decoder layer (pre-norm attention and SwiGLU MLP); `stack` prepends the layer axis."""

    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs, stack: tuple = ()):
        lin = functools.partial(Linear, dtype=dtype, rngs=rngs, stack=stack, std=cfg.initializer_range)
        norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.input_layernorm = norm()
        self.self_attn = LlamaAttention(cfg, lin)
        self.post_attention_layernorm = norm()
        self.mlp = LlamaMLP(cfg, lin)

    def __call__(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nnx.Module):
    """`Llama(cfg, dtype=..., rngs=...)(input_ids, attention_mask=None) -> logits (B, T, vocab)`.

    Parameters are created in `dtype` and the computation runs in the dtype of the parameters it is
    given (norms and softmax in fp32). `scan_layers` runs the stacked layers in one `lax.scan` (else
    unrolled); `remat` is None, `'full'`, `'offload'` or a `jax.checkpoint_policies` name applied per layer
    (`zerojax.models.layers.remat_policy`).
    """

    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs, scan_layers: bool = True, remat: str | None = None):
        remat_policy(remat)
        self.config, self.scan_layers, self.remat = cfg, scan_layers, remat
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.layers = LlamaBlock(cfg, dtype=dtype, rngs=rngs, stack=(cfg.num_layers,))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs, std=cfg.initializer_range
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        h = self.embed_tokens(input_ids)
        cos, sin = rotary(jnp.arange(input_ids.shape[1]), inverse_frequencies(self.config), h.dtype)
        h = run_layers(self.layers, h, cos, sin, attention_mask, scan=self.scan_layers, remat=self.remat)
        h = self.norm(h)
        return self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)


_PARAM = re.compile(
    r"embed_tokens\.embedding|norm\.scale|lm_head\.kernel|layers\.("
    r"self_attn\.[qkvo]_proj\.(kernel|bias)|mlp\.(gate|up|down)_proj\.(kernel|bias)|"
    r"(input|post_attention)_layernorm\.scale)"
)


def hf_tensors(path: str, shape: tuple) -> list[HFTensor]:
    """The Hugging Face tensors of one `Llama` parameter (see `zerojax.hf.mapping`).

    `kernel` (in, out) becomes `weight` (out, in); `scale` and `embedding` become `weight`; stacked
    `layers.X` becomes `model.layers.{i}.X`; `lm_head.kernel` is `lm_head.weight` (absent when tied).
    """
    if not _PARAM.fullmatch(path):
        raise KeyError(path)
    transpose = path.endswith(".kernel")
    name = re.sub(r"\.(kernel|scale|embedding)$", ".weight", path)
    if path == "lm_head.kernel":
        return [HFTensor(name, path, transpose=True)]
    if path.startswith("layers."):
        rest = name[len("layers."):]
        return [HFTensor(f"model.layers.{i}.{rest}", path, layer=i, transpose=transpose) for i in range(shape[0])]
    return [HFTensor(f"model.{name}", path, transpose=transpose)]
