"""The ZeRO train step: exact ZeRO collectives for the gradients, GSPMD for the optimizer update.

Forward and backward run per device inside `shard_map` over the data-parallel axes, so the
collectives are the ones ZeRO prescribes on every backend (XLA:CPU would otherwise turn a
reduce-scatter into all-reduce + slice):

1. stage-3 parameter shards (fp32 where they are the master weights) are cast to the compute dtype
   and all-gathered before use;
2. each micro-batch's gradient is reduce-scattered over the leaf's gradient axes (stages 2–3) in the
   reduce dtype into a zero carrier of the shard (`zerojax.gather`), and with several micro-batches
   accumulated in the accumulation dtype at its sharded size;
3. after the last micro-batch the accumulator is reduce-scattered to the optimizer layout (stage 1)
   or all-reduced over the axes the leaf is replicated on (stage 0, MiCS across groups).

The optimizer update then runs on the sharded gradients, master weights and optimizer state as
ordinary jitted code: element-wise updates stay local, and any per-tensor reduction an optax
transformation needs (Adafactor, LAMB) is partitioned correctly by XLA. The new compute copy is
cast from the master weights and placed in the parameter layout (an all-gather in the compute dtype
at stages 1–2); at ZeRO-3 the updated fp32 shards are the parameters themselves.

`TrainStep` is the jitted step with its input checks, and with compiler-chosen state layouts
(`zerojax.layouts`) the formats it learns on its first call. The module is over 400 lines because the
eval step shares the train step's per-leaf helpers (gather on use, carriers, per-layer fetches).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.experimental.compute_on import compute_on
from jax.sharding import NamedSharding, PartitionSpec as P

from zerojax.compiled import refused_for_memory
from zerojax.gather import Sharded, reduce_scatter, settled
from zerojax.layerwise import is_elementwise, update_by_layer
from zerojax.layouts import automatic, relayout, unpadded
from zerojax.loss import TokenLoss, batch_mean, token_weight, value
from zerojax.mesh import DATA_AXES, TENSOR, check_batch_rows
from zerojax.offload import HOST_KINDS, on_device, to_memory
from zerojax.plan import TrainState, ZeroPlan, check_params
from zerojax.rules import LeafLayout, is_layout
from zerojax.zeropp import Quantization

LossFn = Callable[..., jax.Array] | TokenLoss


def _psum(x, axes):
    return lax.psum(x, axes) if axes else x


def _manual(layout: LeafLayout, axes: tuple[str, ...]) -> P:
    """The spec of a layout as `shard_map` sees it: only the data-parallel (manual) axes."""
    entries = [None] * len(layout.shape)
    if layout.dim is not None and axes:
        entries[layout.dim] = axes[0] if len(axes) == 1 else tuple(axes)
    return P(*entries)


def _tree(fn, *trees):
    return jax.tree.map(fn, *trees, is_leaf=is_layout)


def make_train_step(
    loss_fn: LossFn,
    plan: ZeroPlan,
    *,
    micro_batches: int = 1,
    max_grad_norm: float = 0.0,
    rng: bool = False,
    state_layout: str | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """A jitted `step(state, batch) -> (state, metrics)` that donates `state`.

    `loss_fn(params, batch)` returns the mean loss of `batch` as a scalar (each micro-batch of each rank
    weighs the same, as in DeepSpeed), or is a `zerojax.TokenLoss` (each token of the global batch weighs
    the same, as in Hugging Face's Trainer; see `zerojax.loss`). `batch` is a tree of arrays whose leading
    dimension is the global batch (`train_batch_size` = micro-batch size × data-parallel size ×
    `micro_batches`); each data-parallel rank takes a contiguous slice and splits it into
    `micro_batches` equal micro-batches. `max_grad_norm` > 0 clips by global norm as DeepSpeed does.
    `rng`: the loss takes a key, `loss_fn(params, batch, key)` (dropout), and the step is called as
    `step(state, batch, key)`; each micro-batch of each rank gets `key` folded with the step number, the
    rank and the micro-batch index, so a run is a pure function of its key.
    `state_layout`: how the state is laid out in device memory, `"compiler"` (as the compiler prefers, where
    that pads nothing: see `zerojax.layouts`) or `"row-major"`; None picks the compiler's on TPU without
    offload (XLA:TPU would otherwise copy some row-major stacked weights every step), else row-major.
    Metrics: `loss` (mean over the global batch), `grad_norm` (before clipping), `skipped` (the update
    was dropped: the gradients' global norm was not finite) and `loss_scale`.
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(
            f"make_train_step: micro_batches={micro_batches!r} must be a positive integer "
            "(gradient_accumulation_steps)."
        )
    if max_grad_norm < 0:
        raise ValueError(f"make_train_step: max_grad_norm={max_grad_norm!r} must be >= 0 (0 disables clipping).")
    rules, prec, layouts = plan.rules, plan.precision, plan.param_layouts
    mesh, axes, ranks = rules.mesh, rules.data_axes, rules.data_size
    batch_sharding = NamedSharding(mesh, P(DATA_AXES))
    per_layer, tpu = _fetched_per_layer(plan), _on_tpu(mesh)
    reduce_dtype, accum_dtype, quant = prec.reduce_dtype, prec.accum_dtype, rules.quantization

    def local_grads(params, batch, scale, key):
        """Per rank: this rank's slice of the summed gradient, in the optimizer layout, and the mean loss."""
        micro = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
        weight = token_weight(loss_fn, micro, axes, ranks)  # the same for every micro-batch
        keys = None if key is None else jax.vmap(partial(jax.random.fold_in, jax.random.fold_in(key, _rank(axes))))(
            jnp.arange(micro_batches))

        def grads_of(b, key):
            """One micro-batch's gradient at the gradient layout's size, in the reduce dtype, and its loss."""
            carriers = _tree(lambda l, h: _carrier(l, reduce_dtype, h, mesh), layouts, per_layer)

            def scaled_loss(carriers):
                used = _tree(lambda c, p, l, h: _in_use(p, c, l, prec.compute_dtype, quant, h, tpu), carriers,
                             params, layouts, per_layer)
                loss = value(loss_fn, (used, b) if key is None else (used, b, key), weight)
                return loss * scale, loss

            (_, loss), g = jax.value_and_grad(scaled_loss, has_aux=True)(carriers)
            g = _tree(lambda g, h: jax.device_put(g, jax.memory.Space.Device) if h else g, g, per_layer)
            return _tree(lambda g, l: reduce_scatter(g, _after_use(l), l.dim, quant), g, layouts), loss

        if micro_batches == 1:  # the gradient is the sum: no accumulator beside it
            grads, loss = grads_of(*jax.tree.map(lambda x: x[0], (micro, keys)))
        else:
            def accumulate(acc, xs):
                g, loss = grads_of(*xs)
                return jax.tree.map(lambda a, g: a + g.astype(accum_dtype), acc, g), loss

            zeros = _tree(lambda l: jnp.zeros(_local_shape(l, l.grad_axes, mesh), accum_dtype), layouts)
            grads, losses = lax.scan(accumulate, zeros, (micro, keys))
            loss = jnp.mean(losses)

        def finish(g, l):
            """Stage 1 scatters the summed gradient to the optimizer layout; stage 0 and MiCS replicas all-reduce."""
            scatter = tuple(x for x in l.opt_axes if x not in l.grad_axes)
            reduce = tuple(x for x in axes if x not in l.opt_axes)
            if not scatter and not reduce:
                return g
            return _psum(reduce_scatter(g.astype(reduce_dtype), scatter, l.dim, quant), reduce).astype(g.dtype)

        return _tree(finish, grads, layouts), _psum(loss, axes) / ranks

    sharded_grads = jax.shard_map(
        local_grads,
        mesh=mesh,
        in_specs=(_tree(lambda l: _manual(l, l.param_axes), layouts), P(DATA_AXES), P(), P() if rng else None),
        out_specs=(_tree(lambda l: _manual(l, l.opt_axes), layouts), P()),
        axis_names=_manual_axes(mesh),
        check_vma=False,
    )

    shardings = plan.state_shardings
    host_update = plan.offload.mode == "host" and plan.offload.optimizer is not None
    by_layer = None if host_update else _stacked_offloaded(plan)

    def cast(master):
        """The compute parameters from (new) master weights, in the parameter layout."""
        return jax.tree.map(lambda m, s: lax.with_sharding_constraint(m.astype(plan.param_dtype), s), master,
                            plan.param_shardings)

    def update(grads, opt_state, master, finite, grad_norm):
        """The clipped optimizer step on sharded state; a non-finite step leaves master and state bit-identical.

        Every new leaf is selected against the old one element by element, so the select fuses into the
        update's loop and XLA writes the donated master weights and moments in place on every backend
        (a `lax.cond` makes XLA:GPU copy the whole state into the conditional's result).
        """
        if max_grad_norm > 0:
            coef = jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * coef, grads)
        updates, new_opt_state = plan.tx.update(grads, opt_state, master)
        new = optax.apply_updates(master, updates), new_opt_state
        old = (master, opt_state)
        # Keep each leaf in its input's memory space (a host-computed update makes device scalars).
        return jax.tree.map(
            lambda n, o: jax.device_put(jnp.where(finite, n, o), jax.typeof(o).memory_space), new, old)

    def step(state: TrainState, batch, key=None):
        scale = state.loss_scale.scale if state.loss_scale is not None else jnp.ones((), jnp.float32)
        key = None if key is None else jax.random.fold_in(key, state.step)
        grads, loss = sharded_grads(_step_params(state.params, shardings.params, per_layer), batch, scale, key)
        grads = jax.tree.map(lambda g: g.astype(prec.master_dtype) / (scale * ranks * micro_batches), grads)
        grad_norm = optax.tree.norm(grads)
        # An inf or nan in any gradient makes the fp32 norm non-finite, as it makes DeepSpeed's fp32 sum of
        # each gradient non-finite; like that sum, a norm beyond fp32's range skips the step too.
        finite = jnp.isfinite(grad_norm)

        keeps_master = plan.keeps_master
        master, master_shardings = state.weights, shardings.weights
        if host_update:  # DeepSpeed's CPU optimizer: the update runs where the state lives
            host = NamedSharding(mesh, P(), memory_kind=plan.offload.optimizer)
            args = (
                to_memory(grads, plan.update_shardings, plan.offload.optimizer),
                state.opt_state,
                to_memory(master, master_shardings, plan.offload.optimizer),
                jax.device_put(finite, host),
                jax.device_put(grad_norm, host),
            )
            with compute_on("device_host"):
                new_master, opt_state = update(*args)
        elif by_layer is not None:  # stacked state streamed through the device one layer at a time
            def apply(g, o, m):
                new_master, new_opt_state = update(g, o, m, finite, grad_norm)
                return new_master, new_opt_state, cast(new_master)

            new_master, opt_state, params = update_by_layer(
                apply, grads, _on_device_unless(state.opt_state, shardings.opt_state, by_layer[1]),
                _on_device_unless(master, master_shardings, by_layer[0]), by_layer,
                (_spaces(master_shardings), _spaces(shardings.opt_state), _spaces(shardings.params)))
        else:
            new_master, opt_state = update(
                grads, on_device(state.opt_state, shardings.opt_state), on_device(master, master_shardings), finite,
                grad_norm,
            )
        if by_layer is None:
            params = cast(on_device(new_master, jax.tree.map(
                lambda s: s.with_memory_kind(plan.offload.optimizer or "device"), master_shardings))
                if host_update else new_master)
        loss_scale = state.loss_scale
        if prec.loss_scale is not None:
            loss_scale = prec.loss_scale.update(loss_scale, finite)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            master=new_master if keeps_master else None,
            opt_state=opt_state,
            loss_scale=loss_scale,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            skips_in_a_row=jnp.where(finite, 0, state.skips_in_a_row + 1),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite, "loss_scale": scale}
        return new_state, metrics

    replicated = NamedSharding(mesh, P())

    def jit(state_formats):
        """The jitted step taking and returning the state in `state_formats` (shardings, or formats)."""
        return jax.jit(
            step,
            in_shardings=(state_formats, batch_sharding) + ((replicated,) if rng else ()),
            out_shardings=(state_formats, replicated),
            donate_argnums=0,
        )

    offloaded = plan.offload.optimizer is not None or plan.offload.params is not None
    if state_layout is None:
        state_layout = "compiler" if tpu and not offloaded else "row-major"
    if state_layout not in ("compiler", "row-major"):
        raise ValueError(f"make_train_step: state_layout={state_layout!r} must be 'compiler', 'row-major' or None (the "
                         "compiler's on TPU, row-major elsewhere).")
    if state_layout == "compiler" and offloaded:
        raise ValueError("make_train_step: state_layout='compiler' needs the whole state in device memory (XLA:TPU "
                         "refuses a compiler-chosen layout beside offloaded parameters); use 'row-major' with offload.")
    return TrainStep(jit(shardings), plan, ranks * micro_batches, rng, jit if state_layout == "compiler" else None)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The compiled step: call it as `step(state, batch)`, or `lower(state, batch)` to inspect it."""

    jitted: Any  # the step with the state row-major
    plan: ZeroPlan
    batch_multiple: int
    rng: bool = False
    jit: Callable[[Any], Any] | None = None  # state formats -> the jitted step, when the compiler lays the state out
    _chosen: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, state: TrainState, batch, key=None) -> tuple[TrainState, dict]:
        extra = self._check(state, batch, key)
        jitted, formats = self._program(state, batch, extra)
        return jitted(state if formats is None else relayout(state, formats), batch, *extra)

    def lower(self, state, batch, key=None):
        extra = self._check(state, batch, key)
        return self._program(state, batch, extra)[0].lower(state, batch, *extra)

    def _program(self, state, batch, extra) -> tuple[Any, Any]:
        """(the jitted step, the state's formats or None): with compiler layouts, the formats are chosen
        once, by compiling the step for the first call's shapes with the state's layout left open."""
        if self.jit is None:
            return self.jitted, None
        if not self._chosen:
            shardings = self.plan.state_shardings
            spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            abstract = jax.tree.map(spec, (state, batch, *extra))
            try:
                chosen = self.jit(automatic(shardings)).lower(*abstract).compile().input_formats[0][0]
                formats = unpadded(chosen, self.plan.abstract_state(), shardings)
            except Exception as e:  # jax's JaxRuntimeError; a step too big for the device either way
                if refused_for_memory(e) is None:
                    raise
                formats = shardings  # row-major: the step's own compile then reports the refusal
            self._chosen.update(jitted=self.jit(formats), formats=formats)
        return self._chosen["jitted"], self._chosen["formats"]

    def _check(self, state, batch, key) -> tuple:
        """The key argument the jitted step takes (none without `rng`), after checking the inputs."""
        check_params(state.params, self.plan, "train step")
        _check_batch(batch, self.batch_multiple)
        if self.rng and key is None:
            raise ValueError("train step: made with rng=True, so it needs a key: step(state, batch, jax.random.key(seed)).")
        if not self.rng and key is not None:
            raise ValueError("train step: got a key but was made without rng; pass rng=True to make_train_step "
                             "(the loss then takes it: loss_fn(params, batch, key)).")
        return (key,) if self.rng else ()


def _on_tpu(mesh) -> bool:
    """Whether the mesh's devices are TPUs: XLA:TPU gets flat gathers, settled gradient shards (`_in_use`) and,
    by default, the compiler's state layouts."""
    return mesh.devices.flat[0].platform == "tpu"


def _in_use(param, carrier, layout: LeafLayout, compute_dtype, quant: Quantization, on_host: bool, tpu: bool):
    """The parameter as the model sees it, in the compute dtype: whole (gathered on use), or `Sharded`
    for a stacked layer (`on_host`: copied to the device one layer at a time, when it is used). Its
    gradient lands in `carrier` (see `zerojax.gather`); `quant`: which of the two move quantized. For
    XLA:TPU a shard along dim 0 is gathered flat, and outside the layer scan the gradient shard is
    `settled` where it is scattered (`tpu`; on CPU and GPU neither changes the program's memory)."""
    gathered = bool(layout.param_axes)
    axes = layout.param_axes if gathered else layout.grad_axes
    dim = (layout.dim - param.ndim) if layout.dim is not None else -1
    carrier = settled(carrier) if tpu and not layout.stacked else carrier
    node = Sharded(param, carrier, axes, dim, gathered, compute_dtype, on_host, quant, tpu)
    return node if layout.stacked else node.use()


def _carrier(layout: LeafLayout, dtype, on_host: bool, mesh) -> jax.Array:
    """Zeros of a leaf's gradient shard as the backward pass leaves it (scattered over the parameter
    axes at stage 3, the gradient axes at stage 2, whole at stages 0–1): what the step differentiates."""
    zeros = jnp.zeros(_local_shape(layout, layout.param_axes or layout.grad_axes, mesh), dtype)
    return jax.device_put(zeros, jax.memory.Space.Host) if on_host else zeros


def _fetched_per_layer(plan: ZeroPlan) -> Any:
    """Per parameter: whether it stays in host memory until the model's scan copies one layer of it to
    the device (a stacked stage-3 matrix under parameter offload). Stacked vectors (norm scales, biases:
    a few KiB a layer) are copied whole at the step's start instead: per-layer copies of them would be
    tiny transfers, and XLA:TPU cannot slice one row out of a tiled host array."""
    return _tree(lambda l, s: bool(_stacked_matrix(l) and l.param_axes and s.memory_kind in HOST_KINDS),
                 plan.param_layouts, plan.state_shardings.params)


def _stacked_matrix(layout: LeafLayout) -> bool:
    """A stacked leaf copied between host and device one layer at a time: a matrix per layer. (Stacked
    vectors are copied whole: XLA:TPU cannot slice one row out of a tiled host array, and aborts.)"""
    return layout.stacked and len(layout.shape) >= 3


def _stacked_offloaded(plan: ZeroPlan) -> tuple[Any, Any] | None:
    """(master, opt_state) trees of bools marking the stacked matrices, when the streamed update should
    walk them one layer at a time: the optimizer state of every stacked matrix lives in host memory and
    the optimizer is element-wise (`zerojax.layerwise`); else None (the whole-tree update)."""
    if plan.offload.optimizer is None or not plan.keeps_master:
        return None
    shardings = plan.state_shardings
    master = _tree(_stacked_matrix, plan.param_layouts)
    opt = _tree(_stacked_matrix, plan.opt_layouts)
    stacked = [s for m, s in zip(jax.tree.leaves((master, opt)), jax.tree.leaves((shardings.master, shardings.opt_state)))
               if m]
    if not stacked or any(s.memory_kind not in HOST_KINDS for s in stacked):
        return None
    plain = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # no memory kinds
    abstract = plan.abstract_state()
    if not is_elementwise(plan.tx.update, plain(abstract.master), plain(abstract.opt_state), plain(abstract.master)):
        return None
    return master, opt


def _on_device_unless(tree, shardings, stacked):
    """The leaves of `tree` in device memory, except the stacked ones (copied a layer at a time)."""
    return jax.tree.map(lambda x, s, m: x if m else on_device(x, s), tree, shardings, stacked)


def _spaces(shardings):
    """The memory space (device or host) of each sharding, as `jax.device_put` takes it inside `jit`."""
    return jax.tree.map(
        lambda s: jax.memory.Space.Host if s.memory_kind in HOST_KINDS else jax.memory.Space.Device, shardings)


def _step_params(params, shardings, per_layer):
    """The parameters a step's `shard_map` takes: in device memory, except those fetched per layer."""
    return jax.tree.map(lambda p, s, keep: p if keep else on_device(p, s), params, shardings, per_layer)


def make_eval_step(loss_fn: LossFn, plan: ZeroPlan, *, rng: bool = False) -> Callable[[Any, Any], jax.Array]:
    """A jitted `eval_step(params, batch) -> loss` over the global batch (each rank's mean loss averaged,
    or a `TokenLoss` over every token), with the step's gathers. `rng`: the loss takes a key, which is
    None here (deterministic: no dropout)."""
    layouts, mesh, axes = plan.param_layouts, plan.mesh, plan.rules.data_axes
    per_layer, compute, quant = _fetched_per_layer(plan), plan.precision.compute_dtype, plan.rules.quantization
    tpu = _on_tpu(mesh)

    def local_loss(params, batch):
        used = _tree(lambda p, l, h: _in_use(p, _carrier(l, compute, False, mesh), l, compute, quant, h, tpu),
                     params, layouts, per_layer)
        return batch_mean(loss_fn, (used, batch, None) if rng else (used, batch), axes, plan.rules.data_size)

    sharded = jax.shard_map(
        local_loss, mesh=mesh,
        in_specs=(_tree(lambda l: _manual(l, l.param_axes), layouts), P(DATA_AXES)), out_specs=P(),
        axis_names=_manual_axes(mesh), check_vma=False,
    )
    params_in = plan.state_shardings.params
    jitted = jax.jit(
        lambda params, batch: sharded(_step_params(params, params_in, per_layer), batch),
        in_shardings=(params_in, NamedSharding(mesh, P(DATA_AXES))),
    )

    def eval_step(params, batch):
        check_params(params, plan, "eval step")
        _check_batch(batch, plan.rules.data_size)
        return jitted(params, batch)

    return eval_step


def _after_use(layout: LeafLayout) -> tuple[str, ...]:
    """Gradient axes still to scatter after the backward pass (hpZ: the axes beyond the param group)."""
    done = layout.param_axes or layout.grad_axes
    return tuple(a for a in layout.grad_axes if a not in done)


def _rank(axes: tuple[str, ...]) -> jax.Array:
    """This rank's index over the data-parallel `axes` (inside `shard_map`)."""
    return lax.axis_index(axes) if axes else jnp.zeros((), jnp.int32)


def _manual_axes(mesh) -> set[str]:
    """All axes when there is no tensor parallelism, else the data-parallel axes only.

    Fully manual is preferred: with a partially manual `shard_map` Shardy puts a sharding constraint
    inside each all-reduce's reducer, which XLA:CPU's bf16 all-reduce promotion cannot clone (crash).
    """
    return set(mesh.axis_names) if mesh.shape[TENSOR] == 1 else set(DATA_AXES)


def _local_shape(layout: LeafLayout, axes, mesh) -> tuple[int, ...]:
    shape = list(layout.shape)
    if layout.dim is not None and axes:
        for a in axes:
            shape[layout.dim] //= mesh.shape[a]
    return tuple(shape)


def _check_batch(batch, multiple: int) -> None:
    check_batch_rows(batch, multiple, lambda leaf, shape: (
        f"train step: batch leaf {leaf} has shape {shape}; its leading (batch) dimension must be a multiple of "
        f"{multiple} = data-parallel size x micro_batches. Use a global batch of train_micro_batch_size_per_gpu x "
        "gradient_accumulation_steps x data-parallel size."))
