"""The Trainer with Hugging Face inputs (issue 16, items 4 and 8): a `datasets.Dataset`, an iterable of batches
(resumable), eval/save/logging strategies, callbacks, TensorBoard event files, perplexity, gradient
checkpointing, average_tokens_across_devices, and the one warning for fields without effect."""

import copy
import math
import re
import shutil
import struct
import warnings

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

from zerojax.args import ArgsWarning, TrainingArguments
from zerojax.callbacks import TrainerCallback
from zerojax.data import IterableBatches, as_columns
from zerojax.models import from_hf_config
from zerojax.trainer import Trainer

TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
DEVICES = 4


def ids(n=16, t=9, seed=0):
    return np.random.default_rng(seed).integers(0, 64, size=(n, t), dtype=np.int32)


def make(train, eval_data=None, *, model=None, callbacks=None, **kw):
    with nnx.use_eager_sharding(False):
        model = model or from_hf_config(TINY, seed=0)
    base = dict(deepspeed=copy.deepcopy(CONFIG), per_device_train_batch_size=1, learning_rate=1e-2, max_steps=4,
                logging_steps=1, save_steps=500, disable_tqdm=True)
    args = TrainingArguments(**{**base, **kw})
    return Trainer(model, args, train, eval_data, hf_config=TINY, devices=jax.devices()[:DEVICES], callbacks=callbacks)


def losses(t):
    return [r["loss"] for r in t.history if "loss" in r]


# --- datasets.Dataset ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hf_dataset_trains_as_the_same_numpy_array():
    data = ids()
    a = make(data)
    a.train()
    b = make(datasets.Dataset.from_dict({"input_ids": data.tolist(), "text": ["x"] * len(data)}))
    b.train()
    assert losses(a) == losses(b) and len(losses(a)) == 4


def test_ragged_hf_dataset_is_padded_with_mask_and_labels():
    rows = [list(range(1, 2 + i % 7)) for i in range(12)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": [[-100] + r[1:] for r in rows], "text": ["t"] * 12})
    cols = as_columns(ds)
    assert sorted(cols) == ["attention_mask", "input_ids", "labels"]  # text dropped (remove_unused_columns)
    batch = {k: v[[0, 6]] for k, v in cols.items()}
    np.testing.assert_array_equal(batch["input_ids"], [[1, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 0, 0, 0, 0, 0, 0], [1] * 7])
    np.testing.assert_array_equal(batch["labels"][0], [-100] * 7)
    with pytest.raises(TypeError, match="column 'text' holds string values"):
        as_columns(ds, remove_unused_columns=False)
    with pytest.raises(ValueError, match="needs an input_ids column"):
        as_columns(datasets.Dataset.from_dict({"text": ["a"]}))
    t = make(ds, ds, max_steps=2)
    out = t.train()
    assert math.isfinite(out.training_loss) and math.isfinite(t.evaluate()["eval_loss"])


# --- iterables of batches -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_iterable_of_batches_trains_and_resumes(tmp_path):
    data = ids(n=24)
    batches = [{"input_ids": data[i:i + DEVICES]} for i in range(0, 24, DEVICES)]  # 6 global batches
    whole = make(batches, max_steps=6)
    whole.train()
    first = make(batches, max_steps=6, output_dir=str(tmp_path), save_steps=3)
    first.train()
    resumed = make(batches, max_steps=6, output_dir=str(tmp_path), save_steps=3)
    resumed.trainer_state.log_history.clear()
    # resume from step 3: the first 3 batches of a fresh pass are read and skipped
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    resumed.train(resume_from_checkpoint=3)
    assert losses(resumed) == losses(whole)[3:]
    gen = (b for b in batches[:2])
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        make(gen, max_steps=3).train()
    with pytest.raises(ValueError, match="has no length to count epochs by; set TrainingArguments.max_steps"):
        make(iter(batches), max_steps=-1)


def test_iterable_batches_reads_forward_and_checks_shapes():
    ds = datasets.Dataset.from_dict({"input_ids": ids(n=8).tolist()}).to_iterable_dataset()
    it = IterableBatches(ds, 4)
    assert it.batch(0)["input_ids"].shape == (4, 9) and it.batch(1)["input_ids"].shape == (4, 9)
    with pytest.raises(ValueError, match="read forward only"):
        it.batch(0)
    bad = IterableBatches([{"input_ids": np.zeros((3, 5), np.int32)}], 4)
    with pytest.raises(ValueError, match="batch 0 has leading sizes {'input_ids': 3}"):
        bad.batch(0)


# --- strategies, callbacks, TensorBoard, perplexity --------------------------------------------------------------

class Recorder(TrainerCallback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_step_end(self, args, state, control, **kw):
        self.events.append(("step", state.global_step))
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.events.append(("evaluate", state.global_step, metrics["eval_perplexity"]))

    def on_save(self, args, state, control, **kw):
        self.events.append(("save", state.global_step))


def read_scalars(folder):
    """(tag, step, value) of every scalar in the TFRecord event files under `folder`, CRCs checked."""
    from tensorboardX.proto import event_pb2

    def crc32c(data):
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
        crc ^= 0xFFFFFFFF
        return ((crc >> 15) | (crc << 17)) + 0xA282EAD8 & 0xFFFFFFFF

    out = []
    for path in folder.rglob("events.out.tfevents.*"):
        raw = path.read_bytes()
        while raw:
            (length,), (length_crc,) = struct.unpack("<Q", raw[:8]), struct.unpack("<I", raw[8:12])
            data, (data_crc,) = raw[12:12 + length], struct.unpack("<I", raw[12 + length:16 + length])
            assert crc32c(raw[:8]) == length_crc and crc32c(data) == data_crc
            event = event_pb2.Event.FromString(data)
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value if v.HasField("simple_value")]
            raw = raw[16 + length:]
    return out


def test_epoch_strategies_callbacks_tensorboard(tmp_path):
    # 16 rows, global batch 4: 4 steps an epoch; 8 steps = 2 epochs
    recorder = Recorder()
    t = make(ids(), ids(n=8, seed=1), callbacks=[recorder], max_steps=8, output_dir=str(tmp_path),
             eval_strategy="epoch", save_strategy="epoch", logging_strategy="steps", logging_steps=3,
             report_to="tensorboard", run_name="run1")
    t.train()
    evals = [e for e in recorder.events if e[0] == "evaluate"]
    assert [e[1] for e in evals] == [4, 8]
    assert [e for e in recorder.events if e[0] == "save"] == [("save", 4), ("save", 8)]
    assert [e[1] for e in recorder.events if e[0] == "step"] == list(range(1, 9))
    record = [r for r in t.history if "eval_loss" in r][-1]
    assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
    assert [r["step"] for r in t.history if "loss" in r] == [1, 3, 6, 8]  # first, every 3, last
    scalars = read_scalars(tmp_path / "runs" / "run1")
    assert [s for tag, s, _ in scalars if tag == "train/loss"] == [1, 3, 6, 8]
    assert [(s, v) for tag, s, v in scalars if tag == "eval/perplexity"] == \
        [(r["step"], pytest.approx(r["eval_perplexity"], rel=1e-6)) for r in t.history if "eval_loss" in r]


def test_no_strategies_and_a_callback_that_stops(tmp_path):
    recorder = Recorder(stop_at=3)
    t = make(ids(), ids(n=8, seed=1), callbacks=[recorder], max_steps=8, output_dir=str(tmp_path),
             eval_strategy="no", save_strategy="steps", save_steps=100, logging_strategy="no")
    out = t.train()
    assert out.interrupted and out.global_step == 3 and t.history == []
    assert [e for e in recorder.events if e[0] != "step"] == [("save", 3)]  # a stop saves, as SIGTERM does
    on_start = make(ids(), ids(n=8, seed=1), max_steps=2, eval_strategy="steps", eval_steps=0.5, eval_on_start=True,
                    save_strategy="no", output_dir=str(tmp_path / "b"))
    on_start.train()
    assert [r["step"] for r in on_start.history if "eval_loss" in r] == [0, 1, 2]
    assert not (tmp_path / "b" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "b" / "checkpoints").iterdir())


