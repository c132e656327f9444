"""Host offload through memory kinds: same losses, state in host memory between steps, clear errors."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import zerojax as zj
from tests import tiny_transformer as tiny

STEPS = 10


def train(stage, offload=None):
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16(),
                        offload=offload)
    state = zj.init_state(params, plan)
    step = zj.make_train_step(tiny.loss_fn, plan, micro_batches=2, max_grad_norm=1.0)
    losses = []
    for batch in tiny.batches(STEPS, 16):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, plan


@pytest.fixture(scope="module")
def references():
    return {stage: train(stage)[0] for stage in (1, 2, 3)}


CASES = [
    (1, zj.Offload("pinned_host")), (2, zj.Offload("pinned_host", mode="host")),
    (3, zj.Offload("pinned_host")), (3, zj.Offload("pinned_host", mode="host")),
    (3, zj.Offload("unpinned_host", ratio=0.5)), (3, zj.Offload("pinned_host", params="pinned_host")),
]


@pytest.mark.parametrize("stage,offload", CASES, ids=[f"stage{s}-{o.mode}-{o.ratio}-{o.params}" for s, o in CASES])
def test_offloaded_training_matches_and_state_lives_in_host_memory(references, stage, offload):
    losses, state, plan = train(stage, offload)
    np.testing.assert_allclose(losses, references[stage], rtol=1e-6)
    kinds = [x.sharding.memory_kind for x in jax.tree.leaves((state.master, state.opt_state))]
    if offload.ratio == 1.0:
        assert set(kinds) == {offload.optimizer}
    else:
        assert set(kinds) == {offload.optimizer, "device"}
    param_kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.params)}
    assert param_kinds == {offload.params or "device"}
    report = zj.memory_report(plan)
    assert 0 < report.host_bytes <= report.held_bytes
    if offload.ratio < 1:
        moved = report.host_bytes / (report.master_bytes + report.opt_state_bytes)
        assert 0.5 <= moved < 0.75, moved
    assert "in host memory" in str(report)


def test_bad_offload():
    mesh = zj.make_mesh()
    params = tiny.init_params()
    with pytest.raises(ValueError, match="stage=2"):
        zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(mesh, stage=2), offload=zj.Offload(params="pinned_host"))
    with pytest.raises(ValueError, match="'nvme'.*NVMe offload is not supported"):
        zj.Offload("nvme")
    for ratio in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"ratio={ratio}"):
            zj.Offload("pinned_host", ratio=ratio)
    with pytest.raises(ValueError, match="mode='streamed'"):
        zj.Offload("pinned_host", ratio=0.5, mode="host")


def test_missing_pinned_host_falls_back_with_one_warning():
    @dataclasses.dataclass
    class Memory:
        kind: str

    class Device:
        platform = "fake"

        def addressable_memories(self):
            return [Memory("device"), Memory("unpinned_host")]

    with pytest.warns(UserWarning, match="no 'pinned_host' memory; using 'unpinned_host'") as record:
        resolved = zj.Offload("pinned_host", params="unpinned_host").resolved(Device())
    assert len(record) == 1
    assert resolved.optimizer == "unpinned_host"


def test_offloaded_state_saves_restores_into_its_memory_kinds_without_recompiling(tmp_path):
    from zerojax.checkpoint import CheckpointManager

    params = tiny.init_params()
    offload = zj.Offload("pinned_host", params="pinned_host")
    plan = zj.make_plan(params, optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16(),
                        offload=offload)
    step = zj.make_train_step(tiny.loss_fn, plan)
    data = tiny.batches(6, 16)
    state = zj.init_state(params, plan)
    with CheckpointManager(tmp_path) as manager:
        for batch in data[:3]:
            state, _ = step(state, batch)
        manager.save(state)
        manager.wait()
        uninterrupted = []
        for batch in data[3:]:
            state, metrics = step(state, batch)
            uninterrupted.append(float(metrics["loss"]))
        restored = manager.restore(plan).state
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves((restored.params, restored.master, restored.opt_state))}
    assert kinds == {"pinned_host"}
    resumed = []
    for batch in data[3:]:
        restored, metrics = step(restored, batch)
        resumed.append(float(metrics["loss"]))
    assert resumed == uninterrupted
    assert step.jitted._cache_size() == 1, "a restored state must hit the compiled step, not recompile it"


LAYERED = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _spy_on_fetch(monkeypatch, module) -> list:
    """Records the (shape, memory space) of every array `module.fetch` copies to the device, as traced."""
    fetched, fetch = [], module.fetch

    def spy(x):
        fetched.append((x.shape, jax.typeof(x).memory_space))
        return fetch(x)

    monkeypatch.setattr(module, "fetch", spy)
    return fetched


@pytest.mark.slow  # test_targets compiles the per-layer fetch for v5p in the default suite
def test_parameter_offload_copies_one_layer_at_a_time_to_the_device(monkeypatch, tmp_path):
    """At stage 3 with parameter offload, a scanned model's stacked parameters stay in host memory
    until the scan copies one layer's shard to the device: same losses as without offload, and the
    offloaded state exports the same Hugging Face files. (The optimizer state stays on the device here:
    its offloaded update, layer by layer, is tested below.)"""
    from flax import nnx

    from zerojax import gather, models
    from zerojax.checkpoint import save_model

    config = LAYERED
    graphdef, params = nnx.split(models.from_hf_config(config, seed=0), nnx.Param)
    fetched = _spy_on_fetch(monkeypatch, gather)

    def run(offload):
        plan = zj.make_plan(params, optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16(), offload=offload)
        state = zj.init_state(params, plan)
        step = zj.make_train_step(models.causal_lm_loss(graphdef), plan)
        losses = []
        for i in range(STEPS):
            ids = np.random.default_rng(i).integers(0, 256, (8, 16)).astype(np.int32)
            state, metrics = step(state, {"input_ids": ids})
            losses.append(float(metrics["loss"]))
        return np.array(losses), state

    reference, reference_state = run(None)
    assert not fetched
    losses, state = run(zj.Offload(params="pinned_host"))
    for name, s in (("device", reference_state), ("host", state)):
        save_model(s, config, tmp_path / name, dtype="fp32", progress=False)
    assert (tmp_path / "host" / "model.safetensors").read_bytes() == (tmp_path / "device" / "model.safetensors").read_bytes()
    np.testing.assert_allclose(losses, reference, rtol=1e-6)
    stacked = [x for x in jax.tree.leaves(state.params["layers"])]
    assert {x.sharding.memory_kind for x in stacked} == {"pinned_host"}
    # traced once: every stacked matrix, one layer's shard (no layer axis), still in host memory; stacked
    # vectors (the norm scales) are copied to the device whole at the step's start
    matrices = [x for x in stacked if x.ndim >= 3]
    assert len(fetched) == len(matrices) < len(stacked)
    assert all(shape == x.sharding.shard_shape(x.shape)[1:] for (shape, _), x in zip(fetched, matrices))
    assert {space for _, space in fetched} == {jax.memory.Space.Host}


def test_offloaded_state_larger_than_the_machine_is_refused_before_it_is_allocated(monkeypatch, tmp_path):
    """Pinned memory cannot be swapped: a state whose pinned bytes exceed the machine's RAM is an error
    naming the size and the fix (at init and at restore), one that exceeds what is available a warning."""
    from zerojax import offload as offload_module
    from zerojax.checkpoint import CheckpointManager

    total, available = offload_module.machine_memory()
    assert 0 < available <= total
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16(),
                        offload=zj.Offload("pinned_host", params="pinned_host"))
    need = offload_module.host_bytes_in_process(plan.abstract_state())
    assert need == {"pinned_host": 8 * zj.memory_report(plan).host_bytes, "unpinned_host": 0}  # 8 local devices
    state = zj.init_state(params, plan)
    with CheckpointManager(tmp_path) as manager:
        manager.save(state)
    created = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: created.append(a) or pytest.fail("allocated"))
    monkeypatch.setattr(offload_module, "machine_memory", lambda: (need["pinned_host"] - 1, need["pinned_host"] - 1))
    with pytest.raises(ValueError, match=r"^init_state: the offloaded state needs \d+\.\d MiB of pinned host memory in "
                                         r"this process, more than this machine's .*offload_optimizer.ratio below 1"):
        zj.init_state(params, plan)
    assert created == []
    monkeypatch.undo()
    monkeypatch.setattr(offload_module, "machine_memory", lambda: (need["pinned_host"] - 1, need["pinned_host"] - 1))
    with pytest.raises(ValueError, match=r"^restore of step 0: the offloaded state needs"):
        CheckpointManager(tmp_path, read_only=True).restore(plan)
    monkeypatch.setattr(offload_module, "machine_memory", lambda: (need["pinned_host"], need["pinned_host"] - 1))
    with pytest.warns(UserWarning, match=r"init_state: .* only \d+\.\d MiB of \d+\.\d MiB is available now") as record:
        again = zj.init_state(params, plan)
    assert len(record) == 1
    assert {x.sharding.memory_kind for x in jax.tree.leaves(again.params)} == {"pinned_host"}



@pytest.mark.parametrize("name,tx,elementwise", [
    ("adamw", optax.adamw(1e-3), True), ("adam", optax.adam(1e-3), True), ("lion", optax.lion(1e-3), True),
    ("sgd-momentum", optax.sgd(1e-2, momentum=0.9), True),
    ("adamw-cosine", optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)), True),
    ("lamb", optax.lamb(1e-3), False), ("adafactor", optax.adafactor(1e-3), False),
    ("clip-inside", optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), False),
    ("apply-if-finite", optax.apply_if_finite(optax.adam(1e-3), 3), False),
])
def test_elementwise_optimizers_are_told_apart_from_ones_that_reduce(name, tx, elementwise):
    from zerojax.layerwise import is_elementwise

    params = {"w": jax.ShapeDtypeStruct((3, 8, 16), np.float32), "b": jax.ShapeDtypeStruct((16,), np.float32)}
    assert is_elementwise(tx.update, params, jax.eval_shape(tx.init, params), params) is elementwise


def _layered_run(offload, tx, monkeypatch, poison_step=None, stage=3):
    """Five steps of a 3-layer scanned Llama; returns the final state and what `layerwise.fetch` copied."""
    from flax import nnx

    from zerojax import layerwise, models

    graphdef, params = nnx.split(models.from_hf_config(LAYERED, seed=0), nnx.Param)
    fetched = _spy_on_fetch(monkeypatch, layerwise)
    loss = models.causal_lm_loss(graphdef)
    plan = zj.make_plan(params, tx, zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16(), offload=offload)
    state = zj.init_state(params, plan)
    step = zj.make_train_step(lambda p, b: loss(p, b) * b["poison"][0], plan, max_grad_norm=1.0)
    snapshots = []
    for i in range(5):
        ids = np.random.default_rng(i).integers(0, 256, (8, 16)).astype(np.int32)
        before = jax.device_get(state)
        poison = np.full((8,), np.nan if i == poison_step else 1.0, np.float32)
        state, metrics = step(state, {"input_ids": ids, "poison": poison})
        snapshots.append((bool(metrics["skipped"]), before, jax.device_get(state)))
    return state, plan, fetched, snapshots


@pytest.mark.slow  # the only CPU run of zerojax.layerwise; test_targets compiles it for v5p by default
@pytest.mark.parametrize("stage", [1, 3])
def test_streamed_offload_updates_stacked_layers_one_at_a_time(monkeypatch, stage):
    """With the optimizer state offloaded and an element-wise optimizer, the streamed update copies one
    layer of each stacked master/moment matrix to the device at a time (never the whole stack), gives the
    whole-tree update's result (to 2 ulp of each leaf's largest value: XLA fuses the two programs'
    multiply-adds differently), keeps every leaf in
    its memory kind, and a skipped step changes nothing."""
    from zerojax import step as step_module

    by_layer = step_module._stacked_offloaded
    monkeypatch.setattr(step_module, "_stacked_offloaded", lambda plan: None)
    whole, _, _, _ = _layered_run(zj.Offload("pinned_host"), optax.adamw(1e-2), monkeypatch, 2, stage)
    monkeypatch.setattr(step_module, "_stacked_offloaded", by_layer)
    state, _, fetched, snapshots = _layered_run(zj.Offload("pinned_host"), optax.adamw(1e-2), monkeypatch, 2, stage)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(whole)):
        assert got.sharding.memory_kind == want.sharding.memory_kind
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=2 * np.spacing(np.abs(want).max(initial=0)))
    assert {x.sharding.memory_kind for x in jax.tree.leaves((state.master, state.opt_state))} == {"pinned_host"}
    # traced once: every stacked matrix of master weights and both moments, one layer of it, from host
    # memory (7 matrices a layer: 21), beside the same layer of its gradient (already on the device)
    stacked = [x for x in jax.tree.leaves((state.master["layers"], state.opt_state)) if x.ndim >= 3]
    from_host = [shape for shape, space in fetched if space == jax.memory.Space.Host]
    assert len(from_host) == len(stacked) == 21 and len(fetched) == 28
    assert sorted(from_host) == sorted(x.shape[1:] for x in stacked)  # one layer (of the global array)
    assert [skipped for skipped, _, _ in snapshots] == [False, False, True, False, False]
    _, before, after = snapshots[2]
    for b, a in zip(jax.tree.leaves((before.params, before.master, before.opt_state)),
                    jax.tree.leaves((after.params, after.master, after.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_streamed_offload_keeps_the_whole_tree_update_for_an_optimizer_that_reduces():
    """LAMB's trust ratio reduces over each whole tensor: its offloaded update is not split by layer; nor
    is one whose stacked state is not all in host memory (ratio < 1)."""
    from flax import nnx

    from zerojax import models, step as step_module

    _, params = nnx.split(models.from_hf_config(LAYERED, seed=0), nnx.Param)

    def by_layer(tx, offload):
        plan = zj.make_plan(params, tx, zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16(), offload=offload)
        return step_module._stacked_offloaded(plan) is not None

    assert by_layer(optax.adamw(1e-2), zj.Offload("pinned_host"))
    assert not by_layer(optax.lamb(1e-2), zj.Offload("pinned_host"))
    assert not by_layer(optax.adamw(1e-2), zj.Offload("pinned_host", ratio=0.1))
    assert not by_layer(optax.adamw(1e-2), None)
