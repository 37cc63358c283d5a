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

from livetrain.formats.messages import CheckpointTensor

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class FileTensor:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the tensor's data in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as torch names it; ValueError for one torch cannot hold (e.g. the
        packed 4-bit and 8-bit float codes of quantised checkpoints)."""
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.name}: safetensors dtype {self.dtype} is not a plain tensor")
        return SAFETENSORS_DTYPES[self.dtype]


def is_plain_weight_name(name: object) -> bool:
    """A file name (no directory part) of a .safetensors file."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and "\0" not in name
    )


def safetensors_files(model_dir: Path) -> list[Path]:
    """The model's weight files, as listed by the index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in names:  # the files are written in place: never outside the folder
            if not is_plain_weight_name(name):
                raise ValueError(f"{index}: {name!r} is not a .safetensors file in the folder")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and where its data section starts.

    Layout: an 8-byte little-endian header length, the JSON header, then the data;
    tensor `data_offsets` are relative to the data section.
    """
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def list_tensors(model_dir: Path) -> dict[str, FileTensor]:
    """Every tensor in the model directory, keyed by its Hugging Face name."""
    tensors: dict[str, FileTensor] = {}
    for path in safetensors_files(model_dir):
        header, data_start = read_header(path)
        for name, info in header.items():
            begin, end = (data_start + offset for offset in info["data_offsets"])
            tensors[name] = FileTensor(name, path, info["dtype"], tuple(info["shape"]), begin, end)
    return tensors


def quantized(model_dir: Path, engine_quantization: str | None = None) -> str | None:
    """Why the model's weights are not real tensors training can step (a quantised
    checkpoint, or vLLM quantising at load), or None when they are."""
    if model_dir.suffix == ".gguf":
        return "the model is a GGUF file: training needs a folder of safetensors weights"
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method or engine_quantization:
        return (
            f"the model is quantised ({method or engine_quantization}): training needs the "
            "real weights; serve an unquantised (bf16, fp16 or fp32) checkpoint"
        )
    return None


def checkpoint_tensors(model_dir: Path) -> list[CheckpointTensor]:
    """Every tensor's name, shape and torch dtype, for vLLM's loader to place; a file
    dtype torch cannot hold (a quantised format) raises ValueError naming the tensor."""
    return [
        CheckpointTensor(name, list(t.shape), str(t.torch_dtype).removeprefix("torch."))
        for name, t in list_tensors(model_dir).items()
    ]


def load_tensor(entry: FileTensor) -> torch.Tensor:
    with safe_open(str(entry.file), framework="pt") as f:
        return f.get_tensor(entry.name)


def fingerprint(model_dir: Path) -> dict[str, list[int]]:
    """Size and modification time of each weight file: cheap, and any rewrite changes it."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in safetensors_files(model_dir)}
