"""Diagnostics of extracted concept directions: the numbers in quality.json and the triage.

Each (concept, layer) direction gets metrics that answer separate questions: does it
separate the concept's stories from the rest (separation, pair agreement, held-out AUROC),
is the signal one direction or several (the two spectra), does it duplicate other concepts
(nearest, ridge), and what in the model writes it (single neuron, attention heads).
`quality_report` gathers them and gives every direction one triage label, so the end of a
training run can point at the few directions worth a look (`triage_summary`). The
scoring questions are asked of the detectors the live readout projects onto, the
geometric ones of the concept directions (readout_format.py has the difference).

All maths runs in float64 whatever the input dtype: several metrics are ratios of small
differences (R^2 near 1, eigenvalue shares) that float32 or bf16 would blur.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Worst first: a concept's label is the worst over its layers, and the summary lists in this order.
LABELS = ("sign-flipped", "weak", "unconfirmed", "redundant", "fragmented", "clean")
_TINY = torch.finfo(torch.float64).tiny
_EPS = torch.finfo(torch.float64).eps
_SUMMARY_NAMES = 10  # names listed per label; a terminal line, not the whole report


@dataclass(frozen=True)
class TriageThresholds:
    weak_separation: float = 1.0  # d' below this -> "weak"
    sign_flip_auroc: float = 0.35  # held-out AUROC below this -> "sign-flipped"
    # Held-out AUROC below this (or none measured) -> "unconfirmed": only held-out stories
    # can confirm a direction; training-set evidence alone labelled directions clean
    # that held-out stories then ranked near chance (quality.json's `agreement`).
    confirm_auroc: float = 0.8
    # mean cosine with same-cluster concepts below this (needs >= 2 mates) -> "sign-flipped"
    sign_flip_cluster_cos: float = -0.2
    redundant_r2: float = 0.9  # ridge R^2 at or above -> "redundant"
    # spectrum first_pc_ratio below this fraction of the layer's median over concepts
    # -> "fragmented"
    fragmented_ratio: float = 0.75
    ridge_lambda: float = 0.01


DEFAULT_THRESHOLDS = TriageThresholds()


@dataclass
class LayerData:
    layer: int
    # [n_concepts, hidden] unit rows, in the order of the concepts list: what scores
    # (separation, agreement, AUROC) and what the concepts are (geometry: cosines,
    # nearest, ridge, neurons, heads, alignment); readout_format.py says why both
    detectors: Tensor
    directions: Tensor
    acts: Tensor  # [n_texts, hidden] last-token activation of every unique text at this layer
    centre: Tensor  # [hidden] reference centre (mean activation of neutral text)
    # [hidden, intermediate] MLP down-projection; columns are the neurons' write directions
    down_proj: Tensor | None
    o_proj: Tensor | None  # [hidden, n_heads*head_dim] attention output projection
    head_inputs: Tensor | None  # [n_texts, n_heads*head_dim] o_proj input at the read position
    n_heads: int


@dataclass
class ConceptData:
    name: str
    cluster: str | None
    positives: list[int]  # indices into acts rows / text_names
    pairs: list[tuple[int, int]]  # (positive index, negative index) training pairs
    held_out_pos: list[int]  # held-out texts of this concept (may be empty)
    held_out_neg: list[int]  # held-out texts of other concepts / baselines (may be empty)


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _unit(x: Tensor) -> Tensor:
    """Rows scaled to norm 1; a zero row stays zero, so its cosines read 0 rather than nan."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _rows(x: Tensor, index: list[int]) -> Tensor:
    # An empty Python list would index as a float tensor; build the index explicitly.
    return x[torch.as_tensor(index, dtype=torch.long, device=x.device)]


def first_pc_variance_ratio(x: Tensor) -> float:
    """Share of the rows' variance (about their mean) on their first principal component.

    Applied to a concept's positives: near 1 means its stories vary mostly along one axis,
    near 1/rank means no dominant axis. Unlike `spectrum` it ignores the common offset, so
    it says how the stories differ from each other, not how they differ from the negatives.
    nan with fewer than 2 rows or no variance.
    """
    x = _f64(x)
    if x.shape[0] < 2:
        return math.nan
    eig = torch.linalg.svdvals(x - x.mean(dim=0)) ** 2
    total = eig.sum()
    # Identical rows leave only rounding noise after centring; that is no variance.
    if total <= _EPS * (x**2).sum():
        return math.nan
    return (eig[0] / total).item()


