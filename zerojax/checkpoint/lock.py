"""One writer per checkpoint folder: an exclusive `flock` on `FOLDER/.zerojax-writer.lock`, held for the
writer's lifetime; the OS drops it when the writer exits or dies, so a crashed writer never leaves the
folder locked. The lock file holds the writer's pid and host, for the message a second writer gets."""

from __future__ import annotations

import fcntl
import os
import socket
import time

from zerojax.checkpoint.errors import CheckpointLockedError, file_write_errors

LOCK = ".zerojax-writer.lock"


class WriterLock:
    """The exclusive write lock of `folder` (which must exist), taken now and held until `release()` or
    the end of the process; raises `CheckpointLockedError` naming the holder when another writer has it."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK)
        with file_write_errors(self.path):
            self._file = open(self.path, "a+")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._file)
            self._file.close()
            raise _locked(folder, holder) from None
        with file_write_errors(self.path):
            self._file.truncate(0)
            self._file.write(f"{os.getpid()} {socket.gethostname()}\n")
            self._file.flush()

    def release(self) -> None:
        """Releases the lock (the lock file stays: removing it would let two writers lock two files)."""
        if not self._file.closed:
            self._file.close()


def _holder(file, wait: float = 1.0) -> list[str]:
    """The lock file's `[pid, host]`, waiting up to `wait` seconds while it names no live process (the
    holder writes it just after taking the lock); may be empty."""
    deadline = time.monotonic() + wait
    while True:
        file.seek(0)
        holder = file.read().split()
        if _alive(holder) or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)


def _alive(holder: list[str]) -> bool:
    """Whether `[pid, host]` names a running process (on another host: assumed so)."""
    if len(holder) != 2 or not holder[0].isdigit():
        return False
    if holder[1] != socket.gethostname():
        return True
    try:
        os.kill(int(holder[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _locked(folder: str, holder: list[str]) -> CheckpointLockedError:
    """The error for a second writer of `folder`; `holder` is the lock file's `[pid, host]` (may be empty)."""
    pid = int(holder[0]) if holder and holder[0].isdigit() else None
    host = holder[1] if len(holder) > 1 else "an unknown host"
    if pid == os.getpid() and host == socket.gethostname():
        who = f"this process (pid {pid}) through another CheckpointManager or Trainer; close that one first"
    elif pid is not None:
        who = f"another writer (pid {pid} on {host}); wait for it to finish or stop it"
    else:
        who = "another writer (pid unknown); wait for it to finish or stop it"
    return CheckpointLockedError(f"checkpoint folder {folder} is being written by {who}, or choose another "
                                 "output folder: two runs writing one folder would mix their checkpoints.", pid)
