"""`zerojax export`: a checkpoint becomes a Hugging Face folder that PyTorch transformers loads, from a
process without the training mesh; a user's mistake is one line on stderr and exit code 2."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file

import zerojax as zj
from tests import hf_tiny
from zerojax import cli, models
from zerojax.checkpoint import CheckpointManager, CheckpointOptions, export_checkpoint, save_model
from zerojax.hf import load_pretrained

CONFIG = "llama"


def train_and_save(folder, precision, steps, hf_config=None, stage=3):
    """The tiny Llama (stage 3 unless `stage`, 8 devices) from the PyTorch weights, trained `steps` steps and
    saved after each (with loss metrics 3, 1, 2, ...); with `steps=0` the initial state is saved untrained."""
    config = hf_tiny.hf_config(CONFIG)
    plan = hf_tiny.stage3_plan(config, precision, tx=optax.adamw(1e-2), stage=stage)
    src = folder.parent / f"{folder.name}-src"
    hf_tiny.torch_model(CONFIG).save_pretrained(src)
    state = zj.init_state(load_pretrained(src, plan), plan)
    graphdef, _ = models.abstract_model(config)
    with CheckpointManager(folder, CheckpointOptions(metric_for_best_model="loss")) as manager:
        if steps == 0:
            manager.save(state, hf_config=hf_config or config)
        if steps:
            step = zj.make_train_step(models.causal_lm_loss(graphdef), plan)
        for i in range(steps):
            state, _ = step(state, {"input_ids": hf_tiny.token_ids(8, 12, seed=i)})
            manager.save(state, hf_config=hf_config or config, metrics={"loss": [3.0, 1.0, 2.0][i]})
    return plan, graphdef, state


def torch_logits(hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    return hf_tiny.torch_logits(model, hf_tiny.token_ids())


@pytest.mark.slow  # ~13 s; `make demo` exports and loads in transformers, test_hf_export loads exports by default
def test_cli_export_loads_in_transformers(tmp_path):
    plan, graphdef, state = train_and_save(tmp_path / "ck", zj.Precision.fp32(), steps=3)
    ours = np.asarray(hf_tiny.jitted_logits(graphdef, state.params, hf_tiny.token_ids()))
    restored = CheckpointManager(tmp_path / "ck", read_only=True).restore(plan).state  # nnx.State round trip
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: no training mesh
    done = subprocess.run(
        [sys.executable, "-m", "zerojax.cli", "export", str(tmp_path / "ck"), str(tmp_path / "hf"),
         "--max-shard-size", "20KB"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 3  # sharded, with an index
    np.testing.assert_allclose(torch_logits(tmp_path / "hf"), ours, rtol=0, atol=1e-4)
    # --step best is step 2 (loss 1.0): not the latest, so its logits differ from the final model's.
    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "best"), "--step", "best", "--no-progress"]) == 0
    assert not np.allclose(torch_logits(tmp_path / "best"), ours, atol=1e-4)


def test_lazy_weights_read_stacked_layers_one_layer_at_a_time(tmp_path):
    """A checkpoint saved with its `hf_config` stores stacked weights one chunk per layer and shard, and
    `lazy_weights` reads a layer, or a whole tensor, equal to the saved arrays."""
    _, _, state = train_and_save(tmp_path / "ck", zj.Precision.fp32(), steps=1)
    manager = CheckpointManager(tmp_path / "ck", read_only=True)
    lazy = manager.lazy_weights()
    gate, saved_gate = lazy["layers"]["mlp"]["gate_proj"]["kernel"]["value"], state.params["layers"]["mlp"]["gate_proj"]["kernel"]
    assert manager.open_tensor(gate.step, gate.name).chunk_layout.read_chunk.shape[0] == 1
    for i in range(gate.shape[0]):
        np.testing.assert_array_equal(gate.layer(i), np.asarray(saved_gate[...][i]))
    embed = lazy["embed_tokens"]["embedding"]["value"]
    np.testing.assert_array_equal(embed(), np.asarray(state.params["embed_tokens"]["embedding"][...]))
    assert manager.open_tensor(embed.step, embed.name).chunk_layout.read_chunk.shape[0] < embed.shape[0]


@pytest.mark.slow
def test_mixed_precision_exports_the_fp32_master(tmp_path):
    _, graphdef, state = train_and_save(tmp_path / "ck", zj.Precision.bf16(), steps=0, stage=2)  # bf16 copy + master
    out = export_checkpoint(tmp_path / "ck", tmp_path / "hf", dtype="fp32", progress=False)
    master = np.asarray(hf_tiny.jitted_logits(graphdef, state.master, hf_tiny.token_ids()))
    exported = torch_logits(out)
    np.testing.assert_allclose(exported, master, rtol=0, atol=1e-4)
    compute = np.asarray(hf_tiny.jitted_logits(graphdef, jax.tree.map(lambda x: x.astype(np.float32), state.params),
                                               hf_tiny.token_ids()))
    assert np.abs(exported - compute).max() > 1e-3  # the bf16 copy would not have passed
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    half = export_checkpoint(tmp_path / "ck", tmp_path / "bf16", dtype="bf16", progress=False)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    # save_model (stage3_gather_16bit_weights_on_model_save) from the live sharded state: the same tensors.
    live = save_model(state, hf_tiny.hf_config(CONFIG), tmp_path / "live", dtype="bf16", progress=False)
    ours, theirs = load_file(live / "model.safetensors"), load_file(half / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].dtype == ml_dtypes.bfloat16 for k in ours)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


@pytest.fixture(scope="module")
def wrong_model(tmp_path_factory):
    """A checkpoint whose tensors are the tiny Llama's but whose recorded hf_config is a wider model."""
    folder = tmp_path_factory.mktemp("wrong") / "ck"
    train_and_save(folder, zj.Precision.fp32(), steps=0, hf_config=dict(hf_tiny.hf_config(CONFIG), intermediate_size=64))
    return folder


