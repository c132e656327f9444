"""DeepSpeed's learning-rate schedulers and Hugging Face's `lr_scheduler_type` as optax schedules.

Timing: DeepSpeed sets the scheduler's initial learning rate at construction and calls
`scheduler.step()` after each optimizer step, so optimizer step `c` (optax's `count`, from 0) runs with
the scheduler's value at `last_batch_iteration = c - 1`. `ds_schedule` gives the value at an iteration;
`optax_schedule` applies this shift. Hugging Face's `LambdaLR` schedules run step `c` at `lambda(c)`.
The parameters are a scheduler block's with DeepSpeed's defaults filled (`zerojax.config.optimizer`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import optax


def as_float(x):
    """`x` as a float array of the default float width (float64 under `jax.enable_x64`)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _warmup_gamma(it, n: int, warmup_type: str):
    """DeepSpeed's warmup fraction at iteration `it` < n: ln(it+1)/ln(n) (log) or it/n (linear)."""
    if warmup_type == "log":
        return jnp.log(jnp.maximum(it + 1, 1.0)) / math.log(n)
    return it / n


def _warmup(p: dict, base_lr: float, decay: bool) -> Callable:
    """WarmupLR, or with `decay` WarmupDecayLR: warm up to `warmup_max_lr`, then hold it or decay linearly."""
    lo = p["warmup_min_lr"]
    hi = base_lr if p["warmup_max_lr"] is None else p["warmup_max_lr"]
    n = max(2, p["warmup_num_steps"])
    total = p.get("total_num_steps")

    def warmup(it):
        it = as_float(it)
        gamma = jnp.where(it < n, _warmup_gamma(it, n, p["warmup_type"]), 1.0)
        if decay:
            gamma = jnp.where(it < n, gamma, jnp.maximum(0.0, (total - it) / max(1.0, total - n)))
        return jnp.where(it < 0, lo, lo + (hi - lo) * gamma)

    return warmup


def _warmup_cosine(p: dict, base_lr: float) -> Callable:
    """WarmupCosineLR: a warmup ratio from `warmup_min_ratio` to 1, then a cosine down to `cos_min_ratio`."""
    n = max(2, p["warmup_num_steps"])
    total, wmin, cmin = p["total_num_steps"], p["warmup_min_ratio"], p["cos_min_ratio"]

    def cosine(it):
        it = as_float(it)
        warm = wmin + _warmup_gamma(it, n, p["warmup_type"]) * (1.0 - wmin)
        progress = jnp.minimum(1.0, (it - n + 1) / max(1, total - n))
        decay = jnp.maximum(0.0, cmin + (1.0 - cmin) * (1 + jnp.cos(math.pi * progress)) / 2)
        return jnp.where(it < 0, 0.0, base_lr * jnp.where(it < n, warm, decay))

    return cosine


def _one_cycle(p: dict, base_lr: float) -> Callable:
    """OneCycle's learning rate: the triangular cycle between its bounds, then its decay."""
    lo, hi = p["cycle_min_lr"], p["cycle_max_lr"]
    scale, total = _one_cycle_scale(p)
    decay_steps, rate = p["decay_step_size"], p["decay_lr_rate"]
    skip = math.isclose(decay_steps, 0) or math.isclose(rate, 0)

    def one_cycle(it):
        it = as_float(it)
        cycle = lo + (hi - lo) * scale(it)
        after = lo if skip else lo / (1 + rate * (it - total + 1) / decay_steps)
        return jnp.where(it < total, cycle, after)

    return one_cycle


def _range_test(p: dict, base_lr: float) -> Callable:
    """LRRangeTest: the learning rate grows linearly (or in stairs) from `lr_range_test_min_lr`."""
    lo, size, rate = p["lr_range_test_min_lr"], p["lr_range_test_step_size"], p["lr_range_test_step_rate"]
    stairs = p["lr_range_test_staircase"]

    def range_test(it):
        interval = (as_float(it) + 1) / size
        return lo * (1 + rate * (jnp.floor(interval) if stairs else interval))

    return range_test


_SCHEDULES: dict[str, Callable[[dict, float], Callable]] = {
    "WarmupLR": lambda p, base_lr: _warmup(p, base_lr, decay=False),
    "WarmupDecayLR": lambda p, base_lr: _warmup(p, base_lr, decay=True),
    "WarmupCosineLR": _warmup_cosine,
    "OneCycle": _one_cycle,
    "LRRangeTest": _range_test,
}


