"""The main example: every DeepSpeed config of the corpus runs as written (or is refused in one line),
flags fill what a config leaves "auto" and override what it states only when given; import a
transformers checkpoint, export it unchanged, refuse to clobber a run."""

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from zerojax.checkpoint import CheckpointManager
from zerojax.config.loading import read_source

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_llama.py")
CORPUS = Path(__file__).parent / "ds_configs"
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0}

# Each corpus config: None where it runs here, else the one line the example answers (a regex).
FP16_ON_CPU = r"precision fp16 \(from fp16.enabled\) does not run on CPU devices"
EXPECTED = {
    "accelerate__ds_config_zero3_model_only.json":
        r"train_batch_size=1 != train_micro_batch_size_per_gpu=1 × gradient_accumulation_steps=1 × world size 8",
    "accelerate__sp-alst.ds-config.json": None,
    "accelerate__zero_stage1_config.json": FP16_ON_CPU,
    "accelerate__zero_stage3_offload_config.json": FP16_ON_CPU,
    "alpaca__default_offload_opt_param.json": None,
    "axolotl__zero1.json": None,
    "axolotl__zero2.json": None,
    "axolotl__zero3_bf16.json": None,
    "axolotl__zero3_bf16_cpuoffload_all.json": None,
    "dsexamples-cifar__ds_config.json": None,
    "dsexamples-ep__ds_zero3_leaf_qwen3_5.json": None,
    "dsexamples__deepspeed_bsz64k_lamb_config_seq128.json": FP16_ON_CPU,
    "dsexamples__ds_bsz512_1cycle.json": None,
    "dsexamples__ds_config_gpt2-medium_1clmetric_TEMPLATE.json": r"is not valid JSON: .*fill in template placeholders",
    "dsexamples__ds_config_nvme.json": r"offload_param.device='nvme' is not supported in zerojax",
    "dsexamples__ds_zero-offload_config.json": FP16_ON_CPU,
    "dsexamples__ds_zero_stage_3_config.json":
        r"stage3_param_persitence_threshold is not a DeepSpeed zero_optimization key \(did you mean",
    "dsexamples__ds_zero_stage_infinity_config.json": r"offload_optimizer.device='nvme' is not supported in zerojax",
    "gptneox__125M.yml": r"is YAML but not an Accelerate config",
    "llamafactory__ds_z0_config.json": None,
    "llamafactory__ds_z3_alst_config.json": None,
    "llamafactory__ds_z3_fp8_config.json": None,
    "llava-next__zero3_h100_optimized.json": None,
    "llava-next__zero3pp.json": r"zero_hpz_partition_size=16 does not divide the data-parallel world size 8",
    "megatron-ds__ds_zero2_config_bf16.json": None,
    "openinstruct__stage3_no_offloading.conf": None,
    "transformers-61c7ec9__ds_config_zero3.json": FP16_ON_CPU,
    "transformers__ds_config_zero2.json": None,
    "transformers__ds_config_zero3.json": None,
    "transformers__ds_config_zero3_bf16.json": None,
}
# The configs that run are marked slow (the default suite runs the example through its other tests);
# those that say why not run in the default suite.


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_the_expectations_cover_the_corpus():
    assert sorted(EXPECTED) == sorted(p.name for p in CORPUS.iterdir() if p.name != "SOURCES.md")


