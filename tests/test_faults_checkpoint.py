"""Checkpoint and export faults (issue 17): an export never writes over what it reads; one writer per
checkpoint folder; a step is trusted only with a well-formed manifest covering every file it has, its
metrics included; a numbered folder without a step, or one bad step, never blocks the others; write
failures of the output folder are one line naming the file."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import zerojax as zj
from zerojax import cli, models
from zerojax.args import TrainingArguments
from zerojax.checkpoint import (
    INTEGRITY,
    CheckpointError,
    CheckpointManager,
    CheckpointOptions,
    CheckpointWriteError,
    CorruptCheckpointError,
    export_checkpoint,
)
from zerojax.checkpoint.errors import CheckpointLockedError
from zerojax.hf import export_hf
from zerojax.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # subprocesses: one CPU device
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
LOSSES = {1: 3.0, 2: 1.0, 3: 2.0}  # step 2 is the best


def _plan():
    with nnx.use_eager_sharding(False):
        _, params = nnx.split(models.from_hf_config(TINY, seed=0), nnx.Param)
    return params, zj.make_plan(params, optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/checkpoints with steps 1, 2, 3 of the tiny Llama (weights + step, loss metrics 3, 1, 2)."""
    folder = tmp_path_factory.mktemp("run")
    params, plan = _plan()
    state = zj.init_state(params, plan)
    with CheckpointManager(folder / "checkpoints", CheckpointOptions(metric_for_best_model="loss")) as manager:
        for k in (1, 2, 3):
            state = state._replace(step=state.step * 0 + k, params=jax.tree.map(lambda x: x + 1, state.params))
            manager.save(state, hf_config=TINY, metrics={"loss": LOSSES[k]})
    return folder, plan


@pytest.fixture
def ck(run, tmp_path):
    """A fresh copy of the run: `(RUN, RUN/checkpoints, plan)`."""
    folder, plan = run
    copy_ = shutil.copytree(folder, tmp_path / "run", symlinks=True)
    return copy_, copy_ / "checkpoints", plan


