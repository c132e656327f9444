"""Every mode compiles for 8 H100s and 8 TPU v5p chips on this CPU machine (deviceless ahead-of-time
compilation, `zerojax.targets`), holds the state the plan says, and moves what ZeRO prescribes.

Each case folds several features into one small Llama step so that the whole matrix (stages 0-3, hpZ,
MiCS, bf16, fp16 with loss scaling, gradient accumulation, tensor parallelism, optimizer offload in
both modes, parameter offload, a partial ratio) compiles within two minutes. GPU targets refuse host
offload with one sentence: compile-only CUDA devices have no host memory (JAX would drop the kinds).
"""

import re

import jax
import optax
import pytest

import zerojax as zj
from zerojax import targets
from zerojax.compiled import compile_train_step
from zerojax.models import abstract_model, causal_lm_loss
from zerojax.rules import is_layout

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
SEQ = 64

# id -> (stage, mesh shape, hierarchy, precision, micro-batches, offload)
CASES = {
    "stage0-fp16-lossscale": (0, {}, "none", zj.Precision.fp16(), 1, None),
    "stage1-mics": (1, {"replica": 2}, "mics", zj.Precision.bf16(), 1, None),
    "stage2-tensor-accumulate": (2, {"tensor": 2}, "none", zj.Precision.bf16(), 2, None),
    "stage3": (3, {}, "none", zj.Precision.bf16(), 1, None),
    "stage3-hpz-accumulate": (3, {"replica": 2}, "hpz", zj.Precision.bf16(), 2, None),
    "stage3-offload-optimizer-ratio": (3, {}, "none", zj.Precision.bf16(), 1, zj.Offload("pinned_host", ratio=0.5)),
    "stage2-offload-optimizer-host": (2, {}, "none", zj.Precision.bf16(), 1, zj.Offload("pinned_host", mode="host")),
    "stage3-offload-all-host": (3, {}, "none", zj.Precision.bf16(), 1,
                                zj.Offload("pinned_host", params="pinned_host", mode="host")),
    "stage3-offload-all-streamed-by-layer": (3, {}, "none", zj.Precision.bf16(), 1,
                                             zj.Offload("pinned_host", params="pinned_host")),
}
GPU_CASES = [k for k, v in CASES.items() if v[5] is None]
TPU_CASES = [k for k, v in CASES.items() if v[3].compute_dtype != "float16"]


@pytest.fixture(scope="module")
def model():
    return abstract_model(TINY, dtype="fp32", scan_layers=True, remat="full")


def compile_case(model, target: str, case: str):
    graphdef, params = model
    stage, shape, hierarchy, precision, micro, offload = CASES[case]
    mesh = zj.make_mesh(devices=targets.TARGETS[target].devices(8), **shape)
    rules = zj.ZeroRules(mesh, stage=stage, hierarchy=hierarchy)
    plan = zj.make_plan(params, optax.adamw(1e-4), rules, precision, offload=offload)
    step = zj.make_train_step(causal_lm_loss(graphdef), plan, micro_batches=micro, max_grad_norm=1.0)
    # On TPU without offload the compiler lays the state out (zerojax.layouts); elsewhere row-major.
    assert (step.jit is not None) == (target.startswith("tpu") and offload is None)
    return plan, compile_train_step(step, plan, batch_of(plan, micro), target=target)


def batch_of(plan, micro: int = 1) -> dict:
    return {"input_ids": jax.ShapeDtypeStruct((micro * plan.rules.data_size, SEQ), jax.numpy.int32, sharding=(
        jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec(zj.DATA_AXES))))}


def check_state_and_collectives(plan, compiled, *, tolerance: float):
    report = zj.memory_report(plan)
    assert compiled.state_bytes == pytest.approx(report.held_bytes, rel=tolerance)
    low = compiled.lowered_collectives
    stage = plan.rules.stage
    if stage >= 2:
        assert "reduce-scatter" in low  # gradients leave as shards
    if stage == 3:  # gathered in the compute dtype, cast from the fp32 shards before the gather
        assert set(low["all-gather"]) == {"bf16"}


