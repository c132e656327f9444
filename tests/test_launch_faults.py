"""Launcher and estimator faults: a bad coordinator is refused in seconds (before ranks start, and in
`zerojax.distributed.initialize` before joining); ranks die with a SIGKILLed launcher; the estimator's
re-run child dies with it; absurd device counts and impossible model sizes are one line, exit 2.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerojax import cli
from zerojax.launch import free_coordinator

REPO = Path(__file__).resolve().parents[1]
ZEROJAX = [sys.executable, "-m", "zerojax.cli"]
# Addresses that lead nowhere: TEST-NET-1 (RFC 5737), never an address of this machine; the IPv6 discard
# prefix (RFC 6666), unroutable even where a transparent proxy answers every IPv4 connection.
UNROUTABLE, DISCARD = "192.0.2.1", "[100::1]"


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie nobody reaped yet is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def busy_port():
    """A port something else listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# --- item 7 / 14: the coordinator ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unresolvable", "unroutable", "busy"])
def test_launch_refuses_a_bad_coordinator_before_any_rank_starts(capsys, busy_port, case):
    coordinator, words = {
        "unresolvable": ("no-such-host.invalid:29500", "does not resolve"),
        "unroutable": (f"{UNROUTABLE}:29500", "not reach this machine"),
        "busy": (f"127.0.0.1:{busy_port}", f"port {busy_port} here (Address already in use)"),
    }[case]
    start = time.monotonic()
    rc = cli.main(["launch", "--nproc", "2", "--coordinator", coordinator, "--", "sh", "-c", "echo started"])
    out, err = capsys.readouterr()
    assert time.monotonic() - start < 15
    assert (rc, out) == (2, ""), "no rank may start"
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"zerojax launch: --coordinator={coordinator!r}") and words in err


INITIALIZE = (
    "import sys, zerojax.distributed as zd\n"
    "try:\n"
    "    zd.initialize(timeout_s=int(sys.argv[1]))\n"
    "except ValueError as e:\n"
    "    print('REFUSED', e)\n"
)


@pytest.mark.parametrize("case", ["unresolvable", pytest.param("unroutable", marks=pytest.mark.slow), "busy"])
def test_initialize_refuses_a_bad_coordinator_before_joining(busy_port, case):
    """A rank started by other means (here: by hand) with a bad coordinator fails within seconds, not 5 minutes."""
    rank, coordinator, words = {
        "unresolvable": (1, "no-such-host.invalid:29500", "does not resolve"),
        "unroutable": (1, f"{DISCARD}:29500", "unreachable"),
        "busy": (0, f"127.0.0.1:{busy_port}", f"port {busy_port} here (Address already in use)"),
    }[case]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "ZEROJAX_COORDINATOR": coordinator, "ZEROJAX_NUM_PROCESSES": "2", "ZEROJAX_PROCESS_ID": str(rank)}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", INITIALIZE, "4"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert time.monotonic() - start < 60
    assert run.stdout.startswith(f"REFUSED zerojax.distributed.initialize: ZEROJAX_COORDINATOR={coordinator!r}"), (
        run.stdout + run.stderr[-2000:])
    assert words in run.stdout and len(run.stdout.strip().splitlines()) == 1


JOIN = (
    "import zerojax.distributed as zd\n"
    "p = zd.initialize()\n"
    "import jax\n"
    "print('JOINED', p.process_id, jax.process_count(), jax.device_count())\n"
)


def test_launch_with_a_good_coordinator_joins_every_rank():
    """The checks leave the port free for the coordination service that process 0 then starts on it."""
    coordinator = free_coordinator()
    run = subprocess.run([*ZEROJAX, "launch", "--nproc", "2", "--coordinator", coordinator, "--timeout", "100", "--",
                          sys.executable, "-c", JOIN], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(l for l in run.stdout.splitlines() if "JOINED" in l) == [
        "[rank 0] JOINED 0 2 2", "[rank 1] JOINED 1 2 2"]


# --- item 8: ranks die with their launcher --------------------------------------------------------


SLEEPER = "import os, time; print('UP', os.getpid(), flush=True); time.sleep(120)"


def test_sigkill_of_the_launcher_kills_its_ranks():
    launcher = subprocess.Popen([*ZEROJAX, "launch", "--nproc", "2", "--", sys.executable, "-c", SLEEPER],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ranks = []
    try:
        while len(ranks) < 2:
            line = launcher.stdout.readline()
            assert line, "the launcher ended before its ranks started"
            found = re.fullmatch(r"\[rank \d\] UP (\d+)\n", line)
            ranks += [int(found.group(1))] if found else []
        launcher.kill()
        launcher.wait()
        assert wait_until(lambda: not any(running(pid) for pid in ranks), timeout=10), "ranks outlived the launcher"
    finally:
        launcher.kill()
        launcher.wait()
        kill_all(ranks)


# --- item 9 / 14: the estimator -------------------------------------------------------------------


def test_killing_the_estimator_kills_its_rerun_child():
    """`--devices` above this process's 8 devices re-runs the command with more simulated devices."""
    parent = subprocess.Popen([*ZEROJAX, "estimate", "--model", "llama-2-7b", "--devices", "16", "--compiled",
                               "--stage", "3"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = []
    try:
        assert wait_until(lambda: child.extend(children(parent.pid)) or child, timeout=120), "no re-run child"
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not running(child[0]), timeout=10), "the re-run child outlived the estimator"
    finally:
        parent.kill()
        parent.wait()
        kill_all(child)


def test_absurd_device_count_is_refused_fast():
    start = time.monotonic()
    proc = subprocess.Popen([*ZEROJAX, "estimate", "--model", "gpt2", "--devices", "100000"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it started, in its own process group
        proc.wait()
    assert time.monotonic() - start < 30
    assert proc.returncode == 2 and out == ""
    message = err.strip().splitlines()[-1]
    assert message.startswith("zerojax estimate: error: --devices=100000") and "4096" in message and "--target" in message


@pytest.mark.parametrize("field,value", [("hidden_size", -32), ("num_hidden_layers", 0), ("vocab_size", "96"),
                                         ("intermediate_size", 1.5), ("num_attention_heads", True)])
def test_estimate_refuses_impossible_model_sizes(capsys, tmp_path, field, value):
    config = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, field: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc = cli.main(["estimate", "--model", str(tmp_path), "--devices", "8"])
    out, err = capsys.readouterr()
    assert (rc, out) == (2, "")
    assert err.startswith("zerojax estimate: error: ") and len(err.strip().splitlines()) == 1
    assert f"{field}={value!r}" in err and "positive integer" in err and "config.json" in err
