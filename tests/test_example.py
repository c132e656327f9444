"""The main example: import a transformers checkpoint, export it unchanged, refuse to clobber a run."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_llama.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_init_from_transformers_then_export_unchanged(example, tmp_path):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0.0, 0.1)
    original.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    out = tmp_path / "run"
    assert example.main(["--init-from", str(tmp_path / "src"), "--max-steps", "0", "--output-dir", str(out)]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 256, size=(2, 24)))
    with torch.no_grad():
        want, got = original(ids).logits.numpy(), exported(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert example.main(["--init-from", str(tmp_path / "src"), "--max-steps", "0", "--output-dir", str(out)]) == 2
