"""One livetrain server per model folder.

Two servers on one folder would each sync their own trained weights into the same
files, and each trainer's optimizer state would describe weights the other overwrote.
The API server takes an exclusive flock on `<model>/.livetrain.lock` for its lifetime
(the kernel drops it when the process dies, so a crash leaves no stale lock) and writes
its pid there for the error the second server gets. A folder this user cannot write is
never synced, so it needs no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = ".livetrain.lock"


class ModelInUse(RuntimeError):
    """Another livetrain server holds the model folder."""


def lock_model_dir(model_dir: Path) -> int | None:
    """The locked file's descriptor (keep it open), or None for a read-only folder."""
    path = model_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ModelInUse(
            f"{model_dir} is in use by another livetrain server (pid {holder}); two servers "
            "training one model folder would overwrite each other's weights: stop it, or "
            "serve a copy of the model"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
