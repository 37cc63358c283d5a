"""The model folder's two locks: who serves it, and who is writing it right now.

Both are the kernel's `flock`s, so a process that dies leaves no stale lock.

- `<model>/.livetrain.server.lock`, exclusive, held by a server's API server for its
  lifetime (`claim_for_server`): two servers training one folder would each sync
  their own weights into it, and each trainer's optimizer state would describe weights
  the other overwrote. A second server is refused, naming the holder's pid.
- `<model>/.livetrain.lock`, the folder lock, held by whichever process touches the
  files, for exactly as long as it does: exclusive (`writing`) by the trainer while it
  syncs (and by a SIGTERM'd trainer from the moment it starts its exit sync) and by a
  worker while it recovers an interrupted sync; shared (`reading`) while vLLM's loader
  or the trainer reads the weights. So a server restarted on the folder waits for the
  old trainer's exit sync instead of recovering (deleting) what it has staged, and
  vLLM never loads a file being patched. The writer's pid and purpose are in the file
  while it writes, for the log line of whoever waits.

Locks are reentrant within a process (the trainer's exit path holds the folder lock
across the state save and the sync, which takes it again). A folder this user cannot
write is never synced, so it needs neither lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

SERVER_LOCK = ".livetrain.server.lock"
FOLDER_LOCK = ".livetrain.lock"
WAIT_LOG_S = 30.0  # how often a waiting process says who it waits for
_POLL_S = 0.05

log = logging.getLogger("livetrain.lock")
# path -> (fd, exclusive, depth): the folder locks this process holds
_held: dict[Path, tuple[int, bool, int]] = {}


class ModelInUse(RuntimeError):
    """Another livetrain server holds the model folder."""


def _open(path: Path) -> int | None:
    """The lock file's descriptor, or None where this user cannot create or write it
    (or the model is a single file, which is never synced)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            return None
        raise


def _holder(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


def _note(fd: int, text: str) -> None:
    """Put `text` in the lock file (write(), not pwrite(): the sync's own I/O is what
    its crash tests count)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())


def claim_for_server(model_dir: Path) -> int | None:
    """The server lock's descriptor (keep it open), or None for a read-only folder."""
    fd = _open(model_dir / SERVER_LOCK)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd) or "unknown"
        os.close(fd)
        raise ModelInUse(
            f"{model_dir} is in use by another livetrain server (pid {holder}); two servers "
            "training one model folder would overwrite each other's weights: stop it, or "
            "serve a copy of the model"
        ) from None
    _note(fd, f"{os.getpid()}\n")
    return fd


def _wait_for(fd: int, operation: int, model_dir: Path, purpose: str) -> None:
    """flock, waiting as long as it takes (a large model's sync takes minutes, and a
    service manager has its own start timeout), saying every WAIT_LOG_S whom for."""
    next_log = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= next_log:
                holder = _holder(fd) or "a process reading the weights"
                log.warning("%s: waiting for %s to finish before %s", model_dir, holder, purpose)
                next_log = time.monotonic() + WAIT_LOG_S
            time.sleep(_POLL_S)


@contextmanager
def _folder_lock(model_dir: Path, exclusive: bool, purpose: str) -> Iterator[None]:
    path = (Path(model_dir) / FOLDER_LOCK).absolute()
    held = _held.get(path)
    if held is not None:
        held_fd, held_exclusive, depth = held
        if exclusive and not held_exclusive:
            raise RuntimeError(f"{path}: cannot write while this process holds it for reading")
        _held[path] = (held_fd, held_exclusive, depth + 1)
        try:
            yield
        finally:
            _held[path] = (held_fd, held_exclusive, depth)
        return
    fd = _open(path)
    if fd is None:
        yield
        return
    try:
        _wait_for(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, path.parent, purpose)
        if exclusive:
            _note(fd, f"pid {os.getpid()} ({purpose})\n")
        _held[path] = (fd, exclusive, 1)
        try:
            yield
        finally:
            del _held[path]
            if exclusive:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def writing(model_dir: Path, purpose: str) -> AbstractContextManager[None]:
    """Hold the folder lock exclusively while writing the model's files."""
    return _folder_lock(model_dir, True, purpose)


def reading(model_dir: Path, purpose: str) -> AbstractContextManager[None]:
    """Hold the folder lock shared while reading the model's weights (several readers
    at once: each tensor-parallel worker loads its shard)."""
    return _folder_lock(model_dir, False, purpose)
