"""`livetrain check MODEL`: will this model train in place, and what will it take?

Needs no server and reads no weights. It reads the config and the safetensors headers,
builds vLLM's model class for the folder on the meta device, runs vLLM's own loader on
meta probes to see where each checkpoint tensor would live (what the worker does at
start), builds the Hugging Face skeleton and proves each of its parameters is a view of
that memory (what the trainer does at attach), and classifies the parameters as the
trainer would. So it agrees with the server by construction: the server runs the same
functions on the real model. Exit status 0 when the model can train, 1 with the reason
when it cannot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livetrain.config import TrainableFamilies
from livetrain.formats.messages import CheckpointTensor, TrainPlan
from livetrain.weight_map import Placement


@dataclass
class CheckReport:
    model: str
    architecture: str | None = None
    dtype: str | None = None
    plan: TrainPlan | None = None
    written: list[str] = field(default_factory=list)  # vLLM tensors training writes
    dropped: list[str] = field(default_factory=list)  # checkpoint tensors vLLM skips
    blockers: list[str] = field(default_factory=list)
    tensors: list[CheckpointTensor] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.blockers


def check(
    models: list[Path], dtype: str = "auto", families: TrainableFamilies | None = None
) -> list[CheckReport]:
    """Everything the server would decide about training each model, without one.

    The Hugging Face side of every model is built first: vLLM serves some families
    through its Transformers backend, which changes transformers' classes in place
    once it has built such a model (vllm_internals.build_meta_model)."""
    if families is None:
        from livetrain.config import plugin_config

        families = plugin_config().train  # the server's: LIVETRAIN_TRAIN_*
    reports = [_read(model) for model in models]
    skeletons = [
        _skeleton(model, report) if report.ok else None
        for model, report in zip(models, reports, strict=True)
    ]
    for model, report, skeleton in zip(models, reports, skeletons, strict=True):
        if skeleton is not None:
            _against_vllm(model, dtype, families, report, *skeleton)
    return reports


def _read(model_dir: Path) -> CheckReport:
    """The folder's own blockers: a quantised or unreadable checkpoint."""
    from livetrain.checkpoint.files import checkpoint_tensors, quantized

    report = CheckReport(str(model_dir))
    config_path = model_dir / "config.json"
    if config_path.is_file():
        report.architecture = (json.loads(config_path.read_text()).get("architectures") or [None])[
            0
        ]
    reason = quantized(model_dir)
    if reason is None:
        try:
            report.tensors = checkpoint_tensors(model_dir)
        except (OSError, ValueError) as exc:
            reason = f"the checkpoint cannot be read as plain tensors: {exc}"
    if reason is not None:
        report.blockers.append(reason)
    return report


def _skeleton(model_dir: Path, report: CheckReport) -> tuple[Any, dict[str, Placement]] | None:
    """The trainer's meta skeleton and which of its elements each checkpoint tensor is."""
    import torch

    from livetrain.trainer import model as trainer_model

    try:
        skeleton = trainer_model.build_skeleton(model_dir, torch.float32)
        return skeleton, trainer_model.skeleton_placements(skeleton)
    except Exception as exc:  # transformers cannot build it, or AttachError
        report.blockers.append(f"the trainer cannot build this model: {exc}")
        return None


def _against_vllm(
    model_dir: Path,
    dtype: str,
    families: TrainableFamilies,
    report: CheckReport,
    skeleton: Any,
    held: dict[str, Placement],
) -> None:
    """vLLM's placements of the checkpoint, the skeleton composed onto them, the plan."""
    from livetrain import vllm_internals
    from livetrain.trainer import model as trainer_model
    from livetrain.trainer.plan import train_plan
    from livetrain.weight_map import MappingError
    from livetrain.worker.export import served_views

    try:
        served = vllm_internals.build_meta_model(str(model_dir), dtype)
        served_dtype = next(served.parameters()).dtype
        views, report.dropped = served_views(served, report.tensors)
    except MappingError as exc:
        report.blockers.append(f"vLLM's loader does not keep these tensors as they are: {exc}")
        return
    except Exception as exc:  # vLLM could not build the model: it would not serve it either
        reason = " ".join(str(exc).split())[:400]
        report.blockers.append(f"vLLM {_vllm_version()} cannot build this model: {reason}")
        return
    report.dtype = str(served_dtype).removeprefix("torch.")
    try:
        skeleton.to(served_dtype)
        placed = trainer_model.compose(skeleton, held, views)
        attached = trainer_model.classified(skeleton, families, model_dir, held, placed)
    except trainer_model.AttachError as exc:
        report.blockers.append(f"the trainer cannot attach: {exc}")
        return
    report.written, report.plan = attached.written, train_plan(attached)


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def render(report: CheckReport) -> str:
    """The report as a person reads it."""
    lines = [f"model: {report.model}", f"architecture: {report.architecture or 'unknown'}"]
    if report.plan is not None:
        plan = report.plan
        lines.append(f"served dtype: {plan.dtype}")
        lines.append("tensors:")
        for group in plan.groups:
            lines.append(
                f"  {group.kind:<11} {group.optimizer:<7} {group.tensors:>5} tensors "
                f"{group.params:>14,} params {_size(group.bytes):>10}"
            )
        gradients = (
            f"gradients {_size(plan.gradient_bytes)} (per-layer steps: one tensor's at a time, "
            f"at most {_size(plan.largest_gradient_bytes)})"
        )
        lines.append(
            f"trains {_size(plan.trainable_bytes)} of weights in place; memory beside the "
            f"served weights: {gradients}, optimizer state "
            f"{_size(plan.optimizer_bytes)} (APOLLO rank {plan.rank}), activations per "
            f"step, of which logits {_size(plan.logits_bytes_per_token)} per token"
        )
        lines.append(f"vLLM tensors written: {len(report.written)}")
    if report.dropped:
        lines.append(f"checkpoint tensors vLLM does not load: {', '.join(report.dropped)}")
    for blocker in report.blockers:
        lines.append(f"BLOCKER: {blocker}")
    lines.append("result: " + ("trains in place" if report.ok else "cannot train"))
    return "\n".join(lines)


def as_json(report: CheckReport) -> str:
    import msgspec

    data = asdict(report)
    data.pop("tensors")
    data["plan"] = msgspec.to_builtins(report.plan) if report.plan else None
    data["ok"] = report.ok
    return json.dumps(data, indent=2)
