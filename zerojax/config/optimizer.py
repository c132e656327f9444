"""DeepSpeed's `optimizer` and `scheduler` blocks: their parameters and defaults, validation, and the
optax optimizer a validated block denotes (`zerojax.optim.transforms`, `zerojax.optim.schedules`).

Optimizers: `Adam`/`AdamW` (FusedAdam: `"type": "Adam"` decouples weight decay unless
`adam_w_mode: false`; `AdamW` always does), `Lamb` (FusedLamb: trust ratio clamped to
[`min_coeff`, `max_coeff`], bias correction applied to the step size), `Lion`, `Adagrad`, `SGD`
(`torch.optim.SGD`). Schedulers: `WarmupLR`, `WarmupDecayLR`, `WarmupCosineLR`, `OneCycle` (with its
momentum cycle) and `LRRangeTest`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import optax

from zerojax.config.errors import MAX_LISTED, key_text, listed, shown
from zerojax.config.keys import UNRESOLVED, did_you_mean
from zerojax.optim.transforms import fused_adam, fused_lamb, torch_adagrad, torch_sgd

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
    if kind in ("adam", "adamw"):
        return fused_adam(learning_rate, b1, b2, eps, weight_decay, bias_correction=f["bias_correction"],
                          decoupled=kind == "adamw" or f["adam_w_mode"], mask=mask)
    if kind == "lamb":
        return fused_lamb(learning_rate, b1, b2, eps, weight_decay, eps_inside_sqrt=f["eps_inside_sqrt"],
                          bias_correction=f["bias_correction"], max_coeff=f["max_coeff"], min_coeff=f["min_coeff"])
    if kind == "lion":
        return optax.lion(learning_rate, b1, b2, weight_decay=weight_decay, mask=mask)
    if kind == "adagrad":
        return torch_adagrad(learning_rate, eps, weight_decay, mask=mask)
    if kind == "sgd":
        return torch_sgd(learning_rate, momentum, weight_decay, nesterov=f["nesterov"], mask=mask)
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
    block = _block("optimizer", block, problems)
    if block is None:
        return None
    kind = canonical_optimizer(block.get("type"))
    if kind is None:
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
    block = _block("scheduler", block, problems)
    if block is None:
        return None
    kind = block.get("type")
    if not isinstance(kind, str) or kind not in SCHEDULER_PARAMS:
        near = did_you_mean(kind, SCHEDULER_PARAMS) if isinstance(kind, str) else ""
        problems.append(f"scheduler.type={shown(kind)} is not supported{near}; use one of {sorted(SCHEDULER_PARAMS)}.")
        return None
    params = check_params("scheduler", kind, block.get("params"), SCHEDULER_PARAMS[kind], problems)
    return SchedulerSpec(kind, params)


def _block(kind: str, block: Any, problems: list[str]) -> dict | None:
    """An optimizer/scheduler block to read, or None when absent or not an object; a problem names a
    block that is not an object, and another the keys it has besides 'type' and 'params'."""
    if block is None:
        return None
    if not isinstance(block, dict):
        problems.append(f"{kind} must be an object with 'type' and 'params', got {type(block).__name__}.")
        return None
    extra = sorted(set(block) - {"type", "params"})
    if extra:
        problems.append(f"{kind} has keys {listed(extra)}; it takes only 'type' and 'params' — remove the others.")
    return block
