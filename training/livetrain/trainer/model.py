"""Training subprocess: a Hugging Face model whose parameters are vLLM's memory.

The model is built as a skeleton with parameters on the meta device (nothing is
allocated), then every parameter is replaced by a row view of the tensor vLLM
serves from. Tied parameters (one tensor, several names) are resolved by identity
in the skeleton, so tied embeddings need no special case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from livetrain.checkpoint.files import list_tensors, load_tensor
from livetrain.config import TrainableFamilies
from livetrain.formats.messages import WeightExport
from livetrain.formats.shared_tensors import TensorImporter


class AttachError(RuntimeError):
    """The views cannot be trusted for training; the message says why."""


@dataclass
class AttachedModel:
    model: nn.Module
    apollo_params: dict[str, nn.Parameter] = field(default_factory=dict)
    adamw_params: dict[str, nn.Parameter] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        return {**self.apollo_params, **self.adamw_params}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Construct modules with meta parameters but real buffers (e.g. RoPE tables)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        # Already-meta parameters are being re-registered (weight tying): keep identity.
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(model_dir)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def place_views(model: nn.Module, export: WeightExport, importer: TensorImporter) -> None:
    """Replace every skeleton parameter by its view into vLLM's memory, or fail."""
    mapping = export.map
    modules = dict(model.named_modules())
    for names in _tied_groups(model):
        sources = [n for n in names if n in mapping]
        if not sources:
            raise AttachError(f"no vLLM tensor for Hugging Face parameter(s) {names}")
        entry = mapping[sources[0]]
        full = importer(export.params[entry.param])
        view = full[entry.start : entry.stop]
        expected = model.get_parameter(names[0]).shape
        if view.shape != expected:
            raise AttachError(f"{sources[0]}: vLLM view {tuple(view.shape)} != {tuple(expected)}")
        param = nn.Parameter(view, requires_grad=False)
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(modules[owner], attr, param)
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise AttachError(f"parameters left without a view: {leftovers}")


def verify_against_files(model: nn.Module, model_dir: Path, exempt: set[int]) -> None:
    """Refuse views that differ from the checkpoint, except parameters in `exempt` (ids).

    Every checkpoint tensor must name a model parameter of the same shape, and each
    non-exempt parameter must equal its file tensor bit for bit after casting to the
    served dtype.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, entry in list_tensors(model_dir).items():
        if name not in params:
            if name.endswith("inv_freq"):
                continue  # legacy RoPE cache some checkpoints carry; a buffer, not a weight
            raise AttachError(f"checkpoint tensor {name!r} has no parameter in the model")
        view = params[name].detach()
        if tuple(view.shape) != entry.shape:
            raise AttachError(f"{name}: served shape {tuple(view.shape)} != file {entry.shape}")
        if id(params[name]) in exempt:
            continue
        on_disk = load_tensor(entry).to(device=view.device, dtype=view.dtype)
        if not torch.equal(view, on_disk):
            raise AttachError(
                f"{name}: the served weights differ from {entry.file.name}; "
                "refusing to train on weights that do not match the model files"
            )


@torch.no_grad()
def restore_weights(attached: AttachedModel, model_dir: Path) -> None:
    """Copy each trainable tensor's file value into its view (cast to the served dtype:
    bit-identical when the files hold that dtype). Frozen tensors were verified equal
    to the files at attach and never change."""
    params = dict(attached.model.named_parameters(remove_duplicate=False))
    trainable = {id(p) for p in attached.trainable.values()}
    for name, entry in list_tensors(model_dir).items():
        param = params.get(name)
        if param is not None and id(param) in trainable:
            param.copy_(load_tensor(entry).to(device=param.device, dtype=param.dtype))
    writes_landed(attached)


def writes_landed(attached: AttachedModel) -> None:
    """Return once writes into the served weights are done: on CUDA they are queued on
    the trainer's stream, and vLLM resumes generation right after the reply."""
    if next(attached.model.parameters()).is_cuda:
        torch.cuda.synchronize()


def classify(model: nn.Module, families: TrainableFamilies) -> AttachedModel:
    """Split parameters into APOLLO (2-D linear), AdamW (other trainables), frozen."""
    out_embed = model.get_output_embeddings().weight  # type: ignore[operator]
    in_embed = model.get_input_embeddings().weight  # type: ignore[operator]
    attached = AttachedModel(model)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{attr}" if module_name else attr
            if param is out_embed or param is in_embed:
                allowed = (families.lm_head and param is out_embed) or (
                    families.embeddings and param is in_embed
                )
                target = attached.adamw_params
            elif isinstance(module, nn.Linear):
                allowed = families.linear
                target = attached.apollo_params if param.ndim == 2 else attached.adamw_params
            elif type(module).__name__.endswith("Norm"):
                allowed, target = families.norms, attached.adamw_params
            else:
                allowed, target = False, attached.adamw_params
            if allowed:
                param.requires_grad_(True)
                target[name] = param
            else:
                attached.frozen.append(name)
    return attached


def attach(
    model_dir: Path, export: WeightExport, families: TrainableFamilies, weights_trained: bool
) -> AttachedModel:
    """Build the model on vLLM's memory, classify it, verify it against the files.

    Once vLLM serves trained weights (`weights_trained`), the trainable tensors
    legitimately differ from the files; the frozen ones must still match.
    """
    importer = TensorImporter()
    first = next(iter(export.params.values()))
    dtype = getattr(torch, first.dtype)
    model = build_skeleton(model_dir, dtype)
    place_views(model, export, importer)
    device = next(model.parameters()).device
    model.to(device)  # buffers (RoPE tables) follow the weights' device
    attached = classify(model, families)
    exempt = {id(p) for p in attached.trainable.values()} if weights_trained else set()
    verify_against_files(model, model_dir, exempt)
    return attached
