"""Bytes per device of each ZeRO stage for Llama-2-7B shapes, from zerojax's shardings, vs the ZeRO formula.

    python benchmarks/stage_table.py 8    # and 64: the number of simulated devices

Shapes only: nothing is allocated. Results: benchmarks/results/stage_table.md.
"""
import os, sys
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
import jax, optax, zerojax as zj
from zerojax.models import abstract_model
cfg = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
       "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
g, params = abstract_model(cfg)
psi = sum(x.size for x in jax.tree.leaves(params))
print("psi", psi)
for stage in range(4):
    plan = zj.make_plan(params, optax.adamw(1e-4), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16())
    r = zj.memory_report(plan)
    paper = zj.zero_formula_bytes(stage, psi, n)
    # zerojax's stage 3 holds no 16-bit parameter copy: the fp32 shards are the parameters
    theory = zj.zero_formula_bytes(stage, psi, n, param_bytes=2 if plan.keeps_master else 0)
    # the formula counts 16-bit gradients; zerojax's accumulator is fp32, so halve it for the comparison
    ms16 = r.held_bytes + r.grad_bytes / 2
    print(f"| {stage} | {n} | {r.held_bytes/1e9:.2f} | {ms16/1e9:.2f} | {theory/1e9:.2f} | {100*(ms16/theory-1):+.2f}% "
          f"| {paper/1e9:.2f} |")