def _stated_numbers(tree, path=()):
    """(path, value) of every number and boolean a config states, `bfloat16` read as `bf16`."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _stated_numbers(value, (*path, "bf16" if not path and key == "bfloat16" else key))
    elif isinstance(tree, list) and all(isinstance(x, (int, float)) for x in tree):
        yield path, tree
    elif isinstance(tree, (int, float)):
        yield path, tree


def _at(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _same(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else math.isclose(a, b)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if EXPECTED[n] else [pytest.mark.slow])
                                  for n in sorted(EXPECTED)])
def test_every_corpus_config_runs_two_steps_as_written_or_says_why_not(example, tiny_model, tmp_path, capsys, name):
    out = tmp_path / "run"
    code = example.main(["--deepspeed", str(CORPUS / name), "--model-config", tiny_model, "--seq-len", "16",
                         "--max-steps", "2", "--output-dir", str(out)])
    captured = capsys.readouterr()
    reason = [line for line in captured.err.splitlines() if line.startswith("train_llama")]
    if EXPECTED[name] is not None:
        assert code == 2 and len(reason) == 1 and reason[0].startswith("train_llama: error: "), captured.err
        assert re.search(EXPECTED[name], reason[0]), reason[0]
        return
    assert code == 0 and not reason, captured.err
    assert json.loads(next(line for line in captured.out.splitlines() if line.startswith("{")))["steps"] == 2
    said = "\n".join(line for line in captured.out.splitlines() if line.startswith("zerojax: "))
    for stated in (r"precision (bf16|fp32): compute", r"ZeRO stage \d; offload: optimizer", r"batch: \d+ sequences"):
        assert re.search(stated, said), said
    overridden = re.findall(r"overrides the config's ([\w.]+)=", said)
    resolved = CheckpointManager(out / "checkpoints", read_only=True).metadata(2)["config"]
    for path, value in _stated_numbers(read_source(str(CORPUS / name))[0]):
        got = _at(resolved, path)
        if got is not None and ".".join(path) not in overridden:
            assert _same(got, value), f"{'.'.join(path)}: the config says {value}, the run used {got}"
    assert "transformers sample: 'We hold these truths" in captured.out


def _settings(example, config: dict, tmp_path, *flags):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return example.settings(example.parse_args(["--deepspeed", str(path), *flags]))


BSZ512 = read_source(str(CORPUS / "dsexamples__ds_bsz512_1cycle.json"))[0]


def test_explicit_config_values_are_the_truth(example, tmp_path):
    config, values, overrides = _settings(example, BSZ512, tmp_path)
    assert values["per_device_train_batch_size"] == (32, "train_micro_batch_size_per_gpu")
    assert values["gradient_accumulation_steps"] == (2, "train_batch_size=512 over 8 devices")
    assert values["adam_betas"] == ([0.8, 0.999], "optimizer.params.betas")
    assert values["weight_decay"] == (3e-7, "optimizer.params.weight_decay")
    assert values["learning_rate"] == (0.001, "optimizer.params.lr")
    assert values["precision"][0] == "fp32" and overrides == [] and config == str(tmp_path / "ds_config.json")


def test_a_given_flag_overrides_a_stated_value_and_says_so(example, tmp_path):
    config, values, overrides = _settings(example, BSZ512, tmp_path, "--batch-size", "16", "--learning-rate", "0.01",
                                          "--precision", "bf16")
    assert values["per_device_train_batch_size"] == (16, "--batch-size")
    assert values["gradient_accumulation_steps"][0] == 4  # train_batch_size 512 stays
    assert overrides == ["--batch-size 16 overrides the config's train_micro_batch_size_per_gpu=32",
                         "--learning-rate 0.01 overrides the config's optimizer.params.lr=0.001",
                         "--precision bf16 overrides the config's precision (it enables neither bf16 nor fp16)"]
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["optimizer"]["params"]["lr"] == 0.01
    assert config["bf16"] == {"enabled": True} and config["train_batch_size"] == 512


@pytest.mark.parametrize("blocks,flags,expected", [
    ({"bf16": {"enabled": "auto"}}, [], ("bf16", 'example default, the config says "auto"')),
    ({"bfloat16": {"enabled": "auto"}}, ["--precision", "fp32"], ("fp32", "--precision")),
    ({"fp16": {"enabled": "auto"}}, [], ("fp32", "the config enables neither bf16 nor fp16 (its \"auto\" fp16.enabled "
                                         "stays off, as TrainingArguments(bf16=True) leaves it)")),
    ({"fp16": {"enabled": True}}, [], ("fp16", "fp16.enabled")),
    ({}, [], ("fp32", "the config enables neither bf16 nor fp16")),
])
def test_precision_follows_the_config_then_the_flag_then_the_example(example, tmp_path, blocks, flags, expected):
    config = {"train_micro_batch_size_per_gpu": "auto", **blocks}
    assert _settings(example, config, tmp_path, *flags)[1]["precision"] == expected


def test_a_config_error_is_one_line_and_exit_2(example, tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "offload_param":
                                {"device": "nvme"}, "stage3_prefetch_bucket": 5}}))
    assert example.main(["--deepspeed", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_llama: error: 2 problems: - "), err
    assert "'nvme' is not supported" in err and "did you mean 'stage3_prefetch_bucket_size'" in err


def test_a_batch_larger_than_the_corpus_is_one_line(example, tiny_model, tmp_path, capsys):
    config = str(CORPUS / "dsexamples__deepspeed_bsz64k_lamb_config_seq128.json")
    assert example.main(["--deepspeed", config, "--precision", "bf16", "--model-config", tiny_model,
                         "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("train_llama")] == [
        f"train_llama: error: a global batch of 65536 sequences needs as many training windows, but --corpus "
        f"{example.HERE / 'data' / 'corpus.txt'} at --seq-len 64 gives 197; pass a larger --corpus or a shorter "
        "--seq-len, or a config with a smaller batch."]


def test_init_from_transformers_then_export_unchanged(example, tmp_path):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0.0, 0.1)
    original.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    out = tmp_path / "run"
    assert example.main(["--init-from", str(tmp_path / "src"), "--max-steps", "0", "--output-dir", str(out)]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 512, size=(2, 24)))
    with torch.no_grad():
        want, got = original(ids).logits.numpy(), exported(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert example.main(["--init-from", str(tmp_path / "src"), "--max-steps", "0", "--output-dir", str(out)]) == 2

