"""Host offload on one GPU: step time with each offload relative to none, and the largest Llama that trains.

    python benchmarks/gpu/offload.py --out gpu_offload.json                  # one GPU, within --budget-s
    python benchmarks/gpu/offload.py --smoke --device-memory 40MB            # CPU: tiny sizes, the logic only

Placements: no offload; optimizer state streamed from pinned host memory; optimizer update computed on
the host; optimizer state and parameters in pinned host memory. All bf16 mixed-precision AdamW (fp32
master and moments), stage 3 on one device, full remat, layers scanned.

1. Step time: every placement on one shared size (`--time-size`), the median of `--steps` steps after
   a warm-up step, and its ratio to no offload.
2. Largest model: for each placement, a ladder of Llama shapes (about 0.2B to 39B parameters). Each
   rung's device peak and host bytes are predicted by `zerojax.estimate` (analytic, nothing compiled);
   rungs needing more than `--host-fraction` of the machine's available RAM are not tried (a pinned
   allocation that large could take the machine down); the largest rung predicted to fit runs one real
   step, then the next one up until one fails, or the next one down while they fail.

The results file is rewritten after every measurement, so a run cut short keeps what it measured.
Needs jax, flax and optax (preinstalled on the GPU machine); installs nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # JAX's default keeps 25% of the GPU back
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax as zj  # noqa: E402
from zerojax import estimate as est  # noqa: E402
from zerojax.offload import machine_memory  # noqa: E402
from zerojax.models import causal_lm_loss, from_hf_config  # noqa: E402

PLACEMENTS = {
    "none": None,
    "optimizer-streamed": zj.Offload("pinned_host"),
    "optimizer-host": zj.Offload("pinned_host", mode="host"),
    "optimizer+params": zj.Offload("pinned_host", params="pinned_host"),
}
# (hidden, layers) with a 32k vocabulary: 0.17, 0.94, 2.0, 3.4, 6.7, 12.9, 20.3, 30, 39 billion parameters.
LADDER = [(1024, 8), (2048, 16), (2560, 24), (3072, 28), (4096, 32), (5120, 40), (6144, 44), (7168, 48), (8192, 48)]
SMOKE_LADDER = [(64, 2), (128, 2), (192, 4), (256, 4)]


def llama(hidden: int, layers: int, vocab: int) -> dict:
    heads = max(hidden // 128, 1)
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": int(hidden * 8 / 3) // 64 * 64, "num_attention_heads": heads,
            "num_key_value_heads": heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False}


def run_steps(config: dict, offload, seq: int, batch: int, steps: int) -> list[float]:
    """Builds the state in its placement and runs 1 + `steps` real steps: the seconds of the last `steps`."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: from_hf_config(config, remat="full"))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    plan = zj.make_plan(shapes, optax.adamw(1e-4), zj.ZeroRules(zj.make_mesh(devices=jax.devices()[:1]), stage=3),
                        zj.Precision.bf16(), offload=offload)
    leaves, treedef = jax.tree.flatten(shapes)

    def init():  # random weights made inside init_state's program, straight into their placement
        key = jax.random.key(0)
        return treedef.unflatten([0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, np.float32)
                                  for i, s in enumerate(leaves)])

    state = zj.init_state(init, plan)
    step = zj.make_train_step(causal_lm_loss(graphdef), plan)
    data = {"input_ids": np.random.default_rng(0).integers(0, config["vocab_size"], (batch, seq + 1)).astype(np.int32)}
    times = []
    for i in range(1 + steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    return times[1:]


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Allocator" in text


def trains(config: dict, offload, seq: int, batch: int) -> bool:
    """Whether one real step runs (False: out of memory, at initialisation or in the step)."""
    try:
        run_steps(config, offload, seq, batch, 0)
        return True
    except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED, or an allocation failure at init
        if out_of_memory(e):
            return False
        raise
    finally:
        gc.collect()
        jax.clear_caches()


def predict(config: dict, offload, seq: int, batch: int) -> est.StageEstimate:
    return est.estimate(config, 1, 3, seq=seq, micro_batch=batch, offload_optimizer=offload is not None,
                        offload_param=offload is not None and offload.params is not None)


def largest(name: str, offload, args, device_bytes: int, host_bytes: int, deadline: float, into: dict, save) -> None:
    """`into[name]`: the placement's ladder (predictions for every rung, real steps around the predicted
    boundary) and the largest rung that trained."""
    rows, peaks = [], []
    for hidden, layers in args.ladder:
        e = predict(llama(hidden, layers, args.vocab), offload, args.seq, args.batch)
        rows.append({"hidden": hidden, "layers": layers, "params": e.params,
                     "predicted_device_gib": round(e.analytic_peak_bytes / 2**30, 2),
                     "host_gib": round(e.host_bytes / 2**30, 2)})
        peaks.append(e.analytic_peak_bytes)
        if e.host_bytes > args.host_fraction * host_bytes:
            rows[-1]["trains"] = "not tried: host memory"
            break
    into[name] = record = {"ladder": rows, "largest": None}
    triable = {i for i, r in enumerate(rows) if "trains" not in r}
    fitting = [i for i in sorted(triable) if peaks[i] <= device_bytes]

    def attempt(i: int) -> bool:
        if time.monotonic() > deadline:
            rows[i]["trains"] = "not tried: time"
            return False
        ok = trains(llama(rows[i]["hidden"], rows[i]["layers"], args.vocab), offload, args.seq, args.batch)
        rows[i]["trains"] = "yes" if ok else "out of memory"
        if ok:  # walking up, each success is larger; walking down, the first success ends the walk
            record["largest"] = rows[i]
        print(f"{name:20} {rows[i]['params'] / 1e9:6.2f}B -> {rows[i]['trains']}", flush=True)
        save()
        return ok

    i = fitting[-1] if fitting else 0
    if i in triable and attempt(i):
        while i + 1 in triable and attempt(i + 1):
            i += 1
    else:
        while i - 1 in triable and not attempt(i - 1):
            i -= 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--time-size", default="2560x24", help="HIDDENxLAYERS of the step-time model (about 2B)")
    p.add_argument("--device-memory", help="bytes per device when the device reports no limit (CPU)")
    p.add_argument("--host-fraction", type=float, default=0.7, help="most of the available host RAM to plan on")
    p.add_argument("--budget-s", type=float, default=330, help="no new real run of the ladder starts after this")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    start = time.monotonic()
    args.ladder, args.vocab = (SMOKE_LADDER, 256) if args.smoke else (LADDER, 32000)
    if args.smoke:
        args.seq, args.time_size = 16, "64x2"
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    device_bytes = est.parse_bytes(args.device_memory) if args.device_memory else limit
    if not device_bytes:
        p.error(f"{device.platform} reports no memory limit; pass --device-memory")
    host_bytes = machine_memory()[1]  # available now
    result = {"device": getattr(device, "device_kind", device.platform), "jax": jax.__version__,
              "device_limit_gib": round(device_bytes / 2**30, 2), "host_available_gib": round(host_bytes / 2**30, 2),
              "mem_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"], "seq": args.seq, "batch": args.batch,
              "time_size": args.time_size, "step_ms": {}, "step_ratio": {}, "largest": {}, "errors": {}}

    def save():
        if args.out:
            args.out.with_suffix(".tmp").write_text(json.dumps(result, indent=2) + "\n")
            os.replace(args.out.with_suffix(".tmp"), args.out)

    hidden, layers = (int(x) for x in args.time_size.split("x"))
    for name, offload in PLACEMENTS.items():  # a placement that fails is recorded and the run goes on
        try:
            times = run_steps(llama(hidden, layers, args.vocab), offload, args.seq, args.batch, args.steps)
            result["step_ms"][name] = round(1000 * float(np.median(times)), 2)
            if "none" in result["step_ms"]:
                result["step_ratio"][name] = round(result["step_ms"][name] / result["step_ms"]["none"], 3)
        except Exception as e:
            result["errors"][f"step time {name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        gc.collect()
        jax.clear_caches()
        print(f"{name:20} step {result['step_ms'].get(name)} ms", flush=True)
        save()
    for name, offload in PLACEMENTS.items():
        try:
            largest(name, offload, args, device_bytes, host_bytes, start + args.budget_s, result["largest"], save)
        except Exception as e:
            result["errors"][f"largest {name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        save()
    result["seconds"] = round(time.monotonic() - start, 1)
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
