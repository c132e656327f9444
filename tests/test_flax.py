"""ZeRO on Flax models: an NNX module's state (with tensor-parallel annotations) and Linen params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import zerojax as zj


class Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 64, rngs=rngs, kernel_init=nnx.with_partitioning(init, (None, "tensor")))
        self.down = nnx.Linear(64, 8, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("tensor", None)))

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def data(steps=6):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(16, 16)).astype(np.float32), "y": rng.normal(size=(16, 8)).astype(np.float32)}
            for _ in range(steps)]


def train(params, loss_fn, devices, stage, tensor=1, base_specs=None):
    mesh = zj.make_mesh(tensor=tensor, devices=devices)
    plan = zj.make_plan(params, optax.adamw(1e-2), zj.ZeroRules(mesh, stage=stage), base_specs=base_specs)
    state = zj.init_state(params, plan)
    step = zj.make_train_step(loss_fn, plan, micro_batches=2)
    losses = []
    for batch in data():
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def nnx_setup():
    with nnx.use_eager_sharding(False):  # zerojax places the state; annotations stay as metadata
        graphdef, params = nnx.split(Mlp(nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, batch):
        model = nnx.merge(graphdef, p)
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

    return graphdef, params, loss_fn


@pytest.mark.parametrize("stage,tensor", [(3, 1), (2, 2), (3, 2)])
def test_nnx_module_state(stage, tensor):
    graphdef, params, loss_fn = nnx_setup()
    base = nnx.get_partition_spec(params)
    ref, _ = train(params, loss_fn, jax.devices()[:1], 0)
    losses, state = train(params, loss_fn, jax.devices(), stage, tensor, base)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    kernel = state.params["up"]["kernel"]
    # The model's tensor-parallel axis stays on dimension 1; ZeRO takes the free dimension 0.
    assert kernel.sharding.spec == (P("fsdp", "tensor") if stage == 3 else P(None, "tensor"))
    model = nnx.merge(graphdef, state.params)  # the trained state drops back into the module
    assert model(jnp.ones((2, 16))).shape == (2, 8)


def test_linen_params():
    module = nn.Sequential([nn.Dense(64), nn.gelu, nn.Dense(8)])
    params = module.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    loss_fn = lambda p, batch: jnp.mean((module.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)
    ref, _ = train(params, loss_fn, jax.devices()[:1], 0)
    losses, state = train(params, loss_fn, jax.devices(), 3)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    assert state.params["layers_0"]["kernel"].sharding.spec == P("fsdp", None)
