"""DeepSpeed optimizers and learning-rate schedulers as optax, with DeepSpeed's exact semantics.

Optimizers: `Adam`/`AdamW` (FusedAdam: `"type": "Adam"` decouples weight decay unless
`adam_w_mode: false`; `AdamW` always does), `Lamb` (FusedLamb: trust ratio clamped to
[`min_coeff`, `max_coeff`], bias correction applied to the step size), `Lion`, `Adagrad`, `SGD`
(`torch.optim.SGD`). Schedulers: `WarmupLR`, `WarmupDecayLR`, `WarmupCosineLR`, `OneCycle` (with its
momentum cycle) and `LRRangeTest`, plus Hugging Face's `lr_scheduler_type` for configs without a
scheduler block.

Timing: DeepSpeed sets the scheduler's initial learning rate at construction and calls
`scheduler.step()` after each optimizer step, so optimizer step `c` (optax's `count`, from 0) runs with
the scheduler's value at `last_batch_iteration = c - 1`. `ds_schedule` gives the value at an iteration;
`optax_schedule` applies this shift. Hugging Face's `LambdaLR` schedules run step `c` at `lambda(c)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

# ---------------------------------------------------------------------------------------------------------
# Parameter tables: DeepSpeed's (or torch's) constructor defaults. `None` marks a required parameter.

_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True,
         "adam_w_mode": True, "torch_adam": False, "amsgrad": False, "fused": None, "capturable": False,
         "foreach": None}
OPTIMIZER_PARAMS: dict[str, dict[str, Any]] = {
    "adam": _ADAM,
    "adamw": _ADAM,
    "lamb": {"lr": 1e-3, "bias_correction": True, "betas": (0.9, 0.999), "eps": 1e-8, "eps_inside_sqrt": False,
             "weight_decay": 0.0, "max_grad_norm": 0.0, "max_coeff": 10.0, "min_coeff": 0.01, "amsgrad": False},
    "lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
    "adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0, "amsgrad": False, "lr_decay": 0.0,
                "initial_accumulator_value": 0.0},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
            "maximize": False},
}
OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "lion": "Lion", "adagrad": "Adagrad",
                   "sgd": "SGD"}
# Older or implementation-specific spellings of the same update rule.
OPTIMIZER_ALIASES = {"deepspeed_adam": "adam", "fusedadam": "adam", "deepspeedcpuadam": "adam", "cpuadam": "adam",
                     "fusedlamb": "lamb", "fusedlion": "lion", "deepspeedcpulion": "lion",
                     "deepspeedcpuadagrad": "adagrad", "cpuadagrad": "adagrad"}
_WARMUP = {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000, "warmup_type": "log"}
SCHEDULER_PARAMS: dict[str, dict[str, Any]] = {
    "WarmupLR": _WARMUP,
    "WarmupDecayLR": {**_WARMUP, "warmup_max_lr": 0.001, "total_num_steps": None},
    "WarmupCosineLR": {"total_num_steps": None, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                       "cos_min_ratio": 1e-4, "warmup_type": "log"},
    "OneCycle": {"cycle_min_lr": None, "cycle_max_lr": None, "decay_lr_rate": 0.0, "cycle_first_step_size": 2000,
                 "cycle_second_step_size": None, "cycle_first_stair_count": 0, "cycle_second_stair_count": None,
                 "decay_step_size": 0, "cycle_momentum": True, "cycle_min_mom": 0.8, "cycle_max_mom": 0.9,
                 "decay_mom_rate": 0.0},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000, "lr_range_test_step_rate": 1.0,
                    "lr_range_test_staircase": False},
}
_OPTIONAL = {"warmup_max_lr", "cycle_second_step_size", "cycle_second_stair_count", "fused", "foreach"}
_INTS = {"warmup_num_steps", "total_num_steps", "cycle_first_stair_count", "cycle_second_stair_count",
         "lr_range_test_step_size"}
_BOOLS = {"bias_correction", "adam_w_mode", "torch_adam", "amsgrad", "eps_inside_sqrt", "nesterov", "maximize",
          "cycle_momentum", "lr_range_test_staircase", "capturable"}
_UNSUPPORTED_TRUE = {"amsgrad": "AMSGrad is not supported (DeepSpeed's fused optimizers reject it too)",
                     "maximize": "maximize=True is not supported; negate the loss"}


def canonical_optimizer(name: Any) -> str | None:
    """The key of `OPTIMIZER_PARAMS` that `name` (any case, or an alias) denotes, or None."""
    if not isinstance(name, str):
        return None
    low = name.lower()
    return low if low in OPTIMIZER_PARAMS else OPTIMIZER_ALIASES.get(low)


def check_params(kind: str, name: str, params: Any, table: Mapping[str, Any], problems: list[str]) -> dict:
    """`params` with defaults filled and types checked against `table`; problems name `kind.params.key`.
    Numbers come back as the update uses them: counts as int, everything else as float (an int
    hyperparameter would become an int32 array inside optax)."""
    from zerojax.config.errors import MAX_LISTED, key_text, listed, shown
    from zerojax.config.keys import UNRESOLVED, did_you_mean

    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.append(f"{kind}.params must be an object, got {type(params).__name__}.")
        return dict(table)
    out = dict(table)
    unresolved = {k for k, v in params.items() if v is UNRESOLVED}
    typos = [k for k in params if k not in table]
    if len(typos) > MAX_LISTED:
        problems.append(f"{kind}.params has {len(typos):,} keys that are not parameters of {name}: {listed(typos)}; "
                        f"it accepts {sorted(table)} — fix or remove them.")
    else:
        problems.extend(f"{kind}.params.{key_text(k)} is not a parameter of {name}{did_you_mean(k, table)}; it "
                        f"accepts {sorted(table)}." for k in typos)
    for key, value in params.items():
        path = f"{kind}.params.{key_text(key)}"
        if key not in table:
            continue
        if key in unresolved:
            continue
        bad = _param_problem(key, value)
        if bad:
            hint = ' ("auto" needs training_args to resolve it)' if value == "auto" else ""
            problems.append(f"{path}={shown(value)} is invalid: it must be {bad}{hint}.")
            continue
        if key in _UNSUPPORTED_TRUE and value:
            problems.append(f"{path}=true: {_UNSUPPORTED_TRUE[key]}.")
            continue
        out[key] = _typed(key, value)
    for key, default in table.items():
        if default is None and out[key] is None and key not in _OPTIONAL | unresolved:
            problems.append(f"{kind}.params.{key} is required by {name}; add it.")
    return out


def _typed(key: str, value: Any) -> Any:
    """A valid parameter value as the optimizer or schedule uses it: betas a float pair, counts int, other
    numbers float; booleans, strings and None unchanged."""
    if key == "betas":
        return tuple(float(b) for b in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return int(value) if key in _INTS else float(value)


def _param_problem(key: str, value: Any) -> str | None:
    if key in _OPTIONAL and value is None:
        return None
    if key in _BOOLS:
        return None if isinstance(value, bool) else "true or false"
    if key == "warmup_type":
        return None if value in ("log", "linear") else "'log' or 'linear'"
    if key == "betas":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
        return None if ok else "a list of two numbers in [0, 1)"
    if key in ("fused", "foreach"):
        return None if isinstance(value, bool) else "true, false or null"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "a finite number"
    if key in _INTS and (value != int(value) or abs(value) >= 2**31):
        return "an integer below 2**31"
    if key in ("warmup_num_steps", "lr_range_test_step_size", "cycle_first_step_size") and value <= 0:
        return "> 0"
    if key not in ("decay_lr_rate", "decay_mom_rate", "lr_range_test_step_rate") and value < 0:
        return ">= 0"
    return None


# ---------------------------------------------------------------------------------------------------------
# Schedules


def as_float(x):
    """`x` as a float array of the default float width (float64 under `jax.enable_x64`)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _warmup_gamma(it, n: int, warmup_type: str):
    """DeepSpeed's warmup fraction at iteration `it` < n: ln(it+1)/ln(n) (log) or it/n (linear)."""
    if warmup_type == "log":
        return jnp.log(jnp.maximum(it + 1, 1.0)) / math.log(n)
    return it / n


