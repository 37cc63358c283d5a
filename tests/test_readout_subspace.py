"""Direction extraction: CAA, story bases, and the subspace method against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import readout.subspace as subspace
from readout.subspace import caa_direction, story_basis, subspace_direction


def random_basis(gen: torch.Generator, hidden: int, rank: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=gen, dtype=torch.float64))
    return q


def brute_force(
    pos: list[torch.Tensor], neg: list[torch.Tensor], diff: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The method as specified, on the dense hidden x hidden D, in numpy."""
    proj = [[v.numpy() @ v.numpy().T for v in bases] for bases in (pos, neg)]
    evals, evecs = np.linalg.eigh(np.mean(proj[0], axis=0) - np.mean(proj[1], axis=0))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    vecs = evecs[:, :k] * np.where(evecs[:, :k].T @ diff < 0, -1.0, 1.0)
    direction = vecs @ np.clip(evals[:k], 0, None)
    return direction / np.linalg.norm(direction), evals[:20]


def test_caa_is_unit_difference_of_means():
    pos = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0, 2.0]])
    # Means [2, 2, 0] and [0, 0, 2]; a sum instead of a mean would tilt towards pos.
    expected = torch.tensor([2.0, 2.0, -2.0]) / (2 * 3**0.5)
    assert torch.allclose(caa_direction(pos, neg), expected, atol=1e-6)


@pytest.mark.parametrize(("n_tokens", "rank", "hidden"), [(10, 3, 16), (5, 5, 16), (30, 8, 8)])
def test_story_basis_spans_the_rows(n_tokens: int, rank: int, hidden: int):
    gen = torch.Generator().manual_seed(n_tokens)
    tokens = torch.randn(n_tokens, rank, generator=gen) @ torch.randn(rank, hidden, generator=gen)
    v = story_basis(tokens).double()
    assert v.shape == (hidden, np.linalg.matrix_rank(tokens.numpy()))
    assert torch.allclose(v.T @ v, torch.eye(v.shape[1], dtype=torch.float64), atol=1e-5)
    t = tokens.double()
    assert torch.allclose(t @ v @ v.T, t, atol=1e-4)


def test_story_basis_max_rank_keeps_the_strongest_directions():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(12, 6, generator=gen) @ torch.randn(6, 20, generator=gen)
    v = story_basis(tokens, max_rank=2).double().numpy()
    top = np.linalg.svd(tokens.double().numpy())[2][:2].T
    assert v.shape == (20, 2)
    np.testing.assert_allclose(v @ v.T, top @ top.T, atol=1e-5)


@pytest.mark.parametrize(
    ("hidden", "pos_ranks", "neg_ranks"),
    [(40, [3, 4, 2], [5, 3]), (12, [5, 6, 3], [4, 3])],
    ids=["span-smaller-than-hidden", "span-fills-hidden"],
)
def test_subspace_direction_matches_dense_eigh(hidden, pos_ranks, neg_ranks):
    gen = torch.Generator().manual_seed(hidden)
    pos = [random_basis(gen, hidden, r) for r in pos_ranks]
    neg = [random_basis(gen, hidden, r) for r in neg_ranks]
    pos_mean = torch.randn(hidden, generator=gen, dtype=torch.float64)
    neg_mean = torch.randn(hidden, generator=gen, dtype=torch.float64)
    direction, spectrum = subspace_direction(pos, neg, pos_mean, neg_mean, k=5)
    expected, expected_spectrum = brute_force(pos, neg, (pos_mean - neg_mean).numpy(), k=5)
    # The small-span case has zeros between D's positive and negative eigenvalues:
    # the reported spectrum must include them as the dense one does.
    np.testing.assert_allclose(spectrum, expected_spectrum, atol=1e-9)
    np.testing.assert_allclose(direction.numpy(), expected, atol=1e-5)


