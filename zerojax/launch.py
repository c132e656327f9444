"""`zerojax launch`: N local processes of one command, as `torchrun --nproc_per_node` / `deepspeed --num_gpus`.

Each process gets the environment `zerojax.distributed.initialize()` reads (coordinator, process
count, rank, devices per process), an empty stdin, and its own process group; on Linux it is killed
when the launcher dies, even by SIGKILL (`die_with_parent`). A given `--coordinator` is checked before
any process starts (`zerojax.distributed.check_coordinator`; every process runs here, so process 0
must be able to serve on it). Every line a process prints comes out prefixed with its rank
(`[rank 2] ...`, stdout to stdout, stderr to stderr). The launcher forwards SIGINT and SIGTERM to all
processes; when one process fails (non-zero exit or killed) or the time limit passes, it sends SIGTERM
to the others and SIGKILL to those still running after the grace period. When a process exits,
whatever it left running in its process group is killed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

from zerojax import distributed

FORCE_DEVICE_COUNT = "--xla_force_host_platform_device_count"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CHECK_SECONDS = 5.0  # the most the launcher spends checking --coordinator (every process runs here)


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What to run: `command` in `nproc` processes of `devices_per_proc` devices each.

    `coordinator` is `HOST:PORT` of the coordination service (None: a free port on 127.0.0.1),
    `timeout` bounds the whole run in seconds (None: no bound), `grace` is how long a process has
    to exit after SIGTERM before it is killed.
    """

    command: tuple[str, ...]
    nproc: int
    devices_per_proc: int = 1
    coordinator: str | None = None
    timeout: float | None = None
    grace: float = 10.0

    def __post_init__(self):
        if not self.command:
            raise ValueError("launch: no command given; put it after `--`, e.g. `zerojax launch --nproc 2 -- python train.py`.")
        for name in ("nproc", "devices_per_proc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"launch: --{name.replace('_', '-')}={value!r} must be a positive integer.")
        for name in ("timeout", "grace"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"launch: --{name}={value!r} must be a positive number of seconds.")
        if self.coordinator is not None and distributed.split_address(self.coordinator) is None:
            raise ValueError(
                f"launch: --coordinator={self.coordinator!r} must be HOST:PORT with a port in 1..65535, "
                "e.g. 127.0.0.1:29500 (omit it to use a free local port)."
            )


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """How the run ended: each rank's exit status (negative: killed by that signal) and why it stopped.

    `reason` is "ok", "failed" (`failed_rank` failed first), "timeout" or "signal" (`signum` was
    forwarded).
    """

    returncodes: tuple[int, ...]
    reason: str
    failed_rank: int | None = None
    signum: int | None = None

    @property
    def exit_code(self) -> int:
        """0 on success, also when a forwarded signal let every process exit cleanly (a preempted run that
        checkpointed); the failed rank's status (128 + signal if killed), 124 on timeout, else 128 + signal."""
        if self.reason == "signal" and all(rc == 0 for rc in self.returncodes):
            return 0
        if self.reason == "failed":
            rc = self.returncodes[self.failed_rank]
            return rc if rc > 0 else 128 - rc
        return {"ok": 0, "timeout": 124}.get(self.reason, 128 + (self.signum or 0))

    def describe(self) -> str:
        """One line saying how the run ended."""
        if self.reason == "failed":
            rc = self.returncodes[self.failed_rank]
            how = f"exit status {rc}" if rc > 0 else f"killed by {signal.Signals(-rc).name}"
            return f"rank {self.failed_rank} failed ({how}); the other processes were stopped"
        if self.reason == "timeout":
            return "the run passed its --timeout; all processes were stopped"
        if self.reason == "signal":
            clean = "; every process exited cleanly" if all(rc == 0 for rc in self.returncodes) else ""
            return f"received {signal.Signals(self.signum).name}; forwarded it to all processes{clean}"
        return f"all {len(self.returncodes)} processes exited successfully"


def free_coordinator() -> str:
    """`127.0.0.1:PORT` with a port that was free when asked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` after which the child gets SIGKILL when the thread that starts
    it ends, as when this process dies by any signal (Linux `PR_SET_PDEATHSIG`, kept across exec); None
    on other systems. Start children from a thread that outlives them."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), kill)

    return preexec


def child_env(base: Mapping[str, str], spec: LaunchSpec, coordinator: str, rank: int) -> dict[str, str]:
    """`base` with the rank's `zerojax.distributed` variables, unbuffered Python output, and without a
    forced host device count in `XLA_FLAGS` (the device count is `devices_per_proc`)."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(FORCE_DEVICE_COUNT)]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update({
        distributed.COORDINATOR: coordinator,
        distributed.NUM_PROCESSES: str(spec.nproc),
        distributed.PROCESS_ID: str(rank),
        distributed.DEVICES_PER_PROC: str(spec.devices_per_proc),
    })
    return env