def ds_schedule(name: str, params: Mapping[str, Any], base_lr: float) -> Callable:
    """`lr(iteration)` of DeepSpeed scheduler `name` for iterations >= -1 (-1: the constructor's value).

    `params` are the scheduler's parameters with defaults filled (see `SCHEDULER_PARAMS`); `base_lr` is
    the optimizer's lr (WarmupLR's default `warmup_max_lr`, WarmupCosineLR's base).
    """
    p = dict(params)
    if name in ("WarmupLR", "WarmupDecayLR"):
        lo = p["warmup_min_lr"]
        hi = base_lr if p["warmup_max_lr"] is None else p["warmup_max_lr"]
        n = max(2, p["warmup_num_steps"])
        total = p.get("total_num_steps")

        def warmup(it):
            it = as_float(it)
            gamma = jnp.where(it < n, _warmup_gamma(it, n, p["warmup_type"]), 1.0)
            if name == "WarmupDecayLR":
                gamma = jnp.where(it < n, gamma, jnp.maximum(0.0, (total - it) / max(1.0, total - n)))
            return jnp.where(it < 0, lo, lo + (hi - lo) * gamma)

        return warmup
    if name == "WarmupCosineLR":
        n = max(2, p["warmup_num_steps"])
        total, wmin, cmin = p["total_num_steps"], p["warmup_min_ratio"], p["cos_min_ratio"]

        def cosine(it):
            it = as_float(it)
            warm = wmin + _warmup_gamma(it, n, p["warmup_type"]) * (1.0 - wmin)
            progress = jnp.minimum(1.0, (it - n + 1) / max(1, total - n))
            decay = jnp.maximum(0.0, cmin + (1.0 - cmin) * (1 + jnp.cos(math.pi * progress)) / 2)
            return jnp.where(it < 0, 0.0, base_lr * jnp.where(it < n, warm, decay))

        return cosine
    if name == "OneCycle":
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
    if name == "LRRangeTest":
        lo, size, rate = p["lr_range_test_min_lr"], p["lr_range_test_step_size"], p["lr_range_test_step_rate"]
        stairs = p["lr_range_test_staircase"]

        def range_test(it):
            interval = (as_float(it) + 1) / size
            return lo * (1 + rate * (jnp.floor(interval) if stairs else interval))

        return range_test
    raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULER_PARAMS)}.")


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


