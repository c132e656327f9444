"""DeepSpeed's `activation_checkpointing.cpu_checkpointing`: each layer's saved input in host memory, the rest
recomputed (`remat="offload"`), from the config through the Trainer and the estimate to the compiled program."""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zerojax as zj
from zerojax import estimate as est
from zerojax import targets
from zerojax.cli import main as cli
from zerojax.compiled import compile_train_step
from zerojax.config import ConfigError, ConfigWarning, load_config
from zerojax.models import abstract_model, causal_lm_loss, from_hf_config
from zerojax.trainer import Trainer
from zerojax.args import TrainingArguments

LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 512, "intermediate_size": 1024,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
SEQ = 128
TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}
ON_HOST = "MemorySpace.Host"  # how a jaxpr names a transfer to host memory


def compiled_step(target: str, remat: str):
    graphdef, params = abstract_model(LLAMA, dtype="fp32", remat=remat)
    mesh = zj.make_mesh(devices=targets.TARGETS[target].devices(8))
    plan = zj.make_plan(params, optax.adamw(1e-4), zj.ZeroRules(mesh, stage=3), zj.Precision.bf16())
    batch = jax.ShapeDtypeStruct((8, SEQ), jnp.int32,
                                 sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(zj.DATA_AXES)))
    step = zj.make_train_step(causal_lm_loss(graphdef), plan, max_grad_norm=1.0)
    return compile_train_step(step, plan, {"input_ids": batch}, target=target)


SAVED_INPUTS = LLAMA["num_hidden_layers"] * SEQ * LLAMA["hidden_size"] * 2  # one bf16 sequence per device, per layer


@pytest.mark.slow  # a compile is 6-15 s; the default suite checks the policy in the jaxpr (below)
def test_the_estimate_compiles_the_layer_inputs_into_host_memory():
    on = est.estimate(LLAMA, 8, 3, seq=SEQ, cpu_checkpointing=True, compiled=True, target="h100")
    assert on.compiled.host_temp_bytes == SAVED_INPUTS
    assert on.compiled.host_argument_bytes == 0  # the state stays on the device


@pytest.mark.slow  # four compiles
@pytest.mark.parametrize("target", ["h100", "tpu-v5p"])
def test_offload_moves_exactly_the_layer_inputs_off_the_device(target):
    full, offload = compiled_step(target, "full"), compiled_step(target, "offload")
    assert full.host_temp_bytes == 0 and offload.host_temp_bytes == SAVED_INPUTS
    assert offload.state_bytes == full.state_bytes
    if target == "h100":  # XLA:TPU adds transfer buffers that only a deep stack repays (benchmarks/results/peers.md)
        assert full.temp_bytes - offload.temp_bytes >= 0.9 * SAVED_INPUTS


def test_the_config_maps_cpu_checkpointing_and_names_what_has_no_effect():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config({"train_batch_size": 8, "activation_checkpointing": {
            "cpu_checkpointing": True, "partition_activations": True, "number_checkpoints": 4}}, world_size=8)
    assert config.cpu_checkpointing is True
    assert config.to_dict()["activation_checkpointing"]["cpu_checkpointing"] is True
    ignored = " ".join(str(w.message) for w in caught if issubclass(w.category, ConfigWarning))
    assert "activation_checkpointing.partition_activations" in ignored
    assert "activation_checkpointing.number_checkpoints" in ignored
    assert "cpu_checkpointing" not in ignored
    assert load_config({"train_batch_size": 8}, world_size=8).cpu_checkpointing is False
    with pytest.raises(ConfigError, match=r"activation_checkpointing.cpu_checkpointing='yes' is invalid: it must be "
                                          r"true or false"):
        load_config({"train_batch_size": 8, "activation_checkpointing": {"cpu_checkpointing": "yes"}}, world_size=8)
    with pytest.raises(ConfigError, match=r"activation_checkpointing.cpu_checkpoint\b.*did you mean 'cpu_checkpointing'"):
        load_config({"train_batch_size": 8, "activation_checkpointing": {"cpu_checkpoint": True}}, world_size=8)


def trainer(model, **checkpointing):
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
              "activation_checkpointing": copy.deepcopy(checkpointing)}
    args = TrainingArguments(deepspeed=config, per_device_train_batch_size=1, max_steps=1, disable_tqdm=True)
    ids = np.random.default_rng(0).integers(0, 64, size=(8, 9), dtype=np.int32)
    return Trainer(model, args, ids, hf_config=TINY, devices=jax.devices()[:4])


def test_the_trainer_saves_the_layer_inputs_in_host_memory():
    t = trainer(from_hf_config(TINY), cpu_checkpointing=True)
    batch = t.train_batches.batch(0)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: t.loss_fn.total(p, batch)))(t.state.params))
    # one transfer out in the forward scan and one back in the backward scan: the layer input, nothing else
    assert jaxpr.count(ON_HOST) == 1 and jaxpr.count("MemorySpace.Device") == 1


def test_cpu_checkpointing_refuses_another_policy_and_warns_for_a_model_without_remat():
    with pytest.raises(ConfigError, match=r"cpu_checkpointing=true .* remat='dots_saveable'; build it with remat=None "
                                          r"or 'full', or drop cpu_checkpointing"):
        trainer(from_hf_config(TINY, remat="dots_saveable"), cpu_checkpointing=True)

    class NoRemat(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((4,), np.float32))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(NoRemat(), cpu_checkpointing=True)
    assert any("activation_checkpointing.cpu_checkpointing has no effect: NoRemat has no remat attribute"
               in str(w.message) for w in caught if issubclass(w.category, ConfigWarning))


def test_the_estimate_counts_the_layer_inputs_in_host_memory(capsys):
    on, off = (est.estimate(LLAMA, 8, 3, seq=SEQ, cpu_checkpointing=flag) for flag in (True, False))
    assert off.activation_bytes - on.activation_bytes == SAVED_INPUTS
    assert (on.host_activation_bytes, off.host_activation_bytes) == (SAVED_INPUTS, 0)
    assert on.as_json()["host_activation_bytes"] == SAVED_INPUTS
    assert cli(["estimate", "--model", "llama-2-7b", "--devices", "8", "--deepspeed", "ds.json",
                "--cpu-checkpointing"]) == 2
    assert "--deepspeed states the stage, offload, micro-batch, accumulator dtype and activation checkpointing; drop " \
           "--cpu-checkpointing." in capsys.readouterr().err
