"""vLLM worker extension (`--worker-extension-cls keep_plain_worker.KeepPlain`) for
bench_decode.py's `vllm_keep_plain` control: vLLM alone, no livetrain, except that its
own CPU dispatch keeps each layer's plain weight beside the packed copy
(`remove_weight=False`), as livetrain's does. It separates what keeping that weight
costs decode from what the rest of the plugin does.

vLLM imports the extension's module in the worker before it loads the model, and its
layers import the dispatch function from its module at call time, so replacing it
there is enough.
"""

from __future__ import annotations

from typing import Any

import vllm.model_executor.layers.utils as layer_utils

_dispatch = layer_utils.dispatch_cpu_unquantized_gemm


def _dispatch_keeping_weight(layer: Any, remove_weight: bool) -> None:
    _dispatch(layer, remove_weight=False)


layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_weight


class KeepPlain:
    """Adds no methods: importing this module is the whole change."""
