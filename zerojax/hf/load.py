"""Import: a Hugging Face safetensors folder read straight into sharded parameters.

Every parameter is built with `jax.make_array_from_callback`: each addressable device's callback
reads exactly its slice from the safetensors files (safetensors slicing; stacked layers read one
layer's slice per layer), so a process reads only what its devices hold and the whole model never
exists on one host. Before anything is read, every file is checked against the model: each tensor
present, of the expected shape and of a floating dtype for a floating parameter; a fault in any file
is an `HFFormatError` naming it (`zerojax.hf.files`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from zerojax import models
from zerojax.hf import files
from zerojax.hf.files import HFFormatError
from zerojax.hf.mapping import HFTensor, TensorMap, expand, leaves_by_path, path_str
from zerojax.plan import ZeroPlan
from zerojax.precision import dtype_of

# Buffers some checkpoints carry that are not parameters (rotary tables, GPT-2's causal-mask buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def read_config(hf_dir: str | Path) -> dict:
    """The folder's `config.json` as a dict, its sizes checked (`files.check_sizes`)."""
    path = Path(hf_dir) / files.CONFIG
    config = files.read_json(path)
    files.check_sizes(config, path)
    return config


@contextlib.contextmanager
def _describing_model(config_path: Path):
    """Turns an error from building the model that `config_path` describes into an `HFFormatError` naming it."""
    try:
        yield
    except HFFormatError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
        raise HFFormatError(f"{config_path}: {' '.join(str(e).split())[:500]} (correct config.json)") from None


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
    Raises an `HFFormatError` naming the file when one is missing, unreadable or malformed, or when a
    tensor is missing, unexpected (misnamed), of the wrong shape, or stored as integers for a floating
    parameter (or the reverse).
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / files.CONFIG
    config = read_config(hf_dir)
    with _describing_model(config_path) if arch is None else contextlib.nullcontext():
        tensor_map = resolve_map(arch, config)
    dtype = dtype_of(dtype)
    if isinstance(target, ZeroPlan):
        shardings, leaves = target.param_shardings, leaves_by_path(target.abstract_params)
    else:
        shardings = target
        if callable(arch):
            raise ValueError("load_pretrained: with a custom arch map pass a ZeroPlan as target (it gives the shapes).")
        with _describing_model(config_path):
            leaves = leaves_by_path(models.abstract_model(config)[1])
        missing = sorted(set(leaves) - set(leaves_by_path(shardings)))
        if missing:
            raise ValueError(f"load_pretrained: target has no sharding for parameters {missing}; pass the model's full param shardings.")
    by_path = leaves_by_path(shardings)
    unknown = sorted(set(by_path) - set(leaves))
    if unknown:
        raise ValueError(
            f"load_pretrained: target parameters {unknown} are not in the model that {files.CONFIG} "
            "describes; build the target from the same config."
        )
    shapes = {p: tuple(leaves[p].shape) for p in by_path}
    tensors = expand(tensor_map, shapes)
    wmap = files.weight_map(hf_dir)
    source = hf_dir / (files.INDEX if (hf_dir / files.INDEX).exists() else files.SINGLE)
    absent = sorted({f for f in wmap.values() if not (hf_dir / f).exists()})
    if absent:
        raise files.HFFileMissingError(
            f"{source}: the weight files {absent} it names are missing from {hf_dir}; pass a complete checkpoint folder."
        )
    names = _match_names(tensors, wmap, config, source)

    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def sliced(t: HFTensor):
            path = hf_dir / wmap[names[t.name]]
            with files.reading(path):
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(path, framework="flax"))
                return handles[path].get_slice(names[t.name])

        def fetch(t: HFTensor, index: tuple) -> np.ndarray:
            with files.reading(hf_dir / wmap[names[t.name]]):
                return np.asarray(sliced(t)[index] if index else sliced(t)[:])

        for t in tensors:
            if t.to_hf is not None:
                raise ValueError(
                    f"load_pretrained: tensor {t.name!r} uses a to_hf transform, which import cannot invert; "
                    "use layer/transpose maps for import."
                )
            _check_tensor(t, sliced(t), hf_dir / wmap[names[t.name]], leaves[t.path], config_path)
        grouped: dict[str, list[HFTensor]] = {}
        for t in tensors:
            grouped.setdefault(t.path, []).append(t)

        def build(kp, sharding):
            path = path_str(kp)
            return _make_array(grouped[path], shapes[path], sharding, dtype, fetch)

        return jax.tree_util.tree_map_with_path(build, shardings)


def _check_tensor(t: HFTensor, found, path: Path, leaf, config_path: Path) -> None:
    """Raises naming `path` unless the tensor `found` there has the shape the parameter `leaf` (a shape
    and dtype) of the model `config_path` describes needs, and is floating exactly when the parameter is."""
    shape, stored = tuple(found.get_shape()), found.get_dtype()
    want = t.shape(tuple(leaf.shape))
    if shape != want:
        raise HFFormatError(
            f"{path}: tensor {t.name!r} has shape {shape}, but the model that {config_path} describes expects "
            f"{want} (parameter {t.path!r}); the checkpoint and its config.json disagree."
        )
    floating = bool(jnp.issubdtype(leaf.dtype, jnp.floating))
    if files.is_float(stored) != floating:
        kind = "a floating dtype (F32, F16 or BF16)" if floating else "an integer dtype"
        raise HFFormatError(
            f"{path}: tensor {t.name!r} is stored as {stored}, but parameter {t.path!r} is "
            f"{np.dtype(leaf.dtype).name} and needs {kind}; the file is damaged or not this model's checkpoint: "
            f"{files.RESAVE}."
        )


def _match_names(tensors: list[HFTensor], wmap: dict[str, str], config: dict, source: Path) -> dict[str, str]:
    """`{expected name: name in the files}`: exact, or without the base-model prefix (`model.`,
    `transformer.`) that checkpoints of headless models lack. Raises naming `source` (the index or the
    single file) on missing or unexpected tensors."""
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
        raise HFFormatError(
            f"{source}: tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} missing ({len(missing)} "
            f"missing); the checkpoint does not match the {config.get('model_type')} model its "
            f"{files.CONFIG} describes."
        )
    used = set(names.values())
    tied = bool(config.get("tie_word_embeddings", config.get("model_type") == "gpt2"))
    unexpected = [
        n for n in wmap
        if n not in used and not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight")
    ]
    if unexpected:
        raise HFFormatError(
            f"{source}: unexpected tensor(s) {sorted(unexpected)[:5]}: no parameter of the "
            f"{config.get('model_type')} model maps to them (misnamed, or config.json describes another model)."
        )
    return names


def _make_array(tensors: list[HFTensor], shape: tuple, sharding, dtype: np.dtype, fetch) -> jax.Array:
    """One parameter, each device's block read from the files by its own callback (`fetch(tensor, index)`)."""
    stacked = tensors[0].layer is not None

    def read(t: HFTensor, index: tuple) -> np.ndarray:
        if t.transpose:
            index = (*index[:-2], index[-1], index[-2])
        x = fetch(t, index)
        return (np.swapaxes(x, -1, -2) if t.transpose else x).astype(dtype)

    def callback(index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        if not stacked:
            return read(tensors[0], index)
        by_layer = {t.layer: t for t in tensors}
        return np.stack([read(by_layer[i], index[1:]) for i in range(shape[0])[index[0]]])

    return jax.make_array_from_callback(shape, sharding, callback, dtype=dtype)
