"""vLLM worker: per-token concept scores for the requests that ask for them (live readout).

Capture reuses vLLM's own EAGLE-3 "aux hidden states" path: after the model loads, the
model is told to also return `hidden + residual` after each captured block (the block
output, Hugging Face's `hidden_states[i+1]`) for every token of the step. That add is
part of the model's code, so it survives torch.compile and CUDA graphs, where forward
hooks silently never fire. Everything else happens outside the graph, after the
forward, and only when a running request opted in: pick the rows that produce a token
(skipping partial prefill chunks), project them onto every concept of every readout
layer in one batched matrix product, and, once `sample_tokens` has chosen the tokens,
append one msgpack record per step to the shared-memory score ring (score_ring.py:
a memcpy, never blocking; a full ring costs a dropped record, not inference time).

The captured layers are fixed at launch (readout_launch.py); the concept vectors can be
swapped at any time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from livetrain import readout_format
from livetrain.readout_launch import ENV_READOUT, ENV_RING, captured_layers, remove
from livetrain.score_ring import ScoreRing

log = logging.getLogger("livetrain.readout")


@dataclass
class _Pending:
    """One step's scores, computed right after the forward (the next step overwrites the
    activations), waiting for the tokens `sample_tokens` picks."""

    version: int
    req_ids: list[str]
    token_index: list[int]  # generated rows: the token's index; prompt rows: its position
    n: list[int]
    prompt_ids: list[int]  # prompt rows: the prompt token read; generated rows: -1
    scores: torch.Tensor  # [rows, layers, concepts] float32


@dataclass
class Tap:
    """Per worker process: the loaded concept vectors and the opted-in requests.

    A step's record is in the ring before `sample_tokens` returns, so it is there
    before the engine can report that step's tokens: a reader that has a finished
    completion and drains the ring has all of its rows."""

    captured: list[int]
    ring: ScoreRing
    hidden_size: int
    device: torch.device
    version: int = -1
    layers: list[int] = field(default_factory=list)  # readout layers (subset of captured)
    slots: list[int] = field(default_factory=list)  # their positions in the aux outputs
    matrices: torch.Tensor | None = None  # [layers, H, C] float32, on the model's device
    active: set[str] = field(default_factory=set)
    prompt_active: set[str] = field(default_factory=set)  # also score their prompt tokens
    pending: _Pending | None = None
    steps: int = 0  # steps that produced scores
    seconds: float = 0.0  # time spent selecting, projecting, encoding and writing

    def __post_init__(self) -> None:
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
                f"{self.captured}; set LIVETRAIN_READOUT_LAYERS at launch to capture more)"
            )
        vectors = torch.stack([readout.vectors[i].float().T for i in readout.layers])
        self.matrices = vectors.to(self.device).contiguous()
        self.slots = [self.captured.index(i) for i in readout.layers]
        self.layers, self.version = list(readout.layers), version

    def before_step(self, scheduler_output) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            extra = getattr(new.sampling_params, "extra_args", None) or {}
            if extra.get("readout"):  # JSON true arrives as 1 (vllm_xargs has no bool)
                self.active.add(new.req_id)
                if extra.get("readout_prompt"):
                    self.prompt_active.add(new.req_id)
        if self.active and scheduler_output.finished_req_ids:
            self.active.difference_update(scheduler_output.finished_req_ids)
            self.prompt_active.difference_update(scheduler_output.finished_req_ids)

    def after_forward(self, runner) -> None:
        """Score the rows that will produce a token, for opted-in requests, and the rows
        of prompt tokens for those that asked for them too."""
        self.pending = None
        state = runner.execute_model_state
        if (
            not self.active
            or self.matrices is None
            or state is None
            or state.aux_hidden_states is None
        ):
            return
        started = time.perf_counter()
        batch = runner.input_batch
        n = batch.num_reqs
        discard = runner.discard_request_mask.np[:n]
        ends = runner.query_start_loc.np
        step = _Pending(self.version, [], [], [], [], torch.empty(0))
        rows: list[int] = []
        for k, rid in enumerate(batch.req_ids[:n]):
            if rid not in self.active:
                continue
            request = runner.requests[rid]
            fanout = int(request.sampling_params.n or 1)
            if rid in self.prompt_active:
                # Rows of this step that read prompt tokens (a recompute after preemption
                # reads them again and replaces the earlier rows).
                first = int(batch.num_computed_tokens_cpu[k])
                last = min(first + int(ends[k + 1] - ends[k]), request.num_prompt_tokens)
                for position in range(first, last):
                    step.req_ids.append(rid)
                    step.token_index.append(position)
                    step.n.append(fanout)
                    step.prompt_ids.append(int(request.prompt_token_ids[position]))
                    rows.append(int(ends[k]) + position - first)
            if not discard[k]:  # a partial prefill chunk samples nothing
                step.req_ids.append(rid)
                step.token_index.append(len(request.output_token_ids))
                step.n.append(fanout)
                step.prompt_ids.append(-1)
                rows.append(int(ends[k + 1]) - 1)
        if rows:
            step.scores = _project(state.aux_hidden_states, self.slots, rows, self.matrices)
            self.pending = step
        self.seconds += time.perf_counter() - started

    def after_sample(self, output) -> None:
        step, self.pending = self.pending, None
        if step is None or not hasattr(output, "req_id_to_index"):
            return
        started = time.perf_counter()
        token_ids = []
        for rid, prompt_id in zip(step.req_ids, step.prompt_ids, strict=True):
            if prompt_id >= 0:
                token_ids.append(prompt_id)
                continue
            sampled = output.sampled_token_ids[output.req_id_to_index[rid]]
            token_ids.append(int(sampled[0]) if len(sampled) else -1)
        message = {
            "v": step.version,
            "req_ids": step.req_ids,
            "index": step.token_index,
            "n": step.n,
            "prompt": [prompt_id >= 0 for prompt_id in step.prompt_ids],
            "token_ids": token_ids,
            "shape": list(step.scores.shape),
            "scores": step.scores.cpu().numpy().tobytes(),  # C order of [rows, layers, concepts]
        }
        self.ring.put(self.encoder.encode(message))
        self.steps += 1
        self.seconds += time.perf_counter() - started


def _project(
    aux: list[torch.Tensor], slots: list[int], rows: list[int], matrices: torch.Tensor
) -> torch.Tensor:
    """Scores [rows, layers, concepts] (float32) of some rows of a step's block outputs,
    in as few torch calls as possible: after a forward the caches are cold, and each
    call's overhead then costs more than its arithmetic. On a GPU this only queues work;
    the copy to the host waits until sampling has synchronised anyway."""
    captured = [aux[slot] for slot in slots]
    total = captured[0].shape[0]
    # In pure decode every row is wanted, once and in order; with prompt rows a step's
    # last prompt row can also be its sampling row, so only an exact match skips the gather.
    if len(rows) == total and rows[-1] == total - 1 and rows == list(range(total)):
        hidden = torch.stack(captured)
    else:
        index = torch.tensor(rows, device=captured[0].device)
        hidden = torch.stack([h.index_select(0, index) for h in captured])
    return torch.bmm(hidden.float(), matrices).transpose(0, 1)


_tap: Tap | None = None


def _compute_asked_prompts() -> None:
    """Requests that ask for prompt-token scores never read the prefix cache (engine
    core, at scheduling): a cached prefix is not computed, so it would have no rows.
    Their blocks are still written to the cache for others. The same rule vLLM applies
    to requests that ask for prompt logprobs."""
    from vllm.v1.request import Request

    if getattr(Request, "_livetrain_readout", False):
        return
    Request._livetrain_readout = True
    skip = Request.get_skip_reading_prefix_cache

    def skip_for_prompt_readout(self) -> bool:
        extra = getattr(self.sampling_params, "extra_args", None) or {}
        return bool(extra.get("readout") and extra.get("readout_prompt")) or skip(self)

    Request.get_skip_reading_prefix_cache = skip_for_prompt_readout


def install() -> None:
    """Patch the V1 model runner in this process (idempotent); a no-op unless launched
    with a readout (the ring's path is then inherited from the API server)."""
    ring_path, layers = os.environ.get(ENV_RING), captured_layers()
    if not ring_path or not layers:
        return
    _compute_asked_prompts()
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
        if self.use_async_scheduling:  # tokens arrive later, off this path (CUDA only)
            raise RuntimeError("live readout: start vLLM with --no-async-scheduling")
        model.set_aux_hidden_state_layers(tuple(i + 1 for i in layers))
        self.use_aux_hidden_state_outputs = True
        ring = ScoreRing.open(Path(ring_path))
        remove(ring)  # both ends have it mapped now; nothing is left behind on a crash
        _tap = Tap(layers, ring, self.model_config.get_hidden_size(), self.device)
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
        "dropped": _tap.ring.dropped,
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
