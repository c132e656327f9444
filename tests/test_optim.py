"""DeepSpeed optimizer blocks → optax, checked against torch.optim and DeepSpeed's kernel formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from zerojax import optim
from zerojax.config import ConfigError, load_config

STEPS = 5


def grads_at(t, shape=(3, 4)):
    rng = np.random.default_rng(100 + t)
    return {"w": rng.normal(size=shape).astype(np.float32), "b": rng.normal(size=shape[1:]).astype(np.float32)}


def init_params():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def run_optax(block):
    problems = []
    spec = optim.check_optimizer(block, problems)
    assert not problems
    tx = optim.build_optimizer(spec)
    params = jax.tree.map(jnp.asarray, init_params())
    state = tx.init(params)
    for t in range(STEPS):
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads_at(t)), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return jax.tree.map(np.asarray, params)


def run_torch(make):
    params = {k: torch.tensor(v, requires_grad=True) for k, v in init_params().items()}
    opt = make(list(params.values()))
    for t in range(STEPS):
        for k, g in grads_at(t).items():
            params[k].grad = torch.tensor(g)
        opt.step()
    return {k: v.detach().numpy() for k, v in params.items()}


def assert_close(a, b, rtol=2e-5):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6)


def test_adam_type_decouples_weight_decay_by_default():
    block = {"type": "Adam", "params": {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1}}
    expected = run_torch(lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1))
    assert_close(run_optax(block), expected)
    assert_close(run_optax({**block, "type": "AdamW"}), expected)
    # adam_w_mode has no say for AdamW (DeepSpeed forces it on)
    assert_close(run_optax({"type": "AdamW", "params": {**block["params"], "adam_w_mode": False}}), expected)


def test_adam_w_mode_false_is_l2():
    block = {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False, "torch_adam": True}}
    expected = run_torch(lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1))
    assert_close(run_optax(block), expected)
    decoupled = run_optax({"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.1}})
    assert not np.allclose(decoupled["w"], expected["w"], rtol=1e-4)


def test_adam_without_bias_correction():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    params, m, v = init_params(), None, None
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t in range(STEPS):
        for k, g in grads_at(t).items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            params[k] = params[k] - lr * m[k] / (np.sqrt(v[k]) + eps)
    assert_close(run_optax({"type": "Adam", "params": {"lr": lr, "bias_correction": False}}), params, rtol=1e-4)


def test_sgd_and_adagrad_match_torch():
    sgd = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}}
    assert_close(run_optax(sgd), run_torch(
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)))
    adagrad = {"type": "Adagrad", "params": {"lr": 0.05, "weight_decay": 0.01}}
    assert_close(run_optax(adagrad), run_torch(lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=0.01)))


def test_lion_matches_its_update_rule():
    lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
    params = init_params()
    m = {k: np.zeros_like(p) for k, p in params.items()}
    for t in range(STEPS):
        for k, g in grads_at(t).items():
            c = np.sign(b1 * m[k] + (1 - b1) * g)
            params[k] = params[k] * (1 - lr * wd) - lr * c
            m[k] = b2 * m[k] + (1 - b2) * g
    got = run_optax({"type": "Lion", "params": {"lr": lr, "betas": [b1, b2], "weight_decay": wd}})
    assert_close(got, params, rtol=1e-5)


@pytest.mark.parametrize("bias_correction,eps_inside_sqrt,max_coeff", [(True, False, 10.0), (False, True, 0.3)])
def test_lamb_matches_fused_lamb_kernel(bias_correction, eps_inside_sqrt, max_coeff):
    """csrc/lamb/fused_lamb_cuda_kernel.cu: u = m/denom + wd·p, coeff = clamp(‖p‖/‖u‖), step = lr·bc."""
    lr, b1, b2, eps, wd, min_coeff = 0.01, 0.9, 0.999, 1e-6, 0.01, 0.01
    params = init_params()
    m = {k: np.zeros_like(p, dtype=np.float64) for k, p in params.items()}
    v = {k: np.zeros_like(p, dtype=np.float64) for k, p in params.items()}
    for t in range(STEPS):
        step = lr * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) if bias_correction else lr
        for k, g in grads_at(t).items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            denom = np.sqrt(v[k] + eps) if eps_inside_sqrt else np.sqrt(v[k]) + eps
            u = m[k] / denom + wd * params[k]
            coeff = np.clip(np.linalg.norm(params[k]) / np.linalg.norm(u), min_coeff, max_coeff)
            params[k] = (params[k] - step * coeff * u).astype(np.float32)
    got = run_optax({"type": "Lamb", "params": {"lr": lr, "eps": eps, "weight_decay": wd, "max_coeff": max_coeff,
                                                "bias_correction": bias_correction,
                                                "eps_inside_sqrt": eps_inside_sqrt}})
    assert_close(got, params, rtol=1e-5)


def test_aliases_and_unknown_types():
    problems = []
    assert optim.check_optimizer({"type": "DeepSpeed_Adam", "params": {"lr": 1e-3}}, problems).type == "adam"
    assert optim.check_optimizer({"type": "fusedlamb"}, problems).type == "lamb"
    assert not problems
    optim.check_optimizer({"type": "OneBitAdam", "params": {}}, problems)
    assert problems == ["optimizer.type='OneBitAdam' is not supported; use one of Adam, AdamW, Lamb, Lion, "
                        "Adagrad, SGD (case-insensitive)."]


@pytest.mark.parametrize("params,fragment", [
    ({"lr": "fast"}, "optimizer.params.lr='fast' is invalid: it must be a finite number"),
    ({"betas": [0.9]}, "optimizer.params.betas=[0.9] is invalid"),
    ({"amsgrad": True}, "AMSGrad is not supported"),
    ({"weight_decy": 0.1}, "did you mean 'weight_decay'"),
    ({"lr": -1.0}, "it must be >= 0"),
])
def test_bad_optimizer_params_are_named(params, fragment):
    with pytest.raises(ConfigError) as e:
        load_config({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": params}}, world_size=8)
    assert fragment in str(e.value)


def test_config_without_optimizer_block():
    from zerojax.args import TrainingArguments

    cfg = load_config({"train_batch_size": 8}, world_size=8)
    with pytest.raises(ConfigError, match="no optimizer block"):
        cfg.optimizer()
    args = TrainingArguments(learning_rate=0.01, weight_decay=0.1, per_device_train_batch_size=1, max_steps=10,
                             warmup_steps=2, lr_scheduler_type="linear")
    cfg = load_config({}, args, world_size=8)
    assert cfg.train_batch_size == 8
    tx = cfg.optimizer()
    state = tx.init({"w": jnp.ones(2)})
    lrs = []
    for _ in range(4):
        _, state = tx.update({"w": jnp.ones(2)}, state, {"w": jnp.ones(2)})
        lrs.append(float(state.hyperparams["learning_rate"]))
    np.testing.assert_allclose(lrs, [0.0, 0.005, 0.01, 0.01 * 7 / 8], rtol=1e-6)