def spectrum(x: Tensor, top: int = 20) -> dict:
    """Eigenvalue spectrum of the uncentred rows (x^T x): what the PCA aggregator decomposes.

    For pair deltas, a first_pc_ratio near 1 means the pairs agree on one direction; a low
    ratio, with k_signal_at_90pct and effective_dim above 1, means the concept's signal is
    spread over several directions and a single vector captures only part of it.
    """
    x = _f64(x)
    eig = torch.linalg.svdvals(x) ** 2 if x.shape[0] else x.new_zeros(0)
    total = eig.sum()
    if total <= 0:
        return {
            "first_pc_ratio": math.nan,
            "k_signal_at_90pct": 0,
            "effective_dim": math.nan,
            "eigenvalues": [],
        }
    share = eig / total
    below_90 = int((torch.cumsum(share, dim=0) < 0.9).sum())
    return {
        "first_pc_ratio": share[0].item(),
        "k_signal_at_90pct": min(below_90 + 1, len(share)),
        "effective_dim": (total**2 / (eig**2).sum()).item(),
        "eigenvalues": share[:top].tolist(),
    }


def alignments(direction: Tensor, acts: Tensor, centre: Tensor) -> Tensor:
    """Cosine of each activation (relative to the centre) with the direction.

    Per story, how much of its departure from neutral text the direction explains; the
    lowest ones are the stories the direction misses, often mislabelled or off-concept.
    """
    rel = _f64(acts) - _f64(centre)
    return _unit(rel) @ _unit(_f64(direction))


def _project(vectors: Tensor, weight: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Dot products of float64 rows with each column of weight, and the column norms.

    Columns are cast to float64 a block at a time: a whole MLP matrix in float64 is gigabytes.
    """
    vectors = vectors.to(weight.device)
    dots, norms = [], []
    for start in range(0, weight.shape[1], chunk):
        block = weight[:, start : start + chunk].to(torch.float64)
        dots.append(vectors @ block)
        norms.append(block.norm(dim=0))
    return torch.cat(dots, dim=1), torch.cat(norms)


def _best_neuron(cosines: Tensor) -> dict:
    neuron = int(cosines.abs().argmax())
    return {"neuron": neuron, "cosine": cosines[neuron].item()}


def single_neuron_alignment(direction: Tensor, down_proj: Tensor) -> dict:
    """The MLP neuron whose write direction is closest to the direction (signed cosine).

    |cosine| near 1 means one neuron writes the concept by itself (a candidate for direct
    inspection); small values are the usual case of a direction written by many neurons.
    """
    dots, norms = _project(_unit(_f64(direction))[None], down_proj)
    return _best_neuron(dots[0] / norms.clamp_min(_TINY))


def _cosine_matrix(vectors: Tensor) -> Tensor:
    unit = _unit(_f64(vectors))
    return unit @ unit.T


def nearest_concepts(
    vectors: Tensor, names: list[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each direction, the k other concepts with the highest cosine, highest first.

    Shows what a direction is confused with; high cosines with unrelated concepts point at
    a shared nuisance direction (story length, tone) rather than the concept.
    """
    cos = _cosine_matrix(vectors)
    cos.fill_diagonal_(-math.inf)
    values, index = cos.topk(min(k, len(names) - 1), dim=1)
    return [
        [(names[j], v) for j, v in zip(row_index, row_values, strict=True)]
        for row_index, row_values in zip(index.tolist(), values.tolist(), strict=True)
    ]


def ridge_on_others(
    vectors: Tensor,
    names: list[str],
    lam: float = 0.01,
    k: int = 5,
    usable: list[bool] | None = None,
) -> list[dict]:
    """How well each direction is rebuilt as a ridge combination of the other directions.

    R^2 near 1 means the direction adds nothing the others do not already span (a duplicate
    or a mix of neighbours); `top` names the concepts it is built from, with signed weights.
    Only rows marked `usable` serve as regressors: a weak concept's direction is mostly the
    mirror image of its negatives, i.e. a mix of every other concept, and would "explain"
    them all. With fewer than 2 concepts there is nothing to regress on: r2 = 0, top = [].
    """
    v = _f64(vectors)
    n = v.shape[0]
    if n < 2:
        return [{"r2": 0.0, "top": []} for _ in range(n)]
    usable = usable or [True] * n
    gram = v @ v.T
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i and usable[j]]
        if not others:
            out.append({"r2": 0.0, "top": []})
            continue
        ridge = lam * torch.eye(len(others), dtype=torch.float64, device=v.device)
        # Dual form: an (n-1)-sized system instead of a hidden-sized one.
        beta = torch.linalg.solve(gram[others][:, others] + ridge, gram[others, i])
        resid = v[i] - beta @ v[others]
        order = beta.abs().argsort(descending=True)[:k].tolist()
        out.append(
            {
                "r2": (1 - resid.dot(resid) / v[i].dot(v[i])).item(),
                "top": [(names[others[j]], beta[j].item()) for j in order],
            }
        )
    return out


