"""Resolving "auto" (Hugging Face Trainer / Accelerate rules) and the three batch sizes (DeepSpeed's rules).

A value "auto" is filled from `TrainingArguments` or the model's hidden size. An explicit value that
disagrees with `TrainingArguments` is a problem naming both sides; all problems are reported together
by the caller. When `TrainingArguments` are given and no batch size is written explicitly, absent
batch-size keys are filled from them, as the Transformers integration once did.
"""

from __future__ import annotations

import copy
from typing import Any

from zerojax.args import TrainingArguments
from zerojax.config.errors import shown
from zerojax.config.keys import TOP, UNRESOLVED, ZERO, by_name, spelled

AUTO = "auto"
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


# The names Hugging Face config classes store their hidden size under, by `model_type`: each class's
# `attribute_map["hidden_size"]` (transformers 5.25, `PretrainedConfig.attribute_map`), so that a
# config.json dict resolves as the config object would (`GPT2Config().hidden_size` reads `n_embd`).
# zerojax does not import transformers; tests/test_args_hf.py checks this table against it.
_ALIASES_BY_NAME = {
    "d_model": (
        "autoformer bart bigbird_pegasus blenderbot blenderbot-small conditional_detr d_fine dbrx "
        "deformable_detr deimv2 detr fsmt funnel grounding-dino informer led longt5 m2m_100 marian mbart "
        "mm-grounding-dino mpt mt5 mvp nllb-moe patchtsmixer patchtst pegasus pegasus_x plbart pop2piano "
        "pp_doclayout_v2 pp_doclayout_v3 pp_formulanet_text qwen2_5_omni_audio_encoder qwen2_audio_encoder "
        "qwen3_asr_encoder qwen3_omni_moe_audio_encoder rt_detr rt_detr_v2 speech_to_text switch_transformers "
        "t5 table-transformer time_series_transformer trocr udop umt5 whisper xglm xlnet"
    ),
    "n_embd": "codegen ctrl gpt-sw3 gpt2 gpt_bigcode gptj imagegpt openai-gpt",
    "dim": "distilbert",
    "emb_dim": "flaubert xlm",
    "hidden_dim": "granite_speech_encoder granite_speech_plus_encoder mask2former oneformer",
    "embed_dim": "idefics_vision kosmos_2_5_text_model kosmos_2_text_model swin2sr",
    "text_hidden_size": "inkling_audio",
    "mask_feature_size": "maskformer",
}
HIDDEN_SIZE_ALIASES: dict[str, str] = {t: name for name, types in _ALIASES_BY_NAME.items() for t in types.split()}
# Read when a dict has no (known) model_type: names only a hidden size goes by.
_GENERIC = ("n_embd", "d_model")
# Sub-configs holding the language model, searched after the top level (Transformers reads text_config).
SUB_CONFIGS = ("text_config", "llm_config", "language_config", "decoder")


def hidden_size(model_config: Any) -> int | None:
    """The model's hidden size as Transformers' DeepSpeed integration reads it from a config object:
    `hidden_size` (through the class's alias: `n_embd` for GPT-2, `d_model` for T5, ...), else
    max(`hidden_sizes`), else the same inside `text_config` (then `llm_config`, `language_config`,
    `decoder`). Works on a config.json dict or a config object."""
    for node in (model_config, *(_get(model_config, k) for k in SUB_CONFIGS)):
        if node is None or not (isinstance(node, dict) or hasattr(node, "__dict__")):
            continue
        model_type = _get(node, "model_type")
        names = ["hidden_size"]
        if isinstance(model_type, str) and model_type in HIDDEN_SIZE_ALIASES:
            names.append(HIDDEN_SIZE_ALIASES[model_type])
        else:
            names += _GENERIC
        for name in names:
            value = _get(node, name)
            if _positive(value):
                return value
        sizes = _get(node, "hidden_sizes")
        if isinstance(sizes, (list, tuple)) and sizes and all(_positive(v) for v in sizes):
            return max(sizes)
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31


def resolve_auto(
    raw: dict,
    args: TrainingArguments | None,
    model_config: Any,
    world_size: int,
    hints: dict,
    problems: list[str],
) -> dict:
    """A copy of `raw` with every resolvable "auto" filled; mismatches and unresolvable "auto" → `problems`."""
    config = copy.deepcopy(raw)
    _resolve_hidden_size(config, model_config, problems)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        name = spelled(zero, ZERO, "stage3_gather_16bit_weights_on_model_save")
        if zero.get(name) == AUTO:  # Accelerate fills it from zero3_save_16bit_model (default False)
            zero[name] = bool(hints.get("zero3_save_16bit_model") or False)
    fill_batch = args is not None and all(config.get(k, AUTO) == AUTO for k in _BATCH_KEYS)
    for canonical, value, source in _from_args(config, args, world_size):
        node, key, path = _node(config, canonical)
        if node is None:
            continue
        if key not in node and path in _BATCH_KEYS and fill_batch:
            node[key] = value
        elif node.get(key) == AUTO:
            if value is None:
                problems.append(f'{path} is "auto" but {source}; write a value instead of "auto".')
                node[key] = UNRESOLVED
            else:
                node[key] = value
        elif value is not None and source.startswith("TrainingArguments") and key in node:
            if not _same(node[key], value):
                problems.append(
                    f"{path}={shown(node[key])} in the config but {source} gives {value!r}; make them agree "
                    f'or set {path} to "auto".'
                )
    return config


