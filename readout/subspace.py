"""Concept-direction extraction from activations: pooled diff-of-means and story subspaces.

Diff-of-means (CAA) sees only each story's average activation. The subspace method instead
asks which directions the positive stories' tokens span more often than the negatives'
tokens do: each story contributes the projector onto its token span, and the direction is
built from the top eigenvectors of (mean positive projector - mean negative projector).

All functions are pure and compute in float64; results come back as float32, the dtype the
project stores activations and steering vectors in.
"""

from __future__ import annotations

import math

import scipy.linalg
import torch
from torch import Tensor

# Singular values at or below this fraction of the largest are rounding noise, not span.
BASIS_RTOL = 1e-6
# Pivoted-QR diagonal entries below this fraction of the first mean the column adds no new
# direction; far above float64 noise, far below any real overlap between story spans.
SPAN_RTOL = 1e-10
N_SPECTRUM = 20


def _unit(v: Tensor) -> Tensor:
    norm = v.norm()
    if norm == 0:
        raise ValueError("direction is zero: nothing separates positives from negatives")
    return v / norm


def caa_direction(pos: Tensor, neg: Tensor) -> Tensor:
    """Pooled diff-of-means (CAA): unit(mean(pos rows) - mean(neg rows)), shape [hidden].

    The baseline every other extraction method is compared against.
    """
    if pos.ndim != 2 or neg.ndim != 2 or len(pos) == 0 or len(neg) == 0:
        raise ValueError("pos and neg must be non-empty [n, hidden] matrices")
    diff = pos.double().mean(0) - neg.double().mean(0)
    return _unit(diff).float()


def story_basis(tokens: Tensor, max_rank: int | None = None) -> Tensor:
    """Orthonormal basis [hidden, r] of the span of one story's token activations.

    Not centred: the story's mean activation is part of what it spans. Singular directions
    with s <= s_max * 1e-6 are dropped as numerical noise; `max_rank` keeps only the
    strongest ones, bounding memory and the cost of `subspace_direction`.
    """
    if tokens.ndim != 2:
        raise ValueError("tokens must be [n_tokens, hidden]")
    _, s, vh = torch.linalg.svd(tokens.double(), full_matrices=False)
    rank = int((s > s[0] * BASIS_RTOL).sum()) if len(s) and s[0] > 0 else 0
    if max_rank is not None:
        rank = min(rank, max_rank)
    return vh[:rank].T.float()


def _stack(bases: list[Tensor]) -> Tensor:
    """[V_1 .. V_n] / sqrt(n): its Gram A A^T is the mean projector over the bases."""
    return torch.cat([v.double() for v in bases], dim=1) / math.sqrt(len(bases))


def _eig_small(a: Tensor, b: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    """Eigenpairs of D = A A^T - B B^T computed inside span([A B]).

    D vanishes on the orthogonal complement of that span, so D's spectrum is the small
    problem's spectrum plus (hidden - q) zeros; those zeros are appended so the reported
    spectrum matches the full eigendecomposition. Their eigenvectors are left out: they
    are arbitrary null directions that `subspace_direction` would weight by zero anyway.
    """
    c = torch.cat([a, b], dim=1).numpy()
    # Pivoted QR is rank revealing: after a tiny diagonal entry every remaining column is
    # tiny too, so truncating there keeps the whole span (unpivoted QR gives no such bound).
    q, r, _ = scipy.linalg.qr(c, mode="economic", pivoting=True)
    diag = abs(r.diagonal())
    keep = int((diag > diag[0] * SPAN_RTOL).sum()) if len(diag) and diag[0] > 0 else 0
    q = torch.from_numpy(q[:, :keep])
    qa, qb = q.T @ a, q.T @ b
    evals, evecs = torch.linalg.eigh(qa @ qa.T - qb @ qb.T)
    zeros = torch.zeros(hidden - keep, dtype=torch.float64)
    return torch.cat([evals, zeros]), q @ evecs


def _eig_full(pos_bases: list[Tensor], neg_bases: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of D built densely; only used when the bases span at least hidden dims."""
    hidden = pos_bases[0].shape[0]
    d = torch.zeros(hidden, hidden, dtype=torch.float64)
    # Accumulating per story avoids materialising all basis columns at once.
    for bases, sign in ((pos_bases, 1.0), (neg_bases, -1.0)):
        for v in bases:
            v = v.double()
            d.addmm_(v, v.T, alpha=sign / len(bases))
    return torch.linalg.eigh(d)


def subspace_direction(
    pos_bases: list[Tensor],
    neg_bases: list[Tensor],
    pos_mean: Tensor,
    neg_mean: Tensor,
    k: int = 5,
) -> tuple[Tensor, list[float]]:
    """Direction the positive stories span more than the negatives, and D's top spectrum.

    D = mean_i V_i V_i^T (positives) - mean_j V_j V_j^T (negatives). The direction is
    sum_j max(lambda_j, 0) u_j over D's top-k eigenpairs, unit norm; wrong-sign eigenvalues
    are clamped so directions the negatives span more contribute nothing. Eigenvector signs
    are arbitrary, so each u_j is oriented along pos_mean - neg_mean; otherwise the terms
    could cancel and the direction's sign would be meaningless. If no top-k eigenvalue is
    positive, the oriented top eigenvector of the span's problem is returned instead.

    Returns (direction [hidden] float32, top min(20, hidden) eigenvalues of D, descending).
    """
    if not pos_bases or not neg_bases:
        raise ValueError("need at least one positive and one negative basis")
    if k < 1:
        raise ValueError("k must be >= 1")
    hidden = pos_mean.shape[0]
    if any(v.shape[0] != hidden for v in pos_bases + neg_bases):
        raise ValueError("every basis must be [hidden, r] with hidden = len(pos_mean)")
    n_cols = sum(v.shape[1] for v in pos_bases + neg_bases)
    if n_cols < hidden:
        evals, evecs = _eig_small(_stack(pos_bases), _stack(neg_bases), hidden)
    else:
        evals, evecs = _eig_full(pos_bases, neg_bases)
    if evecs.shape[1] == 0:
        raise ValueError("the bases span nothing: every story's activations are zero")

    spectrum = torch.sort(evals, descending=True).values[:N_SPECTRUM].tolist()
    # Sort the eigenpairs that have vectors (the small path's padded zeros have none).
    order = torch.argsort(evals[: evecs.shape[1]], descending=True)[:k]
    lams, vecs = evals[order], evecs[:, order]

    diff = pos_mean.double() - neg_mean.double()
    signs = torch.where(vecs.T @ diff < 0, -1.0, 1.0).to(torch.float64)
    vecs = vecs * signs
    weights = lams.clamp(min=0)
    if weights.sum() == 0:
        return _unit(vecs[:, 0]).float(), spectrum
    return _unit(vecs @ weights).float(), spectrum
