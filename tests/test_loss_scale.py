"""fp16 dynamic loss scaling as DeepSpeed 0.19.6 runs it, step by step, inside the zerojax train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zerojax as zj
from zerojax.config import load_config


class DeepSpeedScaler:
    """DynamicLossScaler.update_scale of DeepSpeed 0.19.6 (runtime/fp16/loss_scaler.py), transcribed."""

    def __init__(self, init_scale, scale_window, min_scale, delayed_shift, consecutive_hysteresis):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_window, self.min_scale = scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2.0
        self.cur_iter += 1


def run_zerojax(scaler: zj.LossScale, overflows):
    state = scaler.init()
    update = jax.jit(scaler.update)
    scales = []
    for o in overflows:
        state = update(state, jnp.asarray(not o))
        scales.append(float(state.scale))
    return scales


def test_documented_sequence_small_window():
    """window 2, hysteresis 2, start 2^4: the first overflow uses up the hysteresis counter, the second
    halves, a third halves again; after two clean steps the third doubles (refilling the counter), then
    every second; the next overflow uses up the refilled counter, later ones halve down to min 2."""
    scaler = zj.LossScale(initial_scale_power=4, window=2, hysteresis=2, min_scale=2.0)
    pattern = [True, True, True, False, False, False, False, False, True, True, True, True]
    assert run_zerojax(scaler, pattern) == [16, 8, 4, 4, 4, 8, 8, 16, 16, 8, 4, 2]


PATTERNS = {
    "sparse": [i % 7 == 3 for i in range(60)],
    "bursts": [(i // 5) % 4 == 0 for i in range(80)],
    "random": list(np.random.default_rng(0).random(200) < 0.15),
}


@pytest.mark.parametrize("pattern", PATTERNS, ids=list(PATTERNS))
@pytest.mark.parametrize("hysteresis,consecutive,window,min_scale", [
    (2, False, 4, 1.0), (1, False, 3, 1.0), (3, True, 5, 8.0), (2, True, 2, 1.0),
])
def test_scale_sequence_matches_deepspeed(pattern, hysteresis, consecutive, window, min_scale):
    overflows = PATTERNS[pattern]
    ds = DeepSpeedScaler(2.0**6, window, min_scale, hysteresis, consecutive)
    expected = []
    for o in overflows:
        ds.update_scale(o)
        expected.append(ds.cur_scale)
    ours = zj.LossScale(initial_scale_power=6, window=window, hysteresis=hysteresis,
                        consecutive_hysteresis=consecutive, min_scale=min_scale)
    assert run_zerojax(ours, overflows) == expected


def test_static_loss_scale_never_changes():
    scaler = zj.LossScale(static=1024.0)
    assert run_zerojax(scaler, [True, False, True]) == [1024.0] * 3


def test_config_fp16_block_builds_the_scaler():
    cfg = load_config({"train_batch_size": 8, "fp16": {"enabled": True, "initial_scale_power": 10,
                                                       "loss_scale_window": 7, "hysteresis": 3,
                                                       "consecutive_hysteresis": True, "min_loss_scale": 4}},
                      world_size=8)
    assert cfg.precision().loss_scale == zj.LossScale(10, 7, 3, True, 4.0)
    static = load_config({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 512}}, world_size=8)
    assert static.precision().loss_scale == zj.LossScale(static=512.0)


def _loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2) * batch["poison"][0]


def test_overflow_step_leaves_state_bit_identical():
    """fp16 from a config on 8 devices, ZeRO-2: an injected inf skips the step exactly."""
    cfg = load_config({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                       "fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 2},
                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}},
                      world_size=8)
    mesh = zj.make_mesh(**cfg.mesh_shape(8))
    params = {"w": jnp.ones((8, 4), jnp.float32) * 0.1, "b": jnp.zeros((4,), jnp.float32)}
    plan = zj.make_plan(params, cfg.optimizer(), cfg.zero_rules(mesh), cfg.precision())
    step = zj.make_train_step(_loss, plan, micro_batches=cfg.gradient_accumulation_steps,
                              max_grad_norm=cfg.gradient_clipping)
    state = zj.init_state(params, plan)
    rng = np.random.default_rng(0)
    n = cfg.train_batch_size

    def batch(poison):
        return {"x": jnp.asarray(rng.normal(size=(n, 8)), jnp.float32),
                "y": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
                "poison": jnp.full((n,), poison, jnp.float32)}

    scales = []
    for poison in (1.0, np.inf, np.inf, 1.0):
        before = jax.tree.map(np.asarray, (state.params, state.master, state.opt_state))
        state, metrics = step(state, batch(poison))
        after = jax.tree.map(np.asarray, (state.params, state.master, state.opt_state))
        scales.append(float(state.loss_scale.scale))
        if np.isinf(poison):
            assert bool(metrics["skipped"])
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
                assert a.tobytes() == b.tobytes()
        else:
            assert not bool(metrics["skipped"])
            assert any(a.tobytes() != b.tobytes() for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # hysteresis 2: the first overflow only uses up the counter, the second halves 2^8.
    assert scales == [256.0, 256.0, 128.0, 128.0]
    assert int(state.skipped) == 2
    assert isinstance(plan.tx, optax.GradientTransformation)
