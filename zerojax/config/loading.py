"""Reading a DeepSpeed config: a path, a dict, a base64 string or an Accelerate YAML, as a plain dict.

Files are JSON with the hjson conveniences DeepSpeed accepts (``//``, ``#`` and ``/* */`` comments,
trailing commas); duplicate keys are an error, as in DeepSpeed. An Accelerate config (YAML with
``distributed_type: DEEPSPEED``) is translated to the DeepSpeed dict Accelerate itself would build.

Reading is bounded for any input: files and base64 strings up to `MAX_JSON_BYTES` (YAML, parsed in
pure Python: `MAX_YAML_BYTES`), YAML without aliases, and every config tree (a dict passed in
included) checked by `check_tree` before anything else walks it.
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

from zerojax.config.errors import ConfigError, key_text, listed, shown

YAML_SUFFIXES = (".yaml", ".yml")
MAX_JSON_BYTES = 256 * 1024  # real DeepSpeed configs are a few kB
MAX_YAML_BYTES = 16 * 1024  # real Accelerate configs are under 1 kB
MAX_DEPTH = 32  # real configs nest fewer than 10 levels
MAX_VALUES = 10_000  # real configs hold a few hundred values
_JSON_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


def read_source(source: Any) -> tuple[dict, dict]:
    """The config dict of `source`, and hints for "auto" from an Accelerate YAML (else empty)."""
    if isinstance(source, Mapping):
        return copy.deepcopy(check_tree(dict(source), "the config dict")), {}
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(source, os.PathLike) or os.path.exists(text):
            return read_file(Path(text))
        if len(text) > MAX_JSON_BYTES * 4 // 3:
            raise ConfigError(
                f"load_config: the string {text[:40]!r}... is {len(text):,} characters, neither an existing file "
                f"nor a base64 config of at most {MAX_JSON_BYTES // 1024} KiB; pass the path of your ds_config.json."
            )
        decoded = _decode_base64(text)
        if decoded is not None:
            return check_tree(parse_text(decoded, "the base64 config"), "the base64 config"), {}
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
    if path.suffix.lower() in YAML_SUFFIXES:
        doc = check_tree(_parse_yaml(read_text(path, MAX_YAML_BYTES), path), repr(str(path)))
        return accelerate_to_deepspeed(doc, path)
    return read_json_file(path), {}


def read_json_file(path: Path) -> dict:
    """The config dict in the JSON (or hjson) file `path`, checked by `check_tree`."""
    where = repr(str(path))
    return check_tree(parse_text(read_text(path, MAX_JSON_BYTES), where), where)


def read_text(path: Path, limit: int) -> str:
    """The UTF-8 text of the file `path`; a ConfigError when it is unreadable or longer than `limit` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot read the config file {str(path)!r}: {reason}; check the path "
                          "(pass a ds_config.json file, or a dict).") from None
    if len(data) > limit:
        raise ConfigError(
            f"the config file {str(path)!r} is larger than {limit // 1024} KiB, too large for a config of "
            "its kind (a few kB); point at the config file itself."
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the config file {str(path)!r} is not UTF-8 text; a DeepSpeed config is JSON.") from None


def parse_text(text: str, where: str) -> dict:
    """JSON text, tolerating comments and trailing commas; the top level must be an object."""
    try:
        value = json.loads(strip_hjson(text), object_pairs_hook=_no_duplicates, parse_int=int_of)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1].strip() if 0 < e.lineno <= len(text.splitlines()) else ""
        raise ConfigError(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} ({line[:80]!r}). "
            "DeepSpeed configs are JSON (comments and trailing commas are accepted); quote string values "
            "and fill in template placeholders."
        ) from None
    except _Duplicate as e:
        raise ConfigError(f"{where} gives the key {shown(e.args[0])} twice in one object; keep one of them.") from None
    except RecursionError:
        raise ConfigError(f"{where} nests objects and lists hundreds of levels deep; a config must nest at most "
                          f"{MAX_DEPTH} (DeepSpeed's nest a few) — remove the extra nesting.") from None
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
            f"{str(path)!r}: distributed_type={shown(doc['distributed_type'])}; zerojax reads Accelerate configs "
            "with `distributed_type: DEEPSPEED`."
        )
    ds = doc.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        raise ConfigError(f"{str(path)!r}: deepspeed_config must be a mapping, got {type(ds).__name__}.")
    hints = {"zero3_save_16bit_model": ds.get("zero3_save_16bit_model")}
    if ds.get("deepspeed_config_file"):
        others = [k for k in sorted(ds) if k in _ACCELERATE_KEYS and k != "deepspeed_config_file"]
        if others:
            raise ConfigError(
                f"{str(path)!r}: deepspeed_config_file is set together with {others}; Accelerate refuses "
                "this too — put those settings in the JSON file."
            )
        name = str(ds["deepspeed_config_file"])
        if name.lower().endswith(YAML_SUFFIXES):
            raise ConfigError(
                f"{str(path)!r}: deepspeed_config_file={shown(name)} is YAML; it must name the DeepSpeed JSON "
                "config (Accelerate hands it to DeepSpeed, which reads JSON) — point it at your ds_config.json."
            )
        return read_json_file((path.parent / name).resolve()), hints
    unknown = sorted(set(ds) - set(_ACCELERATE_KEYS))
    if unknown:
        raise ConfigError(
            f"{str(path)!r}: unknown deepspeed_config keys {listed(unknown)}; Accelerate knows "
            f"{sorted(_ACCELERATE_KEYS)} — fix or remove them."
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
            f"{str(path)!r}: mixed_precision={shown(doc.get('mixed_precision'))} is not supported with DeepSpeed "
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


class _Refused(Exception):
    """YAML that `_BoundedLoader` will not build; the message says where."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (a few hundred bytes of nested aliases expand to billions of
    values) and without nesting deeper than `MAX_DEPTH` (the composer recurses per level)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"line {line} uses the alias *{key_text(str(event.anchor))}; zerojax reads YAML "
                           "without aliases (they can expand to billions of values) — write the value out")
        if self.depth >= MAX_DEPTH:
            raise _Refused(f"line {line} nests more than {MAX_DEPTH} levels deep; an Accelerate config nests a "
                           "few levels — remove the extra nesting")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts from a string
            return int_of(node.value)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _Refused as e:
        raise ConfigError(f"{str(path)!r}: {e}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{str(path)!r} is not valid YAML: {getattr(e, 'problem', None) or shown(str(e))}{where}; "
                          "fix the YAML syntax.") from None


def int_of(text: str) -> int:
    """The integer `text` spells; past Python's limit on digits converted from a string, 10**(digits - 1)
    with its sign: as many digits, so `check_tree` refuses it and messages count them."""
    try:
        return int(text)
    except ValueError:
        digits = sum(c.isdigit() for c in text)
        return (-1 if text.lstrip().startswith("-") else 1) * 10 ** (digits - 1)


def _decode_base64(text: str) -> str | None:
    """The JSON object text `text` encodes in base64, or None when it is not one."""
    try:
        decoded = base64.b64decode(text.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return decoded if decoded.lstrip().startswith("{") else None


def check_tree(tree: Any, where: str) -> Any:
    """`tree` if it is JSON as a DeepSpeed config is: string keys, JSON types, integers within 64 bits,
    at most `MAX_DEPTH` levels and `MAX_VALUES` values (a shared value counted each time it appears);
    else a ConfigError naming the first offending key. Work is bounded by `MAX_VALUES`."""
    stack = [(tree, 0, None)]  # value, depth, its path as (parent path, key)
    count = 1
    while stack:
        node, depth, trail = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: {_path(trail)} nests more than {MAX_DEPTH} levels deep (or contains "
                              f"itself); a config must nest at most {MAX_DEPTH} (DeepSpeed's nest a few) — remove "
                              "the extra nesting.")
        if isinstance(node, dict):
            count += len(node)
            items = node.items()
        elif isinstance(node, (list, tuple)):
            count += len(node)
            items = enumerate(node)
        else:
            _check_leaf(node, trail, where)
            continue
        if count > MAX_VALUES:
            raise ConfigError(f"{where} holds more than {MAX_VALUES:,} values; a config must hold at most that "
                              "(DeepSpeed's hold a few hundred) — remove the extra entries.")
        for key, value in items:
            if isinstance(node, dict) and not isinstance(key, str):
                at = f" in {_path(trail)}" if trail else ""
                raise ConfigError(f"{where}: the key {shown(key)}{at} is not a string ({type(key).__name__}); "
                                  "DeepSpeed config keys are strings — quote it.")
            stack.append((value, depth + 1, (trail, key)))
    return tree


def _check_leaf(value: Any, trail, where: str) -> None:
    """A leaf of a config tree must be a JSON value, and an integer must fit in 64 bits."""
    if not isinstance(value, _JSON_TYPES):
        raise ConfigError(f"{where}: {_path(trail)}={shown(value)} is not a JSON value ({type(value).__name__}); "
                          "config values are objects, lists, strings, numbers, true/false or null — write it as one.")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where}: {_path(trail)}={shown(value)} is out of range: integers in a DeepSpeed config "
                          "fit in 64 bits (below 2**63) — write a smaller value.")


def _path(trail) -> str:
    """The dotted path (list items as [i]) of a `check_tree` trail, shortened to about 100 characters."""
    parts = []
    while trail is not None:
        trail, key = trail
        parts.append(f"[{key}]" if isinstance(key, int) else "." + key_text(key))
    path = "".join(reversed(parts)).lstrip(".") or "the top level"
    return path if len(path) <= 100 else path[:97] + "..."
