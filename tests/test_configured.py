"""One path from a config to a plan: `zerojax estimate` compiles the step the Trainer runs for the same
DeepSpeed config, and the model's own `stacked` metadata makes every bundled model's stage-3 step gather
one layer at a time (GPT-2's `h` as well as Llama's `layers`)."""

import copy
import os

import jax
import numpy as np
import pytest
from flax import nnx

from zerojax import estimate as est, hlo
from zerojax.args import TrainingArguments
from zerojax.config import load_config
from zerojax.configured import abstract_batch
from zerojax.data import text_dataset
from zerojax.models import abstract_model, from_hf_config
from zerojax.trainer import Trainer

CORPUS = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "corpus.txt")
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "vocab_size": 128, "n_positions": 32, "n_embd": 32, "n_layer": 3, "n_head": 4}
SEQ = 17


def _leaves(tree) -> list:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("zero", [
    pytest.param({"stage": 3, "stage3_param_persistence_threshold": 0}, id="zero3", marks=pytest.mark.slow),
    pytest.param({"stage": 2, "offload_optimizer": {"device": "cpu"}}, id="zero2-offload", marks=pytest.mark.slow),
])
def test_estimate_compiles_the_trainers_step(zero):
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": zero}
    with nnx.use_eager_sharding(False):
        model = from_hf_config(TINY, seed=0, remat="full")
    args = TrainingArguments(output_dir=None, deepspeed=copy.deepcopy(config), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, learning_rate=1e-3, bf16=True, max_steps=4)
    trainer = Trainer(model, args, text_dataset(CORPUS, SEQ, stride=8)[0], hf_config=TINY)
    trainer_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.train_batches.batch(0))
    trainer_text = trainer.train_step.lower(trainer.plan.abstract_state(),
                                            abstract_batch(trainer_batch, trainer.mesh)).as_text()

    resolved = load_config(copy.deepcopy(config), trainer.args, model_config=TINY, world_size=8)
    graphdef, params = abstract_model(TINY, remat="full")  # as the estimate builds it
    plan = est.config_plan(resolved, params, jax.devices()[:8])
    step, batch = est.configured_step(graphdef, plan, resolved, SEQ)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), batch) == jax.tree.map(lambda x: (x.shape, x.dtype), trainer_batch)
    estimate_text = step.lower(plan.abstract_state(), batch).as_text()

    # the same state, laid out alike (shapes, dtypes, shardings and memory kinds) ...
    ours, theirs = _leaves(plan.abstract_state()), _leaves(trainer.plan.abstract_state())
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding), path
    # ... and the same collectives, by kind and dtype
    collectives = hlo.lowered_collectives(estimate_text)
    assert collectives == hlo.lowered_collectives(trainer_text) and collectives["reduce-scatter"]
    # the public estimate compiles that step
    compiled = est.estimate(TINY, 8, config=resolved, seq=SEQ, compiled=True).compiled
    assert compiled.lowered_collectives == collectives


def _gathered(text: str) -> tuple[int, dict[str, int]]:
    """(all-gather bytes outside every loop, {function a loop calls: all-gather bytes of one call})."""
    functions, name, body = {}, None, []
    for line in text.splitlines() + ["func.func @END("]:
        m = hlo._MLIR_FUNC.match(line)
        if m:
            if name is not None:
                functions[name] = hlo._scan_mlir_function(body)
            name, body = m.group(1), []
        else:
            body.append(line)
    collectives, calls = functions["main"]
    outside = sum(nbytes for kind, _, nbytes, times in collectives if kind == "all-gather" and times == 1)
    in_loop = {callee: sum(hlo._total(functions, callee).get("all-gather", {}).values())
               for callee, times in calls if times > 1}
    return outside, in_loop


def test_gpt2_stage3_step_gathers_one_layer_at_a_time():
    graphdef, params = abstract_model(GPT2, remat="full")
    config = est.arguments_config(3, 8)
    plan = est.config_plan(config, params, jax.devices()[:8])
    step, batch = est.configured_step(graphdef, plan, config, SEQ)
    outside, in_loop = _gathered(step.lower(plan.abstract_state(), batch).as_text())
    bf16 = lambda tree: 2 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    one_layer = bf16(params["h"]) // GPT2["n_layer"]
    # inside the layer scan each call gathers at most one layer: the forward all of it, the rematerialised
    # backward what its gradient needs (not the output projection's bias)
    assert max(in_loop.values()) == one_layer
    # outside it only the unstacked parameters: embeddings and the final norm
    assert outside == bf16(params) - bf16(params["h"])


def test_cli_estimates_a_deepspeed_config(tmp_path, capsys):
    import json

    from zerojax.cli import main

    model, ds = tmp_path / "config.json", tmp_path / "ds.json"
    model.write_text(json.dumps(TINY))
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                              "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    argv = ["estimate", "--model", str(model), "--devices", "8", "--seq", str(SEQ), "--deepspeed", str(ds)]
    assert main([*argv, "--json"]) == 0
    (stage,) = json.loads(capsys.readouterr().out)["stages"]
    expected = est.estimate(TINY, 8, seq=SEQ, config=load_config(str(ds), model_config=TINY, world_size=8))
    assert stage == expected.as_json() and (stage["stage"], stage["offload_optimizer"]) == (2, "cpu")
    assert main([*argv, "--stage", "3"]) == 2
    assert "--deepspeed states the stage" in capsys.readouterr().err
