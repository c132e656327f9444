"""The Hugging Face folder format: which safetensors file holds which tensor, and a streaming writer.

The `safetensors` package writes a file from a dict of complete in-memory tensors; to keep host memory
bounded by one tensor, `ShardWriter` writes the (documented, stable) safetensors layout itself: an
8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte range,
then the tensors' bytes in that order. Files it writes are read back with `safetensors.safe_open`.

Reading a folder from outside, every error (missing, unreadable, truncated or malformed file, JSON of
the wrong shape) is an `HFFormatError` whose one-line message names the file and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from zerojax._units import byte_count

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}

# The fix for a damaged or malformed file of a Hugging Face folder.
RESAVE = "re-download the checkpoint or save it again with save_pretrained(..., safe_serialization=True)"
# Config fields that are sizes (Llama/Mistral/Qwen2 and GPT-2 names); each must be a positive integer.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions", "n_embd", "n_layer",
               "n_head", "n_inner")

CHUNK_BYTES = 64 * 2**20  # the most `ShardWriter.write` copies at once

class HFFormatError(ValueError):
    """A Hugging Face folder or file that import cannot use; the message names the file, the fault and the fix."""


class HFFileMissingError(HFFormatError, FileNotFoundError):
    """A file the Hugging Face folder needs is absent."""


@contextlib.contextmanager
def reading(path: Path, fix: str = RESAVE):
    """Turns an error while reading `path` (absent, unreadable, not UTF-8, not JSON, not safetensors) into
    an `HFFormatError` (`HFFileMissingError` when absent) naming `path` and `fix`."""
    try:
        yield
    except HFFormatError:
        raise
    except FileNotFoundError:
        raise HFFileMissingError(f"{path}: no such file; {fix}.") from None
    except (OSError, SafetensorError, ValueError, RecursionError) as e:
        reason = " ".join((getattr(e, "strerror", None) or str(e) or type(e).__name__).split())[:300]
        raise HFFormatError(f"{path}: cannot be read ({reason}); {fix}.") from None


def read_json(path: Path, fix: str = RESAVE) -> dict:
    """The JSON object `path` holds; an `HFFormatError` naming it and `fix` for anything else."""
    with reading(path, fix):
        data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise HFFormatError(f"{path}: holds a JSON {type(data).__name__}, not an object; {fix}.")
    return data


def check_sizes(config: dict, source: str | Path) -> None:
    """Raises an `HFFormatError` naming `source` (where the config came from) unless every size field
    it sets (`SIZE_FIELDS`) is a positive integer and `model_type`, when set, is a string."""
    for key in SIZE_FIELDS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HFFormatError(f"{source}: {key}={value!r} must be a positive integer; correct it in config.json.")
    if not isinstance(config.get("model_type", ""), str):
        raise HFFormatError(f"{source}: model_type={config['model_type']!r} must be a string such as 'llama'; "
                            "correct it in config.json.")


def size_bytes(size: int | str) -> int:
    """`max_shard_size` as bytes: an int, or a string such as '5GB' (10**9) or '2GiB' (2**30)."""
    count = byte_count(size)
    if count is None:
        raise ValueError(
            f"max_shard_size={size!r} is not a size; pass a positive number of bytes or a string such as "
            "'5GB', '500MB' or '2GiB'."
        )
    return count


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names for `count` shards."""
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def weight_map(hf_dir: Path) -> dict[str, str]:
    """`{tensor name: file name}` of a Hugging Face folder (sharded with an index, or one file); the file
    names are plain names of files in `hf_dir`."""
    index = hf_dir / INDEX
    if index.exists():
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict):
            raise HFFormatError(f"{index}: 'weight_map' is {type(wmap).__name__}, not an object mapping tensor "
                                f"names to file names; {RESAVE}.")
        for name, fname in wmap.items():
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise HFFormatError(f"{index}: weight_map[{name!r}]={fname!r} is not the name of a file in the "
                                    f"folder; {RESAVE}.")
        return wmap
    single = hf_dir / SINGLE
    if not single.exists():
        raise HFFileMissingError(
            f"{hf_dir}: neither {INDEX} nor {SINGLE} exists; point hf_dir at a Hugging Face model folder "
            "saved with safetensors (save_pretrained(..., safe_serialization=True))."
        )
    with reading(single), safe_open(single, framework="numpy") as f:
        return {name: SINGLE for name in f.keys()}


def is_float(safetensors_dtype: str) -> bool:
    """Whether a safetensors dtype name (`F32`, `BF16`, `F8_E4M3`, `I32`, `BOOL`, ...) is a floating type."""
    return safetensors_dtype.startswith(("F", "BF"))


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header up front, then each tensor's bytes.

    `tensors` is the file's content in order: `(name, shape, dtype)`; `write(name, array)` must then
    be called for each of them in that order.
    """

    def __init__(self, f: BinaryIO, tensors: list[tuple[str, tuple, np.dtype]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, tuple(shape), np.dtype(dtype)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        self._f, self._next = f, 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes the next tensor from `array` (any layout, e.g. a transposed view, any float dtype),
        cast to the declared dtype and made contiguous a block of rows at a time, so at most
        `CHUNK_BYTES` are copied at once."""
        exp_name, shape, dtype = self._expected[self._next]
        if (name, tuple(array.shape)) != (exp_name, shape):
            raise ValueError(f"ShardWriter: got {name!r} {tuple(array.shape)}, expected {exp_name!r} {shape} next.")
        if array.ndim == 0:
            array = array.reshape(1)
        row_bytes = max(1, math.prod(array.shape[1:]) * dtype.itemsize)
        rows = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, array.shape[0], rows):
            block = np.ascontiguousarray(array[start : start + rows], dtype=dtype)
            self._f.write(block.reshape(-1).view(np.uint8).data)
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self._expected)
