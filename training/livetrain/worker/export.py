"""vLLM worker: where each Hugging Face checkpoint tensor lives in vLLM's memory.

The mapping is vLLM's own: the model class's `load_weights`, run on meta tensors,
says where each checkpoint tensor lands (vllm_internals.checkpoint_placements), be it
rows of a fused q/k/v, one expert's rows of a fused `w13_weight`, or a transposed
expert tensor. Nothing is guessed: a name the loader skips (a tied lm_head, say) is
listed as dropped; a tensor the loader computes with rather than moves is an error
naming it; so is a vLLM parameter that no checkpoint tensor feeds.

Under tensor parallelism every rank answers for its own shard: which box of each
checkpoint tensor its loader kept (`TensorView.origin`) and where; the trainer puts
the ranks' answers together (trainer/shards.py).
"""

from __future__ import annotations

import torch
from torch import nn

from livetrain.formats.messages import CheckpointTensor, TensorView, WeightExport
from livetrain.formats.shared_tensors import export_tensor
from livetrain.vllm_internals import checkpoint_placements, shared_tensors

# Tensor-parallel sizes trained and tested end to end (tests/test_tensor_parallel.py).
TESTED_TENSOR_PARALLEL = (1, 2)


def export_weights(
    model: nn.Module, tensors: list[CheckpointTensor], tensor_parallel: int, pipeline: int
) -> WeightExport:
    """Handles to every weight of this rank plus the checkpoint-name -> view map."""
    if pipeline != 1:
        raise RuntimeError(
            f"livetrain does not train under pipeline parallelism (size {pipeline}): each "
            "stage holds other layers, and a step would have to run across them"
        )
    if tensor_parallel not in TESTED_TENSOR_PARALLEL:
        raise RuntimeError(
            f"livetrain trains at tensor parallel sizes {list(TESTED_TENSOR_PARALLEL)}; "
            f"{tensor_parallel} is refused until it is tested"
        )
    views, dropped = served_views(model, tensors, sharded=tensor_parallel > 1)
    shared = shared_tensors(model)
    used = {view.param for view in views.values()}
    _check_every_param_fed(model, used)
    return WeightExport(
        params={name: export_tensor(shared[name]) for name in sorted(used)},
        map=views,
        dropped=dropped,
    )


def served_views(
    model: nn.Module, tensors: list[CheckpointTensor], sharded: bool = False
) -> tuple[dict[str, TensorView], list[str]]:
    """Where vLLM keeps each checkpoint tensor (the part this rank holds, if `sharded`),
    and the ones its loader skips (also what `livetrain check` asks of a model built on
    meta parameters)."""
    wanted = {t.name: (t.shape, getattr(torch, t.dtype)) for t in tensors}
    placements, dropped = checkpoint_placements(model, wanted, sharded)
    views = {
        name: TensorView(p.tensor, p.offset, list(p.shape), list(p.stride), list(origin))
        for name, (origin, p) in placements.items()
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
