"""Every real DeepSpeed config in tests/ds_configs/ (30 files from public projects, listed with their
sources in its SOURCES.md) is handled: it loads and maps to the expected stage, precision, offload,
optimizer and batch sizes, or fails with a clear error. A file added to the
directory without an entry in EXPECTED fails here until it is described."""

import json
import warnings
from pathlib import Path

import numpy as np
import optax
import pytest

import zerojax as zj
from zerojax.args import TrainingArguments
from zerojax.config import ConfigDeprecationWarning, ConfigError, ConfigWarning, load_config

CORPUS = Path(__file__).parent / "ds_configs"
FILES = sorted(p.name for p in CORPUS.iterdir() if p.is_file() and p.name != "SOURCES.md")
H = 1024  # hidden size for the hidden-size "auto" values

HF = dict(max_steps=1000, warmup_steps=50)


def ok(args=None, ws=8, *, stage, compute="float32", opt_off="none", param_off="none", optimizer=None,
       scheduler=None, batch=None, warns=(), **extra):
    return dict(args=args, ws=ws, stage=stage, compute=compute, opt_off=opt_off, param_off=param_off,
                optimizer=optimizer, scheduler=scheduler, batch=batch, warns=warns, extra=extra)


def err(*fragments, args=None):
    return dict(args=args, ws=8, error=fragments)


