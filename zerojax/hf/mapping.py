"""How parameters map to Hugging Face tensors: the `HFTensor` record and the mapping hook.

A *map* is a function `map(path, shape) -> list[HFTensor]` that says which Hugging Face tensors one
parameter leaf becomes. `path` is the leaf's dotted tree path (`"layers.self_attn.q_proj.kernel"`; the
`.value` of an `nnx.Variable` is dropped), `shape` its full shape. The built-in maps live beside each
model (`zerojax.models.llama.hf_tensors`, `zerojax.models.gpt2.hf_tensors`); a user's own Flax model
exports by passing its own map as `export_hf(..., arch=my_map)`::

    def my_map(path, shape):
        if path == "dense.kernel":                      # flax (in, out) -> torch Linear (out, in)
            return [HFTensor("model.proj.weight", path, transpose=True)]
        if path == "blocks.w":                          # a stacked leaf: one tensor per layer
            return [HFTensor(f"model.blocks.{i}.w", path, layer=i) for i in range(shape[0])]
        if path == "heads.kernel":                      # any other layout change: a numpy function
            return [HFTensor("model.heads.weight", path, to_hf=lambda a: a.reshape(a.shape[0], -1).T)]
        raise KeyError(path)                            # unmapped leaves are an error, never dropped

`to_hf` is applied on export only, to a numpy array; it is also traced once with `jax.eval_shape` to
learn the tensor's shape, so write it with array methods (`reshape`, `.T`) or `jax.numpy`.
`load_pretrained` reads maps that use `layer` and `transpose` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from zerojax._paths import path_key

TensorMap = Callable[[str, tuple], Sequence["HFTensor"]]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One Hugging Face tensor `name` made from the parameter leaf at `path`.

    The tensor is `leaf[layer]` (or the whole leaf when `layer` is None), with its last two axes
    swapped when `transpose`, then passed through `to_hf` when given.
    """

    name: str
    path: str
    layer: int | None = None
    transpose: bool = False
    to_hf: Callable[[np.ndarray], np.ndarray] | None = None

    def shape(self, leaf_shape: tuple) -> tuple:
        """The tensor's shape from its leaf's shape (`to_hf` maps are resolved by running them)."""
        shape = tuple(leaf_shape[1:] if self.layer is not None else leaf_shape)
        if self.transpose:
            shape = (*shape[:-2], shape[-1], shape[-2])
        if self.to_hf is not None:
            shape = tuple(jax.eval_shape(self.to_hf, jax.ShapeDtypeStruct(shape, np.float32)).shape)
        return shape

    def from_leaf(self, leaf: np.ndarray) -> np.ndarray:
        """The tensor as a numpy view or array of `leaf` (no copy unless `to_hf` makes one)."""
        x = leaf[self.layer] if self.layer is not None else leaf
        if self.transpose:
            x = np.swapaxes(x, -1, -2)
        return x if self.to_hf is None else np.asarray(self.to_hf(x))


def path_str(path: tuple) -> str:
    """A jax tree path as a dotted name, without the trailing `.value` of an `nnx.Variable`."""
    parts = [str(k) for k in path_key(path)]
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """`{dotted path: leaf}` of a parameter tree (an `nnx.State`, dicts, or any pytree)."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expand(tensor_map: TensorMap, shapes: dict[str, tuple]) -> list[HFTensor]:
    """Every HF tensor of a parameter tree given `{path: shape}`, in tree order; names must be unique."""
    out, seen = [], {}
    for path, shape in shapes.items():
        try:
            tensors = list(tensor_map(path, tuple(shape)))
        except KeyError:
            raise KeyError(
                f"HF map: parameter {path!r} (shape {tuple(shape)}) has no Hugging Face name; the map "
                "must return its HFTensor(s) (see zerojax.hf.mapping for the hook)."
            ) from None
        for t in tensors:
            if t.name in seen:
                raise ValueError(
                    f"HF map: tensor name {t.name!r} is produced by both {seen[t.name]!r} and {path!r}; "
                    "every Hugging Face tensor needs one source."
                )
            seen[t.name] = path
            out.append(t)
    return out
