"""The shared-memory score ring: records cross real processes intact and in order,
wrap around the end, and a full ring refuses (and counts) instead of blocking."""

from __future__ import annotations

import multiprocessing
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livetrain.score_ring import HEADER_BYTES, RingError, ScoreRing


def record(k: int) -> bytes:
    # Lengths that are not multiples of 8 exercise the padding.
    return struct.pack("<I", k) * (1 + k % 7) + bytes([k % 251]) * (k % 5)


def produce(path: str, count: int) -> None:
    ring = ScoreRing.open(Path(path))
    k = 0
    while k < count:
        if ring.put(record(k)):
            k += 1


def test_records_cross_processes_in_order(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 1024)  # small: wraps hundreds of times
    count = 5000
    child = multiprocessing.get_context("spawn").Process(
        target=produce, args=(str(ring.path), count)
    )
    child.start()
    received: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(received) < count and time.monotonic() < deadline:
        received += ring.drain()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert received == [record(k) for k in range(count)]


def test_full_ring_refuses_and_counts(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 64)
    assert ring.put(bytes(24))  # 8 + 24 = 32 bytes
    assert ring.put(bytes(20))  # 8 + 20 -> 32 bytes: full
    assert not ring.put(b"x")
    assert not ring.put(bytes(100))  # larger than the ring
    assert ring.dropped == 2
    assert ring.drain() == [bytes(24), bytes(20)]
    assert ring.put(bytes(50))  # wraps around the end
    assert ring.drain() == [bytes(50)]
    assert ring.drain() == []


def test_record_split_across_the_end_is_reassembled(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 64)
    assert ring.put(bytes(40)) and ring.drain() == [bytes(40)]  # write position 48
    payload = bytes(range(48))
    assert ring.put(payload)  # 8 bytes of length at 48, 8 + 40 bytes across the end
    assert ring.drain() == [payload]


def test_ring_file_is_private_and_checked(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 100)
    assert ring.capacity == 104  # rounded up to 8 bytes
    assert stat.S_IMODE(os.stat(ring.path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        ScoreRing.create(ring.path, 100)
    (tmp_path / "other").write_bytes(bytes(HEADER_BYTES + 8))
    with pytest.raises(RingError, match="not a livetrain score ring"):
        ScoreRing.open(tmp_path / "other")
    with pytest.raises(RingError, match="cannot open"):
        ScoreRing.open(tmp_path / "missing")
    other_end = ScoreRing.open(ring.path)
    ring.unlink()
    assert not ring.path.exists()
    assert other_end.put(b"still mapped") and ring.drain() == [b"still mapped"]


def test_allocation_failure_is_clear_and_leaves_nothing(tmp_path):
    """A ring that cannot be allocated (a full /dev/shm in a container, say) fails with
    the size and the reason, and leaves no partial file."""
    script = f"""
import resource, signal
from pathlib import Path
from livetrain.score_ring import RingError, ScoreRing
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    ScoreRing.create(Path({str(tmp_path / "ring")!r}), 8 << 20)
except RingError as e:
    print(e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cannot allocate a 8 MiB score ring" in result.stdout
    assert not (tmp_path / "ring").exists()


def test_launch_refuses_a_ring_too_small_to_hold_a_step(monkeypatch, tmp_path):
    from livetrain.config import PluginConfig
    from livetrain.readout_format import ReadoutError
    from livetrain.readout_launch import prepare_launch
    from tests.conftest import write_readout

    # setenv first, so that whatever prepare_launch writes is undone afterwards
    monkeypatch.setenv("LIVETRAIN_READOUT", str(write_readout(tmp_path / "r", ["a"], [0], 8, 0)))
    monkeypatch.setenv("LIVETRAIN_READOUT_LAYERS", "0")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "")
    monkeypatch.delenv("LIVETRAIN_READOUT_RING", raising=False)
    with pytest.raises(ReadoutError, match="LIVETRAIN_READOUT_RING_BYTES must be at least"):
        prepare_launch(PluginConfig(readout_ring_bytes=100))
    assert "LIVETRAIN_READOUT_RING" not in os.environ
