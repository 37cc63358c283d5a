"""vLLM worker extension (`--worker-extension-cls shared_weights_worker.SharedWeights`)
for bench_decode.py's `vllm_shared_weights` control: vLLM alone, no livetrain, except
for the two things livetrain's attach does to the worker's memory. Its CPU dispatch
keeps each layer's plain weight beside the packed copy (keep_plain_worker.py), and
every parameter's storage then moves into fd-backed shared memory, as
`export_tensor` moves it when the trainer maps the weights. Against
`vllm_keep_plain`, it separates what serving from shared memory costs decode.
"""

from __future__ import annotations

from typing import Any

import keep_plain_worker  # noqa: F401  (importing it keeps the plain weights)
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from livetrain.formats.shared_tensors import export_tensor

_load_model = CPUModelRunner.load_model


def _load_model_into_shared_memory(self: Any, *args: Any, **kwargs: Any) -> None:
    _load_model(self, *args, **kwargs)
    for param in self.get_model().parameters():
        export_tensor(param.data)


CPUModelRunner.load_model = _load_model_into_shared_memory  # type: ignore[method-assign]


class SharedWeights:
    """Adds no methods: importing this module is the whole change."""
