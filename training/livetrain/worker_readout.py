"""vLLM worker: per-token concept scores for the requests that ask for them (live readout).

Capture reuses vLLM's own EAGLE-3 "aux hidden states" path: after the model loads, the
model is told to also return `hidden + residual` after each captured block (the block
output, Hugging Face's `hidden_states[i+1]`) for every token of the step. That add is
part of the model's code, so it survives torch.compile and CUDA graphs, where forward
hooks silently never fire. Everything else happens outside the graph, after the
forward, and only when a running request opted in: pick the rows that produce a token
(skipping partial prefill chunks), project them onto every concept of every readout
layer in one matrix product per layer, and, once `sample_tokens` has chosen the tokens,
push one msgpack message per step to the API server (ZMQ PUSH, never blocking: a slow
or absent reader costs dropped messages, not inference time).

The captured layers are fixed at launch (they shape the compiled graph, and the compile
cache key includes them); the concept vectors can be swapped at any time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import torch
import zmq

from livetrain import readout_format

log = logging.getLogger("livetrain.readout")

ENV_READOUT = "LIVETRAIN_READOUT"  # readout folder loaded at launch
ENV_LAYERS = "LIVETRAIN_READOUT_LAYERS"  # blocks captured (default: the readout's layers)
ENV_SOCKET = "LIVETRAIN_READOUT_SOCKET"  # set by the first process, inherited by the engine


def captured_layers() -> list[int]:
    value = os.environ.get(ENV_LAYERS, "")
    return sorted({int(x) for x in value.split(",") if x.strip()})


def prepare_launch(runtime_dir: Callable[[], Path]) -> None:
    """In the first vLLM process (the API server): validate the launch readout, fix the
    captured layers and create the private socket directory, all through the
    environment the engine processes inherit. A malformed readout stops the launch."""
    if os.environ.get(ENV_SOCKET) or not (
        os.environ.get(ENV_READOUT) or os.environ.get(ENV_LAYERS)
    ):
        return
    if os.environ.get(ENV_READOUT):
        readout = readout_format.load(Path(os.environ[ENV_READOUT]))
        os.environ.setdefault(ENV_LAYERS, ",".join(map(str, readout.layers)))
        if missing := set(readout.layers) - set(captured_layers()):
            raise readout_format.ReadoutError(
                f"{ENV_READOUT}: layers {sorted(missing)} are not in {ENV_LAYERS}"
            )
    # mkdtemp makes it 0700; short names keep the socket path under the ~107-byte limit.
    private = tempfile.mkdtemp(prefix="ro-", dir=runtime_dir())
    os.environ[ENV_SOCKET] = f"ipc://{private}/s"


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


@dataclass
class _Pending:
    """One step's opted-in rows, copied out of the aux outputs after the forward, waiting
    for the tokens `sample_tokens` picks."""

    version: int
    matrices: list[np.ndarray]  # the readout of that step, [H, C] per layer
    req_ids: list[str]
    token_index: list[int]
    n: list[int]
    hidden: list[np.ndarray]  # per readout layer [rows, H] float32
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Tap:
    """Per worker process: the loaded concept vectors and the opted-in requests.

    A step's message is sent before `sample_tokens` returns, so it always leaves before
    the engine can report that step's tokens: a reader that has a finished completion
    can have all of its rows. (A sender thread was tried; it loses that ordering.)"""

    captured: list[int]
    socket_path: str
    hidden_size: int
    version: int = -1
    layers: list[int] = field(default_factory=list)  # readout layers (subset of captured)
    slots: list[int] = field(default_factory=list)  # their positions in the aux outputs
    matrices: list[np.ndarray] = field(default_factory=list)  # per readout layer [H, C]
    active: set[str] = field(default_factory=set)
    pending: _Pending | None = None
    dropped: int = 0  # messages a full socket refused
    steps: int = 0  # steps that produced scores
    seconds: float = 0.0  # time spent selecting, projecting, encoding and sending

    def __post_init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 10_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.socket_path)
        self.encoder = msgspec.msgpack.Encoder()

    def load(self, folder: str, version: int) -> None:
        """Swap in a readout (validated; its layers must have been captured at launch)."""
        readout = readout_format.load(Path(folder))
        if readout.hidden_size != self.hidden_size:
            raise readout_format.ReadoutError(
                f"hidden size {readout.hidden_size} does not match the model's {self.hidden_size}"
            )
        if missing := set(readout.layers) - set(self.captured):
            raise readout_format.ReadoutError(
                f"layers {sorted(missing)} were not captured at launch (captured: "
                f"{self.captured}; set {ENV_LAYERS} at launch to capture more)"
            )
        self.matrices = [readout.vectors[i].numpy().T.copy() for i in readout.layers]
        self.slots = [self.captured.index(i) for i in readout.layers]
        self.layers, self.version = list(readout.layers), version

    def before_step(self, scheduler_output) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            extra = getattr(new.sampling_params, "extra_args", None) or {}
            if extra.get("readout"):  # JSON true arrives as 1 (vllm_xargs has no bool)
                self.active.add(new.req_id)
        if self.active and scheduler_output.finished_req_ids:
            self.active.difference_update(scheduler_output.finished_req_ids)

    def after_forward(self, runner) -> None:
        """Copy out the rows that will produce a token, for opted-in requests (the next
        step overwrites them)."""
        self.pending = None
        state = runner.execute_model_state
        if not self.active or not self.matrices or state is None or state.aux_hidden_states is None:
            return
        started = time.perf_counter()
        batch = runner.input_batch
        n = batch.num_reqs
        discard = runner.discard_request_mask.np[:n]
        ends = runner.query_start_loc.np
        req_ids, token_index, fanout, rows = [], [], [], []
        for k, rid in enumerate(batch.req_ids[:n]):
            if rid in self.active and not discard[k]:  # a partial prefill chunk samples nothing
                request = runner.requests[rid]
                req_ids.append(rid)
                token_index.append(len(request.output_token_ids))
                fanout.append(int(request.sampling_params.n or 1))
                rows.append(int(ends[k + 1]) - 1)
        if rows:
            hidden = [_rows(state.aux_hidden_states[slot], rows) for slot in self.slots]
            self.pending = _Pending(
                self.version, self.matrices, req_ids, token_index, fanout, hidden
            )
        self.seconds += time.perf_counter() - started

    def after_sample(self, output) -> None:
        step, self.pending = self.pending, None
        if step is None or not hasattr(output, "req_id_to_index"):
            return
        started = time.perf_counter()
        for rid in step.req_ids:
            sampled = output.sampled_token_ids[output.req_id_to_index[rid]]
            step.token_ids.append(int(sampled[0]) if len(sampled) else -1)
        scores = np.stack([h @ m for h, m in zip(step.hidden, step.matrices, strict=True)], 1)
        message = {
            "v": step.version,
            "req_ids": step.req_ids,
            "index": step.token_index,
            "n": step.n,
            "token_ids": step.token_ids,
            "shape": list(scores.shape),
            "scores": scores.astype(np.float32).tobytes(),
        }
        try:
            self.socket.send(self.encoder.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        self.steps += 1
        self.seconds += time.perf_counter() - started


def _rows(hidden: torch.Tensor, rows: list[int]) -> np.ndarray:
    """A float32 numpy copy of some rows of a step's activations (the next step overwrites
    them). numpy on the CPU, bf16 widened by a bit shift: tiny torch ops each open an
    OpenMP region, which costs more than the work."""
    if hidden.device.type == "cpu":
        if hidden.dtype == torch.bfloat16:
            bits = hidden.view(torch.int16).numpy()[rows].astype(np.uint16).astype(np.uint32)
            return (bits << 16).view(np.float32)
        return hidden.numpy()[rows].astype(np.float32, copy=False)
    return hidden[torch.tensor(rows, device=hidden.device)].float().cpu().numpy()


_tap: Tap | None = None


def install() -> None:
    """Patch the V1 model runner in this process (idempotent); a no-op unless launched
    with a readout (the socket variable is then inherited from the API server)."""
    socket_path, layers = os.environ.get(ENV_SOCKET), captured_layers()
    if not socket_path or not layers:
        return
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_livetrain_readout", False):
        return
    GPUModelRunner._livetrain_readout = True
    runner_class = GPUModelRunner
    if current_platform.is_cpu():  # its load_model replaces the base one
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as runner_class
    load_model = runner_class.load_model
    execute_model, sample_tokens = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens

    def patched_load_model(self, *args, **kwargs):
        global _tap
        load_model(self, *args, **kwargs)
        model = self.get_model()
        if not hasattr(model, "set_aux_hidden_state_layers"):
            raise RuntimeError(f"live readout: {type(model).__name__} cannot return block outputs")
        if self.use_aux_hidden_state_outputs:
            raise RuntimeError("live readout: speculative decoding already uses the aux outputs")
        model.set_aux_hidden_state_layers(tuple(i + 1 for i in layers))
        self.use_aux_hidden_state_outputs = True
        _tap = Tap(layers, socket_path, self.model_config.get_hidden_size())
        if os.environ.get(ENV_READOUT):
            _tap.load(os.environ[ENV_READOUT], version=0)
        log.info("live readout: capturing blocks %s, readout layers %s", layers, _tap.layers)

    def patched_execute_model(self, scheduler_output, *args, **kwargs):
        _tap.before_step(scheduler_output)
        result = execute_model(self, scheduler_output, *args, **kwargs)
        _tap.after_forward(self)
        return result

    def patched_sample_tokens(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        _tap.after_sample(output)
        return output

    runner_class.load_model = patched_load_model
    GPUModelRunner.execute_model = patched_execute_model
    GPUModelRunner.sample_tokens = patched_sample_tokens


def stats_rpc() -> dict:
    """Worker side of GET /readout's `worker` field: what the readout has cost so far."""
    if _tap is None:
        return {}
    return {
        "steps": _tap.steps,
        "seconds": _tap.seconds,
        "dropped": _tap.dropped,
        "active_requests": len(_tap.active),
    }


def load_rpc(folder: str, version: int) -> dict:
    """Worker side of POST /readout/load: {"ok": True} or {"error": reason}."""
    if _tap is None:
        return {"error": "the live readout was not enabled at launch"}
    try:
        _tap.load(folder, version)
    except readout_format.ReadoutError as e:
        return {"error": str(e)}
    return {"ok": True, "layers": _tap.layers}
