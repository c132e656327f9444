"""Host offload on one GPU: the largest Llama that trains with and without each offload, and step time.

    python benchmarks/gpu/offload.py --out benchmarks/results/gpu_offload.json     # on a GPU machine
    python benchmarks/gpu/offload.py --smoke                                        # CPU: tiny sizes

For each placement (no offload; optimizer state streamed from pinned host memory; optimizer update
computed on the host; optimizer state and parameters in pinned host memory) it walks up a ladder of
Llama shapes and records the largest whose bf16 mixed-precision AdamW step runs (one real step, not
just a compile), then times every placement on one shared size, in one run, as a ratio against no
offload. Needs only jax, flax and optax (what the GPU machine has preinstalled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax as zj  # noqa: E402
from zerojax.models import causal_lm_loss, from_hf_config  # noqa: E402

PLACEMENTS = {
    "none": None,
    "optimizer-streamed": zj.Offload("pinned_host"),
    "optimizer-host": zj.Offload("pinned_host", mode="host"),
    "optimizer+params": zj.Offload("pinned_host", params="pinned_host"),
}
# (hidden, layers): about 0.1B to 30B parameters with a 32k vocabulary.
LADDER = [(1024, 8), (2048, 16), (2560, 24), (3072, 28), (4096, 32), (5120, 40), (6144, 44), (7168, 48), (8192, 48)]
SMOKE_LADDER = [(64, 2), (128, 2)]


def llama(hidden: int, layers: int, vocab: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": int(hidden * 8 / 3) // 64 * 64,
            "num_hidden_layers": layers, "num_attention_heads": max(hidden // 128, 1), "num_key_value_heads": max(hidden // 128, 1),
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def build(config: dict, offload, seq: int, batch: int):
    """(step, state, batch) for one device, bf16 compute with fp32 master and AdamW moments."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: from_hf_config(config, remat="full"))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    mesh = zj.make_mesh(devices=jax.devices()[:1])
    plan = zj.make_plan(shapes, optax.adamw(1e-4), zj.ZeroRules(mesh, stage=3), zj.Precision.bf16(),
                        scanned=("layers",), offload=offload)
    leaves, treedef = jax.tree.flatten(shapes)

    def init():  # random weights made inside init_state's program, straight into their placement
        key = jax.random.key(0)
        return treedef.unflatten([0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, np.float32)
                                  for i, s in enumerate(leaves)])

    state = zj.init_state(init, plan)
    step = zj.make_train_step(causal_lm_loss(graphdef), plan)
    data = {"input_ids": np.random.default_rng(0).integers(0, config["vocab_size"], (batch, seq + 1)).astype(np.int32)}
    return step, state, data, sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def fits(config, offload, seq, batch) -> int | None:
    """The parameter count if one step runs, else None (out of memory)."""
    try:
        step, state, data, n = build(config, offload, seq, batch)
        state, metrics = step(state, data)
        float(metrics["loss"])
        return n
    except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED, or an allocation failure at init
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower() or "Allocator" in str(e):
            return None
        raise


def step_ms(config, offload, seq, batch, steps: int) -> float:
    step, state, data, _ = build(config, offload, seq, batch)
    state, m = step(state, data)
    float(m["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, data)
        float(m["loss"])
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    ladder, vocab = (SMOKE_LADDER, 256) if args.smoke else (LADDER, 32000)
    seq = 16 if args.smoke else args.seq
    device = jax.devices()[0]
    result = {"device": getattr(device, "device_kind", device.platform), "jax": jax.__version__, "seq": seq,
              "batch": args.batch, "largest": {}, "step_ms": {}, "errors": {}}
    for name, offload in PLACEMENTS.items():  # a placement that fails otherwise is recorded, the run goes on
        largest = None
        try:
            for hidden, layers in ladder:
                n = fits(llama(hidden, layers, vocab), offload, seq, args.batch)
                print(f"{name:20} hidden={hidden:5} layers={layers:3} -> {'fits' if n else 'out of memory'}", flush=True)
                if n is None:
                    break
                largest = {"hidden": hidden, "layers": layers, "params": n}
        except Exception as e:
            result["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result["largest"][name] = largest
    common = result["largest"]["none"]
    config = llama(common["hidden"], common["layers"], vocab)
    for name, offload in PLACEMENTS.items():
        try:
            result["step_ms"][name] = step_ms(config, offload, seq, args.batch, args.steps)
        except Exception as e:
            result["errors"].setdefault(name, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    base = result["step_ms"]["none"]
    result["step_ratio"] = {k: round(v / base, 3) for k, v in result["step_ms"].items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