@pytest.mark.parametrize("case", GPU_CASES)
def test_every_mode_compiles_for_h100(model, case):
    plan, compiled = compile_case(model, "h100", case)
    assert compiled.target == "h100" and compiled.temp_bytes > 0
    check_state_and_collectives(plan, compiled, tolerance=0.02)
    # XLA:GPU keeps the program's collectives: what it moves is what the lowered program asks for (the
    # all-gather of a 16-bit copy after the update aside, which GSPMD adds at stages 1-2 and hpZ).
    moved = compiled.collective_bytes
    asked = {k: sum(v.values()) for k, v in compiled.lowered_collectives.items()}
    for kind in ("reduce-scatter",) + (() if plan.keeps_master else ("all-gather",)):
        assert moved.get(kind, 0) == pytest.approx(asked.get(kind, 0), rel=0.01), kind
    assert 0 < compiled.overlap["total"] <= 1  # XLA:GPU's schedule overlaps collectives with compute


@pytest.mark.parametrize("case", TPU_CASES)
def test_every_mode_compiles_for_tpu_v5p(model, case):
    plan, compiled = compile_case(model, "tpu-v5p", case)
    assert compiled.target == "tpu-v5p" and compiled.temp_bytes > 0 and compiled.overlap is None
    check_state_and_collectives(plan, compiled, tolerance=0.02)
    host = zj.memory_report(plan).host_bytes
    # XLA:TPU reports host bytes itself: exactly the plan's offloaded state.
    assert compiled.host_argument_bytes == pytest.approx(host, rel=0.02) if host else compiled.host_argument_bytes == 0


def test_for_tpu_stage3_gathers_flat_vectors_and_settles_unstacked_gradient_shards(model):
    graphdef, params = model
    texts = {}
    for target in ("h100", "tpu-v5p"):
        mesh = zj.make_mesh(devices=targets.TARGETS[target].devices(8))
        plan = zj.make_plan(params, optax.adamw(1e-4), zj.ZeroRules(mesh, stage=3), zj.Precision.bf16())
        step = zj.make_train_step(causal_lm_loss(graphdef), plan)
        texts[target] = step.lower(plan.abstract_state(), batch_of(plan)).as_text()
    ranks = {t: {s.count("x") for s in re.findall(r'"stablehlo\.all_gather".*?-> tensor<((?:\d+x)+)[a-z]+\d*>', text)}
             for t, text in texts.items()}
    assert ranks == {"h100": {1, 2}, "tpu-v5p": {1}}  # the norm scales are vectors on both
    barriers = {t: text.count("stablehlo.optimization_barrier") for t, text in texts.items()}  # remat's too
    layouts = jax.tree.leaves(plan.param_layouts, is_leaf=is_layout)
    unstacked = [layout for layout in layouts if not layout.stacked]  # embedding, head, final norm
    assert barriers["tpu-v5p"] - barriers["h100"] == len(unstacked)


def test_gpu_target_refuses_host_offload_and_tpu_fp16_in_one_sentence(model):
    with pytest.raises(ValueError, match=r"no host memory kind .*compile-only CUDA devices.*drop it"):
        compile_case(model, "h100", "stage3-offload-optimizer-ratio")
    with pytest.raises(ValueError, match=r"fp16 compute on TPU.*train in bf16"):
        compile_case(model, "tpu-v5p", "stage0-fp16-lossscale")


def test_targets_name_their_devices_and_refuse_impossible_counts():
    assert targets.tpu_topology("v5p", 8) == "2x2x2" and targets.tpu_topology("v5p", 64) == "4x4x4"
    assert targets.tpu_topology("v5e", 8) == "2x4" and targets.tpu_topology("v5p", 4) == "2x2x1"
    h100 = targets.TARGETS["h100"].devices(16)
    assert len(h100) == 16 and {d.device_kind for d in h100} == {"NVIDIA H100 80GB HBM3"}
    with pytest.raises(ValueError, match="12 GPUs do not fill hosts of 8"):
        targets.TARGETS["h100"].devices(12)
    with pytest.raises(ValueError, match="power-of-two number of chips from 4 to 4096; got 6"):
        targets.TARGETS["tpu-v5p"].devices(6)
    with pytest.raises(ValueError, match="neither a known target"):
        targets.resolve("h200-typo")