EXPECTED = {
    "accelerate__ds_config_zero3_model_only.json": ok(
        dict(per_device_train_batch_size=1), ws=1, stage=3, opt_off="cpu", param_off="cpu", batch=(1, 1, 1),
        reduce_bucket_size=H * H, persistence=10 * H, gather16=False),
    "accelerate__sp-alst.ds-config.json": ok(
        dict(bf16=True), stage=3, compute="bfloat16", batch=(64, 8, 1), warns=("seq_parallel_communication",)),
    "accelerate__zero_stage1_config.json": ok(
        dict(fp16=True, **HF), stage=1, compute="float16", optimizer="adamw", scheduler="WarmupDecayLR",
        batch=(64, 8, 1), loss_scale=zj.LossScale(16, 1000, 2, False, 1.0), total_num_steps=1000),
    "accelerate__zero_stage3_offload_config.json": ok(
        dict(fp16=True, **HF), stage=3, compute="float16", opt_off="cpu", param_off="cpu", optimizer="adamw",
        scheduler="WarmupDecayLR", batch=(64, 8, 1), gather16=False),
    "alpaca__default_offload_opt_param.json": ok(
        dict(bf16=True, **HF), stage=3, compute="bfloat16", opt_off="cpu", param_off="cpu", optimizer="adamw",
        scheduler="WarmupDecayLR", batch=(64, 8, 1), gather16=False, warmup_num_steps=50),
    "axolotl__zero1.json": ok(dict(bf16=True), stage=1, compute="bfloat16", optimizer="adamw", batch=(64, 8, 1)),
    "axolotl__zero2.json": ok(dict(fp16=True, gradient_accumulation_steps=4), stage=2, compute="float16",
                              opt_off="cpu", batch=(256, 8, 4), loss_scale=zj.LossScale(32, 1000, 2, False, 1.0)),
    "axolotl__zero3_bf16.json": ok(dict(bf16=True), stage=3, compute="bfloat16", batch=(64, 8, 1),
                                   persistence=10 * H, prefetch=int(0.9 * H * H), gather16=True),
    "axolotl__zero3_bf16_cpuoffload_all.json": ok(dict(bf16=True), stage=3, compute="bfloat16", opt_off="cpu",
                                                  param_off="cpu", batch=(64, 8, 1), gather16=True),
    "dsexamples-cifar__ds_config.json": ok(
        ws=1, stage=0, compute="bfloat16", optimizer="adam", scheduler="WarmupLR", batch=(16, 16, 1),
        warns=("cpu_offload is deprecated", "loss-scaling keys in the bf16 block")),
    "dsexamples-ep__ds_zero3_leaf_qwen3_5.json": ok(
        stage=3, compute="bfloat16", optimizer="adamw", scheduler="WarmupCosineLR", batch=(16, 2, 1),
        persistence=100_000, warns=("leaf_module",)),
    "dsexamples__deepspeed_bsz64k_lamb_config_seq128.json": ok(
        ws=64, stage=0, compute="float16", optimizer="lamb", batch=(65536, 64, 16),
        loss_scale=zj.LossScale(16, 1000, 2, False, 1.0), warns=("sparse_attention",)),
    "dsexamples__ds_bsz512_1cycle.json": ok(ws=4, stage=0, optimizer="adam", scheduler="OneCycle",
                                            batch=(512, 32, 4)),
    "dsexamples__ds_config_gpt2-medium_1clmetric_TEMPLATE.json": err("is not valid JSON", "line 2", "GB_SIZE"),
    "dsexamples__ds_config_nvme.json": err(
        "offload_param.device='nvme' is not supported", 'use "cpu"', "stage3_max_reuse_distance=-1",
        "did you mean 'stage3_param_persistence_threshold'"),
    "dsexamples__ds_zero-offload_config.json": ok(
        ws=2, stage=2, compute="float16", opt_off="cpu", optimizer="adam", batch=(120, 12, 5),
        warns=("cpu_offload is deprecated",)),
    "dsexamples__ds_zero_stage_3_config.json": err(
        "zero_optimization.stage3_param_persitence_threshold is not a DeepSpeed zero_optimization key "
        "(did you mean 'stage3_param_persistence_threshold'?)"),
    "dsexamples__ds_zero_stage_infinity_config.json": err(
        "did you mean 'stage3_param_persistence_threshold'", "offload_optimizer.device='nvme' is not supported",
        "offload_param.device='nvme' is not supported"),
    "gptneox__125M.yml": err("is YAML but not an Accelerate config"),
    "llamafactory__ds_z0_config.json": ok(dict(), stage=0, batch=(64, 8, 1), warns=("comms_config",)),
    "llamafactory__ds_z3_alst_config.json": ok(
        dict(bf16=True, **HF), stage=3, compute="bfloat16", opt_off="cpu", param_off="cpu", optimizer="adamw",
        scheduler="WarmupLR", batch=(64, 8, 1), warns=("sequence_parallel", "loss-scaling keys in the bf16")),
    "llamafactory__ds_z3_fp8_config.json": ok(
        dict(max_grad_norm=0.001), stage=3, opt_off="cpu", batch=(64, 8, 1), pin_opt=False, clip=0.001,
        warns=("fp8",)),
    "llava-next__zero3_h100_optimized.json": ok(
        dict(bf16=True), stage=3, compute="bfloat16", batch=(64, 8, 1), reduce="float16",
        warns=("move them into zero_optimization: allgather_bucket_size, reduce_bucket_size, reduce_scatter",)),
    "llava-next__zero3pp.json": ok(
        dict(bf16=True), ws=32, stage=3, compute="bfloat16", optimizer="adamw", batch=(256, 8, 1),
        mesh={"replica": 2, "fsdp": 16}, hierarchy="hpz", quantized=(True, True)),
    "megatron-ds__ds_zero2_config_bf16.json": ok(
        stage=2, compute="bfloat16", optimizer="adam", batch=(96, 12, 1), reduce="bfloat16",
        warns=("bfloat16 is deprecated", '"bfp16" is deprecated', "loss-scaling keys in the bf16 block")),
    "openinstruct__stage3_no_offloading.conf": ok(
        dict(bf16=True, **HF), stage=3, compute="bfloat16", optimizer="adamw", scheduler="WarmupDecayLR",
        batch=(64, 8, 1), gather16=True),
    "transformers-61c7ec9__ds_config_zero3.json": ok(
        dict(fp16=True, learning_rate=3e-5, adam_beta1=0.8, weight_decay=3e-7, warmup_steps=500), stage=3,
        compute="float16", opt_off="cpu", param_off="cpu", optimizer="adamw", scheduler="WarmupLR",
        batch=(64, 8, 1), persistence=0, gather16=True, warns=("stage3_gather_fp16_weights_on_model_save",)),
    "transformers__ds_config_zero2.json": ok(
        dict(fp16=True, **HF), stage=2, compute="float16", opt_off="cpu", optimizer="adamw", scheduler="WarmupLR",
        batch=(64, 8, 1), reduce_bucket_size=200_000_000),
    "transformers__ds_config_zero3.json": ok(
        dict(fp16=True, **HF), stage=3, compute="float16", opt_off="cpu", param_off="cpu", optimizer="adamw",
        scheduler="WarmupLR", batch=(64, 8, 1), gather16=True, prefetch=int(0.9 * H * H)),
    "transformers__ds_config_zero3_bf16.json": ok(
        dict(bf16=True, **HF), stage=3, compute="bfloat16", opt_off="cpu", param_off="cpu", optimizer="adamw",
        scheduler="WarmupLR", batch=(64, 8, 1), warns=("bfloat16 is deprecated",)),
}


