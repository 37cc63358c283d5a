"""The readout folder: concept directions per layer, as trainers write it and the plugin loads it.

A readout is two files in one folder:
- `readout.safetensors`: `layer_<i>.vectors` `[n_concepts, hidden]` float32 unit rows
  for each layer i, and optionally `layer_<i>.centre` `[hidden]` (mean activation of
  the calibration text).
- `readout.json`: `concepts` (row order), `layers`, `hidden_size`, `dtype`,
  `read_position` (how the trainer read a text: `{"pooling": "last"}`, or
  `{"pooling": "mean", "start": k}` for the mean over its tokens from k on; the live
  readout scores whole texts the same way), provenance (`model`, `method`, `corpus`)
  and optional calibrations: `calibration`, per layer the mean and std of the raw
  projection `h . v` of neutral texts read at `read_position`, and
  `token_calibration`, the same over single tokens of neutral text (what one row of
  the live readout is), so runtime can report z-scores of both.

Layer i is the output of decoder block i (the residual stream after it, before any
final norm). `load` validates everything and raises `ReadoutError` naming the problem,
because a malformed readout must never replace a working one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TENSORS_FILE = "readout.safetensors"
MANIFEST_FILE = "readout.json"
FORMAT = "livetrain-readout/1"
UNIT_TOLERANCE = 1e-3


class ReadoutError(ValueError):
    """A readout folder that cannot be used, with the reason."""


@dataclass
class Calibration:
    """Per layer: mean and std of the raw projection on reference text, one per concept."""

    mean: dict[int, list[float]]
    std: dict[int, list[float]]
    reference: str = "neutral"
    n_texts: int = 0


LAST_TOKEN = {"pooling": "last", "start": 0}  # how readouts without the field were read


@dataclass
class Readout:
    concepts: list[str]
    layers: list[int]
    vectors: dict[int, torch.Tensor]  # layer -> [n_concepts, hidden] float32 unit rows
    centres: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [hidden]
    calibration: Calibration | None = None  # of texts read at read_position
    token_calibration: Calibration | None = None  # of single tokens
    read_position: dict[str, Any] = field(default_factory=lambda: dict(LAST_TOKEN))
    provenance: dict[str, Any] = field(default_factory=dict)  # model, method, corpus, ...

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1])


def save(out_dir: Path, readout: Readout) -> None:
    """Write both files (each atomically: a reader never sees half a readout file)."""
    _validate(readout)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layer_{i}.vectors": readout.vectors[i].float().contiguous() for i in readout.layers
    }
    tensors.update(
        {f"layer_{i}.centre": c.float().contiguous() for i, c in readout.centres.items()}
    )
    tmp = out_dir / f".{TENSORS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out_dir / TENSORS_FILE)
    manifest = {
        "format": FORMAT,
        "concepts": readout.concepts,
        "layers": readout.layers,
        "hidden_size": readout.hidden_size,
        "dtype": "float32",
        "read_position": readout.read_position,
        **readout.provenance,
    }
    for key, cal in (
        ("calibration", readout.calibration),
        ("token_calibration", readout.token_calibration),
    ):
        if cal is not None:
            manifest[key] = {
                "reference": cal.reference,
                "n_texts": cal.n_texts,
                "layers": {
                    str(i): {"mean": cal.mean[i], "std": cal.std[i]} for i in readout.layers
                },
            }
    tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST_FILE)


def load(folder: Path, max_bytes: int | None = None) -> Readout:
    """Read and validate a readout folder; raise ReadoutError on anything wrong
    (including tensors over `max_bytes`, checked before any is read)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    concepts = _field(manifest, "concepts", list)
    layers = _field(manifest, "layers", list)
    hidden = _field(manifest, "hidden_size", int)
    if not concepts or not all(isinstance(c, str) and c for c in concepts):
        raise ReadoutError("readout.json: concepts must be a non-empty list of names")
    if len(set(concepts)) != len(concepts):
        raise ReadoutError("readout.json: concepts has duplicates")
    if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise ReadoutError("readout.json: layers must be a non-empty list of layer indices")
    vectors, centres = _read_tensors(folder, layers, max_bytes)
    provenance = {
        k: v
        for k, v in manifest.items()
        if k not in ("format", "concepts", "layers", "hidden_size", "dtype", "read_position")
        and k not in ("calibration", "token_calibration")
    }
    readout = Readout(concepts, layers, vectors, centres, provenance=provenance)
    readout.read_position = _read_position(manifest.get("read_position", LAST_TOKEN))
    _validate(readout)
    if readout.hidden_size != hidden:
        raise ReadoutError(
            f"readout.json: hidden_size {hidden} but vectors have {readout.hidden_size}"
        )
    readout.calibration = _calibration(manifest, "calibration", layers, len(concepts))
    readout.token_calibration = _calibration(manifest, "token_calibration", layers, len(concepts))
    return readout


