"""Hugging Face interchange: safetensors import into sharded arrays and streaming export.

`load_pretrained(hf_dir, plan_or_shardings, dtype)` reads a Hugging Face folder into sharded
parameters; `export_hf(params, hf_config, out_dir, ...)` writes one. Name/layout maps live beside each
model (`zerojax.models.llama.hf_tensors`, `zerojax.models.gpt2.hf_tensors`); `HFTensor` and the map
hook for a user's own model are documented in `zerojax.hf.mapping`.
"""

from zerojax.hf.export import EXPORT_DTYPES, export_hf
from zerojax.hf.load import load_pretrained, read_config
from zerojax.hf.mapping import HFTensor, TensorMap

__all__ = ["EXPORT_DTYPES", "HFTensor", "TensorMap", "export_hf", "load_pretrained", "read_config"]
