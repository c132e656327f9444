"""Data for training loops: a byte-level tokenizer and deterministic, resumable global batches.

The batch contract: a dataset is a numpy array of examples (`(N, T)` token ids, or a dict of such
arrays with the same N), or a Hugging Face `datasets.Dataset` with an `input_ids` column (optionally
`attention_mask` and `labels`; `as_columns` reads it a batch at a time, rows padded to the longest).
`Batches(dataset, batch_size, seed)` yields, for step `s`, the global batch of `batch_size` examples
as a dict of numpy arrays; the batch of a step is a pure function of `(seed, s)` (a fresh permutation
per epoch), so resuming at step `s` needs no iterator state. On several processes each process calls
`global_batch(s)` with the same arguments and gets a global `jax.Array` sharded over the
data-parallel axes, having read only its own rows.

An iterable of batches (a generator, a list of dicts, a `datasets.IterableDataset`) is read in order by
`IterableBatches`: batch `s` is the `s`-th item the iterable yields. It has no random access, so
resuming at step `s` reads and discards the first `s` batches of the iterable (as Hugging Face's
Trainer skips batches), which gives the batches of an uninterrupted run when the iterable yields the
same sequence each time it is iterated; `skip=False` (`ignore_data_skip=True`) starts from the
iterable's next batch instead.
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


def num_examples(dataset: Any) -> int | None:
    """The number of examples N of a dataset: an `(N, ...)` array or a dict of such arrays (None: an
    iterable of batches, whose length is unknown)."""
    if isinstance(dataset, IterableBatches) or is_iterable_of_batches(dataset):
        return None
    return len(next(iter(dataset.values()))) if isinstance(dataset, dict) else len(dataset)


LM_COLUMNS = ("input_ids", "attention_mask", "labels")
_PAD = {"labels": -100}  # a padded position: token 0, attention 0, label -100 (not counted)


def is_hf_dataset(data: Any) -> bool:
    """A `datasets.Dataset` (checked without importing `datasets`)."""
    return type(data).__name__ == "Dataset" and hasattr(data, "column_names") and hasattr(data, "features")


def is_iterable_of_batches(data: Any) -> bool:
    """An iterable the Trainer reads batch by batch: a generator or iterator, a list/tuple of dicts, or
    a `datasets.IterableDataset`."""
    if isinstance(data, (np.ndarray, dict, str, bytes)) or is_hf_dataset(data):
        return False
    if isinstance(data, (list, tuple)):
        return bool(data) and all(isinstance(b, dict) for b in data)
    return type(data).__name__ == "IterableDataset" or (hasattr(data, "__iter__") and not hasattr(data, "__len__"))


class HFColumn:
    """One column of a `datasets.Dataset` as an `(N, T)` array read only where indexed: each row padded
    to the column's longest (`T`) with 0 (`labels`: -100); a column of scalars is `(N,)`."""

    def __init__(self, dataset: Any, name: str, length: int | None, pad: int):
        self.dataset, self.name, self.length, self.pad = dataset.select_columns([name]), name, length, pad
        self.shape = (len(dataset),) if length is None else (len(dataset), length)
        self.dtype = np.asarray(dataset[0][name]).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        rows = self.dataset[[int(i) for i in np.asarray(idx).reshape(-1)]][self.name]
        if self.length is None:
            return np.asarray(rows)
        out = np.full((len(rows), self.length), self.pad, dtype=np.asarray(rows[0] if rows else [0]).dtype)
        for r, row in enumerate(rows):
            out[r, :len(row)] = row
        return out


class _MaskColumn:
    """`attention_mask` of a padded `input_ids` column: 1 for a token, 0 for padding."""

    dtype = np.dtype(np.int32)

    def __init__(self, ids: HFColumn, lengths: np.ndarray):
        self.lengths, self.shape = lengths, ids.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        lengths = self.lengths[np.asarray(idx).reshape(-1)]
        return (np.arange(self.shape[1])[None, :] < lengths[:, None]).astype(np.int32)


def as_columns(dataset: Any, *, name: str = "dataset", remove_unused_columns: bool = True) -> Any:
    """A dataset as the batch contract takes it: a `datasets.Dataset` becomes a dict of lazily read
    columns (`input_ids`, and `attention_mask` / `labels` when present; with `remove_unused_columns=False`
    every other numeric column too); rows of different lengths are padded to the longest and, without an
    `attention_mask` column, get one. Anything else is returned as it is."""
    if not is_hf_dataset(dataset):
        return dataset
    import pyarrow.compute as pc

    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"{name}: a datasets.Dataset needs an input_ids column (it has {dataset.column_names[:8]}); tokenize "
            "it first, e.g. dataset.map(lambda b: tokenizer(b['text']), batched=True)."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name}: the datasets.Dataset has no rows.")
    wanted = [c for c in dataset.column_names if c in LM_COLUMNS or not remove_unused_columns]
    columns, lengths = {}, None
    for column in wanted:
        values = dataset.with_format("arrow")[column]
        kind = str(values.type)
        if kind.startswith(("list", "large_list", "fixed_size_list")):
            row_lengths = np.asarray(pc.list_value_length(values).fill_null(0))
            sample = np.asarray(dataset[0][column])
            length = int(row_lengths.max())
            if column == "input_ids":
                lengths = row_lengths
        else:
            sample, length = np.asarray(dataset[0][column]), None
        if not (np.issubdtype(sample.dtype, np.integer) or np.issubdtype(sample.dtype, np.floating)) \
                or (column in LM_COLUMNS and not np.issubdtype(sample.dtype, np.integer)):
            raise TypeError(
                f"{name}: column {column!r} holds {kind} values; the batches need integer token ids (and numeric "
                "columns), so tokenize the text or set remove_unused_columns=True to drop it."
            )
        if column in LM_COLUMNS and length is None:
            raise TypeError(f"{name}: column {column!r} holds one {kind} per row; it needs a sequence per row.")
        columns[column] = HFColumn(dataset, column, length, _PAD.get(column, 0))
    ids = columns["input_ids"]
    if "attention_mask" not in columns and lengths is not None and (lengths < ids.shape[1]).any():
        columns["attention_mask"] = _MaskColumn(ids, lengths)
    return columns