def resolve_batch(train: int | None, micro: int | None, gas: int | None, world_size: int,
                  problems: list[str]) -> tuple[int, int, int]:
    """(train_batch_size, micro batch per device, accumulation steps) by DeepSpeed's rules for `world_size`."""
    if train is not None and micro is not None and gas is None:
        gas = train // (micro * world_size) or 1
    elif train is not None and gas is not None and micro is None:
        micro = train // (gas * world_size) or 1
    elif train is None and micro is not None:
        gas = gas or 1
        train = micro * gas * world_size
    elif train is not None and micro is None and gas is None:
        gas, micro = 1, train // world_size or 1
    elif train is None and micro is None:
        problems.append(
            "neither train_batch_size nor train_micro_batch_size_per_gpu is set; set one (or both with "
            "gradient_accumulation_steps), or pass training_args to fill them."
        )
        return 1, 1, 1
    if train != micro * gas * world_size:
        problems.append(
            f"train_batch_size={train} != train_micro_batch_size_per_gpu={micro} × gradient_accumulation_steps="
            f"{gas} × world size {world_size}; DeepSpeed requires equality — fix one of them or use \"auto\"."
        )
    return train, micro, gas


def _from_args(config: dict, args: TrainingArguments | None, world_size: int):
    """(config path, value, where it comes from) for every key "auto" can fill."""
    if args is None:
        need = "no training_args were given (pass TrainingArguments, or --args in the CLI)"
        for path in (*_BATCH_KEYS, "gradient_clipping", "optimizer.params.lr", "optimizer.params.betas",
                     "optimizer.params.eps", "optimizer.params.weight_decay", "scheduler.params.warmup_max_lr",
                     "scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps", "fp16.enabled",
                     "bf16.enabled"):
            yield path, None, need
        yield "scheduler.params.warmup_min_lr", 0, "fill"
        return
    total = args.total_steps(world_size)
    ta = "TrainingArguments"
    yield "train_micro_batch_size_per_gpu", args.per_device_train_batch_size, f"{ta}.per_device_train_batch_size"
    yield "gradient_accumulation_steps", args.gradient_accumulation_steps, f"{ta}.gradient_accumulation_steps"
    yield ("train_batch_size", world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
           f"{ta} world_size × per_device_train_batch_size × gradient_accumulation_steps")
    yield "gradient_clipping", args.max_grad_norm, f"{ta}.max_grad_norm"
    yield "optimizer.params.lr", args.learning_rate, f"{ta}.learning_rate"
    yield "optimizer.params.betas", [args.adam_beta1, args.adam_beta2], f"{ta}.adam_beta1/adam_beta2"
    yield "optimizer.params.eps", args.adam_epsilon, f"{ta}.adam_epsilon"
    yield "optimizer.params.weight_decay", args.weight_decay, f"{ta}.weight_decay"
    yield "scheduler.params.warmup_min_lr", 0, "fill"
    yield "scheduler.params.warmup_max_lr", args.learning_rate, f"{ta}.learning_rate"
    if total is None:
        need = "TrainingArguments set neither max_steps nor train_dataset_size"
        yield "scheduler.params.total_num_steps", None, need
        yield "scheduler.params.warmup_num_steps", None, need
    else:
        yield "scheduler.params.total_num_steps", total, f"{ta} total steps"
        yield "scheduler.params.warmup_num_steps", max(1, args.warmup_steps_for(total)), f"{ta}.warmup_steps"
    yield "fp16.enabled", args.fp16, f"{ta}.fp16"
    yield "bf16.enabled", args.bf16, f"{ta}.bf16"


def _resolve_hidden_size(config: dict, model_config: Any, problems: list[str]) -> None:
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    names = by_name(ZERO)
    stage3 = zero.get("stage") in (3, AUTO)  # "auto" may choose stage 3
    autos = {names[k].name: k for k, v in zero.items() if v == AUTO and k in names}
    sized = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    wanted = [n for n in sized if n in autos]
    if not wanted:
        return
    h = hidden_size(model_config) if model_config is not None else None
    for name in wanted:
        spelled = autos[name]
        if name != "reduce_bucket_size" and not stage3:
            zero[spelled] = names[name].default  # a stage-3 knob at stage < 3: the default, no effect
        elif h is None:
            problems.append(
                f'zero_optimization.{spelled} is "auto" but the model\'s hidden size is unknown; pass '
                "model_config (a Hugging Face config: hidden_size or its alias such as n_embd or d_model, "
                "hidden_sizes, or text_config), or --hidden-size / --model-config, or write a value."
            )
            zero[spelled] = UNRESOLVED
        else:
            zero[spelled] = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                             "stage3_param_persistence_threshold": 10 * h}[name]


def _node(config: dict, path: str) -> tuple[dict | None, str, str]:
    """The dict holding the last key of `path` (None if there is none), that key, and `path` as the config
    spells it (a top-level block may be written by its old name, `bfloat16` for `bf16`)."""
    first, *rest = path.split(".")
    if rest and first in by_name(TOP):
        first = spelled(config, TOP, first)
    *parents, key = [first, *rest]
    node: Any = config
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), key, ".".join((*parents, key))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return False


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
