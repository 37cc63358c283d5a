"""Diagnostic plots for extracted concept directions: similarity heatmaps, spectra, and
concept axes against human valence ratings.

Figures are built with matplotlib's object API (Figure.savefig renders through Agg for PNG)
rather than pyplot, so plotting works headless and never touches pyplot's global backend
or figure state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

MAX_LABELLED = 160  # beyond this, tick labels overlap into an unreadable block


def _cosine(vectors: Tensor) -> np.ndarray:
    """Cosine-similarity matrix of the rows; a zero row is treated as orthogonal to all."""
    x = vectors.double()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (x @ x.T).clamp(-1.0, 1.0).numpy()


def cluster_order(vectors: Tensor) -> list[int]:
    """Row order that puts similar concepts next to each other.

    Average-linkage clustering on cosine distance; optimal leaf ordering also makes
    neighbouring clusters similar, so the heatmap shows blocks instead of noise.
    """
    n = vectors.shape[0]
    if n < 3:  # linkage needs two rows, and any order of two rows is already optimal
        return list(range(n))
    dist = 1.0 - _cosine(vectors)
    np.fill_diagonal(dist, 0.0)
    # Rounding can leave the matrix a hair off symmetric; average the halves for squareform.
    condensed = squareform((dist + dist.T) / 2, checks=False)
    tree = linkage(condensed, method="average", optimal_ordering=True)
    return leaves_list(tree).tolist()


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)


def similarity_heatmap(vectors: Tensor, names: list[str], path: Path, title: str) -> list[str]:
    """Save a cosine-similarity heatmap of the rows, clustered; return names in plot order.

    The colour scale is fixed to [-1, 1] so heatmaps of different layers or methods are
    comparable by eye.
    """
    if len(names) != vectors.shape[0]:
        raise ValueError(f"{len(names)} names for {vectors.shape[0]} vectors")
    order = cluster_order(vectors)
    sim = _cosine(vectors)[np.ix_(order, order)]
    ordered = [names[i] for i in order]

    n = len(names)
    side = float(np.clip(4 + 0.09 * n, 6, 20))  # room for one label row per concept
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="cosine similarity")
    if n <= MAX_LABELLED:
        # About half of each row's height in points, as the axes get ~2/3 of the figure.
        font = float(np.clip(side * 72 / n * 0.5, 3, 8))
        ax.set_xticks(range(n), ordered, rotation=90, fontsize=font)
        ax.set_yticks(range(n), ordered, fontsize=font)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    return ordered


def _median_curve(curves: list[np.ndarray]) -> np.ndarray:
    """Per-index median over the curves that reach that index and are finite there."""
    length = max(len(c) for c in curves)
    padded = np.full((len(curves), length), np.nan)
    for row, curve in zip(padded, curves, strict=True):
        row[: len(curve)] = curve
    median = np.full(length, np.nan)
    for i in range(length):
        column = padded[:, i][np.isfinite(padded[:, i])]
        if len(column):
            median[i] = np.median(column)
    return median


def spectra_plot(spectra: dict[str, list[float]], path: Path, title: str) -> None:
    """Save each concept's eigenvalue spectrum, normalised by its top eigenvalue, on log y.

    Normalising by the top eigenvalue makes the curves start at 1, so the plot compares
    how fast spectra decay (one dominant direction vs. many) rather than their scale.
    Non-positive eigenvalues cannot sit on a log axis and are left as gaps; concepts whose
    top eigenvalue is not positive have no usable scale and are skipped. If none is left,
    the figure says so instead of raising: it is a diagnostic written at the end of a
    training run, and the degenerate spectra are already in the quality report.
    """
    curves = []
    for values in spectra.values():
        v = np.asarray(values, dtype=np.float64)
        if len(v) and v[0] > 0:
            curves.append(np.where(v > 0, v / v[0], np.nan))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.set_yscale("log")
    if curves:
        # Faint lines so 150 overlapping concepts read as a density rather than a tangle.
        alpha = float(np.clip(10 / len(curves), 0.08, 0.6))
        for curve in curves:
            ax.plot(np.arange(1, len(curve) + 1), curve, color="tab:blue", lw=0.7, alpha=alpha)
        median = _median_curve(curves)
        label = f"median over {len(curves)} concepts"
        ax.plot(np.arange(1, len(median) + 1), median, color="black", lw=2.5, label=label)
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no concept has a positive spectrum", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / top eigenvalue")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def valence_scatter(
    coordinates: list[float], ratings: dict[str, float], names: list[str], path: Path, title: str
) -> None:
    """Each rated concept's coordinate on a principal axis against its human valence
    rating, labelled, with the Pearson r in the title."""
    rated = [k for k, name in enumerate(names) if name in ratings]
    x = np.array([ratings[names[k]] for k in rated])
    y = np.array([coordinates[k] for k in rated])
    r = float(np.corrcoef(x, y)[0, 1]) if len(rated) > 2 else float("nan")
    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot()
    ax.scatter(x, y, s=12)
    for k, xi, yi in zip(rated, x, y, strict=True):
        ax.annotate(names[k], (xi, yi), fontsize=6, alpha=0.7)
    ax.set_xlabel("human valence rating (vader lexicon, -4..+4)")
    ax.set_ylabel("coordinate on the principal axis")
    ax.set_title(f"{title}  (r = {r:+.2f}, {len(rated)} concepts)")
    _save(fig, path)
