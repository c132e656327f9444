"""Export: zerojax parameters written as a Hugging Face folder that PyTorch transformers loads."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import zerojax as zj
from tests import hf_tiny
from zerojax import models
from zerojax.hf import HFTensor, export_hf, files, load_pretrained
from zerojax.hf.mapping import leaves_by_path

NAMES = tuple(hf_tiny.CONFIGS)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`name -> (config, plan, params)`: each tiny PyTorch model imported at stage 3 on 8 devices."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name in NAMES:
        hf_tiny.torch_model(name).save_pretrained(root / name, max_shard_size="8KB")
        config = hf_tiny.hf_config(name)
        plan = hf_tiny.stage3_plan(config)
        out[name] = config, plan, load_pretrained(root / name, plan)
    return out


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="flax") as h:
            assert h.metadata() == {"format": "pt"}
            out.update({k: np.asarray(h.get_tensor(k)) for k in h.keys()})
    return out


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_transformers(imported, tmp_path, name):
    config, plan, params = imported[name]
    out = export_hf(params, config, tmp_path / "out", max_shard_size="10KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {f.name for f in shards}
    written = _tensors(out)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in written.values())
    for shard in shards:  # each shard within 10 KB, unless it holds a single larger tensor
        held = [written[n].nbytes for n, f in index["weight_map"].items() if f == shard.name]
        assert sum(held) <= 10_000 or len(held) == 1
    assert ("lm_head.weight" in index["weight_map"]) == (not config.get("tie_word_embeddings", True))

    ids = hf_tiny.token_ids(seed=1)
    graphdef, _ = models.abstract_model(config)
    ours = np.asarray(hf_tiny.jitted_logits(graphdef, params, ids))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(hf_tiny.torch_logits(reloaded, ids), ours, rtol=0, atol=1e-4)

    again = load_pretrained(out, plan)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lazy_leaves_write_identical_files_and_load_once(imported, tmp_path):
    config, _, params = imported["llama"]
    eager = export_hf(params, config, tmp_path / "eager", max_shard_size="10KB", progress=False)
    calls = {}

    def lazy(path, x):
        value = np.asarray(x)

        def restore():
            calls[path] = calls.get(path, 0) + 1
            return value

        return restore

    lazy_params = jax.tree_util.tree_map_with_path(lambda p, x: lazy(jax.tree_util.keystr(p), x), params)
    out = export_hf(lazy_params, config, tmp_path / "lazy", max_shard_size="10KB", progress=False)
    assert len(calls) == len(jax.tree.leaves(params)) and set(calls.values()) == {1}
    for f in eager.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_lazy_leaves_with_layer_reads_are_read_per_layer(imported, tmp_path):
    config, _, params = imported["gpt2"]
    eager = export_hf(params, config, tmp_path / "eager", progress=False)
    reads = []

    class ByLayer:
        def __init__(self, path, value):
            self.path, self.value = path, np.asarray(value)

        def __call__(self):
            reads.append((self.path, None))
            return self.value

        def layer(self, i):
            reads.append((self.path, i))
            return self.value[i]

    lazy = {p: ByLayer(p, x) for p, x in leaves_by_path(params).items()}
    out = export_hf(lazy, config, tmp_path / "lazy", progress=False)
    assert (out / "model.safetensors").read_bytes() == (eager / "model.safetensors").read_bytes()
    whole = {p for p, i in reads if i is None}
    assert whole == {p for p in lazy if not p.startswith("h.")}  # stacked leaves never read whole
    assert ("h.attn.c_attn.kernel", 1) in reads


@pytest.mark.parametrize("dtype, np_dtype", [("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)])
def test_export_16_bit(imported, tmp_path, dtype, np_dtype):
    config, _, params = imported["gpt2"]
    out = export_hf(params, config, tmp_path / dtype, dtype=dtype, progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    got = _tensors(out)
    wte = np.asarray(params["wte"]["embedding"][...])
    assert got["transformer.wte.weight"].dtype == np_dtype
    np.testing.assert_array_equal(got["transformer.wte.weight"], wte.astype(np_dtype))
    c_attn = np.asarray(params["h"]["attn"]["c_attn"]["kernel"][...])[1]  # Conv1D: (in, out), no transpose
    np.testing.assert_array_equal(got["transformer.h.1.attn.c_attn.weight"], c_attn.astype(np_dtype))


def test_refuses_non_empty_output_unless_overwrite(imported, tmp_path):
    config, _, params = imported["gpt2"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"out_dir .*out.* not empty.*overwrite=True"):
        export_hf(params, config, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").exists()
    export_hf(params, config, tmp_path / "out", overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "model.safetensors.index.json"
    ]
    (tmp_path / "empty").mkdir()
    export_hf(params, config, tmp_path / "empty", progress=False)  # an empty folder is fine


def test_interrupted_export_never_looks_complete(imported, tmp_path):
    config, _, params = imported["llama"]
    leaves = leaves_by_path(params)  # a flat {dotted path: leaf} dict is a valid parameter tree too
    last = sorted(leaves)[-1]  # written last, after earlier shards are on disk

    def vanish():
        raise RuntimeError("disk vanished")

    broken = {p: vanish if p == last else np.asarray(x) for p, x in leaves.items()}
    with pytest.raises(RuntimeError, match="disk vanished"):
        export_hf(broken, config, tmp_path / "new", max_shard_size="10KB", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one is left
    old = export_hf(params, config, tmp_path / "old", dtype="bf16", progress=False)
    before = {f.name: f.read_bytes() for f in old.iterdir()}
    with pytest.raises(RuntimeError, match="disk vanished"):
        export_hf(broken, config, old, overwrite=True, progress=False)
    assert {f.name: f.read_bytes() for f in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_export_checks_params_against_config(imported, tmp_path):
    config, _, params = imported["llama"]
    with pytest.raises(ValueError, match=r"'layers\.mlp\.down_proj\.kernel' has shape \(2, 48, 32\).*\(2, 64, 32\)"):
        export_hf(params, dict(config, intermediate_size=64), tmp_path / "a", progress=False)
    tied_config, _, tied = imported["qwen2"]
    with pytest.raises(ValueError, match=r"missing \['lm_head\.kernel'\], unexpected \[\]"):
        export_hf(tied, dict(tied_config, tie_word_embeddings=False), tmp_path / "b")
    with pytest.raises(ValueError, match=r"dtype='int8'.*bf16"):
        export_hf(params, config, tmp_path / "c", dtype="int8")
    with pytest.raises(ValueError, match=r"max_shard_size='big'"):
        export_hf(params, config, tmp_path / "d", max_shard_size="big")
    with pytest.raises(ValueError, match=r"model_type='bert'"):
        export_hf(params, dict(config, model_type="bert"), tmp_path / "e")


def test_shard_size_strings():
    assert [files.size_bytes(s) for s in ("5GB", "500MB", "2GiB", "10KB", 1234)] == [
        5 * 10**9, 5 * 10**8, 2 * 2**30, 10**4, 1234
    ]
    with pytest.raises(ValueError, match=r"max_shard_size=0"):
        files.size_bytes(0)


class UserModel(nnx.Module):
    """Not a zerojax model: a layer stack with a multi-head kernel that needs a reshape on export."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 6, rngs=rngs)
        self.blocks = nnx.Param(jax.random.normal(rngs.params(), (3, 6, 6)))
        self.heads = nnx.LinearGeneral(6, (2, 4), rngs=rngs)


