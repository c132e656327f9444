"""Step time of ZeRO stages 1-3 relative to stage 0: a small Llama on 8 simulated CPU devices, one run.

    python benchmarks/stage_speed.py [rounds]

Every stage is compiled and warmed up first; then each round times one step of every stage in turn
(so load from other processes falls on all stages alike); the median and the minimum per stage are
reported with their ratios to stage 0 (the minimum is the least disturbed by other processes). Results: benchmarks/results/stage_speed.md.
"""
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax as zj  # noqa: E402
from zerojax.models import causal_lm_loss, from_hf_config  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
CONFIG = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 344,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4}
SEQ, MICRO = 128, 2
graphdef, params = nnx.split(from_hf_config(CONFIG, dtype="fp32", scan_layers=True, remat="full"), nnx.Param)
loss_fn = causal_lm_loss(graphdef)
batch = {"input_ids": np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (8 * MICRO, SEQ), dtype=np.int32)}
runs = {}
for stage in range(4):
    plan = zj.make_plan(params, optax.adamw(1e-4), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16())
    step = zj.make_train_step(loss_fn, plan)
    state = zj.init_state(params, plan)
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    runs[stage] = [step, state, []]
for _ in range(rounds):
    for stage, run in runs.items():
        start = time.perf_counter()
        run[1], m = run[0](run[1], batch)
        jax.block_until_ready((run[1], m))
        run[2].append(time.perf_counter() - start)
psi = sum(x.size for x in jax.tree.leaves(params))
print(f"{psi:,} parameters, seq {SEQ}, micro-batch {MICRO} x 8 devices, {rounds} rounds, loss {float(m['loss']):.4f}")
base = statistics.median(runs[0][2])
low = min(runs[0][2])
print("| stage | median step (ms) | median / stage 0 | min step (ms) | min / stage 0 |")
print("|---|---|---|---|---|")
for stage, run in runs.items():
    med = statistics.median(run[2])
    print(f"| {stage} | {1000 * med:.1f} | {med / base:.3f} | {1000 * min(run[2]):.1f} | {min(run[2]) / low:.3f} |")
