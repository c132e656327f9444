"""Every stage and hierarchy trains exactly like one device (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zerojax as zj
from tests import tiny_transformer as tiny

STEPS, BATCH = 20, 16


def train(devices, stage=0, replica=1, hierarchy="none", micro_batches=2, tx=None):
    mesh = zj.make_mesh(replica=replica, devices=devices)
    params = tiny.init_params()
    tx = tx or optax.adamw(2e-2, weight_decay=0.1)
    plan = zj.make_plan(params, tx, zj.ZeroRules(mesh, stage=stage, hierarchy=hierarchy))
    state = zj.init_state(params, plan)
    step = zj.make_train_step(tiny.loss_fn, plan, micro_batches=micro_batches, max_grad_norm=1.0)
    losses = []
    for batch in tiny.batches(STEPS, BATCH):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def reference():
    return train(jax.devices()[:1])


@pytest.mark.parametrize(
    "stage,replica,hierarchy",
    [(0, 1, "none"), (1, 1, "none"), (2, 1, "none"), (3, 1, "none"), (3, 2, "none"), (3, 2, "hpz"), (3, 2, "mics")],
)
def test_losses_match_single_device(reference, stage, replica, hierarchy):
    ref_losses, ref_state = reference
    losses, state = train(jax.devices(), stage, replica, hierarchy)
    assert losses[-1] < 0.8 * losses[0], "the run must actually learn for parity to mean something"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_stage3_shards_params_and_optimizer_state(reference):
    _, state = train(jax.devices(), stage=3, micro_batches=1)
    w = state.params["layers"][0]["w1"]
    assert w.addressable_shards[0].data.shape == (32 // 8, 64) or w.addressable_shards[0].data.shape == (32, 64 // 8)
    mu = state.opt_state[0].mu["layers"][0]["w1"]
    assert mu.sharding.spec == w.sharding.spec


@pytest.mark.slow
def test_adafactor_factored_state_trains_like_single_device():
    tx = optax.adafactor(1e-2)
    ref, _ = train(jax.devices()[:1], tx=tx)
    losses, state = train(jax.devices(), stage=3, tx=tx)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)


def _scanned_mlp():
    rng = np.random.default_rng(0)
    params = {
        "layers": {"w": (rng.normal(size=(4, 32, 32)) / 6).astype(np.float32), "b": np.zeros((4, 32), np.float32)},
        "out": (rng.normal(size=(32, 8)) / 6).astype(np.float32),
    }

    def loss_fn(p, batch):
        def body(h, layer):
            layer = zj.gather_on_use(layer)
            return jnp.tanh(h @ layer["w"] + layer["b"]), None

        h, _ = jax.lax.scan(jax.checkpoint(body), batch["x"], p["layers"])
        return jnp.mean((h @ p["out"] - batch["y"]) ** 2)

    data = [{"x": rng.normal(size=(16, 32)).astype(np.float32), "y": rng.normal(size=(16, 8)).astype(np.float32)}
            for _ in range(10)]
    return params, loss_fn, data


@pytest.mark.parametrize("stage,replica,hierarchy", [(1, 1, "none"), (2, 1, "none"), (3, 1, "none"), (3, 2, "hpz")])
def test_scanned_layers_gathered_in_model_match_single_device(stage, replica, hierarchy):
    params, loss_fn, data = _scanned_mlp()

    def run(devices, stage, replica=1, hierarchy="none"):
        mesh = zj.make_mesh(replica=replica, devices=devices)
        rules = zj.ZeroRules(mesh, stage=stage, hierarchy=hierarchy)
        plan = zj.make_plan(params, optax.adam(1e-2), rules, stacked={"layers": True, "out": False})
        state = zj.init_state(params, plan)
        step = zj.make_train_step(loss_fn, plan, micro_batches=2)
        out = []
        for batch in data:
            state, m = step(state, batch)
            out.append(float(m["loss"]))
        return np.array(out), plan

    ref, _ = run(jax.devices()[:1], 0)
    losses, plan = run(jax.devices(), stage, replica, hierarchy)
    layout = plan.param_layouts["layers"]["w"]
    assert layout.stacked and layout.dim != 0, "the layer axis is never sharded"
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
