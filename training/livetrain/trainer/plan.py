"""What a model will train and the memory it takes, from its classified parameters.

Computed from an attached model in the trainer (reported at attach, shown in
`/train/status`) and from the meta skeleton by `livetrain check`, which needs no
server: both run the same classification, so they cannot disagree.
"""

from __future__ import annotations

from torch import nn

from livetrain.config import OptimizerSettings
from livetrain.formats.messages import PlanGroup, TrainPlan
from livetrain.trainer.apollo import moment_shape
from livetrain.trainer.model import AttachedModel, is_norm

_FP32 = 4


def _kind(model: nn.Module, name: str, param: nn.Parameter) -> str:
    if param is model.get_input_embeddings().weight:  # type: ignore[operator]
        return "embeddings"
    if param is model.get_output_embeddings().weight:  # type: ignore[operator]
        return "lm_head"
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_norm(module):
        return "norms"
    if "expert" in module_name:
        return "experts"
    if attr.endswith("bias"):
        return "bias"
    if param.dim() == 2 and module_name.rpartition(".")[2] in ("gate", "router"):
        return "router"
    return "linear" if param.dim() >= 2 else "other"


def _optimizer_bytes(attached: AttachedModel, rank: int) -> int:
    total = 0
    for param in attached.apollo_params.values():
        r = min(rank, *param.shape[-2:])
        moments = 1
        for size in moment_shape(param.shape, r):
            moments *= size
        total += 2 * moments * _FP32
    return total + sum(2 * p.numel() * _FP32 for p in attached.adamw_params.values())


def train_plan(attached: AttachedModel, rank: int = OptimizerSettings().rank) -> TrainPlan:
    model = attached.model
    apollo = {id(p) for p in attached.apollo_params.values()}
    adamw = {id(p) for p in attached.adamw_params.values()}
    groups: dict[tuple[str, str], list[int]] = {}
    seen: set[int] = set()
    dtype = next(model.parameters()).dtype
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        optimizer = "apollo" if id(param) in apollo else "adamw" if id(param) in adamw else "frozen"
        counts = groups.setdefault((_kind(model, name, param), optimizer), [0, 0, 0])
        counts[0] += 1
        counts[1] += param.numel()
        counts[2] += param.numel() * param.element_size()
    trainable = sum(p.numel() * p.element_size() for p in attached.trainable.values())
    vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    return TrainPlan(
        dtype=str(dtype).removeprefix("torch."),
        groups=[
            PlanGroup(kind, optimizer, *counts)  # type: ignore[arg-type]
            for (kind, optimizer), counts in sorted(groups.items())
        ],
        trainable_bytes=trainable,
        gradient_bytes=trainable,
        largest_gradient_bytes=max(
            (p.numel() * p.element_size() for p in attached.trainable.values()), default=0
        ),
        optimizer_bytes=_optimizer_bytes(attached, rank),
        rank=rank,
        logits_bytes_per_token=2 * vocab * _FP32,
    )
