"""Makes examples/tokenizer: the demo's 512-token byte-level BPE, learned from examples/data/corpus.txt.

    python examples/make_tokenizer.py            # rewrites examples/tokenizer/ (the same files every time)
"""

from __future__ import annotations

import sys
from pathlib import Path

from zerojax.tokenizer import train_bpe

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "corpus.txt"
FOLDER = HERE / "tokenizer"
VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 256  # the demo model's max_position_embeddings


def make(folder: Path = FOLDER) -> Path:
    """Learns the demo tokenizer from the bundled corpus and writes its Hugging Face files into `folder`."""
    return train_bpe(CORPUS.read_text(encoding="utf-8"), VOCAB_SIZE).save_pretrained(folder, MODEL_MAX_LENGTH)


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER))
