"""zerojax: DeepSpeed ZeRO for JAX — stages 0–3 as sharding rules over a device mesh."""

from zerojax.gather import Sharded, gather_on_use
from zerojax.offload import Offload
from zerojax.mesh import DATA_AXES, FSDP, REPLICA, TENSOR, data_parallel_size, make_mesh
from zerojax.plan import TrainState, ZeroPlan, init_state, make_plan
from zerojax.precision import LossScale, LossScaleState, Precision
from zerojax.rules import LeafLayout, ZeroRules
from zerojax.report import MemoryReport, memory_report, zero_formula_bytes
from zerojax.step import TrainStep, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "DATA_AXES", "Offload", "Sharded", "gather_on_use", "FSDP", "REPLICA", "TENSOR", "LeafLayout", "LossScale", "LossScaleState", "Precision",
    "TrainState", "TrainStep", "ZeroPlan", "ZeroRules", "data_parallel_size", "init_state", "make_mesh",
    "make_eval_step", "make_plan", "make_train_step", "MemoryReport", "memory_report", "zero_formula_bytes",
]
