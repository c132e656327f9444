"""Export: parameters to a Hugging Face folder (`config.json`, safetensors shards, index), streamed.

Tensors are produced and written one at a time, so host memory is bounded by the largest parameter
leaf (a lazy leaf is held whole while its tensors are written) plus a 64 MiB block that the writer
transposes and casts at a time, never the model. Leaves may be jax arrays (sharded, even across
processes), numpy arrays, or zero-argument callables returning a numpy array (lazy leaves: called once,
when their first tensor is written, and released after their last). A lazy leaf of stacked layers that
also has a method `layer(i)` returning `leaf()[i]` is read one layer at a time instead, which bounds
host memory by one layer's tensor rather than the whole stack. Every process must call
`export_hf` with the same tree: all take part in the gathers, process 0 writes (if process 0 fails
while writing, the others are left waiting in the next gather). The folder is written
under a temporary name next to `out_dir` and renamed at the end, so an interrupted export never looks
complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from zerojax import models
from zerojax._folders import refuse_overlap
from zerojax.hf import files
from zerojax.hf.load import resolve_map
from zerojax.hf.mapping import HFTensor, TensorMap, expand, leaves_by_path
from zerojax.precision import dtype_of

EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ExportWriteError(OSError):
    """The export folder could not be written (full disk, read-only file system); `errno` is kept."""

    def __str__(self) -> str:
        return self.strerror


def export_hf(
    params: Any,
    hf_config: dict,
    out_dir: str | Path,
    *,
    arch: str | TensorMap | None = None,
    dtype: str = "fp32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes `params` as the Hugging Face model `hf_config` describes into `out_dir`; returns its path.

    `arch`: None (the config's `model_type`), a supported `model_type`, or a tensor map function for a
    user's own model (see `zerojax.hf.mapping`). `dtype`: 'fp32', 'bf16' or 'fp16' for every tensor.
    A non-empty `out_dir` is refused unless `overwrite`; then it is replaced only once the new folder
    is complete. For a supported architecture the parameter tree must match the model `hf_config`
    describes, leaf for leaf. An `out_dir` that is, is inside or contains a folder a lazy leaf reads from
    (its `source`, e.g. a `LazyTensor`'s checkpoint folder) is refused before anything is written.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_hf: dtype={dtype!r} is unsupported; use one of {sorted(EXPORT_DTYPES)}.")
    out_dir = Path(out_dir)
    leaves = leaves_by_path(params)
    refuse_overlap("export_hf", out_dir, {x.source for x in leaves.values() if hasattr(x, "source")})
    is_file = out_dir.exists() and not out_dir.is_dir()
    occupied = is_file or (out_dir.exists() and any(out_dir.iterdir()))
    if jax.process_count() > 1:  # the writer's view of the folder decides for every process
        occupied = bool(multihost_utils.broadcast_one_to_all(np.int32(occupied)))
    if occupied and not overwrite:
        what = "is a file, not a folder" if is_file else "exists and is not empty"
        raise FileExistsError(
            f"export_hf: out_dir {str(out_dir)!r} {what}; choose a new folder or pass overwrite=True."
        )
    np_dtype = dtype_of(dtype)
    tensor_map = resolve_map(arch, hf_config)
    shapes = _shapes(leaves, hf_config, arch)
    tensors = expand(tensor_map, shapes)
    sizes = [math.prod(t.shape(shapes[t.path])) * np_dtype.itemsize for t in tensors]
    shards = _plan_shards(sizes, files.size_bytes(max_shard_size))
    names = files.shard_names(len(shards))
    writer = jax.process_index() == 0
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if writer:
            tmp.mkdir(parents=True)
        _write_shards(tensors, shards, names, leaves, shapes, np_dtype, tmp if writer else None, progress)
        if writer:
            config = dict(hf_config, dtype=EXPORT_DTYPES[dtype])
            if "torch_dtype" in config:
                config["torch_dtype"] = EXPORT_DTYPES[dtype]
            (tmp / files.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            index = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": {t.name: names[s] for s, shard in enumerate(shards) for t in (tensors[i] for i in shard)},
            }
            (tmp / files.INDEX).write_text(json.dumps(index, indent=2) + "\n")
            _replace(tmp, out_dir)
    except OSError as e:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ExportWriteError(e.errno, f"export_hf: cannot write the export of {str(out_dir)!r}: "
                                        f"{e.strerror or e}; free disk space or choose a writable folder "
                                        "(nothing was left behind).") from e
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"zerojax.export_hf:{out_dir}")
    return out_dir


def _shapes(leaves: dict[str, Any], hf_config: dict, arch) -> dict[str, tuple]:
    """`{path: shape}` of every leaf. For a supported architecture the tree is checked against the
    model `hf_config` describes (lazy leaves take their shape from it); for a custom map a lazy leaf
    without a `shape` attribute is called once to learn its shape."""
    if callable(arch):
        return {p: tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x())) for p, x in leaves.items()}
    expected = {p: tuple(x.shape) for p, x in leaves_by_path(models.abstract_model(hf_config)[1]).items()}
    missing, extra = sorted(set(expected) - set(leaves)), sorted(set(leaves) - set(expected))
    if missing or extra:
        raise ValueError(
            f"export_hf: the parameter tree does not match the {hf_config.get('model_type')} model hf_config "
            f"describes: missing {missing}, unexpected {extra}; pass the nnx.Param state of that model."
        )
    for path, x in leaves.items():
        if hasattr(x, "shape") and tuple(x.shape) != expected[path]:
            raise ValueError(
                f"export_hf: parameter {path!r} has shape {tuple(x.shape)} but hf_config implies {expected[path]}; "
                "the parameters and the config disagree."
            )
    return expected


def _plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Tensor indices per shard, in order; a shard closes before it would exceed `limit` bytes (a
    tensor larger than the limit gets a shard of its own), as `save_pretrained` does."""
    shards, current, total = [], [], 0
    for i, size in enumerate(sizes):
        if current and total + size > limit:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    return shards + [current]


