"""ZeRO++ quantized communication: the block quantizer's bound, the quantized collectives against exact ones,
and the train step's bytes and gradient with qwZ and qgZ (8 simulated devices)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import zerojax as zj
from zerojax import hlo, zeropp
from zerojax.args import TrainingArguments
from zerojax.config import ConfigError, ConfigWarning, load_config
from zerojax.models import causal_lm_loss, from_hf_config

CORPUS = Path(__file__).parent / "ds_configs"
FLOATS = st.floats(-2.0**20, 2.0**20, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=150, deadline=None)
@given(blocks=hnp.arrays(np.float32, st.sampled_from([(1, 2), (3, 16), (2, 255)]), elements=FLOATS),  # few compiles
       bits=st.sampled_from([8, 4]), scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e20]))
def test_dequantized_within_half_a_step_of_each_block_max(blocks, bits, scale):
    blocks = blocks * np.float32(scale)
    blocks[np.abs(blocks) < 1e-30] = 0  # no subnormals: XLA:CPU flushes them to zero
    q, s = zeropp.quantize(jnp.asarray(blocks), bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(jnp.max(jnp.abs(q))) <= qmax
    amax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    error = np.abs(np.asarray(zeropp.dequantize(q, s)) - blocks)
    # the bound |x|max / qmax / 2, plus the fp32 rounding of the scale and of the product (2 ulp of |x|max)
    assert np.all(error <= amax / qmax / 2 + 2 * np.spacing(amax)), (error.max(), amax.max())


def test_zero_and_constant_blocks_are_exact():
    blocks = jnp.asarray([[0.0] * 8, [3.5] * 8, [-2.0] * 8, [0.0] * 7 + [-1e-30]], jnp.float32)
    for bits in (8, 4):
        q, s = zeropp.quantize(blocks, bits)
        np.testing.assert_array_equal(zeropp.dequantize(q, s), blocks)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_a_non_finite_value_makes_its_whole_block_nan_and_no_other(bad, jit):
    """Eagerly and jitted."""
    blocks = np.ones((3, 16), np.float32)
    blocks[1, 5] = bad
    for bits in (8, 4):
        roundtrip = lambda b: zeropp.dequantize(*zeropp.quantize(b, bits))
        out = np.asarray((jax.jit(roundtrip) if jit else roundtrip)(jnp.asarray(blocks)))
        assert np.isnan(out[1]).all()
        np.testing.assert_array_equal(out[[0, 2]], 1.0)


def test_int4_packs_two_values_a_byte_and_unpacks_them():
    q = jnp.asarray(np.arange(-7, 8).repeat(2).reshape(3, 10), jnp.int8)
    packed = zeropp.pack4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5)
    np.testing.assert_array_equal(zeropp.unpack4(packed), q)


def _per_rank(fn, mesh, x):
    """`fn` of each rank's slice of `x` (ranks along its first axis) inside `shard_map` over every data axis."""
    spec = P(zj.DATA_AXES)
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    return np.asarray(jax.jit(jax.shard_map(lambda v: fn(v[0])[None], mesh=mesh, in_specs=spec, out_specs=spec))(sharded))


AXES = [("fsdp",), ("replica", "fsdp"), ("fsdp", "replica")]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_reduce_scatter_gives_each_rank_its_shard(axes, dim, bits):
    """Integers in [-qmax, qmax] (each block holding a qmax) quantize exactly, so one hop is exact; over two
    axes the partial sums are re-quantized, each within half a step of its block's maximum (<= 4 qmax)."""
    qmax = 2 ** (bits - 1) - 1
    mesh = zj.make_mesh(replica=1 if axes == ("fsdp",) else 2)
    shape = (8 * 6, 5, 3) if dim == 0 else (5, 8 * 6, 3)
    local = np.random.default_rng(0).integers(-qmax, qmax + 1, size=(8, *shape)).astype(np.float32)
    local[..., 0] = qmax
    exact = _per_rank(lambda g: lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True), mesh, local)
    got = _per_rank(lambda g: zeropp.reduce_scatter(g, axes, dim, bits, 16), mesh, local)
    assert got.shape == exact.shape
    if len(axes) == 1:
        np.testing.assert_array_equal(got, exact)
    else:  # the second hop sends partial sums over 4 (or 2) ranks, 2 of which are summed
        np.testing.assert_allclose(got, exact, rtol=0, atol=2 * (4 * qmax / qmax / 2) + 1e-4)


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("dim", [0, 2])
def test_quantized_all_gather_concatenates_the_shards_in_rank_order(axes, dim):
    mesh = zj.make_mesh(replica=1 if axes == ("fsdp",) else 2)
    shard = np.random.default_rng(1).integers(-127, 128, size=(8, 4, 3, 6)).astype(np.float32)
    shard[..., 0] = 127  # every block (of 12) holds the maximum: int8 is exact
    exact = _per_rank(lambda x: lax.all_gather(x, axes, axis=dim, tiled=True), mesh, shard)
    got = _per_rank(lambda x: zeropp.all_gather(x, axes, dim, 12), mesh, shard)
    np.testing.assert_array_equal(got, exact)


