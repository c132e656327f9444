"""Import: a Hugging Face safetensors folder read straight into sharded parameters.

Every parameter is built with `jax.make_array_from_callback`: each addressable device's callback
reads exactly its slice from the safetensors files (safetensors slicing; stacked layers read one
layer's slice per layer), so a process reads only what its devices hold and the whole model never
exists on one host.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from zerojax import models
from zerojax.hf import files
from zerojax.hf.mapping import HFTensor, TensorMap, expand, leaves_by_path, path_str
from zerojax.plan import ZeroPlan
from zerojax.precision import dtype_of

# Buffers some checkpoints carry that are not parameters (rotary tables, GPT-2's causal-mask buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def read_config(hf_dir: str | Path) -> dict:
    """The folder's `config.json` as a dict."""
    path = Path(hf_dir) / files.CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir}: no {files.CONFIG}; a Hugging Face model folder needs one.")
    return json.loads(path.read_text())


def resolve_map(arch: str | TensorMap | None, config: dict) -> TensorMap:
    """The tensor map for `arch`: a map function, a supported `model_type`, or (None) the config's."""
    if callable(arch):
        return arch
    if arch is None:
        return models.tensor_map(config)
    return models.tensor_map({"model_type": arch})


def load_pretrained(
    hf_dir: str | Path,
    target: ZeroPlan | Any,
    dtype="fp32",
    *,
    arch: str | TensorMap | None = None,
) -> Any:
    """Reads the Hugging Face folder `hf_dir` into parameters placed in their target shardings.

    `target` is a `ZeroPlan` (its `param_shardings` and parameter shapes are used) or a tree of
    `NamedSharding`s shaped like the model's `nnx.Param` state (shapes then come from the model that
    `config.json` describes). Tensors are cast to `dtype`. Returns a tree with `target`'s structure
    (for a plan: its parameter tree), e.g. an `nnx.State` to `nnx.merge` or hand to `init_state`.
    Raises naming the tensor when one is missing, unexpected (misnamed) or of the wrong shape.
    """
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    tensor_map = resolve_map(arch, config)
    dtype = dtype_of(dtype)
    if isinstance(target, ZeroPlan):
        shardings = target.param_shardings
        shapes = {p: tuple(x.shape) for p, x in leaves_by_path(target.abstract_params).items()}
    else:
        shardings = target
        if callable(arch):
            raise ValueError("load_pretrained: with a custom arch map pass a ZeroPlan as target (it gives the shapes).")
        shapes = {p: tuple(x.shape) for p, x in leaves_by_path(models.abstract_model(config)[1]).items()}
        missing = sorted(set(shapes) - set(leaves_by_path(shardings)))
        if missing:
            raise ValueError(f"load_pretrained: target has no sharding for parameters {missing}; pass the model's full param shardings.")
    by_path = leaves_by_path(shardings)
    unknown = sorted(set(by_path) - set(shapes))
    if unknown:
        raise ValueError(
            f"load_pretrained: target parameters {unknown} are not in the model that {files.CONFIG} "
            "describes; build the target from the same config."
        )
    tensors = expand(tensor_map, {p: shapes[p] for p in by_path})
    wmap = files.weight_map(hf_dir)
    absent = sorted({f for f in wmap.values() if not (hf_dir / f).is_file()})
    if absent:
        raise FileNotFoundError(
            f"load_pretrained: the weight files {absent} of {hf_dir} are missing; pass a complete "
            "checkpoint folder."
        )
    names = _match_names(tensors, wmap, config, hf_dir)

    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def sliced(t: HFTensor):
            fname = wmap[names[t.name]]
            if fname not in handles:
                handles[fname] = stack.enter_context(safe_open(hf_dir / fname, framework="flax"))
            return handles[fname].get_slice(names[t.name])

        for t in tensors:
            if t.to_hf is not None:
                raise ValueError(
                    f"load_pretrained: tensor {t.name!r} uses a to_hf transform, which import cannot invert; "
                    "use layer/transpose maps for import."
                )
            file_shape = tuple(sliced(t).get_shape())
            want = t.shape(shapes[t.path])
            if file_shape != want:
                raise ValueError(
                    f"load_pretrained: tensor {t.name!r} in {wmap[names[t.name]]} has shape {file_shape}, but the "
                    f"model from {files.CONFIG} expects {want} (parameter {t.path!r}); the checkpoint and "
                    "config.json disagree."
                )
        grouped: dict[str, list[HFTensor]] = {}
        for t in tensors:
            grouped.setdefault(t.path, []).append(t)

        def build(kp, sharding):
            path = path_str(kp)
            return _make_array(grouped[path], shapes[path], sharding, dtype, sliced)

        return jax.tree_util.tree_map_with_path(build, shardings)


def _match_names(tensors: list[HFTensor], wmap: dict[str, str], config: dict, hf_dir: Path) -> dict[str, str]:
    """`{expected name: name in the files}`: exact, or without the base-model prefix (`model.`,
    `transformer.`) that checkpoints of headless models lack. Raises on missing or unexpected tensors."""
    names, missing = {}, []
    for t in tensors:
        short = t.name.split(".", 1)[-1]
        if t.name in wmap:
            names[t.name] = t.name
        elif short in wmap:
            names[t.name] = short
        else:
            missing.append(t.name)
    if missing:
        raise ValueError(
            f"load_pretrained: tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} missing from {hf_dir} "
            f"({len(missing)} missing); the checkpoint does not match the {config.get('model_type')} model its "
            f"{files.CONFIG} describes."
        )
    used = set(names.values())
    tied = bool(config.get("tie_word_embeddings", config.get("model_type") == "gpt2"))
    unexpected = [
        n for n in wmap
        if n not in used and not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight")
    ]
    if unexpected:
        raise ValueError(
            f"load_pretrained: unexpected tensor(s) {sorted(unexpected)[:5]} in {hf_dir}: no parameter of the "
            f"{config.get('model_type')} model maps to them (misnamed, or config.json describes another model)."
        )
    return names


def _make_array(tensors: list[HFTensor], shape: tuple, sharding, dtype: np.dtype, sliced) -> jax.Array:
    """One parameter, each device's block read from the files by its own callback."""
    stacked = tensors[0].layer is not None

    def read(t: HFTensor, index: tuple) -> np.ndarray:
        if t.transpose:
            index = (*index[:-2], index[-1], index[-2])
        x = np.asarray(sliced(t)[index]) if index else np.asarray(sliced(t)[:])
        return (np.swapaxes(x, -1, -2) if t.transpose else x).astype(dtype)

    def callback(index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        if not stacked:
            return read(tensors[0], index)
        by_layer = {t.layer: t for t in tensors}
        return np.stack([read(by_layer[i], index[1:]) for i in range(shape[0])[index[0]]])

    return jax.make_array_from_callback(shape, sharding, callback, dtype=dtype)
