"""vLLM worker: add concept directions to the residual stream of the requests that ask.

Each captured block adds the first rows of a static buffer to its output every step
(vllm_internals.steer_block_outputs). Before each forward, once the step's batch is
laid out, this module zeroes the rows it wrote last step and writes each steered
request's vector into its own rows: sum over its concepts of scale x unit x direction
(readout_format.py), per block it asked for. Rows of other requests stay zero, and
x + 0 is x, so they are computed exactly as without steering. Every tensor-parallel
rank holds the whole residual stream after a block and adds the same vector.

The requests arrive validated by the API server (api/steering.py) as a `SteerSpec`;
a spec that no longer matches the loaded readout (swapped in between) is not steered,
and counted, rather than failing a step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from livetrain import vllm_internals as vllm
from livetrain.formats import readout_format
from livetrain.formats.messages import SteerSpec

log = logging.getLogger("livetrain.steering")


@dataclass(frozen=True)
class _Steered:
    vectors: dict[int, torch.Tensor]  # block -> [hidden] in the buffer's dtype and device
    prompt: bool  # steer prompt rows too (else from the prompt's last token on)


@dataclass
class Steering:
    """Per model runner: the blocks' add buffers and the running steered requests."""

    buffers: dict[int, torch.Tensor]  # block -> [max_num_tokens, hidden]
    readout: readout_format.Readout | None = None
    requests: dict[str, _Steered] = field(default_factory=dict)
    dirty: int = 0  # buffer rows written by the last step, zeroed before the next
    steps: int = 0  # steps that steered any row
    refused: int = 0  # specs that did not match the loaded readout

    def load(self, readout: readout_format.Readout) -> None:
        """Steer new requests with this readout's directions (running ones keep theirs)."""
        self.readout = readout if readout.steerable else None

    def add(self, req_id: str, text: Any) -> None:
        """A request scheduled for the first time, with its `vllm_xargs["steer"]`."""
        try:
            spec = SteerSpec.from_text(text)
            self.requests[req_id] = self._vectors(spec)
        except (msgspec.DecodeError, KeyError, ValueError, TypeError) as exc:
            self.refused += 1
            log.warning("request %s is not steered: %s", req_id, exc)

    def _vectors(self, spec: SteerSpec) -> _Steered:
        readout = self.readout
        if readout is None:
            raise ValueError("the loaded readout has no directions")
        rows = [readout.concepts.index(c) for c in spec.scales]
        scales = torch.tensor(list(spec.scales.values()), dtype=torch.float64)
        vectors = {}
        for block in spec.layers:
            buffer = self.buffers[block]  # KeyError: a block not captured at launch
            units = readout.units[block][rows].double() * scales
            vector = units @ readout.directions[block][rows].double()
            vectors[block] = vector.to(device=buffer.device, dtype=buffer.dtype)
        return _Steered(vectors, spec.prompt)

    def finish(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self.requests.pop(req_id, None)

    def before_forward(self, runner: Any) -> None:
        """Write this step's rows: zero what the last step wrote, then each steered
        request's vector into its rows (from its prompt's last token on, unless it
        steers the prompt too)."""
        if self.dirty:
            for buffer in self.buffers.values():
                buffer[: self.dirty].zero_()
            self.dirty = 0
        if not self.requests:
            return
        for request in vllm.step_requests(runner, set(self.requests)):
            steered = self.requests[request.req_id]
            skip = 0 if steered.prompt else request.num_prompt_tokens - 1 - request.first_position
            first = request.first_row + max(skip, 0)
            end = request.first_row + request.num_rows
            if first >= end:
                continue
            for block, vector in steered.vectors.items():
                self.buffers[block][first:end] = vector
            self.dirty = max(self.dirty, end)
        self.steps += self.dirty > 0
