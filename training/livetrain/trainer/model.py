"""Training subprocess: a Hugging Face model whose parameters are vLLM's memory.

The model is built as a skeleton with parameters on the meta device (nothing is
allocated), then every parameter is replaced by a view of the tensor vLLM serves from.
Which view is proven, not assumed: transformers' own save-time conversion, run on the
meta skeleton, says which elements of which skeleton parameter each checkpoint tensor
holds (e.g. expert 3's gate rows of a fused `gate_up_proj`); vLLM's loader said where
the same checkpoint tensor lives in its memory (the worker's `WeightExport`); a
skeleton parameter becomes the one strided view of vLLM's tensor that agrees with both
for every checkpoint tensor it holds (weight_map.assemble), or attaching fails naming
it. Tied parameters (one tensor, several names) are resolved by identity, so tied
embeddings need no special case. The checkpoint tensors themselves stay reachable as
views (`AttachedModel.checkpoint`), for the attach check, restores and sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from livetrain.checkpoint.files import list_tensors, load_tensor
from livetrain.checkpoint.lock import reading
from livetrain.config import TrainableFamilies
from livetrain.formats.messages import TensorView, TrainPlan, WeightExport
from livetrain.formats.shared_tensors import TensorImporter
from livetrain.trainer.shards import Shards, Weight
from livetrain.weight_map import (
    MappingError,
    Piece,
    Placement,
    Provenance,
    assemble,
    contiguous_strides,
    parameters_on_meta,
)

# Checkpoint tensors that are buffers some checkpoints carry, not weights.
_NOT_WEIGHTS = ("rotary_emb.inv_freq",)


class AttachError(RuntimeError):
    """The views cannot be trusted for training; the message says why."""


@dataclass
class AttachedModel:
    model: nn.Module
    apollo_params: dict[str, Weight] = field(default_factory=dict)
    adamw_params: dict[str, Weight] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    # checkpoint tensor name -> its elements inside a model parameter (by the
    # parameter's first name); what the attach check, restores and sync read and write
    checkpoint: dict[str, Placement] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)  # vLLM tensors the trainable ones live in
    # Under tensor parallelism (trainer/tensor_parallel.py): every parameter by its first
    # name as the ranks hold it, and the plan worked out before the model was split.
    shards: dict[str, Shards] = field(default_factory=dict)
    plan: TrainPlan | None = None

    @property
    def trainable(self) -> dict[str, Weight]:
        return {**self.apollo_params, **self.adamw_params}

    def checkpoint_tensor(self, name: str) -> torch.Tensor:
        """The live elements of checkpoint tensor `name`: a view into the model, or under
        tensor parallelism the ranks' parts put together (a copy, to read)."""
        placement = self.checkpoint[name]
        if self.shards:  # one-to-one parameters only (tensor_parallel.gather)
            return self.shards[placement.tensor].read()
        return placement.view(model_tensor(self.model, placement.tensor).detach())

    @torch.no_grad()
    def write_checkpoint_tensor(self, name: str, value: torch.Tensor) -> None:
        """Write `value` (cast to the served dtype) as checkpoint tensor `name`, on every
        rank that holds it."""
        if self.shards:
            owner = self.shards[self.checkpoint[name].tensor]
            owner.copy_(value.to(device=owner.device, dtype=owner.dtype))
            return
        view = self.checkpoint_tensor(name)
        view.copy_(value.to(device=view.device, dtype=view.dtype))

    def model_weights(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole values of trainable tensors, by the model's own parameter names (each
        part's, under tensor parallelism), for `functional_call`."""
        if not self.shards:
            return values
        names: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        out = {}
        for name, value in values.items():
            weight = self.trainable[name]
            assert isinstance(weight, Shards)
            for part, piece in zip(weight.parts, weight.split(value), strict=True):
                out.update(dict.fromkeys(names[id(part)], piece))
        return out

    def owner(self, name: str) -> torch.Tensor | Shards:
        """The model parameter (or saved buffer) that holds checkpoint tensor `name`."""
        if self.shards:
            return self.shards[self.checkpoint[name].tensor]
        return model_tensor(self.model, self.checkpoint[name].tensor)


def _attention(config: PretrainedConfig) -> str:
    """SDPA where it computes what vLLM computes; eager where attention logits are
    soft-capped (Gemma 2), which transformers' SDPA path cannot apply."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def build_skeleton(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(model_dir)
    with parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=_attention(config)
            )
        except ValueError:  # a family without SDPA support (gpt-oss): its eager path
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="eager"
            )
    return model.eval()


def canonical_names(model: nn.Module) -> dict[int, str]:
    """Parameter id -> its first name (tied parameters have several)."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def saved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a checkpoint holds (persistent ones: DeepSeek-V3's and GLM-4.5's router
    `e_score_correction_bias`), by name; RoPE tables and the like are not saved."""
    out = {}
    for module_name, module in model.named_modules():
        for attr, buffer in module.named_buffers(recurse=False):
            if buffer is not None and attr not in module._non_persistent_buffers_set:
                out[f"{module_name}.{attr}" if module_name else attr] = buffer
    return out


def model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or saved buffer by name."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    tensor = module._parameters.get(attr)
    return tensor if tensor is not None else module._buffers[attr]  # type: ignore[return-value]


def skeleton_placements(skeleton: nn.Module) -> dict[str, Placement]:
    """Checkpoint name -> which elements of which skeleton parameter (or saved buffer)
    it holds, from transformers' own conversion back to the checkpoint format (what
    save_pretrained runs: it splits fused experts, renames), run on the meta skeleton;
    and each parameter under its own name, as a checkpoint in transformers' own layout
    holds it. A checkpoint tensor transformers would compute from several is an
    AttachError."""
    from transformers.core_model_loading import revert_weight_conversion

    mode = Provenance()
    for name in canonical_names(skeleton).values():
        mode.track(name, skeleton.get_parameter(name))
    buffers = saved_buffers(skeleton)
    for name, buffer in buffers.items():
        mode.track(name, buffer)
    state = {n: p.detach() for n, p in skeleton.named_parameters(remove_duplicate=False)}
    state.update(buffers)
    with mode:
        converted = revert_weight_conversion(skeleton, state)  # type: ignore[arg-type]
    placements: dict[str, Placement] = {}
    for name, tensor in converted.items():
        found = mode.source_of(tensor)
        if found is None:
            raise AttachError(f"{name}: transformers builds it from several parameters")
        source, offset, strides = found
        placements[name] = Placement(source, offset, tuple(tensor.shape), strides)
    # A checkpoint saved in transformers' own layout (save_original_format=False: fused
    # experts under their parameter names) holds each parameter under its own name.
    for name, tensor in {**dict(skeleton.named_parameters()), **buffers}.items():
        shape = tuple(tensor.shape)
        placements.setdefault(name, Placement(name, 0, shape, contiguous_strides(shape)))
    return placements


def compose(
    skeleton: nn.Module, held_by: dict[str, Placement], served: dict[str, TensorView]
) -> dict[str, Placement]:
    """Skeleton parameter -> the view of vLLM's memory it must be: the one strided view
    that puts each checkpoint tensor it holds (`held_by`) where vLLM keeps that tensor
    (`served`); the same for saved buffers vLLM loads. Checkpoint tensors vLLM skips (a
    tied lm_head) do not take part."""
    shapes = {n: tuple(skeleton.get_parameter(n).shape) for n in canonical_names(skeleton).values()}
    buffers = {n: tuple(b.shape) for n, b in saved_buffers(skeleton).items()}
    pieces: dict[str, list[Piece]] = {}
    for name, held in held_by.items():
        view = served.get(name)
        if view is None:
            continue
        if tuple(view.shape) != held.shape:
            raise AttachError(f"{name}: vLLM holds {tuple(view.shape)}, transformers {held.shape}")
        pieces.setdefault(held.tensor, []).append(
            Piece(
                held.tensor,
                held.shape,
                held.offset,
                held.stride,
                view.param,
                view.offset,
                tuple(view.stride),
            )
        )
    placed: dict[str, Placement] = {}
    for name, shape in {**shapes, **{n: b for n, b in buffers.items() if n in pieces}}.items():
        if name not in pieces:
            raise AttachError(f"no vLLM tensor for Hugging Face parameter {name}")
        try:
            placed[name] = assemble(name, shape, pieces[name])
        except MappingError as exc:
            raise AttachError(
                f"{exc}: vLLM keeps it in a layout the Hugging Face model cannot compute "
                "with as a view (padded, or reordered)"
            ) from exc
    return placed


def place_views(
    model: nn.Module, placed: dict[str, Placement], export: WeightExport, importer: TensorImporter
) -> None:
    """Replace every skeleton parameter (tied ones together), and every saved buffer
    vLLM loads, by its view of vLLM's memory."""
    modules = dict(model.named_modules())
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        placement = placed[names[0]]
        view = placement.view(importer(export.params[placement.tensor]))
        param = nn.Parameter(view, requires_grad=False)
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(modules[owner], attr, param)
    for name in saved_buffers(model).keys() & placed.keys():
        owner, _, attr = name.rpartition(".")
        placement = placed[name]
        modules[owner]._buffers[attr] = placement.view(importer(export.params[placement.tensor]))
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise AttachError(f"parameters left without a view: {leftovers}")