def test_quantization_settings_are_checked():
    with pytest.raises(ValueError, match="gradient_bits=2"):
        zj.Quantization(gradient_bits=2)
    with pytest.raises(ValueError, match="weight_block=7 must be an even integer"):
        zj.Quantization(weight_block=7)
    mesh = zj.make_mesh()
    with pytest.raises(ValueError, match="stage=2 gathers none; set stage=3 or drop zero_quantized_weights"):
        zj.ZeroRules(mesh, stage=2, quantization=zj.Quantization(weights=True))
    with pytest.raises(ValueError, match="stage=0 all-reduces gradients"):
        zj.ZeroRules(mesh, stage=0, quantization=zj.Quantization(gradients=True))


# ---------------------------------------------------------------------------------------------------
# The train step

LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}


def _llama_parts():
    """(parameters, loss, a batch of 16 sequences) of the small Llama."""
    graphdef, params = nnx.split(from_hf_config(LLAMA, dtype="fp32", scan_layers=True, remat="full"), nnx.Param)
    batch = {"input_ids": np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (16, 33), dtype=np.int32)}
    return params, causal_lm_loss(graphdef), batch


@pytest.fixture(scope="module")
def llama():
    return _llama_parts()


def _step(llama, quantization, hierarchy="none"):
    """(lowered collectives, lowered text, the first SGD update (lr 1: minus the gradient), the step and its
    state after it) of a stage-3 step."""
    params, loss_fn, batch = llama
    mesh = zj.make_mesh(replica=1 if hierarchy == "none" else 2)
    rules = zj.ZeroRules(mesh, stage=3, hierarchy=hierarchy, quantization=quantization)
    plan = zj.make_plan(params, optax.sgd(1.0), rules, zj.Precision.bf16())
    step = zj.make_train_step(loss_fn, plan)
    text = step.lower(plan.abstract_state(), batch).as_text()
    state = zj.init_state(params, plan)
    old = jax.tree.map(np.array, state.params)
    state, _ = step(state, batch)
    update = np.concatenate([(np.asarray(b, np.float64) - np.asarray(a, np.float64)).ravel()
                             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(old))])
    return hlo.lowered_collectives(text), text, update, step, state


def _bytes(collectives, *kinds):
    return sum(sum(collectives.get(k, {}).values()) for k in kinds)


def _gathers(text, dtype):
    """How many all-gathers of the lowered program return `dtype` values."""
    return sum(1 for line in text.splitlines() if '"stablehlo.all_gather"' in line and line.endswith(f"x{dtype}>"))


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def exact(llama):
    return _step(llama, zj.Quantization())


@pytest.mark.slow  # the bytes; test_qwz_and_qgz_together_... checks the quantized step by default
def test_qwz_gathers_int8_blocks_at_half_the_bf16_bytes_inside_the_scan(llama, exact):
    found, text, update, _, _ = _step(llama, zj.Quantization(weights=True))
    assert set(found["all-gather"]) == {"i8", "f32"}
    assert _bytes(found, "all-gather") <= 0.55 * _bytes(exact[0], "all-gather")
    assert found["reduce-scatter"] == exact[0]["reduce-scatter"], "the backward reduce-scatter stays bf16"
    # each bf16 gather of the exact step (the stacked layers' inside the model's scan) is one int8 gather now
    assert _gathers(text, "i8") == _gathers(exact[1], "bf16") > 0
    assert _cosine(update, exact[2]) >= 0.999


@pytest.mark.slow  # the bytes; test_qwz_and_qgz_together_... checks the quantized step by default
@pytest.mark.parametrize("bits, ratio", [(8, 0.55), (4, 0.30)])
def test_qgz_reduces_gradients_through_all_to_all_in_fewer_bytes(llama, exact, bits, ratio):
    found, _, update, _, _ = _step(llama, zj.Quantization(gradients=True, gradient_bits=bits))
    assert "reduce-scatter" not in found
    assert set(found["all-to-all"]) == {"i8" if bits == 8 else "ui8", "f32"}
    assert _bytes(found, "all-to-all") <= ratio * _bytes(exact[0], "reduce-scatter")
    assert found["all-gather"] == exact[0]["all-gather"]
    assert _cosine(update, exact[2]) >= (0.999 if bits == 8 else 0.98)