def test_every_corpus_file_is_described():
    assert len(FILES) >= 30
    assert sorted(EXPECTED) == FILES, "describe the new ds_configs file(s) in EXPECTED"


def _load(name, case):
    args = TrainingArguments(**case["args"]) if case["args"] is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(CORPUS / name, args, {"hidden_size": H}, world_size=case["ws"])
    return cfg, [str(w.message) for w in caught if issubclass(w.category, (ConfigWarning, ConfigDeprecationWarning))]


@pytest.mark.parametrize("name", FILES)
def test_corpus_file(name):
    case = EXPECTED[name]
    if "error" in case:
        with pytest.raises(ConfigError) as e:
            _load(name, case)
        for fragment in case["error"]:
            assert fragment in str(e.value)
        return
    cfg, warned = _load(name, case)
    assert cfg.stage == case["stage"]
    prec = cfg.precision()
    assert str(prec.compute_dtype) == case["compute"]
    assert cfg.offload_optimizer.device == case["opt_off"]
    assert cfg.offload_param.device == case["param_off"]
    assert (cfg.optimizer_spec and cfg.optimizer_spec.type) == case["optimizer"]
    assert (cfg.scheduler_spec and cfg.scheduler_spec.type) == case["scheduler"]
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == case["batch"]
    for fragment in case["warns"]:
        assert any(fragment in w for w in warned), (fragment, warned)
    x = case["extra"]
    zero = cfg.zero_optimization
    if "loss_scale" in x:
        assert prec.loss_scale == x["loss_scale"]
    elif case["compute"] != "float16":
        assert prec.loss_scale is None
    checks = {"reduce_bucket_size": zero.reduce_bucket_size, "persistence": zero.stage3_param_persistence_threshold,
              "prefetch": zero.stage3_prefetch_bucket_size, "gather16": cfg.gather_16bit_weights_on_model_save,
              "pin_opt": cfg.offload_optimizer.pin_memory, "clip": cfg.gradient_clipping,
              "reduce": str(prec.reduce_dtype), "hierarchy": cfg.hierarchy,
              "quantized": (zero.zero_quantized_weights, zero.zero_quantized_gradients),
              "total_num_steps": cfg.scheduler_spec and cfg.scheduler_spec.params.get("total_num_steps"),
              "warmup_num_steps": cfg.scheduler_spec and cfg.scheduler_spec.params.get("warmup_num_steps")}
    for key, want in x.items():
        if key == "mesh":
            assert cfg.mesh_shape(case["ws"]) == want
        elif key != "loss_scale":
            assert checks[key] == want, key
    resolved = cfg.to_dict()
    assert '"auto"' not in json.dumps(resolved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_config(resolved, args_of(case), world_size=case["ws"])
    assert again.to_dict() == resolved


def args_of(case):
    return TrainingArguments(**case["args"]) if case["args"] is not None else None


@pytest.mark.parametrize("name", [n for n in FILES if "error" not in EXPECTED[n] and EXPECTED[n]["ws"] == 8])
def test_corpus_config_builds_a_plan_on_8_devices(name):
    """The mapped rules/precision/optimizer drive the core: a plan and one step of a tiny model."""
    case = EXPECTED[name]
    cfg, _ = _load(name, case)
    mesh = zj.make_mesh(**cfg.mesh_shape(8))
    params = {"w": np.ones((16, 8), np.float32)}
    # Without an optimizer block or TrainingArguments the user brings the optimizer: plain SGD here.
    tx = cfg.optimizer(total_steps=100) if (cfg.optimizer_spec or cfg.training_args) else optax.sgd(1e-3)
    plan = zj.make_plan(params, tx, cfg.zero_rules(mesh), cfg.precision())
    assert plan.rules.stage == cfg.stage
    assert plan.precision == cfg.precision()
