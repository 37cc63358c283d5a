"""vLLM worker: the methods livetrain adds to every worker, called by the API server
through `engine_client.collective_rpc("livetrain_...")`.

Each returns a message of formats/messages.py encoded to bytes: vLLM's own serialiser
then carries opaque bytes, and the API server decodes them into the same typed class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from livetrain import vllm_internals as vllm
from livetrain.formats import readout_format
from livetrain.formats.messages import ReadoutLoaded, Repacked, TapStats, encode
from livetrain.formats.score_ring import ScoreRing
from livetrain.worker.export import export_weights
from livetrain.worker.readout_tap import Tap


def livetrain_export_weights(worker: Any, hf_names: list[str]) -> bytes:
    """A `WeightExport` of this worker's model for the given checkpoint names."""
    model = vllm.worker_model(worker)
    return encode(export_weights(model, hf_names, vllm.worker_world_size(worker)))


def livetrain_repack(worker: Any, param_names: list[str]) -> bytes:
    """After a write into the named vLLM parameters (generation is paused): rebuild the
    packed CPU kernels that read copies of them, so inference serves the new values."""
    started = time.perf_counter()
    rebuilt = vllm.repack_cpu_weights(vllm.worker_model(worker), param_names)
    return encode(Repacked(rebuilt, (time.perf_counter() - started) * 1000))


def _tap(worker: Any) -> Tap | None:
    tap = vllm.worker_tap(worker)
    return tap if isinstance(tap, Tap) else None


def _load(tap: Tap | None, folder: str, version: int) -> ReadoutLoaded:
    if tap is None:
        return ReadoutLoaded(error="the live readout was not enabled at launch")
    try:
        tap.load(folder, version)
    except readout_format.ReadoutError as e:
        return ReadoutLoaded(error=str(e))
    return ReadoutLoaded(layers=tap.layers)


def livetrain_readout_start(worker: Any, ring_path: str, folder: str | None) -> bytes:
    """Open the API server's score ring and load the launch readout (version 0). The
    ring's name is unlinked by the API server once every worker has it mapped."""
    tap = _tap(worker)
    if tap is None:
        return encode(ReadoutLoaded(error="the live readout was not enabled at launch"))
    tap.ring = ScoreRing.open(Path(ring_path))
    return encode(_load(tap, folder, 0) if folder else ReadoutLoaded())


def livetrain_readout_load(worker: Any, folder: str, version: int) -> bytes:
    """Worker side of POST /readout/load: a `ReadoutLoaded`."""
    return encode(_load(_tap(worker), folder, version))


def livetrain_readout_stats(worker: Any) -> bytes:
    """Worker side of GET /readout's `worker` field: a `TapStats` (zeros without a tap)."""
    tap = _tap(worker)
    return encode(tap.stats() if tap else TapStats(0, 0.0, 0, 0))


METHODS: dict[str, Callable[..., bytes]] = {
    f.__name__: f
    for f in (
        livetrain_export_weights,
        livetrain_repack,
        livetrain_readout_start,
        livetrain_readout_load,
        livetrain_readout_stats,
    )
}
