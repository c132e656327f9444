"""Checkpoints: exact resume, restore onto other meshes / stages / precisions, rotation, best model,
atomic saves and errors that name what was expected and found."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zerojax as zj
from zerojax.checkpoint import CheckpointError, CheckpointManager, CheckpointOptions

BATCH = 16
WIDTHS = (16, 32, 32, 8)


def init_params(seed=0, widths=WIDTHS):
    rng = np.random.default_rng(seed)
    layers = [
        {"w": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), "b": np.zeros(b, np.float32)}
        for a, b in zip(widths[:-1], widths[1:])
    ]
    return {"layers": layers}


def loss_fn(params, batch):
    h = batch["x"].astype(params["layers"][0]["w"].dtype)
    for i, layer in enumerate(params["layers"]):
        h = h @ layer["w"] + layer["b"]
        if i < len(params["layers"]) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h.astype(jnp.float32) - batch["y"]) ** 2)


def batch_at(position):
    """The batch at data position `position`: a pure function of it, as a resumable loader is."""
    rng = np.random.default_rng(1000 + position)
    x = rng.normal(size=(BATCH, WIDTHS[0])).astype(np.float32)
    return {"x": x, "y": np.sin(x[:, : WIDTHS[-1]] * 2).astype(np.float32)}


def make(devices=None, stage=3, precision=None, replica=1, hierarchy="none", tx=None):
    mesh = zj.make_mesh(replica=replica, devices=devices or jax.devices())
    rules = zj.ZeroRules(mesh, stage=stage, hierarchy=hierarchy)
    return zj.make_plan(init_params(), tx or optax.adamw(3e-2, weight_decay=0.1), rules, precision or zj.Precision())


def run(plan, state, start, stop, step=None, manager=None, save_at=None):
    step = step or zj.make_train_step(loss_fn, plan)
    losses, snapshot = [], None
    for position in range(start, stop):
        state, metrics = step(state, batch_at(position))
        losses.append(np.asarray(metrics["loss"]))
        if position + 1 == save_at:
            snapshot = jax.device_get(state)
            manager.save(state, rng=jax.random.key(7), data_position=position + 1, config={"stage": plan.rules.stage})
    return np.array(losses), state, snapshot


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


PRECISIONS = {"fp32": zj.Precision(), "fp16": zj.Precision.fp16(zj.LossScale(initial_scale_power=12, window=3))}

RESUME = textwrap.dedent("""
    import json, sys
    from tests.test_checkpoint import CheckpointManager, PRECISIONS, make, run
    folder, stage, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    plan = make(stage=stage, precision=PRECISIONS[precision])
    restored = CheckpointManager(folder, read_only=True).restore(plan)
    losses, _, _ = run(plan, restored.state, restored.data_position, 10)
    print(json.dumps([float(x).hex() for x in losses]))