def _write_shards(tensors, shards, names, leaves, shapes, dtype, folder: Path | None, progress: bool) -> None:
    """Produces every tensor in order (all processes, for the gathers); writes them when `folder`."""
    fetch = _LeafFetcher(leaves, shapes)
    bar = tqdm(total=len(tensors), unit="tensor", desc="export_hf", disable=not progress or folder is None)
    with bar:
        for shard, name in zip(shards, names):
            content = [(tensors[i].name, tensors[i].shape(shapes[tensors[i].path]), dtype) for i in shard]
            with open(folder / name, "wb") if folder is not None else contextlib.nullcontext() as f:
                writer = files.ShardWriter(f, content, {"format": "pt"}) if f is not None else None
                for i in shard:
                    array = _view(tensors[i], fetch(tensors[i]))
                    if writer is not None:
                        writer.write(tensors[i].name, array)
                    del array
                    bar.update()
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())


class _LeafFetcher:
    """Host copies of what a tensor needs: a gathered layer slice of a jax array, a view of a numpy
    array, one layer of a lazy leaf with `layer(i)`, or a lazy leaf's array (called once and kept only
    while its tensors are written)."""

    def __init__(self, leaves: dict[str, Any], shapes: dict[str, tuple]):
        self._leaves, self._shapes = leaves, shapes
        self._cached: tuple[str, np.ndarray] | None = None

    def __call__(self, t: HFTensor) -> np.ndarray:
        """The tensor's source on the host: the leaf, or its layer `t.layer` for a stacked leaf."""
        leaf = self._leaves[t.path]
        if isinstance(leaf, jax.Array):
            part = leaf if t.layer is None else lax.index_in_dim(leaf, t.layer, keepdims=False)  # a static slice: host memory too
            host = jax.device_get(part) if part.is_fully_addressable else multihost_utils.process_allgather(part, tiled=True)
            return np.asarray(host)
        if t.layer is not None and callable(getattr(leaf, "layer", None)):
            return np.asarray(leaf.layer(t.layer))
        if callable(leaf):
            if self._cached is None or self._cached[0] != t.path:
                self._cached = None  # release the previous leaf before loading the next
                value = np.asarray(leaf())
                if value.shape != self._shapes[t.path]:
                    raise ValueError(
                        f"export_hf: lazy leaf {t.path!r} returned shape {value.shape}, expected {self._shapes[t.path]}."
                    )
                self._cached = (t.path, value)
            leaf = self._cached[1]
        leaf = np.asarray(leaf)
        return leaf if t.layer is None else leaf[t.layer]


def _view(t: HFTensor, source: np.ndarray) -> np.ndarray:
    """Tensor `t` as a view of its source (see `_LeafFetcher`): transposed lazily, so the writer's
    blockwise cast and copy is the only copy (unless `to_hf` makes one)."""
    if not (np.issubdtype(source.dtype, np.floating) or source.dtype.name == "bfloat16"):
        raise ValueError(f"export_hf: tensor {t.name!r} has dtype {source.dtype}; only floating-point parameters export.")
    return dataclasses.replace(t, layer=None).from_leaf(source)


def _replace(tmp: Path, out_dir: Path) -> None:
    """Moves the finished folder into place; an existing `out_dir` is removed only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


__all__ = ["EXPORT_DTYPES", "export_hf"]
