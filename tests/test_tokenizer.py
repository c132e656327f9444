"""The byte-level BPE (`zerojax.tokenizer`): the demo's shipped tokenizer is what its script makes, any text
round-trips, PyTorch transformers reads the saved files, and the demo's export generates with
`pipeline("text-generation")`."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from zerojax.data import text_dataset
from zerojax.tokenizer import EOS, FILES, BPETokenizer, train_bpe

EXAMPLES = Path(__file__).parent.parent / "examples"
CORPUS = EXAMPLES / "data" / "corpus.txt"
TEXT = "Ünïcødé ✓ 日本語, tabs\tand\nnew lines — We hold these truths to be self-evident."


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.load(EXAMPLES / "tokenizer")


def test_the_shipped_tokenizer_is_what_make_tokenizer_makes(tmp_path):
    made = _load("make_tokenizer").make(tmp_path / "tok")
    for name in FILES:
        assert (made / name).read_bytes() == (EXAMPLES / "tokenizer" / name).read_bytes(), name


def test_any_text_round_trips_and_the_corpus_compresses(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1 and 0 <= ids.min() and ids.max() < tokenizer.vocab_size == 512
    assert tokenizer.decode(ids) == TEXT
    text = CORPUS.read_text(encoding="utf-8")
    assert len(tokenizer.encode(text)) < 0.45 * len(text.encode("utf-8"))  # 512 tokens: ~2.4 bytes a token
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == 0
    train, evaluation = text_dataset(CORPUS, 17, stride=4, tokenizer=tokenizer)
    assert train.shape[1] == 17 and train.max() < 512 and tokenizer.decode(train[0][:4]) in text


def test_transformers_reads_the_saved_files_as_we_encode(tokenizer, tmp_path):
    folder = tokenizer.save_pretrained(tmp_path / "tok", model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs(TEXT)["input_ids"] == tokenizer.encode(TEXT).tolist()
    assert theirs.decode(tokenizer.encode(TEXT)) == TEXT
    assert (theirs.eos_token, theirs.eos_token_id, theirs.model_max_length) == (EOS, 0, 64)
    assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == EOS


def test_a_bad_vocab_size_or_path_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=256 must be at least 257"):
        train_bpe("text", 256)
    with pytest.raises(FileNotFoundError, match=r"nope' does not exist; pass a tokenizer.json or a folder holding one"):
        BPETokenizer.load(tmp_path / "nope")


@pytest.mark.slow  # `make demo` runs the same pipeline; test_export_cli loads an export in transformers
def test_the_demo_export_generates_with_the_transformers_pipeline(tmp_path, capsys):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert _load("train_llama").main(["--model-config", str(tmp_path / "config.json"), "--max-steps", "2",
                                      "--seq-len", "16", "--output-dir", str(out)]) == 0
    samples = dict(line.split(" sample: ", 1) for line in capsys.readouterr().out.splitlines() if " sample: " in line)
    assert samples["zerojax"] == samples["transformers"], samples  # the example's own pipeline call, greedy
    assert all((out / "hf" / name).is_file() for name in FILES)
    generator = transformers.pipeline("text-generation", model=str(out / "hf"), device="cpu")
    text = generator("We hold", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    tokens = transformers.AutoTokenizer.from_pretrained(out / "hf")("We hold")["input_ids"]
    assert text.startswith("We hold") and len(text) > len("We hold")
    assert tokens == BPETokenizer.load(out / "hf").encode("We hold").tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert model.config.vocab_size == 512 and model.config.eos_token_id == 0
