"""Models with RNG state (dropout) train under the Trainer: a key per step, rank and micro-batch.

A Flax NNX model whose state is more than its `nnx.Param`s (a `Dropout` with its RNG stream) trains at
stage 3 on 8 devices; a run is a pure function of its seed (bit-identical when repeated, different
with another seed); with dropout rate 0 it trains exactly like the same model without the `Dropout`;
evaluation is deterministic. The same step serves a Linen model through `apply(..., rngs=)`.
"""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import zerojax as zj
from zerojax.args import TrainingArguments
from zerojax.data import text_dataset
from zerojax.trainer import Trainer

CORPUS = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "corpus.txt")
CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}


class DropoutLM(nnx.Module):
    """Embedding, dropout (none when `rate` is None), a hidden layer and the output projection."""

    def __init__(self, rate: float | None, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, 32, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs) if rate is not None else None
        self.hidden = nnx.Linear(32, 32, rngs=rngs)
        self.head = nnx.Linear(32, 256, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        x = self.embed(ids)
        if self.drop is not None:
            x = self.drop(x)
        return self.head(jax.nn.gelu(self.hidden(x)))


@pytest.fixture(scope="module")
def data():
    return text_dataset(CORPUS, 17, stride=8)


def run(data, rate, seed=0, steps=4):
    with nnx.use_eager_sharding(False):
        model = DropoutLM(rate, nnx.Rngs(params=0, dropout=1))
    args = TrainingArguments(deepspeed=copy.deepcopy(CONFIG), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_steps=steps, logging_steps=1,
                             seed=seed)
    trainer = Trainer(model, args, data[0], data[1])
    trainer.train()
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    return trainer, np.asarray(losses), [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def test_a_dropout_model_trains_at_stage_3_as_a_pure_function_of_its_seed(data):
    first, losses, params = run(data, 0.5)
    assert first.plan.rules.stage == 3 and first.key is not None and len(losses) == 4
    assert np.all(np.isfinite(losses))
    _, again, params_again = run(data, 0.5)
    np.testing.assert_array_equal(again, losses)
    for a, b in zip(params_again, params):
        np.testing.assert_array_equal(a, b)
    _, other_seed, _ = run(data, 0.5, seed=1)
    assert not np.array_equal(other_seed, losses), "another seed must drop other units"
    evals = {first.evaluate()["eval_loss"] for _ in range(2)}
    assert len(evals) == 1, "evaluation runs without dropout"


def test_dropout_rate_zero_trains_exactly_like_no_dropout(data):
    _, zero, zero_params = run(data, 0.0)
    _, none, none_params = run(data, None)
    np.testing.assert_array_equal(zero, none)
    for a, b in zip(zero_params, none_params):
        np.testing.assert_array_equal(a, b)


def test_a_linen_model_takes_its_dropout_key_through_apply():
    class Mlp(linen.Module):
        @linen.compact
        def __call__(self, x, train: bool):
            x = linen.Dense(16)(x)
            return linen.Dense(1)(linen.Dropout(0.5, deterministic=not train)(x))

    model = Mlp()
    params = model.init(jax.random.key(0), jnp.ones((1, 8)), train=False)["params"]
    plan = zj.make_plan(params, optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3))

    def loss_fn(p, batch, key):
        out = model.apply({"params": p}, batch["x"], train=key is not None, rngs={"dropout": key} if key is not None else {})
        return jnp.mean((out[:, 0] - batch["y"]) ** 2)

    batch = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "y": np.ones(16, np.float32)}
    step = zj.make_train_step(loss_fn, plan, rng=True)
    results = []
    for seed in (0, 0, 1):
        state, metrics = step(zj.init_state(params, plan), batch, jax.random.key(seed))
        results.append(float(metrics["loss"]))
    assert results[0] == results[1] != results[2]
    evaluate = zj.make_eval_step(loss_fn, plan, rng=True)
    assert float(evaluate(state.params, batch)) == float(evaluate(state.params, batch))
    with pytest.raises(ValueError, match=r"needs a key: step\(state, batch, jax.random.key\(seed\)\)"):
        step(state, batch)
