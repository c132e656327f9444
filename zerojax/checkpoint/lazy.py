"""`LazyTensor`: one tensor of a saved step, read from orbax's OCDBT store through tensorstore only when
called (whole, a band of chunks at a time) or for one layer of a stacked tensor."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np

from zerojax.checkpoint.errors import read_errors

if TYPE_CHECKING:
    from zerojax.checkpoint.manager import CheckpointManager


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One saved tensor, read as numpy on the host only when called (whole) or when one layer of a
    stacked tensor is asked for (`layer(i)`): a lazy leaf for `export_hf`."""

    manager: CheckpointManager
    step: int
    name: str  # the tensor's name in the checkpoint, e.g. 'master.layers.mlp.gate_proj.kernel.value'
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def source(self) -> str:
        """The checkpoint folder the tensor is read from (an export must not write there)."""
        return self.manager.directory

    @functools.cached_property
    def _array(self):
        """The tensor in orbax's store, opened once (its metadata only) for every read that follows."""
        return self.manager.open_tensor(self.step, self.name)

    def __call__(self) -> np.ndarray:
        return self._read(self._array)

    def layer(self, i: int) -> np.ndarray:
        """`self()[i]`, reading only the chunks that hold layer `i` (one chunk per layer and shard in
        checkpoints saved with the model's `hf_config`)."""
        return self._read(self._array[i])

    def _read(self, array) -> np.ndarray:
        """`array` as numpy, read one band of chunks along its first axis at a time, so that decoding
        holds one band beside the result, not a second copy of the tensor."""
        with read_errors(self.manager, self.step):
            if array.rank == 0:
                return np.asarray(array.read().result())
            out = np.empty(array.shape, array.dtype.numpy_dtype)
            band = array.chunk_layout.read_chunk.shape[0]
            for start in range(0, array.shape[0], band):
                out[start:start + band] = array[start:start + band].read().result()
            return out
