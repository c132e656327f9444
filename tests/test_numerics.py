"""Numerical faults: an inf/nan gradient skips the step and leaves the state bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zerojax as zj
from tests import tiny_transformer as tiny


def poisoned_loss(params, batch):
    """The tiny model's loss, times `batch["poison"]` (1, or inf/nan to inject a non-finite gradient)."""
    return tiny.loss_fn(params, batch) * jnp.mean(batch["poison"])


def run(precision, poison_steps, stage=3, steps=6):
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=stage), precision)
    state = zj.init_state(params, plan)
    step = zj.make_train_step(poisoned_loss, plan, micro_batches=2)
    history = []
    for i, batch in enumerate(tiny.batches(steps, 16)):
        value = {"inf": np.inf, "nan": np.nan}.get(poison_steps.get(i), 1.0)
        batch = dict(batch, poison=np.full((16,), value, np.float32))
        before = jax.device_get((state.params, state.master, state.opt_state))
        state, metrics = step(state, batch)
        after = jax.device_get((state.params, state.master, state.opt_state))
        history.append((bool(metrics["skipped"]), float(metrics["loss_scale"]), before, after))
    return history, state


@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_fp16_overflow_skips_step_and_follows_the_scale_sequence(kind):
    scaler = zj.LossScale(initial_scale_power=8, window=2, hysteresis=2)
    history, state = run(zj.Precision.fp16(scaler), {1: kind, 2: kind, 3: kind}, steps=8)
    skipped = [h[0] for h in history]
    scales = [h[1] for h in history]
    assert skipped == [False, True, True, True, False, False, False, False]
    # Steps 1-3 overflow: hysteresis 2 -> 1, then halve, halve. DeepSpeed doubles on a clean step that
    # follows a positive multiple of `window` clean steps since the last overflow: step 6, used from 7.
    assert scales == [256.0, 256.0, 256.0, 128.0, 64.0, 64.0, 64.0, 128.0]
    assert float(state.loss_scale.scale) == 128.0
    for was_skipped, _, before, after in history:
        if was_skipped:
            jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(state.skipped) == 3 and int(state.step) == 8


def test_bf16_skips_and_counts_non_finite_steps():
    history, state = run(zj.Precision.bf16(), {2: "nan"})
    assert [h[0] for h in history] == [False, False, True, False, False, False]
    jax.tree.map(np.testing.assert_array_equal, history[2][2], history[2][3])
    assert int(state.skipped) == 1 and int(state.step) == 6
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), history[3][2], history[3][3]))
    assert any(changed), "a clean step after a skipped one updates the parameters again"


def test_skips_in_a_row_live_in_the_state_and_survive_a_checkpoint(tmp_path):
    """Two skipped steps in a row after a clean one: the count is in the state (the Trainer's stop reads
    it), so a resumed run continues it; a checkpoint from before the count restores it as 0."""
    from zerojax.checkpoint import CheckpointManager

    _, state = run(zj.Precision.bf16(), {1: "nan", 2: "nan"}, steps=3)
    assert (int(state.skipped), int(state.skips_in_a_row), int(state.step)) == (2, 2, 3)
    plan = zj.make_plan(tiny.init_params(), optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3),
                        zj.Precision.bf16())
    with CheckpointManager(tmp_path / "new") as manager:
        manager.save(state)
    assert int(CheckpointManager(tmp_path / "new", read_only=True).restore(plan).state.skips_in_a_row) == 2
    with CheckpointManager(tmp_path / "old") as manager:
        manager.save(state._replace(skips_in_a_row=None))
    old = CheckpointManager(tmp_path / "old", read_only=True).restore(plan).state
    assert int(old.skips_in_a_row) == 0 and int(old.skipped) == 2