# ---------------------------------------------------------------------------------------------------------
# Update rules optax does not have in DeepSpeed's form


def scale_by_adam_uncorrected(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's m / (sqrt(v) + eps) without bias correction (FusedAdam `bias_correction: false`)."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(init, update)


def scale_by_ds_lamb(b1: float, b2: float, eps: float, eps_inside_sqrt: bool, weight_decay: float,
                     bias_correction: bool, max_coeff: float, min_coeff: float) -> optax.GradientTransformation:
    """DeepSpeed FusedLamb's direction: u = m / denom + wd·p (m, v not bias-corrected), scaled by the
    per-tensor trust ratio ‖p‖/‖u‖ clamped to [min_coeff, max_coeff] (1 if either norm is 0) and by
    sqrt(1 − b2^t) / (1 − b1^t) when `bias_correction`."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Lamb needs the parameters: call update(grads, state, params).")
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else 1.0
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)

        def direction(m, v, p):
            denom = jnp.sqrt(v + eps) if eps_inside_sqrt else jnp.sqrt(v) + eps
            u = m / denom + weight_decay * p
            w_norm, u_norm = jnp.linalg.norm(p.ravel()), jnp.linalg.norm(u.ravel())
            ok = (w_norm != 0) & (u_norm != 0)
            coeff = jnp.where(ok, jnp.clip(w_norm / jnp.where(ok, u_norm, 1.0), min_coeff, max_coeff), 1.0)
            return step * coeff * u

        return jax.tree.map(direction, mu, nu, params), optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


class AdagradState(NamedTuple):
    """Adagrad's running sum of squared gradients."""

    sum_of_squares: Any


def scale_by_torch_adagrad(eps: float) -> optax.GradientTransformation:
    """torch/DeepSpeed Adagrad: g / (sqrt(Σ g²) + eps), the sum starting at 0 (optax's starts at 0.1)."""

    def init(params):
        return AdagradState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        acc = jax.tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates)
        return jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, acc), AdagradState(acc)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------------------
# Building the optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A validated DeepSpeed `optimizer` block: canonical `type` and parameters with defaults filled."""

    type: str
    params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """A validated DeepSpeed `scheduler` block."""

    type: str
    params: Mapping[str, Any]


def _optimizer(kind: str, learning_rate, b1, b2, eps, weight_decay, momentum, flags: tuple,
               mask) -> optax.GradientTransformation:
    """The update rule `kind` with (possibly scheduled) hyperparameters; `flags` holds the booleans."""
    f = dict(flags)
    decay = optax.add_decayed_weights(weight_decay, mask)
    if kind in ("adam", "adamw"):
        moments = optax.scale_by_adam(b1, b2, eps) if f["bias_correction"] else scale_by_adam_uncorrected(b1, b2, eps)
        decoupled = kind == "adamw" or f["adam_w_mode"]
        parts = (moments, decay) if decoupled else (decay, moments)
        return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))
    if kind == "lamb":
        return optax.chain(
            scale_by_ds_lamb(b1, b2, eps, f["eps_inside_sqrt"], weight_decay, f["bias_correction"],
                             f["max_coeff"], f["min_coeff"]),
            optax.scale_by_learning_rate(learning_rate),
        )
    if kind == "lion":
        return optax.lion(learning_rate, b1, b2, weight_decay=weight_decay, mask=mask)
    if kind == "adagrad":
        return optax.chain(decay, scale_by_torch_adagrad(eps), optax.scale_by_learning_rate(learning_rate))
    if kind == "sgd":
        return optax.chain(decay, optax.sgd(learning_rate, momentum or None, nesterov=f["nesterov"]))
    raise ValueError(f"unknown optimizer {kind!r}")


