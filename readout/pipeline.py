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
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from livetrain import readout_format
from livetrain.tiny_model import DEFAULT_MODEL_DIR, ensure_default_model
from readout import activations, corpus, dataset, plots, quality

# (recorded activations, layer, one concept's pairs) -> (unit direction [hidden], diagnostics)
Direction = Callable[[activations.Recorded, int, list[tuple[int, int]]], tuple[Tensor, dict]]


@dataclass
class Method:
    name: str  # goes into readout.json
    settings: dict  # ditto: what reproduces the run
    direction: Direction
    needs_tokens: bool = False  # record every token's activation (subspace methods)


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
        help=f"Hugging Face model folder (default: built-in {DEFAULT_MODEL_DIR})",
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
        "(default: 20/40/60/80%% of depth)",
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
        args.batch_size,
        heads=args.quality_report,
        tokens=method.needs_tokens,
        progress=progress,
    )
    seconds["forward"] = recorded.forward_seconds
    started = time.perf_counter()
    vectors, extra = {}, {c: {} for c in training_set.concepts}
    for i in layers:
        rows = []
        for concept in training_set.concepts:
            vector, extra[concept][i] = method.direction(recorded, i, training_set.pairs[concept])
            if not torch.isfinite(vector).all() or vector.norm() == 0:
                raise SystemExit(f"{method.name}: no direction for {concept!r} at layer {i}")
            rows.append(vector.float())
        vectors[i] = torch.stack(rows)
    seconds["directions"] = time.perf_counter() - started
    readout = readout_format.Readout(
        concepts=training_set.concepts,
        layers=layers,
        vectors=vectors,
        **_calibration(training_set, recorded, vectors),
        provenance=_provenance(model, model_path, method, args, training_set),
    )
    readout_format.save(out, readout)
    result = Run(out, readout, training_set, recorded, seconds)
    if args.quality_report:
        started = time.perf_counter()
        result.report = write_quality(result, model, method, extra)
        seconds["quality"] = time.perf_counter() - started
    return result


def _calibration(
    ts: dataset.TrainingSet, rec: activations.Recorded, vectors: dict[int, Tensor]
) -> dict:
    """Centre and per-concept projection statistics on neutral prose, for runtime z-scores."""
    if len(ts.neutral) < 2:
        return {}
    rows = torch.tensor(ts.neutral)
    centres = {i: rec.last[i][rows].mean(dim=0) for i in vectors}
    scores = {i: rec.last[i][rows].double() @ vectors[i].double().T for i in vectors}
    return {
        "centres": centres,
        "calibration": readout_format.Calibration(
            mean={i: s.mean(dim=0).tolist() for i, s in scores.items()},
            std={i: s.std(dim=0).clamp_min(1e-12).tolist() for i, s in scores.items()},
            reference="neutral",
            n_texts=len(ts.neutral),
        ),
    }


def _provenance(model: nn.Module, model_path: Path, method: Method, args, ts) -> dict:
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
            "seed": args.seed,
            "negatives_per_positive": args.negatives_per_positive,
        },
        "read_position": "last token of the raw text (no chat template)",
        "layer_definition": "layer i = output of decoder block i (residual, before final norm)",
        "corpus": {
            "root": str(Path(args.stories).resolve()),
            "sha256": corpus_hash(Path(args.stories)),
            "n_texts": len(ts.texts),
            "skipped_concepts": ts.skipped,
        },
    }


def write_quality(result: Run, model: nn.Module, method: Method, extra: dict) -> dict:
    """quality.json, one heatmap and one spectra plot per layer, and the printed triage."""
    ts, rec, readout = result.training_set, result.recorded, result.readout
    _, blocks = activations.decoder_blocks(model)
    layer_data = [
        quality.LayerData(
            layer=i,
            vectors=readout.vectors[i],
            acts=rec.last[i],
            centre=readout.centres.get(i, rec.last[i].mean(dim=0)),
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
        return method.direction(rec, layer, pairs)[0]

    report = quality.quality_report(
        concepts, layer_data, ts.names, extra=extra, refit=refit, reference=ts.neutral
    )
    (result.out / "quality.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for i in readout.layers:
        plots.similarity_heatmap(
            readout.vectors[i],
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
    print(quality.triage_summary(report))
    return report


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
