"""TrainingArguments as Hugging Face users write them: every transformers field, JSON from `to_json_string()`,
hostile values, the one warning for fields with no effect; hidden-size aliases for "auto" (issue 16, items 4, 6)."""

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import transformers

from zerojax import cli
from zerojax.args import ArgsWarning, TrainingArguments, interval
from zerojax.config import load_config
from zerojax.config.auto import HIDDEN_SIZE_ALIASES, hidden_size

ZERO3 = Path(__file__).resolve().parents[1] / "examples" / "configs" / "zero3.json"


def hf_json(**kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation notes
        return json.loads(transformers.TrainingArguments(output_dir="out", **kw).to_json_string())


def test_every_transformers_field_is_accepted():
    theirs = [f for f in dataclasses.fields(transformers.TrainingArguments) if f.init]
    ours = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert len(theirs) > 100
    assert [f.name for f in theirs if f.name not in ours] == []
    for f in theirs:  # each one by keyword, at Transformers' default
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        TrainingArguments(**{f.name: default})


def test_transformers_json_loads_without_warning():
    values = hf_json()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = TrainingArguments.from_dict(values)
        args.warn_no_effect()
    assert args.no_effect() == [] and args.output_dir == "out" and args.eval_strategy == "no"
    assert args.average_tokens_across_devices is True and args.reporters == []


def test_transformers_json_with_real_choices():
    values = hf_json(eval_strategy="steps", eval_steps=7, save_strategy="epoch", logging_strategy="no",
                     report_to="tensorboard", gradient_checkpointing=True, average_tokens_across_devices=False,
                     per_device_train_batch_size=4, learning_rate=3e-4, max_steps=20, seed=7, data_seed=3)
    args = TrainingArguments.from_dict(values)
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.logging_strategy) == ("steps", 7, "epoch", "no")
    assert args.reporters == ["tensorboard"] and args.gradient_checkpointing_enabled
    assert args.average_tokens_across_devices is False and args.no_effect() == []
    cfg = load_config(str(ZERO3), args, {"hidden_size": 64}, world_size=8)
    assert cfg.train_micro_batch_size_per_gpu == 4 and cfg.to_dict()["optimizer"]["params"]["lr"] == 3e-4


def test_fields_without_effect_are_one_warning_with_reasons():
    values = hf_json(optim="adafactor", label_smoothing_factor=0.1, push_to_hub=False, tf32=False,
                     dataloader_num_workers=4)
    args = TrainingArguments.from_dict(values)
    with pytest.warns(ArgsWarning) as record:
        args.warn_no_effect()
    assert len(record) == 1
    text = str(record[0].message)
    for name in ("optim (the optimizer comes from the DeepSpeed optimizer block", "label_smoothing_factor",
                 "dataloader_num_workers (batches are read in the training process"):
        assert name in text
    assert "push_to_hub" not in text and "tf32" not in text  # defaults / False ask for nothing
    assert "3 field(s)" in text


def test_transformers4_names():
    old = {"output_dir": "o", "evaluation_strategy": "steps", "eval_steps": 5, "overwrite_output_dir": True,
           "logging_dir": "o/runs/x", "warmup_ratio": 0.1, "save_safetensors": True, "no_cuda": False,
           "per_gpu_train_batch_size": None, "push_to_hub_token": "<PUSH_TO_HUB_TOKEN>"}
    args = TrainingArguments.from_dict(old)
    assert args.eval_strategy == "steps" and args.logging_dir == "o/runs/x" and args.warmup_ratio == 0.1
    assert [n for n, _ in args.no_effect()] == ["overwrite_output_dir"]


