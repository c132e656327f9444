"""State layouts (`zerojax.layouts`): the compiler's where it pads nothing, the same numbers as row-major,
and on XLA:TPU less memory than row-major state (no per-step copies of stacked weights)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec as P

import zerojax as zj
from tests import tiny_transformer as tiny
from zerojax import layouts, targets
from zerojax.models import abstract_model, causal_lm_loss

TILE = ((8, 128),)
LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 64}


@pytest.mark.parametrize("shape,itemsize,order,tiling,expected", [
    ((32, 64, 4096), 4, (0, 1, 2), TILE, 32 * 64 * 4096 * 4),  # row-major, both minor dims whole tiles
    ((32, 64, 4096), 4, (0, 2, 1), TILE, 32 * 4096 * 128 * 4),  # 64 as the minor dim pads to 128
    ((5, 100), 2, (0, 1), TILE, 8 * 128 * 2),
    ((300,), 4, (0,), ((256,),), 512 * 4),
    ((), 4, (), ((128,),), 128 * 4),  # a scalar tiled as a vector
    ((3, 5), 4, (0, 1), None, 60),  # untiled
])
def test_padded_bytes_round_the_minor_dimensions_up_to_the_tile(shape, itemsize, order, tiling, expected):
    assert layouts.padded_bytes(shape, itemsize, Layout(order, tiling=tiling)) == expected


def test_the_compilers_layout_is_kept_only_where_it_pads_nothing():
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
    s = NamedSharding(mesh, P(None, "fsdp", None))
    abstract = {"a": jax.ShapeDtypeStruct((2, 1024, 4096), jnp.float32), "b": jax.ShapeDtypeStruct((2, 512, 4096), jnp.float32)}
    chosen = {k: Format(Layout((0, 2, 1), tiling=TILE), s) for k in abstract}  # shards (2, 128, 4096), (2, 64, 4096)
    picked = layouts.unpadded(chosen, abstract, {k: s for k in abstract})
    assert picked["a"] is chosen["a"]  # 128 minor: whole tiles
    assert picked["b"] is s  # 64 minor would pad to 128: stays row-major


def test_relayout_keeps_leaves_already_in_their_format_and_moves_the_others():
    devices = jax.devices()[:8]
    rows = NamedSharding(jax.make_mesh((8,), ("fsdp",), devices=devices), P("fsdp"))
    rows_2d = NamedSharding(jax.make_mesh((2, 4), ("a", "b"), devices=devices), P(("a", "b")))
    state = {"kept": jax.device_put(jnp.arange(16.0), rows), "moved": jax.device_put(jnp.arange(8.0), rows),
             "plain": jax.device_put(jnp.ones(8), rows)}
    formats = {"kept": state["kept"].format, "moved": Format(state["moved"].format.layout, rows_2d),
               "plain": rows}
    out = layouts.relayout(state, formats)
    assert out["kept"] is state["kept"] and out["plain"] is state["plain"]
    assert out["moved"].format == formats["moved"]
    np.testing.assert_array_equal(out["moved"], np.arange(8.0))


def test_compiler_layouts_train_bit_identically_and_are_chosen_once():
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16())
    runs = {}
    for layout in ("row-major", "compiler"):
        step = zj.make_train_step(tiny.loss_fn, plan, state_layout=layout, max_grad_norm=1.0)
        state = zj.init_state(params, plan)
        first, second = tiny.batches(2, 16)
        state, _ = step(state, first)
        chosen = dict(step._chosen)
        state, metrics = step(state, second)
        assert step._chosen == chosen  # formats and program from the first call, reused
        runs[layout] = (jax.tree.map(np.asarray, state.params), float(metrics["loss"]))
    assert runs["compiler"][1] == runs["row-major"][1]
    for a, b in zip(jax.tree.leaves(runs["compiler"][0]), jax.tree.leaves(runs["row-major"][0])):
        np.testing.assert_array_equal(a, b)
    assert "formats" in chosen and zj.make_train_step(tiny.loss_fn, plan).jit is None  # CPU: row-major


def test_a_bad_state_layout_and_compiler_layouts_beside_offload_are_refused():
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16())
    with pytest.raises(ValueError, match=r"state_layout='tiled' must be 'compiler', 'row-major' or None"):
        zj.make_train_step(tiny.loss_fn, plan, state_layout="tiled")
    offloaded = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16(),
                             offload=zj.Offload("pinned_host"))
    with pytest.raises(ValueError, match=r"state_layout='compiler' needs the whole state in device memory"):
        zj.make_train_step(tiny.loss_fn, offloaded, state_layout="compiler")


@pytest.mark.slow
def test_v5p_holds_no_more_with_the_compilers_layouts_than_row_major():
    """The compiler's layouts never cost memory: the state is no larger and the temporaries no more.
    (XLA:TPU used to copy row-major stacked attention weights into its own order each step; since the
    stage-3 gathers are flat on TPU, `zerojax.gather`, neither layout leads to those copies.)"""
    graphdef, params = abstract_model(LLAMA, dtype="fp32", scan_layers=True, remat="full")
    mesh = zj.make_mesh(devices=targets.TARGETS["tpu-v5p"].devices(8))
    plan = zj.make_plan(params, optax.adamw(1e-4), zj.ZeroRules(mesh, stage=3), zj.Precision.bf16())
    batch = {"input_ids": jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=NamedSharding(mesh, P(zj.DATA_AXES)))}
    memory = {}
    for layout in ("row-major", "compiler"):
        step = zj.make_train_step(causal_lm_loss(graphdef), plan, max_grad_norm=1.0, state_layout=layout)
        memory[layout] = step.lower(plan.abstract_state(), batch).compile().memory_analysis()
    assert memory["compiler"].argument_size_in_bytes == memory["row-major"].argument_size_in_bytes
    assert memory["compiler"].temp_size_in_bytes <= memory["row-major"].temp_size_in_bytes


OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                 "(101.78G) exceeds available HBM (95.74G).")


@pytest.mark.parametrize("error", [OUT_OF_MEMORY, "INTERNAL: something else"])
def test_a_layout_compile_refused_for_memory_falls_back_to_row_major_and_other_errors_surface(error):
    """Learning the layouts compiles the step once more: when the compiler refuses that for memory the
    state stays row-major (the step's own compile then reports the refusal, as `compile_train_step` does
    for row-major state); any other error is raised."""
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16())
    step = zj.make_train_step(tiny.loss_fn, plan, state_layout="compiler")

    class Refused:
        def lower(self, *args):
            return self

        def compile(self):
            raise RuntimeError(error)

    def jit(formats):
        auto = any(isinstance(f, Format) and f.layout is Layout.AUTO for f in jax.tree.leaves(
            formats, is_leaf=lambda f: isinstance(f, Format)))
        return Refused() if auto else step.jit(formats)

    refusing = dataclasses.replace(step, jit=jit)
    state, batch = zj.init_state(params, plan), tiny.batches(1, 16)[0]
    if error != OUT_OF_MEMORY:
        with pytest.raises(RuntimeError, match="something else"):
            refusing(state, batch)
        return
    _, metrics = refusing(state, batch)
    assert np.isfinite(float(metrics["loss"])) and refusing._chosen["formats"] is plan.state_shardings
