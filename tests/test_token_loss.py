"""Token-weighted loss: a padded fine-tune matches PyTorch transformers' own Trainer step for step.

Hugging Face's Trainer counts the target tokens of all accumulation micro-batches on all devices
(`num_items_in_batch`, `average_tokens_across_devices`) and divides each micro-batch's summed loss by
that count, so every token of the global batch weighs the same. The reference here is the real
`transformers.Trainer` on one process (the sum over a global batch does not depend on how it is split
over devices), reading the batches in order; zerojax runs the same model, data, AdamW, linear schedule
with warm-up and clipping at stage 3 on 8 devices with 2 accumulation steps (`causal_lm_loss(...,
per_token=True)`). The per-rank mean (DeepSpeed's weighting) is visibly different on the same data.
"""

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import zerojax as zj
from tests import hf_tiny
from zerojax import models
from zerojax.hf import export_hf, load_pretrained
from zerojax.configured import decay_mask

STEPS, RANKS, ACCUM, SEQ = 4, 8, 2, 16
GLOBAL = RANKS * ACCUM
LR, WD, WARMUP = 3e-3, 0.01, 1


def padded_data(n: int = STEPS * GLOBAL, seed: int = 0) -> dict:
    """Sequences of 3 to SEQ tokens, right-padded: padding has attention 0 and label -100."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, hf_tiny.VOCAB, (n, SEQ)).astype(np.int64)
    lengths = rng.integers(3, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


class _InOrder(transformers.Trainer):
    """The real Trainer, reading the dataset in order and recording each step's loss exactly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_losses = []

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.micro_losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def torch_run(data: dict, tmp_path) -> tuple[np.ndarray, dict]:
    model = hf_tiny.torch_model("llama").__class__(hf_tiny.torch_model("llama").config)
    model.load_state_dict(hf_tiny.torch_model("llama").state_dict())
    rows = [{k: torch.as_tensor(v[i]) for k, v in data.items()} for i in range(len(data["input_ids"]))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=GLOBAL // ACCUM, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=LR, weight_decay=WD, warmup_steps=WARMUP, lr_scheduler_type="linear",
        max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True, average_tokens_across_devices=True,
    )
    trainer = _InOrder(model=model, args=args, train_dataset=rows)
    trainer.train()
    # each micro-batch's loss is its summed loss over the step's token count: a step's loss is their sum
    losses = np.asarray(trainer.micro_losses).reshape(STEPS, ACCUM).sum(axis=1)
    return losses, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def zerojax_run(data: dict, tmp_path, per_token: bool) -> tuple[np.ndarray, dict]:
    config = hf_tiny.hf_config("llama")
    hf_tiny.torch_model("llama").save_pretrained(tmp_path / "init")
    graphdef, abstract = models.abstract_model(config)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, LR, WARMUP), optax.linear_schedule(LR, 0.0, STEPS - WARMUP)], [WARMUP])
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, mask=decay_mask(abstract))
    plan = zj.make_plan(abstract, tx, zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision())
    state = zj.init_state(load_pretrained(tmp_path / "init", plan.param_shardings), plan)
    step = zj.make_train_step(models.causal_lm_loss(graphdef, per_token=per_token), plan, micro_batches=ACCUM,
                              max_grad_norm=1.0)
    losses = []
    for s in range(STEPS):
        # the global batch as zerojax splits it: rank r takes rows [r*ACCUM, (r+1)*ACCUM), micro-batch i its i-th;
        # Hugging Face's micro-batch i is rows [i*RANKS, (i+1)*RANKS): reorder so both see the same micro-batches
        rows = np.arange(GLOBAL).reshape(ACCUM, RANKS).T.reshape(-1) + s * GLOBAL
        batch = {k: np.asarray(v[rows], np.int32) for k, v in data.items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    out = tmp_path / ("zj-per-token" if per_token else "zj-mean")
    export_hf(state.params, config, out, dtype="fp32", progress=False)
    return np.asarray(losses), load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("token_loss")
    data = padded_data()
    return torch_run(data, tmp), zerojax_run(data, tmp, per_token=True), zerojax_run(data, tmp, per_token=False)


def test_padded_fine_tune_matches_the_transformers_trainer(runs):
    (want_losses, want_params), (losses, params), _ = runs
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=0)
    assert want_params.keys() == params.keys()
    for name, want in want_params.items():
        if name.endswith("k_proj.bias"):
            # a key bias adds the same q·b to every score of a query, which softmax ignores: its gradient
            # is zero but for rounding noise, which Adam scales to full-size steps (in both frameworks)
            continue
        np.testing.assert_allclose(params[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
    assert not np.allclose(params["model.embed_tokens.weight"], hf_tiny.torch_model("llama").state_dict()[
        "model.embed_tokens.weight"].numpy(), atol=1e-4), "training must move the weights for the match to mean much"


def test_per_rank_mean_weighs_padded_batches_differently(runs):
    (want_losses, _), _, (rank_mean_losses, _) = runs
    assert np.abs(rank_mean_losses / want_losses - 1).max() > 1e-3


def test_token_loss_counts_labels_and_eval_weighs_every_token():
    """The eval step's loss over a padded global batch is the summed loss over all counted tokens divided
    by their number, whatever the ranks' shares; the plain eval step averages the ranks' means."""
    config = hf_tiny.hf_config("llama")
    graphdef, abstract = models.abstract_model(config)
    plan = hf_tiny.stage3_plan(config)
    params = jax.device_put(jax.tree.map(lambda x: np.random.default_rng(0).normal(0, 0.2, x.shape).astype(np.float32),
                                         abstract), plan.param_shardings)
    data = {k: np.asarray(v[:RANKS], np.int32) for k, v in padded_data().items()}
    host = jax.device_get(params)
    per_token = models.causal_lm_loss(graphdef, per_token=True)
    whole = float(jax.jit(per_token.total)(host, data)) / float(per_token.count(data))
    assert float(per_token.count(data)) == (data["labels"][:, 1:] != -100).sum()
    assert float(zj.make_eval_step(per_token, plan)(params, data)) == pytest.approx(whole, rel=1e-6)
    mean = models.causal_lm_loss(graphdef)
    one_rank = jax.jit(mean)
    per_rank = np.mean([float(one_rank(host, {k: v[r:r + 1] for k, v in data.items()})) for r in range(RANKS)])
    assert float(zj.make_eval_step(mean, plan)(params, data)) == pytest.approx(per_rank, rel=1e-6)
    assert abs(per_rank / whole - 1) > 1e-3