def checkpoint_map(model_dir: Path, placements: dict[str, Placement]) -> dict[str, Placement]:
    """The placements of the tensors the files hold; every file tensor but known
    buffers must have one of the same shape."""
    held: dict[str, Placement] = {}
    for name, entry in list_tensors(model_dir).items():
        if name.endswith(_NOT_WEIGHTS):
            continue
        placement = placements.get(name)
        if placement is None:
            raise AttachError(f"checkpoint tensor {name!r} has no parameter in the model")
        if placement.shape != entry.shape:
            raise AttachError(f"{name}: the model holds {placement.shape}, the file {entry.shape}")
        held[name] = placement
    return held


def verify_against_files(attached: AttachedModel, model_dir: Path, exempt: set[int]) -> None:
    """Refuse views that differ from the checkpoint, except those held by parameters in
    `exempt` (ids): each must equal its file tensor bit for bit after casting to the
    served dtype. This is also the end-to-end check of the mapping: a view that put
    one element in the wrong place would differ from the file."""
    tensors = list_tensors(model_dir)
    with reading(model_dir, "checking the served weights"):
        for name in attached.checkpoint:
            if id(attached.owner(name)) in exempt:
                continue
            view = attached.checkpoint_tensor(name)
            on_disk = load_tensor(tensors[name]).to(device=view.device, dtype=view.dtype)
            if not torch.equal(view, on_disk):
                raise AttachError(
                    f"{name}: the served weights differ from {tensors[name].file.name}; "
                    "refusing to train on weights that do not match the model files "
                    "(vLLM may transform this tensor at load: quantisation, a permutation, "
                    "a scale)"
                )


