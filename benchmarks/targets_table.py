"""Every ZeRO stage of Llama-2-7B compiled for accelerators, against the formulas, in one run.

    python benchmarks/targets_table.py --target h100 --devices 8 > benchmarks/results/targets_h100_n8.jsonl
    python benchmarks/targets_table.py --target tpu-v5p --devices 8 --offload 70b > benchmarks/results/targets_v5p_n8.jsonl

One JSON line per stage (seq 2048, micro-batch 1, full remat, bf16 AdamW with fp32 master, fp32 gradient
accumulator, nothing allocated): the state bytes the accelerator's compiled program takes as
arguments against the ZeRO formula at zerojax's widths (12 bytes a parameter over N held at stage 3),
the collective bytes as that compiler emits them against the ZeRO paper's theory (2Ψ elements at
stages 1-2, 3Ψ at stage 3), the share of each kind overlapped with compute in the schedule, and the
device peak. `--offload 70b`: also Llama-2-70B (80 layers) at stage 3 with optimizer and parameter
offload, with the host bytes the compiler reports against the plan's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from zerojax import estimate as est  # noqa: E402

GIB = 2**30


def row(e: est.StageEstimate, model: str) -> dict:
    c = e.compiled
    if c is None:  # the compiler refused the step for memory
        return {"model": model, "devices": e.devices, "stage": e.stage, "params": e.params, "refused": e.refused,
                "peak_gib_at_least": round(e.peak_bytes / GIB, 3), "fits": False}
    state_theory = e.theory_model_state_bytes - e.grad_bytes  # held between steps: the formula less gradients
    return {
        "target": c.target, "model": model, "devices": e.devices, "stage": e.stage,
        "offload": "optimizer+params" if e.offload_param else ("optimizer" if e.offload_optimizer else None),
        "params": e.params, "state_gib": round(c.state_bytes / GIB, 3), "formula_state_gib": round(state_theory / GIB, 3),
        "state_vs_formula": round(c.state_bytes / state_theory, 4),
        "host_argument_gib": round(c.host_argument_bytes / GIB, 3), "plan_host_gib": round(e.host_bytes / GIB, 3),
        "collective_gib": {k: round(v / GIB, 3) for k, v in e.collective_bytes.items()},
        "theory_collective_gib": round(e.theory_collective_bytes / GIB, 3),
        "collective_vs_theory": round(e.collective_bytes["total"] / max(e.theory_collective_bytes, 1), 4),
        "rewritten_gib": {k: round(v / GIB, 3) for k, v in c.rewritten.items()},
        "overlap": None if c.overlap is None else {k: round(v, 4) for k, v in c.overlap.items()},
        "temp_gib": round(c.temp_bytes / GIB, 3), "peak_gib": round(e.peak_bytes / GIB, 3),
        "device_memory_gib": round(e.device_memory / GIB, 2), "fits": e.fits, "compile_seconds": round(c.seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--offload", choices=["70b"], help="also Llama-2-70B at stage 3 with both offloads")
    args = parser.parse_args()
    for stage in args.stages:
        e = est.estimate(est.PRESETS["llama-2-7b"], args.devices, stage, compiled=True, target=args.target)
        print(json.dumps(row(e, "llama-2-7b")), flush=True)
    if args.offload:
        e = est.estimate(est.PRESETS["llama-2-70b"], args.devices, 3, compiled=True, target=args.target,
                         offload_optimizer=True, offload_param=True)
        print(json.dumps(row(e, "llama-2-70b")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
