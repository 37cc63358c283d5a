"""Worker side: where each Hugging Face checkpoint tensor lives in vLLM's memory.

The mapping is vLLM's own: the model class's `hf_to_vllm_mapper` turns a checkpoint
name into (vLLM parameter, shard id), and the fused layer's shard tables turn the
shard id into a row range. Nothing is guessed; a name that does not resolve is an
error, and so is a vLLM parameter that no checkpoint tensor feeds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from livetrain.shared_tensors import export_tensor


def export_weights(model: nn.Module, hf_names: list[str], world_size: int) -> dict[str, Any]:
    """Handles to every weight plus the checkpoint-name -> (param, rows) map.

    Returns plain data (msgspec-serialisable): {"params": {vllm_name: handle},
    "map": {hf_name: {"param", "start", "stop"}}, "dropped": [hf names vLLM ignores]}.
    """
    if world_size != 1:
        raise RuntimeError(
            f"livetrain supports one worker (tensor/pipeline parallel size 1); got {world_size}"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapping: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    for hf_name in hf_names:
        resolved = mapper._map_name_with_shard(hf_name) if mapper else (hf_name, None)
        if resolved is None:
            dropped.append(hf_name)
            continue
        vllm_name, shard = resolved
        if vllm_name not in params:
            raise KeyError(f"checkpoint tensor {hf_name!r} maps to {vllm_name!r}, not a parameter")
        module_name, _, attr = vllm_name.rpartition(".")
        start, stop = _rows(modules[module_name], attr, shard, params[vllm_name])
        mapping[hf_name] = {"param": vllm_name, "start": start, "stop": stop}
    _check_every_param_fed(model, mapping)
    used = {m["param"] for m in mapping.values()}
    return {
        "params": {name: export_tensor(params[name].data) for name in sorted(used)},
        "map": mapping,
        "dropped": dropped,
    }


def _rows(module: nn.Module, attr: str, shard: Any, param: torch.Tensor) -> tuple[int, int]:
    """Row range (dim 0) of `param` that holds the checkpoint tensor for `shard`."""
    if shard is None:
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        if isinstance(module, VocabParallelEmbedding) and attr == "weight":
            return 0, module.org_vocab_size  # rows past it are vLLM's padding
        return 0, param.shape[0]
    if isinstance(shard, str) and hasattr(module, "_get_shard_offset_mapping"):
        offset = module._get_shard_offset_mapping(shard)
        size = module._get_shard_size_mapping(shard)
    elif isinstance(shard, int) and hasattr(module, "output_sizes"):
        offset, size = sum(module.output_sizes[:shard]), module.output_sizes[shard]
    else:
        offset = size = None
    if offset is None or size is None:
        raise KeyError(f"no row table for shard {shard!r} of {type(module).__name__}")
    return offset, offset + size


def _check_every_param_fed(model: nn.Module, mapping: dict[str, dict[str, Any]]) -> None:
    fed = {
        id(p)
        for name, p in model.named_parameters(remove_duplicate=False)
        if name in {m["param"] for m in mapping.values()}
    }
    orphans = [name for name, p in model.named_parameters() if id(p) not in fed]
    if orphans:
        raise KeyError(f"vLLM parameters with no checkpoint tensor: {orphans}")
