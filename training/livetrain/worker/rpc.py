"""vLLM worker: the methods livetrain adds to every worker, called by the API server
through `engine_client.collective_rpc("livetrain_...")`, and the class that carries
them into vLLM's worker (`LivetrainWorkerExtension`).

Each returns a message of formats/messages.py encoded to bytes: vLLM's own serialiser
then carries opaque bytes, and the API server decodes them into the same typed class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livetrain import vllm_internals as vllm
from livetrain.formats import readout_format
from livetrain.formats.messages import (
    CheckpointTensor,
    ReadoutLoaded,
    TapStats,
    decode,
    encode,
)
from livetrain.formats.score_ring import ScoreRing
from livetrain.worker.export import export_weights
from livetrain.worker.readout_tap import Tap
from livetrain.worker.repack import Repacker


def livetrain_export_weights(worker: Any, tensors: bytes) -> bytes:
    """A `WeightExport` of this worker's model for the checkpoint's tensors (an encoded
    list of `CheckpointTensor`)."""
    model = vllm.worker_model(worker)
    wanted = decode(tensors, list[CheckpointTensor])
    return encode(export_weights(model, wanted, *vllm.worker_parallel(worker)))


def _repacker(worker: Any) -> Repacker:
    if not hasattr(worker, "livetrain_repacker"):
        worker.livetrain_repacker = Repacker()
    return worker.livetrain_repacker


def livetrain_packed_copies(worker: Any, param_names: list[str]) -> bytes:
    """A `PackedCopies` for the vLLM parameters the trainer writes (asked at attach)."""
    return encode(Repacker.plan(vllm.worker_model(worker), param_names))


def livetrain_repack_start(worker: Any, param_names: list[str]) -> bytes:
    """After a write that inference does not read directly: pack fresh copies of the
    named weights in the background while serving goes on (a `PackedCopies`)."""
    return encode(_repacker(worker).start(vllm.worker_model(worker), param_names))


def livetrain_repack_ready(worker: Any) -> bytes:
    """A `Repacked` whose `ready` says whether the background packing is done."""
    return encode(_repacker(worker).ready())


def livetrain_repack(worker: Any, param_names: list[str]) -> bytes:
    """After a write into the named vLLM parameters (generation is paused): serve
    packed kernels built from the written weights (a `Repacked`)."""
    return encode(_repacker(worker).finish(vllm.worker_model(worker), param_names))


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


class LivetrainWorkerExtension:
    """What vLLM mixes into its worker class (`parallel_config.worker_extension_cls`,
    named by worker/extension.py, composed with a user's own extension): the functions
    above become worker methods, reached through `collective_rpc("livetrain_...")`."""

    livetrain_export_weights = livetrain_export_weights
    livetrain_packed_copies = livetrain_packed_copies
    livetrain_repack_start = livetrain_repack_start
    livetrain_repack_ready = livetrain_repack_ready
    livetrain_repack = livetrain_repack
    livetrain_readout_start = livetrain_readout_start
    livetrain_readout_load = livetrain_readout_load
    livetrain_readout_stats = livetrain_readout_stats
