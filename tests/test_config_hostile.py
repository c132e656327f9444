"""Hostile config input (issue 17): every config is read with bounded work into a short ConfigError that
names the key and the fix, never a hang, a giant message or a Python error from inside the loader."""

import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerojax import cli
from zerojax.args import TrainingArguments
from zerojax.config import ConfigError, ConfigWarning, keys, load_config

BASE = {"train_batch_size": 8}
ACCELERATE = "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"


def error_of(source, **kw) -> str:
    """The ConfigError message `load_config` gives for `source`, checked to come within 1 s and under 2 kB."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as e:
            load_config(source, world_size=kw.pop("world_size", 1), **kw)
    assert time.perf_counter() - start < 1.0
    message = str(e.value)
    assert len(message) < 2000, message[:300]
    return message


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- item 6: bounded work and bounded messages --------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_at_the_first_alias(tmp_path):
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"] + [f"{b}: &{b} [{','.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    text = "distributed_type: DEEPSPEED\n" + "\n".join(levels) + "\ndeepspeed_config:\n  zero_stage: *i\n"
    bomb = write(tmp_path, "bomb.yaml", text)
    assert len(text) < 400  # zero_stage expands to 9**9 = 387,420,489 strings
    message = error_of(bomb)
    assert "line 3 uses the alias *a" in message and "write the value out" in message, message


def test_shared_and_self_referencing_dicts_are_bounded():
    level = ["x"] * 9
    for _ in range(9):
        level = [level] * 9  # 9**10 leaves through shared lists
    assert "holds more than 10,000 values" in error_of({**BASE, "wandb": level})
    loop = {**BASE, "wandb": {}}
    loop["wandb"]["again"] = loop
    assert "wandb.again.wandb.again" in error_of(loop) and "contains itself" in error_of(loop)


def test_many_unknown_keys_give_a_short_error_fast():
    huge = error_of({**BASE, "zero_optimization": {f"k{i}": 1 for i in range(100_000)}})
    assert "holds more than 10,000 values" in huge and "remove the extra entries" in huge
    message = error_of({**BASE, "zero_optimization": {f"stage{i}": 1 for i in range(2_000)}})
    assert message == ("zero_optimization has 2,000 keys that are not DeepSpeed zero_optimization keys: stage0, "
                       "stage1, stage2, stage3, stage4 and 1,995 more; fix or remove them.")
    many = error_of({**BASE, "zero_optimization": {k.name: "x" for k in keys.ZERO if k.kind in ("int", "bool")}})
    assert many.startswith("35 problems:\n- zero_optimization.stage='x' is invalid")
    assert many.count("\n- ") == 11 and many.endswith("\n- and 25 more (fix these and run again to see them)")


def test_many_unknown_top_level_keys_give_a_short_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config({**BASE, **{f"tool{i}": 1 for i in range(5_000)}}, world_size=1)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert message.endswith("tool0, tool1, tool10, tool100, tool1000 and 4,995 more.") and len(message) < 200


def test_accelerate_unknown_keys_are_listed_briefly(tmp_path):
    keys = "".join(f"  k{i}: 1\n" for i in range(1_000))
    message = error_of(write(tmp_path, "acc.yaml", ACCELERATE + "  zero_stage: 2\n" + keys))
    assert "unknown deepspeed_config keys k0, k1, k10, k100, k101 and 995 more" in message


def test_oversized_inputs_are_refused_before_parsing(tmp_path):
    big_json = write(tmp_path, "big.json", json.dumps({**BASE, "note": "x" * 300_000}))
    assert "is larger than 256 KiB" in error_of(big_json)
    big_yaml = write(tmp_path, "big.yaml", ACCELERATE + "  zero_stage: 2\n# " + "x" * 20_000 + "\n")
    assert "is larger than 16 KiB" in error_of(big_yaml)


def test_cli_prints_one_short_error_for_an_alias_bomb(tmp_path, capsys):
    bomb = write(tmp_path, "bomb.yaml", ACCELERATE + "  zero_stage: &s [1, 1]\n  gradient_clipping: *s\n")
    assert cli.main(["config", str(bomb)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "uses the alias *s" in err and len(err) < 2000


# --- item 12: every malformed value is a ConfigError naming the key --------------------------------------------

def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("name,source,fragments", [
    ("int 10**400", {**BASE, "gradient_clipping": 10**400},
     ("gradient_clipping=<an integer of ~401 digits> is out of range", "write a smaller value")),
    ("int 10**400 as an optimizer parameter", {**BASE, "optimizer": {"type": "AdamW", "params": {"lr": 10**400}}},
     ("optimizer.params.lr=<an integer of ~401 digits>",)),
    ("nesting 600 deep", {**BASE, "wandb": nested(600)},
     ("wandb[0][0]", "nests more than 32 levels deep", "remove the extra nesting")),
])
def test_malformed_dict_values_name_the_key(name, source, fragments):
    message = error_of(source)
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize("name,text,fragments", [
    ("int 10**400", '{"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 1%s}}' % ("0" * 400),
     ("zero_optimization.reduce_bucket_size=<an integer of ~401 digits> is out of range",)),
    ("4301 digits", '{"train_batch_size": 8, "steps_per_print": %s}' % ("9" * 4301),
     ("steps_per_print=<an integer of ~4,301 digits> is out of range", "below 2**63")),
    ("nesting 600 deep", '{"train_batch_size": 8, "wandb": ' + "[" * 600 + "1" + "]" * 600 + "}",
     ("wandb[0][0]", "nests more than 32 levels deep")),
])
def test_malformed_json_values_name_the_key(tmp_path, name, text, fragments):
    message = error_of(write(tmp_path, "ds.json", text))
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize("name,body,fragments", [
    ("4301 digits", "  zero_stage: 2\n  gradient_clipping: %s\n" % ("9" * 4301),
     ("deepspeed_config.gradient_clipping=<an integer of ~4,301 digits> is out of range",)),
    ("nesting 600 deep", "  zero_stage: " + "[" * 600 + "1" + "]" * 600 + "\n",
     ("line 4 nests more than 32 levels deep", "remove the extra nesting")),
    ("mixed key types", "  zero_stage: 2\n  1: one\n  other: two\n",
     ("the key 1 in deepspeed_config is not a string (int)", "quote it")),
    ("a date where a number belongs", "  zero_stage: 2024-01-01\n",
     ("deepspeed_config.zero_stage=datetime.date(2024, 1, 1) is not a JSON value (date)",)),
    ("a config that includes itself", "  deepspeed_config_file: acc.yaml\n",
     ("deepspeed_config_file='acc.yaml' is YAML; it must name the DeepSpeed JSON config",)),
])
def test_malformed_accelerate_yaml_names_the_key(tmp_path, name, body, fragments):
    message = error_of(write(tmp_path, "acc.yaml", ACCELERATE + body))
    assert all(f in message for f in fragments), message


def _first_update(weight_decay):
    cfg = load_config({**BASE, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": weight_decay}}},
                      world_size=1)
    tx = cfg.optimizer()
    params = {"w": jnp.linspace(-1.0, 1.0, 4)}
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    return np.asarray(updates["w"])


def test_an_integer_hyperparameter_past_int32_runs_as_the_float_it_means():
    """`weight_decay: 2147483648` used to become an int32 inside optax and overflow at the first update;
    numeric hyperparameters are floats (as in torch), so it decays exactly as 2147483648.0 does."""
    np.testing.assert_array_equal(_first_update(2147483648), _first_update(2147483648.0))
    cfg = load_config({**BASE, "optimizer": {"type": "Adam", "params": {"weight_decay": 3, "lr": 1}}}, world_size=1)
    assert all(type(cfg.optimizer_spec.params[k]) is float for k in ("lr", "weight_decay", "eps"))


def test_cli_args_file_with_a_huge_integer_is_a_one_line_error(tmp_path, capsys):
    ds = write(tmp_path, "ds.json", json.dumps(BASE))
    args = write(tmp_path, "args.json", '{"learning_rate": %s}' % ("9" * 5000))
    assert cli.main(["config", str(ds), "--args", str(args)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate=<an integer of ~5,000 digits> is out of range" in err and len(err) < 2000


# --- item 14 (config part): deprecated keys are named as written ------------------------------------------------

@pytest.mark.parametrize("config,fragment", [
    ({**BASE, "bfloat16": 1}, "bfloat16=1 is invalid: it must be an object."),
    ({**BASE, "bfloat16": {"enabled": "yes"}}, "bfloat16.enabled='yes' is invalid: it must be true or false."),
    ({**BASE, "bfloat16": {"enabled": "auto"}}, 'bfloat16.enabled is "auto" but no training_args were given'),
    ({**BASE, "zero_optimization": {"stage3_gather_fp16_weights_on_model_save": 2}},
     "zero_optimization.stage3_gather_fp16_weights_on_model_save=2 is invalid: it must be true or false."),
])
def test_deprecated_keys_are_named_as_the_user_wrote_them(config, fragment):
    message = error_of(config)
    assert fragment in message and "bf16." not in message and "16bit" not in message, message


def test_a_deprecated_block_still_resolves_auto_and_maps():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config({**BASE, "bfloat16": {"enabled": "auto"}}, TrainingArguments(bf16=True, max_steps=5),
                          world_size=1)
    assert cfg.bf16.enabled and cfg.to_dict()["bf16"]["enabled"] is True and "bfloat16" not in cfg.to_dict()