def _pump(rank: int, source: IO[bytes], sink: IO[str], lock: threading.Lock) -> None:
    for line in iter(source.readline, b""):
        text = line.decode(errors="replace").rstrip("\r\n")
        with lock:
            sink.write(f"[rank {rank}] {text}\n")
            sink.flush()
    source.close()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def launch(spec: LaunchSpec, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> LaunchResult:
    """Runs `spec`, forwarding SIGINT/SIGTERM while it runs (from the main thread), and returns how it ended.

    Raises ValueError before starting anything when `spec.coordinator` cannot serve more than one process.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if spec.coordinator is not None and spec.nproc > 1:
        distributed.check_coordinator(spec.coordinator, serves=True, seconds=CHECK_SECONDS, name="launch: --coordinator")
    coordinator = spec.coordinator or free_coordinator()
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    lock = threading.Lock()
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    preexec = die_with_parent()
    try:
        # Every process is forked before this function starts a thread (its preexec_fn only calls prctl).
        for rank in range(spec.nproc):
            procs.append(subprocess.Popen(
                spec.command, env=child_env(os.environ, spec, coordinator, rank),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=preexec,  # noqa: PLW1509
            ))
        for rank, proc in enumerate(procs):
            threads += [
                threading.Thread(target=_pump, args=(rank, proc.stdout, stdout, lock), daemon=True),
                threading.Thread(target=_pump, args=(rank, proc.stderr, stderr, lock), daemon=True),
                threading.Thread(target=lambda r=rank, p=proc: exits.put((r, p.wait())), daemon=True),
            ]
            for t in threads[-3:]:
                t.start()
        result = _supervise(spec, procs, exits, received)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)  # leftovers of the rank's process group
        for t in threads:
            t.join(timeout=5)
        for s, h in handlers.items():
            signal.signal(s, h)
    return result


def _supervise(spec: LaunchSpec, procs, exits: queue.Queue, received: list[int]) -> LaunchResult:
    """Waits for every process, stopping all of them on the first failure, the time limit or a signal."""
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    returncodes: list[int | None] = [None] * len(procs)
    reason, failed_rank, signum, kill_at = "ok", None, None, None
    forwarded = 0

    def stop(signal_to_send: int) -> float:
        for rank, proc in enumerate(procs):
            if returncodes[rank] is None:
                _signal_group(proc, signal_to_send)
        return time.monotonic() + spec.grace

    while None in returncodes:
        try:
            rank, rc = exits.get(timeout=0.05)
        except queue.Empty:
            now = time.monotonic()
            if len(received) > forwarded:
                forwarded, signum = len(received), received[-1]
                if reason == "ok":
                    reason = "signal"
                # A second signal does not wait for the grace period.
                kill_at = stop(signum) if forwarded == 1 else now
            if deadline is not None and now > deadline and reason == "ok":
                reason, kill_at = "timeout", stop(signal.SIGTERM)
            if kill_at is not None and now >= kill_at:
                kill_at = stop(signal.SIGKILL)
            continue
        returncodes[rank] = rc
        if rc != 0 and reason == "ok":
            reason, failed_rank, kill_at = "failed", rank, stop(signal.SIGTERM)
    return LaunchResult(tuple(returncodes), reason, failed_rank, signum)
