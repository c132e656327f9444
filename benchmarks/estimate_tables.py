"""Markdown tables from the JSON lines of benchmarks/estimate_memory.py (memory and communication vs theory).

    python benchmarks/estimate_tables.py benchmarks/results/estimate_n8.jsonl benchmarks/results/estimate_n64.jsonl
"""
import json
import sys

GIB = 2**30
rows = [json.loads(line) for path in sys.argv[1:] for line in open(path)]
gib = lambda b: "n/a" if b is None else f"{b / GIB:.2f}"
pct = lambda a, b: f"{100 * (a / b - 1):+.2f}%"

print("### Memory per device (GiB)\n")
print("| N | stage | model states (zerojax) | formula at zerojax widths | diff | ZeRO paper (16-bit grads) | diff "
      "| DeepSpeed estimator | compiled state args | compiled temps | compiled peak |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    c = r["compiled"]
    print(f"| {r['devices']} | {r['stage']} | {gib(r['model_state_bytes'])} | {gib(r['theory_model_state_bytes'])} "
          f"| {pct(r['model_state_bytes'], r['theory_model_state_bytes'])} | {gib(r['paper_formula_bytes'])} "
          f"| {pct(r['model_state_bytes'], r['paper_formula_bytes'])} | {gib(r['deepspeed_estimator_bytes'])} "
          f"| {gib(c['state_bytes'])} | {gib(c['temp_bytes'])} | {gib(c['peak_bytes'])} |")

print("\n### Collective bytes per step (GiB, whole tensors; lowered program + GSPMD's extra elements)\n")
print("| N | stage | all-gather | reduce-scatter | all-reduce (2x operand) | total | theory (2Ψ or 3Ψ x 2 B) "
      "| total / theory | lowered dtypes | compiled (XLA:CPU) dtypes |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    cb, c = r["collective_bytes"], r["compiled"]
    dtypes = lambda d: ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(d.items()))
    print(f"| {r['devices']} | {r['stage']} | {gib(cb['all-gather'])} | {gib(cb['reduce-scatter'])} "
          f"| {gib(cb['all-reduce'])} | {gib(cb['total'])} | {gib(r['comm_theory_bytes'])} "
          f"| {cb['total'] / r['comm_theory_bytes']:.4f} | {dtypes(c['lowered_collectives'])} "
          f"| {dtypes(c['compiled_collectives'])} |")
