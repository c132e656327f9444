"""Checkpoint a ZeRO-3 run and turn a checkpoint into a Hugging Face folder, with the Python API.

Trains a tiny Llama (random weights) for a few steps on 8 simulated CPU devices, saving an orbax
checkpoint every step with the model's Hugging Face config in its metadata, then:

1. resumes from the latest step onto another layout (4 devices, ZeRO stage 1);
2. exports the best step (lowest loss) as fp32 safetensors with `export_checkpoint` — the same code
   path as `zerojax export CKPT_DIR OUT_DIR --step best`, one tensor in memory at a time;
3. loads the folder in PyTorch transformers and compares its logits with the trained model's.

    python examples/export_hf.py [WORKDIR]
"""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax as zj  # noqa: E402
from zerojax import models  # noqa: E402
from zerojax.checkpoint import CheckpointManager, CheckpointOptions, export_checkpoint  # noqa: E402


def main(workdir: str) -> None:
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ).to_dict()
    graphdef, params = nnx.split(models.from_hf_config(hf_config), nnx.Param)
    plan = zj.make_plan(params, optax.adamw(3e-3), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16())
    state = zj.init_state(params, plan)
    step = zj.make_train_step(models.causal_lm_loss(graphdef), plan)
    tokens = np.random.default_rng(0).integers(0, 128, (16, 16)).astype(np.int32)

    ckpt = os.path.join(workdir, "ckpt")
    options = CheckpointOptions(save_total_limit=2, metric_for_best_model="loss")
    with CheckpointManager(ckpt, options) as manager:
        for i in range(6):
            state, metrics = step(state, {"input_ids": tokens})
            manager.save(state, data_position=i + 1, hf_config=hf_config, metrics={"loss": float(metrics["loss"])})
            print(f"step {i + 1}: loss {float(metrics['loss']):.4f}")
        manager.wait()
        print("kept steps", manager.all_steps(), "best", manager.best_step())

    # 1. Resume on 4 devices at stage 1: every process reads only the shards its devices hold.
    plan4 = zj.make_plan(params, optax.adamw(3e-3), zj.ZeroRules(zj.make_mesh(devices=jax.devices()[:4]), stage=1),
                         zj.Precision.bf16())
    restored = CheckpointManager(ckpt, read_only=True).restore(plan4)
    print(f"restored step {restored.step} (data position {restored.data_position}) onto 4 devices, stage 1")

    # 2. Export the best step (its fp32 master weights) as a Hugging Face folder.
    out = export_checkpoint(ckpt, os.path.join(workdir, "hf"), step="best", dtype="fp32", overwrite=True)
    print("exported", sorted(os.listdir(out)))

    # 3. PyTorch transformers loads it; its logits match our model with the best step's weights.
    best_master = CheckpointManager(ckpt, read_only=True).restore_weights(plan4, "best")[1]
    ours = np.asarray(models.logits(graphdef, best_master, tokens[:2]))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens[:2], dtype=torch.long)).logits.numpy()
    print(f"max |logits difference| vs PyTorch: {np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="zerojax-export-"))