def check_fits(readout: Readout, hidden_size: int, captured: Sequence[int]) -> None:
    """Refuse a readout the server cannot score: another model's width, or layers whose
    outputs were not captured at launch (they are fixed then, by the compiled graph)."""
    if readout.hidden_size != hidden_size:
        raise ReadoutError(
            f"hidden size {readout.hidden_size} does not match the model's {hidden_size}"
        )
    if missing := set(readout.layers) - set(captured):
        raise ReadoutError(
            f"layers {sorted(missing)} were not captured at launch (captured: "
            f"{sorted(captured)}; set LIVETRAIN_READOUT_LAYERS at launch to capture more)"
        )


def _read_position(value: Any) -> dict[str, Any]:
    ok = isinstance(value, dict) and value.get("pooling") in ("last", "mean")
    start = value.get("start", 0) if ok else None
    if not ok or not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ReadoutError(
            'readout.json: read_position must be {"pooling": "last"} or '
            '{"pooling": "mean", "start": k >= 0}'
        )
    return {"pooling": value["pooling"], "start": start if value["pooling"] == "mean" else 0}


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ReadoutError(f"{folder}: not a directory")
    if not path.is_file():
        raise ReadoutError(f"{path}: missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReadoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ReadoutError(f"{path}: must hold a JSON object")
    if manifest.get("format", FORMAT) != FORMAT:
        raise ReadoutError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    return manifest


def _field(manifest: dict[str, Any], name: str, kind: type) -> Any:
    if name not in manifest:
        raise ReadoutError(f"readout.json: missing field {name!r}")
    value = manifest[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ReadoutError(f"readout.json: {name!r} must be {kind.__name__}")
    return value


def _read_tensors(
    folder: Path, layers: list[int], max_bytes: int | None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    path = folder / TENSORS_FILE
    if not path.is_file():
        raise ReadoutError(f"{path}: missing")
    if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
        raise ReadoutError(f"{path}: {size} bytes, over the limit of {max_bytes}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [f"layer_{i}.vectors" for i in layers if f"layer_{i}.vectors" not in keys]
            if missing:
                raise ReadoutError(f"{path}: missing tensor(s) {', '.join(missing)}")
            vectors = {i: f.get_tensor(f"layer_{i}.vectors") for i in layers}
            centres = {
                i: f.get_tensor(f"layer_{i}.centre") for i in layers if f"layer_{i}.centre" in keys
            }
    except ReadoutError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ReadoutError(f"{path}: unreadable ({e})") from None
    return vectors, centres


def _calibration(
    manifest: dict[str, Any], key: str, layers: list[int], n: int
) -> Calibration | None:
    cal = manifest.get(key)
    if cal is None:
        return None
    try:
        per_layer = cal["layers"]
        mean = {i: [float(x) for x in per_layer[str(i)]["mean"]] for i in layers}
        std = {i: [float(x) for x in per_layer[str(i)]["std"]] for i in layers}
    except (KeyError, TypeError, ValueError) as e:
        raise ReadoutError(f"readout.json: {key} malformed ({e!r})") from None
    for i in layers:
        if len(mean[i]) != n or len(std[i]) != n:
            raise ReadoutError(f"readout.json: {key} for layer {i} must have {n} values")
        if not all(math.isfinite(m) for m in mean[i]) or not all(
            math.isfinite(s) and s > 0 for s in std[i]
        ):
            raise ReadoutError(f"readout.json: {key} for layer {i} must be finite, std > 0")
    return Calibration(mean, std, str(cal.get("reference", "neutral")), int(cal.get("n_texts", 0)))


def _validate(readout: Readout) -> None:
    n = len(readout.concepts)
    if sorted(readout.vectors) != sorted(readout.layers):
        raise ReadoutError("vectors must be given for exactly the listed layers")
    hidden = None
    for i in readout.layers:
        v = readout.vectors[i]
        name = f"layer_{i}.vectors"
        if v.dim() != 2 or v.shape[0] != n:
            raise ReadoutError(f"{name}: shape {tuple(v.shape)}, expected [{n}, hidden]")
        if hidden is not None and v.shape[1] != hidden:
            raise ReadoutError(f"{name}: hidden size {v.shape[1]} differs from other layers")
        hidden = v.shape[1]
        if not torch.isfinite(v).all():
            raise ReadoutError(f"{name}: contains non-finite values")
        norms = v.double().norm(dim=1)
        if ((norms - 1).abs() > UNIT_TOLERANCE).any():
            raise ReadoutError(f"{name}: rows must be unit vectors")
        c = readout.centres.get(i)
        if c is not None and (c.shape != (hidden,) or not torch.isfinite(c).all()):
            raise ReadoutError(f"layer_{i}.centre: must be finite with shape [{hidden}]")
