"""API server: set up the live readout at launch.

Two moments. When vLLM builds its config (before any engine process starts), the
launch readout is validated and the blocks to capture are fixed and put into that
config (`launch_blocks`, into WorkerSettings): they shape the compiled graph, so they belong in its
cache key, and the config is how vLLM hands settings to the processes it starts. Once
the engine runs, the API server creates the score ring in a private directory and the
workers open it by RPC (`create_ring`, `remove`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from livetrain import vllm_internals
from livetrain.config import PluginConfig
from livetrain.formats import readout_format
from livetrain.formats.score_ring import RingError, ScoreRing

SHARED_MEMORY = Path("/dev/shm")  # tmpfs: ring pages never go to disk
MIN_RING_BYTES = 1 << 16  # a few steps of a small batch


def captured_blocks(config: PluginConfig) -> list[int]:
    """The blocks to capture: LIVETRAIN_READOUT_LAYERS, else the launch readout's layers.
    A malformed readout, or one whose layers are not captured, stops the launch."""
    captured = list(config.readout_layers)
    if config.readout is not None:
        readout = readout_format.load(config.readout)
        captured = captured or list(readout.layers)
        if missing := set(readout.layers) - set(captured):
            raise readout_format.ReadoutError(
                f"LIVETRAIN_READOUT: layers {sorted(missing)} are not in LIVETRAIN_READOUT_LAYERS"
            )
    return captured


def launch_blocks(config: PluginConfig) -> list[int]:
    """The blocks the workers capture (WorkerSettings.readout_layers), [] when the
    readout is off. Also keeps vLLM on the model runner the readout patches."""
    if not config.readout_enabled:
        return []
    if config.readout_ring_bytes < MIN_RING_BYTES:
        raise readout_format.ReadoutError(
            f"LIVETRAIN_READOUT_RING_BYTES must be at least {MIN_RING_BYTES}"
        )
    blocks = captured_blocks(config)
    vllm_internals.pin_v1_model_runner()
    return blocks


def create_ring(config: PluginConfig) -> ScoreRing:
    """A score ring in a fresh private (0700) directory, on tmpfs where there is one."""
    parent = SHARED_MEMORY if os.access(SHARED_MEMORY, os.W_OK) else config.private_runtime_dir()
    private = Path(tempfile.mkdtemp(prefix="livetrain-readout-", dir=parent))
    try:
        return ScoreRing.create(private / "scores", config.readout_ring_bytes)
    except RingError as e:
        private.rmdir()
        raise readout_format.ReadoutError(
            f"{e} (lower LIVETRAIN_READOUT_RING_BYTES or make room there)"
        ) from None


def remove(ring: ScoreRing) -> None:
    """Unlink the ring file and its private directory (mappings stay valid)."""
    ring.unlink()
    with contextlib.suppress(OSError):  # not empty, or already gone
        ring.path.parent.rmdir()
