"""Offline tool: judge concept directions on evidence no trainer has seen.

Three measures, pure functions of scores and vectors:
- held-out AUROC: per concept, its held-out stories against every other held-out text
  (other concepts' held-out stories, held-out neutral prose, held-out scenarios),
  one-vs-rest, by the raw projection;
- top-1: for each held-out story of a trained concept, whether its own concept has the
  highest z-score (projection standardised on training neutral text, as the live
  readout reports it) among all concepts;
- valence: Pearson r between the concept directions' leading principal axes and human
  valence ratings of the concept names, and a probe: ridge regression from a direction
  to its concept's rating, each concept predicted by a fit that left it out, with the
  share of shuffled ratings that predict as well (how much valence the directions
  carry in any direction, and whether that is more than chance).

The valence ratings are data from the `vadersentiment` package: its lexicon rates each
word as the mean of 10 human raters on -4..+4 (Hutto and Gilbert, 2014). Concept names
missing from it (multi-word ones, mostly) are left out of the correlation.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from readout.dataset import TrainingSet
from readout.quality import auroc

VALENCE_AXES = 3  # leading principal axes of the concept vectors tried against valence
VALENCE_RIDGE = 1.0  # probe penalty, times the centred rows' squared norm per hidden unit
VALENCE_SHUFFLES = 200  # shuffled ratings the probe's r is compared with
VALENCE_SOURCE = "vadersentiment 3.3.2 vader_lexicon.txt: mean of 10 human raters, -4..+4"


def valence_ratings(concepts: list[str]) -> dict[str, float]:
    """Human valence rating of each concept name the lexicon rates."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the valence ratings need the vadersentiment package (readout extra)")
    lexicon = Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"
    ratings = {}
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        word, _, rest = line.partition("\t")
        if word in concepts:
            ratings[word] = float(rest.split("\t", 1)[0])
    return ratings


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return (x @ y).item() / denom if denom else math.nan


def valence_axes(vectors: Tensor, concepts: list[str], ratings: dict[str, float]) -> dict:
    """Correlation of each leading principal axis of the concept vectors with valence.

    `scores` are every concept's coordinate on each axis (for the scatter plot);
    `best_axis`/`best_r` the axis with the largest |r| (an axis' sign is arbitrary)."""
    rows = [k for k, c in enumerate(concepts) if c in ratings]
    x = vectors.double()
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:VALENCE_AXES].T  # [concepts, axes]
    y = torch.tensor([ratings[concepts[k]] for k in rows])
    r = [pearson(coords[rows, a], y) for a in range(coords.shape[1])]
    best = max(range(len(r)), key=lambda a: abs(r[a]) if math.isfinite(r[a]) else -1)
    return {
        "n_rated": len(rows),
        "r": r,
        "best_axis": best,
        "best_r": r[best],
        "scores": coords.T.tolist(),
    }


def valence_probe(
    vectors: Tensor,
    concepts: list[str],
    ratings: dict[str, float],
    lam: float = VALENCE_RIDGE,
    shuffles: int = VALENCE_SHUFFLES,
    seed: int = 0,
) -> dict:
    """Leave-one-concept-out ridge from each rated concept's row of `vectors` to its
    rating: Pearson r of the predictions, and `p`, the share of `shuffles` random
    permutations of the ratings whose r is at least as high (+1 smoothing)."""
    rows = [k for k, c in enumerate(concepts) if c in ratings]
    x = vectors.double()[rows]
    y = torch.tensor([ratings[concepts[k]] for k in rows], dtype=torch.float64)
    if len(rows) < 4:
        return {"n_rated": len(rows), "r": math.nan, "p": math.nan, "ridge": lam}
    r = pearson(_loo_ridge(x, y, lam), y)
    gen = torch.Generator().manual_seed(seed)
    null = [pearson(_loo_ridge(x, yp, lam), yp) for yp in _shuffled(y, shuffles, gen)]
    beaten = sum(value >= r for value in null if math.isfinite(value))
    return {"n_rated": len(rows), "r": r, "p": (beaten + 1) / (shuffles + 1), "ridge": lam}


def _shuffled(y: Tensor, count: int, gen: torch.Generator) -> list[Tensor]:
    return [y[torch.randperm(len(y), generator=gen)] for _ in range(count)]


def _loo_ridge(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Each row's prediction by a ridge fit (with intercept) on all the other rows, in
    the dual (rows x rows) form: there are far fewer concepts than hidden dimensions."""
    predictions = []
    for i in range(len(y)):
        keep = [j for j in range(len(y)) if j != i]
        xm, ym = x[keep].mean(dim=0), y[keep].mean()
        xc = x[keep] - xm
        gram = xc @ xc.T
        ridge = lam * gram.trace() / x.shape[1]
        alpha = torch.linalg.solve(gram + ridge * torch.eye(len(keep), dtype=x.dtype), y[keep] - ym)
        predictions.append(((x[i] - xm) @ (xc.T @ alpha) + ym).item())
    return torch.tensor(predictions, dtype=torch.float64)


@dataclass(frozen=True)
class HeldOut:
    """Which rows of a score matrix are held-out texts, and whose."""

    concepts: list[str]  # score columns
    positives: dict[str, list[int]]  # concept -> rows of its held-out stories
    rows: list[int]  # every held-out row (all concepts', neutral prose, baselines)

    @classmethod
    def of(cls, ts: TrainingSet) -> HeldOut:
        return cls(ts.concepts, ts.held_out_pos, ts.held_out_neg)

    def negatives(self, concept: str) -> list[int]:
        own = set(self.positives.get(concept, []))
        return [r for r in self.rows if r not in own]

    def compact(self) -> HeldOut:
        """The same, for a score matrix with one row per held-out text, in row order."""
        index = {r: k for k, r in enumerate(self.rows)}
        positives = {c: [index[r] for r in rows] for c, rows in self.positives.items()}
        return HeldOut(self.concepts, positives, list(range(len(self.rows))))


def held_out_auroc(scores: Tensor, held: HeldOut) -> dict[str, float]:
    """concept -> one-vs-rest AUROC on the held-out texts, for concepts with any."""
    return {
        c: auroc(scores[rows, k], scores[held.negatives(c), k])
        for k, c in enumerate(held.concepts)
        if (rows := held.positives.get(c))
    }


def top1(z: Tensor, held: HeldOut) -> float:
    """Share of held-out stories whose own concept has the highest z among all."""
    hits = total = 0
    for k, c in enumerate(held.concepts):
        for row in held.positives.get(c, []):
            hits += int(z[row].argmax().item() == k)
            total += 1
    return hits / total if total else math.nan


def held_out_summary(
    scores: Tensor, ts: TrainingSet, neutral_mean: Tensor, neutral_std: Tensor, vectors: Tensor
) -> dict:
    """Mean held-out AUROC, top-1 and best valence |r| of one layer's directions.

    `scores` [texts, concepts] are raw projections of every corpus text."""
    held = HeldOut.of(ts)
    per_concept = held_out_auroc(scores, held)
    z = (scores - neutral_mean) / neutral_std
    valence = valence_axes(vectors, ts.concepts, valence_ratings(ts.concepts))
    return {
        "auroc": sum(per_concept.values()) / len(per_concept) if per_concept else math.nan,
        "per_concept": per_concept,
        "top1": top1(z, held),
        "valence_r": abs(valence["best_r"]),
        "valence": valence,
    }
