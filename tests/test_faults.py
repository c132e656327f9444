"""Faults: SIGKILL during asynchronous saves, corrupt checkpoints and the fallback to the last good step,
storage errors, no pickle anywhere, and the key messages of the bad-input tour (scripts/error_tour.py)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import pytest

import zerojax as zj
from zerojax.checkpoint import (
    INTEGRITY,
    CheckpointError,
    CheckpointManager,
    CheckpointOptions,
    CheckpointWriteError,
    CorruptCheckpointError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _crash_run(tmp_path, kills):
    out = tmp_path / "crash.json"
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "crash_during_save.py"), "--kills", str(kills),
                           "--folder", str(tmp_path / "ck"), "--out", str(out), "--seed", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["kills"] == kills == summary["latest_restored_bit_identical"]
    assert summary["half_written_step_listed"] == 0
    assert all(not t["problems"] for t in summary["trials"])
    steps = [t["latest"] for t in summary["trials"]]
    assert steps == sorted(steps) and steps[-1] > 0, steps  # progress is never lost
    return summary


@pytest.mark.slow  # ~30 s of killed writers
def test_sigkill_during_async_saves_keeps_a_good_latest_step(tmp_path):
    """3 random SIGKILLs of a run saving every step asynchronously: each time the newest listed step
    verifies and restores bit-identically to the uninterrupted run; no half-written step is listed."""
    _crash_run(tmp_path, 3)


@pytest.mark.slow
def test_sigkill_20_times(tmp_path):
    summary = _crash_run(tmp_path, 20)
    assert summary["killed_mid_write"] >= 10  # most kills must land while a save is being written


# --- corruption ---------------------------------------------------------------------------------
def _plan():
    params = {"w": np.random.default_rng(0).normal(size=(256, 128)).astype(np.float32),
              "b": np.zeros(128, np.float32)}
    return params, zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A folder with steps 1, 2, 3 (params + k each), and the host states."""
    folder = tmp_path_factory.mktemp("three")
    params, plan = _plan()
    state = zj.init_state(params, plan)
    states = {}
    with CheckpointManager(folder) as manager:
        for k in (1, 2, 3):
            state = state._replace(step=state.step * 0 + k, params=jax.tree.map(lambda x: x + 1, state.params))
            states[k] = jax.device_get(state)
            manager.save(state)
        manager.wait()
    return folder, plan, states


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def _largest_file(folder, step):
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(folder, str(step))) for n in ns
             if n not in (INTEGRITY, "_CHECKPOINT_METADATA")]
    path = max(files, key=os.path.getsize)
    return path, os.path.relpath(path, os.path.join(folder, str(step)))


def _flip(path, where=0.5):
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * where)] ^= 0x01
    open(path, "wb").write(data)