""")


@pytest.mark.parametrize(
    "stage,precision,fresh_process",
    [(1, "fp32", False), (2, "fp32", False), (3, "fp32", False), (3, "fp16", False), (3, "fp16", True)],
    ids=["stage1", "stage2", "stage3", "stage3-fp16", "stage3-fp16-fresh-process"],
)
def test_resume_is_bit_identical(tmp_path, stage, precision, fresh_process):
    plan = make(stage=stage, precision=PRECISIONS[precision])
    step = zj.make_train_step(loss_fn, plan)
    with CheckpointManager(tmp_path) as manager:
        full, _, snapshot = run(plan, zj.init_state(init_params(), plan), 0, 10, step, manager, save_at=5)
    if PRECISIONS[precision].loss_scale is not None:
        assert float(snapshot.loss_scale.scale) != 2.0**12, "the scaler must have moved for the test to bite"
    if fresh_process:
        done = subprocess.run([sys.executable, "-c", RESUME, str(tmp_path), str(stage), precision],
                              cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = np.array([float.fromhex(x) for x in json.loads(done.stdout.splitlines()[-1])], np.float32)
        np.testing.assert_array_equal(resumed, full[5:])
        return
    restored = CheckpointManager(tmp_path, read_only=True).restore(plan)
    assert restored.step == 5 and restored.data_position == 5 and restored.config == {"stage": stage}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(7)))
    leaves_equal(restored.state, snapshot)
    resumed, _, _ = run(plan, restored.state, restored.data_position, 10, step)
    np.testing.assert_array_equal(resumed, full[5:])


@pytest.fixture(scope="module")
def stage3_run(tmp_path_factory):
    """An fp32 stage-3 run on 8 devices, checkpointed at step 5: (folder, losses 1..10, step-5 state)."""
    folder = tmp_path_factory.mktemp("stage3")
    plan = make(stage=3)
    with CheckpointManager(folder) as manager:
        losses, _, snapshot = run(plan, zj.init_state(init_params(), plan), 0, 10, manager=manager, save_at=5)
    return folder, losses, snapshot


@pytest.mark.parametrize(
    "devices,stage,replica,hierarchy",
    [(4, 1, 1, "none"), (8, 3, 2, "hpz")],
    ids=["4dev-stage1", "8dev-hpz-2x4"],
)
def test_reshard_resumes_on_another_mesh(stage3_run, devices, stage, replica, hierarchy):
    folder, losses, snapshot = stage3_run
    plan = make(jax.devices()[:devices], stage, replica=replica, hierarchy=hierarchy)
    restored = CheckpointManager(folder, read_only=True).restore(plan)
    leaves_equal(restored.state.opt_state, snapshot.opt_state)  # moments restored exactly
    leaves_equal(restored.state.params, snapshot.params)
    assert jax.tree.leaves(restored.state.params)[0].sharding == jax.tree.leaves(plan.param_shardings)[0]
    resumed, _, _ = run(plan, restored.state, 5, 10)
    np.testing.assert_allclose(resumed, losses[5:], rtol=1e-5, atol=0)


def test_restore_onto_offloaded_optimizer_state(stage3_run):
    """A target whose optimizer state lives in pinned host memory (offload) gets it there."""
    folder, _, snapshot = stage3_run
    target = make(jax.devices()[:4], stage=2).abstract_state()
    host = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding.with_memory_kind("pinned_host"))
    target = target._replace(opt_state=jax.tree.map(host, target.opt_state))
    state = CheckpointManager(folder, read_only=True).restore(target).state
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}
    leaves_equal(state, snapshot)


@pytest.mark.parametrize(
    "source,target",
    [((8, 3, 1, "none"), (1, 3, 1, "none")), ((4, 1, 1, "none"), (8, 3, 1, "none")),
     ((8, 1, 1, "none"), (8, 3, 2, "mics")), ((8, 3, 2, "hpz"), (2, 0, 1, "none"))],
    ids=["8to1", "4to8-stage1to3", "8-stage1-to-mics", "hpz-to-2dev-stage0"],
)
def test_restore_onto_any_layout_is_exact(tmp_path, source, target):
    n, stage, replica, hierarchy = source
    plan = make(jax.devices()[:n], stage, replica=replica, hierarchy=hierarchy)
    with CheckpointManager(tmp_path) as manager:
        _, _, snapshot = run(plan, zj.init_state(init_params(), plan), 0, 2, manager=manager, save_at=2)
    n, stage, replica, hierarchy = target
    target_plan = make(jax.devices()[:n], stage, replica=replica, hierarchy=hierarchy)
    state = CheckpointManager(tmp_path, read_only=True).restore(target_plan.abstract_state()).state
    leaves_equal(state, snapshot)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(target_plan.state_shardings)):
        assert leaf.sharding == sharding


def test_precision_changes_between_save_and_restore(tmp_path):
    bf16 = make(stage=2, precision=zj.Precision.bf16())
    with CheckpointManager(tmp_path / "bf16") as manager:
        _, _, mixed = run(bf16, zj.init_state(init_params(), bf16), 0, 2, manager=manager, save_at=2)
    # bf16 (with fp32 master) -> fp32: the parameters are the saved master weights.
    fp32 = make(stage=1)
    state = CheckpointManager(tmp_path / "bf16", read_only=True).restore(fp32).state
    assert state.master is None
    leaves_equal(state.params, mixed.master)
    leaves_equal(state.opt_state, mixed.opt_state)
    # bf16 stage 2 -> bf16 stage 3, whose fp32 parameter shards are the master weights (no 16-bit copy).
    stage3 = make(stage=3, precision=zj.Precision.bf16())
    assert not stage3.keeps_master
    state = CheckpointManager(tmp_path / "bf16", read_only=True).restore(stage3).state
    assert state.master is None and {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    leaves_equal(state.params, mixed.master)
    # and back: the stage-3 checkpoint's parameters become the stage-2 master and its compute copy.
    with CheckpointManager(tmp_path / "stage3") as manager:
        manager.save(state)
    again = CheckpointManager(tmp_path / "stage3", read_only=True).restore(bf16).state
    leaves_equal(again.master, mixed.master)
    leaves_equal(again.params, mixed.params)
    # fp32 -> bf16: the master is the saved parameters, the compute copy is cast from it.
    with CheckpointManager(tmp_path / "fp32") as manager:
        _, _, single = run(fp32, zj.init_state(init_params(), fp32), 0, 2, manager=manager, save_at=2)
    state = CheckpointManager(tmp_path / "fp32", read_only=True).restore(bf16).state
    leaves_equal(state.master, single.params)
    leaves_equal(state.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), single.params))
    # bf16 -> fp16: the target scales the loss but the checkpoint has no scaler state.
    fp16 = make(stage=3, precision=zj.Precision.fp16())
    with pytest.raises(CheckpointError, match="no loss-scaler state.*loss_scale.init"):
        CheckpointManager(tmp_path / "bf16", read_only=True).restore(fp16)


def _save_steps(folder, options, metrics):
    """Saves steps 1.. with the given metrics (params + step each time); returns (kept, best, states)."""
    state = zj.init_state(init_params(), make(jax.devices()[:1], stage=0))
    states = []
    with CheckpointManager(folder, options) as manager:
        for i, m in enumerate(metrics, start=1):
            state = state._replace(step=jnp.asarray(i, jnp.int32), params=jax.tree.map(lambda x: x + 1, state.params))
            states.append(jax.device_get(state))
            manager.save(state, metrics=m)
            manager.wait()
        return manager.all_steps(), manager.best_step(), states


@pytest.mark.parametrize(
    "options,metrics,kept,best",
    [
        (CheckpointOptions(save_total_limit=2), [None] * 5, [4, 5], None),
        (CheckpointOptions(save_total_limit=2, metric_for_best_model="loss"),
         [{"loss": v} for v in (5, 1, 4, 3, 2)], [2, 5], 2),
        (CheckpointOptions(save_total_limit=3, metric_for_best_model="eval_accuracy"),
         [{"eval_accuracy": v} for v in (0.1, 0.9, 0.9, 0.5, 0.2, 0.3)], [2, 5, 6], 2),
        (CheckpointOptions(save_total_limit=1, load_best_model_at_end=True),
         [{"eval_loss": v} for v in (3, 1, 2)], [2, 3], 2),
        (CheckpointOptions(save_total_limit=3, metric_for_best_model="loss"),
         [{"loss": v} for v in (5, 4, 3, 2, 1)], [3, 4, 5], 5),
    ],
    ids=["latest-only", "best-kept", "accuracy-ties-keep-earlier", "limit1-best-and-latest", "best-is-latest"],
)
def test_rotation_keeps_the_best(tmp_path, options, metrics, kept, best):
    steps, best_step, _ = _save_steps(tmp_path, options, metrics)
    assert steps == kept and best_step == best
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == kept


def test_load_best_model_at_end(tmp_path):
    options = CheckpointOptions(load_best_model_at_end=True)
    assert options.metric_for_best_model == "loss" and options.greater_is_better is False
    _, _, states = _save_steps(tmp_path, options, [{"eval_loss": v} for v in (3, 1, 2)])
    last = jax.device_put(states[-1], make(jax.devices()[:1], stage=0).state_shardings)
    with CheckpointManager(tmp_path, options) as manager:  # one writer at a time
        best = manager.end_training(last)
    leaves_equal(best.params, states[1].params)  # step 2 has the lowest eval_loss
    assert int(best.step) == 3
    plain = CheckpointManager(tmp_path, CheckpointOptions()).end_training(last)
    leaves_equal(plain.params, states[-1].params)


def test_save_only_model(tmp_path):
    with pytest.raises(ValueError, match="save_only_model.*load_best_model_at_end"):
        CheckpointOptions(save_only_model=True, load_best_model_at_end=True)
    plan = make(stage=3, precision=zj.Precision.bf16())
    with CheckpointManager(tmp_path, CheckpointOptions(save_only_model=True)) as manager:
        _, _, snapshot = run(plan, zj.init_state(init_params(), plan), 0, 1, manager=manager, save_at=1)
        manager.wait()
        assert set(manager.saved_tensors()) == {"params"}
        with pytest.raises(CheckpointError, match="save_only_model=True.*restore_weights"):
            manager.restore(plan)
        params, master = manager.restore_weights(make(jax.devices()[:2], stage=1, precision=zj.Precision.bf16()))
    # ZeRO-3's parameters are its fp32 weights: a stage-1 target gets them as master, cast as compute copy.
    leaves_equal(master, snapshot.params)
    leaves_equal(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), snapshot.params))


def test_bad_input_names_expected_and_found(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointManager(tmp_path / "missing", read_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint step"):
        CheckpointManager(tmp_path / "empty", read_only=True)
    plan = make(jax.devices()[:2], stage=3)
    with CheckpointManager(tmp_path / "ck") as manager:
        run(plan, zj.init_state(init_params(), plan), 0, 1, manager=manager, save_at=1)
    manager = CheckpointManager(tmp_path / "ck", read_only=True)
    with pytest.raises(CheckpointError, match=r"step 4 is not in .*available steps: \[1\]"):
        manager.restore(plan, 4)
    with pytest.raises(CheckpointError, match="step='best'"):
        manager.restore(plan, "best")
    other = zj.make_plan(init_params(widths=(16, 48, 32, 8)), optax.adamw(1e-2), plan.rules)
    with pytest.raises(CheckpointError, match=r"tensor 'params.layers.0.b' expected shape \(48,\), found \(32,\)"):
        manager.restore(other)
    sgd = zj.make_plan(init_params(), optax.sgd(0.1, momentum=0.9), plan.rules)
    with pytest.raises(CheckpointError, match=r"expects tensor 'opt_state.0.trace.layers.0.b'"):
        manager.restore(sgd)
    with pytest.raises(KeyError, match="metric_for_best_model='accuracy'"):
        CheckpointManager(tmp_path / "m", CheckpointOptions(metric_for_best_model="accuracy")).save(
            zj.init_state(init_params(), plan), metrics={"loss": 1.0})
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"save_total_limit={bad!r}"):
            CheckpointOptions(save_total_limit=bad)


CRASH = textwrap.dedent("""
    import os, sys, time
    import jax, numpy as np
    from zerojax.checkpoint import CheckpointManager
    import zerojax as zj, optax
    plan = zj.make_plan({"w": np.ones((2048, 2048), np.float32)}, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))
    state = zj.init_state({"w": np.ones((2048, 2048), np.float32)}, plan)
    manager = CheckpointManager(sys.argv[1])
    manager.save(state)
    manager.wait()
    manager.save(state._replace(step=state.step + 1))
    deadline = time.monotonic() + 60
    while not any("tmp" in name for name in os.listdir(sys.argv[1])):  # the step-1 save has started
        if time.monotonic() > deadline:
            os._exit(4)
        time.sleep(0.001)
    os._exit(3)  # killed while the step-1 save is being written
