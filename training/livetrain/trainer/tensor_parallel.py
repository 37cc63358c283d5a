"""Training subprocess: attach to a tensor-parallel vLLM, one trainer for every rank.

Each rank's worker says which box of each checkpoint tensor it holds and where
(worker/export.py). Here the boxes are put together per Hugging Face parameter: the
distinct boxes must tile the tensor along one axis (a rank's rows or columns, its slice
of the vocabulary) or be the whole tensor; ranks holding the same box are copies
(trainer/shards.py). Linear and embedding layers whose weight is in parts are swapped
for sharded ones that compute on the parts where they lie.

Why one trainer and not one per rank with a process group: on one CPU machine every
rank's memory can be mapped into one process, so a step is one forward and backward
with no collectives, every rank's write is fenced by the same pause, and APOLLO sees
whole gradients, so the step equals the one-rank step. Across GPUs the same design
holds every rank's CUDA IPC handle in one process, but each part's compute then runs on
its own device with activations moving between devices at every sharded layer; a
trainer per rank (Megatron-style, the collectives of vLLM's own layers) would keep the
compute local and is the better shape there. That is not built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from livetrain.config import TrainableFamilies
from livetrain.formats.messages import TensorView, WeightExport
from livetrain.formats.shared_tensors import TensorImporter
from livetrain.trainer.model import (
    AttachedModel,
    AttachError,
    build_skeleton,
    canonical_names,
    classified,
    saved_buffers,
    skeleton_placements,
    verify_against_files,
)
from livetrain.trainer.plan import train_plan
from livetrain.trainer.shards import ShardedEmbedding, ShardedLinear, Shards
from livetrain.weight_map import Placement, contiguous_strides


def _rank_view(view: TensorView, export: WeightExport, importer: TensorImporter) -> torch.Tensor:
    placement = Placement(view.param, view.offset, tuple(view.shape), tuple(view.stride))
    return placement.view(importer(export.params[view.param]))


def _checkpoint_name(name: str, shape: tuple[int, ...], held: dict[str, Placement]) -> list[str]:
    """The checkpoint names that are exactly parameter `name` (tied ones: several).
    Under tensor parallelism only such one-to-one parameters attach: a fused layout
    (MoE experts) would put a rank's part of several tensors in one parameter."""
    names = [c for c, p in held.items() if p.tensor == name]
    for c in names:
        p = held[c]
        if p.offset != 0 or p.shape != shape or p.stride != contiguous_strides(shape):
            raise AttachError(
                f"{name}: holds part of checkpoint tensor {c}; tensor parallel training "
                "supports models whose parameters are their checkpoint tensors (dense "
                "families), and refuses fused layouts such as MoE experts until tested"
            )
    return names


def gather(
    name: str,
    shape: tuple[int, ...],
    held: dict[str, Placement],
    exports: list[WeightExport],
    importer: TensorImporter,
) -> Shards:
    """Parameter `name` of `shape` as every rank holds it."""
    checkpoint = [c for c in _checkpoint_name(name, shape, held) if c in exports[0].map]
    if not checkpoint:
        raise AttachError(f"no vLLM tensor for Hugging Face parameter {name}")
    boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[torch.Tensor]] = {}
    for rank, export in enumerate(exports):
        view = export.map.get(checkpoint[0])
        if view is None:
            raise AttachError(f"{checkpoint[0]}: rank {rank} does not hold it")
        origin = tuple(view.origin) or (0,) * len(shape)
        boxes.setdefault((origin, tuple(view.shape)), []).append(_rank_view(view, export, importer))
    return _tile(name, shape, boxes)


def _tile(
    name: str,
    shape: tuple[int, ...],
    boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[torch.Tensor]],
) -> Shards:
    """The ranks' boxes as parts along one axis, or AttachError saying how they fail to."""
    split = {d for (origin, extent) in boxes for d in range(len(shape)) if extent[d] != shape[d]}
    if len(split) > 1:
        raise AttachError(f"{name}: the ranks split it along several axes {sorted(split)}")
    axis = split.pop() if split else 0
    ordered = sorted(boxes.items(), key=lambda item: item[0][0][axis])
    start = 0
    for (origin, extent), _ in ordered:
        if origin[axis] != start or any(o != 0 for d, o in enumerate(origin) if d != axis):
            raise AttachError(f"{name}: the ranks' parts do not tile it (one starts at {origin})")
        start += extent[axis]
    if start != shape[axis]:
        raise AttachError(f"{name}: the ranks hold {start} of its {shape[axis]} along axis {axis}")
    parts = tuple(nn.Parameter(views[0], requires_grad=False) for _, views in ordered)
    copies = tuple(tuple(views[1:]) for _, views in ordered)
    return Shards(parts, axis, copies)


