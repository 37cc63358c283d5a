"""Offline tool: the steps every direction trainer shares, from corpus to readout folder.

A trainer supplies only its extraction method, a `Method`: given the recorded
activations of one layer and one concept's (positive, negative) pairs, a unit direction
(plus any method-specific diagnostics for quality.json). Everything else
(flags, corpus, pairing, the single forward pass per text, calibration, the readout
files, the quality report and its plots) is here, so both trainers write the same format
and are judged by the same report.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livetrain.formats import readout_format
from livetrain.tools.default_model import DEFAULT_MODEL_DIR, MODEL_NAME, ensure_default_model
from readout import activations, corpus, dataset, evaluation, plots, quality
from readout.whitening import Whitener

# Chosen on held-out stories of the real model (research/concept-extraction.md).
DEFAULT_READ_POSITION = activations.ReadPosition("mean", 4)
DEFAULT_SHRINKAGE = None  # Ledoit-Wolf, per layer (readout/whitening.py)
UNIT_FLOOR = 1e-6  # smallest steering unit written (readout_format: units > 0)
# (recorded activations, layer, one concept's pairs) -> (unit direction [hidden], diagnostics)
Direction = Callable[[activations.Recorded, int, list[tuple[int, int]]], tuple[Tensor, dict]]


@dataclass
class Method:
    name: str  # goes into readout.json
    settings: dict  # ditto: what reproduces the run
    direction: Direction
    needs_tokens: bool = False  # record every token's activation (subspace methods)
    # Fit in whitened space (readout/whitening.py). Off for methods whose direction means
    # something in raw coordinates: a sparse one (L1) would come back dense.
    whiten: bool = True


@dataclass
class Fit:
    """One concept at one layer: what scores it and what it is (readout_format.py)."""

    detector: Tensor  # unit, fitted in whitened space and mapped back (or = direction)
    direction: Tensor  # unit, the method's result on raw activations
    extra: dict  # the method's diagnostics, of the detector's fit


@dataclass
class Fitter:
    """A method applied twice: in whitened space (when it whitens), mapped back, for the
    detector, and on raw activations for the direction. The whitener is fitted on every
    training text once per layer, so cross-validated refits (quality.py) share it: they
    leave a text out of the detector only."""

    method: Method
    raw: activations.Recorded
    recorded: activations.Recorded  # as the detector's fit sees it (whitened when whitening)
    whiteners: dict[int, Whitener]

    @classmethod
    def of(
        cls, method: Method, rec: activations.Recorded, ts, layers, shrink: float | None
    ) -> Fitter:
        """`shrink`: None for the Ledoit-Wolf estimate, 1 for no whitening."""
        if shrink == 1.0 or not method.whiten:
            return cls(method, rec, rec, {})
        groups = [ts.positives[c] for c in ts.concepts] + [ts.neutral]
        whiteners = {i: Whitener.fit(rec.acts[i], groups, shrink) for i in layers}
        reads = {p: {i: whiteners[i].apply(a[i]) for i in layers} for p, a in rec.reads.items()}
        return cls(method, rec, dataclasses.replace(rec, reads=reads), whiteners)

    def detector(self, layer: int, pairs: list[tuple[int, int]]) -> tuple[Tensor, dict]:
        w, extra = self.method.direction(self.recorded, layer, pairs)
        whitener = self.whiteners.get(layer)
        return (whitener.back(w) if whitener else F.normalize(w.float(), dim=0)), extra

    def fit(self, layer: int, pairs: list[tuple[int, int]]) -> Fit:
        detector, extra = self.detector(layer, pairs)
        if not self.whiteners:
            return Fit(detector, detector, extra)
        direction, _ = self.method.direction(self.raw, layer, pairs)
        return Fit(detector, F.normalize(direction.float(), dim=0), extra)


@dataclass
class Run:
    out: Path
    readout: readout_format.Readout
    training_set: dataset.TrainingSet
    recorded: activations.Recorded
    seconds: dict[str, float] = field(default_factory=dict)
    report: dict | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"Hugging Face model folder (default: the built-in {MODEL_NAME}, "
        f"converted into {DEFAULT_MODEL_DIR} on first use)",
    )
    parser.add_argument(
        "--stories",
        type=Path,
        default=corpus.DEFAULT_ROOT,
        help="story corpus root (default: amygdala_stories/)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: readout_out/<model>-<method>)",
    )
    parser.add_argument(
        "--layers",
        type=_layer_list,
        default=None,
        help="comma-separated decoder block indices; layer i is block i's output "
        "(default: 40/50/60/70%% of depth)",
    )
    parser.add_argument(
        "--read-position",
        type=_read_position,
        default=DEFAULT_READ_POSITION,
        help="where a text is read: last (token), mean (over all tokens) or mean:K (over "
        f"tokens K..); default {DEFAULT_READ_POSITION}",
    )
    parser.add_argument(
        "--shrinkage",
        type=_shrinkage,
        default=DEFAULT_SHRINKAGE,
        help="fit directions on activations whitened by the within-concept covariance, "
        "shrunk this far toward the identity: auto (Ledoit-Wolf, the default), or a "
        "number in [0, 1] (1: no whitening)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the pairing")
    parser.add_argument("--negatives-per-positive", type=int, default=4)
    parser.add_argument(
        "--quality-report",
        action="store_true",
        help="write quality.json and PNG plots, and print a triage",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype for the forward passes (aggregation is always fp32)",
    )


def _read_position(text: str) -> activations.ReadPosition:
    try:
        return activations.ReadPosition.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shrinkage(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be auto or a number in [0, 1]: {text!r}")
    return value


def _layer_list(text: str) -> list[int]:
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not layers or layers[0] < 0:
        raise argparse.ArgumentTypeError("layers must be non-negative integers")
    return layers


def load_model(
    path: Path, device: str = "auto", dtype: str = "float32"
) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(path))


def corpus_hash(root: Path) -> str:
    """sha256 over every corpus file's relative path and bytes: names the exact corpus used."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".json")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run(args: argparse.Namespace, method: Method, progress: bool = True) -> Run:
    """Corpus -> pairs -> one forward per text -> directions -> readout folder (+ report)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model_path = args.model or ensure_default_model()
    training_set = dataset.build(corpus.load(args.stories), args.seed, args.negatives_per_positive)
    model, tokenizer = load_model(model_path, args.device, args.dtype)
    n_layers = model.config.num_hidden_layers
    layers = args.layers or activations.default_layers(n_layers)
    if layers[-1] >= n_layers:
        raise SystemExit(f"--layers: the model has {n_layers} decoder blocks (0..{n_layers - 1})")
    out = args.out or Path("readout_out") / f"{Path(model_path).name}-{method.name}"
    seconds["setup"] = time.perf_counter() - started

    recorded = activations.record(
        model,
        tokenizer,
        [t.text for t in training_set.texts],
        layers,
        [args.read_position],
        args.batch_size,
        heads=args.quality_report,
        tokens=method.needs_tokens,
        moments_of=set(training_set.neutral),
        progress=progress,
    )
    seconds["forward"] = recorded.forward_seconds
    started = time.perf_counter()
    fitter = Fitter.of(method, recorded, training_set, layers, args.shrinkage)
    concepts = training_set.concepts
    fits = {i: [fitter.fit(i, training_set.pairs[c]) for c in concepts] for i in layers}
    for i, row in fits.items():
        for concept, fit in zip(concepts, row, strict=True):
            for vector in (fit.detector, fit.direction):
                if not torch.isfinite(vector).all() or vector.norm() == 0:
                    raise SystemExit(f"{method.name}: no direction for {concept!r} at layer {i}")
    detectors = {i: torch.stack([f.detector for f in row]).float() for i, row in fits.items()}
    directions = {i: torch.stack([f.direction for f in row]).float() for i, row in fits.items()}
    extra = {c: {i: fits[i][k].extra for i in layers} for k, c in enumerate(concepts)}
    seconds["directions"] = time.perf_counter() - started
    readout = readout_format.Readout(
        concepts=concepts,
        layers=layers,
        detectors=detectors,
        directions=directions,
        units=_steering_units(training_set, recorded, directions),
        **_calibration(training_set, recorded, detectors),
        read_position=args.read_position.describe(),
        provenance=_provenance(model, model_path, fitter, args, training_set),
    )
    readout_format.save(out, readout)
    result = Run(out, readout, training_set, recorded, seconds)
    if args.quality_report:
        started = time.perf_counter()
        result.report = write_quality(result, model, fitter, extra)
        seconds["quality"] = time.perf_counter() - started
    return result


def _steering_units(
    ts: dataset.TrainingSet, rec: activations.Recorded, directions: dict[int, Tensor]
) -> dict[int, Tensor]:
    """Per layer and concept: the mean gap along the direction between the concept's
    texts and their paired negatives, read at the read position, the unit of a steering
    scale. Positive by construction of every method (each orients its direction along
    the pairs' mean difference); floored so a degenerate concept cannot divide by 0."""
    units = {}
    for i, d in directions.items():
        gaps = []
        for k, c in enumerate(ts.concepts):
            pos, neg = pair_rows(ts.pairs[c])
            delta = rec.acts[i][pos].double().mean(dim=0) - rec.acts[i][neg].double().mean(dim=0)
            gaps.append(delta @ d[k].double())
        units[i] = torch.stack(gaps).clamp_min(UNIT_FLOOR).float()
    return units


def _calibration(
    ts: dataset.TrainingSet, rec: activations.Recorded, vectors: dict[int, Tensor]
) -> dict:
    """Centre and per-concept detector projection statistics on neutral prose, for
    runtime z-scores: of whole texts read at the read position, and of single tokens (what one
    row of the live readout is)."""
    if len(ts.neutral) < 2:
        return {}
    rows = torch.tensor(ts.neutral)
    centres = {i: rec.acts[i][rows].mean(dim=0) for i in vectors}
    scores = {i: rec.acts[i][rows].double() @ vectors[i].double().T for i in vectors}
    out = {
        "centres": centres,
        "calibration": readout_format.Calibration(
            mean={i: s.mean(dim=0).tolist() for i, s in scores.items()},
            std={i: s.std(dim=0).clamp_min(1e-12).tolist() for i, s in scores.items()},
            reference="neutral",
            n_texts=len(ts.neutral),
        ),
    }
    if rec.token_moments:
        v = {i: vectors[i].double() for i in vectors}
        moments = rec.token_moments
        out["token_calibration"] = readout_format.Calibration(
            mean={i: (v[i] @ moments[i][0]).tolist() for i in v},
            std={
                i: ((v[i] @ moments[i][1]) * v[i]).sum(dim=1).clamp_min(1e-24).sqrt().tolist()
                for i in v
            },
            reference="neutral tokens",
            n_texts=len(ts.neutral),
        )
    return out


def _provenance(model: nn.Module, model_path: Path, fitter: Fitter, args, ts) -> dict:
    method = fitter.method
    return {
        "model": {
            "path": str(Path(model_path).resolve()),
            "architecture": type(model).__name__,
            "num_hidden_layers": model.config.num_hidden_layers,
            "dtype": args.dtype,
        },
        "method": {
            "name": method.name,
            **method.settings,
            "whitening_shrinkage": {str(i): w.shrink for i, w in fitter.whiteners.items()},
            "seed": args.seed,
            "negatives_per_positive": args.negatives_per_positive,
        },
        "layer_definition": "layer i = output of decoder block i (residual, before final norm)",
        "corpus": {
            "root": str(Path(args.stories).resolve()),
            "sha256": corpus_hash(Path(args.stories)),
            "n_texts": len(ts.texts),
            "skipped_concepts": ts.skipped,
        },
    }


def write_quality(result: Run, model: nn.Module, fitter: Fitter, extra: dict) -> dict:
    """quality.json, one heatmap and one spectra plot per layer, and the printed triage."""
    ts, rec, readout = result.training_set, result.recorded, result.readout
    _, blocks = activations.decoder_blocks(model)
    layer_data = [
        quality.LayerData(
            layer=i,
            detectors=readout.detectors[i],
            directions=readout.directions[i],
            acts=rec.acts[i],
            centre=readout.centres.get(i, rec.acts[i].mean(dim=0)),
            down_proj=_weight(blocks[i], "mlp.down_proj"),
            o_proj=_weight(blocks[i], "self_attn.o_proj"),
            head_inputs=rec.heads.get(i),
            n_heads=model.config.num_attention_heads,
        )
        for i in readout.layers
    ]
    concepts = [
        quality.ConceptData(
            name=c,
            cluster=ts.clusters.get(c),
            positives=ts.positives[c],
            pairs=ts.pairs[c],
            held_out_pos=ts.held_out_pos.get(c, []),
            held_out_neg=ts.held_out_negatives(c) if c in ts.held_out_pos else [],
        )
        for c in readout.concepts
    ]

    def refit(concept: str, layer: int, pairs: list[tuple[int, int]]) -> Tensor:
        return fitter.detector(layer, pairs)[0]

    report = quality.quality_report(
        concepts, layer_data, ts.names, extra=extra, refit=refit, reference=ts.neutral
    )
    report["held_out"] = _held_out_report(result)
    report["valence"] = _valence_report(result)
    (result.out / "quality.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for i in readout.layers:
        plots.similarity_heatmap(
            readout.directions[i],
            readout.concepts,
            result.out / f"similarity_layer{i}.png",
            f"concept cosine similarity, layer {i}",
        )
        spectra = {
            c: entry["layers"][str(i)]["spectrum"]["eigenvalues"]
            for c, entry in report["concepts"].items()
        }
        plots.spectra_plot(
            spectra, result.out / f"spectra_layer{i}.png", f"pair-delta spectra, layer {i}"
        )
        valence = report["valence"]["layers"][str(i)]
        plots.valence_scatter(
            valence["scores"][valence["best_axis"]],
            report["valence"]["ratings"],
            readout.concepts,
            result.out / f"valence_layer{i}.png",
            f"layer {i}, principal axis {valence['best_axis'] + 1} of the concept directions",
        )
    print(quality.triage_summary(report))
    for i in readout.layers:
        held, valence = report["held_out"]["layers"][str(i)], report["valence"]["layers"][str(i)]
        auroc = "n/a" if held["mean_auroc"] is None else f"{held['mean_auroc']:.3f}"
        probe = valence["probe"]
        print(
            f"layer {i}: held-out AUROC {auroc}, top-1 {held['top1']:.3f}; valence r "
            f"{valence['best_r']:+.2f} (axis {valence['best_axis'] + 1}), probe r "
            f"{_number(probe['r'])} (p {_number(probe['p'])}; {valence['n_rated']} rated concepts)"
        )
    return report


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _held_out_report(result: Run) -> dict:
    """Per layer: mean one-vs-rest AUROC and top-1 on the held-out split, by the readout's
    own calibration (z against training neutral text), as the live readout scores."""
    ts, readout = result.training_set, result.readout
    held = evaluation.HeldOut.of(ts)
    layers = {}
    for i in readout.layers:
        scores = result.recorded.acts[i].double() @ readout.detectors[i].double().T
        neutral = scores[ts.neutral]
        z = (scores - neutral.mean(dim=0)) / neutral.std(dim=0).clamp_min(1e-12)
        per_concept = evaluation.held_out_auroc(scores, held)
        layers[str(i)] = {
            "mean_auroc": statistics.fmean(per_concept.values()) if per_concept else None,
            "top1": evaluation.top1(z, held),
        }
    return {
        "split": "held_out/ stories in settings their concept's training texts never use, "
        "held-out paired scenarios, held-out neutral prose; one-vs-rest against all of them",
        "concepts": len(held.positives),
        "texts": len(held.rows),
        "layers": layers,
    }


def _valence_report(result: Run) -> dict:
    """Valence on the concept directions (not the detectors, whose geometry is the
    whitening's): leading principal axes, and the left-out-concept ridge probe."""
    readout = result.readout
    ratings = evaluation.valence_ratings(readout.concepts)
    return {
        "source": evaluation.VALENCE_SOURCE,
        "vectors": "directions",
        "ratings": ratings,
        "layers": {
            str(i): {
                **evaluation.valence_axes(readout.directions[i], readout.concepts, ratings),
                "probe": evaluation.valence_probe(readout.directions[i], readout.concepts, ratings),
            }
            for i in readout.layers
        },
    }


def _weight(block: nn.Module, dotted: str) -> Tensor | None:
    module = block
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module.weight.detach().float().cpu()


def pair_rows(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(positive rows, negative rows) of a concept's pairs, in pair order."""
    return [p for p, _ in pairs], [n for _, n in pairs]


def report_run(result: Run) -> None:
    ts, rec = result.training_set, result.recorded
    print(
        f"wrote {result.out}: {len(result.readout.concepts)} concepts"
        f" x layers {result.readout.layers}"
        f" from {len(ts.texts)} texts ({rec.forward_passes} forward passes, "
        f"{sum(len(p) for p in ts.pairs.values())} pairs); skipped {len(ts.skipped)} concept(s) "
        f"without enough text"
    )
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
