"""The largest Llama-shaped model whose ZeRO-3 step compiles within a device-memory budget on 8 devices.

    python benchmarks/largest_model.py 40 44 42            # numbers of layers to try, in this order
    ACCUM=bf16 python benchmarks/largest_model.py 44 48    # a bf16 gradient accumulator (the paper's 16-bit grads)

Llama-2-70B's layer shape (hidden 8192, MLP 28672, 64 heads, 8 KV heads, vocab 32000) with a varying
number of layers; seq 2048, micro-batch 1, full remat, bf16 mixed-precision AdamW, no offload. One
JSON line per model: parameters, compiled arguments / temporaries / peak per device (XLA:CPU, nothing
allocated) and whether the peak fits 80 GiB. Results: benchmarks/results/largest_model.md.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

from zerojax import estimate as est  # noqa: E402

budget = 80 * 2**30
for layers in [int(a) for a in sys.argv[1:]]:
    config = dict(est.PRESETS["llama-2-70b"], num_hidden_layers=layers)
    e = est.estimate(config, 8, 3, seq=2048, micro_batch=1, device_memory=budget, compiled=True,
                     grad_accum_dtype=os.environ.get("ACCUM", "fp32"))
    c = e.compiled
    print(json.dumps({
        "layers": layers, "grad_accum_dtype": os.environ.get("ACCUM", "fp32"), "params": e.params, "model_state_bytes": e.model_state_bytes,
        "argument_bytes": c.argument_bytes, "temp_bytes": c.temp_bytes, "peak_bytes": c.peak_bytes,
        "peak_gib": round(c.peak_bytes / 2**30, 2), "fits_80gib": e.fits, "compile_seconds": round(c.seconds, 1),
    }), flush=True)
