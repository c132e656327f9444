"""The training state and its placement: a `ZeroPlan` holds every layout and sharding of a run."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from zerojax.offload import Offload, check_host_memory, leaf_bytes, offloaded_leaves
from zerojax.precision import LossScaleState, Precision
from zerojax.rules import ZeroRules


class TrainState(NamedTuple):
    """Everything a step reads and writes.

    `params` are the weights the model runs with, in the parameter layout; `master` the optimizer's
    fp32 copy (opt layout) where the plan keeps one (`ZeroPlan.keeps_master`: then `params` are in the
    compute dtype), else None and `params` themselves are updated (fp32 training, and ZeRO-3, whose
    sharded fp32 parameters are cast to the compute dtype where the model gathers them);
    `skipped` counts steps skipped for non-finite gradients, `skips_in_a_row` those since the last
    applied step (optax's `apply_if_finite` keeps the same two counts), so both survive a resume.
    """

    step: jax.Array
    params: Any
    master: Any
    opt_state: Any
    loss_scale: LossScaleState | None
    skipped: jax.Array
    skips_in_a_row: jax.Array

    @property
    def weights(self) -> Any:
        """The full-precision weights the optimizer updates: `master` where one is kept, else `params`."""
        return getattr(self, weights_field(self._asdict()))


def weights_field(state: Mapping[str, Any]) -> str:
    """'master' where `state` (a TrainState's fields, or a checkpoint's saved trees) holds a master copy,
    else 'params': the field of the full-precision weights."""
    return "params" if state.get("master") is None else "master"


@dataclasses.dataclass(frozen=True)
class ZeroPlan:
    """Rules, precision and optimizer of a run, with the layout of every parameter and optimizer leaf.

    The abstract `TrainState` (shapes, dtypes, shardings and memory kinds) is built once
    (`abstract_state`); the state's shardings are read from it.
    """

    rules: ZeroRules
    precision: Precision
    tx: optax.GradientTransformation
    param_layouts: Any
    opt_layouts: Any
    abstract_params: Any  # ShapeDtypeStructs of `TrainState.params` (dtype: `param_dtype`)
    abstract_opt_state: Any  # ShapeDtypeStructs of `tx.init(master weights)`
    offload: Offload = Offload()

    @property
    def keeps_master(self) -> bool:
        """Whether a master copy is held beside the parameters (`TrainState.master`)."""
        return _keeps_master(self.rules, self.precision, self.offload)

    @property
    def param_dtype(self):
        """The dtype `TrainState.params` are held in: the compute dtype beside a master copy, else the master's."""
        return self.precision.compute_dtype if self.keeps_master else self.precision.master_dtype

    @property
    def mesh(self):
        return self.rules.mesh

    @functools.cached_property
    def param_shardings(self) -> Any:
        """Shardings of the parameters in the parameter layout (device memory)."""
        return self.rules.shardings(self.param_layouts, "param")

    @functools.cached_property
    def update_shardings(self) -> Any:
        """Shardings of the parameter-shaped trees the optimizer update works on (the reduced gradients, the
        master weights) in the optimizer layout (device memory)."""
        return self.rules.shardings(self.param_layouts, "opt")

    @functools.cached_property
    def opt_state_shardings(self) -> Any:
        """Shardings of the optimizer state in the optimizer layout (device memory)."""
        return self.rules.shardings(self.opt_layouts, "opt")

    @functools.cached_property
    def host_optimizer_leaves(self) -> tuple[Any, Any]:
        """(master, opt_state) trees of bools: the leaves kept in host memory between steps."""
        master = _shapes(self.abstract_params, self.precision.master_dtype) if self.keeps_master else None
        both = (master, self.abstract_opt_state)
        if self.offload.optimizer is None:
            return jax.tree.map(lambda _: False, both)
        leaves, treedef = jax.tree.flatten(both)
        return treedef.unflatten(offloaded_leaves([leaf_bytes(x) for x in leaves], self.offload.ratio))

    @functools.cached_property
    def _abstract_state(self) -> TrainState:
        """The state as `jax.ShapeDtypeStruct`s carrying their shardings, offloaded leaves in host memory."""
        replicated = NamedSharding(self.mesh, P())
        placed = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
        host_master, host_opt = self.host_optimizer_leaves
        to_host = lambda kind: lambda s, h: s.with_memory_kind(kind) if h else s
        params = self.param_shardings
        if self.offload.params is not None:
            params = jax.tree.map(lambda s: s.with_memory_kind(self.offload.params), params)
        master = None
        if self.keeps_master:
            master = placed(_shapes(self.abstract_params, self.precision.master_dtype),
                            jax.tree.map(to_host(self.offload.optimizer), self.update_shardings, host_master))
        scaler = self.precision.loss_scale
        counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        return TrainState(
            step=counter,
            params=placed(_shapes(self.abstract_params, self.param_dtype), params),
            master=master,
            opt_state=placed(self.abstract_opt_state,
                             jax.tree.map(to_host(self.offload.optimizer), self.opt_state_shardings, host_opt)),
            loss_scale=None if scaler is None else placed(jax.eval_shape(scaler.init), LossScaleState(
                replicated, replicated, replicated)),
            skipped=counter,
            skips_in_a_row=counter,
        )

    def abstract_state(self) -> TrainState:
        """The state as `jax.ShapeDtypeStruct`s carrying their shardings and memory kinds: compile or restore
        without allocating (built once)."""
        return self._abstract_state

    @functools.cached_property
    def state_shardings(self) -> TrainState:
        """Where each leaf of the state lives between steps (offloaded leaves in host memory): the
        shardings of `abstract_state`."""
        return jax.tree.map(lambda x: x.sharding, self._abstract_state)


def make_plan(
    params: Any,
    tx: optax.GradientTransformation,
    rules: ZeroRules,
    precision: Precision = Precision(),
    base_specs: Any = None,
    stacked: Any = None,
    offload: Offload | None = None,
) -> ZeroPlan:
    """Lays out a run: `params` (arrays or ShapeDtypeStructs, plain or an `nnx.State`) under `rules`,
    optimized by `tx`.

    The parameters state their structure (`zerojax.structure`): an `nnx.Param` built with
    `stacked=True` has a leading layer axis, which at stage 3 the model gathers one layer at a time
    with `zerojax.gather_on_use` inside its scan, and its `out_sharding` names are kept as its
    tensor-parallel spec. For a plain pytree (Linen) `stacked` says which leaves are stacked: a bool or a
    pytree prefix of bools (`{"layers": True, "head": False}`); `base_specs` overrides the specs.
    `offload` keeps optimizer state (and, at stage 3, parameter shards) in host memory between steps.
    """
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(
                f"make_plan: parameter {jax.tree_util.keystr(path) or 'params'} is a {type(x).__name__}, not an "
                "array; pass the parameter pytree (arrays or jax.ShapeDtypeStruct), e.g. nnx.split(model, nnx.Param)[1]."
            )
    device = rules.mesh.devices.flat[0]
    if device.platform == "tpu" and np.dtype(precision.compute_dtype) == np.float16:
        raise ValueError(
            "make_plan: fp16 compute on TPU: XLA:TPU has no fp16 matrix multiply (ALG_DOT_F16_F16_F32 is "
            "unsupported); train in bf16 on TPUs (DeepSpeed bf16.enabled instead of fp16.enabled)."
        )
    offload = (offload or Offload()).resolved(device)
    if offload.params is not None and rules.stage != 3:
        raise ValueError(
            f"make_plan: parameter offload keeps stage-3 parameter shards in host memory, but stage="
            f"{rules.stage}; use stage 3 or drop offload_param."
        )
    dtype = precision.compute_dtype if _keeps_master(rules, precision, offload) else precision.master_dtype
    held, master = _shapes(params, dtype), _shapes(params, precision.master_dtype)
    layouts = rules.layouts(held, base_specs, stacked)
    opt_state = jax.eval_shape(tx.init, master)
    opt_layouts = rules.opt_state_layouts(opt_state, master, layouts)
    return ZeroPlan(rules, precision, tx, layouts, opt_layouts, held, opt_state, offload)


def _keeps_master(rules: ZeroRules, precision: Precision, offload: Offload) -> bool:
    """Mixed precision keeps a master copy, except at ZeRO-3 with parameters sharded like the optimizer
    state (no hpZ) and nothing offloaded: there the fp32 shards are the parameters, cast to the compute
    dtype before each gather, so no 16-bit copy is held between steps (12 bytes a parameter, over N)."""
    sharded_like_master = rules.stage == 3 and rules.hierarchy != "hpz"
    return precision.mixed and not (sharded_like_master and offload.optimizer is None and offload.params is None)


def _shapes(tree: Any, dtype) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs of `dtype`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def _fresh_state(plan: ZeroPlan, params: Any) -> TrainState:
    prec = plan.precision
    master = jax.tree.map(lambda x: jnp.asarray(x, prec.master_dtype), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree.map(lambda x: jnp.asarray(x, plan.param_dtype), params),
        master=master if plan.keeps_master else None,
        opt_state=plan.tx.init(master),
        loss_scale=None if prec.loss_scale is None else prec.loss_scale.init(),
        skipped=jnp.zeros((), jnp.int32),
        skips_in_a_row=jnp.zeros((), jnp.int32),
    )


def init_state(params: Any, plan: ZeroPlan) -> TrainState:
    """A fresh state from full-precision `params`, each leaf placed straight into its sharding.

    `params` may also be a function of no arguments returning them (an initialiser): it then runs
    inside the same jitted program, so no device ever holds the whole model.
    """
    check_params(jax.eval_shape(params) if callable(params) else params, plan, "init_state")
    if plan.offload.optimizer or plan.offload.params:
        check_host_memory(plan.abstract_state(), "init_state")
    if callable(params):
        return jax.jit(lambda: _fresh_state(plan, params()), out_shardings=plan.state_shardings)()
    return jax.jit(lambda p: _fresh_state(plan, p), out_shardings=plan.state_shardings)(params)


def check_params(params: Any, plan: ZeroPlan, where: str) -> None:
    """Raises a ValueError naming the first leaf where `params` departs from the plan's parameters."""
    want, got = jax.tree_util.tree_flatten_with_path(plan.abstract_params), jax.tree_util.tree_flatten_with_path(params)
    if want[1] != got[1]:
        missing = {jax.tree_util.keystr(k) for k, _ in want[0]} ^ {jax.tree_util.keystr(k) for k, _ in got[0]}
        raise ValueError(
            f"{where}: the parameter tree does not match the plan's (differing leaves: "
            f"{sorted(missing)[:5] or 'same names, different containers'}); build the plan with make_plan "
            "from these same parameters, or restore the state into plan.abstract_state()."
        )
    for (path, w), (_, g) in zip(want[0], got[0]):
        if tuple(w.shape) != tuple(g.shape):
            raise ValueError(
                f"{where}: parameter {jax.tree_util.keystr(path)} has shape {tuple(g.shape)} but the plan "
                f"expects {tuple(w.shape)}; build the plan with make_plan from these same parameters."
            )