def _digest(folder) -> dict:
    """`{relative path: sha256}` of every file under `folder`, hidden ones included."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _export(capsys, *args) -> tuple[int, str]:
    code = cli.main(["export", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def _largest(step_folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_folder) for n in ns if n != INTEGRITY]
    path = max(files, key=os.path.getsize)
    return path, os.path.relpath(path, step_folder)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def _edit_manifest(step_folder, edit):
    path = step_folder / INTEGRITY
    manifest = json.loads(path.read_text())
    path.write_text(edit(manifest))


# --- 1. an export never writes over what it reads ------------------------------------------------
OVERLAPS = {  # name: (out_dir from (RUN, CKPT), how it overlaps, --overwrite)
    "run-folder": (lambda r, c: r, "contains", True),
    "checkpoint-folder": (lambda r, c: c, "is", True),
    "existing-step": (lambda r, c: c / "2", "is inside", True),
    "new-step": (lambda r, c: c / "5", "is inside", False),
}


@pytest.mark.parametrize("name", list(OVERLAPS))
def test_an_export_onto_its_checkpoint_is_refused_and_changes_nothing(ck, capsys, name):
    run_dir, ckpt, _ = ck
    out_of, relation, overwrite = OVERLAPS[name]
    out = out_of(run_dir, ckpt)
    before, around = _digest(run_dir), sorted(os.listdir(run_dir.parent))
    code, err = _export(capsys, ckpt, out, *(["--overwrite"] if overwrite else []))
    assert code == 2 and err.count("\n") == 1, err
    assert f"the output folder '{out}' {relation} the folder '{ckpt}' that the export reads" in err, err
    assert f"choose an output folder outside '{ckpt}' that does not contain it." in err, err
    assert _digest(run_dir) == before and sorted(os.listdir(run_dir.parent)) == around


def test_an_overlap_through_symlinks_is_refused(ck, capsys):
    run_dir, ckpt, _ = ck
    (run_dir.parent / "link").symlink_to(ckpt)
    before = _digest(run_dir)
    code, err = _export(capsys, ckpt, run_dir.parent / "link", "--overwrite")
    assert code == 2 and f"(through symlinks: {ckpt} is {ckpt})" in err, err
    code, err = _export(capsys, run_dir.parent / "link", run_dir, "--overwrite")
    assert code == 2 and f"(through symlinks: {run_dir} contains {ckpt})" in err, err
    assert _digest(run_dir) == before


def test_the_library_refuses_overlaps_too(ck):
    run_dir, ckpt, _ = ck
    before = _digest(run_dir)
    with pytest.raises(CheckpointError, match=r"^export: the output folder .* contains the folder"):
        export_checkpoint(ckpt, run_dir, overwrite=True, progress=False)
    lazy = CheckpointManager(ckpt, read_only=True).lazy_weights()
    with pytest.raises(ValueError, match=r"^export_hf: the output folder .* is the folder .*nothing was written"):
        export_hf(lazy, TINY, ckpt, overwrite=True, progress=False)
    assert _digest(run_dir) == before


# --- 2. one writer per checkpoint folder -----------------------------------------------------------
WRITER = textwrap.dedent("""
    import json, os, sys, time
    import jax, numpy as np, optax
    import zerojax as zj
    from zerojax.checkpoint import CheckpointManager

    base, who, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params = {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32)}
    plan = zj.make_plan(params, optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3))
    state = zj.init_state(params, plan)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    outcomes = []
    for run in range(runs):
        open(f"{base}/ready-{run}-{who}", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{base}/ready-{run}-{1 - who}") and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            with CheckpointManager(f"{base}/{run}") as manager:
                if manager.all_steps():  # as the Trainer does: another run's checkpoints are there
                    raise FileExistsError("holds checkpoints")
                for k in range(1, 4):
                    value = 1000.0 * (who + 1) + k
                    manager.save(state._replace(step=state.step * 0 + k,
                                                params=jax.tree.map(lambda x: x * 0 + value, state.params)))
            outcomes.append("wrote")
        except Exception as e:  # the refusal, or whatever else went wrong: recorded, the runs go on
            outcomes.append(f"{type(e).__name__}: {e}")
    print(json.dumps(outcomes), flush=True)
""")


def _race(script: str, args: list[str], timeout: int) -> tuple[list, list]:
    """Runs `script` as writers 0 and 1 at once (`python -c script FOLDER WHO ...`, args[0] the folder);
    returns each one's pid (its first JSON line) and outcomes (its last)."""
    procs = [subprocess.Popen([sys.executable, "-c", script, args[0], str(who), *args[1:]], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in (0, 1)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    return ([json.loads(out.splitlines()[0])["pid"] for out, _ in outputs],
            [json.loads(out.splitlines()[-1]) for out, _ in outputs])


def _owner(manager, step) -> int:
    """The writer (0 or 1) whose every tensor of `step` this is (an error if the step mixes two)."""
    values = {float(v) for leaf in jax.tree.leaves(manager.lazy_weights(step)) for v in np.unique(leaf())}
    assert len(values) == 1, (manager.directory, step, values)
    value = values.pop()
    assert value in (1000.0 + step, 2000.0 + step), (manager.directory, step, value)
    return int(value // 1000) - 1


def test_two_writers_started_together_20_times_never_mix(tmp_path):
    """20 times, two processes open one checkpoint folder at the same instant and save steps 1-3: one
    writes, the other is refused naming the folder and the writer's pid; every step on disk holds only
    the tensors of the run that wrote it, and every folder only that run's steps."""
    runs = 20
    pids, outcomes = _race(WRITER, [str(tmp_path), str(runs)], timeout=180)
    locked = 0
    for run in range(runs):
        results = [outcomes[0][run], outcomes[1][run]]
        assert sorted(r == "wrote" for r in results) == [False, True], results
        writer = results.index("wrote")
        refusal = results[1 - writer]
        assert refusal.startswith(("CheckpointLockedError: ", "FileExistsError: holds checkpoints")), refusal
        if refusal.startswith("CheckpointLockedError"):
            locked += 1
            assert f"checkpoint folder {tmp_path / str(run)} is being written by another writer (pid {pids[writer]}" \
                   in refusal, refusal
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ignored folder, no failed metrics
            manager = CheckpointManager(tmp_path / str(run), read_only=True)
        assert manager.all_steps() == [1, 2, 3]
        assert {_owner(manager, s) for s in manager.all_steps()} == {writer}
    assert locked >= runs // 2, outcomes  # most starts overlap: the lock, not the timing, keeps them apart


TRAINER_WRITER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    import jax, numpy as np
    from flax import nnx
    from zerojax.args import TrainingArguments
    from zerojax.models import from_hf_config
    from zerojax.trainer import Trainer

    base, who, runs, tiny = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    jax.config.update("jax_compilation_cache_dir", f"{base}/jax-cache-{who}")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    data = np.random.default_rng(0).integers(0, 256, size=(64, 17)).astype(np.int32)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    outcomes = []
    for run in range(runs):
        with nnx.use_eager_sharding(False):
            model = from_hf_config(tiny, seed=who)
        args = TrainingArguments(output_dir=f"{base}/{run}", per_device_train_batch_size=1, max_steps=3, save_steps=1,
                                 seed=who)
        trainer = Trainer(model, args, data, hf_config=tiny)
        step, hashes = trainer.train_step, {}

        def recorded(state, batch):  # the run's own weights after each step, to tell whose a checkpoint is
            state, out = step(state, batch)
            leaves = jax.tree.leaves(jax.device_get(state.params))
            hashes[int(state.step)] = sorted(hashlib.sha256(np.asarray(x).tobytes()).hexdigest() for x in leaves)
            return state, out

        trainer.train_step = recorded
        open(f"{base}/ready-{run}-{who}", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(f"{base}/ready-{run}-{1 - who}") and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            trainer.train()
            outcomes.append(hashes)
        except Exception as e:  # the refusal, or whatever else went wrong: recorded, the runs go on
            outcomes.append(f"{type(e).__name__}: {e}")
    print(json.dumps(outcomes), flush=True)
""")


@pytest.mark.slow
def test_two_trainers_started_together_20_times_never_mix(tmp_path):
    """Issue 17's acceptance run: 20 times, two Trainers (two processes, different seeds) start on one
    output_dir at the same instant; one trains and checkpoints, the other is refused; every checkpoint
    on disk holds exactly the weights of the run that trained (as that run recorded them)."""
    runs = 20
    pids, outcomes = _race(TRAINER_WRITER, [str(tmp_path), str(runs), json.dumps(TINY)], timeout=1500)
    locked = 0
    for run in range(runs):
        results = [outcomes[0][run], outcomes[1][run]]
        assert sorted(isinstance(r, dict) for r in results) == [False, True], results
        writer = [isinstance(r, dict) for r in results].index(True)
        refusal = results[1 - writer]
        assert refusal.startswith(("CheckpointLockedError: ", "FileExistsError: Trainer.train: ")), refusal
        if refusal.startswith("CheckpointLockedError"):
            locked += 1
            assert f"(pid {pids[writer]} on " in refusal, refusal
        manager = CheckpointManager(tmp_path / str(run) / "checkpoints", read_only=True)
        assert manager.all_steps() == [1, 2, 3]
        for step in manager.all_steps():
            leaves = jax.tree.leaves(manager.lazy_weights(step))
            saved = sorted(hashlib.sha256(np.asarray(leaf()).tobytes()).hexdigest() for leaf in leaves)
            assert saved == results[writer][str(step)], (run, step)
    assert locked >= runs // 2, outcomes


HOLDER = textwrap.dedent("""
    import sys, time
    from zerojax.checkpoint import CheckpointManager
    manager = CheckpointManager(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_writers_lock_names_it_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ck")], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointLockedError, match=rf"^checkpoint folder {re.escape(str(tmp_path / 'ck'))} is "
                                                        rf"being written by another writer \(pid {holder.pid} on ") as e:
            CheckpointManager(tmp_path / "ck")
        assert e.value.pid == holder.pid and "\n" not in str(e.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with CheckpointManager(tmp_path / "ck") as manager:  # the OS released the dead writer's lock
        assert manager.all_steps() == []


def test_a_second_trainer_on_one_output_dir_is_refused(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    refused = rf"checkpoint folder {re.escape(str(tmp_path))}/checkpoints is being written by this process \(pid "
    with CheckpointManager(tmp_path / "checkpoints"), pytest.raises(CheckpointLockedError, match=refused):
        trainer.train()  # while the first writer holds the folder
    assert not (tmp_path / "metrics.jsonl").exists() and os.listdir(tmp_path / "checkpoints") == [".zerojax-writer.lock"]


def test_a_trainer_that_raises_releases_its_folder(tmp_path):
    """A resume that fails (here: a corrupt step) closes the Trainer's manager, so the same process can
    resume again without a lock error."""
    trainer = _tiny_trainer(tmp_path)
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(trainer.state, hf_config=TINY)
    _flip(_largest(tmp_path / "checkpoints" / "0")[0])
    with pytest.raises(CorruptCheckpointError, match="step 0 .* is corrupt"):
        trainer.train(resume_from_checkpoint=True)
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.all_steps() == [0]


# --- 3. a step is complete only with a well-formed manifest covering every file -------------------
MANIFEST_DAMAGE = {
    "deleted": (lambda step, name: os.remove(step / INTEGRITY), INTEGRITY, r"its file integrity.json is missing"),
    "files emptied": (lambda step, name: _edit_manifest(step, lambda m: json.dumps(dict(m, files={}))),
                      None, r"file \S+ is not in its integrity.json"),
    "entry removed": (lambda step, name: _edit_manifest(
        step, lambda m: json.dumps(dict(m, files={k: v for k, v in m["files"].items() if k != name}))),
        "flipped", r"file \S+ is not in its integrity.json"),
}


@pytest.mark.filterwarnings("ignore:.*left out of the ranking")
@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_flipped_byte_under_a_missing_or_partial_manifest_is_corruption(ck, capsys, damage):
    _, ckpt, plan = ck
    path, name = _largest(ckpt / "3")
    _flip(path)
    mutate, file, message = MANIFEST_DAMAGE[damage]
    mutate(ckpt / "3", name)
    manager = CheckpointManager(ckpt, read_only=True)
    with pytest.raises(CorruptCheckpointError, match=rf"^checkpoint step 3 in {re.escape(str(ckpt))} is corrupt: "
                                                     + message) as e:
        manager.restore(plan)
    assert e.value.step == 3 and e.value.file == {None: e.value.file, "flipped": name}.get(file, file)
    assert "restore an older step (step=2" in str(e.value) and "\n" not in str(e.value)
    if damage == "deleted":
        assert str(e.value).endswith("If you trust its files, CheckpointOptions(verify_integrity=False) restores "
                                     "it unchecked.")
    code, err = _export(capsys, ckpt, ckpt.parent / "hf")
    assert code == 2 and "step 3" in err and "is corrupt" in err, err
    with pytest.warns(UserWarning, match=r"skipped corrupt step\(s\) 3 .*restored step 2"):
        assert manager.restore_latest_good(plan).step == 2


# --- 4. --step best ranks only by metrics that pass their check -------------------------------------
@pytest.mark.parametrize("also", ["", "manifest deleted"])
def test_best_ignores_a_step_whose_metrics_fail_their_check(ck, capsys, also):
    _, ckpt, _ = ck
    metrics = ckpt / "1" / "metrics" / "metrics"
    metrics.write_text(metrics.read_text().replace("3.0", "0.0"))  # one byte: step 1 would look best
    if also:
        os.remove(ckpt / "1" / INTEGRITY)
    what = "cannot be checked: its integrity.json is missing" if also else "fails its SHA-256 check"
    with pytest.warns(UserWarning, match=rf"step 1 .*metrics file metrics/metrics {what}.*left out of the ranking"):
        assert CheckpointManager(ckpt, read_only=True).resolve_step("best") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _export(capsys, ckpt, ckpt.parent / "best", "--step", "best")[0] == 0
        assert _export(capsys, ckpt, ckpt.parent / "two", "--step", "2")[0] == 0
    assert _digest(ckpt.parent / "best") == _digest(ckpt.parent / "two")


# --- 10. one bad step never blocks the others ----------------------------------------------------------
def test_a_truncated_metrics_file_blocks_only_its_own_step(ck, capsys):
    _, ckpt, plan = ck
    with open(ckpt / "1" / "metrics" / "metrics", "r+b") as f:
        f.truncate(5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        manager = CheckpointManager(ckpt, read_only=True)
        assert manager.restore(plan).step == 3 and manager.resolve_step("best") == 2
    bad_metrics = [str(w.message) for w in record if "metrics/metrics" in str(w.message)]
    assert len(bad_metrics) == 1 and "step 1 " in bad_metrics[0] and "has 5 bytes" in bad_metrics[0], bad_metrics
    with pytest.raises(CorruptCheckpointError, match=r"step 1 .* file metrics/metrics has 5 bytes"):
        manager.restore(plan, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _export(capsys, ckpt, ckpt.parent / "hf", "--step", "latest")[0] == 0


# --- 11. a numbered folder without a step is not a step; malformed manifests are corruption ------------
def test_numbered_folders_without_a_step_are_ignored(ck, capsys):
    _, ckpt, plan = ck
    (ckpt / "7").mkdir()
    (ckpt / "5").mkdir()
    (ckpt / "5" / "config.json").write_text("{}")  # e.g. an export written there by an older zerojax
    (ckpt / "9" / "metrics").mkdir(parents=True)  # the remains of a step deleted by rotation
    with pytest.warns(UserWarning, match=r"numbered folder\(s\) \[5, 7, 9\] hold no checkpoint step") as record:
        manager = CheckpointManager(ckpt, read_only=True)
    assert len(record) == 1
    assert manager.all_steps() == [1, 2, 3] and manager.latest_step() == 3
    assert manager.restore(plan).step == 3 and manager.restore_latest_good(plan).step == 3
    with pytest.raises(CheckpointError, match=r"step 7 is not in .*available steps: \[1, 2, 3\]"):
        manager.restore(plan, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _export(capsys, ckpt, ckpt.parent / "hf")[0] == 0
        with CheckpointManager(ckpt) as writer:
            state = jax.device_put(manager.restore(plan).state, plan.state_shardings)
            with pytest.raises(CheckpointError, match=r"cannot save checkpoint step 5: .*/5 exists and holds no "
                                                      r"checkpoint step; move it out"):
                writer.save(state._replace(step=state.step * 0 + 5))


MALFORMED = {
    "entry of the wrong type": (lambda m: json.dumps(dict(m, files=dict(m["files"], **{"meta/metadata": "x"}))),
                                r"has a malformed entry 'meta/metadata': x \(expected \[size, sha256\]\)"),
    "files a list": (lambda m: json.dumps(dict(m, files=list(m["files"]))), r"is not a zerojax-integrity/1 manifest"),
    "not an object": (lambda m: "[1, 2]", r"is not a zerojax-integrity/1 manifest"),
    "not JSON": (lambda m: '{"files": ', r"is unreadable \("),
    "path outside the step": (lambda m: json.dumps(dict(m, files={"../2/meta/metadata": [1, "0" * 64]})),
                              r"has a malformed entry '../2/meta/metadata'"),
}


@pytest.mark.filterwarnings("ignore:.*left out of the ranking")
@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_manifest_is_corruption_and_falls_back(ck, kind):
    _, ckpt, plan = ck
    edit, message = MALFORMED[kind]
    _edit_manifest(ckpt / "3", edit)
    manager = CheckpointManager(ckpt, read_only=True)
    with pytest.raises(CorruptCheckpointError, match=r"step 3 .* its file integrity.json " + message) as e:
        manager.restore(plan)
    assert e.value.file == INTEGRITY and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=r"skipped corrupt step\(s\) 3 \(file integrity.json\); restored step 2"):
        assert manager.restore_latest_good(plan).step == 2


# --- 14. write failures of the output folder are one line naming the file ------------------------------
def _tiny_trainer(output_dir):
    with nnx.use_eager_sharding(False):
        model = models.from_hf_config(TINY, seed=0)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=1, max_steps=2, save_steps=1)
    data = np.random.default_rng(0).integers(0, 256, size=(64, 17)).astype(np.int32)
    return Trainer(model, args, data, hf_config=TINY)


def test_save_model_onto_the_run_folder_is_refused(tmp_path):
    """`Trainer.save_model(output_dir, overwrite=True)` would replace the run's checkpoints by the export."""
    trainer = _tiny_trainer(tmp_path)
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    for out in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "1"):
        with pytest.raises(ValueError, match=r"^Trainer.save_model: the output folder .* (contains|is|is inside) the "
                                             r"folder .*checkpoints'"):
            trainer.save_model(out, overwrite=True)
    assert (tmp_path / "checkpoints" / "1").is_dir()
    assert (trainer.save_model(tmp_path / "hf") / "config.json").exists()


def test_an_unwritable_metrics_log_is_one_line(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(CheckpointWriteError, match=rf"^cannot write {re.escape(str(tmp_path))}/metrics.jsonl: Is a "
                                                   r"directory; remove or rename the folder of that name\.$"):
        trainer._log({"step": 1, "loss": 1.0})


@pytest.fixture
def tmpfs(tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(point)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("needs root to mount a tmpfs")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def test_a_read_only_output_folder_at_resume_is_one_line(tmpfs):
    trainer = _tiny_trainer(tmpfs)
    with CheckpointManager(tmpfs / "checkpoints") as manager:
        manager.save(trainer.state, hf_config=TINY)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(CheckpointWriteError, match=rf"^cannot write {re.escape(str(tmpfs))}/checkpoints/"
                                                   r"\.zerojax-writer\.lock: Read-only file system; choose a "
                                                   r"writable output folder\.$"):
        trainer.train(resume_from_checkpoint=True)


def test_a_file_as_export_folder_is_called_a_file(ck, capsys):
    _, ckpt, _ = ck
    (ckpt.parent / "out").write_text("a file")
    code, err = _export(capsys, ckpt, ckpt.parent / "out")
    assert code == 2 and f"'{ckpt.parent / 'out'}' is a file, not a folder; choose a new folder" in err, err


def test_a_step_folder_left_without_its_meta_is_corruption(ck, capsys):
    """What a kill during rotation can leave: a numbered folder with part of a step (here its `state`
    only) is a corrupt step, never a KeyError; the newest good step is restored in its place."""
    _, ckpt, plan = ck
    shutil.copytree(ckpt / "3" / "state", ckpt / "4" / "state")
    manager = CheckpointManager(ckpt, read_only=True)
    with pytest.raises(CorruptCheckpointError, match=r"step 4 .* is corrupt: its file integrity.json is missing"):
        manager.restore(plan)
    with pytest.raises(CorruptCheckpointError, match=r"step 4 .* is corrupt: its folder meta is missing; restore an "
                                                     r"older step \(step=3"):
        manager.metadata(4)
    with pytest.warns(UserWarning, match=r"skipped corrupt step\(s\) 4 \(file integrity.json\); restored step 3"):
        assert manager.restore_latest_good(plan).step == 3
    code, err = _export(capsys, ckpt, ckpt.parent / "hf")
    assert code == 2 and "step 4" in err and "integrity.json is missing" in err, err
    assert _export(capsys, ckpt, ckpt.parent / "hf", "--step", "3")[0] == 0
