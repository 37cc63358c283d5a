"""Training subprocess: the optimizer state file, written atomically.

The file records the weight version it was written at. vLLM owns the weights and
keeps its weight version across trainer restarts, so a restarted trainer resumes a
state written at or before the version vLLM now serves (it is saved in the
background, so a killed trainer may leave one step behind). A state from other
weights (vLLM restarted from the files) is set aside under a fixed name, so the
latest one can still be inspected but they do not pile up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
CHECKPOINT_FILE = "checkpoint_state.pt"  # the state that goes with the synced files
FORMAT = 1


def save(state_dir: Path, snapshot: dict[str, Any], name: str = STATE_FILE) -> None:
    """Write `snapshot` (see Trainer._snapshot) to a temp file and rename it into place.

    A killed trainer leaves the old file or the new. No fsync: the state is only valid
    together with the weights in vLLM's memory, which a machine crash loses too (vLLM
    then reloads from disk and this file is set aside).
    """
    final = state_dir / name
    tmp = state_dir / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save({"format": FORMAT, **snapshot}, f)
    os.replace(tmp, final)


def load(state_dir: Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    path = state_dir / name
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {payload.get('format')!r}")
    return payload


def set_aside(state_dir: Path, reason: str) -> Path:
    """Keep a state file that no longer matches the served weights, out of the way."""
    path = state_dir / STATE_FILE
    target = state_dir / f"{STATE_FILE}.{reason}"
    os.replace(path, target)
    return target


def samples_tensor(keys: set[bytes]) -> torch.Tensor:
    """The trained-sample record as a tensor ([n, 32] SHA-256 digests), sorted."""
    rows = sorted(keys)
    if not rows:
        return torch.zeros((0, 32), dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(-1, 32)


def samples_set(tensor: torch.Tensor | None) -> set[bytes]:
    return set() if tensor is None else {bytes(row.tolist()) for row in tensor}