@torch.no_grad()
def restore_weights(attached: AttachedModel, model_dir: Path) -> None:
    """Copy each trainable tensor's file value into its view (cast to the served dtype:
    bit-identical when the files hold that dtype). Frozen tensors were verified equal
    to the files at attach and never change."""
    tensors = list_tensors(model_dir)
    trainable = {id(p) for p in attached.trainable.values()}
    with reading(model_dir, "restoring the served weights"):
        for name in attached.checkpoint:
            if id(attached.owner(name)) in trainable:
                attached.write_checkpoint_tensor(name, load_tensor(tensors[name]))
    writes_landed(attached)


def writes_landed(attached: AttachedModel) -> None:
    """Return once writes into the served weights are done: on CUDA they are queued on
    the trainer's stream, and vLLM resumes generation right after the reply."""
    if next(attached.model.parameters()).is_cuda:
        torch.cuda.synchronize()


def is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm")


def decoder_blocks(model: nn.Module) -> list[str]:
    """Module names of the model's decoder blocks, in order: the longest ModuleList
    (Hugging Face's `model.layers`, whatever the family calls its stack)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(blocks))]


@contextmanager
def recomputed_blocks(model: nn.Module) -> Iterator[None]:
    """While inside: each decoder block keeps only its input for the backward pass and
    recomputes its activations there (torch.utils.checkpoint, non-reentrant, so any
    keyword arguments the family passes its blocks go through)."""
    blocks = [model.get_submodule(name) for name in decoder_blocks(model)]
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's own forward again


def _outside_blocks(model: nn.Module, layers: tuple[int, ...]) -> set[str]:
    """Module names inside decoder blocks not in `layers` (none when `layers` is empty)."""
    if not layers:
        return set()
    blocks = decoder_blocks(model)
    if missing := sorted(set(layers) - set(range(len(blocks)))):
        raise AttachError(
            f"LIVETRAIN_TRAIN_LAYERS names blocks {missing}; the model has {len(blocks)} "
            f"(0 to {len(blocks) - 1})"
        )
    return {name for i, name in enumerate(blocks) if i not in layers}


def classify(model: nn.Module, families: TrainableFamilies) -> AttachedModel:
    """Split parameters into APOLLO, AdamW and frozen.

    The `linear` family is every weight matrix that is not an embedding or a norm:
    linear layers, MoE routers, and fused experts (3-D: a matrix per expert, which
    APOLLO treats one by one); their biases train with AdamW. Other parameters (norms,
    embeddings, lm_head) follow their own families; anything else (gpt-oss's attention
    sinks, say) stays frozen. With `families.layers`, tensors of other decoder blocks
    stay frozen too."""
    out_embed = model.get_output_embeddings().weight  # type: ignore[operator]
    in_embed = model.get_input_embeddings().weight  # type: ignore[operator]
    attached = AttachedModel(model)
    frozen_blocks = _outside_blocks(model, families.layers)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{attr}" if module_name else attr
            target = attached.adamw_params
            if any(module_name == b or module_name.startswith(f"{b}.") for b in frozen_blocks):
                allowed = False
            elif param is out_embed or param is in_embed:
                allowed = (families.lm_head and param is out_embed) or (
                    families.embeddings and param is in_embed
                )
            elif is_norm(module):
                allowed = families.norms
            elif attr.endswith("bias"):
                allowed = families.linear and any(p.ndim >= 2 for p in module.parameters(False))
            elif param.ndim >= 2:
                allowed, target = families.linear, attached.apollo_params
            else:
                allowed = False
            if allowed:
                param.requires_grad_(True)
                target[name] = param
            else:
                attached.frozen.append(name)
    return attached


def classified(
    model: nn.Module,
    families: TrainableFamilies,
    model_dir: Path,
    held_by: dict[str, Placement],
    placed: dict[str, Placement] | None = None,
) -> AttachedModel:
    """`classify`, with the checkpoint tensors mapped (`held_by`) and, given where the
    parameters live in vLLM (`placed`), the vLLM tensors training writes."""
    attached = classify(model, families)
    attached.checkpoint = checkpoint_map(model_dir, held_by)
    if placed is not None:
        attached.written = sorted({placed[name].tensor for name in attached.trainable})
    return attached


def own_model(model: nn.Module, model_dir: Path, families: TrainableFamilies) -> AttachedModel:
    """A Hugging Face model with its own memory (the tests, the benchmarks), classified
    and with its checkpoint tensors mapped, as `attach` does for vLLM's memory."""
    skeleton = build_skeleton(model_dir, next(model.parameters()).dtype)
    return classified(model, families, model_dir, skeleton_placements(skeleton))


def attach(
    model_dir: Path,
    exports: list[WeightExport],
    families: TrainableFamilies,
    weights_trained: bool,
) -> AttachedModel:
    """Build the model on vLLM's memory (one rank's, `exports[0]`), classify it, verify
    it against the files.

    Once vLLM serves trained weights (`weights_trained`), the trainable tensors
    legitimately differ from the files; the frozen ones must still match.
    """
    (export,) = exports
    importer = TensorImporter()
    first = next(iter(export.params.values()))
    dtype = getattr(torch, first.dtype)
    model = build_skeleton(model_dir, dtype)
    held = skeleton_placements(model)
    placed = compose(model, held, export.map)
    place_views(model, placed, export, importer)
    device = next(model.parameters()).device
    model.to(device)  # buffers (RoPE tables) follow the weights' device
    attached = classified(model, families, model_dir, held, placed)
    exempt = {id(p) for p in attached.trainable.values()} if weights_trained else set()
    verify_against_files(attached, model_dir, exempt)
    return attached