def _same(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_manifest_covers_every_file_of_the_committed_step(three_steps):
    folder, _, _ = three_steps
    manifest = json.loads((folder / "3" / INTEGRITY).read_text())
    on_disk = {os.path.relpath(os.path.join(r, n), folder / "3") for r, _, ns in os.walk(folder / "3") for n in ns}
    assert set(manifest["files"]) == on_disk - {INTEGRITY, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert any(name.startswith("state/") and "/d/" in name for name in manifest["files"])  # the array data
    assert not [n for n in os.listdir(folder) if "tmp" in n]


def test_orbax_alone_misses_a_flipped_array_byte(three_steps, tmp_path):
    """Why the manifest exists: tensorstore has no checksum on array chunks (only on its b-tree index)."""
    folder, plan, states = three_steps
    copy = _copy(folder, tmp_path)
    path, _ = _largest_file(copy, 3)
    _flip(path)
    restored = CheckpointManager(copy, CheckpointOptions(verify_integrity=False), read_only=True).restore(plan)
    assert not _same(restored.state, states[3])  # silently different weights


def test_corrupt_steps_are_named_and_skipped(three_steps, tmp_path):
    folder, plan, states = three_steps
    copy = _copy(folder, tmp_path)
    path3, name3 = _largest_file(copy, 3)
    _flip(path3)
    with open(copy / "2" / "state" / "_METADATA", "r+b") as f:
        f.truncate(100)
    manager = CheckpointManager(copy, read_only=True)
    with pytest.raises(CorruptCheckpointError, match=rf"step 3 .* file {re.escape(name3)} fails its SHA-256") as e:
        manager.restore(plan)
    assert e.value.step == 3 and e.value.file == name3
    assert "restore an older step (step=2; available [1, 2])" in str(e.value)
    with pytest.raises(CorruptCheckpointError, match=r"step 2 .* file state/_METADATA has 100 bytes, \d+ were written"):
        manager.restore(plan, 2)
    assert _same(manager.restore(plan, 1).state, states[1])  # an older step still restores
    with pytest.warns(UserWarning, match=rf"skipped corrupt step\(s\) 3 \(file {re.escape(name3)}\), "
                                         r"2 \(file state/_METADATA\); restored step 1"):
        restored = manager.restore_latest_good(plan)
    assert restored.step == 1 and _same(restored.state, states[1])


def test_set_aside_lets_the_resumed_run_save_those_steps_again(three_steps, tmp_path):
    folder, plan, states = three_steps
    copy = _copy(folder, tmp_path)
    _flip(_largest_file(copy, 3)[0])
    with pytest.raises(CheckpointError, match="set_aside=True.*renames folders"):
        CheckpointManager(copy, read_only=True).restore_latest_good(plan, set_aside=True)
    with CheckpointManager(copy) as manager:
        with pytest.warns(UserWarning, match=r"skipped corrupt step\(s\) 3 .*renamed <step>.corrupt\); restored step 2"):
            restored = manager.restore_latest_good(plan, set_aside=True)
        assert restored.step == 2 and manager.all_steps() == [1, 2]
        assert manager.save(jax.device_put(states[3], plan.state_shardings)) is not False
        manager.wait()
    assert sorted(n for n in os.listdir(copy) if n != ".zerojax-writer.lock") == ["1", "2", "3", "3.corrupt"]
    assert _same(CheckpointManager(copy, read_only=True).restore(plan).state, states[3])


def test_a_step_read_unchecked_still_names_the_damaged_file(three_steps, tmp_path):
    """A step without its manifest is corrupt; restored unchecked (its files trusted), a damaged file is named."""
    folder, plan, _ = three_steps
    copy = _copy(folder, tmp_path)
    os.remove(copy / "3" / INTEGRITY)
    with open(copy / "3" / "state" / "_sharding", "r+b") as f:
        f.truncate(50)
    with pytest.raises(CorruptCheckpointError, match=r"step 3 .* its file integrity.json is missing"):
        CheckpointManager(copy, read_only=True).restore(plan)
    manager = CheckpointManager(copy, CheckpointOptions(verify_integrity=False), read_only=True)
    with pytest.raises(CorruptCheckpointError, match=r"step 3 .* reading file state/_sharding failed") as e:
        manager.restore(plan)
    assert e.value.file == "state/_sharding"


def test_every_step_corrupt(three_steps, tmp_path):
    folder, plan, _ = three_steps
    copy = _copy(folder, tmp_path)
    for k in (1, 2, 3):
        _flip(_largest_file(copy, k)[0], 0.3)
    with pytest.raises(CorruptCheckpointError, match=r"every step is corrupt \(3: file .*, 2: file .*, 1: file"):
        CheckpointManager(copy, read_only=True).restore_latest_good(plan)


# --- storage errors and overwrites -------------------------------------------------------------------
def test_unwritable_checkpoint_folder_is_one_message(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=r"cannot create the checkpoint folder in .*file/ck: Not a directory"):
        CheckpointManager(tmp_path / "file" / "ck")


def test_full_disk(tmp_path):
    tour = _script("error_tour")
    if not tour.tmpfs_available():
        pytest.skip("needs root to mount a small tmpfs")
    params, plan = _plan()
    with tour.tmpfs("64k") as small:
        with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint step 0 .*No space left on device.*free disk"):
            with CheckpointManager(os.path.join(small, "ck")) as manager:
                manager.save(zj.init_state(params, plan))
                manager.wait()
        assert not [s for s in os.listdir(os.path.join(small, "ck")) if s.isdigit()]  # nothing committed


def test_an_existing_step_is_never_overwritten(three_steps, tmp_path):
    folder, plan, states = three_steps
    copy = _copy(folder, tmp_path)
    params, _ = _plan()
    with CheckpointManager(copy) as manager, pytest.warns(UserWarning, match="step 3 already exists .* not overwritten"):
        assert manager.save(zj.init_state(params, plan)._replace(step=jax.numpy.asarray(3, jax.numpy.int32))) is False
    assert _same(CheckpointManager(copy, read_only=True).restore(plan).state, states[3])


def test_no_pickle_is_reachable():
    """Only safetensors and orbax (JSON, zarr/OCDBT) are read: no pickle, torch.load or allow_pickle in the
    package, the examples or the scripts."""
    pattern = re.compile(r"\bpickle\b|torch\.load|allow_pickle|np\.load\(|numpy\.load\(|joblib|dill\b|\.bin\b")
    hits = []
    for top in ("zerojax", "examples", "scripts"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py") and name != "error_tour.py":  # the tour writes a fake .bin to prove it is refused
                    text = open(os.path.join(root, name)).read()
                    hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert hits == []


# --- the bad-input tour ---------------------------------------------------------------------------
KEY_MESSAGES = {
    ("load_config", "missing file"): r"cannot read the config file",
    ("load_config", "indivisible batch"): r"train_batch_size=10 != .*fix one of them",
    ("zerojax export", "output folder not empty"): r"exit 2: .*exists and is not empty; .*overwrite",
    ("zerojax export", "corrupt checkpoint"): r"exit 2: .*step 0 .* is corrupt: file state/.* fails its SHA-256",
    ("zerojax export", "full disk"): r"exit 2: .*No space left on device.*free disk space",
    ("zerojax launch", "--nproc missing"): r"exit 2: .*--nproc is required",
    ("CheckpointManager.restore", "truncated file"): r"step 2 .* file state/_METADATA has \d+ bytes",
    ("load_pretrained", "only a pickle checkpoint"): r"model\.safetensors",
}


@pytest.fixture(scope="module")
def tour():
    return _script("error_tour")


@pytest.mark.parametrize("entry,bad_input", list(KEY_MESSAGES), ids=[" ".join(k) for k in KEY_MESSAGES])
def test_key_messages(tour, entry, bad_input):
    (case,) = [c for c in tour.cases() if c.entry == entry and c.bad_input.startswith(bad_input)]
    if case.needs_tmpfs and not tour.tmpfs_available():
        pytest.skip("needs root to mount a small tmpfs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = tour.outcome(case)
    assert outcome.ok, outcome.message
    assert re.search(KEY_MESSAGES[(entry, bad_input)], outcome.message), outcome.message
