"""readout.quality: each metric against an independent computation, triage on planted concepts."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from readout.quality import (
    ConceptData,
    LayerData,
    TriageThresholds,
    alignments,
    auroc,
    first_pc_variance_ratio,
    head_decomposition,
    nearest_concepts,
    quality_report,
    ridge_on_others,
    separation,
    single_neuron_alignment,
    spectrum,
    triage_summary,
)

HIDDEN = 32


def f32(x: np.ndarray) -> torch.Tensor:
    """Inputs arrive as float32 in training; the expected values use the same rounded data."""
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- metrics


def test_first_pc_variance_ratio_matches_sklearn_pca():
    rng = np.random.default_rng(0)
    # Anisotropic and far from the origin: the ratio must be about the mean, not the origin.
    x = (rng.normal(size=(40, 10)) * np.linspace(3, 0.5, 10) + 5).astype(np.float32)
    expected = PCA().fit(x.astype(np.float64)).explained_variance_ratio_[0]
    assert first_pc_variance_ratio(f32(x)) == pytest.approx(expected, rel=1e-9)


def test_first_pc_variance_ratio_is_nan_without_variance():
    row = np.random.default_rng(1).normal(size=(1, HIDDEN))
    assert math.isnan(first_pc_variance_ratio(f32(row)))
    assert math.isnan(first_pc_variance_ratio(f32(np.repeat(row, 5, axis=0))))


def test_spectrum_matches_gram_eigenvalues():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 30)) * np.linspace(2, 0.2, 30) + 0.5
    lam = np.sort(np.clip(np.linalg.eigvalsh(x @ x.T), 0, None))[::-1]  # uncentred Gram
    share = lam / lam.sum()
    k90 = next(k for k in range(1, len(share) + 1) if share[:k].sum() >= 0.9)
    out = spectrum(torch.as_tensor(x), top=5)
    assert out["first_pc_ratio"] == pytest.approx(share[0], rel=1e-9)
    assert out["eigenvalues"] == pytest.approx(share[:5], rel=1e-9)
    assert out["k_signal_at_90pct"] == k90
    assert out["effective_dim"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-9)


def test_spectrum_of_one_direction_is_rank_one():
    rng = np.random.default_rng(3)
    x = np.outer(rng.normal(size=6), rng.normal(size=HIDDEN))
    out = spectrum(torch.as_tensor(x))
    assert out["first_pc_ratio"] == pytest.approx(1.0)
    assert out["k_signal_at_90pct"] == 1
    assert out["effective_dim"] == pytest.approx(1.0)


def test_alignments_are_cosines_relative_to_the_centre():
    rng = np.random.default_rng(4)
    acts, centre, d = rng.normal(size=(9, HIDDEN)), rng.normal(size=HIDDEN), rng.normal(size=HIDDEN)
    rel = acts - centre
    expected = rel @ d / (np.linalg.norm(rel, axis=1) * np.linalg.norm(d))
    got = alignments(torch.as_tensor(d), torch.as_tensor(acts), torch.as_tensor(centre))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("scale", [3.0, -3.0])
def test_single_neuron_alignment_finds_the_planted_column(scale: float):
    rng = np.random.default_rng(5)
    w = rng.normal(size=(HIDDEN, 200))
    d = unit(rng.normal(size=HIDDEN))
    w[:, 137] = scale * d + 0.05 * rng.normal(size=HIDDEN)
    out = single_neuron_alignment(f32(d), f32(w))
    assert out["neuron"] == 137
    col = w[:, 137].astype(np.float32).astype(np.float64)
    expected = col @ d.astype(np.float32) / np.linalg.norm(col) / np.linalg.norm(d)
    assert out["cosine"] == pytest.approx(expected, rel=1e-6)
    assert np.sign(out["cosine"]) == np.sign(scale) and abs(out["cosine"]) > 0.99


def test_nearest_concepts_matches_brute_force():
    rng = np.random.default_rng(6)
    v = unit(rng.normal(size=(7, HIDDEN)))
    names = [f"c{i}" for i in range(7)]
    got = nearest_concepts(torch.as_tensor(v), names, k=3)
    for i in range(7):
        others = sorted(((float(v[i] @ v[j]), names[j]) for j in range(7) if j != i), reverse=True)
        assert [n for n, _ in got[i]] == [n for _, n in others[:3]]
        assert [c for _, c in got[i]] == pytest.approx([c for c, _ in others[:3]], rel=1e-12)
    assert all(len(row) == 6 for row in nearest_concepts(torch.as_tensor(v), names, k=50))


def test_ridge_on_others_matches_sklearn_ridge():
    rng = np.random.default_rng(7)
    v = unit(rng.normal(size=(7, HIDDEN)))
    v[6] = unit(0.7 * v[0] - 0.5 * v[3] + 0.02 * rng.normal(size=HIDDEN))
    names = [f"c{i}" for i in range(7)]
    lam = 0.05
    got = ridge_on_others(torch.as_tensor(v), names, lam=lam, k=3)
    for i in range(7):
        others = [j for j in range(7) if j != i]
        x = v[others].T  # features = the other directions, samples = hidden coordinates
        model = Ridge(alpha=lam, fit_intercept=False).fit(x, v[i])
        resid = v[i] - model.predict(x)
        assert got[i]["r2"] == pytest.approx(1 - resid @ resid / (v[i] @ v[i]), abs=1e-9)
        order = np.argsort(-np.abs(model.coef_))[:3]
        assert [n for n, _ in got[i]["top"]] == [names[others[j]] for j in order]
        assert [b for _, b in got[i]["top"]] == pytest.approx(model.coef_[order], abs=1e-9)
    assert got[6]["r2"] > 0.9
    assert {n for n, _ in got[6]["top"][:2]} == {"c0", "c3"}


def test_ridge_on_others_needs_two_concepts():
    assert ridge_on_others(torch.ones(1, HIDDEN), ["only"]) == [{"r2": 0.0, "top": []}]


N_HEADS, HEAD_DIM = 8, 4


def head_setup(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    o_proj = rng.normal(size=(HIDDEN, N_HEADS * HEAD_DIM))
    neg = rng.normal(size=(10, N_HEADS * HEAD_DIM))
    pos = rng.normal(size=(12, N_HEADS * HEAD_DIM))
    return unit(rng.normal(size=HIDDEN)), o_proj, pos, neg


def head_slice(h: int) -> slice:
    return slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)


def test_head_contributions_match_per_head_matmul():
    d, o_proj, pos, neg = head_setup(8)
    gap = pos.mean(0) - neg.mean(0)
    c = np.array([d @ o_proj[:, head_slice(h)] @ gap[head_slice(h)] for h in range(N_HEADS)])
    out = head_decomposition(*map(torch.as_tensor, (d, o_proj, pos, neg)), N_HEADS, top=3)
    order = np.argsort(-np.abs(c))
    assert [h for h, _, _ in out["heads"]] == order[:3].tolist()
    assert [ch for _, ch, _ in out["heads"]] == pytest.approx(c[order[:3]], rel=1e-9)
    share = np.abs(c) / np.abs(c).sum()
    assert [s for _, _, s in out["heads"]] == pytest.approx(share[order[:3]], rel=1e-9)
    assert out["head_concentration"] == pytest.approx(share[order[:2]].sum(), rel=1e-9)


def test_head_decomposition_one_head_carries_the_gap():
    d, o_proj, pos, neg = head_setup(9)
    pos = pos - pos.mean(0) + neg.mean(0)  # same means everywhere ...
    pos[:, head_slice(2)] += [1.0, -2.0, 0.5, 3.0]  # ... except head 2
    out = head_decomposition(*map(torch.as_tensor, (d, o_proj, pos, neg)), N_HEADS)
    expected_c2 = d @ o_proj[:, head_slice(2)] @ np.array([1.0, -2.0, 0.5, 3.0])
    assert out["heads"][0] == pytest.approx([2, expected_c2, 1.0], rel=1e-9)
    assert out["head_concentration"] == pytest.approx(1.0, abs=1e-9)


def test_head_decomposition_even_spread_is_a_quarter():
    d, o_proj, pos, neg = head_setup(10)
    pos = pos - pos.mean(0) + neg.mean(0)
    for h in range(N_HEADS):
        # Each head moves its input along its own read of the direction, for |c_h| = 1
        # with alternating signs: the shares must use |c_h|.
        write = o_proj[:, head_slice(h)].T @ d
        pos[:, head_slice(h)] += (-1) ** h * write / (write @ write)
    out = head_decomposition(*map(torch.as_tensor, (d, o_proj, pos, neg)), N_HEADS, top=8)
    assert out["head_concentration"] == pytest.approx(0.25, abs=1e-9)
    assert sorted(c for _, c, _ in out["heads"]) == pytest.approx([-1.0] * 4 + [1.0] * 4)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(11)
    pos, neg = rng.integers(0, 5, size=30), rng.integers(0, 4, size=25)  # many ties
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    expected = roc_auc_score(labels, np.r_[pos, neg])
    assert auroc(f32(pos), f32(neg)) == pytest.approx(expected, rel=1e-12)
    assert auroc(f32([3.0, 4.0]), f32([1.0, 2.0])) == 1.0
    assert auroc(f32([1.0, 2.0]), f32([3.0, 4.0])) == 0.0


def test_auroc_is_nan_with_an_empty_side():
    assert math.isnan(auroc(f32([]), f32([1.0])))
    assert math.isnan(auroc(f32([1.0]), f32([])))


def test_separation_matches_numpy():
    rng = np.random.default_rng(12)
    pos, neg = rng.normal(1.0, 2.0, size=20), rng.normal(0.0, 0.5, size=15)
    pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2)
    got = separation(torch.as_tensor(pos), torch.as_tensor(neg))
    assert got == pytest.approx((pos.mean() - neg.mean()) / pooled, rel=1e-12)
    # One positive: its variance counts as 0, not nan.
    single = separation(torch.tensor([2.0]), torch.as_tensor(neg))
    assert single == pytest.approx((2.0 - neg.mean()) / np.sqrt(neg.var(ddof=1) / 2), rel=1e-6)


def test_separation_without_spread():
    same = torch.tensor([1.0, 1.0, 1.0])
    assert separation(same, torch.zeros(2)) == math.inf
    assert separation(torch.zeros(2), same) == -math.inf
    assert separation(same, same[:2]) == 0.0
    assert math.isnan(separation(same, torch.zeros(0)))


# ---------------------------------------------------------------- triage on planted concepts

N_POS, N_HELD, NOISE = 8, 4, 0.2
BASIS = np.linalg.qr(np.random.default_rng(20).normal(size=(HIDDEN, HIDDEN)))[0].T  # rows
CENTRE = 2 * np.random.default_rng(21).normal(size=HIDDEN)


@dataclasses.dataclass(frozen=True)
class Planted:
    """A synthetic concept: its positives carry `signal` (several = separate groups of them).

    kinds, per layer: "clean" (positives = neutral + 4 signal), "weak" (each positive is its
    negative + 0.3 signal, but the pairs spread +-1.5 along the direction, so d' < 1 while
    every pair agrees), "flipped" (training pairs clean, held-out positives carry -signal).
    """

    name: str
    signal: list[np.ndarray]
    kinds: tuple[str, ...]
    cluster: str | None = None
    vector_sign: float = 1.0  # -1: the reported direction points against its own stories
    held_out: bool = True


def build_world(
    planted: list[Planted],
) -> tuple[list[ConceptData], list[LayerData], list[str]]:
    """Layer 0 has MLP/attention weights, later layers have none."""
    text_names: list[str] = []

    def texts(prefix: str, n: int) -> list[int]:
        text_names.extend(f"{prefix}{i}" for i in range(n))
        return list(range(len(text_names) - n, len(text_names)))

    concepts = []
    for p in planted:
        pos, neg = texts(f"{p.name}/pos", N_POS), texts(f"{p.name}/neg", N_POS)
        held = (texts(f"{p.name}/hpos", N_HELD), texts(f"{p.name}/hneg", N_HELD))
        held_pos, held_neg = held if p.held_out else ([], [])
        pairs = list(zip(pos, neg, strict=True))
        concepts.append(ConceptData(p.name, p.cluster, pos, pairs, held_pos, held_neg))

    layers = []
    for layer in range(len(planted[0].kinds)):
        rng = np.random.default_rng(100 + layer)
        acts = CENTRE + NOISE * rng.normal(size=(len(text_names), HIDDEN))  # all neutral prose
        for p, c in zip(planted, concepts, strict=True):
            v = unit(sum(p.signal))
            signal = np.array([p.signal[i % len(p.signal)] for i in range(N_POS)])
            pos, neg = [a for a, _ in c.pairs], [b for _, b in c.pairs]
            if p.kinds[layer] == "weak":
                spread = np.linspace(-1.5, 1.5, N_POS)[:, None] * v
                acts[neg] = CENTRE + spread + 0.01 * rng.normal(size=(N_POS, HIDDEN))
                acts[pos] = acts[neg] + 0.3 * signal + 0.01 * rng.normal(size=(N_POS, HIDDEN))
            else:
                acts[pos] += 4 * signal
            if c.held_out_pos:
                gain = {"flipped": -4, "unheld": 0}.get(p.kinds[layer], 4)
                acts[c.held_out_pos] += gain * signal[:N_HELD]
        vectors = np.array([p.vector_sign * unit(sum(p.signal)) for p in planted])
        weights = layer == 0
        layers.append(
            LayerData(
                layer=layer,
                detectors=f32(vectors),
                directions=f32(vectors),
                acts=f32(acts),
                centre=f32(CENTRE),
                down_proj=f32(rng.normal(size=(HIDDEN, 64))) if weights else None,
                o_proj=f32(rng.normal(size=(HIDDEN, HIDDEN))) if weights else None,
                head_inputs=f32(rng.normal(size=(len(text_names), HIDDEN))) if weights else None,
                n_heads=N_HEADS,
            )
        )
    return concepts, layers, text_names


B = BASIS
MAIN = [
    Planted("clean_a", [B[0]], ("clean", "clean"), cluster="calm"),
    Planted("clean_b", [B[1]], ("clean", "clean"), cluster="calm"),
    Planted("clean_c", [B[2]], ("clean", "clean"), cluster="calm"),
    Planted("twin_1", [B[3]], ("clean", "clean")),
    Planted("twin_2", [B[3]], ("clean", "clean")),
    Planted("weak", [B[4]], ("weak", "clean")),
    Planted("flipped", [B[5]], ("flipped", "clean")),
    Planted("fragmented", [B[6], B[7]], ("clean", "clean")),
    Planted("mixed", [B[8], B[9]], ("clean", "weak")),
    Planted("unheld", [B[10]], ("unheld", "clean")),
]
# name -> (label at layer 0, label at layer 1, concept label)
EXPECTED = {
    "clean_a": ("clean", "clean", "clean"),
    "clean_b": ("clean", "clean", "clean"),
    "clean_c": ("clean", "clean", "clean"),
    "twin_1": ("redundant", "redundant", "redundant"),
    "twin_2": ("redundant", "redundant", "redundant"),
    "weak": ("weak", "clean", "weak"),
    "flipped": ("sign-flipped", "clean", "sign-flipped"),
    "fragmented": ("fragmented", "fragmented", "fragmented"),
    "mixed": ("fragmented", "weak", "weak"),
    "unheld": ("unconfirmed", "clean", "unconfirmed"),
}
EXTRA = {"weak": {0: {"probe_accuracy": 0.61}}}


@pytest.fixture(scope="module")
def world() -> tuple[list[ConceptData], list[LayerData], list[str]]:
    return build_world(MAIN)


@pytest.fixture(scope="module")
def report(world) -> dict:
    # Round-tripped through JSON, as quality.json is read back (and strict: no nan/inf left).
    return json.loads(json.dumps(quality_report(*world, extra=EXTRA), allow_nan=False))


@pytest.mark.parametrize("name", EXPECTED)
def test_triage_labels(report: dict, name: str):
    concept = report["concepts"][name]
    layer0, layer1, overall = EXPECTED[name]
    assert (concept["layers"]["0"]["triage"], concept["layers"]["1"]["triage"]) == (layer0, layer1)
    assert concept["triage"] == overall  # the worst over layers
    assert name in report["summary"][overall]


def test_the_metrics_behind_the_labels(report: dict):
    c = {name: report["concepts"][name]["layers"]["0"] for name in EXPECTED}
    assert c["twin_1"]["ridge"]["r2"] > 0.99 and c["twin_1"]["ridge"]["top"][0][0] == "twin_2"
    assert c["clean_a"]["ridge"]["r2"] < 0.1
    assert c["weak"]["separation"] < 1 and c["weak"]["pair_agreement"] == 1.0
    assert c["clean_a"]["separation"] > 5
    assert c["flipped"]["held_out_auroc"] == 0.0 and c["flipped"]["separation"] > 5
    assert c["clean_a"]["held_out_auroc"] == 1.0
    assert 0.35 < c["fragmented"]["spectrum"]["first_pc_ratio"] < 0.6
    assert c["fragmented"]["spectrum"]["k_signal_at_90pct"] >= 2
    assert c["clean_a"]["spectrum"]["first_pc_ratio"] > 0.8
    assert c["clean_a"]["cluster_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert c["twin_1"]["cluster_cosine"] is None


def test_agreement_compares_training_evidence_with_held_out(report: dict):
    """Judged on training evidence alone, flipped (layer 0) and unheld (layer 0) look
    clean; held-out AUROC shows they are not, and the agreement report says so."""
    agreement = report["agreement"]
    clean = agreement["by_training_label"]["clean"]
    aurocs = [
        c["layers"][k]["held_out_auroc"] for c in report["concepts"].values() for k in ("0", "1")
    ]
    assert agreement["entries_with_held_out"] == agreement["entries"] == len(aurocs)
    assert clean["min_held_out_auroc"] == 0.0  # flipped at layer 0
    assert 0.0 < clean["share_confirmed"] < 1.0
    assert report["concepts"]["unheld"]["layers"]["0"]["held_out_auroc"] < 0.8
    assert "unconfirmed" not in agreement["by_training_label"]
    assert -1.0 <= agreement["spearman_separation_vs_held_out_auroc"] <= 1.0


def test_report_entries_match_independent_computation(world):
    concepts, layers, text_names = world
    # Detectors unlike the directions, so each metric shows which of the two it reads:
    # scoring metrics the detectors, geometric ones the directions.
    gen = torch.Generator().manual_seed(5)
    layers = [
        dataclasses.replace(
            layer,
            detectors=torch.nn.functional.normalize(
                layer.directions + 0.7 * torch.randn(layer.directions.shape, generator=gen), dim=1
            ),
        )
        for layer in layers
    ]
    report = quality_report(concepts, layers, text_names)
    i = 7  # fragmented
    c, layer = concepts[i], layers[0]
    entry = report["concepts"][c.name]["layers"]["0"]
    acts, centre = layer.acts.double().numpy(), layer.centre.double().numpy()
    vectors = layer.directions.double().numpy()
    v, detector = vectors[i], layer.detectors[i].double().numpy()
    assert abs(v @ detector) < 0.9
    score = (acts - centre) @ detector
    pos, neg = c.positives, [b for _, b in c.pairs]
    pooled = np.sqrt((score[pos].var(ddof=1) + score[neg].var(ddof=1)) / 2)
    assert entry["separation"] == pytest.approx((score[pos].mean() - score[neg].mean()) / pooled)
    assert entry["pair_agreement"] == np.mean((acts[pos] - acts[neg]) @ detector > 0)
    labels = np.r_[np.ones(N_HELD), np.zeros(N_HELD)]
    held = np.r_[score[c.held_out_pos], score[c.held_out_neg]]
    assert entry["held_out_auroc"] == pytest.approx(roc_auc_score(labels, held))
    pca = PCA().fit(acts[pos]).explained_variance_ratio_[0]
    assert entry["first_pc_variance_ratio"] == pytest.approx(pca)

    rel = acts[pos] - centre
    cos = rel @ v / np.linalg.norm(rel, axis=1)
    assert list(entry["alignment"]["per_story"]) == [text_names[j] for j in pos]
    assert list(entry["alignment"]["per_story"].values()) == pytest.approx(cos)
    assert entry["alignment"]["mean"] == pytest.approx(cos.mean())
    worst = np.argsort(cos)[:2]
    assert [n for n, _ in entry["alignment"]["worst"]] == [text_names[pos[j]] for j in worst]

    others = sorted(((v @ vectors[j], c2.name) for j, c2 in enumerate(concepts) if j != i))[::-1]
    assert [n for n, _ in entry["nearest"]] == [n for _, n in others[:5]]

    w = layer.down_proj.double().numpy()
    neuron_cos = v @ w / np.linalg.norm(w, axis=0)
    assert entry["single_neuron"]["neuron"] == int(np.argmax(np.abs(neuron_cos)))

    z, o_proj = layer.head_inputs.double().numpy(), layer.o_proj.double().numpy()
    gap = z[pos].mean(0) - z[neg].mean(0)
    c_h = [v @ o_proj[:, head_slice(h)] @ gap[head_slice(h)] for h in range(N_HEADS)]
    assert entry["per_head"]["heads"][0][0] == int(np.argmax(np.abs(c_h)))
    assert entry["per_head"]["heads"][0][1] == pytest.approx(c_h[entry["per_head"]["heads"][0][0]])

    at_layer1 = report["concepts"][c.name]["layers"]["1"]
    assert at_layer1["single_neuron"] is None and at_layer1["per_head"] is None


def test_report_shape_and_extra(report: dict):
    assert report["thresholds"]["weak_separation"] == 1.0
    assert report["concepts"]["weak"]["layers"]["0"]["probe_accuracy"] == 0.61
    assert "probe_accuracy" not in report["concepts"]["weak"]["layers"]["1"]
    twin = report["concepts"]["twin_1"]
    assert (twin["cluster"], twin["n_positives"], twin["n_pairs"]) == (None, N_POS, N_POS)
    assert set(report["summary"]) == {
        "sign-flipped",
        "weak",
        "unconfirmed",
        "redundant",
        "fragmented",
        "clean",
    }
    assert sum(len(names) for names in report["summary"].values()) == len(MAIN)


def test_nan_becomes_none(world):
    concepts, layers, text_names = world
    lonely = dataclasses.replace(
        concepts[0], positives=concepts[0].positives[:1], held_out_pos=[], held_out_neg=[]
    )
    report = quality_report([lonely, *concepts[1:]], layers, text_names)
    json.dumps(report, allow_nan=False)  # raises on any nan left
    entry = report["concepts"]["clean_a"]["layers"]["0"]
    assert entry["first_pc_variance_ratio"] is None  # one positive
    assert entry["held_out_auroc"] is None


def test_cluster_and_pair_agreement_sign_flips():
    planted = [
        *(dataclasses.replace(p, kinds=("clean",)) for p in MAIN[:3]),
        Planted("mate_1", [B[10]], ("clean",), cluster="joy"),
        Planted("mate_2", [unit(B[10] + 0.2 * B[11])], ("clean",), cluster="joy"),
        Planted("anti", [unit(-B[10] + 0.2 * B[12])], ("clean",), cluster="joy"),
        Planted("pair_1", [B[13]], ("clean",), cluster="duo"),
        Planted("pair_2", [-B[13]], ("clean",), cluster="duo"),
        Planted("inverted", [B[14]], ("clean",), vector_sign=-1.0, held_out=False),
    ]
    entries = {
        name: c["layers"]["0"]
        for name, c in quality_report(*build_world(planted))["concepts"].items()
    }
    # anti's own stories agree with it; only its cluster says it points the wrong way.
    assert entries["anti"]["pair_agreement"] == 1.0 and entries["anti"]["held_out_auroc"] == 1.0
    assert entries["anti"]["cluster_cosine"] < -0.9
    assert entries["anti"]["triage"] == "sign-flipped"
    assert entries["mate_1"]["triage"] != "sign-flipped"
    # One mate is not enough evidence, however opposed.
    assert entries["pair_2"]["cluster_cosine"] is None
    assert entries["pair_2"]["triage"] != "sign-flipped"
    # Pairs against the direction: sign-flipped, though d' < 1 would also say "weak".
    assert entries["inverted"]["pair_agreement"] == 0.0
    assert entries["inverted"]["separation"] < -1
    assert entries["inverted"]["triage"] == "sign-flipped"


def test_fragmented_is_relative_to_the_layer():
    # Every concept split in two: that is how this layer is, not a fault of one direction.
    planted = [Planted(f"split_{k}", [B[2 * k], B[2 * k + 1]], ("clean",)) for k in range(4)]
    report = quality_report(*build_world(planted))
    ratios = [c["layers"]["0"]["spectrum"]["first_pc_ratio"] for c in report["concepts"].values()]
    assert max(ratios) < 0.6
    assert report["summary"]["clean"] == [p.name for p in planted]


def test_triage_summary_names_every_flagged_concept(report: dict):
    text = triage_summary(report)
    lines = text.splitlines()
    flagged = [line for line in lines if line.startswith("  ") and ": " in line]
    for name, (_, _, label) in EXPECTED.items():
        mentioned = [line for line in flagged if line.strip().startswith(f"{name}: ")]
        if label == "clean":
            assert not mentioned
        else:
            assert len(mentioned) == 1 and f": {label}: " in mentioned[0]
    reason = {line.strip().split(":")[0]: line for line in flagged}
    assert "d'=0." in reason["weak"] and "at layer 0" in reason["weak"]
    assert "d'=0." in reason["mixed"] and "at layer 1" in reason["mixed"]
    assert "AUROC 0.00" in reason["flipped"]
    assert "R^2=" in reason["twin_1"] and "twin_2" in reason["twin_1"]
    assert "also layers 1" in reason["twin_1"]
    assert "first-PC ratio" in reason["fragmented"]
    weak_line = next(line for line in lines if line.split()[:1] == ["weak"])
    assert weak_line.split()[1] == "2"


def test_triage_summary_shortens_long_lists():
    names = [f"c{i:02d}" for i in range(13)]
    report = {
        "thresholds": dataclasses.asdict(TriageThresholds()),
        "concepts": {n: {"triage": "clean", "layers": {}} for n in names},
        "summary": {"clean": names},
    }
    clean_line = next(line for line in triage_summary(report).splitlines() if "clean" in line)
    assert "c09" in clean_line and "c10" not in clean_line and "(+3)" in clean_line


def test_ridge_regresses_only_on_usable_concepts():
    v = unit(np.random.default_rng(5).normal(size=(6, HIDDEN)))
    usable = [True, True, False, True, True, True]
    names = [f"c{i}" for i in range(6)]
    got = ridge_on_others(f32(v), names, lam=0.05, usable=usable)
    for i in range(6):
        others = [j for j in range(6) if j != i and usable[j]]
        fit = Ridge(alpha=0.05, fit_intercept=False).fit(v[others].T, v[i])
        resid = v[i] - fit.predict(v[others].T)
        assert got[i]["r2"] == pytest.approx(1 - resid @ resid / (v[i] @ v[i]), abs=1e-5)
        assert "c2" not in [name for name, _ in got[i]["top"]]


def _mean_diff_refit(acts: torch.Tensor):
    """An independent aggregator for the refit callback: unit mean of pair deltas."""

    def refit(_concept: str, _layer: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
        deltas = acts[[p for p, _ in pairs]] - acts[[n for _, n in pairs]]
        return deltas.mean(dim=0) / deltas.mean(dim=0).norm()

    return refit


@pytest.mark.parametrize("signal", [0.0, 3.0])
def test_cross_validated_separation_sees_through_overfitting(signal: float):
    # Eight pairs in 32 dimensions: a direction fitted to them always separates them
    # in-sample; only the cross-validated d' tells noise (signal 0) from a real plant.
    rng = np.random.default_rng(11)
    u = unit(rng.normal(size=HIDDEN))
    acts = rng.normal(size=(16, HIDDEN))
    acts[:8] += signal * u
    acts_t = f32(acts)
    concept = ConceptData("c", None, list(range(8)), [(i, 8 + i) for i in range(8)], [], [])
    refit = _mean_diff_refit(acts_t)
    v = refit("c", 0, concept.pairs)
    layer = LayerData(0, v[None], v[None], acts_t, torch.zeros(HIDDEN), None, None, None, 1)
    entry = quality_report([concept], [layer], [str(i) for i in range(16)], refit=refit)
    entry = entry["concepts"]["c"]["layers"]["0"]
    # independent leave-one-out: refit by hand with numpy, score the left-out pair
    pos, neg = [], []
    for i in range(8):
        keep = [j for j in range(8) if j != i]
        w = (acts[keep] - acts[[8 + j for j in keep]]).mean(axis=0)
        w /= np.linalg.norm(w)
        pos.append(acts[i] @ w)
        neg.append(acts[8 + i] @ w)
    pooled = math.sqrt((np.var(pos, ddof=1) + np.var(neg, ddof=1)) / 2)
    assert entry["separation"] == pytest.approx((np.mean(pos) - np.mean(neg)) / pooled, rel=1e-4)
    assert entry["separation_in_sample"] > 1.5  # overfitting flatters even pure noise
    if signal == 0.0:
        assert entry["separation"] < 1.0 and entry["triage"] == "weak"
    else:
        assert entry["separation"] > 2.0 and entry["triage"] != "weak"


def test_a_concept_without_signal_is_weak_against_neutral_text():
    # Its negatives carry another concept's direction w, it carries nothing: diff-of-means
    # points along -w and separates it from its negatives perfectly well; only the
    # neutral reference shows there is nothing of its own.
    rng = np.random.default_rng(3)
    w = unit(rng.normal(size=HIDDEN))
    acts = 0.1 * rng.normal(size=(24, HIDDEN))
    acts[8:16] += 3.0 * w  # negatives; rows 16..23 are neutral reference text
    acts_t = f32(acts)
    concept = ConceptData("c", None, list(range(8)), [(i, 8 + i) for i in range(8)], [], [])
    refit = _mean_diff_refit(acts_t)
    v = refit("c", 0, concept.pairs)[None]
    layer = LayerData(0, v, v, acts_t, torch.zeros(HIDDEN), None, None, None, 1)
    names = [str(i) for i in range(24)]
    entry = quality_report([concept], [layer], names, refit=refit, reference=list(range(16, 24)))
    entry = entry["concepts"]["c"]["layers"]["0"]
    assert entry["separation"] > 5
    assert abs(entry["separation_from_neutral"]) < 1.0
    assert entry["triage"] == "weak"
