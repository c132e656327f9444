"""The models an estimate sizes: presets of public architectures, a `config.json` read with its sizes
checked, and the dimensions that set a decoder's activation memory under full rematerialisation."""

from __future__ import annotations

import dataclasses
import json
import os

PRESETS: dict[str, dict] = {
    "llama-2-7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "llama-2-13b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "llama-2-70b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": 4096},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
    "gpt2-medium": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 1024, "n_layer": 24,
                    "n_head": 16},
    "gpt2-large": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 1280, "n_layer": 36,
                   "n_head": 20},
    "gpt2-xl": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 1600, "n_layer": 48,
                "n_head": 25},
}


def load_model_config(model: str) -> dict:
    """A Hugging Face config dict: a preset name (see `PRESETS`) or the path of a `config.json`."""
    if model in PRESETS:
        return dict(PRESETS[model])
    if os.path.isdir(model):
        model = os.path.join(model, "config.json")
    if not os.path.isfile(model):
        raise ValueError(
            f"model={model!r} is neither a preset nor a config.json file; use one of {sorted(PRESETS)} or the "
            "path of a Hugging Face config.json (or its folder)."
        )
    with open(model) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model={model!r}: not valid JSON ({e}); pass a Hugging Face config.json.") from None
    if not isinstance(config, dict):
        raise ValueError(f"model={model!r}: the JSON is a {type(config).__name__}, not a config object.")
    from zerojax.hf.files import check_sizes

    check_sizes(config, model)
    return config


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes of a decoder-only transformer that set its activation memory."""

    hidden: int
    layers: int
    heads: int
    inner: int
    vocab: int


def model_dims(hf_config: dict) -> Dims:
    from zerojax.models import gpt2, llama, model_type

    if model_type(hf_config) == "gpt2":
        c = gpt2.GPT2Config.from_hf(hf_config)
        return Dims(c.n_embd, c.n_layer, c.n_head, c.n_inner, c.vocab_size)
    c = llama.LlamaConfig.from_hf(hf_config)
    return Dims(c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, c.vocab_size)


def saved_input_bytes(dims: Dims, seq: int, micro_batch: int, compute_bytes: int = 2) -> int:
    """The layer inputs full rematerialisation saves for the backward pass, per device (L x B x T x H)."""
    return dims.layers * micro_batch * seq * dims.hidden * compute_bytes


def activation_bytes(dims: Dims, seq: int, micro_batch: int, compute_bytes: int = 2, *,
                     saved_on_host: bool = False) -> int:
    """Activations per device with full rematerialisation, an estimate (attention not fused).

    The layer inputs the scan saves (L x B x T x H; in host memory, so not counted, with `saved_on_host`:
    DeepSpeed's cpu_checkpointing), one layer's recomputed forward and its gradients (about 16 hidden-sized
    and 3 MLP-sized tensors, fp32 attention scores and probabilities, twice), and the fp32 logits with
    their gradient.
    """
    b, t, h = micro_batch, seq, dims.hidden
    saved = 0 if saved_on_host else saved_input_bytes(dims, seq, micro_batch, compute_bytes)
    layer = (16 * b * t * h + 3 * b * t * dims.inner) * compute_bytes + 2 * 2 * b * dims.heads * t * t * 4
    logits = b * t * dims.vocab * (2 * 4 + compute_bytes)
    return saved + layer + logits
