"""The checkpoint errors, and the translation of orbax/tensorstore/OS errors into them: one message
that names the step, the file where known, the cause and the fix."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zerojax.checkpoint.manager import CheckpointManager


class CheckpointError(ValueError):
    """A checkpoint folder, step or content that does not fit the request."""


class CheckpointWriteError(CheckpointError):
    """A save that could not be written (disk full, read-only or missing folder); older steps are intact."""


class CheckpointLockedError(CheckpointError):
    """A checkpoint folder another writer holds: one writer per folder (`pid` names the holder, None if unknown)."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class CorruptCheckpointError(CheckpointError):
    """A committed step whose files are damaged (checksum, size or format): `step` and `file` name it."""

    def __init__(self, message: str, step: int, file: str | None):
        super().__init__(message)
        self.step, self.file = step, file


# Read errors that mean damaged files: decode errors, and tensorstore's reports of unreadable data.
DAMAGE = re.compile(r"DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|[Ee]rror (reading|opening|decoding)|checksum")


@contextlib.contextmanager
def write_errors(manager: CheckpointManager, step: int | None):
    """An OSError or tensorstore write error while writing `step` (None: creating the folder) becomes one
    `CheckpointWriteError` that says why and what to do; anything else passes unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, OSError) as error:
        code = getattr(error, "errno", None)
        found = re.search(r"os_error_code='?(\d+)", str(error))
        if code is None and found:
            code = int(found.group(1))
        if code is None and not isinstance(error, OSError):
            raise
        reason = os.strerror(code) if code else str(error)
        what = "create the checkpoint folder" if step is None else f"write checkpoint step {step}"
        steps = [] if step is None else manager.all_steps()
        kept = f" (the steps already saved, {steps}, are intact)" if steps else ""
        raise CheckpointWriteError(f"cannot {what} in {manager.directory}: {reason}{kept}; {_fix(code)}.") from error


@contextlib.contextmanager
def file_write_errors(path: str | os.PathLike):
    """An OSError while writing the file `path` becomes one `CheckpointWriteError` naming the file, why
    and what to do."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise CheckpointWriteError(f"cannot write {os.fspath(path)}: {reason}; {_fix(error.errno)}.") from error


def _fix(code: int | None) -> str:
    """What to do about a write that failed with OS error `code`."""
    return {errno.ENOSPC: "free disk space or point the checkpoints at a larger disk",
            errno.EROFS: "choose a writable output folder", errno.EACCES: "choose a folder you can write to",
            errno.EPERM: "choose a folder you can write to",
            errno.EISDIR: "remove or rename the folder of that name",
            errno.EDQUOT: "free quota or point the checkpoints at another disk"}.get(code, "check the folder and the disk")


@contextlib.contextmanager
def read_errors(manager: CheckpointManager, step: int):
    """A read error that means damaged files (of a step without a usable manifest) becomes one
    `CorruptCheckpointError` naming the step and, when the message has it, the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, OSError) as error:
        if not isinstance(error, (OSError, UnicodeDecodeError, json.JSONDecodeError)) and not DAMAGE.search(str(error)):
            raise
        found = re.search(r'file "([^"]+)"', str(error))
        folder = os.path.join(manager.directory, str(step)) + os.sep
        file = found.group(1).replace(folder, "") if found else None
        where = f"file {file}" if file else "one of its files"
        first = " ".join(str(error).split())[:200]
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {manager.directory} is corrupt: reading {where} failed ({first}); "
            f"{manager.fallback_hint(step)}", step, file) from error
