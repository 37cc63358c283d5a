"""Worker -> API server transport of live-readout scores: a single-producer,
single-consumer byte ring in a shared-memory file.

Why not a socket: vLLM pins the CPU worker to its compute cores, so any socket send
either wakes an I/O thread on those cores (ZMQ) or enters the kernel, on the critical
path of every decode step. Writing into shared memory is a memcpy. The reader drains
the ring on its own schedule, and also right before it answers a request: the worker
writes a step's scores before `sample_tokens` returns, so anything the engine has
reported is already in the ring by then, without any signalling.

Layout: a 64-byte header of little-endian u64 words (magic, capacity, write position,
read position, dropped count), then `capacity` bytes of records, each a u64 length
and the payload, padded to 8 bytes. Positions only grow; a record may wrap around
the end. The producer owns `write` and `dropped`, the consumer owns `read`.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np

MAGIC = 0x31474E49524F524C  # "LRORING1"
HEADER_BYTES = 64
_MAGIC, _CAPACITY, _WRITE, _READ, _DROPPED = range(5)
_LENGTH = struct.Struct("<Q")
_fence_lock = threading.Lock()


class RingError(RuntimeError):
    pass


def _fence() -> None:
    # A lock round trip is a full barrier on the platforms vLLM runs on (the same
    # device vLLM's own shared-memory queue uses): the record's bytes become visible
    # before the position that publishes them.
    with _fence_lock:
        pass


def _padded(n: int) -> int:
    return (n + 7) & ~7


class ScoreRing:
    """One end of the ring: the worker calls `put`, the API server `drain`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        # Pages faulted in up front: a first-touch fault per 4 KiB costs more than
        # the record's copy, on the worker's critical path.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(fd, os.fstat(fd).st_size, flags=flags)
        os.close(fd)
        self._header = np.frombuffer(self._map, np.uint64, HEADER_BYTES // 8)
        if int(self._header[_MAGIC]) != MAGIC:
            raise RingError(f"{path} is not a livetrain score ring")
        self.capacity = int(self._header[_CAPACITY])
        if self.capacity + HEADER_BYTES != len(self._map) or self.capacity % 8:
            raise RingError(f"{path}: size does not match its header")
        self._data = memoryview(self._map)[HEADER_BYTES:]

    @classmethod
    def create(cls, path: Path, capacity: int) -> ScoreRing:
        """A new ring file, readable and writable by its owner only."""
        capacity = _padded(capacity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + capacity)
            os.posix_fallocate(fd, 0, HEADER_BYTES + capacity)  # allocate now, not mid-step
            os.pwrite(fd, struct.pack("<QQ", MAGIC, capacity), 0)
        except OSError as e:
            os.close(fd)
            path.unlink()
            raise RingError(
                f"cannot allocate a {capacity >> 20} MiB score ring in {path.parent}: {e.strerror}"
            ) from None
        return cls(path, fd)

    @classmethod
    def open(cls, path: Path) -> ScoreRing:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise RingError(f"cannot open the score ring {path}: {e.strerror}") from None
        return cls(path, fd)

    @property
    def dropped(self) -> int:
        """Records refused because the ring was full (the reader fell behind)."""
        return int(self._header[_DROPPED])

    def put(self, payload: bytes) -> bool:
        """Append one record; never blocks. False (and counted) when it does not fit."""
        size = _padded(_LENGTH.size + len(payload))
        write, read = int(self._header[_WRITE]), int(self._header[_READ])
        if size > self.capacity - (write - read):
            self._header[_DROPPED] += 1
            return False
        _LENGTH.pack_into(self._data, write % self.capacity, len(payload))
        self._copy_in((write + _LENGTH.size) % self.capacity, payload)
        _fence()
        self._header[_WRITE] = write + size
        return True

    def drain(self) -> list[bytes]:
        """Every record written so far, oldest first."""
        write = int(self._header[_WRITE])
        _fence()
        read, records = int(self._header[_READ]), []
        while read < write:
            (length,) = _LENGTH.unpack_from(self._data, read % self.capacity)
            records.append(self._copy_out((read + _LENGTH.size) % self.capacity, length))
            read += _padded(_LENGTH.size + length)
        _fence()
        self._header[_READ] = read
        return records

    def _copy_in(self, start: int, payload: bytes) -> None:
        view = memoryview(payload)
        first = min(len(view), self.capacity - start)
        self._data[start : start + first] = view[:first]
        self._data[: len(view) - first] = view[first:]

    def _copy_out(self, start: int, length: int) -> bytes:
        first = min(length, self.capacity - start)
        return bytes(self._data[start : start + first]) + bytes(self._data[: length - first])

    def unlink(self) -> None:
        """Remove the file; both ends keep their mappings."""
        self.path.unlink(missing_ok=True)