""")


def test_crash_mid_save_keeps_the_last_good_step(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    assert any("tmp" in name for name in os.listdir(tmp_path)), os.listdir(tmp_path)  # the interrupted save
    manager = CheckpointManager(tmp_path, read_only=True)
    assert manager.all_steps() == [0] and manager.latest_step() == 0
    params, _ = manager.restore_weights(zj.make_plan({"w": np.ones((2048, 2048), np.float32)}, optax.adam(1e-3),
                                                     zj.ZeroRules(zj.make_mesh(), stage=1)))
    np.testing.assert_array_equal(np.asarray(params["w"]), 1.0)


MULTIPROCESS = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process, port, folder, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tests import test_checkpoint as T
    zj = T.zj
    plan = T.make(stage=3) if mode == "save" else T.make(stage=1, replica=2)
    sharding = NamedSharding(plan.mesh, P(zj.DATA_AXES))
    batch = lambda i: {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                       for k, v in T.batch_at(i).items()}
    step = zj.make_train_step(T.loss_fn, plan)
    if mode == "save":
        state, start, manager = zj.init_state(T.init_params(), plan), 0, T.CheckpointManager(folder)
    else:
        restored = T.CheckpointManager(folder, read_only=True).restore(plan)
        state, start, manager = restored.state, restored.data_position, None
    losses = []
    for i in range(start, 4):
        state, metrics = step(state, batch(i))
        losses.append(float(np.asarray(metrics["loss"])))
        if manager is not None and i + 1 == 2:
            manager.save(state, data_position=2)
    if manager is not None:
        manager.close()
    print(json.dumps(losses))
""")


def _two_processes(folder, mode):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cwd = os.path.dirname(os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", MULTIPROCESS, str(i), port, str(folder), mode], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_multiprocess_save_restores_on_other_process_counts(tmp_path):
    """2 processes x 4 devices save a stage-3 step (each writes its shards); it resumes in 2 processes on a
    2x4 stage-1 mesh and in this one process on 8 devices, matching the uninterrupted run."""
    full = _two_processes(tmp_path, "save")
    assert full[0] == full[1] and os.path.isdir(tmp_path / "2" / "state" / "ocdbt.process_1")
    resumed = _two_processes(tmp_path, "restore")
    np.testing.assert_allclose(resumed[0], full[0][2:], rtol=1e-5, atol=0)
    plan = make(stage=3)
    restored = CheckpointManager(tmp_path, read_only=True).restore(plan)
    losses, _, _ = run(plan, restored.state, restored.data_position, 4)
    np.testing.assert_allclose(losses, full[0][2:], rtol=1e-5, atol=0)
