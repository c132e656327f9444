"""Byte-level BPE tokenizers (the `tokenizers` package) for training and for Hugging Face folders.

`train_bpe(text, vocab_size)` learns one from text, `BPETokenizer.load(path)` reads a `tokenizer.json`
(or a folder holding one). `encode`/`decode` keep `zerojax.data.ByteTokenizer`'s contract, so
`zerojax.data.text_dataset(..., tokenizer=...)` takes a `BPETokenizer`; `save_pretrained(folder)` writes
the files `transformers.AutoTokenizer` and `pipeline("text-generation")` read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
    """A `tokenizers.Tokenizer` whose `eos_token` (also its BOS, as GPT-2's) ends and starts documents."""

    tokenizer: Tokenizer
    eos_token: str = EOS

    def __post_init__(self):
        if self.tokenizer.token_to_id(self.eos_token) is None:
            raise ValueError(f"BPETokenizer: eos_token={self.eos_token!r} is not in the vocabulary; pass one of its "
                             "special tokens.")

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """The tokenizer in `path` (a tokenizer.json, or a folder with one); its EOS from tokenizer_config.json
        beside it when there is one, else `EOS`."""
        path = Path(path)
        file = path / FILES[0] if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"BPETokenizer.load: {str(file)!r} does not exist; pass a tokenizer.json or a "
                                    "folder holding one.")
        config = file.parent / FILES[1]
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        return cls(Tokenizer.from_file(str(file)), eos or EOS)

    @property
    def vocab_size(self) -> int:
        """Token ids are below this: the vocabulary including special tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (int32, 1-D), with no special tokens added."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        """The text of token ids (any shape, flattened), special tokens left out."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def save_pretrained(self, folder: str | Path, model_max_length: int | None = None) -> Path:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`, as
        `transformers.AutoTokenizer.from_pretrained` reads them; returns `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / FILES[0]))
        special = {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        (folder / FILES[1]).write_text(json.dumps(config, indent=2) + "\n")
        (folder / FILES[2]).write_text(json.dumps(special, indent=2) + "\n")
        return folder


def train_bpe(text: str, vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` tokens (256 bytes, `EOS`, then merges) learned from `text`:
    every string encodes, nothing is unknown; the same text and size always give the same tokenizer."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"train_bpe: vocab_size={vocab_size} must be at least 257 (256 bytes and {EOS}).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return BPETokenizer(tokenizer)
