"""API server: every JSON reply of livetrain's routes, as one typed class each.

The supervisor and the readout routes build these and the routes encode them
(`to_json`), so a reply's fields are written down once, here; README.md lists the same
fields, and tests/test_replies.py holds the two to each other. Fields that a reply
leaves out when they do not apply (a readout's `z` without a calibration, say) default
to None and are omitted (`omit_defaults`). Errors have their own shape (api/http.py:
`{"error": {"message", "field", ...}}`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from livetrain.config import OptimizerSettings
from livetrain.formats.messages import GuardCheck, TapStats, TrainPlan


class Repack(msgspec.Struct, frozen=True):
    """vLLM's packed CPU kernels rebuilt after a write (zeros on GPU / plain kernels)."""

    tensors: int
    ms: float
    ahead: bool  # packed while generation went on (before the pause)


class StepTimes(msgspec.Struct, frozen=True):
    """The trainer's own time on each half of a step, in ms."""

    prepare: float
    apply: float


class TrainReply(msgspec.Struct, frozen=True):
    """POST /train."""

    loss: float  # mean continuation loss before the step
    tokens: int
    skipped_samples: int
    weight_version: int
    optimizer_steps: int
    moments_reset: list[str]
    refused_tensors: dict[str, str]  # per-layer steps: tensors left as they were, and why
    guard: GuardCheck | None
    undo_available: int
    pause_ms: float
    update_ms: float
    repack: Repack
    trainer_ms: StepTimes
    elapsed_ms: float


class ScoreReply(msgspec.Struct, frozen=True):
    """POST /train/score."""

    token_logprobs: list[list[float]]
    loss: float
    weight_version: int


class CheckpointReply(msgspec.Struct, frozen=True):
    """POST /checkpoint."""

    weight_version: int
    files: list[str]
    files_replaced: list[str]
    bytes_written: int
    blocks_changed: int
    blocks_total: int
    tensors_skipped: int
    elapsed_ms: float


class RollbackReply(msgspec.Struct, frozen=True):
    """POST /train/rollback."""

    weight_version: int
    checkpoint_version: int | None
    undone_steps: int | None
    undo_available: int
    optimizer_steps: int
    pause_ms: float
    repack: Repack
    trainer_ms: float


class GuardStatus(msgspec.Struct, frozen=True):
    samples: int
    tokens: int
    max_rise: float
    loss: float | None  # on the served weights


class GuardReply(msgspec.Struct, frozen=True):
    """POST and DELETE /train/guard."""

    guard: GuardStatus | None


class LastSync(CheckpointReply, frozen=True):
    """The last completed sync: its reply, and when (seconds since the epoch)."""

    at: float


class SyncError(msgspec.Struct, frozen=True):
    """The last failed automatic sync; retried, waiting twice as long each time."""

    at: float
    reason: str
    failures: int


class TrainerInfo(msgspec.Struct, frozen=True):
    """What the attached trainer trains."""

    apollo_tensors: int
    adamw_tensors: int
    trainable_params: int
    trainable_names: list[str]
    written_params: list[str]
    frozen_tensors: int
    plan: TrainPlan
    resumed_from_version: int | None
    torch_threads: int
    optimizer_steps: int
    state_bytes: int


class Queue(msgspec.Struct, frozen=True):
    """Trainer operations run one at a time, in arrival order."""

    operation: str | None  # running: train | score | checkpoint | rollback | guard
    trainer_call: str | None  # the trainer request it waits on: prepare | apply | ...
    waiting: int  # operations queued behind it


class StatusReply(msgspec.Struct, frozen=True):
    """GET /train/status."""

    state: str
    reason: str | None
    weight_version: int
    steps: int
    last_loss: float | None
    settings: OptimizerSettings  # of the last step
    trainer_pid: int | None
    optimizer_state_bytes: int
    saved_version: int | None
    save_error: str | None
    restarts: int
    guard: GuardStatus | None
    undo_available: int
    last_sync: LastSync | None
    sync_error: SyncError | None
    sync_pending: bool
    sync_due_in_s: float | None
    bytes_synced: int
    syncs: int
    model_dir: str
    trainer: TrainerInfo | None  # None until a trainer has attached
    queue: Queue


# ---- the live readout ---------------------------------------------------------------

Scores = dict[str, list[float]]  # block (as a string, a JSON key) -> one per concept


class ReadoutInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """A loaded readout (POST /readout/load); only `loaded` when none is."""

    loaded: bool
    path: str | None = None
    concepts: list[str] | None = None
    layers: list[int] | None = None
    read_position: dict[str, Any] | None = None
    calibrated: bool | None = None
    steerable: bool | None = None  # its directions can steer requests (vllm_xargs "steer")


class ReadoutStatus(ReadoutInfo, frozen=True, kw_only=True):
    """GET /readout: the readout new rows are scored with, and the worker's cost."""

    version: int
    versions_kept: list[int]
    captured_layers: list[int]
    worker: TapStats


class TokenRow(msgspec.Struct, frozen=True, omit_defaults=True):
    """One token's scores (the activation that produced it, or that it is)."""

    index: int
    token_id: int
    text: str | None
    scores: Scores
    z: Scores | None = None  # against single neutral tokens, when calibrated


class ReadoutSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    """The whole text scored the way the readout was trained."""

    rows: int
    scores: Scores
    z: Scores | None = None  # against whole neutral texts, when calibrated


class ReadoutHeader(msgspec.Struct, frozen=True):
    """Which completion, and what its scores are of (the stream's `meta` event)."""

    id: str
    choice: int
    concepts: list[str]
    layers: list[int]


class ReadoutReply(ReadoutHeader, frozen=True, kw_only=True, omit_defaults=True):
    """GET /readout/{id}."""

    finished: bool
    prompt_tokens: list[TokenRow] | None = None  # with `readout_prompt`
    tokens: list[TokenRow] | None = None  # absent with rows=false
    summary: ReadoutSummary | None = None


def to_json(reply: msgspec.Struct) -> Any:
    """A reply as JSON builtins, for a JSONResponse."""
    return msgspec.to_builtins(reply)
