"""Peak host memory of `zerojax export` on a checkpoint of a > 2 GB fp32 Llama-shaped model.

    python benchmarks/export_memory.py [--workdir DIR] [--dtype fp32]

1. A child process (8 simulated CPU devices) saves the model's random initial parameters as a ZeRO-3
   checkpoint with `CheckpointManager.save(..., hf_config=...)`, as the Trainer does.
2. `zerojax export` is run once on a step that does not exist (it fails before reading any tensor: the
   baseline) and once for real; each run's peak RSS is `ru_maxrss` of the child.

The target is peak(export) - peak(baseline) <= 2 x the largest Hugging Face tensor + 100 MB, where a
stacked leaf (one weight kind for all layers) is several times the largest tensor, so the bound holds
only if stacked leaves are read one layer at a time. The script checks the written folder (sizes, one
tensor's values against the checkpoint) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Llama-shaped, 2.3 GB in fp32. The 32000 x 2048 embedding and lm_head (250 MiB each) are the largest
# tensors; each stacked MLP leaf (8 x 2048 x 5632, 352 MiB) is larger than any tensor.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 2048,
    "hidden_act": "silu",
}

SAVE = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, optax
from flax import nnx
import zerojax as zj
from zerojax import models
from zerojax.checkpoint import CheckpointManager, CheckpointOptions
config, folder = json.loads(sys.argv[1]), sys.argv[2]
_, params = nnx.split(models.from_hf_config(config), nnx.Param)
plan = zj.make_plan(params, optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3))
state = zj.init_state(params, plan)
del params
with CheckpointManager(folder, CheckpointOptions(save_only_model=True)) as manager:
    manager.save(state, hf_config=config)
"""


def _export(*args: str) -> tuple[int, int, float]:
    """(exit code, peak RSS in bytes, seconds) of `zerojax export ARGS` in a fresh process on one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "done = subprocess.run([sys.executable, '-m', 'zerojax.cli', 'export', *sys.argv[1:]], capture_output=True); "
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True)
    rc, peak, seconds = out.stdout.split()
    return int(rc), int(peak), float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    h, f, v, n = (CONFIG[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    largest, stacked = 4 * max(v * h, h * f), 4 * n * h * f
    model_bytes = 4 * (2 * v * h + n * (4 * h * h + 3 * h * f + 2 * h) + h)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt, out = Path(tmp, "ckpt"), Path(tmp, "hf")
        subprocess.run([sys.executable, "-c", SAVE, json.dumps(CONFIG), str(ckpt)], check=True)
        rc, baseline, _ = _export(str(ckpt), str(Path(tmp, "none")), "--step", "99")
        assert rc == 2, rc
        rc, peak, seconds = _export(str(ckpt), str(out), "--dtype", args.dtype, "--no-progress")
        assert rc == 0, rc
        _check(out, ckpt, model_bytes, args.dtype)
    extra, bound = peak - baseline, 2 * largest + 100 * 10**6
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    print("| model (fp32) | largest tensor | largest stacked leaf | export dtype | peak RSS, baseline | "
          "peak RSS, export | difference | bound 2 x largest + 100 MB | within | export time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {mib(model_bytes)} | {mib(largest)} | {mib(stacked)} | {args.dtype} | {mib(baseline)} | {mib(peak)} | "
          f"{mib(extra)} | {mib(bound)} | {'yes' if extra <= bound else 'NO'} | {seconds:.1f} s |")
    return 0 if extra <= bound else 1


def _check(out: Path, ckpt: Path, model_bytes: int, dtype: str) -> None:
    """The export is complete (every byte accounted for) and a layer's gate_proj (transposed on export)
    equals the checkpoint's."""
    from safetensors import safe_open

    from zerojax.checkpoint import CheckpointManager

    index = json.loads((out / "model.safetensors.index.json").read_text())
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    assert index["metadata"]["total_size"] == model_bytes // 4 * itemsize, (index["metadata"], model_bytes)
    lazy = CheckpointManager(ckpt, read_only=True).lazy_weights()
    kernel = lazy["layers"]["mlp"]["gate_proj"]["kernel"]["value"].layer(3)
    name = "model.layers.3.mlp.gate_proj.weight"
    with safe_open(out / index["weight_map"][name], framework="flax") as f:
        weight = np.asarray(f.get_tensor(name)).astype(np.float32)
    expected = kernel.T
    assert np.array_equal(weight, expected) if dtype == "fp32" else np.allclose(weight, expected, rtol=1e-2, atol=1e-3)


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"\n(total wall time {time.time() - started:.0f} s)")
    sys.exit(code)
