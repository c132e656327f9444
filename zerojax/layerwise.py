"""The streamed optimizer update one layer at a time, for stacked optimizer state kept in host memory.

With the optimizer state offloaded and updated on the device (`Offload(mode="streamed")`), updating
every leaf at once brings the whole state to the device: 12 bytes a parameter over N, more than the
device has for the models offload is for (Llama-2-70B on 8 chips: 97 GiB a chip). An element-wise
optimizer (Adam, AdamW, SGD, Lion: each element's update reads only that element and scalars such as
the step count) updates a slice of a tensor exactly as it updates the whole, so stacked layers are
updated inside a scan over the layer axis: one layer of master weights and moments copied to the
device, updated, and copied back, as DeepSpeed's CPU optimizer walks its state in chunks. Tensors
without a layer axis (embeddings, final norm) are updated together, with the stacked ones left out.

An update with any reduction (LAMB's trust ratio, Adafactor's factored moments, a global-norm clip
inside the transformation) is not element-wise and keeps the whole-tree update.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from zerojax.offload import fetch

# Primitives that compute each output element from the same element of their inputs (and scalars).
ELEMENTWISE = frozenset({
    "abs", "add", "and", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "div", "eq", "erf",
    "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic",
    "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "rem", "round", "rsqrt", "select_n",
    "sign", "sin", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
})
# Primitives that only call another jaxpr (checked in turn).
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat"})

Update = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


def is_elementwise(tx_update: Callable, grads: Any, opt_state: Any, params: Any) -> bool:
    """Whether `tx_update(grads, opt_state, params)` (abstract arguments) is element-wise: every operation
    on a tensor is one of `ELEMENTWISE`, and broadcasts only spread scalars."""
    return _elementwise(jax.make_jaxpr(tx_update)(grads, opt_state, params).jaxpr)


def _elementwise(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in CALLS:
            if not all(_elementwise(sub) for sub in _subjaxprs(eqn.params)):
                return False
        elif name == "broadcast_in_dim":
            if eqn.invars[0].aval.ndim:
                return False
        elif name not in ELEMENTWISE:
            return False
    return True


def _subjaxprs(params: dict):
    for value in params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
            yield inner


def update_by_layer(apply: Update, grads: Any, opt_state: Any, master: Any, stacked: tuple[Any, Any],
                    spaces: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """`apply(grads, opt_state, master) -> (master, opt_state, params)`, run for the stacked leaves one
    layer at a time in a scan and once for the others.

    `stacked`: (master tree, opt_state tree) of bools, the leaves with a leading layer axis (`grads`
    follows `master`). `spaces`: the memory space each output leaf returns to, as (master, opt_state,
    params) trees. The scan copies one layer of each stacked leaf to the device, and its result back.
    Every leaf without a layer axis is updated once, outside the scan, while the stacked ones are
    passed as empty arrays (same rank, no elements), so the update never sees them whole.
    """
    inputs, masks = (grads, opt_state, master), (stacked[0], stacked[1], stacked[0])  # grads follow master
    whole = apply(*(_keep(t, m, _empty) for t, m in zip(inputs, masks)))
    placeholders = [_keep(t, m, _placeholder, keep_stacked=False) for t, m in zip(inputs, masks)]

    def one_layer(_, sliced):
        out = apply(*(_fill(p, m, [fetch(x)[None] for x in s]) for p, m, s in zip(placeholders, masks, sliced)))
        return None, [[jax.device_put(x[0], space) for x, space in zip(_picked(t, m), _picked(sp, m))]
                      for t, m, sp in zip(out, masks, spaces)]

    xs = [_picked(t, m) for t, m in zip(inputs, masks)]
    _, ys = lax.scan(one_layer, None, xs, length=_layers(master, stacked[0]))
    return tuple(_fill(w, m, y) for w, m, y in zip(whole, masks, ys))


def _empty(x):
    """`x` with no elements along its leading (layer) axis."""
    return jnp.zeros((0, *x.shape[1:]), x.dtype)


def _placeholder(x):
    """What the scan body passes for a leaf without a layer axis: scalars as they are, else empty."""
    return x if x.ndim == 0 else _empty(x)


def _keep(tree, mask, replace, keep_stacked: bool = True):
    """`tree` with `replace` applied to the stacked leaves (`keep_stacked`) or to the others."""
    return jax.tree.map(lambda x, m: replace(x) if m == keep_stacked else x, tree, mask)


def _picked(tree, mask) -> list:
    """The stacked leaves of `tree`, in order."""
    return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]


def _fill(tree, mask, values: list):
    """`tree` with its stacked leaves replaced, in order, by `values`."""
    values = iter(values)
    return jax.tree.map(lambda x, m: next(values) if m else x, tree, mask)


def _layers(master, mask) -> int:
    sizes = {x.shape[0] for x in _picked(master, mask)}
    if len(sizes) != 1:
        raise ValueError(f"update_by_layer: stacked leaves disagree on the number of layers: {sorted(sizes)}.")
    return sizes.pop()