def test_save_best(tmp_path):
    t = make(ids(), ids(n=8, seed=1), max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="best",
             output_dir=str(tmp_path), learning_rate=1e-3)
    t.train()
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    evals = {r["step"]: r["eval_loss"] for r in t.history if "eval_loss" in r}
    best_so_far = [s for s in evals if evals[s] == min(v for k, v in evals.items() if k <= s)]
    assert saved == best_so_far and t.trainer_state.best_metric == min(evals.values())


# --- gradient checkpointing, token averaging, the warning ----------------------------------------------------

@pytest.mark.slow  # test_models checks remat gradients; this checks the TrainingArguments mapping end to end
def test_gradient_checkpointing_rematerialises_the_layers():
    data = ids()
    plain, remat = make(data, max_steps=1), make(data, max_steps=1, gradient_checkpointing=True)
    assert remat.graphdef != plain.graphdef
    batch = remat.train_batches.batch(0)

    def jaxpr(t):
        return str(jax.make_jaxpr(jax.grad(lambda p: t.loss_fn.total(p, batch)))(t.state.params))

    rematerialised = re.compile(r"= (remat2?|checkpoint)\[")  # jax.checkpoint's primitive
    assert rematerialised.search(jaxpr(remat)) and not rematerialised.search(jaxpr(plain))
    remat.train()
    plain.train()
    np.testing.assert_allclose(losses(remat), losses(plain), rtol=1e-6)


def test_average_tokens_across_devices_and_one_warning():
    class NoRemat(nnx.Module):  # a model without a remat attribute
        def __init__(self):
            self.w = nnx.Param(np.zeros((4,), np.float32))

    assert make(ids(), max_steps=1).loss_fn.across_ranks is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = make(ids(), max_steps=1, average_tokens_across_devices=False, optim="sgd", label_smoothing_factor=0.1)
        make(ids(), model=NoRemat(), max_steps=1, gradient_checkpointing=True)
    assert t.loss_fn.across_ranks is False
    ours = [w for w in caught if issubclass(w.category, ArgsWarning)]
    assert len(ours) == 2, [str(w.message) for w in ours]
    assert "optim (" in str(ours[0].message) and "label_smoothing_factor (" in str(ours[0].message)
    assert "gradient_checkpointing (NoRemat has no remat attribute" in str(ours[1].message)
