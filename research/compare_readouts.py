"""Research: which read position, estimator and layers give concept directions that hold
up on held-out stories of the real model.

    python research/compare_readouts.py [--model DIR] [--cache FILE] [--layers 3,6,...]

One forward pass per corpus text records every block's activation at several read
positions (last token; mean over tokens from offsets 0, 4, 8, 16, 32). Per-token
training (every token of a story one sample) is measured for class-mean estimators,
where it equals the length-weighted mean over a class's tokens. Then, per layer and
position, several estimators of one direction per concept are fitted on the training
texts only and scored on the held-out split (held_out/ stories in settings the training texts never
use, plus held-out neutral prose): mean one-vs-rest AUROC, top-1 among concepts (by
z-score against training neutral text) and the valence correlation of the concept
vectors' leading principal axes. Prints tables; research/concept-extraction.md records
them. The activations are cached (--cache), so re-running the analysis is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from livetrain.tools.default_model import DEFAULT_MODEL_DIR
from readout import activations, corpus, dataset, evaluation, pipeline
from readout.train_steering_vectors import caa_method
from readout.train_with_library import library_method

POSITIONS = [activations.ReadPosition("last", 0)] + [
    activations.ReadPosition("mean", k) for k in (0, 4, 8, 16, 32)
]


def record_all(model_dir: Path, ts: dataset.TrainingSet, layers: list[int]) -> dict:
    model, tokenizer = pipeline.load_model(model_dir)
    texts = [t.text for t in ts.texts]
    started = time.perf_counter()
    rec = activations.record(model, tokenizer, texts, layers, POSITIONS, batch_size=8)
    print(f"recorded {len(texts)} texts in {time.perf_counter() - started:.0f} s")
    return {
        "reads": {str(p): v for p, v in rec.reads.items()},
        "lengths": torch.tensor([len(tokenizer(t).input_ids) for t in texts]),
    }


# --- estimators: (acts [n, H], training set, layer) -> [concepts, H] directions --------
# The shipped ones go through pipeline.Fitter (whitening included), exactly as the
# trainers run them; the rest are the alternatives they were chosen over.


def shipped(method: pipeline.Method, shrink: float) -> Callable:
    def fit(acts, ts, layer):
        rec = activations.Recorded({pipeline.DEFAULT_READ_POSITION: {layer: acts}})
        fitter = pipeline.Fitter.of(method, rec, ts, [layer], shrink)
        return torch.stack([fitter.direction(layer, ts.pairs[c])[0] for c in ts.concepts])

    return fit


def _means(acts: torch.Tensor, ts: dataset.TrainingSet) -> torch.Tensor:
    return torch.stack([acts[ts.positives[c]].mean(dim=0) for c in ts.concepts])


def _neutral_pcs(acts: torch.Tensor, ts: dataset.TrainingSet, k: int) -> torch.Tensor:
    x = acts[ts.neutral].double()
    _, _, vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    return vh[:k].float()


def mean_vs_grand(k_neutral_pcs: int = 0) -> Callable:
    def fit(acts, ts, _layer):
        means = _means(acts, ts)
        v = means - means.mean(dim=0)
        if k_neutral_pcs:
            basis = _neutral_pcs(acts, ts, k_neutral_pcs)
            v = v - (v @ basis.T) @ basis
        return v

    return fit


def mean_vs_neutral(acts, ts, _layer):
    return _means(acts, ts) - acts[ts.neutral].mean(dim=0)


def cluster_shrink(lam: float) -> Callable:
    """Class mean minus grand mean, pulled toward the mean of its cluster."""

    def fit(acts, ts, layer):
        v = mean_vs_grand()(acts, ts, layer)
        clusters = [ts.clusters[c] for c in ts.concepts]
        members = [[j for j, o in enumerate(clusters) if o == cl] for cl in clusters]
        return torch.stack(
            [(1 - lam) * v[k] + lam * v[m].mean(dim=0) for k, m in enumerate(members)]
        )

    return fit


PCA, MEAN, CAA = library_method("pca"), library_method("mean"), caa_method()
ESTIMATORS: dict[str, Callable] = {
    "library pca (raw)": shipped(PCA, 1.0),
    "library mean (raw)": shipped(MEAN, 1.0),
    "caa (raw)": shipped(CAA, 1.0),
    "mean - neutral": mean_vs_neutral,
    "mean - grand": mean_vs_grand(),
    "mean - grand, -8 neutral PCs": mean_vs_grand(8),
    "mean - grand, cluster 0.3": cluster_shrink(0.3),
    "library pca, whitened 0.3": shipped(PCA, 0.3),
    "library pca, whitened 0.1": shipped(PCA, 0.1),
    "library pca, whitened auto": shipped(PCA, None),
    "library mean, whitened auto": shipped(MEAN, None),
    "caa, whitened auto": shipped(CAA, None),
}
DEFAULT = "library pca, whitened auto"


def evaluate(acts: torch.Tensor, ts: dataset.TrainingSet, vectors: torch.Tensor) -> dict:
    vectors = F.normalize(vectors.float(), dim=1)
    scores = acts.double() @ vectors.double().T
    neutral = scores[ts.neutral]
    return evaluation.held_out_summary(scores, ts, neutral.mean(dim=0), neutral.std(dim=0), vectors)


def combined(cache_reads: dict, ts, fit: Callable, layers: list[int]) -> dict:
    """Held-out AUROC and top-1 of the mean z over several layers (the live readout
    reports every layer; this is how a client would combine them)."""
    zs = []
    for i in layers:
        v = F.normalize(fit(cache_reads[i], ts, i).float(), dim=1)
        scores = cache_reads[i].double() @ v.double().T
        neutral = scores[ts.neutral]
        zs.append((scores - neutral.mean(dim=0)) / neutral.std(dim=0))
    z = torch.stack(zs).mean(dim=0)
    held = evaluation.HeldOut.of(ts)
    per = evaluation.held_out_auroc(z, held)
    return {"auroc": sum(per.values()) / len(per), "top1": evaluation.top1(z, held)}


def subsample(ts: dataset.TrainingSet, k: int) -> dataset.TrainingSet:
    """The same set with at most k training stories (stories/ first) per concept."""

    def first(c):
        rows = ts.positives[c]
        return sorted(rows, key=lambda r: ts.texts[r].source != "stories")[:k]

    positives = {c: first(c) for c in ts.concepts}
    pairs = {c: [(p, n) for p, n in ts.pairs[c] if p in set(positives[c])] for c in ts.concepts}
    return dataclasses.replace(ts, positives=positives, pairs=pairs)


def valence_ceiling(acts: torch.Tensor, ts: dataset.TrainingSet) -> float:
    """Leave-one-concept-out ridge from class means to the ratings: how much valence
    the concept vectors carry in any direction, an upper bound for a principal axis."""
    means = torch.stack([acts[ts.positives[c]].double().mean(dim=0) for c in ts.concepts])
    ratings = evaluation.valence_ratings(ts.concepts)
    return evaluation.valence_probe(means, ts.concepts, ratings, shuffles=0)["r"]


def per_token_vectors(cache: dict, ts: dataset.TrainingSet, layer: int, start: int):
    """Class means of token activations (every token from `start` one sample) minus the
    grand mean: per-token training of mean - grand. A class's token mean is its texts'
    means from `start` weighted by their token counts."""
    means = cache["reads"][f"mean:{start}"][layer]
    weights = (cache["lengths"] - start).clamp_min(1).double()
    rows = []
    for c in ts.concepts:
        r = ts.positives[c]
        rows.append((means[r].double() * weights[r, None]).sum(0) / weights[r].sum())
    v = torch.stack(rows).float()
    return v - v.mean(dim=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--cache", type=Path, default=Path("readout_out/compare_cache.pt"))
    parser.add_argument("--layers", default=None, help="layers to analyse (default: every 3rd)")
    args = parser.parse_args()
    ts = dataset.build(corpus.load(), seed=0)
    if args.cache.is_file():
        cache = torch.load(args.cache, weights_only=True)
    else:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        n_blocks = pipeline.load_model(args.model)[0].config.num_hidden_layers
        cache = record_all(args.model, ts, list(range(n_blocks)))
        torch.save(cache, args.cache)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(3, 28, 3))
    n_layers = len(cache["reads"]["last"])
    print(
        f"{len(ts.concepts)} concepts, {sum(map(len, ts.positives.values()))} training texts, "
        f"{len(ts.held_out_neg)} held-out texts, {len(ts.neutral)} neutral"
    )

    def row(name: str, cells: list[str]) -> None:
        print(f"{name:30} " + " ".join(f"{c:>16}" for c in cells))

    def cell(acts, ts_, fit, i) -> str:
        r = evaluate(acts[i], ts_, fit(acts[i], ts_, i))
        return f"{r['auroc']:.3f}/{r['top1']:.2f}/{r['valence_r']:.2f}"

    print("\ncells: held-out mean one-vs-rest AUROC / top-1 / valence |r| (best of 3 axes)")
    print("\n## read positions")
    row("position, estimator", [f"layer {i}" for i in layers])
    for p in POSITIONS:
        for name in ("mean - grand", DEFAULT):
            row(
                f"{p!s}, {name}",
                [cell(cache["reads"][str(p)], ts, ESTIMATORS[name], i) for i in layers],
            )
    print("\n## per-token training (class mean over tokens, minus grand mean), read at mean:4")
    for start in (0, 4):
        cells = []
        for i in layers:
            r = evaluate(cache["reads"]["mean:4"][i], ts, per_token_vectors(cache, ts, i, start))
            cells.append(f"{r['auroc']:.3f}/{r['top1']:.2f}/{r['valence_r']:.2f}")
        row(f"tokens from {start}", cells)
    for position in ("last", str(pipeline.DEFAULT_READ_POSITION)):
        print(f"\n## estimators at {position}")
        row("estimator", [f"layer {i}" for i in layers])
        for name, fit in ESTIMATORS.items():
            row(name, [cell(cache["reads"][position], ts, fit, i) for i in layers])
    reads = cache["reads"][str(pipeline.DEFAULT_READ_POSITION)]
    default_layers = activations.default_layers(n_layers)
    print(f"\n## the default ({DEFAULT}) over the default layers {default_layers}, mean z")
    for name in ("library pca (raw)", "library pca, whitened 0.3", "caa, whitened auto", DEFAULT):
        r = combined(reads, ts, ESTIMATORS[name], default_layers)
        print(f"{name:30} AUROC {r['auroc']:.3f}, top-1 {r['top1']:.3f}")
    print("\n## learning curve: training stories per concept (default estimator)")
    row("stories", [f"layer {i}" for i in layers])
    for k in (3, 6, 12):
        row(str(k), [cell(reads, subsample(ts, k), ESTIMATORS[DEFAULT], i) for i in layers])
    print("\n## valence ceiling: leave-one-concept-out ridge r from class means")
    row("position", [f"layer {i}" for i in layers])
    for position in ("last", str(pipeline.DEFAULT_READ_POSITION)):
        row(position, [f"{valence_ceiling(cache['reads'][position][i], ts):.2f}" for i in layers])
    return 0


if __name__ == "__main__":
    sys.exit(main())
