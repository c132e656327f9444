"""Reading, validating and resolving DeepSpeed configs; the mapping to zerojax objects; the CLI."""

import base64
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zerojax as zj
from zerojax import cli
from zerojax.args import TrainingArguments
from zerojax.config import ConfigDeprecationWarning, ConfigError, ConfigWarning, keys, load_config
from zerojax.optim import OPTIMIZER_PARAMS, SCHEDULER_PARAMS
from zerojax.xla_flags import FLAG_NAMES, merge_flags

BASE = {"train_batch_size": 16}


def load(config, **kw):
    kw.setdefault("world_size", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(config, **kw)


def problems_of(config, **kw):
    with pytest.raises(ConfigError) as e:
        load(config, **kw)
    return e.value.problems


# --- sources ---------------------------------------------------------------------------------------------

def test_hjson_comments_trailing_commas_and_other_sources(tmp_path):
    text = """{
      // DeepSpeed accepts hjson
      "train_batch_size": 16,  # a comment
      /* block
         comment */ "zero_optimization": {"stage": 2, "reduce_bucket_size": 1e6,},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95,],},},
      "note": "a // not a comment, # neither"
    }"""
    path = tmp_path / "ds.json"
    path.write_text(text)
    a, b = load(path), load(str(path))
    c = load(base64.b64encode(json.dumps(a.to_dict()).encode()).decode())
    d = load(a.to_dict())
    assert a.stage == 2 and a.zero_optimization.reduce_bucket_size == 1_000_000
    assert a.optimizer_spec.params["betas"] == (0.9, 0.95)
    assert a.to_dict() == b.to_dict() == c.to_dict() == d.to_dict()


@pytest.mark.parametrize("source,fragment", [
    ("/nonexistent/ds.json", "cannot read the config file"),
    ("bm90IGpzb24=", "neither an existing file nor a base64-encoded JSON object"),
    (42, "is not a config"),
])
def test_bad_sources(source, fragment):
    assert fragment in problems_of(source)[0]


def test_duplicate_keys_and_non_object(tmp_path):
    dup = tmp_path / "dup.json"
    dup.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    assert "gives the key 'train_batch_size' twice" in problems_of(dup)[0]
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    assert "holds a JSON list" in problems_of(arr)[0]


def test_accelerate_yaml_inline_and_file(tmp_path):
    inline = tmp_path / "acc.yaml"
    inline.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nmixed_precision: bf16\n"
        "deepspeed_config:\n  zero_stage: 3\n  offload_optimizer_device: cpu\n  offload_param_device: none\n"
        "  gradient_accumulation_steps: 2\n  gradient_clipping: 0.5\n  zero3_save_16bit_model: true\n"
        "  zero3_init_flag: true\n"
    )
    cfg = load(inline, training_args=TrainingArguments(bf16=True, gradient_accumulation_steps=2, max_grad_norm=0.5,
                                                       per_device_train_batch_size=4))
    assert (cfg.stage, str(cfg.precision().compute_dtype), cfg.offload_optimizer.device) == (3, "bfloat16", "cpu")
    assert (cfg.gradient_accumulation_steps, cfg.train_batch_size, cfg.gradient_clipping) == (2, 64, 0.5)
    assert cfg.gather_16bit_weights_on_model_save is True
    (tmp_path / "ds.json").write_text('{"train_batch_size": 32, "zero_optimization": {"stage": 1}}')
    by_file = tmp_path / "file.yml"
    by_file.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n")
    assert load(by_file).stage == 1
    both = tmp_path / "both.yml"
    both.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n  zero_stage: 2\n")
    assert "deepspeed_config_file is set together with ['zero_stage']" in problems_of(both)[0]
    other = tmp_path / "multi.yaml"
    other.write_text("distributed_type: MULTI_GPU\n")
    assert "distributed_type='MULTI_GPU'" in problems_of(other)[0]


# --- deprecated names and aliases --------------------------------------------------------------------------