class IterableBatches:
    """Global batches read in order from an iterable: batch `s` is the `s`-th item (a dict of arrays of
    `batch_size` rows, or one `(batch_size, T)` array of token ids); see the module docstring for what
    resuming means. `batch_size=None` takes each batch's own size (evaluation)."""

    def __init__(self, iterable: Any, batch_size: int | None, *, key: str = "input_ids", skip: bool = True,
                 name: str = "dataset", ranks: int = 1):
        if type(iterable).__name__ == "IterableDataset" and batch_size is not None and hasattr(iterable, "batch"):
            iterable = iterable.batch(batch_size, drop_last_batch=True)  # examples → global batches
        self.iterable, self.batch_size, self.key, self.skip, self.name, self.ranks = \
            iterable, batch_size, key, skip, name, ranks
        self.reiterable = iter(iterable) is not iterable
        self._it, self._next, self._peeked = None, 0, {}

    def _read(self) -> dict:
        if self._it is None:
            self._it = iter(self.iterable)
        try:
            item = next(self._it)
        except StopIteration:
            if not self.reiterable or self._next == 0:
                raise ValueError(
                    f"{self.name} ran out after {self._next} batches; give TrainingArguments.max_steps at most that, "
                    "or an iterable that can be iterated again (a list, a datasets.IterableDataset) to start over."
                ) from None
            self._it = iter(self.iterable)  # the next epoch
            item = next(self._it)
        return self._check(item, self._next)

    def _check(self, item: Any, step: int) -> dict:
        batch = item if isinstance(item, dict) else {self.key: item}
        try:
            batch = {k: np.asarray(v) for k, v in batch.items()}
        except ValueError as e:
            raise ValueError(f"{self.name}: batch {step} has rows of different lengths ({e}); pad them.") from None
        sizes = {k: v.shape[0] if v.ndim else None for k, v in batch.items()}
        want = self.batch_size or next(iter(sizes.values()), None)
        if not sizes or any(n != want for n in sizes.values()) or not want or want % self.ranks:
            raise ValueError(
                f"{self.name}: batch {step} has leading sizes {sizes}; every array of a batch needs the global batch "
                f"size{f' {self.batch_size}' if self.batch_size else ''} as its first dimension"
                f"{f', a multiple of the {self.ranks} data-parallel ranks' if self.ranks > 1 else ''}."
            )
        return batch

    def batch(self, step: int) -> dict:
        """Batch `step` (only the next one, or one already read for `global_batch(step)`)."""
        if step in self._peeked:
            return self._peeked[step]
        if step < self._next:
            raise ValueError(f"{self.name}: an iterable is read forward only; batch {step} was already used.")
        if self.skip:
            while self._next < step:  # resuming: the batches before `step` were trained on
                self._read()
                self._next += 1
        else:
            self._next = step
        self._peeked = {step: self._read()}
        self._next = step + 1
        return self._peeked[step]

    def global_batch(self, step: int, mesh: Mesh) -> dict:
        """Batch `step` as global arrays over `mesh` (each process's iterable yields the whole global batch;
        each process keeps its own rows)."""
        batch = self.batch(step)
        self._peeked.pop(step, None)
        if jax.process_count() == 1:
            return batch
        rows = process_rows(len(next(iter(batch.values()))), mesh)
        return global_batch({k: v[rows] for k, v in batch.items()}, mesh)

    def epoch(self, mesh: Mesh):
        """Every batch of the iterable once, from its start (evaluation; the iterable must be re-iterable)."""
        if not self.reiterable and self._it is not None:
            raise ValueError(f"{self.name} is a one-shot iterator, spent by the first evaluation; pass a list or "
                             "a datasets.Dataset.")
        self._it = iter(self.iterable)
        for i, item in enumerate(self._it):
            batch = self._check(item, i)
            if jax.process_count() == 1:
                yield batch
            else:
                rows = process_rows(len(next(iter(batch.values()))), mesh)
                yield global_batch({k: v[rows] for k, v in batch.items()}, mesh)


def make_batches(dataset: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True, skip: bool = True,
                 name: str = "dataset", ranks: int = 1, eval: bool = False) -> "Batches | IterableBatches":
    """`Batches` for an indexable dataset (arrays, dicts of arrays, `as_columns` of a `datasets.Dataset`),
    `IterableBatches` for an iterable of batches (`eval`: each batch at its own size)."""
    if is_iterable_of_batches(dataset):
        return IterableBatches(dataset, None if eval else batch_size, skip=skip, name=name, ranks=ranks)
    return Batches(dataset, batch_size, seed=seed, shuffle=shuffle)


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

    def epoch(self, mesh: Mesh):
        """Every full batch of one pass in order (evaluation)."""
        for i in range(self.steps_per_epoch):
            yield self.global_batch(i, mesh)
