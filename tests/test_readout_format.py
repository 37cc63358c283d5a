"""The readout folder format: a round trip, and a clear error for every way it can be wrong."""

from __future__ import annotations

import json
from re import escape as _literal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from livetrain.formats import readout_format as rf


def _units(n: int, hidden: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, hidden, generator=gen), dim=1)


def _readout(n: int = 3, hidden: int = 8, layers=(1, 3)) -> rf.Readout:
    gen = torch.Generator().manual_seed(0)
    return rf.Readout(
        concepts=[f"c{k}" for k in range(n)],
        layers=list(layers),
        detectors={i: _units(n, hidden, gen) for i in layers},
        directions={i: _units(n, hidden, gen) for i in layers},
        units={i: torch.rand(n, generator=gen) + 0.5 for i in layers},
        centres={i: torch.randn(hidden, generator=gen) for i in layers},
        calibration=rf.Calibration(
            mean={i: [0.1 * k for k in range(n)] for i in layers},
            std={i: [1.0 + k for k in range(n)] for i in layers},
            n_texts=5,
        ),
        token_calibration=rf.Calibration(
            mean={i: [0.2 * k for k in range(n)] for i in layers},
            std={i: [3.0 + k for k in range(n)] for i in layers},
            reference="neutral tokens",
            n_texts=5,
        ),
        read_position={"pooling": "mean", "start": 8},
        provenance={"model": {"path": "/m"}, "method": {"name": "pca"}},
    )


def test_round_trip(tmp_path):
    original = _readout()
    rf.save(tmp_path, original)
    loaded = rf.load(tmp_path)
    assert loaded.concepts == original.concepts and loaded.layers == original.layers
    for i in original.layers:
        for kind in ("detectors", "directions", "units"):
            assert torch.equal(getattr(loaded, kind)[i], getattr(original, kind)[i]), kind
        assert torch.equal(loaded.centres[i], original.centres[i])
    assert loaded.steerable
    assert loaded.calibration.std == original.calibration.std
    assert loaded.token_calibration.mean == original.token_calibration.mean
    assert loaded.token_calibration.reference == "neutral tokens"
    assert loaded.read_position == {"pooling": "mean", "start": 8}
    assert loaded.provenance == original.provenance
    manifest = json.loads((tmp_path / rf.MANIFEST_FILE).read_text())
    assert manifest["hidden_size"] == 8 and manifest["dtype"] == "float32"
    assert manifest["format"] == "livetrain-readout/2"
    assert not list(tmp_path.glob(".*.tmp"))


def test_readouts_without_directions_score_but_cannot_steer(tmp_path):
    readout = _readout()
    readout.directions, readout.units = {}, {}
    rf.save(tmp_path, readout)
    loaded = rf.load(tmp_path)
    assert not loaded.steerable and loaded.directions == {} and loaded.units == {}
    assert torch.equal(loaded.detectors[1], readout.detectors[1])


def test_format_1_files_load_their_vectors_as_detectors(tmp_path):
    """A folder as format 1 wrote it: `layer_<i>.vectors`, format livetrain-readout/1."""
    readout = _readout()
    rf.save(tmp_path, readout)
    tensors = {f"layer_{i}.vectors": readout.detectors[i] for i in readout.layers}
    tensors |= {f"layer_{i}.centre": readout.centres[i] for i in readout.layers}
    save_file(tensors, str(tmp_path / rf.TENSORS_FILE), metadata={"format": rf.FORMAT_1})
    _edit_manifest(tmp_path, format=rf.FORMAT_1)
    loaded = rf.load(tmp_path)
    assert not loaded.steerable
    for i in readout.layers:
        assert torch.equal(loaded.detectors[i], readout.detectors[i])
        assert torch.equal(loaded.centres[i], readout.centres[i])
    assert loaded.calibration.mean == readout.calibration.mean


def test_calibration_is_optional(tmp_path):
    readout = _readout()
    readout.calibration, readout.token_calibration, readout.centres = None, None, {}
    rf.save(tmp_path, readout)
    loaded = rf.load(tmp_path)
    assert loaded.calibration is None and loaded.token_calibration is None