def test_qwz_and_qgz_together_keep_the_gradient_and_the_non_finite_skip(llama, exact):
    _, _, update, step, state = _step(llama, zj.Quantization(weights=True, gradients=True))
    assert _cosine(update, exact[2]) >= 0.999
    leaves, treedef = jax.tree.flatten(state.params)
    i = [leaf.ndim for leaf in leaves].index(3)  # a stacked matrix, gathered inside the scan and always used
    leaves[i] = leaves[i].at[0, 0, 0].set(jnp.nan)  # (inside the step's fusions XLA:CPU's max dropped the NaN)
    poisoned = state._replace(params=treedef.unflatten(leaves))
    before = jax.tree.map(np.array, poisoned)
    after, metrics = step(poisoned, llama[2])
    assert bool(metrics["skipped"])
    for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                    jax.tree.leaves(after.params) + jax.tree.leaves(after.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # ~40 s: four steps compiled
@pytest.mark.parametrize("hierarchy", ["hpz", "mics"])
def test_quantized_collectives_compose_with_hpz_and_mics(llama, hierarchy):
    exact_hier = _step(llama, zj.Quantization(), hierarchy)
    found, _, update, _, _ = _step(llama, zj.Quantization(weights=True, gradients=True), hierarchy)
    assert _bytes(found, "all-gather") <= 0.55 * _bytes(exact_hier[0], "all-gather")
    assert _bytes(found, "all-to-all", "reduce-scatter") <= 0.55 * _bytes(exact_hier[0], "reduce-scatter")
    assert _cosine(update, exact_hier[2]) >= 0.999


# ---------------------------------------------------------------------------------------------------
# DeepSpeed configs


def test_the_zeropp_corpus_config_gives_rules_that_quantize_weights_and_gradients():
    with pytest.warns(ConfigWarning, match="no effect in zerojax .*: steps_per_print"):
        config = load_config(CORPUS / "llava-next__zero3pp.json", TrainingArguments(bf16=True), {"hidden_size": 1024},
                             world_size=32)
    rules = config.zero_rules(zj.make_mesh(replica=2))
    assert rules.quantization == zj.Quantization(weights=True, gradients=True)
    assert rules.hierarchy == "hpz"


def test_quantized_weights_below_stage_3_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"zero_quantized_weights \(qwZ\) quantizes the stage-3 weight all-gather, "
                                          r"but stage=2"):
        load_config({"train_batch_size": 8, "zero_optimization": {"stage": 2, "zero_quantized_weights": True}},
                    world_size=8)


def test_stage_auto_with_quantized_weights_only_tries_stage_3():
    config = load_config({"train_batch_size": 8, "zero_optimization": {"stage": "auto", "zero_quantized_weights": True,
                                                                       "zero_quantized_gradients": True}}, world_size=8)
    assert {option[0] for option in config.stage_options()} == {3}


@pytest.mark.slow
def test_the_estimate_of_a_zeropp_config_shows_the_quantized_bytes_by_dtype():
    """`zerojax estimate --deepspeed` compiles the config's own step: its collectives are int8 (s8 gathers and
    all-to-alls, fp32 scales), and the theory, which prices qgZ's hops, agrees with the all-to-all bytes."""
    from zerojax.estimate import estimate

    config = load_config({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                                "zero_quantized_weights": True,
                                                "zero_quantized_gradients": True, "zero_hpz_partition_size": 4}},
                         world_size=8)
    result = estimate(LLAMA, 8, config=config, seq=32, compiled=True)
    lowered = result.compiled.lowered_collectives
    assert set(lowered["all-gather"]) == {"i8", "f32"} and set(lowered["all-to-all"]) == {"i8", "f32"}
    assert "reduce-scatter" not in lowered
    assert result.theory_collectives["all-to-all"] == pytest.approx(sum(lowered["all-to-all"].values()), rel=0.01)


@pytest.mark.slow
def test_the_compiled_h100_program_moves_the_quantized_bytes():
    """Deviceless XLA:GPU for 8 H100s keeps the quantized collectives: s8 gathers and all-to-alls at half the
    exact step's bf16 bytes (int4 gradients: a quarter)."""
    from zerojax.compiled import compile_train_step
    from zerojax.targets import TARGETS

    params, loss_fn, _ = _llama_parts()
    mesh = zj.make_mesh(devices=TARGETS["h100"].devices(8))
    batch = {"input_ids": jax.ShapeDtypeStruct((8, 32), np.int32, sharding=NamedSharding(mesh, P(zj.DATA_AXES)))}

    def moved(quantization):
        plan = zj.make_plan(params, optax.adamw(1e-4), zj.ZeroRules(mesh, stage=3, quantization=quantization),
                            zj.Precision.bf16())
        found = compile_train_step(zj.make_train_step(loss_fn, plan), plan, batch, target="h100").compiled_collectives
        return {k: sum(v.values()) for k, v in found.items()}, found

    (exact, _), (int8, found), (int4, found4) = (moved(zj.Quantization()), moved(zj.Quantization(True, True)),
                                                 moved(zj.Quantization(True, True, gradient_bits=4)))
    assert set(found["all-gather"]) == {"s8", "f32"} and set(found["all-to-all"]) == {"s8", "f32"}
    assert "u8" in found4["all-to-all"] and "reduce-scatter" not in found
    assert int8["all-gather"] <= 0.55 * exact["all-gather"]
    assert int8["all-to-all"] <= 0.55 * exact["reduce-scatter"] and int4["all-to-all"] <= 0.30 * exact["reduce-scatter"]
