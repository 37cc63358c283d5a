"""Read a Hugging Face model directory's safetensors: names, layout, tensors.

The trainer checks its weight views against these files at attach time, and the
API server sends the names to the worker so vLLM's own loader tables decide where
each one lives. Only headers are parsed unless a tensor is asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


@dataclass(frozen=True)
class FileTensor:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"
    shape: tuple[int, ...]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The model's weight files, as listed by the index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file (8-byte length prefix, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def list_tensors(model_dir: Path) -> dict[str, FileTensor]:
    """Every tensor in the model directory, keyed by its Hugging Face name."""
    tensors: dict[str, FileTensor] = {}
    for path in safetensors_files(model_dir):
        for name, info in read_header(path).items():
            tensors[name] = FileTensor(name, path, info["dtype"], tuple(info["shape"]))
    return tensors


def load_tensor(entry: FileTensor) -> torch.Tensor:
    with safe_open(str(entry.file), framework="pt") as f:
        return f.get_tensor(entry.name)