def _head_summary(write: Tensor, dz: Tensor, n_heads: int, top: int) -> dict:
    """Per-head contributions c_h from direction @ W_o (write) and the head-input gap dz."""
    c = (write * dz).reshape(n_heads, -1).sum(dim=1)
    share = c.abs() / c.abs().sum()
    order = c.abs().argsort(descending=True)
    return {
        "heads": [[h, c[h].item(), share[h].item()] for h in order[:top].tolist()],
        "head_concentration": share[order[: math.ceil(n_heads / 4)]].sum().item(),
    }


def head_decomposition(
    direction: Tensor,
    o_proj: Tensor,
    head_pos: Tensor,
    head_neg: Tensor,
    n_heads: int,
    top: int = 5,
) -> dict:
    """Split the direction's pos-neg separation into the attention heads' contributions.

    Head h writes W_o_h z_h into the residual, so its part of the separation along the
    direction is c_h = direction . W_o_h (mean z_h over positives - mean over negatives).
    head_concentration is the share of the top quarter of heads: about 0.25 when the heads
    contribute evenly, 1.0 when one head carries the concept (worth looking at its pattern).
    """
    write, _ = _project(_f64(direction)[None], o_proj)
    dz = _f64(head_pos).mean(dim=0) - _f64(head_neg).mean(dim=0)
    return _head_summary(write[0], dz.to(write.device), n_heads, top)


