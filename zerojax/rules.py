"""ZeRO stages as sharding rules: where each parameter, its gradient and its optimizer state live.

A stage decides, per tensor, over which data-parallel mesh axes three copies are partitioned:

| stage | parameters (compute dtype) | gradients (scattered per micro-batch) | optimizer state |
|-------|----------------------------|---------------------------------------|-----------------|
| 0     | replicated                 | replicated                            | replicated      |
| 1     | replicated                 | replicated                            | sharded         |
| 2     | replicated                 | sharded                               | sharded         |
| 3     | sharded                    | sharded                               | sharded         |

All three use the same tensor dimension, so a shard of the optimizer state is a sub-shard of the
gradient shard, which is a sub-shard of the parameter shard. Hierarchical variants on a 2-D
`('replica', 'fsdp')` mesh: `mics` shards everything within an `fsdp` group and replicates across
groups; `hpz` (stage 3) keeps parameters sharded within the `fsdp` group only while gradients and
optimizer state are sharded over all devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zerojax._paths import path_key
from zerojax.mesh import DATA_AXES, FSDP
from zerojax.structure import model_specs, stacked_leaves
from zerojax.zeropp import Quantization

Hierarchy = Literal["none", "mics", "hpz"]
STAGES = (0, 1, 2, 3)
HIERARCHIES = ("none", "mics", "hpz")


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """Where one tensor lives: the dimension carrying the ZeRO axes and the axes of each copy.

    `param_axes` ⊆ `grad_axes` ⊆ `opt_axes`, ordered so that scattering over `param_axes`, then the
    rest of `grad_axes`, then the rest of `opt_axes` yields exactly the layout of `opt_spec`.
    """

    shape: tuple[int, ...]
    base: tuple[Any, ...]  # the model's own (tensor-parallel) spec, one entry per dimension
    dim: int | None
    param_axes: tuple[str, ...] = ()
    grad_axes: tuple[str, ...] = ()
    opt_axes: tuple[str, ...] = ()
    note: str = ""
    stacked: bool = False  # a leading layer axis, walked by the model's scan

    def spec(self, axes: tuple[str, ...]) -> P:
        """The full partition spec with `axes` added to the ZeRO dimension."""
        entries = list(self.base)
        if self.dim is not None and axes:
            entries[self.dim] = axes[0] if len(axes) == 1 else tuple(axes)
        return P(*entries)

    @property
    def param_spec(self) -> P:
        return self.spec(self.param_axes)

    @property
    def grad_spec(self) -> P:
        return self.spec(self.grad_axes)

    @property
    def opt_spec(self) -> P:
        return self.spec(self.opt_axes)

    @property
    def sharded(self) -> bool:
        return bool(self.opt_axes)


@dataclasses.dataclass(frozen=True)
class ZeroRules:
    """The ZeRO stage and its options over a mesh; `layout` turns a tensor shape into a `LeafLayout`.

    `persistence_threshold` is DeepSpeed's `stage3_param_persistence_threshold`: at stage 3 a
    parameter of at most that many elements (one layer's, for a stacked one) stays replicated (its gradient and optimizer state are still
    sharded, as at stage 2). zerojax's default is 0 (shard everything); DeepSpeed configs bring 1e5.
    `quantization` makes the stage-3 weight gathers and the gradient reduce-scatters move quantized
    blocks (ZeRO++ qwZ and qgZ, `zerojax.zeropp`).
    """

    mesh: Mesh
    stage: int = 3
    persistence_threshold: int = 0
    hierarchy: Hierarchy = "none"
    quantization: Quantization = Quantization()

    def __post_init__(self):
        if self.stage not in STAGES or isinstance(self.stage, bool):
            raise ValueError(
                f"ZeroRules: stage={self.stage!r} is not a ZeRO stage; use one of 0, 1, 2, 3 "
                "(zero_optimization.stage)."
            )
        threshold = self.persistence_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(
                f"ZeroRules: persistence_threshold={threshold!r} must be a non-negative integer "
                "number of elements (stage3_param_persistence_threshold); use 0 to shard every tensor."
            )
        if self.hierarchy not in HIERARCHIES:
            raise ValueError(
                f"ZeroRules: hierarchy={self.hierarchy!r} is unknown; use 'none', 'mics' "
                "(mics_shard_size) or 'hpz' (zero_hpz_partition_size)."
            )
        if self.hierarchy == "hpz" and self.stage != 3:
            raise ValueError(
                f"ZeroRules: hierarchy='hpz' partitions stage-3 parameters, but stage={self.stage}; "
                "set stage=3 or drop zero_hpz_partition_size."
            )
        quant = self.quantization
        if quant.weights and self.stage != 3:
            raise ValueError(
                f"ZeroRules: quantized weights (qwZ) quantize the stage-3 parameter all-gather, but stage="
                f"{self.stage} gathers none; set stage=3 or drop zero_quantized_weights."
            )
        if quant.gradients and self.stage == 0:
            raise ValueError(
                "ZeroRules: quantized gradients (qgZ) replace the gradient reduce-scatter, but stage=0 "
                "all-reduces gradients; set stage 1, 2 or 3, or drop zero_quantized_gradients."
            )
        missing = [a for a in DATA_AXES if a not in self.mesh.shape]
        if missing:
            raise ValueError(
                f"ZeroRules: the mesh has axes {tuple(self.mesh.shape)} but lacks {missing}; build it "
                "with zerojax.make_mesh."
            )

    @property
    def data_axes(self) -> tuple[str, ...]:
        """The data-parallel axes with more than one device: the axes ZeRO shards over."""
        return tuple(a for a in DATA_AXES if self.mesh.shape[a] > 1)

    @property
    def data_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in DATA_AXES)

    def _axes(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(param, grad, opt) axes of a shardable tensor at this stage, in scatter order."""
        group = tuple(a for a in self.data_axes if a == FSDP)
        shard = group if self.hierarchy == "mics" else self.data_axes
        if self.hierarchy == "hpz":  # parameters within the group; the rest scattered after it
            shard = group + tuple(a for a in self.data_axes if a not in group)
        param = group if self.hierarchy == "hpz" else shard
        return {
            0: ((), (), ()),
            1: ((), (), shard),
            2: ((), shard, shard),
            3: (param, shard, shard),
        }[self.stage]

    def layout(self, shape: tuple[int, ...], base: P | tuple | None = None, stacked: bool = False) -> LeafLayout:
        """The layout of one tensor of `shape` whose model-given spec is `base`: the ZeRO axes go to the
        first dimension that `base` leaves free and that they divide (as FSDP2 shards dim 0).

        A `stacked` tensor carries a leading layer axis that a scan walks over: that axis is never
        sharded and the persistence threshold applies to one layer's slice.
        """
        shape = tuple(int(s) for s in shape)
        entries = tuple(base or ()) + (None,) * (len(shape) - len(tuple(base or ())))
        param, grad, opt = self._axes()
        if not opt:
            why = "replicated (stage 0)" if self.stage == 0 else "replicated (one data-parallel rank)"
            return LeafLayout(shape, entries, None, note=why, stacked=stacked)
        ways = math.prod(self.mesh.shape[a] for a in opt)
        first = 1 if stacked else 0
        free = [d for d in range(first, len(shape)) if entries[d] is None and shape[d] % ways == 0]
        if not free:
            why = f"replicated: no free dimension divisible by {ways}"
            return LeafLayout(shape, entries, None, note=why, stacked=stacked)
        dim = free[0]  # the major-most: a shard is one contiguous block (no transposed copy to gather it)
        note = "sharded"
        if param and math.prod(shape[first:]) <= self.persistence_threshold:
            param, note = (), "parameter persistent (within persistence threshold)"
        return LeafLayout(shape, entries, dim, param, grad, opt, note, stacked)

    def layouts(self, params: Any, base_specs: Any = None, stacked: Any = None) -> Any:
        """The `LeafLayout` of every leaf of `params` (arrays or `jax.ShapeDtypeStruct`s, plain or in an
        `nnx.State`), as the parameters state their own structure (`zerojax.structure`).

        `base_specs` is an optional matching tree of `PartitionSpec`s whose axes are kept (ZeRO axes go to
        another dimension); None reads each `nnx.Param`'s `out_sharding` metadata. `stacked` (a bool or a
        pytree prefix of bools) marks the leaves with a leading layer axis; None reads each `nnx.Param`'s
        `stacked` metadata (see `layout`).
        """
        leaves, treedef = jax.tree_util.tree_flatten(params)
        flags = stacked_leaves(params, stacked)
        try:
            specs = treedef.flatten_up_to(model_specs(params) if base_specs is None else base_specs)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"ZeroRules.layouts: base_specs does not match the parameter tree ({e}); pass one "
                "PartitionSpec (or None) per parameter, e.g. nnx.get_partition_spec(state)."
            ) from None
        return treedef.unflatten([self.layout(x.shape, spec, flag) for x, spec, flag in zip(leaves, specs, flags)])

    def shardings(self, layouts: Any, which: Literal["param", "grad", "opt"]) -> Any:
        """`NamedSharding`s of one copy (`param`, `grad` or `opt`) for a tree of layouts."""
        return jax.tree.map(
            lambda l: NamedSharding(self.mesh, getattr(l, f"{which}_spec")), layouts, is_leaf=is_layout
        )

    def opt_state_layouts(self, opt_state: Any, params: Any, layouts: Any) -> Any:
        """Layouts for any optax state: a leaf follows the parameter whose tree path ends its own path
        and whose shape it has; other leaves (factored moments, counts) get a layout of their own shape.
        """
        by_path = {
            path_key(path): (x.shape, layout)
            for (path, x), layout in zip(
                jax.tree_util.tree_flatten_with_path(params)[0],
                jax.tree.leaves(layouts, is_leaf=is_layout),
            )
        }

        def follow(path, leaf):
            key = path_key(path)
            for start in range(len(key)):
                hit = by_path.get(key[start:])
                if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                    return hit[1]
            return self.layout(leaf.shape)

        return jax.tree_util.tree_map_with_path(follow, opt_state)


def is_layout(x: Any) -> bool:
    return isinstance(x, LeafLayout)
