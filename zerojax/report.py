"""What each device holds: per-tensor layouts and bytes, totals, and the ZeRO formula beside them."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from zerojax.offload import HOST_KINDS
from zerojax.plan import ZeroPlan
from zerojax.rules import is_layout


def zero_formula_bytes(stage: int, params: int, ranks: int, *, param_bytes=2, grad_bytes=2, optimizer_bytes=12) -> float:
    """Model-state bytes per device from the ZeRO paper (defaults: mixed-precision Adam, K = 12)."""
    n = ranks
    p, g, k = param_bytes * params, grad_bytes * params, optimizer_bytes * params
    return {0: p + g + k, 1: p + g + k / n, 2: p + (g + k) / n, 3: (p + g + k) / n}[stage]


@dataclasses.dataclass(frozen=True)
class TensorRow:
    """One parameter: its layout and the bytes one device holds of each copy."""

    path: str
    shape: tuple[int, ...]
    note: str
    sharded: bool
    param_spec: str
    opt_spec: str
    param_bytes: int
    grad_bytes: int
    master_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device of a plan, measured from its shardings (the largest shard of each leaf)."""

    stage: int
    ranks: int
    num_params: int
    rows: tuple[TensorRow, ...]
    opt_state_bytes: int  # every optimizer-state leaf (moments, counts), master excluded
    host_bytes: int = 0  # of the held bytes, those in host memory (offload)

    @property
    def param_bytes(self) -> int:
        return sum(r.param_bytes for r in self.rows)

    @property
    def grad_bytes(self) -> int:
        """The gradient accumulator each device holds during a step (full at stages 0-1, 1/N at 2-3)."""
        return sum(r.grad_bytes for r in self.rows)

    @property
    def master_bytes(self) -> int:
        return sum(r.master_bytes for r in self.rows)

    @property
    def held_bytes(self) -> int:
        """Bytes held between steps: parameters, master weights and optimizer state."""
        return self.param_bytes + self.master_bytes + self.opt_state_bytes

    @property
    def device_bytes(self) -> int:
        """Held bytes in device memory: what offload leaves on the accelerator between steps."""
        return self.held_bytes - self.host_bytes

    @property
    def model_state_bytes(self) -> int:
        """The ZeRO paper's model states: what is held between steps plus the gradients of a step."""
        return self.held_bytes + self.grad_bytes

    @property
    def unsharded_fraction(self) -> float:
        """Fraction of parameter elements whose optimizer state is replicated (not divisible, or stage 0)."""
        replicated = sum(math.prod(r.shape) for r in self.rows if not r.sharded)
        return replicated / max(self.num_params, 1)

    def theory_bytes(self, param_bytes: int, grad_bytes: int, optimizer_bytes: int) -> float:
        return zero_formula_bytes(
            self.stage, self.num_params, self.ranks,
            param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
        )

    def __str__(self) -> str:
        gib = lambda b: f"{b / 2**20:10.3f} MiB"
        lines = [f"ZeRO stage {self.stage} on {self.ranks} data-parallel ranks, {self.num_params:,} parameters"]
        lines.append(f"{'tensor':40} {'shape':>18} {'param/dev':>14} {'grad/dev':>14} {'master/dev':>14}  layout")
        for r in self.rows:
            lines.append(
                f"{r.path[:40]:40} {str(r.shape):>18} {gib(r.param_bytes)} {gib(r.grad_bytes)} "
                f"{gib(r.master_bytes)}  params {r.param_spec}, optimizer {r.opt_spec}; {r.note}"
            )
        lines += [
            f"parameters      {gib(self.param_bytes)} per device",
            f"gradients       {gib(self.grad_bytes)} per device (accumulator during a step)",
            f"master weights  {gib(self.master_bytes)} per device",
            f"optimizer state {gib(self.opt_state_bytes)} per device",
            f"model states    {gib(self.model_state_bytes)} per device",
            f"between steps   {gib(self.device_bytes)} in device memory, {gib(self.host_bytes)} in host memory",
            f"not sharded     {100 * self.unsharded_fraction:.2f}% of parameters",
        ]
        return "\n".join(lines)


def _spec_str(spec) -> str:
    return "replicated" if spec is None or all(e is None for e in spec) else str(spec)


def _shard_bytes(sharding, shape, dtype) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def memory_report(plan: ZeroPlan) -> MemoryReport:
    """The per-tensor and total bytes one device holds under `plan`."""
    prec = plan.precision
    flat = jax.tree_util.tree_flatten_with_path(plan.abstract_params)[0]
    layouts = jax.tree.leaves(plan.param_layouts, is_leaf=is_layout)
    rows = []
    sharding = lambda spec: jax.sharding.NamedSharding(plan.mesh, spec)
    for (path, leaf), layout in zip(flat, layouts):
        rows.append(TensorRow(
            path=jax.tree_util.keystr(path),
            shape=tuple(leaf.shape),
            note=layout.note,
            sharded=layout.sharded,
            param_spec=_spec_str(layout.param_spec),
            opt_spec=_spec_str(layout.opt_spec),
            param_bytes=_shard_bytes(sharding(layout.param_spec), leaf.shape, plan.param_dtype),
            grad_bytes=_shard_bytes(sharding(layout.grad_spec), leaf.shape, prec.accum_dtype),
            master_bytes=_shard_bytes(sharding(layout.opt_spec), leaf.shape, prec.master_dtype) if plan.keeps_master else 0,
        ))
    state = plan.abstract_state()
    opt_bytes = sum(_shard_bytes(x.sharding, x.shape, x.dtype) for x in jax.tree.leaves(state.opt_state))
    held = jax.tree.leaves((state.params, state.master, state.opt_state))
    host = sum(_shard_bytes(x.sharding, x.shape, x.dtype) for x in held if x.sharding.memory_kind in HOST_KINDS)
    return MemoryReport(
        stage=plan.rules.stage,
        ranks=plan.rules.data_size,
        num_params=sum(math.prod(x.shape) for _, x in flat),
        rows=tuple(rows),
        opt_state_bytes=opt_bytes,
        host_bytes=host,
    )
