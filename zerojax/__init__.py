"""zerojax: DeepSpeed ZeRO for JAX — stages 0–3 as sharding rules over a device mesh.

The names below are imported on first use (PEP 562), so `import zerojax` and the `zerojax` command's
`--help` do not load JAX.
"""

from zerojax._lazy import lazy_exports

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "Sharded": "zerojax.gather", "gather_on_use": "zerojax.gather",
    "Offload": "zerojax.offload",
    "TokenLoss": "zerojax.loss",
    "DATA_AXES": "zerojax.mesh", "FSDP": "zerojax.mesh", "REPLICA": "zerojax.mesh", "TENSOR": "zerojax.mesh",
    "data_parallel_size": "zerojax.mesh", "make_mesh": "zerojax.mesh",
    "TrainState": "zerojax.plan", "ZeroPlan": "zerojax.plan", "init_state": "zerojax.plan", "make_plan": "zerojax.plan",
    "LossScale": "zerojax.precision", "LossScaleState": "zerojax.precision", "Precision": "zerojax.precision",
    "LeafLayout": "zerojax.rules", "ZeroRules": "zerojax.rules",
    "MemoryReport": "zerojax.report", "memory_report": "zerojax.report", "zero_formula_bytes": "zerojax.report",
    "TrainStep": "zerojax.step", "make_eval_step": "zerojax.step", "make_train_step": "zerojax.step",
    "Quantization": "zerojax.zeropp",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