def build_optimizer(spec: OptimizerSpec, schedule: optax.Schedule | None = None,
                    beta1_schedule: optax.Schedule | None = None, beta2: float | None = None,
                    weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """The optax optimizer of `spec`, its learning rate from `schedule` (else the constant `lr`).

    Hyperparameters are injected (`optax.inject_hyperparams`), so `opt_state.hyperparams` holds the
    learning rate of the step just taken. `beta1_schedule`/`beta2` override the betas (OneCycle's
    momentum cycle). `weight_decay_mask` selects the parameters that decay (optax mask semantics).
    """
    p = dict(spec.params)
    kind = spec.type
    b1, b2 = p.get("betas", (0.9, 0.999))
    flags = tuple(sorted((k, p[k]) for k in ("bias_correction", "adam_w_mode", "eps_inside_sqrt", "nesterov",
                                              "max_coeff", "min_coeff") if k in p))
    factory = optax.inject_hyperparams(_optimizer, static_args=("kind", "flags", "mask", "momentum"))
    return factory(
        kind=kind, learning_rate=schedule if schedule is not None else p["lr"],
        b1=beta1_schedule if beta1_schedule is not None else b1, b2=beta2 if beta2 is not None else b2,
        eps=p.get("eps", 1e-8), weight_decay=p.get("weight_decay", 0.0), momentum=p.get("momentum", 0.0),
        flags=flags, mask=weight_decay_mask,
    )


def check_optimizer(block: Any, problems: list[str]) -> OptimizerSpec | None:
    """The `optimizer` block validated: known type, known parameters, DeepSpeed's defaults filled."""
    if block is None:
        return None
    if not isinstance(block, dict):
        problems.append(f"optimizer must be an object with 'type' and 'params', got {type(block).__name__}.")
        return None
    _extra_keys("optimizer", block, problems)
    kind = canonical_optimizer(block.get("type"))
    if kind is None:
        from zerojax.config.errors import shown

        supported = ", ".join(OPTIMIZER_NAMES.values())
        problems.append(
            f"optimizer.type={shown(block.get('type'))} is not supported; use one of {supported} (case-insensitive)."
        )
        return None
    params = check_params("optimizer", OPTIMIZER_NAMES[kind], block.get("params"), OPTIMIZER_PARAMS[kind], problems)
    if kind == "lamb" and params["max_grad_norm"]:
        problems.append(
            f"optimizer.params.max_grad_norm={params['max_grad_norm']!r}: Lamb's internal clipping is not "
            "supported; set it to 0 and use the top-level gradient_clipping."
        )
    if kind == "sgd" and params["dampening"]:
        problems.append("optimizer.params.dampening must be 0: SGD dampening is not supported.")
    if kind == "adagrad" and (params["lr_decay"] or params["initial_accumulator_value"]):
        problems.append("optimizer.params.lr_decay and initial_accumulator_value must be 0 for Adagrad.")
    return OptimizerSpec(kind, params)


def check_scheduler(block: Any, problems: list[str]) -> SchedulerSpec | None:
    """The `scheduler` block validated: known type, known parameters, defaults filled."""
    if block is None:
        return None
    if not isinstance(block, dict):
        problems.append(f"scheduler must be an object with 'type' and 'params', got {type(block).__name__}.")
        return None
    _extra_keys("scheduler", block, problems)
    kind = block.get("type")
    if not isinstance(kind, str) or kind not in SCHEDULER_PARAMS:
        from zerojax.config.errors import shown
        from zerojax.config.keys import did_you_mean

        near = did_you_mean(kind, SCHEDULER_PARAMS) if isinstance(kind, str) else ""
        problems.append(f"scheduler.type={shown(kind)} is not supported{near}; use one of {sorted(SCHEDULER_PARAMS)}.")
        return None
    params = check_params("scheduler", kind, block.get("params"), SCHEDULER_PARAMS[kind], problems)
    return SchedulerSpec(kind, params)


def _extra_keys(kind: str, block: dict, problems: list[str]) -> None:
    """A problem naming the keys of an optimizer/scheduler block other than 'type' and 'params'."""
    from zerojax.config.errors import listed

    extra = sorted(set(block) - {"type", "params"})
    if extra:
        problems.append(f"{kind} has keys {listed(extra)}; it takes only 'type' and 'params' — remove the others.")
