"""The compiled step carries ZeRO's collectives and nothing activation-sized."""

import math
import re

import optax
import pytest

import zerojax as zj
from tests import tiny_transformer as tiny

COMPILED = re.compile(r"= (\(?[^=]*?\)?) (all-gather|reduce-scatter|all-reduce)(?:-start)?\(")
SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


def collectives(text):
    """(kind, [(dtype, shape), ...]) for every collective in compiled HLO text."""
    out = []
    for m in COMPILED.finditer(text):
        shapes = [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in SHAPE.findall(m.group(1))]
        out.append((m.group(2), shapes))
    return out


def lowered_all_gather_dtypes(text):
    return re.findall(r'"stablehlo\.all_gather".*?-> tensor<[\dx]*x([a-z]+\d*)>', text)


@pytest.fixture(scope="module", params=[2, 3])
def programs(request):
    stage = request.param
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16())
    lowered = zj.make_train_step(tiny.loss_fn, plan, max_grad_norm=1.0).lower(
        plan.abstract_state(), tiny.batches(1, 16)[0]
    )
    return stage, params, lowered.as_text(), lowered.compile().as_text()


def test_gradients_leave_through_reduce_scatter(programs):
    stage, params, _, compiled = programs
    ops = collectives(compiled)
    scatters = [s for kind, s in ops if kind == "reduce-scatter"]
    assert len(scatters) >= len(tiny.jax.tree.leaves(params)), "one reduce-scatter per sharded gradient"
    for kind, shapes in ops:
        if kind == "all-reduce":  # only scalars: the loss, the gradient norm, the finiteness flags
            assert all(math.prod(s) == 1 for _, s in shapes), shapes


def test_stage3_gathers_in_bf16_in_the_lowered_program(programs):
    stage, params, lowered, _ = programs
    dtypes = lowered_all_gather_dtypes(lowered)
    if stage == 3:
        assert len(dtypes) == len(tiny.jax.tree.leaves(params))
        assert set(dtypes) == {"bf16"}
    else:
        assert dtypes == [], "stage 2 gathers parameters only after the update, outside the backward"


def test_no_activation_sized_collective(programs):
    _, params, _, compiled = programs
    allowed = {()}
    for x in tiny.jax.tree.leaves(params):
        allowed.add(tuple(x.shape))
        for d in range(x.ndim):
            if x.shape[d] % 8 == 0:
                allowed.add(tuple(s // 8 if i == d else s for i, s in enumerate(x.shape)))
    for kind, shapes in collectives(compiled):
        for dtype, shape in shapes:
            assert shape in allowed or math.prod(shape) == 1, f"{kind} of {dtype}{list(shape)} is not parameter-sized"
