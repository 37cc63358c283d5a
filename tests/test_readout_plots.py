"""Direction plots: cluster ordering, heatmap PNG content, spectra PNG."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.image import imread

from readout.plots import cluster_order, similarity_heatmap, spectra_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def two_clusters(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Rows near c or near -c, interleaved so that identity order is not already grouped."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(32, generator=gen)
    labels = [0, 1, 1, 0, 1, 0, 0, 1, 0, 1]
    rows = [(1 - 2 * label) * c + 0.1 * torch.randn(32, generator=gen) for label in labels]
    return torch.stack(rows), labels


def assert_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    return image


def test_cluster_order_groups_planted_clusters():
    vectors, labels = two_clusters()
    order = cluster_order(vectors)
    assert sorted(order) == list(range(len(labels)))
    grouped = [labels[i] for i in order]
    # Contiguous blocks: the label changes exactly once along the order.
    assert sum(a != b for a, b in pairwise(grouped)) == 1


@pytest.mark.parametrize("n", [1, 2])
def test_cluster_order_handles_tiny_inputs(n: int):
    assert cluster_order(torch.randn(n, 4)) == list(range(n))


def test_similarity_heatmap_writes_the_clustered_matrix(tmp_path: Path):
    vectors, _ = two_clusters()
    names = [f"concept_{i}" for i in range(len(vectors))]
    path = tmp_path / "plots" / "heatmap.png"
    ordered = similarity_heatmap(vectors, names, path, "layer 12")
    assert ordered == [names[i] for i in cluster_order(vectors)]

    rgb = assert_png(path)[..., :3]
    # Clusters at +c and -c give cosines near +1 and -1 in about half the cells each: with
    # the scale fixed to [-1, 1] both end colours must fill a large area. The colorbar alone
    # shows them too, but in well under 1% of the image.
    for end in (0.0, 1.0):
        colour = np.array(colormaps["RdBu_r"](end)[:3])
        assert (np.abs(rgb - colour).max(axis=-1) < 0.05).mean() > 0.1


def test_similarity_heatmap_rejects_mismatched_names(tmp_path: Path):
    with pytest.raises(ValueError):
        similarity_heatmap(torch.randn(3, 4), ["a", "b"], tmp_path / "h.png", "t")


def test_spectra_plot_writes_png(tmp_path: Path):
    gen = np.random.default_rng(0)
    spectra = {f"c{i}": sorted(gen.random(20) - 0.2, reverse=True) for i in range(150)}
    path = tmp_path / "spectra.png"
    spectra_plot(spectra, path, "layer 12")
    assert_png(path)


def test_spectra_plot_survives_spectra_without_a_positive_top(tmp_path: Path):
    path = tmp_path / "s.png"
    spectra_plot({"a": [0.0, -1.0], "b": []}, path, "t")
    assert_png(path)
