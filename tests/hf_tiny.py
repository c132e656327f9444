"""Tiny Hugging Face models made in PyTorch transformers, shared by the model and HF interchange tests."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import torch
import transformers

import zerojax as zj
from zerojax import models

VOCAB = 96
# Each config exercises what distinguishes its variant: Llama with GQA, llama3 rope scaling and all
# biases; Qwen2 with q/k/v biases, one KV head and tied embeddings; Mistral with an explicit head_dim
# and a sliding window shorter than the test sequences; GPT-2 with Conv1D layers.
CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=500000.0, attention_bias=True, mlp_bias=True, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8},
    )),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=True, max_position_embeddings=64,
    )),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=5, max_position_embeddings=64,
    )),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        n_embd=32, n_layer=2, n_head=4, n_positions=64,
    )),
}


@functools.lru_cache(maxsize=None)
def torch_model(name: str, seed: int = 0):
    """A PyTorch transformers model with random N(0, 0.2) weights (large enough to make logits differ)."""
    config_cls, model_cls, kw = CONFIGS[name]
    config = config_cls(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def hf_config(name: str) -> dict:
    """The model's config as the dict `save_pretrained` writes to config.json."""
    return torch_model(name).config.to_dict()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def stage3_plan(config: dict, precision: zj.Precision | None = None, tx=None, stage: int = 3) -> zj.ZeroPlan:
    """A stage-3 (or `stage`) plan over all 8 devices for the model `config` describes, layers gathered one
    at a time."""
    _, abstract = models.abstract_model(config)
    rules = zj.ZeroRules(zj.make_mesh(), stage=stage)
    return zj.make_plan(abstract, tx or optax.sgd(0.1), rules, precision or zj.Precision.fp32())


jitted_logits = jax.jit(models.logits, static_argnums=0)
