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

The captured blocks are fixed at launch (api/readout_launch.py puts them into vLLM's
config); the score ring and the concept vectors arrive by RPC (worker/rpc.py), and the
vectors can be swapped at any time. The same blocks are the ones a request can steer
(worker/steering.py): the tap tells it which requests do, and when each step's batch
is laid out. Everything read from vLLM's model runner goes through vllm_internals.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livetrain import vllm_internals as vllm
from livetrain.formats import readout_format
from livetrain.formats.messages import ScoreRecord, TapStats, encode
from livetrain.formats.score_ring import ScoreRing
from livetrain.worker.steering import Steering

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
    """Per model runner: the loaded concept vectors and the opted-in requests.

    A step's record is in the ring before `sample_tokens` returns, so it is there
    before the engine can report that step's tokens: a reader that has a finished
    completion and drains the ring has all of its rows."""

    captured: list[int]
    hidden_size: int
    device: torch.device
    steering: Steering
    ring: ScoreRing | None = None  # opened when the API server starts collecting
    version: int = -1
    layers: list[int] = field(default_factory=list)  # readout layers (subset of captured)
    slots: list[int] = field(default_factory=list)  # their positions in the aux outputs
    matrices: torch.Tensor | None = None  # [layers, H, C] float32, on the model's device
    active: set[str] = field(default_factory=set)
    prompt_active: set[str] = field(default_factory=set)  # also score their prompt tokens
    pending: _Pending | None = None
    # Every tensor-parallel rank has the same block outputs (the residual stream is
    # all-reduced); only rank 0 scores and records them, or each row would arrive twice.
    records: bool = True
    steps: int = 0  # steps that produced scores
    seconds: float = 0.0  # time spent selecting, projecting, encoding and writing

    def load(self, folder: str, version: int) -> None:
        """Swap in a readout (validated; its layers must have been captured at launch)."""
        readout = readout_format.load(Path(folder))
        readout_format.check_fits(readout, self.hidden_size, self.captured)
        vectors = torch.stack([readout.detectors[i].float().T for i in readout.layers])
        self.matrices = vectors.to(self.device).contiguous()
        self.slots = [self.captured.index(i) for i in readout.layers]
        self.layers, self.version = list(readout.layers), version
        self.steering.load(readout)

    def stats(self) -> TapStats:
        return TapStats(
            steps=self.steps,
            seconds=self.seconds,
            dropped=self.ring.dropped if self.ring else 0,
            active_requests=len(self.active),
            steered_requests=len(self.steering.requests),
            steered_steps=self.steering.steps,
        )

    def before_step(self, scheduler_output: Any) -> None:
        for req_id, extra in vllm.new_requests(scheduler_output):
            if extra.get("readout"):
                self.active.add(req_id)
                if extra.get("readout_prompt"):
                    self.prompt_active.add(req_id)
            if "steer" in extra:
                self.steering.add(req_id, extra["steer"])
        if (self.active or self.steering.requests) and (
            finished := vllm.finished_requests(scheduler_output)
        ):
            self.active.difference_update(finished)
            self.prompt_active.difference_update(finished)
            self.steering.finish(finished)

    def before_forward(self, runner: Any) -> None:
        self.steering.before_forward(runner)

    def after_forward(self, runner: Any) -> None:
        """Score the rows that will produce a token, for opted-in requests, and the rows
        of prompt tokens for those that asked for them too."""
        self.pending = None
        if not self.records or not self.active or self.matrices is None or self.ring is None:
            return
        aux = vllm.step_block_outputs(runner)
        if aux is None:
            return
        started = time.perf_counter()
        step = _Pending(self.version, [], [], [], [], torch.empty(0))
        rows: list[int] = []
        for request in vllm.step_requests(runner, self.active):
            if request.req_id in self.prompt_active:
                # Rows of this step that read prompt tokens (a recompute after preemption
                # reads them again and replaces the earlier rows).
                first = request.first_position
                last = min(first + request.num_rows, request.num_prompt_tokens)
                for position in range(first, last):
                    step.req_ids.append(request.req_id)
                    step.token_index.append(position)
                    step.n.append(request.n)
                    step.prompt_ids.append(int(request.prompt_token_ids[position]))
                    rows.append(request.first_row + position - first)
            if request.samples:
                step.req_ids.append(request.req_id)
                step.token_index.append(request.num_output_tokens)
                step.n.append(request.n)
                step.prompt_ids.append(-1)
                rows.append(request.first_row + request.num_rows - 1)
        if rows:
            step.scores = _project(aux, self.slots, rows, self.matrices)
            self.pending = step
        self.seconds += time.perf_counter() - started

    def after_sample(self, output: Any) -> None:
        step, self.pending = self.pending, None
        if step is None or self.ring is None or not vllm.has_sampled_tokens(output):
            return
        started = time.perf_counter()
        token_ids = [
            prompt_id if prompt_id >= 0 else vllm.sampled_token(output, rid)
            for rid, prompt_id in zip(step.req_ids, step.prompt_ids, strict=True)
        ]
        rows, n_layers, n_concepts = step.scores.shape
        record = ScoreRecord(
            version=step.version,
            req_ids=step.req_ids,
            index=step.token_index,
            n=step.n,
            prompt=[prompt_id >= 0 for prompt_id in step.prompt_ids],
            token_ids=token_ids,
            shape=(rows, n_layers, n_concepts),
            scores=step.scores.cpu().numpy().tobytes(),
        )
        self.ring.put(encode(record))
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


def reads_prompt(extra_args: dict[str, Any]) -> bool:
    """Requests that ask for prompt-token scores never read the prefix cache (engine
    core, at scheduling): a cached prefix is not computed, so it would have no rows."""
    return bool(extra_args.get("readout") and extra_args.get("readout_prompt"))


def make_tap(runner: Any) -> Tap | None:
    """A tap for a model runner that has just loaded its model, when the launch asked
    for block outputs (our entry in vLLM's config); None otherwise."""
    settings, hidden_size, device = vllm.runner_settings(runner)
    blocks = settings.readout_layers
    if not blocks:
        return None
    steering = Steering(vllm.steer_block_outputs(runner, blocks))  # inside the capture
    vllm.capture_block_outputs(runner, blocks)
    log.info("live readout: capturing (and steerable at) blocks %s", blocks)
    return Tap(blocks, hidden_size, device, steering, records=vllm.tensor_parallel_rank() == 0)
