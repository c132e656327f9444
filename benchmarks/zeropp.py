"""ZeRO++ quantized communication (qwZ, qgZ) against exact bf16 collectives, on 8 simulated CPU devices.

    python benchmarks/zeropp.py [--steps 300] [--skip-training] [--skip-targets]

1. Bytes and one-step agreement: a small Llama's stage-3 step lowered with each quantization; gathered
   and gradient-reduction bytes per step (lowered program, `zerojax.hlo`) as ratios of the exact bf16
   step's, and the cosine similarity of one SGD step's update (lr 1: the reduced gradient) to the exact
   one, on a 1-D mesh (fsdp 8) and under hpZ (replica 2 x fsdp 4).
2. Compiled for 8 H100s and 8 TPU v5p chips (deviceless, `zerojax.targets`): Llama-2-7B shapes with
   4 layers, seq 2048, stage 3 (and hpZ), exact vs qwZ + qgZ: collective bytes per step by kind and
   dtype as each compiler emits them, and the compiled peak per device.
3. Convergence: the demo (`examples/train_llama.py`, `examples/configs/zero3.json`) for `--steps` steps,
   as it is and with `zero_quantized_weights` and `zero_quantized_gradients` set; final eval losses.

Results: benchmarks/results/zeropp.md (the tables) and zeropp.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax as zj  # noqa: E402
from zerojax import hlo  # noqa: E402
from zerojax.models import causal_lm_loss, from_hf_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
VARIANTS = {
    "exact (bf16)": {},
    "qwZ": {"weights": True},
    "qgZ int8": {"gradients": True},
    "qgZ int4": {"gradients": True, "gradient_bits": 4},
    "qwZ + qgZ int8 (config default)": {"weights": True, "gradients": True},
    "qwZ + qgZ int4": {"weights": True, "gradients": True, "gradient_bits": 4},
}
MESHES = {"fsdp 8": dict(), "hpZ: replica 2 x fsdp 4": dict(replica=2)}


def one_step(params, loss_fn, batch, mesh_shape: dict, quantization: dict) -> tuple[dict, np.ndarray]:
    """(lowered collectives, the first SGD update flattened) of the stage-3 step with `quantization`."""
    hierarchy = "hpz" if mesh_shape else "none"
    rules = zj.ZeroRules(zj.make_mesh(**mesh_shape), stage=3, hierarchy=hierarchy,
                         quantization=zj.Quantization(**quantization))
    plan = zj.make_plan(params, optax.sgd(1.0), rules, zj.Precision.bf16())
    step = zj.make_train_step(loss_fn, plan)
    collectives = hlo.lowered_collectives(step.lower(plan.abstract_state(), batch).as_text())
    state = zj.init_state(params, plan)
    before = jax.tree.map(np.asarray, state.params)
    state, _ = step(state, batch)
    update = [np.asarray(b, np.float64) - np.asarray(a, np.float64) for a, b in zip(
        jax.tree.leaves(jax.tree.map(np.asarray, state.params)), jax.tree.leaves(before))]
    return collectives, np.concatenate([u.ravel() for u in update])


def total(collectives: dict, *kinds: str) -> int:
    return sum(sum(collectives.get(k, {}).values()) for k in kinds)


def agreement_table() -> list[dict]:
    graphdef, params = nnx.split(from_hf_config(CONFIG, dtype="fp32", scan_layers=True, remat="full"), nnx.Param)
    loss_fn = causal_lm_loss(graphdef)
    batch = {"input_ids": np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (16, 65), dtype=np.int32)}
    rows = []
    for mesh_name, mesh_shape in MESHES.items():
        exact, exact_update = one_step(params, loss_fn, batch, mesh_shape, {})
        for name, quantization in VARIANTS.items():
            found, update = one_step(params, loss_fn, batch, mesh_shape, quantization)
            rows.append({
                "mesh": mesh_name, "variant": name,
                "gather_ratio": total(found, "all-gather") / total(exact, "all-gather"),
                "gradient_ratio": total(found, "reduce-scatter", "all-to-all") / total(exact, "reduce-scatter"),
                "update_cosine": float(update @ exact_update / np.linalg.norm(update) / np.linalg.norm(exact_update)),
                "bytes_by_dtype": {k: v for k, v in found.items() if k != "all-reduce"},
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


SEVEN_B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 32}


def target_table() -> list[dict]:
    """Compiled bytes and peaks of the 4-layer 7B-shaped step on 8 H100s and 8 v5p chips, exact and quantized."""
    from zerojax.compiled import compile_train_step
    from zerojax.models import abstract_model
    from zerojax.targets import TARGETS

    graphdef, params = abstract_model(SEVEN_B, dtype="fp32", scan_layers=True, remat="full")
    rows = []
    for target in ("h100", "tpu-v5p"):
        for mesh_name, mesh_shape in MESHES.items():
            mesh = zj.make_mesh(devices=TARGETS[target].devices(8), **mesh_shape)
            for name in ("exact (bf16)", "qwZ + qgZ int8 (config default)", "qwZ + qgZ int4"):
                rules = zj.ZeroRules(mesh, stage=3, hierarchy="hpz" if mesh_shape else "none",
                                     quantization=zj.Quantization(**VARIANTS[name]))
                plan = zj.make_plan(params, optax.adamw(1e-4), rules, zj.Precision.bf16())
                batch = jax.ShapeDtypeStruct((8, 2048), np.int32, sharding=jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec(zj.DATA_AXES)))
                step = zj.make_train_step(causal_lm_loss(graphdef), plan, max_grad_norm=1.0)
                compiled = compile_train_step(step, plan, {"input_ids": batch}, target=target)
                rows.append({"target": target, "mesh": mesh_name, "variant": name, "peak_bytes": compiled.peak_bytes,
                             "compiled_collectives": compiled.compiled_collectives,
                             "compile_seconds": round(compiled.seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def train(steps: int, quantized: bool, out: Path) -> dict:
    """The demo's final line (initial and final eval loss) for `steps` steps, quantized or exact."""
    config = json.loads((ROOT / "examples/configs/zero3.json").read_text())
    if quantized:
        config["zero_optimization"].update(zero_quantized_weights=True, zero_quantized_gradients=True)
    path = out / ("zero3pp.json" if quantized else "zero3.json")
    path.write_text(json.dumps(config))
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples/train_llama.py"), "--deepspeed", str(path), "--max-steps", str(steps),
         "--output-dir", str(out / path.stem), "--overwrite"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-targets", action="store_true")
    opts = parser.parse_args()
    rows = agreement_table()
    compiled = [] if opts.skip_targets else target_table()
    runs = {}
    if not opts.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {name: train(opts.steps, name == "qwZ + qgZ", Path(tmp)) for name in ("exact", "qwZ + qgZ")}
        print(json.dumps(runs), flush=True)
    results = ROOT / "benchmarks/results"
    (results / "zeropp.json").write_text(json.dumps({"agreement": rows, "targets": compiled, "training": runs},
                                                    indent=1) + "\n")
    lines = [
        "# ZeRO++ quantized communication on 8 simulated CPU devices", "",
        f"Command: `python benchmarks/zeropp.py --steps {opts.steps}`. Model: bundled Llama {CONFIG}, stage 3, "
        "bf16 compute; ratios of the lowered program's bytes per step to the exact bf16 step's (scales included); "
        "cosine: one SGD step's update (the reduced gradient) against the exact step's.", "",
        "| mesh | variant | gather bytes | gradient-reduction bytes | update cosine |", "|---|---|---|---|---|",
        *[f"| {r['mesh']} | {r['variant']} | {r['gather_ratio']:.4f} | {r['gradient_ratio']:.4f} | "
          f"{r['update_cosine']:.6f} |" for r in rows],
    ]
    if compiled:
        exact = {(r["target"], r["mesh"]): r for r in compiled if r["variant"] == "exact (bf16)"}
        moved = lambda r, *kinds: sum(sum(r["compiled_collectives"].get(k, {}).values()) for k in kinds)
        lines += ["", f"Compiled for 8 devices (deviceless), Llama-2-7B shapes with {SEVEN_B['num_hidden_layers']} "
                  "layers, seq 2048, micro-batch 1, AdamW, stage 3; GiB per step as each compiler emits them (XLA:TPU "
                  "turns a reduce-scatter into an all-reduce, counted twice: see zerojax.hlo):", "",
                  "| target | mesh | variant | all-gather | reduce-scatter + all-reduce | all-to-all | peak GiB | "
                  "peak vs exact |", "|---|---|---|---|---|---|---|---|",
                  *[f"| {r['target']} | {r['mesh']} | {r['variant']} | {moved(r, 'all-gather') / 2**30:.3f} | "
                    f"{moved(r, 'reduce-scatter', 'all-reduce') / 2**30:.3f} | {moved(r, 'all-to-all') / 2**30:.3f} | "
                    f"{r['peak_bytes'] / 2**30:.3f} | {r['peak_bytes'] / exact[r['target'], r['mesh']]['peak_bytes']:.3f} |"
                    for r in compiled]]
    if runs:
        exact, quant = runs["exact"]["final_eval_loss"], runs["qwZ + qgZ"]["final_eval_loss"]
        lines += ["", f"Demo, {opts.steps} steps (`examples/configs/zero3.json`, and with zero_quantized_weights and "
                  "zero_quantized_gradients):", "", "| run | initial eval loss | final eval loss |", "|---|---|---|",
                  *[f"| {k} | {v['initial_eval_loss']} | {v['final_eval_loss']} |" for k, v in runs.items()],
                  "", f"Final eval loss, quantized vs exact: {abs(quant - exact) / exact:.2%} relative."]
    (results / "zeropp.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
