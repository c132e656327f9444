"""ZeRO-3 steps compiled for N GPUs on a machine with one: memory per device and collectives, from XLA:GPU.

    python benchmarks/gpu/compiled_peak.py --out benchmarks/results/gpu_compiled_peak.jsonl   # one NVIDIA GPU

JAX's mock GPU topology (`jax_mock_gpu_topology`, one mocked host per device, all backed by GPU 0)
presents N devices, so the real train step for N devices is lowered and compiled ahead of time as
`zerojax estimate --compiled` does on simulated CPU devices; nothing runs. Autotuning is off because
mocked peers cannot take part in it. Cases: Llama-2-7B at N = 64 (the estimator's 4.5 GiB target) and
the Llama-2-70B layer shape with 39 and 40 layers at N = 8 (the largest model within 80 GiB). One
JSON line per case, with XLA:GPU's own device/host split; compare with benchmarks/results/estimate_memory.md
and largest_model.md (XLA:CPU). Each case runs in its own process: the topology is fixed at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = [("llama-2-7b", 32, 64), ("llama-2-70b", 39, 8), ("llama-2-70b", 40, 8)]

ONE = """
import json, os, sys
preset, layers, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import jax
jax.config.update("jax_mock_gpu_topology", f"1x{n}x1")
jax.config.update("jax_cuda_visible_devices", "0")
from zerojax import estimate as est
config = dict(est.PRESETS[preset], num_hidden_layers=layers)
e = est.estimate(config, n, 3, seq=2048, micro_batch=1, device_memory=80 * 2**30, compiled=True)
print(json.dumps({"device": jax.devices()[0].device_kind, "model": preset, "layers": layers, "devices": n,
                  "params": e.params, **e.as_json()["compiled"], "peak_gib": round(e.peak_bytes / 2**30, 2),
                  "fits_80gib": e.fits}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    parser.add_argument("--case-timeout", type=float, default=90, help="seconds one case may take")
    args = parser.parse_args()
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip(),
           "PYTHONPATH": str(ROOT)}
    failed = 0
    for preset, layers, n in CASES:
        try:
            done = subprocess.run([sys.executable, "-c", ONE, preset, str(layers), str(n)], env=env,
                                  capture_output=True, text=True, timeout=args.case_timeout)
            error = None if done.returncode == 0 else done.stderr.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            error = f"not compiled within {args.case_timeout} s"
        line = done.stdout.strip().splitlines()[-1] if error is None else json.dumps(
            {"model": preset, "layers": layers, "devices": n, "error": error})
        failed += error is not None
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
