"""vLLM worker: where each Hugging Face checkpoint tensor lives in vLLM's memory.

The mapping is vLLM's own: the model class's `load_weights`, run on meta tensors,
says where each checkpoint tensor lands (vllm_internals.checkpoint_placements), be it
rows of a fused q/k/v, one expert's rows of a fused `w13_weight`, or a transposed
expert tensor. Nothing is guessed: a name the loader skips (a tied lm_head, say) is
listed as dropped; a tensor the loader computes with rather than moves is an error
naming it; so is a vLLM parameter that no checkpoint tensor feeds.
"""

from __future__ import annotations

import torch
from torch import nn

from livetrain.formats.messages import CheckpointTensor, TensorView, WeightExport
from livetrain.formats.shared_tensors import export_tensor
from livetrain.vllm_internals import checkpoint_placements, shared_tensors


def export_weights(
    model: nn.Module, tensors: list[CheckpointTensor], world_size: int
) -> WeightExport:
    """Handles to every weight plus the checkpoint-name -> view map."""
    if world_size != 1:
        raise RuntimeError(
            f"livetrain supports one worker (tensor/pipeline parallel size 1); got {world_size}"
        )
    views, dropped = served_views(model, tensors)
    shared = shared_tensors(model)
    used = {view.param for view in views.values()}
    _check_every_param_fed(model, used)
    return WeightExport(
        params={name: export_tensor(shared[name]) for name in sorted(used)},
        map=views,
        dropped=dropped,
    )


def served_views(
    model: nn.Module, tensors: list[CheckpointTensor]
) -> tuple[dict[str, TensorView], list[str]]:
    """Where vLLM keeps each checkpoint tensor, and the ones its loader skips (also what
    `livetrain check` asks of a model built on meta parameters)."""
    wanted = {t.name: (t.shape, getattr(torch, t.dtype)) for t in tensors}
    placements, dropped = checkpoint_placements(model, wanted)
    views = {
        name: TensorView(p.tensor, p.offset, list(p.shape), list(p.stride))
        for name, p in placements.items()
    }
    return views, dropped


def _check_every_param_fed(model: nn.Module, used: set[str]) -> None:
    fed = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in used}
    orphans = [name for name, p in model.named_parameters() if id(p) not in fed]
    if orphans:
        raise KeyError(
            f"vLLM parameters no checkpoint tensor feeds: {orphans} (vLLM derives them at "
            "load from other tensors, e.g. MLA's absorbed W_UK/W_UV from kv_b_proj, so "
            "training those could not reach them)"
        )
