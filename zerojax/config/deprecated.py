"""DeepSpeed's deprecated spellings, read as the current ones with one warning each.

`bfloat16` → `bf16` and `stage3_gather_fp16_weights_on_model_save` →
`stage3_gather_16bit_weights_on_model_save` are old names in the key tables (`Key.old_names`): the config
keeps the user's spelling, so messages name the key as written. Rewritten here: `"zero_optimization":
true/false` → stage 1/0; `cpu_offload` → `offload_optimizer: {device: cpu}`; `cpu_offload_param` →
`offload_param: {device: cpu}`; `cpu_offload_use_pin_memory` (ignored, as in DeepSpeed);
`communication_data_type: "bfp16"` → `"bf16"`. Giving an old name together with its new name is an
error, as in DeepSpeed.
"""

from __future__ import annotations

import warnings

from zerojax.config.errors import ConfigDeprecationWarning, shown

_RENAMED_ZERO = {
    "stage3_gather_fp16_weights_on_model_save": ("stage3_gather_16bit_weights_on_model_save",
                                                 "gather_16bit_weights_on_model_save"),
}
_OFFLOAD_FLAGS = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}


def apply_deprecations(config: dict, problems: list[str]) -> dict:
    """`config` (modified in place and returned) with deprecated values rewritten; an old name together
    with its new name → `problems` (and the old one dropped)."""
    if "bfloat16" in config:
        if "bf16" in config:
            problems.append("bf16 and its deprecated name bfloat16 are both given; keep bf16 only.")
            config.pop("bfloat16")
        else:
            _warn("bfloat16", "bf16")
    if isinstance(config.get("zero_optimization"), bool):
        stage = int(config["zero_optimization"])
        _warn('"zero_optimization": true/false', f'"zero_optimization": {{"stage": {stage}}}')
        config["zero_optimization"] = {"stage": stage}
    comm = config.get("communication_data_type")
    if isinstance(comm, str) and comm.lower() == "bfp16":
        _warn('communication_data_type "bfp16"', '"bf16"')
        config["communication_data_type"] = "bf16"
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return config
    for old, new_names in _RENAMED_ZERO.items():
        if old in zero:
            if any(n in zero for n in new_names):
                problems.append(f"zero_optimization.{old} (deprecated) and {new_names[0]} are both given; keep "
                                f"{new_names[0]} only.")
                zero.pop(old)
            else:
                _warn(f"zero_optimization.{old}", new_names[0])
    for old, new in _OFFLOAD_FLAGS.items():
        if old not in zero:
            continue
        value = zero.pop(old)
        if not isinstance(value, bool):
            problems.append(f"zero_optimization.{old}={shown(value)} must be true or false (it is deprecated: use {new}).")
            continue
        if new in zero and value:
            problems.append(f"zero_optimization.{old} (deprecated) and {new} are both given; keep {new} only.")
            continue
        _warn(f"zero_optimization.{old}", f'zero_optimization.{new} = {{"device": "cpu"}}')
        if value:
            zero[new] = {"device": "cpu"}
    if "cpu_offload_use_pin_memory" in zero:
        zero.pop("cpu_offload_use_pin_memory")
        _warn("zero_optimization.cpu_offload_use_pin_memory", "pin_memory inside offload_optimizer/offload_param "
              "(the old key is ignored, as in DeepSpeed)")
    return config


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated in DeepSpeed; read as {new}.", ConfigDeprecationWarning, stacklevel=4)
