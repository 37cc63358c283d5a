"""vLLM worker: where each Hugging Face checkpoint tensor lives in vLLM's memory.

The mapping is vLLM's own: the model class's `hf_to_vllm_mapper` turns a checkpoint
name into (vLLM parameter, shard id), and the fused layer's shard tables turn the
shard id into a row range (vllm_internals.checkpoint_param / shard_rows). Nothing is
guessed: a name the mapper skips (a tied lm_head, say) is listed as dropped, a name that
maps to something other than a parameter is an error, and so is a vLLM parameter that
no checkpoint tensor feeds.
"""

from __future__ import annotations

from torch import nn

from livetrain.formats.messages import ParamRows, WeightExport
from livetrain.formats.shared_tensors import export_tensor
from livetrain.vllm_internals import checkpoint_param, shard_rows


def export_weights(model: nn.Module, hf_names: list[str], world_size: int) -> WeightExport:
    """Handles to every weight plus the checkpoint-name -> (param, rows) map."""
    if world_size != 1:
        raise RuntimeError(
            f"livetrain supports one worker (tensor/pipeline parallel size 1); got {world_size}"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    mapping: dict[str, ParamRows] = {}
    dropped: list[str] = []
    for hf_name in hf_names:
        resolved = checkpoint_param(model, hf_name)
        if resolved is None:
            dropped.append(hf_name)
            continue
        vllm_name, shard = resolved
        if vllm_name not in params:
            raise KeyError(f"checkpoint tensor {hf_name!r} maps to {vllm_name!r}, not a parameter")
        module_name, _, attr = vllm_name.rpartition(".")
        start, stop = shard_rows(modules[module_name], attr, shard, params[vllm_name])
        mapping[hf_name] = ParamRows(vllm_name, start, stop)
    used = {rows.param for rows in mapping.values()}
    _check_every_param_fed(model, used)
    return WeightExport(
        params={name: export_tensor(params[name].data) for name in sorted(used)},
        map=mapping,
        dropped=dropped,
    )


def _check_every_param_fed(model: nn.Module, used: set[str]) -> None:
    fed = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in used}
    orphans = [name for name, p in model.named_parameters() if id(p) not in fed]
    if orphans:
        raise KeyError(f"vLLM parameters with no checkpoint tensor: {orphans}")
