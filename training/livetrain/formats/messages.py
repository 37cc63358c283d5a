"""Every message that crosses a process boundary, as one typed class both ends import.

Encoding is msgpack through msgspec (a vLLM dependency): decoding builds these classes
and nothing else, so no message can run code, and a renamed or missing field fails at
the decoder with the field's name instead of as a KeyError somewhere in another process.

Boundaries, and who writes what:
- API server -> training subprocess (ZMQ DEALER pair): a `TrainerRequest`, answered by
  one `Reply` with the same `id`. `Attach` carries `PROTOCOL_VERSION`; a trainer built
  from other code refuses it.
- vLLM worker -> API server (`collective_rpc` results): `WeightExport`, `ReadoutLoaded`,
  `TapStats`, encoded to bytes by the worker, so vLLM's own serialiser carries opaque
  bytes and the typed decode happens here.
- vLLM worker -> API server (the shared-memory score ring): one `ScoreRecord` per step.
- API server -> engine and workers (vLLM's own config, `additional_config["livetrain"]`):
  `WorkerSettings`, fixed at launch.
- API server -> workers (a completion's `vllm_xargs["steer"]`, carried by vLLM): a
  `SteerSpec` as JSON text, written by api/steering.py once it has validated the
  request (vLLM's xargs hold no objects, and the worker must not re-validate names).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from livetrain.config import OptimizerSettings, TrainableFamilies

PROTOCOL_VERSION = 5

T = TypeVar("T")
_encoder = msgspec.msgpack.Encoder()


def encode(message: object) -> bytes:
    return _encoder.encode(message)


_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def decode(frame: bytes, kind: type[T]) -> T:
    """`frame` as a `kind` (a message class, or a union alias such as TrainerRequest:
    type checkers cannot spell those as a type[T], so those callers name the alias);
    msgspec.ValidationError names the field when it is not one."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(frame)


def decode_request(frame: bytes) -> TrainerRequest:
    return decode(frame, TrainerRequest)  # type: ignore[arg-type]


# ---- zero-copy tensor handles (formats/shared_tensors.py makes and opens them) --------


class CpuFdHandle(msgspec.Struct, frozen=True, tag="cpu_fd", tag_field="kind"):
    """Anonymous shared memory, opened through /proc/<pid>/fd/<fd> (same user only)."""

    pid: int
    fd: int
    nbytes: int
    dtype: str
    shape: list[int]
    stride: list[int]
    offset: int


class CudaIpcHandle(msgspec.Struct, frozen=True, tag="cuda_ipc", tag_field="kind"):
    """torch's CUDA IPC export of a storage (the fields of `_share_cuda_`)."""

    device: int
    handle: bytes
    nbytes: int
    offset_bytes: int
    ref_handle: bytes
    ref_offset: int
    event: bytes | None
    event_sync: bool
    dtype: str
    shape: list[int]
    stride: list[int]
    offset: int


TensorHandle = CpuFdHandle | CudaIpcHandle


# ---- vLLM worker -> API server (collective_rpc results) -----------------------------


class CheckpointTensor(msgspec.Struct, frozen=True):
    """A tensor of the model's safetensors files, as its header describes it."""

    name: str
    shape: list[int]
    dtype: str  # torch's name, e.g. "float32"


class TensorView(msgspec.Struct, frozen=True):
    """Where one checkpoint tensor's elements live: a strided view (its shape,
    row-major) of vLLM parameter `param`, `offset` elements from that tensor's start.
    Under tensor parallelism a rank may hold only a box of the tensor: `shape` is the
    box's, `origin` where it starts in the tensor (empty: the whole tensor)."""

    param: str
    offset: int
    shape: list[int]
    stride: list[int]
    origin: list[int] = []


class WeightExport(msgspec.Struct, frozen=True):
    params: dict[str, TensorHandle]  # vLLM parameter name -> handle
    map: dict[str, TensorView]  # checkpoint tensor name -> where it lives
    dropped: list[str]  # checkpoint tensors vLLM's loader skips (e.g. a tied lm_head)


class ReadoutLoaded(msgspec.Struct, frozen=True):
    """A worker's answer to a readout swap: the layers it now scores, or why not."""

    layers: list[int] = []
    error: str | None = None


class PackedCopies(msgspec.Struct, frozen=True):
    """How many of vLLM's packed CPU kernels read copies of the parameters named, and
    whether inference reads every one of them only through such a copy."""

    tensors: int
    only_packed: bool


