"""Peak host memory of `export_hf` on a > 1 GB fp32 Llama-shaped model fed through lazy leaves.

    python benchmarks/export_memory.py [--workdir DIR] [--dtype fp32]

1. A child process writes random parameters of the model, one `.npy` file per parameter leaf.
2. A child process that only imports zerojax reports its peak RSS (the baseline).
3. A child process imports zerojax and exports the model with `export_hf`, each leaf a lazy leaf
   (`lambda: np.load(file)`, materialising the whole leaf as an orbax single-leaf restore does), and
   reports its peak RSS (`ru_maxrss`).

The target is peak(export) - peak(import only) <= 2 x the largest tensor + 100 MB; the script checks
the written folder (sizes, one tensor's values) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Llama-shaped, ~1.6 GB in fp32; the 128256 x 1024 embedding and lm_head (525 MB each) are the
# largest tensors, so the bound is set by them.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 1024,
    "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "max_position_embeddings": 2048,
    "hidden_act": "silu",
}

WRITE = """
import json, sys, numpy as np
from zerojax import models
from zerojax.hf.mapping import leaves_by_path
config, root = json.loads(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
for path, x in leaves_by_path(models.abstract_model(config)[1]).items():
    np.save(f"{root}/{path}.npy", rng.standard_normal(x.shape, dtype=np.float32) * 0.02)
"""

BASELINE = """
import resource, zerojax
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

EXPORT = """
import functools, json, resource, sys, time, numpy as np
from zerojax.hf import export_hf
from zerojax import models
from zerojax.hf.mapping import leaves_by_path
config, root, out, dtype = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
paths = leaves_by_path(models.abstract_model(config)[1])
lazy = {p: functools.partial(np.load, f"{root}/{p}.npy") for p in paths}
start = time.perf_counter()
export_hf(lazy, config, out, dtype=dtype, progress=False)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - start}))
"""


def _run(code: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, out = Path(tmp, "leaves"), Path(tmp, "hf")
        src.mkdir()
        _run(WRITE, json.dumps(CONFIG), str(src))
        sizes = {f.stem: np.load(f, mmap_mode="r").nbytes for f in src.glob("*.npy")}
        model_bytes = sum(sizes.values())
        largest = max(sizes.values())
        baseline = int(_run(BASELINE).strip())
        result = json.loads(_run(EXPORT, json.dumps(CONFIG), str(src), str(out), args.dtype).strip().splitlines()[-1])
        _check(out, src, model_bytes, args.dtype)
    extra = result["peak"] - baseline
    bound = 2 * largest + 100 * 10**6
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    print("| model (fp32) | largest tensor | export dtype | peak RSS, import only | peak RSS, export | "
          "difference | bound 2 x largest + 100 MB | within | export time |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {mib(model_bytes)} | {mib(largest)} | {args.dtype} | {mib(baseline)} | {mib(result['peak'])} | "
          f"{mib(extra)} | {mib(bound)} | {'yes' if extra <= bound else 'NO'} | {result['seconds']:.1f} s |")
    return 0 if extra <= bound else 1


def _check(out: Path, src: Path, model_bytes: int, dtype: str) -> None:
    """The export is complete: every byte accounted for, and lm_head (transposed on export) is right."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    assert index["metadata"]["total_size"] == model_bytes // 4 * itemsize, index["metadata"]
    kernel = np.load(src / "lm_head.kernel.npy", mmap_mode="r")
    with safe_open(out / index["weight_map"]["lm_head.weight"], framework="flax") as f:
        rows = np.asarray(f.get_slice("lm_head.weight")[:3]).astype(np.float32)
    expected = np.ascontiguousarray(kernel[:, :3].T)
    assert np.array_equal(rows, expected) if dtype == "fp32" else np.allclose(rows, expected, rtol=1e-2, atol=1e-3)


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"\n(total wall time {time.time() - started:.0f} s)")
    sys.exit(code)
