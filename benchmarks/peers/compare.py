"""zerojax ZeRO-3 against the plain GSPMD FSDP step (`gspmd_fsdp.py`), in one run, same model and data.

    python benchmarks/peers/compare.py time [--pairs 24]                       # CPU: step time, 8 devices
    python benchmarks/peers/compare.py peak --target h100 --devices 8 [--model llama-2-7b] [--layers 8 16 32]
    python benchmarks/peers/compare.py largest --target tpu-v5p --devices 64 [--budget 95GiB]

`time`: both steps on 8 simulated CPU devices, warmed up, then timed in interleaved pairs (zerojax,
baseline, zerojax, ...) so that load from other processes falls on both; the median ratio is reported.
`peak`: both steps compiled for N accelerators of the target (nothing allocated) at each number of
layers: arguments, temporaries, peak per device, and the temporaries' growth per layer. `largest`: the
Llama-2-70B layer shape with the most layers whose compiled peak fits the budget (default: the target's
memory), for each step on the same ladder (two probes, then secant guesses on the peak until a fit and
a miss are one layer apart; a program the compiler refuses for memory is a miss). zerojax's step: ZeRO-3, bf16 compute, fp32 master shards, AdamW, clipping 1.0, full
remat (`--remat offload`: both steps save each layer's input in host memory, DeepSpeed's
`cpu_checkpointing`), one micro-batch of `--micro-batch` sequences of `--seq` tokens per device. One JSON line per
measurement on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "time" in sys.argv[1:2]:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import zerojax as zj  # noqa: E402
import gspmd_fsdp  # noqa: E402
from zerojax import estimate as est  # noqa: E402
from zerojax.models import abstract_model, causal_lm_loss  # noqa: E402
from zerojax.targets import resolve  # noqa: E402

GIB = 2**30
SMALL = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1376,
         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024}


def zerojax_step(graphdef, params, devices, lr=1e-4):
    plan = zj.make_plan(params, optax.adamw(lr), zj.ZeroRules(zj.make_mesh(devices=devices), stage=3),
                        zj.Precision.bf16())
    return zj.make_train_step(causal_lm_loss(graphdef), plan, max_grad_norm=1.0), plan


def batch_spec(mesh, axes, n, micro, seq):
    return {"input_ids": jax.ShapeDtypeStruct((n * micro, seq), jnp.int32, sharding=NamedSharding(mesh, P(axes)))}


def compiled(which: str, config: dict, devices, micro: int, seq: int, choice: str = "largest",
             remat: str = "full") -> dict:
    """Memory analysis of one step compiled for `devices` (GiB per device)."""
    graphdef, params = abstract_model(config, dtype="fp32", scan_layers=True, remat=remat)
    n = len(devices)
    start = time.perf_counter()
    if which == "zerojax":
        step, plan = zerojax_step(graphdef, params, devices)
        exe = step.lower(plan.abstract_state(), batch_spec(plan.mesh, zj.DATA_AXES, n, micro, seq)).compile()
        layout = {"state_layout": "compiler" if step.jit else "row-major"}
    else:
        mesh = gspmd_fsdp.fsdp_mesh(devices)
        step, abstract, _ = gspmd_fsdp.make_step(graphdef, params, mesh, choice=choice, remat=remat)
        exe = step.lower(abstract, batch_spec(mesh, gspmd_fsdp.AXIS, n, micro, seq)).compile()
        layout = {}
    m = exe.memory_analysis()
    params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"step": which if which == "zerojax" else f"gspmd-fsdp-{choice}", "layers": config["num_hidden_layers"],
            "params": params_count, "arguments_gib": round(m.argument_size_in_bytes / GIB, 3),
            "temporaries_gib": round(m.temp_size_in_bytes / GIB, 3),
            **({"host_temporaries_gib": round(m.host_temp_size_in_bytes / GIB, 3)} if m.host_temp_size_in_bytes else {}),
            "peak_gib": round((m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                               + m.temp_size_in_bytes) / GIB, 3),
            "compile_seconds": round(time.perf_counter() - start, 1), **layout,
            **({"remat": remat} if remat != "full" else {})}


def steps(args) -> list[tuple[str, str]]:
    """zerojax, then the baseline with each dimension choice asked for."""
    return [("zerojax", "largest")] + [("gspmd", choice) for choice in args.baselines]


def peak(args) -> None:
    target = resolve(args.target)
    devices = target.devices(args.devices)
    for which, choice in steps(args):
        rows = []
        for layers in args.layers:
            config = dict(est.PRESETS[args.model], num_hidden_layers=layers)
            row = compiled(which, config, devices, args.micro_batch, args.seq, choice, args.remat)
            rows.append(row)
            print(json.dumps({"target": target.name, "devices": args.devices, "model": args.model, **row}), flush=True)
        if len(rows) > 1:
            slope = (rows[-1]["temporaries_gib"] - rows[0]["temporaries_gib"]) / (rows[-1]["layers"] - rows[0]["layers"])
            print(json.dumps({"target": target.name, "devices": args.devices, "model": args.model, "step": rows[0]["step"],
                              "temporaries_gib_per_layer": round(slope, 4)}), flush=True)


def largest(args) -> None:
    target = resolve(args.target)
    devices = target.devices(args.devices)
    budget = est.parse_bytes(args.budget, "--budget") if args.budget else target.memory_bytes
    for which, choice in steps(args):
        peaks = {}  # layers -> compiled peak in GiB, None where the compiler refused it for memory

        def measure(layers: int) -> None:
            config = dict(est.PRESETS["llama-2-70b"], num_hidden_layers=layers)
            try:
                row = compiled(which, config, devices, args.micro_batch, args.seq, choice, args.remat)
            except Exception as e:  # XLA:TPU refuses to compile what cannot fit
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                row = {"step": which if which == "zerojax" else f"gspmd-fsdp-{choice}", "layers": layers,
                       "refused": str(e).splitlines()[0][:200]}
            peaks[layers] = row.get("peak_gib")
            print(json.dumps({"target": target.name, "devices": args.devices, "budget_gib": round(budget / GIB, 2),
                              **row, "fits": peaks[layers] is not None and peaks[layers] * GIB <= budget}), flush=True)

        for layers in args.probe:
            measure(layers)
        while True:  # secant steps on the (nearly linear) peak, until a fit and a miss are adjacent
            fit = [n for n, v in peaks.items() if v is not None and v * GIB <= budget]
            miss = [n for n in peaks if n not in fit]
            lo, hi = max(fit, default=None), min(miss, default=None)
            if lo is not None and hi is not None and hi == lo + 1:
                break
            if lo is not None and hi is not None and peaks[hi] is None:  # a refused miss: bisect
                measure((lo + hi) // 2)
                continue
            known = sorted((n for n, v in peaks.items() if v is not None), key=lambda n: abs(peaks[n] * GIB - budget))
            a, b = sorted(known[:2])
            guess = int(a + (budget / GIB - peaks[a]) * (b - a) / (peaks[b] - peaks[a]))
            guess = min(max(guess, (lo or 0) + 1), (hi or guess + 2) - 1)
            if guess in peaks:
                guess = lo + 1 if lo is not None else guess - 1
            measure(guess)
        print(json.dumps({"target": target.name, "devices": args.devices, "step": which if which == "zerojax" else
                          f"gspmd-fsdp-{choice}", "largest_layers": lo,
                          "largest_params": _params(lo), "peak_gib": peaks[lo], "budget_gib": round(budget / GIB, 2)}),
              flush=True)


def _params(layers: int) -> int:
    _, params = abstract_model(dict(est.PRESETS["llama-2-70b"], num_hidden_layers=layers))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def step_time(args) -> None:
    from flax import nnx

    from zerojax.models import from_hf_config

    model = from_hf_config(SMALL, dtype="fp32", scan_layers=True, remat="full")
    graphdef, params = nnx.split(model, nnx.Param)
    devices = jax.devices()
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, SMALL["vocab_size"], (8 * args.micro_batch, args.seq), dtype=np.int32)}
               for _ in range(4)]
    ours, plan = zerojax_step(graphdef, params, devices)
    ours_state = zj.init_state(params, plan)
    mesh = gspmd_fsdp.fsdp_mesh(devices)
    theirs, _, init = gspmd_fsdp.make_step(graphdef, params, mesh, choice=args.choice)
    theirs_state = init(jax.tree.map(jnp.asarray, params))
    runs = {"zerojax": [ours, ours_state, []], "gspmd-fsdp": [theirs, theirs_state, []]}
    for i in range(3):  # compile and warm up
        for run in runs.values():
            run[1], out = run[0](run[1], batches[i % 4])
            jax.block_until_ready(out)
    for i in range(args.pairs):
        order = list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]
        for run in order:
            start = time.perf_counter()
            run[1], out = run[0](run[1], batches[i % 4])
            jax.block_until_ready((run[1], out))
            run[2].append(time.perf_counter() - start)
    a, b = np.array(runs["zerojax"][2]), np.array(runs["gspmd-fsdp"][2])
    print(json.dumps({"params": sum(x.size for x in jax.tree.leaves(params)), "devices": len(devices),
                      "seq": args.seq, "micro_batch": args.micro_batch, "pairs": args.pairs, "baseline_dims": args.choice,
                      "zerojax_median_ms": round(1000 * float(np.median(a)), 2),
                      "baseline_median_ms": round(1000 * float(np.median(b)), 2),
                      "median_of_pair_ratios": round(float(np.median(a / b)), 4),
                      "ratio_of_medians": round(float(np.median(a) / np.median(b)), 4)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("time")
    t.add_argument("--pairs", type=int, default=24)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--micro-batch", type=int, default=1)
    t.add_argument("--choice", default="largest", choices=["largest", "first"])
    for name in ("peak", "largest"):
        s = sub.add_parser(name)
        s.add_argument("--target", required=True)
        s.add_argument("--devices", type=int, default=8)
        s.add_argument("--seq", type=int, default=2048)
        s.add_argument("--micro-batch", type=int, default=1)
        s.add_argument("--baselines", nargs="*", choices=["largest", "first"], default=["largest", "first"],
                       help="the baseline's sharded-dimension choices to compile (default both; none: zerojax only)")
        s.add_argument("--remat", default="full", choices=["full", "offload"],
                       help="both steps' layer policy: full remat, or each layer's input saved in host memory")
    sub.choices["peak"].add_argument("--model", default="llama-2-7b")
    sub.choices["peak"].add_argument("--layers", type=int, nargs="+", default=[8, 32])
    sub.choices["largest"].add_argument("--budget")
    sub.choices["largest"].add_argument("--probe", type=int, nargs=2, default=[8, 16])
    args = parser.parse_args()
    {"time": step_time, "peak": peak, "largest": largest}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
