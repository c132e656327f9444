"""The step a JAX user writes instead of zerojax: plain GSPMD FSDP, the way MaxText does it.

fp32 parameters that are also the master weights, AdamW moments beside them, every leaf sharded over
all devices on one divisible dimension (`largest`, or `first` after the layer axis as PyTorch FSDP2
shards dim 0), the model run in bf16 (the cast inside the loss, so XLA gathers 16-bit weights),
activations constrained batch-sharded at every layer boundary, full remat per layer (or, with
`remat="offload"`, each layer's input saved in host memory, as zerojax's `cpu_checkpointing`), global-norm
clipping, and a jit that donates the state. Same model (`zerojax.models`' Llama, its layers run by
this file's own scan) and the same data as zerojax's step. `benchmarks/peers/compare.py` runs both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zerojax.models.layers import LAYER_INPUT, remat_policy
from zerojax.models.llama import inverse_frequencies, rotary

AXIS = "fsdp"


class State(NamedTuple):
    params: Any  # fp32: the weights and the optimizer's master copy at once
    opt_state: Any


def shard_dim(shape: tuple[int, ...], n: int, stacked: bool, choice: str) -> int | None:
    """The dimension a leaf is sharded on: the largest (or first) one divisible by n, never the layer axis."""
    dims = [d for d in range(1 if stacked else 0, len(shape)) if shape[d] % n == 0]
    if not dims:
        return None
    return dims[0] if choice == "first" else max(dims, key=lambda d: (shape[d], -d))


def param_shardings(abstract_params: Any, mesh: Mesh, choice: str = "largest") -> Any:
    n = mesh.shape[AXIS]

    def sharding(path, x):
        stacked = jax.tree_util.keystr(path).startswith("['layers']")
        dim = shard_dim(x.shape, n, stacked, choice)
        spec = [None] * x.ndim
        if dim is not None:
            spec[dim] = AXIS
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(sharding, abstract_params)


def make_step(graphdef: nnx.GraphDef, abstract_params: Any, mesh: Mesh, *, lr: float = 1e-4,
              max_grad_norm: float = 1.0, choice: str = "largest", remat: str = "full"):
    """`(step, abstract_state, init)`: `step(state, batch) -> (state, loss)`, jitted with the state donated,
    the state as ShapeDtypeStructs with their shardings (compile it without allocating anything), and a
    jitted `init(params) -> state`. `remat`: the layers' policy (`zerojax.models.layers.remat_policy`)."""
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(lr))
    p_shardings = param_shardings(abstract_params, mesh, choice)
    batch_sharding = NamedSharding(mesh, P(AXIS))
    constrain = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(AXIS, *([None] * (x.ndim - 1)))))

    def loss_fn(params, ids):
        model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
        h = constrain(model.embed_tokens(ids))
        cos, sin = rotary(jnp.arange(ids.shape[1]), inverse_frequencies(model.config), h.dtype)
        layer_graph, layer_state = nnx.split(model.layers)
        layer = lambda h, s: (constrain(nnx.merge(layer_graph, s)(checkpoint_name(h, LAYER_INPUT), cos, sin, None)), None)
        body = jax.checkpoint(layer, policy=remat_policy(remat))
        h = model.norm(jax.lax.scan(body, h, layer_state)[0])
        logits = model.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
        return jnp.mean(losses)

    def step(state: State, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["input_ids"])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return State(optax.apply_updates(state.params, updates), opt_state), loss

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), abstract_params)
    opt_shapes = jax.eval_shape(tx.init, abstract)
    opt_shardings = _follow(opt_shapes, abstract, p_shardings, mesh)
    shardings = State(p_shardings, opt_shardings)
    jitted = jax.jit(step, in_shardings=(shardings, {"input_ids": batch_sharding}),
                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  State(abstract, opt_shapes), shardings)
    init = jax.jit(lambda p: State(p, tx.init(p)), out_shardings=shardings)
    return jitted, abstract_state, init


def _follow(opt_shapes, params, p_shardings, mesh):
    """Optimizer-state shardings: a moment takes its parameter's sharding (same shape), scalars replicate."""
    by_shape = {}
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_shardings)):
        by_shape.setdefault(tuple(x.shape), s)
    return jax.tree.map(lambda x: by_shape.get(tuple(x.shape), NamedSharding(mesh, P())), opt_shapes)


def fsdp_mesh(devices) -> Mesh:
    return Mesh(np.asarray(devices, dtype=object), (AXIS,))
