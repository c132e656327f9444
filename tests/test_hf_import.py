"""Import: PyTorch transformers checkpoints read into stage-3 shardings on 8 devices match PyTorch."""

import copy
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

from tests import hf_tiny
from zerojax import models
from zerojax.hf import load, load_pretrained

NAMES = tuple(hf_tiny.CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny model saved by `save_pretrained` in 8 KB shards."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in NAMES:
        out[name] = root / name
        hf_tiny.torch_model(name).save_pretrained(out[name], max_shard_size="8KB")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_import_stage3_matches_pytorch(saved, name):
    assert len(list(saved[name].glob("model-*.safetensors"))) > 3  # really sharded, with an index
    config = hf_tiny.hf_config(name)
    plan = hf_tiny.stage3_plan(config)
    params = load_pretrained(saved[name], plan)
    placed = [x.sharding for x in jax.tree.leaves(params)]
    assert placed == jax.tree.leaves(plan.param_shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    assert any("fsdp" in str(s.spec) for s in placed)
    if name == "llama":  # a tree of shardings works as the target too (shapes from config.json)
        again = load_pretrained(saved[name], plan.param_shardings)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    graphdef, _ = models.abstract_model(config)
    ids = hf_tiny.token_ids()
    ours = np.asarray(hf_tiny.jitted_logits(graphdef, params, ids))
    np.testing.assert_allclose(ours, hf_tiny.torch_logits(hf_tiny.torch_model(name), ids), rtol=0, atol=1e-4)


def test_each_device_reads_only_its_slice(saved, monkeypatch):
    """Every read of a stage-3-sharded tensor is one device's block, never the whole tensor."""
    reads = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getitem__(self, index):
            out = self.inner[index]
            reads.append((self.inner.get_shape(), out.shape))
            return out

        def get_shape(self):
            return self.inner.get_shape()

        def get_dtype(self):
            return self.inner.get_dtype()

    real_open = load.safe_open

    class Opener:
        def __init__(self, *a, **kw):
            self.ctx = real_open(*a, **kw)

        def __enter__(self):
            handle = self.ctx.__enter__()
            return type("H", (), {"get_slice": lambda _, n: Recording(handle.get_slice(n))})()

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    monkeypatch.setattr(load, "safe_open", Opener)
    config = hf_tiny.hf_config("llama")
    load_pretrained(saved["llama"], hf_tiny.stage3_plan(config))
    big = [(full, got) for full, got in reads if np.prod(full) >= 8 * 32]
    assert big and all(np.prod(got) * 8 == np.prod(full) for full, got in big)


def test_import_casts_dtype(saved, tmp_path):
    config = hf_tiny.hf_config("gpt2")
    plan = hf_tiny.stage3_plan(config)
    fp32 = load_pretrained(saved["gpt2"], plan)
    bf16 = load_pretrained(saved["gpt2"], plan, "bf16")
    for a, b in zip(jax.tree.leaves(fp32), jax.tree.leaves(bf16)):
        assert b.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(ml_dtypes.bfloat16))
    # A checkpoint saved in bf16 by PyTorch loads into fp32 exactly.
    copy.deepcopy(hf_tiny.torch_model("gpt2")).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    up = load_pretrained(tmp_path / "bf16", plan, "fp32")
    for a, b in zip(jax.tree.leaves(bf16), jax.tree.leaves(up)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float32))


@pytest.fixture
def single_file(saved, tmp_path):
    """The tiny Llama as one model.safetensors plus config.json, with a function to rewrite it."""
    tensors = {}
    for f in saved["llama"].glob("*.safetensors"):
        tensors.update(load_file(f))
    config = json.loads((saved["llama"] / "config.json").read_text())

    def write(tensors=tensors, config=config):
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        (tmp_path / "ckpt").mkdir()
        save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
        return tmp_path / "ckpt"

    return tensors, config, write


def test_single_file_checkpoint_loads(single_file):
    tensors, config, write = single_file
    params = load_pretrained(write(), hf_tiny.stage3_plan(hf_tiny.hf_config("llama")))
    q = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][...])
    np.testing.assert_array_equal(q[1], tensors["model.layers.1.self_attn.q_proj.weight"].T)


def test_missing_tensor_is_named(single_file):
    tensors, config, write = single_file
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_pretrained(write(partial), hf_tiny.stage3_plan(config))


def test_misnamed_tensor_is_named(single_file):
    tensors, config, write = single_file
    renamed = dict(tensors)
    renamed["model.layers.0.mlp.gate.weight"] = renamed.pop("model.layers.0.mlp.gate_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*missing"):
        load_pretrained(write(renamed), hf_tiny.stage3_plan(config))
    extra = dict(tensors, **{"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight"):
        load_pretrained(write(extra), hf_tiny.stage3_plan(config))


def test_shape_disagreeing_with_config_is_named(single_file):
    tensors, config, write = single_file
    wider = dict(config, intermediate_size=64)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight'.*\(32, 48\).*\(32, 64\)"):
        load_pretrained(write(config=wider), hf_tiny.stage3_plan(wider))


def test_unsupported_architecture_names_field(single_file):
    tensors, config, write = single_file
    with pytest.raises(ValueError, match=r"model_type='bert'.*supports.*llama"):
        load_pretrained(write(config=dict(config, model_type="bert")), None)
    folder = write(config={k: v for k, v in config.items() if k != "model_type"} | {"architectures": ["BertModel"]})
    with pytest.raises(ValueError, match=r"architectures=\['BertModel'\].*LlamaForCausalLM"):
        load_pretrained(folder, None)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path, None)
    (tmp_path / "config.json").write_text(json.dumps(hf_tiny.hf_config("gpt2")))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path, hf_tiny.stage3_plan(hf_tiny.hf_config("gpt2")))
