#!/usr/bin/env bash
# One device call (under 10 minutes): both GPU benchmarks, each under its own time limit, results into
# $OUT (or ./gpu-results); each benchmark rewrites its results as it goes, so a cut-short run keeps them.
#   bash benchmarks/gpu/run_all.sh        # on the device machine, from the repository root
# Needs jax with CUDA, flax and optax; installs this checkout without its dependencies.
set -u
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv" 2>&1
python -m pip install -q --no-deps -e . > "$out/install.log" 2>&1
timeout 380 python benchmarks/gpu/offload.py --budget-s 300 --out "$out/gpu_offload.json" > "$out/offload.log" 2>&1
echo "offload exit $?" >> "$out/status.txt"
timeout 170 python benchmarks/gpu/compiled_peak.py --out "$out/gpu_compiled_peak.jsonl" > "$out/compiled_peak.log" 2>&1
echo "compiled_peak exit $?" >> "$out/status.txt"
cat "$out/status.txt"