@pytest.mark.parametrize("values, message", [
    ({"learning_rat": 1e-3}, "unknown fields ['learning_rat'] (did you mean: 'learning_rate'?)"),
    ({"seed": 10**40}, "seed=<an integer of ~41 digits> must be an integer in [0, 2**32)."),
    ({"learning_rate": float("nan")}, "learning_rate=nan must be a finite number >= 0."),
    ({"max_grad_norm": float("inf")}, "max_grad_norm=inf must be a finite number >= 0."),
    ({"max_steps": 10**30}, "max_steps=<an integer of ~31 digits> must be an integer >= -1."),
    ({"max_steps": "100"}, "max_steps='100' must be an integer >= -1."),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0 must be a positive integer."),
    ({"per_device_train_batch_size": True}, "per_device_train_batch_size=True must be a positive integer."),
    ({"bf16": "yes"}, "bf16='yes' must be true or false."),
    ({"eval_strategy": "sometimes"}, "eval_strategy='sometimes' must be one of ['no', 'steps', 'epoch'] or None."),
    ({"save_strategy": 1}, "save_strategy=1 must be one of ['no', 'steps', 'epoch', 'best']."),
    ({"logging_steps": -1}, "logging_steps=-1 must be a step count >= 1"),
    ({"report_to": [{"x": 1}]}, "report_to=[{'x': 1}] must be an integration name"),
    ({"report_to": "tensorbord"}, "report_to='tensorbord' names ['tensorbord'], not an integration"),
    ({"adam_beta1": 1.0}, "adam_beta1=1.0 must be in [0, 1)."),
    ({"deepspeed": 3}, "deepspeed=3 must be a DeepSpeed config path, a dict or null."),
    ({"output_dir": "x" * 10**6}, "output_dir='xxxxxxxxxxxx"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type='polynomial' is not supported"),
    ({"save_strategy": "best", "eval_strategy": "no"}, 'save_strategy="best" saves when an evaluation improves'),
    ({1: 2}, "unknown fields [1]"),
])
def test_hostile_values_are_one_line_naming_the_field(values, message):
    with pytest.raises(ValueError) as e:
        TrainingArguments.from_dict(values)
    text = str(e.value)
    assert message in text and "\n" not in text and len(text) < 400 and text.startswith("TrainingArguments")


def test_interval_fractions():
    assert interval(0.25, 10) == 3 and interval(4, None) == 4 and interval(0, 10) == 0 and interval(None, 5) == 0
    with pytest.raises(ValueError, match="fraction of the total steps"):
        interval(0.5, None)
    assert math.isclose(TrainingArguments(logging_steps=0.1).logging_steps, 0.1)


def test_cli_args_takes_a_transformers_json(tmp_path, capsys):
    args = tmp_path / "args.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args.write_text(transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                                       max_steps=50, bf16=True, optim="sgd",
                                                       use_cpu=True).to_json_string())
    assert cli.main(["config", str(ZERO3), "--args", str(args), "--world-size", "8", "--hidden-size", "32"]) == 0
    out, err = capsys.readouterr()
    resolved = json.loads(out)
    assert resolved["train_batch_size"] == 16 and resolved["bf16"]["enabled"] is True
    assert resolved["scheduler"]["params"]["total_num_steps"] == 50
    assert err.count("warning:") == 1 and "optim (the optimizer comes from" in err and "use_cpu" in err


def test_cli_help_documents_args(capsys):
    with pytest.raises(SystemExit):
        cli.main(["config", "--help"])
    out = capsys.readouterr().out
    assert "to_json_string()" in out and "--model-config" in out


# --- item 6: hidden-size aliases -----------------------------------------------------------------------------

def _transformers_aliases() -> dict:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    found = {}
    for model_type, name in CONFIG_MAPPING_NAMES.items():
        cls = getattr(transformers, name, None)
        alias = (getattr(cls, "attribute_map", None) or {}).get("hidden_size")
        if alias and alias != "hidden_size":
            found[model_type] = found[cls.model_type] = alias
    return found


def test_alias_table_is_transformers_attribute_maps():
    theirs = _transformers_aliases()
    assert theirs["gpt2"] == "n_embd" and theirs["t5"] == "d_model"
    assert HIDDEN_SIZE_ALIASES == theirs, "regenerate zerojax/config/auto.py's _ALIASES_BY_NAME from transformers"


@pytest.mark.parametrize("config_cls, expected", [
    ("GPT2Config", 768), ("T5Config", 512), ("BartConfig", 1024), ("DistilBertConfig", 768), ("XLMConfig", 2048),
    ("CodeGenConfig", 4096), ("LlamaConfig", 4096),
])
def test_real_config_dicts_resolve_their_hidden_size(config_cls, expected):
    config = getattr(transformers, config_cls)()
    assert config.hidden_size == expected
    assert hidden_size(config.to_dict()) == expected  # the config.json a folder holds
    assert hidden_size(config) == expected  # the object


def test_nested_text_config():
    llava = transformers.LlavaConfig(text_config=transformers.LlamaConfig(hidden_size=96).to_dict()).to_dict()
    assert "hidden_size" not in llava and hidden_size(llava) == 96
    assert hidden_size({"text_config": transformers.GPT2Config(n_embd=48).to_dict()}) == 48
    assert hidden_size({"text_config": {"hidden_sizes": [8, 40, 16]}}) == 40
    assert hidden_size({"n_embd": 24}) == 24  # no model_type: the unambiguous names
    assert hidden_size({"model_type": "distilbert", "dim": 12}) == 12
    assert hidden_size({"dim": 12}) is None  # "dim" means a hidden size only for distilbert
    assert hidden_size({"hidden_size": True}) is None and hidden_size({"n_embd": -3}) is None


def test_gpt2_folder_with_default_zero3_config(tmp_path, capsys):
    gpt2 = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)
    cfg = load_config(str(ZERO3), TrainingArguments(max_steps=10), gpt2.to_dict(), world_size=8)
    zero = cfg.to_dict()["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    gpt2.save_pretrained(tmp_path / "gpt2")
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"max_steps": 10}))
    assert cli.main(["config", str(ZERO3), "--args", str(args), "--model-config", str(tmp_path / "gpt2")]) == 0
    assert json.loads(capsys.readouterr().out)["zero_optimization"]["reduce_bucket_size"] == 4096
