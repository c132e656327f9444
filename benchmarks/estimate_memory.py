"""Memory and communication of each ZeRO stage vs theory: Llama-2-7B, seq 2048, micro-batch 1, full remat.

    python benchmarks/estimate_memory.py 8  > benchmarks/results/estimate_n8.jsonl
    python benchmarks/estimate_memory.py 64 > benchmarks/results/estimate_n64.jsonl
    ACCUM=bf16 python benchmarks/estimate_memory.py 64 > benchmarks/results/estimate_n64_bf16acc.jsonl

One JSON line per stage (compiled ahead of time on N simulated CPU devices, nothing allocated) with
the ZeRO paper's formula (16-bit gradients), the formula at zerojax's byte widths (fp32 gradient
accumulator, or bf16 with ACCUM=bf16), DeepSpeed's estimator (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) and the communication theory (2Ψ / 3Ψ 16-bit elements). Results: benchmarks/results/estimate_memory.md. Extra arguments: stages to run.
"""
import json
import os
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
stages = [int(s) for s in sys.argv[2:]] or [0, 1, 2, 3]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
os.environ["JAX_PLATFORMS"] = "cpu"

from zerojax import estimate as est  # noqa: E402
from zerojax.report import zero_formula_bytes  # noqa: E402

config = est.PRESETS[os.environ.get("MODEL", "llama-2-7b")]
largest_layer = config["vocab_size"] * config["hidden_size"]  # the embedding, DeepSpeed's L
for stage in stages:
    e = est.estimate(config, n, stage, seq=2048, micro_batch=1, compiled=True,
                     grad_accum_dtype=os.environ.get("ACCUM", "fp32"))
    p = e.params
    deepspeed = {2: 2 * p + 18 * p / n, 3: 4 * largest_layer + 18 * p / n}.get(stage)
    row = e.as_json()
    row.update(
        devices=n, params=p,
        paper_formula_bytes=zero_formula_bytes(stage, p, n),  # 2-byte gradients, K = 12
        deepspeed_estimator_bytes=deepspeed,
        comm_theory_bytes={0: 2, 1: 2, 2: 2, 3: 3}[stage] * 2 * p,
    )
    print(json.dumps(row), flush=True)