def test_readouts_from_before_read_positions_read_the_last_token(tmp_path):
    rf.save(tmp_path, _readout())
    _edit_manifest(tmp_path, read_position=None)
    assert rf.load(tmp_path).read_position == {"pooling": "last", "start": 0}


def _edit_manifest(folder, **changes):
    path = folder / rf.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / rf.MANIFEST_FILE).unlink(), "readout.json: missing"),
        (lambda d: (d / rf.TENSORS_FILE).unlink(), "readout.safetensors: missing"),
        (lambda d: (d / rf.MANIFEST_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / rf.MANIFEST_FILE).write_text("[]"), "JSON object"),
        (lambda d: _edit_manifest(d, concepts=None), "missing field 'concepts'"),
        (lambda d: _edit_manifest(d, concepts=["a", "a", "b"]), "duplicates"),
        (lambda d: _edit_manifest(d, concepts=["a", "b"]), "shape (3, 8)"),
        (lambda d: _edit_manifest(d, layers=[1, 2]), "missing tensor(s) layer_2.detectors"),
        (lambda d: _edit_manifest(d, layers="1"), "'layers' must be list"),
        (lambda d: _edit_manifest(d, hidden_size=9), "hidden_size 9"),
        (lambda d: _edit_manifest(d, format="other/2"), "format 'other/2'"),
        (lambda d: _edit_manifest(d, calibration={"layers": {}}), "calibration malformed"),
        (
            lambda d: _edit_manifest(d, token_calibration={"layers": {}}),
            "token_calibration malformed",
        ),
        (lambda d: _edit_manifest(d, read_position={"pooling": "max"}), "read_position"),
        (
            lambda d: _edit_manifest(d, read_position={"pooling": "mean", "start": -1}),
            "read_position",
        ),
        (lambda d: (d / rf.TENSORS_FILE).write_bytes(b"garbage"), "unreadable"),
    ],
)
def test_damaged_folder_is_refused_with_reason(tmp_path, damage, message):
    rf.save(tmp_path, _readout())
    damage(tmp_path)
    with pytest.raises(rf.ReadoutError, match=_literal(message)):
        rf.load(tmp_path)


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("detectors", torch.ones(3, 8), "layer_3.detectors: rows must be unit vectors"),
        ("detectors", torch.full((3, 8), float("nan")), "non-finite"),
        ("detectors", F.normalize(torch.ones(3, 4), dim=1), "hidden size 4 differs"),
        ("directions", torch.ones(3, 8), "layer_3.directions: rows must be unit vectors"),
        ("directions", F.normalize(torch.ones(2, 8), dim=1), "shape (2, 8)"),
        ("units", torch.tensor([1.0, 0.0, 1.0]), "layer_3.units: must be 3 finite values > 0"),
        ("units", torch.tensor([1.0, float("inf"), 1.0]), "layer_3.units"),
        ("units", None, "units must be given exactly where directions are"),
        ("directions", None, "directions must be given for every listed layer or none"),
    ],
)
def test_bad_vectors_are_refused(tmp_path, name, tensor, message):
    readout = _readout()
    rf.save(tmp_path, readout)
    tensors = {
        f"layer_{i}.{kind}": getattr(readout, kind)[i]
        for i in readout.layers
        for kind in ("detectors", "directions", "units")
    }
    if tensor is None:
        del tensors[f"layer_3.{name}"]
    else:
        tensors[f"layer_3.{name}"] = tensor
    save_file(tensors, str(tmp_path / rf.TENSORS_FILE))
    with pytest.raises(rf.ReadoutError, match=_literal(message)):
        rf.load(tmp_path)


def test_non_positive_calibration_std_is_refused(tmp_path):
    readout = _readout()
    readout.calibration.std[1][0] = 0.0
    rf.save(tmp_path, _readout())
    _edit_manifest(
        tmp_path,
        calibration={
            "layers": {
                str(i): {"mean": readout.calibration.mean[i], "std": readout.calibration.std[i]}
                for i in readout.layers
            }
        },
    )
    with pytest.raises(rf.ReadoutError, match="std > 0"):
        rf.load(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(rf.ReadoutError, match="not a directory"):
        rf.load(tmp_path / "nope")
