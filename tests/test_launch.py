"""`zerojax launch` and `zerojax.distributed`: ZeRO-3 on 4 and 2 processes trains like one process
with the same devices; a checkpoint written by 4 processes resumes in 1 and 2 processes at other
stages; a dead process ends the run, naming its rank, with nothing left running; signals are
forwarded; bad arguments are one line and exit status 2.

The launcher runs with this session's environment, whose XLA_FLAGS force 8 host devices: the
processes must get `--devices-per-proc` devices each regardless.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import zerojax as zj
import zerojax.distributed as zd
from tests import mp_train
from zerojax import cli
from zerojax.launch import LaunchSpec, child_env, free_coordinator

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "zerojax.cli", "launch"]


def launch(*args, timeout=240):
    return subprocess.run([*LAUNCH, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def results(stdout: str) -> dict[int, dict]:
    found = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"\[rank (\d+)\] RESULT (.*)", line)
        if m:
            found[int(m.group(1))] = json.loads(m.group(2))
    return found


class Lines:
    """The lines a running launcher prints, read in the background."""

    def __init__(self, proc):
        self.q = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(line) for line in proc.stdout], daemon=True).start()
        self.seen = []

    def wait_for(self, pattern, count, timeout):
        end = time.monotonic() + timeout
        while len([l for l in self.seen if re.search(pattern, l)]) < count:
            self.seen.append(self.q.get(timeout=max(0.01, end - time.monotonic())))
        return [l for l in self.seen if re.search(pattern, l)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


PER_PROC, SAVE_AT = 2, 3


def launch_training(nproc, *args):
    """`RESULT` of every rank of `python -m tests.mp_train ARGS` under `zerojax launch --nproc N`."""
    run = launch("--nproc", str(nproc), "--devices-per-proc", str(PER_PROC), "--timeout", "200",
                 "--", sys.executable, "-m", "tests.mp_train", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    got = results(run.stdout)
    assert sorted(got) == list(range(nproc))
    for rank, r in got.items():
        assert (r["processes"], r["devices"], r["local_devices"]) == (nproc, nproc * PER_PROC, PER_PROC)
        assert r["losses"] == got[0]["losses"], f"rank {rank} saw other losses than rank 0"
    return got[0]["losses"]


def single_process(ndev, **kw):
    return mp_train.train(zj.make_mesh(devices=jax.devices()[:ndev]), **kw)


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    """ZeRO-3 on 4 processes x 2 devices, saving a checkpoint after step SAVE_AT: (losses, folder)."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    return launch_training(4, "--save", str(folder), "--save-at", str(SAVE_AT)), folder


@pytest.fixture(scope="module")
def eight_devices():
    losses = single_process(8)
    assert losses[-1] < 0.9 * losses[0], "the run must learn for parity to mean something"
    return losses


@pytest.mark.slow  # the default suite runs the two-process check below
def test_zero3_on_four_processes_matches_one_process_with_eight_devices(four_processes, eight_devices):
    np.testing.assert_allclose(four_processes[0], eight_devices, rtol=1e-5, atol=0)


