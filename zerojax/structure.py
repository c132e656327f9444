"""What a parameter tree says about itself: which leaves carry a stacked layer axis, and each leaf's
model-given (tensor-parallel) partition spec.

A Flax NNX model states both where it builds its `nnx.Param`s, as Param metadata: `stacked=True`
(`STACKED`) marks a leading layer axis that the model's scan walks, and `out_sharding` holds its
sharding names, read the way Flax does (`nnx.get_partition_spec`). A plain pytree (Linen params, dicts
of arrays) has no metadata: its owner says which leaves are stacked with a pytree prefix of bools
(`stacked={"layers": True, "head": False}`, as `jax.vmap`'s `in_axes` is a prefix of the arguments), and
passes its specs as `base_specs`.
"""

from __future__ import annotations

from typing import Any

import jax

STACKED = "stacked"  # nnx.Param metadata: the leading axis is the layer axis a scan walks over


def _is_variable(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _per_leaf(tree: Any, read) -> list:
    """`read(node)` for each array leaf of `tree` in order, `node` its enclosing `nnx.Variable` (or the leaf)."""
    out = []
    for node in jax.tree.leaves(tree, is_leaf=_is_variable):
        out += [read(node)] * (len(jax.tree.leaves(node)) if _is_variable(node) else 1)
    return out


def stacked_leaves(params: Any, stacked: Any = None) -> list[bool]:
    """Per leaf of `params`, in order: whether its leading axis is a stacked layer axis.

    `stacked` None reads each `nnx.Variable`'s `stacked` metadata (False where absent or for plain
    leaves); else it is a bool or a pytree prefix of `params` of bools, which decides for every leaf.
    """
    if stacked is None:
        return _per_leaf(params, lambda v: bool(_is_variable(v) and v.get_metadata(STACKED, False)))
    if isinstance(stacked, bool):
        return [stacked] * len(jax.tree.leaves(params))
    try:
        flags = jax.tree.leaves(jax.tree.broadcast(stacked, params))
    except (ValueError, TypeError):
        raise ValueError(
            f"make_plan: stacked={stacked!r:.200} is not a pytree prefix of the parameters; give a bool per "
            "subtree with the parameters' own keys, e.g. {'layers': True, 'head': False}, or None to read "
            "nnx.Param(..., stacked=True) metadata."
        ) from None
    bad = [f for f in flags if not isinstance(f, bool)]
    if bad:
        raise ValueError(f"make_plan: stacked holds {bad[0]!r}; each entry must be True or False.")
    return flags


def model_specs(params: Any) -> Any:
    """The model's own partition specs of `params`: each `nnx.Variable`'s `out_sharding` metadata as
    `nnx.get_partition_spec` reads it, an empty spec for a leaf without one."""
    from flax import nnx

    return nnx.get_partition_spec(params)
