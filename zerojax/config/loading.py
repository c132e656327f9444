"""Reading a DeepSpeed config: a path, a dict, a base64 string or an Accelerate YAML, as a plain dict.

Files are JSON with the hjson conveniences DeepSpeed accepts (``//``, ``#`` and ``/* */`` comments,
trailing commas); duplicate keys are an error, as in DeepSpeed. An Accelerate config (YAML with
``distributed_type: DEEPSPEED``) is translated to the DeepSpeed dict Accelerate itself would build.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from zerojax.config.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


def read_source(source: Any) -> tuple[dict, dict]:
    """The config dict of `source`, and hints for "auto" from an Accelerate YAML (else empty)."""
    if isinstance(source, Mapping):
        return _check_keys(copy.deepcopy(dict(source)), "the config dict"), {}
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(source, os.PathLike) or os.path.exists(text):
            return read_file(Path(text))
        decoded = _decode_base64(text)
        if decoded is not None:
            return _check_keys(parse_text(decoded, "the base64 config"), "the base64 config"), {}
        if text.strip().endswith((".json", ".conf", ".yaml", ".yml")) or os.sep in text:
            return read_file(Path(text))
        raise ConfigError(
            f"load_config: {text[:60]!r} is neither an existing file nor a base64-encoded JSON object; pass "
            "the path of your ds_config.json, a dict, or base64 of the JSON text."
        )
    raise ConfigError(
        f"load_config: source of type {type(source).__name__} is not a config; pass a file path, a dict "
        "or a base64-encoded JSON string."
    )


def read_file(path: Path) -> tuple[dict, dict]:
    """The config dict in `path` (JSON/hjson, or an Accelerate YAML) and Accelerate's "auto" hints."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {str(path)!r}: {e.strerror or e}; check the path "
                          "(pass a ds_config.json file, or a dict).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the config file {str(path)!r} is not UTF-8 text; a DeepSpeed config is JSON.") from None
    if path.suffix.lower() in YAML_SUFFIXES:
        return accelerate_to_deepspeed(_parse_yaml(text, path), path)
    return _check_keys(parse_text(text, repr(str(path))), repr(str(path))), {}


def parse_text(text: str, where: str) -> dict:
    """JSON text, tolerating comments and trailing commas; the top level must be an object."""
    try:
        value = json.loads(strip_hjson(text), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1].strip() if 0 < e.lineno <= len(text.splitlines()) else ""
        raise ConfigError(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} ({line[:80]!r}). "
            "DeepSpeed configs are JSON (comments and trailing commas are accepted); quote string values "
            "and fill in template placeholders."
        ) from None
    except _Duplicate as e:
        raise ConfigError(f"{where} gives the key {e.args[0]!r} twice in one object; keep one of them.") from None
    except RecursionError:
        raise ConfigError(f"{where} nests objects too deeply to be a DeepSpeed config.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} holds a JSON {type(value).__name__}, but a DeepSpeed config is a JSON object.")
    return value


def strip_hjson(text: str) -> str:
    """`text` with comments removed and commas before a closing bracket dropped (strings untouched)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c in "]}":
            k = len(out) - 1
            while k >= 0 and out[k].isspace():
                k -= 1
            if k >= 0 and out[k] == ",":
                del out[k]
            out.append(c)
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def accelerate_to_deepspeed(doc: Any, path: Path) -> tuple[dict, dict]:
    """The DeepSpeed dict an Accelerate config describes, as Accelerate builds it, plus its "auto" hints."""
    if not isinstance(doc, dict) or "distributed_type" not in doc:
        raise ConfigError(
            f"{str(path)!r} is YAML but not an Accelerate config (no `distributed_type: DEEPSPEED`); a "
            "DeepSpeed config is a JSON file — pass that file, or an `accelerate config` YAML."
        )
    if str(doc["distributed_type"]).upper() != "DEEPSPEED":
        raise ConfigError(
            f"{str(path)!r}: distributed_type={doc['distributed_type']!r}; zerojax reads Accelerate configs "
            "with `distributed_type: DEEPSPEED`."
        )
    ds = doc.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        raise ConfigError(f"{str(path)!r}: deepspeed_config must be a mapping, got {type(ds).__name__}.")
    hints = {"zero3_save_16bit_model": ds.get("zero3_save_16bit_model")}
    if ds.get("deepspeed_config_file"):
        others = sorted(k for k in ds if k in _ACCELERATE_KEYS and k != "deepspeed_config_file")
        if others:
            raise ConfigError(
                f"{str(path)!r}: deepspeed_config_file is set together with {others}; Accelerate refuses "
                "this too — put those settings in the JSON file."
            )
        config, _ = read_file((path.parent / str(ds["deepspeed_config_file"])).resolve())
        return config, hints
    unknown = sorted(set(ds) - set(_ACCELERATE_KEYS))
    if unknown:
        raise ConfigError(
            f"{str(path)!r}: unknown deepspeed_config keys {unknown}; Accelerate knows {sorted(_ACCELERATE_KEYS)}."
        )
    zero: dict[str, Any] = {"stage": ds.get("zero_stage", 2)}
    for which in ("optimizer", "param"):
        device = ds.get(f"offload_{which}_device")
        if device is not None:
            zero[f"offload_{which}"] = {"device": device}
            if ds.get(f"offload_{which}_nvme_path") is not None:
                zero[f"offload_{which}"]["nvme_path"] = ds[f"offload_{which}_nvme_path"]
    if ds.get("zero3_save_16bit_model") is not None:
        zero["stage3_gather_16bit_weights_on_model_save"] = ds["zero3_save_16bit_model"]
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps", "auto"),
        "zero_optimization": zero,
    }
    if ds.get("gradient_clipping") is not None:
        config["gradient_clipping"] = ds["gradient_clipping"]
    precision = str(doc.get("mixed_precision", "no")).lower()
    if precision not in ("no", "fp16", "bf16"):
        raise ConfigError(
            f"{str(path)!r}: mixed_precision={doc.get('mixed_precision')!r} is not supported with DeepSpeed "
            "here; use 'no', 'fp16' or 'bf16'."
        )
    config["fp16"] = {"enabled": precision == "fp16"}
    config["bf16"] = {"enabled": precision == "bf16"}
    return config, hints


# Keys of an Accelerate config's `deepspeed_config` block (accelerate's DeepSpeedPlugin fields).
_ACCELERATE_KEYS = (
    "deepspeed_config_file", "zero_stage", "gradient_accumulation_steps", "gradient_clipping",
    "offload_optimizer_device", "offload_param_device", "offload_optimizer_nvme_path",
    "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "deepspeed_multinode_launcher",
    "deepspeed_hostfile", "deepspeed_exclusion_filter", "deepspeed_inclusion_filter", "transformer_moe_cls_names",
    "enable_msamp", "msamp_opt_level",
)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {e}.") from None


def _decode_base64(text: str) -> str | None:
    """The JSON object text `text` encodes in base64, or None when it is not one."""
    try:
        decoded = base64.b64decode(text.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return decoded if decoded.lstrip().startswith("{") else None


def _check_keys(tree: Any, where: str) -> dict:
    """Every mapping key in `tree` must be a string, as in JSON."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            bad = [k for k in node if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"{where}: key {bad[0]!r} is not a string; DeepSpeed config keys are strings.")
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return tree