def user_map(path, shape):
    if path == "embed.embedding":
        return [HFTensor("model.embed.weight", path)]
    if path == "blocks":
        return [HFTensor(f"model.blocks.{i}.weight", path, layer=i, transpose=True) for i in range(shape[0])]
    if path == "heads.kernel":  # (in, heads, dim) -> torch Linear (heads * dim, in)
        return [HFTensor("model.heads.weight", path, to_hf=lambda a: a.reshape(a.shape[0], -1).T)]
    if path == "heads.bias":
        return [HFTensor("model.heads.bias", path, to_hf=lambda a: a.reshape(-1))]
    raise KeyError(path)


def test_user_model_exports_through_a_map(tmp_path):
    _, params = nnx.split(UserModel(nnx.Rngs(0)), nnx.Param)
    out = export_hf(params, {"model_type": "mine"}, tmp_path / "mine", arch=user_map, progress=False)
    got = _tensors(out)
    blocks = np.asarray(params["blocks"][...])
    assert sorted(got) == ["model.blocks.0.weight", "model.blocks.1.weight", "model.blocks.2.weight",
                           "model.embed.weight", "model.heads.bias", "model.heads.weight"]
    np.testing.assert_array_equal(got["model.blocks.2.weight"], blocks[2].T)
    kernel = np.asarray(params["heads"]["kernel"][...])
    np.testing.assert_array_equal(got["model.heads.weight"], kernel.reshape(6, 8).T)
    with pytest.raises(KeyError, match=r"parameter 'extra' .*no Hugging Face name"):
        export_hf({**leaves_by_path(params), "extra": np.zeros(2)}, {}, tmp_path / "x", arch=user_map)


@pytest.mark.slow  # the default suite has the same check through the demo's bf16 run (tests/test_tokenizer.py)
def test_trained_bf16_export_generates_same_tokens(imported, tmp_path):
    """10 ZeRO-3 bf16 steps, exported in bf16: transformers' greedy tokens equal zerojax's."""
    config, _, params = imported["llama"]
    plan = hf_tiny.stage3_plan(config, zj.Precision.bf16(), optax.adam(1e-2))
    graphdef, _ = models.abstract_model(config)
    step = zj.make_train_step(models.causal_lm_loss(graphdef), plan)
    state = zj.init_state(params, plan)
    batch = {"input_ids": jnp.asarray(hf_tiny.token_ids(batch=8, length=16, seed=2))}
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    out = export_hf(state.params, config, tmp_path / "trained", dtype="bf16", progress=False)

    prompt = hf_tiny.token_ids(batch=2, length=4, seed=3)
    exported = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state.params)  # as written
    ours = np.asarray(models.generate(graphdef, exported, jnp.asarray(prompt), 20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=20, do_sample=False,
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    assert theirs.shape == (2, 24)
    np.testing.assert_array_equal(ours, theirs)
    before = np.asarray(models.generate(graphdef, params, jnp.asarray(prompt), 20))
    assert not np.array_equal(before, ours)  # training changed what the model generates
