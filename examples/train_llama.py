"""Train a small Llama with ZeRO on the bundled corpus, then export a Hugging Face folder.

    python examples/train_llama.py                              # ZeRO-3, 8 simulated devices on CPU
    python examples/train_llama.py --deepspeed my_ds_config.json
    python examples/train_llama.py --init-from HF_DIR --max-steps 0   # import, then export unchanged
    python examples/train_llama.py --resume                     # continue the run in --output-dir

Without an accelerator, 8 CPU devices are simulated (XLA_FLAGS, set before JAX starts). At the end the
model is written to OUTPUT_DIR/hf; when PyTorch `transformers` is installed the folder is loaded
there and asked to continue a prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# No GPU or TPU on this machine: use the CPU without probing the compilers `zerojax[aot]` installs.
if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/accel0")) and not list(Path("/dev").glob("vfio/[0-9]*")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental.multihost_utils import process_allgather, sync_global_devices  # noqa: E402

from zerojax import distributed  # noqa: E402
from zerojax.args import TrainingArguments  # noqa: E402
from zerojax.data import ByteTokenizer, text_dataset  # noqa: E402
from zerojax.hf import load_pretrained, read_config  # noqa: E402
from zerojax.models import from_hf_config, generate  # noqa: E402
from zerojax.trainer import Trainer  # noqa: E402

# A byte-level Llama of 5.4M parameters: 6 layers, hidden 256, grouped-query attention.
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 256,
    "intermediate_size": 896, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed", default=str(HERE / "configs" / "zero3.json"), help="a DeepSpeed config file")
    p.add_argument("--init-from", help="a Hugging Face folder to start from (its config.json picks the model)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--corpus", default=str(HERE / "data" / "corpus.txt"))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1, help="per device (train_micro_batch_size_per_gpu)")
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--resume", action="store_true",
                   help="resume from the latest checkpoint in --output-dir (its hf/ export is then rewritten)")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty --output-dir first")
    p.add_argument("--plot", action="store_true", help="write OUTPUT_DIR/loss.png (needs matplotlib)")
    p.add_argument("--device-memory", help='bytes per device a zero_optimization.stage "auto" must fit, e.g. 2GB '
                   "(default: the device's own limit; CPU devices report none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    distributed.initialize()
    out_dir = Path(opts.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not opts.resume:
        if not opts.overwrite:
            print(f"train_llama: --output-dir {out_dir} is not empty; pass --resume to continue its run or "
                  "--overwrite to start afresh.", file=sys.stderr)
            return 2
        if jax.process_index() == 0:
            shutil.rmtree(out_dir)
        sync_global_devices("train_llama: output dir cleared")
    hf_config = read_config(opts.init_from) if opts.init_from else DEMO_CONFIG
    train, evaluation = text_dataset(opts.corpus, opts.seq_len + 1, stride=opts.seq_len // 4)
    args = TrainingArguments(
        output_dir=opts.output_dir, deepspeed=opts.deepspeed, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size, learning_rate=opts.learning_rate, weight_decay=0.01,
        max_steps=opts.max_steps, warmup_steps=max(opts.max_steps // 10, 1), logging_steps=10,
        eval_steps=max(opts.max_steps // 4, 1), save_steps=max(opts.max_steps // 2, 1), save_total_limit=2,
    )
    with nnx.use_eager_sharding(False):
        model = from_hf_config(hf_config, seed=0)
    trainer = Trainer(model, args, train, evaluation, hf_config=hf_config, device_memory=opts.device_memory)
    if opts.init_from:
        params = load_pretrained(opts.init_from, trainer.plan.param_shardings, dtype="fp32")
        trainer.state = trainer.state._replace(params=params) if trainer.state.master is None else \
            trainer.state._replace(params=params, master=jax.tree.map(lambda x: x.astype(np.float32), params))
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"zerojax: {sum(x.size for x in jax.tree.leaves(trainer.state.params)):,} parameters, ZeRO stage "
        f"{trainer.config.stage} on {trainer.plan.rules.data_size} devices ({jax.devices()[0].platform}, "
        f"{jax.process_count()} process(es))")
    initial = trainer.evaluate()["eval_loss"]
    result = trainer.train(resume_from_checkpoint=True if opts.resume else None) if opts.max_steps else None
    final = trainer.evaluate()["eval_loss"]
    say(json.dumps({"initial_eval_loss": round(initial, 4), "final_eval_loss": round(final, 4),
                    "steps": int(trainer.state.step), "interrupted": bool(result and result.interrupted)}))
    if opts.plot and jax.process_index() == 0:
        say(f"zerojax: loss curve in {trainer.plot_loss(out_dir / 'loss.png')}")
    if result is not None and result.interrupted:
        return 0
    out = trainer.save_model(out_dir / "hf", dtype="fp32", overwrite=opts.resume)
    say(f"zerojax: exported a Hugging Face folder to {out}")
    prompt = "We hold these truths"
    tok = ByteTokenizer()
    params = process_allgather(trainer.state.params, tiled=True)  # whole on every process (small model)
    sample = generate(trainer.graphdef, params, tok.encode(prompt)[None], 40)
    say(f"zerojax sample: {tok.decode(sample[0])!r}")
    if jax.process_index() == 0:
        show_in_transformers(out, prompt)
    return 0


def show_in_transformers(folder: Path, prompt: str) -> None:
    """Loads the export in PyTorch transformers, when installed, and continues `prompt` greedily."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the PyTorch check (pip install '.[test]').")
        return
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor(ByteTokenizer().encode(prompt)[None].astype(np.int64))
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    print(f"transformers sample: {ByteTokenizer().decode(out[0].numpy())!r}")


if __name__ == "__main__":
    sys.exit(main())
