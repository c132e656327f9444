"""Data for training loops: a byte-level tokenizer and deterministic, resumable global batches.

The batch contract: a dataset is a numpy array of examples (`(N, T)` token ids, or a dict of such
arrays with the same N). `Batches(dataset, batch_size, seed)` yields, for step `s`, the global batch
of `batch_size` examples as a dict of numpy arrays; the batch of a step is a pure function of
`(seed, s)` (a fresh permutation per epoch), so resuming at step `s` needs no iterator state. On
several processes each process calls `global_batch(s)` with the same arguments and gets a global
`jax.Array` sharded over the data-parallel axes, having read only its own rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from zerojax.distributed import global_batch, process_rows


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: nothing to download, nothing unknown."""

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256).decode("utf-8", "replace")


def windows(tokens: np.ndarray, length: int, stride: int | None = None) -> np.ndarray:
    """Overlapping `(N, length)` windows of a 1-D token array, every `stride` tokens (default `length`)."""
    stride = stride or length
    if tokens.ndim != 1 or len(tokens) < length:
        raise ValueError(f"windows: need a 1-D token array of at least length={length}; got shape {tokens.shape}.")
    starts = np.arange(0, len(tokens) - length + 1, stride)
    return np.stack([tokens[s:s + length] for s in starts])


def text_dataset(path: str | Path, length: int, *, eval_fraction: float = 0.1, stride: int | None = None,
                 tokenizer: ByteTokenizer = ByteTokenizer()) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) windows of a text file; the last `eval_fraction` of the text is held out."""
    tokens = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
    cut = int(len(tokens) * (1 - eval_fraction))
    return windows(tokens[:cut], length, stride), windows(tokens[cut:], length, stride)


def num_examples(dataset: Any) -> int:
    """The number of examples N of a dataset: an `(N, ...)` array or a dict of such arrays."""
    return len(next(iter(dataset.values()))) if isinstance(dataset, dict) else len(dataset)


@dataclasses.dataclass(frozen=True)
class Batches:
    """Global batches of `batch_size` examples from `dataset`, reshuffled every epoch by `seed`."""

    dataset: Any
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    key: str = "input_ids"  # the batch key of an array dataset

    def __post_init__(self):
        n = self.num_examples
        if not isinstance(self.batch_size, int) or not 0 < self.batch_size <= n:
            raise ValueError(
                f"Batches: batch_size={self.batch_size!r} must be a positive integer no larger than the "
                f"dataset's {n} examples; use a smaller global batch or more data."
            )

    @property
    def num_examples(self) -> int:
        return num_examples(self.dataset)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _columns(self) -> dict:
        return self.dataset if isinstance(self.dataset, dict) else {self.key: self.dataset}

    def indices(self, step: int) -> np.ndarray:
        """The example indices of `step`'s batch."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples) if self.shuffle \
            else np.arange(self.num_examples)
        return order[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, step: int) -> dict:
        """`step`'s whole global batch as numpy arrays (one process)."""
        idx = self.indices(step)
        return {k: np.asarray(v[idx]) for k, v in self._columns().items()}

    def global_batch(self, step: int, mesh: Mesh) -> dict:
        """`step`'s batch as global arrays over `mesh`'s data axes; each process reads only its own rows."""
        if jax.process_count() == 1:
            return self.batch(step)
        rows = self.indices(step)[process_rows(self.batch_size, mesh)]
        return global_batch({k: np.asarray(v[rows]) for k, v in self._columns().items()}, mesh)
