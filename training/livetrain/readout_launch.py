"""First vLLM process (the API server): set up the live readout before the engine starts.

Everything the engine processes need reaches them through the environment they
inherit: which blocks to capture (fixed at launch, because they shape the compiled
graph) and the path of the score ring. The API server keeps its own end of the ring.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from livetrain import readout_format
from livetrain.config import PluginConfig
from livetrain.score_ring import RingError, ScoreRing

ENV_READOUT = "LIVETRAIN_READOUT"  # readout folder loaded at launch
ENV_LAYERS = "LIVETRAIN_READOUT_LAYERS"  # blocks captured (default: the readout's layers)
ENV_RING = "LIVETRAIN_READOUT_RING"  # set here, inherited by the engine processes
ENV_V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"
SHARED_MEMORY = Path("/dev/shm")  # tmpfs: ring pages never go to disk
MIN_RING_BYTES = 1 << 16  # a few steps of a small batch

_ring: ScoreRing | None = None


def captured_layers() -> list[int]:
    value = os.environ.get(ENV_LAYERS, "")
    return sorted({int(x) for x in value.split(",") if x.strip()})


def enabled() -> bool:
    return bool(os.environ.get(ENV_READOUT) or os.environ.get(ENV_LAYERS))


def prepare_launch(config: PluginConfig) -> None:
    """Validate the launch readout, fix the captured layers, keep vLLM on the model
    runner the readout patches, and create the score ring in a private directory.
    A malformed readout stops the launch with its reason."""
    global _ring
    if os.environ.get(ENV_RING) or not enabled():
        return
    if os.environ.get(ENV_READOUT):
        _fix_layers(readout_format.load(Path(os.environ[ENV_READOUT])))
    _pin_v1_runner()
    _ring = _create_ring(config)
    atexit.register(remove, _ring)
    os.environ[ENV_RING] = str(_ring.path)


def _fix_layers(readout: readout_format.Readout) -> None:
    os.environ.setdefault(ENV_LAYERS, ",".join(map(str, readout.layers)))
    if missing := set(readout.layers) - set(captured_layers()):
        raise readout_format.ReadoutError(
            f"{ENV_READOUT}: layers {sorted(missing)} are not in {ENV_LAYERS}"
        )


def _pin_v1_runner() -> None:
    if os.environ.get(ENV_V2_RUNNER, "").lower() in ("1", "true"):
        raise readout_format.ReadoutError(
            f"the live readout patches vLLM's V1 model runner; unset {ENV_V2_RUNNER}"
        )
    os.environ[ENV_V2_RUNNER] = "0"  # CUDA builds default to V2 when Triton is present


def _create_ring(config: PluginConfig) -> ScoreRing:
    if config.readout_ring_bytes < MIN_RING_BYTES:
        raise readout_format.ReadoutError(
            f"LIVETRAIN_READOUT_RING_BYTES must be at least {MIN_RING_BYTES}"
        )
    parent = SHARED_MEMORY if os.access(SHARED_MEMORY, os.W_OK) else config.private_runtime_dir()
    private = Path(tempfile.mkdtemp(prefix="livetrain-readout-", dir=parent))  # 0700
    try:
        return ScoreRing.create(private / "scores", config.readout_ring_bytes)
    except RingError as e:
        private.rmdir()
        raise readout_format.ReadoutError(
            f"{e} (lower LIVETRAIN_READOUT_RING_BYTES or make room there)"
        ) from None


def launch_ring() -> ScoreRing | None:
    """The API server's end of the ring created at launch (None without a readout)."""
    return _ring


def remove(ring: ScoreRing) -> None:
    """Unlink the ring file and its private directory (mappings stay valid)."""
    ring.unlink()
    with contextlib.suppress(OSError):  # not empty, or already gone
        ring.path.parent.rmdir()


def add_layers_to_compile_hash() -> None:
    """The compiled graph's outputs depend on the captured layers; so must its cache key."""
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash

    def compute_hash(self, *args, **kwargs) -> str:
        digest = original(self, *args, **kwargs)
        layers = os.environ.get(ENV_LAYERS)
        if not layers:
            return digest
        return hashlib.sha256(f"{digest}|livetrain-readout:{layers}".encode()).hexdigest()[
            : len(digest)
        ]

    VllmConfig.compute_hash = compute_hash
