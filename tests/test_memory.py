"""Bytes per device follow the ZeRO formulas; the compiled step holds gradients at their stage's size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zerojax as zj
from tests import tiny_transformer as tiny

GRAD_TERM = {0: 1.0, 1: 1.0, 2: 1 / 8, 3: 1 / 8}  # share of the 16-bit gradient in the ZeRO formula


def device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_held_bytes_match_zero_formula(stage):
    params = tiny.init_params()
    psi = sum(x.size for x in jax.tree.leaves(params))
    plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16())
    report = zj.memory_report(plan)
    # Between steps a device holds the formula's model states less the gradients (a step's temporary);
    # at stage 3 the fp32 shards are the parameters, so no 16-bit copy is held: 12 bytes a parameter, over N.
    theory = zj.zero_formula_bytes(stage, psi, 8, param_bytes=0 if stage == 3 else 2) - 2 * psi * GRAD_TERM[stage]
    assert report.held_bytes == pytest.approx(theory, rel=0.02)
    state = zj.init_state(params, plan)
    assert device0_bytes((state.params, state.master, state.opt_state)) == pytest.approx(theory, rel=0.02)
    assert report.unsharded_fraction == (1.0 if stage == 0 else 0.0)
    assert f"ZeRO stage {stage}" in str(report)


def test_report_shows_replicated_and_persistent_tensors():
    params = {"w": np.zeros((64, 64), np.float32), "odd": np.zeros((7, 5), np.float32), "tiny": np.zeros(16, np.float32)}
    rules = zj.ZeroRules(zj.make_mesh(), stage=3, persistence_threshold=100)
    report = zj.memory_report(zj.make_plan(params, optax.adam(1e-3), rules))
    rows = {r.path: r for r in report.rows}
    assert rows["['odd']"].note.startswith("replicated") and not rows["['odd']"].sharded
    assert "persistent" in rows["['tiny']"].note and rows["['tiny']"].param_bytes == 16 * 4
    assert rows["['w']"].param_bytes == 64 * 64 * 4 // 8
    assert report.unsharded_fraction == pytest.approx(35 / (64 * 64 + 35 + 16))


def _scanned_temp_bytes(stage: int) -> tuple[int, int]:
    layers, dim = 8, 256
    params = {"w": np.zeros((layers, dim, dim), np.float32)}

    def loss_fn(p, batch):
        def body(h, w):
            return jnp.tanh(h @ zj.gather_on_use(w)), None

        h, _ = jax.lax.scan(jax.checkpoint(body), batch["x"], p["w"])
        return jnp.mean(h.astype(jnp.float32) ** 2)

    plan = zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16(),
                        stacked=True)
    step = zj.make_train_step(loss_fn, plan, micro_batches=4)
    batch = {"x": np.zeros((32, dim), np.float32)}
    compiled = step.lower(plan.abstract_state(), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes, layers * dim * dim


def test_compiled_step_holds_gradient_at_stage_size():
    temp = {}
    for stage in range(4):
        temp[stage], psi = _scanned_temp_bytes(stage)
    accumulator = 4 * psi  # the fp32 gradient accumulator, whole
    assert temp[0] >= accumulator and temp[1] >= accumulator, temp
    # Stage 2 keeps only the 1/8 shard of the accumulator: stage 1's whole one is gone.
    assert temp[1] - temp[2] >= 0.8 * accumulator * (1 - 1 / 8), temp
    # Stage 3 never holds a whole gradient, nor whole parameters.
    assert temp[3] < 0.6 * accumulator, temp
