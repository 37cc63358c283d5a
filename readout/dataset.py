"""Offline tool: turn the story corpus into per-concept training pairs and held-out sets.

Every text gets one row (its activations are computed once and shared by all concepts).
For a concept, positives are its texts from stories/, paired/ and direct/; each positive
is paired with `negatives_per_positive` negatives drawn, deterministically from the seed,
from the other concepts' texts, the scenario baselines and the neutral prose. A paired
framing is first matched with its own scenario's baseline: holding the scene fixed and
varying only the inner state is the cleanest contrast the corpus offers.

The held-out split (held_out/ stories, in settings the concept's training texts never
use) and held-out paired scenarios never enter training; they are the evaluation set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from readout.corpus import Corpus, Text


@dataclass
class TrainingSet:
    texts: list[Text]  # one row per unique text
    names: list[str]  # row -> "relative/path#n", for reports
    concepts: list[str]  # readout row order (manifest order, concepts with positives)
    clusters: dict[str, str]
    positives: dict[str, list[int]]
    pairs: dict[str, list[tuple[int, int]]]  # concept -> (positive row, negative row)
    held_out_pos: dict[str, list[int]]
    held_out_neg: list[int]  # every held-out row; a concept's own are removed per concept
    neutral: list[int]  # calibration reference
    skipped: dict[str, str] = field(default_factory=dict)  # concept -> why it has no vector

    def held_out_negatives(self, concept: str) -> list[int]:
        own = set(self.held_out_pos.get(concept, []))
        return [i for i in self.held_out_neg if i not in own]


def build(
    corpus: Corpus, seed: int, negatives_per_positive: int = 4, min_positives: int = 2
) -> TrainingSet:
    """Rows, pairs and held-out sets; the same corpus and seed always give the same pairs."""
    texts = corpus.texts
    names = [f"{t.path.relative_to(corpus.root)}#{t.index + 1}" for t in texts]
    held_out = {i for i, t in enumerate(texts) if corpus.is_held_out(t)}
    train_rows = [i for i in range(len(texts)) if i not in held_out]
    baseline_of = {
        scenario: texts.index(versions["baseline"])
        for scenario, versions in corpus.scenarios.items()
        if "baseline" in versions
    }
    neutral = set(corpus.neutral())
    positives: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    for concept in corpus.definitions:
        rows = [i for i in train_rows if texts[i].concept == concept]
        if len(rows) >= min_positives:
            positives[concept] = rows
        else:
            skipped[concept] = f"{len(rows)} training text(s), need {min_positives}"
    pairs = {
        c: _pairs(c, rows, texts, train_rows, baseline_of, seed, negatives_per_positive)
        for c, rows in positives.items()
    }
    held_out_pos = {c: [i for i in sorted(held_out) if texts[i].concept == c] for c in positives}
    return TrainingSet(
        texts=texts,
        names=names,
        concepts=list(positives),
        clusters=dict(corpus.clusters),
        positives=positives,
        pairs=pairs,
        held_out_pos={c: rows for c, rows in held_out_pos.items() if rows},
        held_out_neg=sorted(held_out),
        neutral=[i for i, t in enumerate(texts) if t in neutral],
        skipped=skipped,
    )


def _pairs(
    concept: str,
    rows: list[int],
    texts: list[Text],
    train_rows: list[int],
    baseline_of: dict[str, int],
    seed: int,
    k: int,
) -> list[tuple[int, int]]:
    # Seeded per concept (string seeds hash stably), so adding a concept to the corpus
    # does not reshuffle every other concept's pairs.
    rng = random.Random(f"{seed}:{concept}")
    pool = [i for i in train_rows if texts[i].concept != concept]
    pairs: list[tuple[int, int]] = []
    draws: list[int] = []
    for p in rows:
        first = baseline_of.get(texts[p].setting) if texts[p].source == "paired" else None
        if first is not None:
            pairs.append((p, first))
        needed = k - (first is not None)
        if len(draws) < needed:  # refill without replacement; reuse only when the pool is spent
            draws += rng.sample(pool, len(pool))
        pairs += [(p, draws.pop()) for _ in range(needed)]
    return pairs