def auroc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """P(positive score > negative score) + 0.5 P(tie), from Mann-Whitney ranks.

    Threshold-free and insensitive to scale: 0.5 is chance, below 0.5 the direction ranks
    the held-out texts backwards. nan if either side is empty.
    """
    pos = _f64(pos_scores).flatten().cpu().numpy()
    neg = _f64(neg_scores).flatten().cpu().numpy()
    if not len(pos) or not len(neg):
        return math.nan
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Tied values share the mean of the ranks they span (ranks are 1-based).
    mean_rank = np.cumsum(counts) - (counts - 1) / 2
    u = mean_rank[inverse[: len(pos)]].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def separation(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """d' = (mean pos - mean neg) / pooled std: the gap in units of the scores' spread.

    Below about 1 the two score distributions overlap heavily, so the direction is weak
    even if its mean gap is positive. A side with one element counts as zero variance;
    with no spread at all the result is +-inf (or 0 when the means are equal).
    """
    pos, neg = _f64(pos_scores).flatten(), _f64(neg_scores).flatten()
    if not len(pos) or not len(neg):
        return math.nan
    diff = (pos.mean() - neg.mean()).item()
    var = [x.var(correction=1 if len(x) > 1 else 0).item() for x in (pos, neg)]
    pooled = math.sqrt(sum(var) / 2)
    if pooled == 0:
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / pooled


def _below(value: float | None, limit: float) -> bool:
    # None (not measured) and nan never trigger a label.
    return value is not None and value < limit


def _weakness(entry: dict, th: TriageThresholds) -> str | None:
    """Why the direction's signal is too weak to use, or None if it is not."""
    if _below(entry["separation"], th.weak_separation):
        return f"d'={entry['separation']:.2f} against its negatives"
    if _below(entry.get("separation_from_neutral"), th.weak_separation):
        return f"d'={entry['separation_from_neutral']:.2f} against neutral text"
    return None


def _triage(
    entry: dict, median_first_pc: float, th: TriageThresholds, held_out: bool = True
) -> tuple[str, str]:
    """The label of one (concept, layer) entry and the reason in a few words.

    Works on a report entry before or after nan -> None, so triage_summary can re-derive
    the reason from a saved report. `held_out=False` judges on training evidence alone
    (what the agreement report compares held-out AUROC with).
    """
    flipped = []
    if held_out and _below(entry["held_out_auroc"], th.sign_flip_auroc):
        flipped.append(f"held-out AUROC {entry['held_out_auroc']:.2f}")
    if _below(entry["cluster_cosine"], th.sign_flip_cluster_cos):
        flipped.append(f"mean cosine {entry['cluster_cosine']:.2f} with its cluster")
    # Against its own training pairs only counts with a clear gap: for a direction fitted
    # to noise, agreement swings around 0.5 and means nothing.
    if _below(entry["pair_agreement"], 0.5) and _below(
        entry["separation_in_sample"], -th.weak_separation
    ):
        flipped.append(f"pair agreement {entry['pair_agreement']:.2f}")
    if flipped:
        return "sign-flipped", ", ".join(flipped)
    if (weak := _weakness(entry, th)) is not None:
        return "weak", weak
    auroc_ = entry["held_out_auroc"]
    if held_out and (auroc_ is None or math.isnan(auroc_)):
        return "unconfirmed", "no held-out stories"
    if held_out and auroc_ < th.confirm_auroc:
        return "unconfirmed", f"held-out AUROC {auroc_:.2f} < {th.confirm_auroc}"
    r2 = entry["ridge"]["r2"]
    if r2 is not None and r2 >= th.redundant_r2:
        # Coefficients under 0.1 explain under 1% of a unit direction: not worth naming.
        parts = ", ".join(f"{n} {b:+.2f}" for n, b in entry["ridge"]["top"][:3] if abs(b) >= 0.1)
        return "redundant", f"R^2={r2:.3f} from others ({parts})"
    first_pc = entry["spectrum"]["first_pc_ratio"]
    if _below(first_pc, th.fragmented_ratio * median_first_pc):
        return "fragmented", f"first-PC ratio {first_pc:.2f} vs layer median {median_first_pc:.2f}"
    return "clean", ""


def _median_first_pc(entries: list[dict]) -> float:
    values = [e["spectrum"]["first_pc_ratio"] for e in entries]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _jsonable(x: Any) -> Any:
    """Plain Python containers and scalars with nan -> None (json.dumps-able)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (Tensor, np.ndarray, np.generic)):
        return _jsonable(x.tolist())
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _alignment_summary(cosines: Tensor, names: list[str]) -> dict:
    worst = cosines.argsort()[:2].tolist()
    return {
        "per_story": dict(zip(names, cosines.tolist(), strict=True)),
        "mean": cosines.mean().item(),
        "worst": [[names[j], cosines[j].item()] for j in worst],
    }


# (concept, layer, a subset of its pairs) -> the method's direction fitted on those pairs
Refit = Callable[[str, int, list[tuple[int, int]]], Tensor]


def cross_validated_scores(
    concept: ConceptData,
    layer: int,
    acts: Tensor,
    centre: Tensor,
    refit: Refit,
    reference: list[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Scores of each positive, its paired negatives and the reference texts under a
    direction fitted without that positive.

    In-sample scores flatter every direction: with fewer pairs than hidden dimensions,
    even pure noise yields a direction its own training texts separate along. Leaving one
    positive (and its pairs) out at a time measures what the direction does on text it
    has not seen, which is what the live readout meets.
    """
    pos_scores, neg_scores, ref_scores = [], [], []
    for p in dict.fromkeys(q for q, _ in concept.pairs):
        kept = [pair for pair in concept.pairs if pair[0] != p]
        if not kept:
            continue
        v = _unit(_f64(refit(concept.name, layer, kept)))
        negs = [n for q, n in concept.pairs if q == p]
        pos_scores.append((acts[p] - centre) @ v)
        neg_scores.append((_rows(acts, negs) - centre) @ v)
        ref_scores.append((_rows(acts, list(reference)) - centre) @ v)
    empty = torch.zeros(0, dtype=torch.float64)
    if not pos_scores:
        return empty, empty, empty
    return torch.stack(pos_scores), torch.cat(neg_scores), torch.cat(ref_scores)


def _separations(
    c: ConceptData,
    layer: int,
    acts: Tensor,
    centre: Tensor,
    score: Tensor,
    refit: Refit | None,
    reference: list[int],
) -> dict[str, float]:
    """d' of the positives against their pair negatives (cross-validated given a refit),
    in-sample, and against the reference (neutral) text.

    Against neutral text too, because against other concepts alone a concept with no
    signal of its own still "separates": its direction becomes the mirror image of its
    negatives (with diff-of-means, minus the mean of every other concept).
    """
    pair_neg = [n for _, n in c.pairs]
    in_sample = separation(_rows(score, c.positives), _rows(score, pair_neg))
    if refit is None:
        pos, neg, ref = _rows(score, c.positives), _rows(score, pair_neg), _rows(score, reference)
    else:
        pos, neg, ref = cross_validated_scores(c, layer, acts, centre, refit, reference)
    return {
        "separation": separation(pos, neg),
        "separation_in_sample": in_sample,
        "separation_from_neutral": separation(pos, ref) if reference else math.nan,
    }


def _layer_entries(
    concepts: list[ConceptData],
    layer: LayerData,
    text_names: list[str],
    th: TriageThresholds,
    refit: Refit | None,
    reference: list[int],
) -> list[dict]:
    """The metrics of every concept at one layer (without triage), in the concepts' order."""
    names = [c.name for c in concepts]
    acts, centre = _f64(layer.acts), _f64(layer.centre)
    detectors, directions = _f64(layer.detectors), _f64(layer.directions)
    scores = (acts - centre) @ detectors.T  # [n_texts, n_concepts]
    cos = _cosine_matrix(directions)
    nearest = nearest_concepts(directions, names)
    seps = [
        _separations(c, layer.layer, acts, centre, scores[:, i], refit, reference)
        for i, c in enumerate(concepts)
    ]
    usable = [_weakness(sep, th) is None for sep in seps]
    ridge = ridge_on_others(directions, names, th.ridge_lambda, usable=usable)
    neuron_cos = None
    if layer.down_proj is not None:
        dots, norms = _project(_unit(directions), layer.down_proj)
        neuron_cos = dots / norms.clamp_min(_TINY)
    head_write = head_inputs = None
    if layer.o_proj is not None and layer.head_inputs is not None:
        head_write, _ = _project(directions, layer.o_proj)
        head_inputs = _f64(layer.head_inputs).to(head_write.device)

    entries = []
    for i, c in enumerate(concepts):
        pos_acts, score = _rows(acts, c.positives), scores[:, i]
        pair_neg = [n for _, n in c.pairs]
        deltas = _rows(acts, [p for p, _ in c.pairs]) - _rows(acts, pair_neg)
        mates = [j for j, o in enumerate(concepts) if j != i and o.cluster == c.cluster]
        per_head = None
        if head_write is not None:
            pos_z, neg_z = _rows(head_inputs, c.positives), _rows(head_inputs, pair_neg)
            dz = pos_z.mean(dim=0) - neg_z.mean(dim=0)
            per_head = _head_summary(head_write[i], dz, layer.n_heads, top=5)
        entries.append(
            {
                "first_pc_variance_ratio": first_pc_variance_ratio(pos_acts),
                "spectrum": spectrum(deltas),
                "alignment": _alignment_summary(
                    alignments(directions[i], pos_acts, centre),
                    [text_names[j] for j in c.positives],
                ),
                "single_neuron": None if neuron_cos is None else _best_neuron(neuron_cos[i]),
                "nearest": nearest[i],
                "ridge": ridge[i],
                "per_head": per_head,
                **seps[i],
                "pair_agreement": (deltas @ detectors[i] > 0).to(torch.float64).mean().item(),
                "held_out_auroc": auroc(_rows(score, c.held_out_pos), _rows(score, c.held_out_neg)),
                "cluster_cosine": (
                    cos[i, mates].mean().item()
                    if c.cluster is not None and len(mates) >= 2
                    else None
                ),
            }
        )
    return entries


def quality_report(
    concepts: list[ConceptData],
    layers: list[LayerData],
    text_names: list[str],
    thresholds: TriageThresholds = DEFAULT_THRESHOLDS,
    extra: dict[str, dict[int, dict]] | None = None,
    refit: Refit | None = None,
    reference: list[int] | None = None,
) -> dict:
    """Every metric for every (concept, layer), its triage label, and a per-label summary.

    The result is plain JSON (nan -> None) for quality.json. A concept's label is the worst
    over its layers. `extra[name][layer]` (e.g. probe accuracies computed elsewhere) is
    merged into that entry after triage. With `refit`, the separation that triage judges
    "weak" by is cross-validated (see cross_validated_scores); with `reference` (rows of
    neutral text) a concept must also separate from that (see _separations).
    """
    extra = extra or {}
    by_concept: dict[str, dict[str, dict]] = {c.name: {} for c in concepts}
    for layer in layers:
        entries = _layer_entries(concepts, layer, text_names, thresholds, refit, reference or [])
        # "Fragmented" is relative: some layers are lower-rank than others for every concept.
        median = _median_first_pc(entries)
        for c, entry in zip(concepts, entries, strict=True):
            entry["triage"] = _triage(entry, median, thresholds)[0]
            entry.update(extra.get(c.name, {}).get(layer.layer, {}))
            by_concept[c.name][str(layer.layer)] = entry

    report_concepts = {}
    for c in concepts:
        labels = [e["triage"] for e in by_concept[c.name].values()]
        report_concepts[c.name] = {
            "cluster": c.cluster,
            "n_positives": len(c.positives),
            "n_pairs": len(c.pairs),
            "layers": by_concept[c.name],
            "triage": min(labels, key=LABELS.index, default="clean"),
        }
    summary = {
        label: [name for name, c in report_concepts.items() if c["triage"] == label]
        for label in LABELS
    }
    return _jsonable(
        {
            "thresholds": asdict(thresholds),
            "concepts": report_concepts,
            "summary": summary,
            "agreement": agreement(report_concepts, thresholds),
        }
    )


def _spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx, ry = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return ((rx @ ry) / (rx.norm() * ry.norm())).item()


def agreement(concepts: dict[str, dict], th: TriageThresholds) -> dict:
    """How the triage on training evidence alone agrees with held-out AUROC, over every
    (concept, layer) with held-out stories: per training-only label the count and the
    held-out AUROC, and the rank correlation of cross-validated separation with it."""
    entries = [e for c in concepts.values() for e in c["layers"].values()]
    by_label: dict[str, list[float]] = {label: [] for label in LABELS}
    seps, aurocs = [], []
    medians: dict[int, float] = {}
    for c in concepts.values():
        for key, e in c["layers"].items():
            medians.setdefault(key, _median_first_pc([o["layers"][key] for o in concepts.values()]))
            value = e["held_out_auroc"]
            if value is None or math.isnan(value):
                continue
            by_label[_triage(e, medians[key], th, held_out=False)[0]].append(value)
            if e["separation"] is not None and math.isfinite(e["separation"]):
                seps.append(e["separation"])
                aurocs.append(value)
    return {
        "entries_with_held_out": sum(len(v) for v in by_label.values()),
        "entries": len(entries),
        "by_training_label": {
            label: {
                "n": len(v),
                "mean_held_out_auroc": statistics.fmean(v) if v else math.nan,
                "min_held_out_auroc": min(v) if v else math.nan,
                "share_confirmed": sum(a >= th.confirm_auroc for a in v) / len(v)
                if v
                else math.nan,
            }
            for label, v in by_label.items()
            if label != "unconfirmed"
        },
        "spearman_separation_vs_held_out_auroc": _spearman(seps, aurocs),
    }


def triage_summary(report: dict) -> str:
    """A few terminal lines: the count and names per label, then why each concept is flagged.

    The reason is re-derived from the saved entry at the first layer that carries the
    concept's (worst) label; the other layers with that label are listed after it.
    """
    th = TriageThresholds(**report["thresholds"])
    concepts = report["concepts"]
    lines = [f"triage of {len(concepts)} concepts:"]
    for label in LABELS:
        names = report["summary"].get(label, [])
        shown = ", ".join(names[:_SUMMARY_NAMES])
        if len(names) > _SUMMARY_NAMES:
            shown += f", ... (+{len(names) - _SUMMARY_NAMES})"
        lines.append(f"  {label:<12} {len(names):>4}  {shown}")

    layer_keys = {key for c in concepts.values() for key in c["layers"]}
    medians = {
        key: _median_first_pc([c["layers"][key] for c in concepts.values() if key in c["layers"]])
        for key in layer_keys
    }
    flagged = sorted(
        (name for name, c in concepts.items() if c["triage"] != "clean"),
        key=lambda name: (LABELS.index(concepts[name]["triage"]), name),
    )
    if flagged:
        lines.append("not clean:")
    for name in flagged:
        label = concepts[name]["triage"]
        keys = [key for key, e in concepts[name]["layers"].items() if e["triage"] == label]
        reason = _triage(concepts[name]["layers"][keys[0]], medians[keys[0]], th)[1]
        also = f" (also layers {', '.join(keys[1:])})" if len(keys) > 1 else ""
        lines.append(f"  {name}: {label}: {reason} at layer {keys[0]}{also}")
    return "\n".join(lines)
