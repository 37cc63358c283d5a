"""The readout folder: concept vectors per layer, as trainers write it and the plugin loads it.

Two kinds of vector per concept and layer, because one vector cannot do both jobs:
- a *detector* scores: the live readout projects activations onto it. Trainers fit it
  on whitened activations (readout/whitening.py), so it is a discriminant filter,
  dominated by low-variance dimensions: it ranks held-out text well, but its geometry
  is the filters' and adding it to the residual stream steers little.
- a *direction* is the concept as the activations carry it: the extraction method's
  own result on raw activations. Geometry (similarity, redundancy, valence) is
  computed on directions, and steering adds them, `units` times the scale asked for.

A readout is two files in one folder:
- `readout.safetensors`, per layer i: `layer_<i>.detectors` `[n_concepts, hidden]`
  float32 unit rows; `layer_<i>.directions` (same shape, unit rows) with
  `layer_<i>.units` `[n_concepts]` (> 0: the steering unit, the mean gap along the
  direction between the concept's texts and their paired negatives, read at
  `read_position`), both
  or neither; optionally `layer_<i>.centre` `[hidden]` (mean activation of the
  calibration text).
- `readout.json`: `format` (`livetrain-readout/2`), `concepts` (row order), `layers`,
  `hidden_size`, `dtype`, `read_position` (how the trainer read a text:
  `{"pooling": "last"}`, or `{"pooling": "mean", "start": k}` for the mean over its
  tokens from k on; the live readout scores whole texts the same way), provenance
  (`model`, `method`, `corpus`) and optional calibrations: `calibration`, per layer the
  mean and std of the raw detector projection `h . v` of neutral texts read at
  `read_position`, and
  `token_calibration`, the same over single tokens of neutral text (what one row of
  the live readout is), so runtime can report z-scores of both.

Layer i is the output of decoder block i (the residual stream after it, before any
final norm). `load` validates everything and raises `ReadoutError` naming the problem,
because a malformed readout must never replace a working one. Format 1 files (one
`layer_<i>.vectors` per layer, the detectors) still load, without directions: they
score as before and cannot steer.
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
FORMAT = "livetrain-readout/2"
FORMAT_1 = "livetrain-readout/1"  # detectors only, named `layer_<i>.vectors`
UNIT_TOLERANCE = 1e-3
# Readout field -> tensor name in the file (`layer_<i>.<name>`); format 1 names its
# detectors `vectors` and has no directions or units.
TENSOR_NAMES = {
    "detectors": "detectors",
    "directions": "directions",
    "units": "units",
    "centres": "centre",
}
FORMAT_1_NAMES = {"detectors": "vectors", "centres": "centre"}


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
    detectors: dict[int, torch.Tensor]  # layer -> [n_concepts, hidden] float32 unit rows
    # layer -> [n_concepts, hidden] float32 unit rows; empty for a readout without them
    directions: dict[int, torch.Tensor] = field(default_factory=dict)
    units: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_concepts] > 0
    centres: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [hidden]
    calibration: Calibration | None = None  # of texts read at read_position
    token_calibration: Calibration | None = None  # of single tokens
    read_position: dict[str, Any] = field(default_factory=lambda: dict(LAST_TOKEN))
    provenance: dict[str, Any] = field(default_factory=dict)  # model, method, corpus, ...

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.detectors.values())).shape[1])

    @property
    def steerable(self) -> bool:
        return bool(self.directions)


def save(out_dir: Path, readout: Readout) -> None:
    """Write both files (each atomically: a reader never sees half a readout file)."""
    _validate(readout)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layer_{i}.{name}": t.float().contiguous()
        for field_, name in TENSOR_NAMES.items()
        for i, t in getattr(readout, field_).items()
    }
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
    tensors = _read_tensors(folder, layers, max_bytes, manifest.get("format", FORMAT))
    provenance = {
        k: v
        for k, v in manifest.items()
        if k not in ("format", "concepts", "layers", "hidden_size", "dtype", "read_position")
        and k not in ("calibration", "token_calibration")
    }
    readout = Readout(
        concepts,
        layers,
        detectors=tensors["detectors"],
        directions=tensors.get("directions", {}),
        units=tensors.get("units", {}),
        centres=tensors["centres"],
        provenance=provenance,
    )
    readout.read_position = _read_position(manifest.get("read_position", LAST_TOKEN))
    _validate(readout)
    if readout.hidden_size != hidden:
        raise ReadoutError(
            f"readout.json: hidden_size {hidden} but detectors have {readout.hidden_size}"
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
    if manifest.get("format", FORMAT_1) not in (FORMAT, FORMAT_1):
        raise ReadoutError(
            f"{path}: format {manifest['format']!r}, expected {FORMAT!r} or {FORMAT_1!r}"
        )
    return manifest


def _field(manifest: dict[str, Any], name: str, kind: type) -> Any:
    if name not in manifest:
        raise ReadoutError(f"readout.json: missing field {name!r}")
    value = manifest[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ReadoutError(f"readout.json: {name!r} must be {kind.__name__}")
    return value


def _read_tensors(
    folder: Path, layers: list[int], max_bytes: int | None, format_: str
) -> dict[str, dict[int, torch.Tensor]]:
    """The per-layer tensors, by Readout field name."""
    path = folder / TENSORS_FILE
    if not path.is_file():
        raise ReadoutError(f"{path}: missing")
    if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
        raise ReadoutError(f"{path}: {size} bytes, over the limit of {max_bytes}")
    names = FORMAT_1_NAMES if format_ == FORMAT_1 else TENSOR_NAMES  # detectors required
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            wanted = [f"layer_{i}.{names['detectors']}" for i in layers]
            missing = [name for name in wanted if name not in keys]
            if missing:
                raise ReadoutError(f"{path}: missing tensor(s) {', '.join(missing)}")
            return {
                field_: {
                    i: f.get_tensor(f"layer_{i}.{name}")
                    for i in layers
                    if f"layer_{i}.{name}" in keys
                }
                for field_, name in names.items()
            }
    except ReadoutError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ReadoutError(f"{path}: unreadable ({e})") from None


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
    if not readout.layers:
        raise ReadoutError("a readout needs at least one layer")
    if sorted(readout.detectors) != sorted(readout.layers):
        raise ReadoutError("detectors must be given for exactly the listed layers")
    if readout.directions and sorted(readout.directions) != sorted(readout.layers):
        raise ReadoutError("directions must be given for every listed layer or none")
    if sorted(readout.units) != sorted(readout.directions):
        raise ReadoutError("units must be given exactly where directions are")
    hidden = readout.hidden_size
    for i in readout.layers:
        for kind in ("detectors", "directions"):
            if (v := getattr(readout, kind).get(i)) is not None:
                _check_unit_rows(v, f"layer_{i}.{kind}", n, hidden)
        u = readout.units.get(i)
        if u is not None and (u.shape != (n,) or not torch.isfinite(u).all() or (u <= 0).any()):
            raise ReadoutError(f"layer_{i}.units: must be {n} finite values > 0")
        c = readout.centres.get(i)
        if c is not None and (c.shape != (hidden,) or not torch.isfinite(c).all()):
            raise ReadoutError(f"layer_{i}.centre: must be finite with shape [{hidden}]")


def _check_unit_rows(v: torch.Tensor, name: str, n: int, hidden: int) -> None:
    if v.dim() != 2 or v.shape[0] != n:
        raise ReadoutError(f"{name}: shape {tuple(v.shape)}, expected [{n}, hidden]")
    if v.shape[1] != hidden:
        raise ReadoutError(f"{name}: hidden size {v.shape[1]} differs from other layers")
    if not torch.isfinite(v).all():
        raise ReadoutError(f"{name}: contains non-finite values")
    if ((v.double().norm(dim=1) - 1).abs() > UNIT_TOLERANCE).any():
        raise ReadoutError(f"{name}: rows must be unit vectors")
