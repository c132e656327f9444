"""Layouts per stage, optimizer-state placement for any optax state, and clear errors for bad input."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import zerojax as zj
from tests import tiny_transformer as tiny


@pytest.fixture(scope="module")
def mesh():
    return zj.make_mesh()


def test_mesh_shapes():
    assert dict(zj.make_mesh().shape) == {"replica": 1, "fsdp": 8, "tensor": 1}
    assert dict(zj.make_mesh(replica=2, tensor=2).shape) == {"replica": 2, "fsdp": 2, "tensor": 2}
    assert dict(zj.make_mesh(devices=jax.devices()[:1]).shape) == {"replica": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="replica=3"):
        zj.make_mesh(replica=3)
    with pytest.raises(ValueError, match="fsdp=3"):
        zj.make_mesh(fsdp=3)


@pytest.mark.parametrize("stage,param,grad,opt", [
    (0, None, None, None), (1, None, None, "fsdp"), (2, None, "fsdp", "fsdp"), (3, "fsdp", "fsdp", "fsdp"),
])
def test_stage_layouts(mesh, stage, param, grad, opt):
    layout = zj.ZeroRules(mesh, stage=stage).layout((16, 64))
    expect = lambda axis: P(axis, None) if axis else P(None, None)
    assert (layout.param_spec, layout.grad_spec, layout.opt_spec) == (expect(param), expect(grad), expect(opt))


def test_first_divisible_free_dimension_and_base_spec_kept():
    """The major-most divisible dimension carries the ZeRO axes (as FSDP2 shards dim 0): a shard is one
    contiguous block, so gathers and scatters need no transposed copy of the tensor."""
    mesh = zj.make_mesh(tensor=2)  # fsdp = 4
    rules = zj.ZeroRules(mesh, stage=3)
    assert rules.layout((64, 16)).param_spec == P("fsdp", None)
    assert rules.layout((16, 64)).param_spec == P("fsdp", None)
    assert rules.layout((6, 16)).param_spec == P(None, "fsdp")
    assert rules.layout((64, 16), P("tensor", None)).param_spec == P("tensor", "fsdp")
    assert rules.layout((4, 64, 16), stacked=True).param_spec == P(None, "fsdp", None)


def test_indivisible_replicated_and_threshold(mesh):
    rules = zj.ZeroRules(mesh, stage=3, persistence_threshold=1000)
    odd = rules.layout((7, 9))
    assert odd.dim is None and "divisible" in odd.note
    small = rules.layout((8, 8))
    assert small.param_spec == P(None, None) and small.opt_spec == P("fsdp", None) and "persistent" in small.note
    assert rules.layout((8, 256)).param_spec == P("fsdp", None)
    # DeepSpeed keeps a parameter whole when ds_numel <= stage3_param_persistence_threshold
    boundary = zj.ZeroRules(mesh, stage=3, persistence_threshold=64)
    assert boundary.layout((8, 8)).param_spec == P(None, None)
    assert boundary.layout((8, 16)).param_spec == P("fsdp", None)


def test_hierarchies():
    mesh = zj.make_mesh(replica=2)
    hpz = zj.ZeroRules(mesh, stage=3, hierarchy="hpz").layout((64,))
    assert (hpz.param_spec, hpz.opt_spec) == (P("fsdp"), P(("fsdp", "replica")))
    mics = zj.ZeroRules(mesh, stage=3, hierarchy="mics").layout((64,))
    assert (mics.param_spec, mics.opt_spec) == (P("fsdp"), P("fsdp"))
    plain = zj.ZeroRules(mesh, stage=3).layout((64,))
    assert plain.param_spec == P(("replica", "fsdp"))


TXS = {
    "adam": optax.adam(1e-3), "adamw": optax.adamw(1e-3), "lion": optax.lion(1e-4),
    "sgd-momentum": optax.sgd(1e-2, momentum=0.9), "adafactor": optax.adafactor(1e-3),
    "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "masked": optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
}


@pytest.mark.parametrize("tx", TXS.values(), ids=TXS.keys())
def test_optimizer_state_follows_its_parameter(tx):
    """Each optimizer-state leaf shaped like the parameter at the end of its tree path takes that
    parameter's layout, tensor-parallel axes included (its own shape would give another); scalars and
    other leaves get the layout of their own shape."""
    params = tiny.init_params()
    rules = zj.ZeroRules(zj.make_mesh(tensor=2), stage=3)  # fsdp = 4
    specs = dict(jax.tree.map(lambda x: P(), params), embed=P(None, "tensor"), head=P(None, "tensor"))
    plan = zj.make_plan(params, tx, rules, base_specs=specs)
    abstract = plan.abstract_state()  # fp32 at stage 3: the parameters are in the optimizer layout
    names = lambda path: tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    weights = {names(path): x for path, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
    assert weights[("head",)].sharding.spec == P("fsdp", "tensor") != rules.layout((32, 64)).opt_spec
    followed = 0
    for path, x in jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]:
        owner = [w for p, w in weights.items() if names(path)[-len(p):] == p and w.shape == x.shape]
        want = owner[0].sharding.spec if owner else rules.layout(x.shape).opt_spec
        assert x.sharding.spec == want, (names(path), x.sharding.spec, want)
        followed += bool(owner)
    assert followed >= 14, followed  # at least one moment of each matrix follows it
    zj.init_state(params, plan)  # places every leaf without error


@pytest.mark.parametrize("kwargs,match", [
    (dict(stage=4), "stage=4"), (dict(stage="3"), "stage='3'"),
    (dict(persistence_threshold=-1), "persistence_threshold=-1"),
    (dict(hierarchy="zeropp"), "hierarchy='zeropp'"), (dict(stage=2, hierarchy="hpz"), "stage=2"),
])
def test_bad_rules(mesh, kwargs, match):
    with pytest.raises(ValueError, match=match):
        zj.ZeroRules(mesh, **kwargs)


def test_indivisible_batch_names_the_fix(mesh):
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(mesh, stage=3))
    step = zj.make_train_step(tiny.loss_fn, plan, micro_batches=2)
    state = zj.init_state(params, plan)
    with pytest.raises(ValueError, match=r"\['tokens'\].*multiple of 16.*gradient_accumulation_steps"):
        step(state, tiny.batches(1, 12)[0])


def test_parameter_tree_mismatch(mesh):
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(mesh, stage=1))
    other = dict(params, extra=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"init_state.*\['extra'\].*make_plan"):
        zj.init_state(other, plan)
    wrong = dict(params, head=np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\['head'\] has shape \(32, 32\).*expects \(32, 64\)"):
        zj.init_state(wrong, plan)
    state = zj.init_state(params, plan)
    step = zj.make_train_step(tiny.loss_fn, plan)
    with pytest.raises(ValueError, match="train step"):
        step(state._replace(params=other), tiny.batches(1, 8)[0])


def test_bad_step_options(mesh):
    plan = zj.make_plan(tiny.init_params(), optax.adam(1e-3), zj.ZeroRules(mesh, stage=1))
    with pytest.raises(ValueError, match="micro_batches=0"):
        zj.make_train_step(tiny.loss_fn, plan, micro_batches=0)
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        zj.make_train_step(tiny.loss_fn, plan, max_grad_norm=-1)