def test_deprecated_names_are_mapped_with_a_warning():
    config = {**BASE, "bfloat16": {"enabled": True}, "communication_data_type": "bfp16",
              "zero_optimization": {"stage": 2, "cpu_offload": True, "stage3_gather_fp16_weights_on_model_save": True}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(config, world_size=8)
    deprecations = [str(w.message) for w in caught if w.category is ConfigDeprecationWarning]
    assert len(deprecations) == 4
    assert cfg.precision().compute_dtype == np.dtype(jax.numpy.bfloat16)
    assert cfg.precision().reduce_dtype == np.dtype(jax.numpy.bfloat16)
    assert cfg.offload_optimizer.device == "cpu" and cfg.gather_16bit_weights_on_model_save
    assert load({**BASE, "zero_optimization": True}).stage == 1
    assert load({**BASE, "zero_optimization": False}).stage == 0


@pytest.mark.parametrize("zero,fragment", [
    ({"stage3_gather_fp16_weights_on_model_save": True, "stage3_gather_16bit_weights_on_model_save": True},
     "(deprecated) and stage3_gather_16bit_weights_on_model_save are both given"),
    ({"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}, "cpu_offload (deprecated) and"),
    ({"stage": 3, "prefetch_bucket_size": 10, "stage3_prefetch_bucket_size": 20}, "the same setting given twice"),
])
def test_old_and_new_name_together_is_an_error(zero, fragment):
    assert any(fragment in p for p in problems_of({**BASE, "zero_optimization": zero}))
    assert "bf16 and its deprecated name bfloat16" in problems_of({**BASE, "bf16": {}, "bfloat16": {}})[0]


def test_short_and_prefixed_names_are_the_same_key():
    short = load({**BASE, "zero_optimization": {"stage": 3, "param_persistence_threshold": 7, "max_live_parameters": 3}})
    assert short.zero_optimization.stage3_param_persistence_threshold == 7
    assert short.to_dict()["zero_optimization"]["stage3_max_live_parameters"] == 3


# --- validation --------------------------------------------------------------------------------------------

def test_unknown_key_in_a_block_gets_did_you_mean():
    problems = problems_of({**BASE, "zero_optimization": {"stage": 3, "stage3_param_persitance_threshold": 1e5},
                            "fp16": {"enabled": True, "loss_scale_windows": 10}})
    assert ("zero_optimization.stage3_param_persitance_threshold is not a DeepSpeed zero_optimization key "
            "(did you mean 'stage3_param_persistence_threshold'?); fix or remove it.") in problems
    assert any("fp16.loss_scale_windows" in p and "'loss_scale_window'" in p for p in problems)


def test_unknown_top_level_keys_get_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config({**BASE, "fp8": {"enabled": True}, "my_tool": 1, "steps_per_print": 5}, world_size=8)
    unknown = [str(w.message) for w in caught if "unknown top-level" in str(w.message)]
    assert unknown == ["unknown top-level keys, ignored as DeepSpeed ignores them: fp8, my_tool."]
    assert all(issubclass(w.category, ConfigWarning) for w in caught)


@pytest.mark.parametrize("config,fragment", [
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage='3' is invalid: it must be an integer"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4 is invalid: it must be <= 3"),
    ({"zero_optimization": {"reduce_bucket_size": 1.5}}, "reduce_bucket_size=1.5 is invalid: it must be an integer"),
    ({"zero_optimization": {"overlap_comm": "yes"}}, "overlap_comm='yes' is invalid: it must be true or false"),
    ({"gradient_clipping": -1}, "gradient_clipping=-1 is invalid: it must be >= 0.0"),
    ({"communication_data_type": "int8"}, "communication_data_type='int8' is invalid: it must be one of"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled and bf16.enabled are both true"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
     "offload_param.device='nvme' is not supported in zerojax"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     "ratio=0.5 < 1 (partial offload) needs stage 3"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 3}}, "does not divide the data-parallel world"),
    ({"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 2}}, "(hpZ) needs stage 3"),
    ({"fp16": "on"}, "fp16='on' is invalid: it must be an object"),
    ({"amp": {"enabled": True}}, "NVIDIA Apex AMP is not supported"),
    ({"optimizer": {"type": "Muon", "params": {}}}, "optimizer.type='Muon' is not supported"),
])
def test_wrong_types_ranges_and_combinations_name_the_key(config, fragment):
    assert any(fragment in p for p in problems_of({**BASE, **config})), problems_of({**BASE, **config})


# --- "auto" ------------------------------------------------------------------------------------------------

AUTO_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


def test_auto_is_resolved_from_training_args_and_hidden_size():
    args = TrainingArguments(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-4,
                             adam_beta2=0.95, weight_decay=0.1, max_grad_norm=0.5, bf16=True,
                             train_dataset_size=1000, num_train_epochs=2, warmup_steps=0.1)
    cfg = load(AUTO_CONFIG, training_args=args, model_config={"text_config": {"hidden_sizes": [32, 64]}})
    d = cfg.to_dict()
    # 1000 samples / (4 × 8 ranks) = 32 batches → 16 steps per epoch → 32 steps; warmup ceil(3.2) = 4
    assert (d["train_batch_size"], d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"]) == (64, 4, 2)
    assert d["gradient_clipping"] == 0.5 and d["bf16"]["enabled"] is True
    assert d["optimizer"]["params"] | {} == {**d["optimizer"]["params"], "lr": 3e-4, "betas": [0.9, 0.95],
                                            "eps": 1e-8, "weight_decay": 0.1}
    assert d["scheduler"]["params"]["total_num_steps"] == 32 and d["scheduler"]["params"]["warmup_num_steps"] == 4
    assert d["scheduler"]["params"]["warmup_min_lr"] == 0 and d["scheduler"]["params"]["warmup_max_lr"] == 3e-4
    assert d["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert d["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert d["zero_optimization"]["stage3_param_persistence_threshold"] == 640


def test_all_mismatches_in_one_error_naming_both_sides():
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "fp16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}}}
    args = TrainingArguments(per_device_train_batch_size=4, max_grad_norm=0.3, learning_rate=2e-5)
    problems = problems_of(config, training_args=args)
    assert problems == [
        "train_micro_batch_size_per_gpu=2 in the config but TrainingArguments.per_device_train_batch_size gives 4; "
        'make them agree or set train_micro_batch_size_per_gpu to "auto".',
        "gradient_clipping=1.0 in the config but TrainingArguments.max_grad_norm gives 0.3; make them agree or set "
        'gradient_clipping to "auto".',
        "optimizer.params.lr=0.001 in the config but TrainingArguments.learning_rate gives 2e-05; make them agree "
        'or set optimizer.params.lr to "auto".',
        'fp16.enabled=True in the config but TrainingArguments.fp16 gives False; make them agree or set '
        'fp16.enabled to "auto".',
    ]


def test_unresolvable_auto_names_key_and_fix():
    problems = problems_of(AUTO_CONFIG)
    assert ('optimizer.params.lr is "auto" but no training_args were given (pass TrainingArguments, or --args in '
            'the CLI); write a value instead of "auto".') in problems
    assert any(p.startswith('zero_optimization.reduce_bucket_size is "auto" but the model\'s hidden size is unknown')
               for p in problems)
    assert all("invalid" not in p for p in problems)  # each unresolved "auto" is reported once
    no_total = problems_of(AUTO_CONFIG, training_args=TrainingArguments(), model_config={"hidden_size": 8})
    assert no_total == ['scheduler.params.total_num_steps is "auto" but TrainingArguments set neither max_steps '
                        'nor train_dataset_size; write a value instead of "auto".',
                        'scheduler.params.warmup_num_steps is "auto" but TrainingArguments set neither max_steps '
                        'nor train_dataset_size; write a value instead of "auto".']
    assert "sub_group_size='auto' is invalid" in problems_of(
        {**BASE, "zero_optimization": {"sub_group_size": "auto"}})[0]


def test_stage3_auto_keys_below_stage3_take_defaults():
    cfg = load({**BASE, "zero_optimization": {"stage": 2, "stage3_prefetch_bucket_size": "auto"}})
    assert cfg.zero_optimization.stage3_prefetch_bucket_size == 50_000_000


@pytest.mark.parametrize("given,ws,expected", [
    (dict(train_batch_size=32, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2), 8, (32, 2, 2)),
    (dict(train_batch_size=32, train_micro_batch_size_per_gpu=2), 8, (32, 2, 2)),
    (dict(train_batch_size=32, gradient_accumulation_steps=4), 8, (32, 1, 4)),
    (dict(train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=2), 4, (24, 3, 2)),
    (dict(train_batch_size=32), 8, (32, 4, 1)),
    (dict(train_micro_batch_size_per_gpu=5), 2, (10, 5, 1)),
])
def test_batch_size_rules(given, ws, expected):
    cfg = load(given, world_size=ws)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == expected


def test_batch_size_errors():
    assert "DeepSpeed requires equality" in problems_of(
        {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2})[0]
    assert "neither train_batch_size nor train_micro_batch_size_per_gpu is set" in problems_of(
        {"gradient_accumulation_steps": 2})[0]
    assert "train_batch_size=0 is invalid: it must be >= 1" in problems_of({"train_batch_size": 0})[0]


# --- mapping -----------------------------------------------------------------------------------------------

def test_precision_mapping():
    p = load({**BASE, "bf16": {"enabled": True}, "communication_data_type": "fp32",
              "data_types": {"grad_accum_dtype": "bf16"}}).precision()
    assert (str(p.compute_dtype), str(p.master_dtype), str(p.reduce_dtype), str(p.accum_dtype)) == (
        "bfloat16", "float32", "float32", "bfloat16")
    assert load({**BASE, "bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}).precision().mixed is False
    fp32 = load({**BASE, "fp32_allreduce": True}).precision()
    assert fp32 == zj.Precision(reduce_dtype="fp32") and fp32.loss_scale is None


def test_mesh_shape_rules_and_offload():
    mics = load({**BASE, "zero_optimization": {"stage": 3, "mics_shard_size": 4,
                                               "stage3_param_persistence_threshold": 10}})
    assert mics.mesh_shape(8) == {"replica": 2, "fsdp": 4} and mics.hierarchy == "mics"
    mesh = zj.make_mesh(**mics.mesh_shape(8))
    assert mics.zero_rules(mesh) == zj.ZeroRules(mesh, stage=3, persistence_threshold=10, hierarchy="mics")
    with pytest.raises(ConfigError, match="mics_shard_size=4 does not divide the 6"):
        mics.mesh_shape(6)
    plain = load({**BASE, "zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 10}})
    assert plain.mesh_shape(8) == {"replica": 1, "fsdp": 8}
    assert plain.zero_rules(zj.make_mesh()).persistence_threshold == 0  # the threshold is a stage-3 notion
    off = load({**BASE, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                              "offload_param": {"device": "cpu"}}})
    o = off.offload()
    assert (o.optimizer, o.params, o.ratio) == ("unpinned_host", "pinned_host", 1.0)


def test_gradient_clipping_default_is_deepspeed_0_19_3():
    assert load(BASE).gradient_clipping == 1.0
    assert load({**BASE, "gradient_clipping": 0}).gradient_clipping == 0.0


# --- XLA flags ---------------------------------------------------------------------------------------------

def test_xla_flags_from_comm_keys():
    cfg = load({**BASE, "bf16": {"enabled": True}, "communication_data_type": "fp32",
                "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 300,
                                      "allgather_bucket_size": 7}})
    assert cfg.xla_flags().split() == [
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_reduce_scatter_combine_threshold_bytes=4000",
        "--xla_gpu_all_reduce_combine_threshold_bytes=4000",
        "--xla_gpu_all_gather_combine_threshold_bytes=600",
    ]
    stage2 = load({**BASE, "zero_optimization": {"stage": 2, "allgather_bucket_size": 7}})
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in stage2.xla_flags()
    assert "--xla_gpu_all_gather_combine_threshold_bytes=28" in stage2.xla_flags()
    assert merge_flags("--a=1 --xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_enable_latency_hiding_"
                       "scheduler=false") == "--a=1 --xla_gpu_enable_latency_hiding_scheduler=false"


def test_xla_flag_names_exist_in_jaxlib_and_start():
    import jaxlib

    blob = (Path(jaxlib.__file__).parent / "libjax_common.so").read_bytes()
    for name in FLAG_NAMES:
        assert name.encode() + b"\x00" in blob, name
    flags = load({**BASE, "zero_optimization": {"stage": 3}}).xla_flags()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", "import jax.numpy as j; print(int(j.arange(3).sum()))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "3", run.stderr[-2000:]


# --- CLI ---------------------------------------------------------------------------------------------------

def test_cli_prints_resolved_json(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(AUTO_CONFIG))
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"bf16": True, "max_steps": 100, "per_device_train_batch_size": 2}))
    rc = cli.main(["config", str(ds), "--args", str(args), "--world-size", "4", "--hidden-size", "16"])
    out, err = capsys.readouterr()
    assert rc == 0
    resolved = json.loads(out)
    assert resolved["train_batch_size"] == 8 and resolved["zero_optimization"]["reduce_bucket_size"] == 256
    assert resolved["zero_optimization"]["overlap_comm"] is True
    assert '"auto"' not in out


def test_cli_bad_config_goes_to_stderr_with_exit_2(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(AUTO_CONFIG))
    assert cli.main(["config", str(ds)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "zerojax config: error:" in err and "optimizer.params.lr" in err
    bad_args = tmp_path / "args.json"
    bad_args.write_text('{"learning_rat": 1}')
    assert cli.main(["config", str(ds), "--args", str(bad_args)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown fields ['learning_rat']" in err


# --- TrainingArguments and docs -----------------------------------------------------------------------------

def test_training_arguments_defaults_and_checks():
    import dataclasses

    import transformers

    ours = TrainingArguments()
    theirs = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(transformers.TrainingArguments)}
    for f in dataclasses.fields(TrainingArguments):
        if f.name in theirs and f.name not in ("lr_scheduler_type", "warmup_ratio", "eval_strategy"):  # None: see args.py
            assert getattr(ours, f.name) == theirs[f.name], f.name
    assert ours.lr_scheduler_type == "linear" == str(theirs["lr_scheduler_type"])
    with pytest.raises(ValueError, match="save_only_model=True with load_best_model_at_end=True"):
        TrainingArguments(save_only_model=True, load_best_model_at_end=True)
    with pytest.raises(ValueError, match="lr_scheduler_type='polynomial' is not supported"):
        TrainingArguments(lr_scheduler_type="polynomial")
    assert TrainingArguments(warmup_steps=0.25).warmup_steps_for(10) == 3


def test_docs_table_matches_the_code():
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert keys.key_table() in doc
    for table in (OPTIMIZER_PARAMS, SCHEDULER_PARAMS):
        assert all(name in doc or name in ("adam", "adamw", "lamb", "lion", "adagrad", "sgd") for name in table)


# --- property: the loader returns a config or raises ConfigError, nothing else -----------------------------

NAMES = sorted({k for spec in keys.BLOCKS.values() for key in spec for k in (key.name, *key.aliases)}
               | {k for t in (*OPTIMIZER_PARAMS.values(), *SCHEDULER_PARAMS.values()) for k in t}
               | set(SCHEDULER_PARAMS) | {"type", "params", "enabled", "device", "bfloat16", "cpu_offload",
                                          "stage3_gather_fp16_weights_on_model_save", "Adam", "Lamb"})
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
                    st.sampled_from(["auto", "cpu", "nvme", "none", "bf16", "bfp16", "log", "linear", "AdamW",
                                     "OneCycle", "WarmupLR", ""]), st.text(max_size=8))
KEYS = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(KEYS, inner, max_size=6)), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.dictionaries(KEYS, VALUES, max_size=8), with_args=st.booleans(), ws=st.integers(1, 64),
       hidden=st.one_of(st.none(), st.integers(1, 4096)))
def test_loader_returns_config_or_config_error(config, with_args, ws, hidden):
    args = TrainingArguments(max_steps=20) if with_args else None
    model = {"hidden_size": hidden} if hidden else None
    try:
        cfg = load(config, training_args=args, model_config=model, world_size=ws)
    except ConfigError:
        return
    json.dumps(cfg.to_dict())
    cfg.precision()
    cfg.mesh_shape(ws)


CORPUS = Path(__file__).parent / "ds_configs"
CORPUS_JSON = []
for _path in sorted(CORPUS.glob("*")):
    try:
        CORPUS_JSON.append(json.loads(_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), with_args=st.booleans())
def test_mutated_real_configs_load_or_raise_config_error(data, with_args):
    """A real config with one value replaced by anything: a config or a ConfigError, never another error."""
    config = json.loads(json.dumps(data.draw(st.sampled_from(CORPUS_JSON))))
    path = data.draw(st.sampled_from([p for p in _paths(config) if p]))
    node = config
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = data.draw(VALUES)
    args = TrainingArguments(max_steps=20, bf16=data.draw(st.booleans())) if with_args else None
    try:
        cfg = load(config, training_args=args, model_config={"hidden_size": 64}, world_size=data.draw(
            st.sampled_from([1, 2, 8, 16, 64])))
    except ConfigError:
        return
    json.dumps(cfg.to_dict())
    cfg.precision()
    if cfg.optimizer_spec is not None:
        cfg.optimizer(total_steps=10)


# --- stage "auto" ---------------------------------------------------------------------------------------------

def test_stage_auto_lists_the_options_the_config_allows_and_resolves_by_with_stage():
    auto = lambda **zero: load_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": "auto", **zero}},
                                      world_size=8)
    assert auto().stage_options() == zj.config.AUTO_ORDER
    assert auto(offload_optimizer={"device": "cpu"}).stage_options() == ((2, True, False), (3, True, False), (3, True, True))
    assert auto(offload_param={"device": "cpu"}).stage_options() == ((3, True, True),)
    assert [o[0] for o in auto(zero_hpz_partition_size=4).stage_options()] == [3, 3, 3]
    assert [o[0] for o in auto(offload_optimizer={"device": "cpu", "ratio": 0.5}).stage_options()] == [3, 3]
    assert min(o[0] for o in auto(mics_shard_size=4).stage_options()) == 1
    assert load_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}).stage_options() == (
        (2, False, False),)
    # hidden-size "auto" values resolve as at stage 3, and the stage-3 XLA flags are used
    cfg = load_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": "auto", "stage3_param_persistence_threshold": "auto", "overlap_comm": False}}, model_config={"hidden_size": 64})
    assert cfg.zero_optimization.stage3_param_persistence_threshold == 640
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in cfg.xla_flags()
    with pytest.raises(ConfigError, match=r'zero_optimization.stage is "auto".*config.with_stage'):
        cfg.zero_rules(zj.make_mesh())
    resolved = cfg.with_stage(3, offload_optimizer=True)
    assert (resolved.stage, resolved.offload_optimizer.enabled, resolved.offload_param.enabled) == (3, True, False)
    assert resolved.zero_optimization.stage3_param_persistence_threshold == 640
    assert resolved.zero_rules(zj.make_mesh()).stage == 3
    with pytest.raises(ConfigError, match=r"hpZ\) needs stage 3, but stage=1"):
        auto(zero_hpz_partition_size=4).with_stage(1)
