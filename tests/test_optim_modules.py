"""The optimizer split into its modules: `zerojax.optim` still names everything, the schedulers the
config layer accepts are the ones the schedules build, and the chained builders are the optimizers the
config blocks build."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zerojax import optim
from zerojax.config import optimizer as blocks
from zerojax.optim import schedules, transforms


def test_every_public_name_resolves_from_its_module():
    for name in optim.__all__:
        assert getattr(optim, name) is not None
    assert set(optim.__all__) <= set(dir(optim))
    with pytest.raises(AttributeError, match="module 'zerojax.optim' has no attribute 'nope'"):
        optim.nope


def test_importing_the_transforms_does_not_load_the_config_layer():
    code = "import zerojax.optim.transforms, zerojax.optim.schedules, sys; print('zerojax.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False"


def test_the_schedules_are_the_schedulers_the_config_accepts():
    with pytest.raises(ValueError) as e:
        schedules.ds_schedule("Nope", {}, 1.0)
    assert str(e.value) == f"unknown scheduler 'Nope'; use one of {sorted(blocks.SCHEDULER_PARAMS)}."


def _run(tx, steps=4):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    state = tx.init(params)
    for i in range(steps):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1.5)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _injected(builder, **kwargs):
    """`builder` with its numeric arguments injected as the config layer injects them (float32 arrays)."""
    static = [k for k, v in kwargs.items() if isinstance(v, bool) or k == "momentum"]
    return optax.inject_hyperparams(builder, static_args=static)(**kwargs)


@pytest.mark.parametrize("block,builder", [
    ({"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.1, "adam_w_mode": False, "bias_correction": False}},
     lambda: _injected(transforms.fused_adam, learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                       bias_correction=False, decoupled=False)),
    ({"type": "Lamb", "params": {"lr": 0.1, "weight_decay": 0.1}},
     lambda: _injected(transforms.fused_lamb, learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)),
    ({"type": "Adagrad", "params": {"lr": 0.1, "weight_decay": 0.1}},
     lambda: _injected(transforms.torch_adagrad, learning_rate=0.1, eps=1e-10, weight_decay=0.1)),
    ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
     lambda: _injected(transforms.torch_sgd, learning_rate=0.1, momentum=0.9, weight_decay=0.0, nesterov=True)),
])
def test_a_block_builds_its_chained_optimizer(block, builder):
    problems = []
    spec = blocks.check_optimizer(block, problems)
    assert not problems
    ours, built = _run(blocks.build_optimizer(spec)), _run(builder())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(built)):
        np.testing.assert_array_equal(a, b)