def test_small_span_never_builds_the_dense_matrix(monkeypatch: pytest.MonkeyPatch):
    def dense(*_):
        raise AssertionError("dense hidden x hidden path used although R < hidden")

    monkeypatch.setattr(subspace, "_eig_full", dense)
    gen = torch.Generator().manual_seed(1)
    hidden = 2048
    pos = [random_basis(gen, hidden, 8) for _ in range(4)]
    neg = [random_basis(gen, hidden, 8) for _ in range(4)]
    direction, spectrum = subspace_direction(pos, neg, pos[0][:, 0], neg[0][:, 0])
    assert direction.shape == (hidden,) and len(spectrum) == 20


def planted_story(gen: torch.Generator, u: torch.Tensor | None, n_tokens: int = 20) -> torch.Tensor:
    """Tokens mixing 4 story-specific directions and, if given, u with a positive weight."""
    hidden = 256
    tokens = torch.randn(n_tokens, 4, generator=gen) @ torch.randn(4, hidden, generator=gen)
    if u is not None:
        tokens += (2 + torch.rand(n_tokens, 1, generator=gen)) * u
    return tokens


@pytest.fixture(scope="module")
def planted() -> dict[str, object]:
    gen = torch.Generator().manual_seed(7)
    u = torch.nn.functional.normalize(torch.randn(256, generator=gen), dim=0)
    # 16 stories a side: the other top-k eigenvalues, about 1/16 each, mix little into u.
    pos_tokens = [planted_story(gen, u) for _ in range(16)]
    neg_tokens = [planted_story(gen, None) for _ in range(16)]
    return {
        "u": u,
        "pos": [story_basis(t) for t in pos_tokens],
        "neg": [story_basis(t) for t in neg_tokens],
        "pos_mean": torch.cat(pos_tokens).mean(0),
        "neg_mean": torch.cat(neg_tokens).mean(0),
    }


def test_subspace_direction_recovers_a_planted_direction(planted):
    direction, spectrum = subspace_direction(
        planted["pos"], planted["neg"], planted["pos_mean"], planted["neg_mean"]
    )
    # Signed: the recovered direction must point along u, not merely be parallel to it.
    assert torch.dot(direction, planted["u"]) > 0.9
    assert spectrum[0] > 0.9 and spectrum == sorted(spectrum, reverse=True)


def test_subspace_direction_orientation_follows_the_means(planted):
    args = planted["pos"], planted["neg"]
    forward, _ = subspace_direction(*args, planted["pos_mean"], planted["neg_mean"])
    backward, _ = subspace_direction(*args, planted["neg_mean"], planted["pos_mean"])
    assert torch.allclose(backward, -forward, atol=1e-6)


def test_negative_eigenvalues_in_the_top_k_are_clamped():
    e = torch.eye(6, dtype=torch.float64)
    # D = e0 e0^T - e1 e1^T - e2 e2^T: top-5 holds -1; unclamped it would pull in e1, e2.
    pos, neg = [e[:, :1]], [e[:, 1:3]]
    direction, spectrum = subspace_direction(pos, neg, e[0] + e[1] + e[2], torch.zeros(6), k=5)
    assert torch.allclose(direction.double(), e[0], atol=1e-6)
    np.testing.assert_allclose(spectrum, [1, 0, 0, 0, -1, -1], atol=1e-9)


def test_no_positive_eigenvalue_falls_back_to_the_oriented_top_eigenvector():
    e = torch.eye(6, dtype=torch.float64)
    # Positives span only what the negative spans: D = diag(-1/3, -2/3) on span(e0, e1).
    pos, neg = [e[:, :1], e[:, :1], e[:, 1:2]], [e[:, :2]]
    direction, spectrum = subspace_direction(pos, neg, -e[0], torch.zeros(6), k=3)
    assert torch.allclose(direction.double(), -e[0], atol=1e-6)
    np.testing.assert_allclose(spectrum, [0, 0, 0, 0, -1 / 3, -2 / 3], atol=1e-9)