@pytest.mark.parametrize(
    "make_args,expected",
    [
        (lambda t, w: [str(t / "nope"), str(t / "out")], r"checkpoint folder .*nope does not exist"),
        (lambda t, w: [str(t / "empty"), str(t / "out")], r"holds no complete checkpoint step"),
        (lambda t, w: [str(w), str(t / "out"), "--step", "9"], r"step 9 is not in .*available steps: \[0\]"),
        (lambda t, w: [str(w), str(t / "out"), "--step", "soon"], r"step='soon' is not a step"),
        (lambda t, w: [str(w), str(t / "out")],
         r"parameter 'layers.mlp.down_proj.kernel' has shape \(2, 48, 32\) but hf_config implies \(2, 64, 32\)"),
    ],
    ids=["missing", "empty", "no-such-step", "bad-step", "other-model"],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, wrong_model, capsys, make_args, expected):
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", *make_args(tmp_path, wrong_model), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zerojax export: error: "), err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    done = subprocess.run([sys.executable, "-m", "zerojax.cli", "export", *sys.argv[1:]], capture_output=True, text=True)
    print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
""")


def _export_peak_rss(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.slow
def test_export_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Exporting a 637 MiB model (largest tensor 62.5 MiB; stacked leaves 128 MiB) holds at most two
    copies of its largest tensor plus 100 MB beyond what the command holds before reading any tensor."""
    config = transformers.LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=8).to_dict()
    graphdef, params = nnx.split(models.from_hf_config(config), nnx.Param)
    plan = zj.make_plan(params, optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3))
    state = zj.init_state(params, plan)
    largest = 4 * max(config["vocab_size"] * config["hidden_size"], config["hidden_size"] * config["intermediate_size"])
    with CheckpointManager(tmp_path / "ck", CheckpointOptions(save_only_model=True)) as manager:
        manager.save(state, hf_config=config)
    del state, params
    code, before = _export_peak_rss(tmp_path / "ck", tmp_path / "none", "--step", "99")  # fails before any read
    assert code == 2
    code, peak = _export_peak_rss(tmp_path / "ck", tmp_path / "hf", "--no-progress")
    assert code == 0 and (tmp_path / "hf" / "config.json").exists()
    # measured: 134 MiB (the tensor being written and the writer's block); 2 x 62.5 MiB + 100 MB = 220 MiB
    assert peak - before < 2 * largest + 100e6, (peak - before, largest)
