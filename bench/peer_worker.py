"""vLLM worker extension (`--worker-extension-cls peer_worker.PeerUpdate`) for
bench_peer_update.py: the copy-based weight update that RL trainers (TRL, verl,
OpenRLHF) run against vLLM. The trainer owns its own copy of the weights; after each
optimizer step it hands the tensors over and the worker loads them into vLLM's
parameters with vLLM's own in-place reload (which re-runs the CPU repacking).

Methods are reached through vLLM's dev route `POST /collective_rpc`
(VLLM_SERVER_DEV_MODE=1), which passes string arguments only.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from safetensors.torch import load_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PeerUpdate:
    reload_weights: Any  # vLLM's Worker method, on the class this extends

    def peer_load_shared(self, table_json: str) -> float:
        """Load tensors the trainer keeps in a shared-memory file (no serialisation):
        one copy, from the mapping into vLLM's parameters. Returns ms."""
        started = time.perf_counter()
        table = json.loads(table_json)
        raw = torch.from_file(table["path"], shared=True, size=table["bytes"], dtype=torch.uint8)
        weights = (
            (name, raw[offset : offset + nbytes].view(DTYPES[dtype]).view(shape))
            for name, (dtype, shape, offset, nbytes) in table["tensors"].items()
        )
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return (time.perf_counter() - started) * 1000

    def peer_load_serialized(self, path: str) -> float:
        """Load tensors the trainer serialised to a safetensors file. Returns ms."""
        started = time.perf_counter()
        weights = load_file(path)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return (time.perf_counter() - started) * 1000