def _install(model: nn.Module, by_id: dict[int, Shards]) -> None:
    """Put each parameter's parts where the skeleton had it: the part itself when there
    is one, else a sharded module in place of each linear or embedding layer using it
    (a tied embedding and head: two modules on the same parts)."""
    for module_name, module in list(model.named_modules()):
        own = dict(module.named_parameters(recurse=False))
        split = sorted(attr for attr, p in own.items() if len(by_id[id(p)].parts) > 1)
        if not split:
            for attr, param in own.items():
                setattr(module, attr, by_id[id(param)].parts[0])
            continue
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        try:
            setattr(parent, child, _sharded(module, split, by_id))
        except ValueError as exc:  # a split the sharded modules do not compute
            raise AttachError(f"{module_name}: {exc}") from None


def _sharded(module: nn.Module, split: list[str], by_id: dict[int, Shards]) -> nn.Module:
    """The sharded module computing what `module` does, on its parameters' parts."""
    weight = by_id[id(module.weight)] if isinstance(module, nn.Linear | nn.Embedding) else None
    if type(module) is nn.Embedding and split == ["weight"] and weight is not None:
        return ShardedEmbedding(weight, module.padding_idx)
    if type(module) is nn.Linear and "weight" in split and weight is not None:
        bias = by_id[id(module.bias)] if module.bias is not None else None
        whole = bias is not None and len(bias.parts) == 1
        return ShardedLinear(weight, bias.parts[0] if whole else bias)
    raise ValueError(
        f"a {type(module).__name__} whose {split} the ranks split; tensor parallel "
        "training supports split Linear and Embedding layers, and refuses others until tested"
    )


def attach_sharded(
    model_dir: Path,
    exports: list[WeightExport],
    families: TrainableFamilies,
    weights_trained: bool,
) -> AttachedModel:
    """`model.attach` for a tensor-parallel vLLM: the model on every rank's memory."""
    importer = TensorImporter()
    first = next(iter(exports[0].params.values()))
    model = build_skeleton(model_dir, getattr(torch, first.dtype))
    held = skeleton_placements(model)
    buffers = saved_buffers(model)
    if loaded := sorted(c for c in exports[0].map if c in held and held[c].tensor in buffers):
        raise AttachError(f"{loaded}: saved buffers are refused under tensor parallelism")
    names = canonical_names(model)
    by_id: dict[int, Shards] = {}
    for key, name in names.items():
        shape = tuple(model.get_parameter(name).shape)
        by_id[key] = gather(name, shape, held, exports, importer)
    attached = classified(model, families, model_dir, held)
    attached.plan = train_plan(attached)  # on the skeleton: sizes, not where parts lie
    for params in (attached.apollo_params, attached.adamw_params):
        for name, weight in params.items():
            params[name] = by_id[id(weight)].requires_grad_(True)
    attached.shards = {name: by_id[key] for key, name in names.items()}
    _install(model, by_id)
    if leftovers := [n for n, p in model.named_parameters() if p.is_meta]:
        raise AttachError(f"parameters left without a view: {leftovers}")
    model.to(attached.shards[next(iter(attached.shards))].device)
    trainable = {id(w) for w in attached.trainable.values()}
    attached.written = sorted(
        {
            export.map[c].param
            for export in exports
            for c, placement in attached.checkpoint.items()
            if id(attached.shards[placement.tensor]) in trainable and c in export.map
        }
    )
    exempt = trainable if weights_trained else set()
    # trained weights torn by a dead trainer may differ between ranks: they are restored
    checked = {n: w for n, w in attached.shards.items() if id(w) not in exempt}
    if diverged := sorted(n for n, w in checked.items() if not w.consistent()):
        raise AttachError(f"the ranks' copies of {diverged} differ; refusing to train on them")
    verify_against_files(attached, model_dir, exempt)
    return attached
