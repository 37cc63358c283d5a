"""Training subprocess: the optimizer state file, written atomically.

The file records the weight version it belongs to. vLLM owns the weights and
keeps its weight version across trainer restarts, so a restarted trainer resumes
only the state written at exactly the version vLLM now serves; anything else is
set aside (renamed, never deleted) and the optimizer starts fresh.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
FORMAT = 1


def save(state_dir: Path, weight_version: int, optimizer: dict[str, torch.Tensor]) -> None:
    """Write-to-temp, fsync, rename: a crash leaves the old file or the new one."""
    final = state_dir / STATE_FILE
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    payload = {"format": FORMAT, "weight_version": weight_version, "optimizer": optimizer}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {payload.get('format')!r}")
    return payload


def set_aside(state_dir: Path, reason: str) -> Path:
    """Keep a state file that no longer matches the served weights, out of the way."""
    path = state_dir / STATE_FILE
    target = state_dir / f"{STATE_FILE}.{reason}.{int(time.time())}"
    os.replace(path, target)
    return target


def trained_names(optimizer: dict[str, torch.Tensor]) -> set[str]:
    """Parameter names that have optimizer state, i.e. that training has changed."""
    return {key.split("/")[1] for key in optimizer if key.count("/") >= 2}
