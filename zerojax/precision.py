"""Mixed precision as DeepSpeed runs it: 16-bit compute copy, fp32 master weights, optional loss scaling."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def dtype_of(name) -> jnp.dtype:
    """`'fp32' | 'bf16' | 'fp16'` (or a dtype) as a numpy dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r} is unknown; use one of {sorted(_DTYPES)}.")
        return np.dtype(_DTYPES[name])
    return np.dtype(name)


class LossScaleState(NamedTuple):
    """The dynamic loss scaler's state: the scale, clean steps since the last overflow, hysteresis left."""

    scale: jnp.ndarray
    good_steps: jnp.ndarray
    hysteresis: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class LossScale:
    """DeepSpeed's fp16 loss scaler (v0.19.6 `DynamicLossScaler`). `static` set: a fixed scale.
    Otherwise dynamic: start at 2**initial_scale_power; an overflow skips the step and, once the
    hysteresis counter is down to 1, halves the scale (not below `min_scale`), else decrements the
    counter. A clean step preceded by a positive multiple of `window` clean steps since the last
    overflow doubles the scale and refills the counter (so the first doubling comes on the
    `window + 1`-th clean step, then every `window`); with `consecutive_hysteresis` every clean step
    refills it. Where DeepSpeed aborts on an overflow at `min_scale`, zerojax keeps skipping the step."""

    initial_scale_power: int = 16
    window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    static: float | None = None

    def init(self) -> LossScaleState:
        scale = self.static if self.static is not None else 2.0**self.initial_scale_power
        return LossScaleState(
            jnp.asarray(scale, jnp.float32), jnp.asarray(0, jnp.int32), jnp.asarray(self.hysteresis, jnp.int32)
        )

    def update(self, state: LossScaleState, finite: jnp.ndarray) -> LossScaleState:
        """The state after a step whose unscaled gradients were all finite (`finite`) or not."""
        if self.static is not None:
            return state
        shrink = jnp.logical_and(~finite, state.hysteresis <= 1)
        on_overflow = LossScaleState(
            jnp.where(shrink, jnp.maximum(state.scale / 2, self.min_scale), state.scale),
            jnp.zeros_like(state.good_steps),
            jnp.where(shrink, state.hysteresis, state.hysteresis - 1),
        )
        stable = state.good_steps  # clean steps between the last overflow and this step
        grow = (stable > 0) & (stable % self.window == 0)
        reset = jnp.asarray(self.hysteresis, jnp.int32)
        on_clean = LossScaleState(
            jnp.where(grow, state.scale * 2, state.scale),
            stable + 1,
            jnp.where(grow | self.consecutive_hysteresis, reset, state.hysteresis),
        )
        return LossScaleState(*(jnp.where(finite, c, o) for c, o in zip(on_clean, on_overflow)))


@dataclasses.dataclass(frozen=True)
class Precision:
    """Dtypes of one training run.

    `compute_dtype`: the parameter copy the model runs with and that stage 3 gathers.
    `master_dtype`: the optimizer's copy of the parameters (kept only when it differs).
    `reduce_dtype`: gradient collectives (DeepSpeed `communication_data_type`; default compute).
    `accum_dtype`: the gradient accumulator across micro-batches (`data_types.grad_accum_dtype`).
    `loss_scale`: fp16 loss scaling, None for bf16/fp32.
    """

    compute_dtype: np.dtype = np.dtype(np.float32)
    master_dtype: np.dtype = np.dtype(np.float32)
    reduce_dtype: np.dtype | None = None
    accum_dtype: np.dtype = np.dtype(np.float32)
    loss_scale: LossScale | None = None

    def __post_init__(self):
        for field in ("compute_dtype", "master_dtype", "accum_dtype"):
            object.__setattr__(self, field, dtype_of(getattr(self, field)))
        reduce = self.compute_dtype if self.reduce_dtype is None else dtype_of(self.reduce_dtype)
        object.__setattr__(self, "reduce_dtype", reduce)

    @property
    def mixed(self) -> bool:
        """True when a separate master copy is kept (compute dtype differs from master dtype)."""
        return self.compute_dtype != self.master_dtype

    @classmethod
    def fp32(cls) -> "Precision":
        return cls()

    @classmethod
    def bf16(cls, **kw) -> "Precision":
        return cls(compute_dtype="bf16", **kw)

    @classmethod
    def fp16(cls, loss_scale: LossScale | None = None, **kw) -> "Precision":
        return cls(compute_dtype="fp16", loss_scale=loss_scale or LossScale(), **kw)
