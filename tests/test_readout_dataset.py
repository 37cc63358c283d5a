"""Pairing of the real corpus: one to one, deterministic per seed, held-out text kept out."""

from __future__ import annotations

import pytest

from readout import corpus, dataset


@pytest.fixture(scope="module")
def loaded() -> corpus.Corpus:
    return corpus.load()


def test_pairs_follow_the_rules(loaded):
    ts = dataset.build(loaded, seed=0, negatives_per_positive=4)
    held_out = set(ts.held_out_neg)
    assert held_out and all(loaded.is_held_out(ts.texts[i]) for i in held_out)
    assert {ts.texts[i].source for i in held_out} == {"held_out", "paired"}
    for concept in ts.concepts:
        pairs = ts.pairs[concept]
        assert len(pairs) == 4 * len(ts.positives[concept])  # 4 negatives per positive
        for p, n in pairs:
            assert ts.texts[p].concept == concept and ts.texts[n].concept != concept
            assert p not in held_out and n not in held_out
        for p in ts.positives[concept]:
            text = ts.texts[p]
            if text.source == "paired":
                # the scene held fixed: a framing's first negative is its own baseline
                first = next(n for q, n in pairs if q == p)
                assert ts.texts[first] is loaded.scenarios[text.setting]["baseline"]
    assert set(ts.concepts) | set(ts.skipped) == set(loaded.definitions)
    assert all(
        ts.texts[i].concept is None and ts.texts[i].source in ("stories", "direct")
        for i in ts.neutral
    )


def test_same_seed_same_pairs_other_seed_other_pairs(loaded):
    a, b = dataset.build(loaded, seed=7), dataset.build(loaded, seed=7)
    c = dataset.build(loaded, seed=8)
    assert a.pairs == b.pairs
    assert a.pairs != c.pairs
    # per-concept seeding: the positives are fixed, only the drawn negatives move
    assert all(a.positives[k] == c.positives[k] for k in a.concepts)


def test_held_out_positives_are_scored_against_the_rest(loaded):
    ts = dataset.build(loaded, seed=0)
    for concept, rows in ts.held_out_pos.items():
        negatives = ts.held_out_negatives(concept)
        assert rows and not set(rows) & set(negatives)
        assert set(rows) | set(negatives) == set(ts.held_out_neg)