class Repacked(msgspec.Struct, frozen=True):
    """A worker's answer after a write: how many of vLLM's packed CPU kernels it swapped
    for ones packed from the written weights, and the packing's ms; `ready` is False
    while packing started ahead of the swap is still running."""

    tensors: int
    ms: float
    ready: bool = True


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the workers need from the API server's settings, decided once at launch and
    carried inside vLLM's config: it travels with it to every process vLLM starts, and
    it is part of the compile cache key, which is right for both fields (each changes
    the compiled graph: the kernels the linear layers call, the blocks captured)."""

    cpu_kernels: str  # PluginConfig.cpu_kernels
    readout_layers: list[int] = []  # decoder blocks whose outputs the readout captures


class SteerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One request's steering: `scales[c]` steering units of concept `c`'s direction
    added to the output of each block in `layers`, on every row (`prompt`) or from the
    prompt's last token on; named against readout `version`."""

    version: int
    scales: dict[str, float]
    layers: list[int]
    prompt: bool

    def to_text(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_text(cls, text: str) -> SteerSpec:
        return msgspec.json.decode(text, type=cls)


class TapStats(msgspec.Struct, frozen=True):
    """What the live readout has cost a worker so far (GET /readout's `worker`)."""

    steps: int
    seconds: float
    dropped: int
    active_requests: int
    steered_requests: int = 0  # running requests that steer
    steered_steps: int = 0  # steps that added a steering vector to any row


# ---- vLLM worker -> API server (score ring) ------------------------------------------


class ScoreRecord(msgspec.Struct, frozen=True, array_like=True):
    """One engine step's scores. Rows are request-major; `scores` is the C-order bytes
    of a float32 [rows, layers, concepts] array. Array-like: one record per step on the
    decode path, so field names are not repeated in every record."""

    version: int  # readout version the rows were scored with
    req_ids: list[str]  # engine request id of each row
    index: list[int]  # generated rows: the token's index; prompt rows: its position
    n: list[int]  # the request's `n` as the worker saw it
    prompt: list[bool]  # whether the row reads a prompt token
    token_ids: list[int]
    shape: tuple[int, int, int]
    scores: bytes


# ---- API server -> training subprocess ---------------------------------------------


Sample = tuple[list[int], list[int]]  # (context_ids, continuation_ids)


class _Request(msgspec.Struct, frozen=True, tag_field="op"):
    id: int


class Guard(msgspec.Struct, frozen=True):
    """Samples a step must not make worse: a step that would raise their mean loss by
    more than `max_rise` (nats per token) is refused before anything is written."""

    samples: list[Sample]
    max_rise: float


class Attach(_Request, frozen=True, tag="attach"):
    """Map vLLM's weights, verify them against the files, resume any saved state."""

    protocol_version: int
    model_dir: str
    state_dir: str
    exports: list[WeightExport]  # one per tensor-parallel rank, in rank order
    families: TrainableFamilies
    weight_version: int
    sync_block_bytes: int
    max_update_ratio: float  # a step moving a tensor by more of its norm is refused
    sync_on_exit: bool  # sync unsynced steps when the server shuts down
    restore_from_files: bool  # the last trainer died writing: the served weights are torn
    guard: Guard | None  # the guard set in force (it outlives trainer restarts)
    undo_steps: int  # steps whose previous weights are kept in memory for an undo
    recompute_above_tokens: int  # longer (padded) batches recompute block activations
    step_mode: str  # "fenced" or "per_layer" (config.PluginConfig.step_mode)


class Prepare(_Request, frozen=True, tag="prepare"):
    """Forward, backward and optimizer math; nothing served changes."""

    samples: list[Sample]
    settings: OptimizerSettings
    retrain: bool


class Apply(_Request, frozen=True, tag="apply"):
    """Write the prepared update into the served weights (inference is paused)."""

    weight_version: int


class Rollback(_Request, frozen=True, tag="rollback"):
    """Serve earlier weights again (inference is paused), with the optimizer state that
    went with them: the model files' (`steps` None), or those from before the last
    `steps` steps (kept in memory, see Attach.undo_steps). `weight_version` is the new one."""

    weight_version: int
    steps: int | None = None


class SetGuard(_Request, frozen=True, tag="set_guard"):
    """Replace the guard set (None: no guard)."""

    guard: Guard | None


class Score(_Request, frozen=True, tag="score"):
    samples: list[Sample]


class Checkpoint(_Request, frozen=True, tag="checkpoint"):
    """Write the live weights into the model's safetensors (changed blocks only)."""


TrainerRequest = Attach | Prepare | Apply | Score | Checkpoint | Rollback | SetGuard


class RequestId(msgspec.Struct):
    """Only the id of a request, to answer one that does not decode as a whole."""

    id: int


# ---- training subprocess -> API server -----------------------------------------------


class OptimizerStatus(msgspec.Struct, frozen=True):
    optimizer_steps: int
    state_bytes: int


class PlanGroup(msgspec.Struct, frozen=True):
    """Tensors of one kind and what training does with them."""

    kind: str  # linear | router | experts | bias | embeddings | lm_head | norms | other
    optimizer: Literal["apollo", "adamw", "frozen"]
    tensors: int
    params: int
    bytes: int  # at the served dtype


class TrainPlan(msgspec.Struct, frozen=True):
    """What a model trains and the memory training takes beside the served weights
    (`livetrain check` prints it; `/train/status` shows the attached trainer's)."""

    dtype: str
    groups: list[PlanGroup]
    trainable_bytes: int
    gradient_bytes: int  # one gradient of every trainable tensor, at the served dtype
    largest_gradient_bytes: int  # the most a per-layer step holds: the largest tensor's
    optimizer_bytes: int  # fp32 moments at `rank` (APOLLO) and AdamW's
    rank: int
    logits_bytes_per_token: int  # fp32 logits and their gradient, per padded token


class Attached(msgspec.Struct, frozen=True, tag="attached"):
    weight_version: int  # higher than asked when resumed from a synced checkpoint
    apollo_tensors: int
    adamw_tensors: int
    trainable_params: int
    trainable_names: list[str]  # the Hugging Face parameters this trainer writes
    written_params: list[str]  # the vLLM tensors they live in (repacked after writes)
    frozen_tensors: int
    plan: TrainPlan
    resumed_from_version: int | None
    guard_loss: float | None  # the guard set's loss on the served weights
    torch_threads: int
    optimizer: OptimizerStatus


class GuardCheck(msgspec.Struct, frozen=True):
    """The guard set's mean loss before and (as previewed) after a step."""

    before: float
    after: float
    max_rise: float


class Prepared(msgspec.Struct, frozen=True, tag="prepared"):
    loss: float
    tokens: int
    skipped_samples: int
    moments_reset: list[str]
    guard: GuardCheck | None
    # per-layer steps (written already): tensors whose update failed a check -> why
    refused_tensors: dict[str, str] = {}


class Applied(msgspec.Struct, frozen=True, tag="applied"):
    optimizer: OptimizerStatus
    undo_available: int  # steps that can be undone now


class RolledBack(msgspec.Struct, frozen=True, tag="rolled_back"):
    weight_version: int
    checkpoint_version: int | None  # files: the synced version they hold; None: unknown
    undone_steps: int | None  # an undo: how many steps it took back
    optimizer: OptimizerStatus
    undo_available: int


class GuardSet(msgspec.Struct, frozen=True, tag="guard_set"):
    loss: float | None  # the guard set's mean loss on the served weights; None: no guard


class Scored(msgspec.Struct, frozen=True, tag="scored"):
    token_logprobs: list[list[float]]
    loss: float


class Synced(msgspec.Struct, frozen=True, tag="synced"):
    weight_version: int
    files: list[str]
    bytes_written: int
    blocks_changed: int
    blocks_total: int
    tensors_skipped: int
    files_replaced: list[str] = []  # staged whole and renamed (most of the file changed)


# How the API server reacts to a failure. "refused": the request could not be honoured
# and nothing changed. "fatal": the trainer can no longer vouch for its state.
FailureKind = Literal["refused", "fatal"]
# Why a step changed nothing, for metrics and clients: the sample was trained already;
# the loss was not finite; the update was not (a non-finite gradient or moment); it
# would move a tensor too far (max_update_ratio); the guard set's loss would rise too
# much; the request was invalid (HTTP 4xx before the trainer saw it); no trainer was
# ready (503); anything else.
RefusalReason = Literal[
    "already_trained",
    "nonfinite_loss",
    "nonfinite_update",
    "update_too_large",
    "guard",
    "invalid_request",
    "unavailable",
    "error",
]


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    kind: FailureKind
    error: str
    status: int | None = None  # the HTTP status the API server should answer with
    reason: RefusalReason = "error"


ReplyBody = Attached | Prepared | Applied | Scored | Synced | RolledBack | GuardSet | Failed


class Reply(msgspec.Struct, frozen=True):
    id: int
    body: ReplyBody
    trainer_ms: float
    saved_version: int | None  # weight version of the last optimizer state on disk
    save_error: str | None
