"""One path from a resolved DeepSpeed config to the program a run compiles: its mesh, optimizer, plan, loss and
train step, the abstract global batch, and the one stage-"auto" search.

The Trainer and `zerojax estimate` (its `choose_stage` too) both build here, so an estimate sizes the
step the Trainer runs for the same config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

NO_DECAY = ("bias", "scale", "norm", "ln_")


def decay_mask(params: Any) -> Any:
    """Weight decay for every parameter but biases and normalisation scales (as Transformers does)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(tag in jax.tree_util.keystr(path).lower() for tag in NO_DECAY), params
    )


def optimizer(config, params: Any, total_steps: int | None = None):
    """The config's optax optimizer for `params`, decaying all but biases and norms (`decay_mask`)."""
    return config.optimizer(total_steps=total_steps, weight_decay_mask=decay_mask(params))


def mesh(config, devices: list):
    """The mesh of `config` over `devices`: its hpZ/MiCS groups on `fsdp`, replicated across `replica`."""
    from zerojax.mesh import make_mesh

    return make_mesh(devices=devices, **config.mesh_shape(len(devices)))


def plan(config, params: Any, tx, mesh, offload_mode: str | None = None):
    """The `ZeroPlan` of `config` (its stage resolved) for `params` on `mesh`; `offload_mode` overrides
    `Offload.mode` (a DeepSpeed config gives 'streamed')."""
    from zerojax.plan import make_plan

    offload = config.offload()
    if offload_mode is not None and offload.optimizer is not None:
        offload = dataclasses.replace(offload, mode=offload_mode)
    return make_plan(params, tx, config.zero_rules(mesh), config.precision(), offload=offload)


def default_loss(graphdef, other: Any = None, across_ranks: bool = True):
    """The Trainer's loss: next-token cross-entropy, every target token of the global batch alike
    (`zerojax.TokenLoss`, as Hugging Face's Trainer), with the model's RNG streams `other` (dropout)."""
    from zerojax.models import causal_lm_loss

    loss = causal_lm_loss(graphdef, per_token=True, other=other if jax.tree.leaves(other) else None)
    return dataclasses.replace(loss, across_ranks=across_ranks)


def train_step(config, plan, loss_fn, rng: bool = False):
    """The jitted train step of `plan` with the config's gradient accumulation and clipping."""
    from zerojax.step import make_train_step

    return make_train_step(loss_fn, plan, rng=rng, micro_batches=config.gradient_accumulation_steps,
                           max_grad_norm=config.gradient_clipping)


def abstract_batch(batch: Any, mesh) -> Any:
    """`batch` (arrays or shapes, leading dimension the global batch) as ShapeDtypeStructs split over the
    data-parallel axes: what a step is compiled for ahead of time."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from zerojax.mesh import DATA_AXES

    data = NamedSharding(mesh, P(DATA_AXES))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data), batch)


@dataclasses.dataclass(frozen=True)
class Tried:
    """One stage-"auto" option: `(stage, offload_optimizer, offload_param)`, the config with it, and what
    measuring it gave (`result`), or why it could not be built (`skipped`)."""

    option: tuple[int, bool, bool]
    config: Any
    result: Any = None
    skipped: str | None = None


def search_stage(config, build: Callable[[Any], Any], measure: Callable[[Any, Any], Any],
                 fits: Callable[[Any], bool]) -> tuple[Tried | None, list[Tried]]:
    """`zero_optimization.stage: "auto"`: tries the config's stage options cheapest first
    (`ZeroConfig.stage_options`) and returns the first whose `measure(config, build(config))` `fits`,
    with every option tried (None first when none fits). A ValueError from `build` means the option
    cannot be built here (e.g. host offload on compile-only CUDA devices): it is skipped, with its reason."""
    tried = []
    for option in config.stage_options():
        candidate = config.with_stage(*option)
        try:
            built = build(candidate)
        except ValueError as e:
            tried.append(Tried(option, candidate, skipped=str(e)))
            continue
        tried.append(Tried(option, candidate, measure(candidate, built)))
        if fits(tried[-1].result):
            return tried[-1], tried
    return None, tried