def ds_schedule(name: str, params: Mapping[str, Any], base_lr: float) -> Callable:
    """`lr(iteration)` of DeepSpeed scheduler `name` for iterations >= -1 (-1: the constructor's value).

    `params` are the scheduler's parameters with defaults filled (see `SCHEDULER_PARAMS`); `base_lr` is
    the optimizer's lr (WarmupLR's default `warmup_max_lr`, WarmupCosineLR's base).
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(_SCHEDULES)}.")
    return _SCHEDULES[name](dict(params), base_lr)


def one_cycle_momentum(params: Mapping[str, Any]) -> Callable:
    """OneCycle's beta1 at an iteration >= -1: the inverse of the lr cycle, then its decay.

    At construction (-1) DeepSpeed sets `cycle_min_mom`, although the cycle formula gives `cycle_max_mom`.
    """
    p = dict(params)
    lo, hi = p["cycle_min_mom"], p["cycle_max_mom"]
    scale, total = _one_cycle_scale(p)
    skip = math.isclose(p["decay_step_size"], 0) or math.isclose(p["decay_mom_rate"], 0)

    def momentum(it):
        it = as_float(it)
        cycle = hi - (hi - lo) * scale(it)
        after = hi if skip else hi * (1 + p["decay_mom_rate"] * (it - total + 1) / p["decay_step_size"])
        return jnp.where(it < 0, lo, jnp.where(it < total, cycle, after))

    return momentum


def _one_cycle_scale(p: Mapping[str, Any]) -> tuple[Callable, float]:
    """OneCycle's triangular scale factor in [0, 1] at an iteration, and the cycle length."""
    first = float(p["cycle_first_step_size"])
    second = first if p["cycle_second_step_size"] is None else float(p["cycle_second_step_size"])
    total = first + second
    stairs1 = p["cycle_first_stair_count"]
    stairs2 = stairs1 if p["cycle_second_stair_count"] is None else p["cycle_second_stair_count"]

    def scale(it):
        pos = jnp.mod(it + 1, total)  # position in the current cycle: 1 + b/T − floor(1 + b/T) = pos/T
        rising = pos <= first
        smooth = jnp.where(rising, pos / first, (total - pos) / second if second > 0 else 0.0)
        count = jnp.where(rising, stairs1, stairs2)
        stepped = _stair(jnp.where(rising, pos, total - pos), count, jnp.where(rising, first, second)) / jnp.maximum(
            count, 1)
        return jnp.where(count > 0, stepped, smooth)

    return scale, total


def _stair(offset, count, size):
    """floor(offset × count / size), in integers when `size` is whole (the batch offsets always are), so
    a stair boundary is never lost to float rounding."""
    int_t = jnp.asarray(0).dtype
    exact = (offset.astype(int_t) * count) // jnp.maximum(size, 1).astype(int_t)
    return jnp.where(jnp.floor(size) == size, exact, jnp.floor(offset * count / size))


def optax_schedule(name: str, params: Mapping[str, Any], base_lr: float) -> optax.Schedule:
    """The optax schedule (of `count`, the optimizer steps taken) reproducing DeepSpeed's timing."""
    lr = ds_schedule(name, params, base_lr)
    return lambda count: lr(as_float(count) - 1)


def hf_schedule(kind: str, lr: float, total_steps: int | None, warmup_steps: int) -> optax.Schedule:
    """Hugging Face's `lr_scheduler_type` (linear, cosine, constant, constant_with_warmup) as optax."""
    w = warmup_steps
    if kind in ("linear", "cosine") and total_steps is None:
        raise ValueError(
            f"lr_scheduler_type={kind!r} needs the total step count; set TrainingArguments.max_steps or "
            "train_dataset_size, or pass total_steps."
        )

    def schedule(count):
        c = as_float(count)
        warm = c / max(1, w)
        if kind == "constant":
            return jnp.full_like(c, lr)
        if kind == "constant_with_warmup":
            return lr * jnp.where(c < w, warm, 1.0)
        progress = (c - w) / max(1, total_steps - w)
        after = (jnp.maximum(0.0, (total_steps - c) / max(1, total_steps - w)) if kind == "linear"
                 else jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 2.0 * 0.5 * progress))))
        return lr * jnp.where(c < w, warm, after)

    return schedule