@pytest.mark.slow  # ~17 s; CI runs it with the slow tests (the default suite stays under 10 minutes)
def test_zero3_on_two_processes_matches_one_process_with_four_devices():
    np.testing.assert_allclose(launch_training(2), single_process(4), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_checkpoint_of_four_processes_resumes_in_one_process_at_another_stage(four_processes, eight_devices):
    _, folder = four_processes
    resumed = mp_train.train(zj.make_mesh(), stage=1, restore=str(folder))
    np.testing.assert_allclose(resumed, eight_devices[SAVE_AT:], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_checkpoint_of_four_processes_resumes_in_two_processes_at_another_stage(four_processes, eight_devices):
    _, folder = four_processes
    resumed = launch_training(2, "--restore", str(folder), "--stage", "2")
    np.testing.assert_allclose(resumed, eight_devices[SAVE_AT:], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_hf_export_of_a_four_process_run_loads_in_transformers(tmp_path):
    import transformers

    from tests import hf_tiny
    from zerojax.checkpoint import export_checkpoint

    hf_tiny.torch_model("llama").save_pretrained(tmp_path / "src")
    losses = launch_training(4, "--hf-model", str(tmp_path / "src"), "--save", str(tmp_path / "ck4"))
    want = mp_train.train_hf(zj.make_mesh(), tmp_path / "src", tmp_path / "ck1")
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=0)
    ids = hf_tiny.token_ids()
    logits = {
        n: hf_tiny.torch_logits(transformers.AutoModelForCausalLM.from_pretrained(
            export_checkpoint(tmp_path / f"ck{n}", tmp_path / f"hf{n}", progress=False)), ids)
        for n in (4, 1)
    }
    np.testing.assert_allclose(logits[4], logits[1], rtol=0, atol=1e-4)
    assert np.abs(logits[4] - hf_tiny.torch_logits(hf_tiny.torch_model("llama"), ids)).max() > 1e-2  # trained


@pytest.mark.slow  # a rank that dies by exit status is checked by default (test_failed_rank_stops_the_others_...)
def test_sigkill_of_one_process_ends_the_run_naming_its_rank():
    proc = subprocess.Popen(
        [*LAUNCH, "--nproc", "2", "--grace", "3", "--timeout", "200", "--", sys.executable, "-m",
         "tests.mp_train", "--forever"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready = Lines(proc).wait_for(r"READY \d+ 2.0", 2, timeout=150)
        pids = {int(re.search(r"\[rank (\d)\]", l).group(1)): int(l.split()[-2]) for l in ready}
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    assert rc != 0 and elapsed < 60
    assert "rank 1 failed (killed by SIGKILL)" in proc.stderr.read()
    assert not any(alive(pid) for pid in pids.values())


WAIT_FOR_SIGNALS = (
    "import signal, sys, time\n"
    "def bye(n, _):\n"
    "    print('got', signal.Signals(n).name, flush=True); sys.exit(3)\n"
    "signal.signal(signal.SIGINT, bye); signal.signal(signal.SIGTERM, bye)\n"
    "print('ready', flush=True); time.sleep(60)\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_are_forwarded_to_every_process(sig):
    proc = subprocess.Popen([*LAUNCH, "--nproc", "3", "--", sys.executable, "-c", WAIT_FOR_SIGNALS],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        lines.wait_for("ready", 3, timeout=30)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        got = lines.wait_for(f"got {sig.name}", 3, timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(got) == [f"[rank {r}] got {sig.name}\n" for r in range(3)]
    assert rc == 128 + sig
    assert f"received {sig.name}" in proc.stderr.read()


def test_failed_rank_stops_the_others_and_sets_the_exit_status():
    script = 'echo "hello $ZEROJAX_PROCESS_ID/$ZEROJAX_NUM_PROCESSES"; [ "$ZEROJAX_PROCESS_ID" = 1 ] && exit 7; exec sleep 60'
    start = time.monotonic()
    run = launch("--nproc", "3", "--", "sh", "-c", script, timeout=30)
    assert time.monotonic() - start < 20
    assert run.returncode == 7
    lines = run.stdout.splitlines()
    assert "[rank 1] hello 1/3" in lines
    assert all(re.fullmatch(r"\[rank (\d)\] hello \1/3", line) for line in lines)
    assert run.stderr.strip().splitlines()[-1] == "zerojax launch: rank 1 failed (exit status 7); the other processes were stopped"


def test_timeout_kills_processes_that_ignore_sigterm_after_the_grace_period():
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    start = time.monotonic()
    run = launch("--nproc", "2", "--timeout", "2", "--grace", "1", "--", sys.executable, "-c", ignore, timeout=30)
    assert run.returncode == 124
    assert 3 <= time.monotonic() - start < 15, "SIGTERM is ignored: only the SIGKILL after the grace period ends it"
    assert sorted(run.stdout.splitlines()) == ["[rank 0] up", "[rank 1] up"]
    assert "passed its --timeout" in run.stderr


def test_child_environment_names_the_rank_and_drops_the_forced_device_count():
    spec = LaunchSpec(("true",), nproc=4, devices_per_proc=2)
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d", "HOME": "/h"}
    env = child_env(base, spec, "127.0.0.1:1234", rank=3)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d" and env["HOME"] == "/h"
    assert (env[zd.COORDINATOR], env[zd.NUM_PROCESSES], env[zd.PROCESS_ID], env[zd.DEVICES_PER_PROC]) == (
        "127.0.0.1:1234", "4", "3", "2")
    assert "XLA_FLAGS" not in child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, spec, "h:1", 0)


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--nproc", "0", "--", "true"], "--nproc=0"),
        (["--nproc", "two", "--", "true"], "--nproc='two'"),
        (["--", "true"], "--nproc is required"),
        (["--nproc", "2"], "no command"),
        (["--nproc", "2", "--"], "no command"),
        (["--nproc", "2", "--devices-per-proc", "0", "--", "true"], "--devices-per-proc=0"),
        (["--nproc", "2", "--coordinator", "localhost", "--", "true"], "--coordinator='localhost'"),
        (["--nproc", "2", "--coordinator", "localhost:70000", "--", "true"], "--coordinator='localhost:70000'"),
        (["--nproc", "2", "--timeout", "-1", "--", "true"], "--timeout=-1.0"),
        (["--nproc", "2", "--", "no-such-command-zj"], "cannot run 'no-such-command-zj'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_status_2(capsys, args, flag):
    assert cli.main(["launch", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("zerojax launch: ") and flag in err


def test_global_batch_on_one_process_is_the_numpy_batch():
    mesh = zj.make_mesh(replica=2)
    batch = {"tokens": np.arange(16 * 9, dtype=np.int32).reshape(16, 9), "w": np.ones(16, np.float32)}
    assert zd.process_rows(16, mesh) == slice(0, 16)
    placed = zd.global_batch(batch, mesh)
    for key in batch:
        assert placed[key].sharding.is_equivalent_to(zd.batch_sharding(mesh), batch[key].ndim)
        np.testing.assert_array_equal(np.asarray(placed[key]), batch[key])
    with pytest.raises(ValueError, match=r"\['w'\].*shape \(12,\).*multiple of 8"):
        zd.global_batch({"w": np.ones(12)}, mesh)


@pytest.mark.parametrize(
    "env,match",
    [
        ({zd.NUM_PROCESSES: "0", zd.PROCESS_ID: "0"}, "ZEROJAX_NUM_PROCESSES='0'"),
        ({zd.NUM_PROCESSES: "2", zd.PROCESS_ID: "x"}, "ZEROJAX_PROCESS_ID='x'"),
        ({zd.NUM_PROCESSES: "2", zd.PROCESS_ID: "2"}, "ZEROJAX_PROCESS_ID=2 must be below"),
        ({zd.NUM_PROCESSES: "2", zd.PROCESS_ID: "0", zd.DEVICES_PER_PROC: "-1"}, "ZEROJAX_DEVICES_PER_PROC='-1'"),
    ],
)
def test_initialize_rejects_a_bad_launcher_environment(env, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        zd.initialize(env)


SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def test_initialize_outside_a_launcher_or_a_multi_process_cluster_does_nothing(monkeypatch):
    assert zd.initialize({}) == zd.Processes(0, 1, "single process")
    for key, value in (SLURM_TASK | {"SLURM_NTASKS": "1"}).items():
        monkeypatch.setenv(key, value)
    assert zd.initialize({}) == zd.Processes(0, 1, "SlurmCluster")
    assert not jax.distributed.is_initialized()


CLUSTER_TASK = (
    "import numpy as np, zerojax as zj, zerojax.distributed as zd\n"
    "p = zd.initialize()\n"
    "import jax\n"
    "x = zd.global_batch(np.full(1, p.process_id + 1.0, np.float32), zj.make_mesh())\n"
    "print(p.process_id, p.num_processes, p.source, jax.device_count(), float(jax.jit(lambda a: a.sum())(x)))\n"
)


def test_initialize_joins_a_slurm_job_through_jax_cluster_detection():
    port = free_coordinator().rpartition(":")[2]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | SLURM_TASK | {
        "SLURM_NTASKS": "2", "JAX_COORDINATOR_PORT": port}
    procs = [
        subprocess.Popen([sys.executable, "-c", CLUSTER_TASK], cwd=REPO, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env | {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [out.splitlines()[-1] for out, _ in outs] == [f"{i} 2 SlurmCluster 2 3.0" for i in range(2)]


def test_signal_that_every_process_survives_cleanly_exits_zero():
    clean = WAIT_FOR_SIGNALS.replace("sys.exit(3)", "sys.exit(0)")
    proc = subprocess.Popen([*LAUNCH, "--nproc", "2", "--", sys.executable, "-c", clean],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        Lines(proc).wait_for("ready", 2, timeout=30)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert rc == 0, "a preempted run whose processes all checkpointed and exited 0 succeeded"
    assert "every process exited cleanly" in proc.stderr.read()
