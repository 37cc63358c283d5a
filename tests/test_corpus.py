"""The corpus checker catches each rule violation, and the real corpus passes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from readout.corpus import (
    DEFAULT_ROOT,
    HELD_OUT_STORIES,
    MINIMUMS,
    TRAINED_SETTINGS,
    TRAINED_STORIES,
    check,
    forbidden_forms,
    load,
    trained_concepts,
)

# Filler words for synthetic stories: the checker cares about counts, not meaning.
FILLER = "the tram stopped by the bakery and the driver checked the clock above the door"
WORDS = FILLER.split(" ")


def prose(n: int, seed: int) -> str:
    """Exactly n words of plain filler, distinct per seed."""
    return " ".join(WORDS[(i * (seed + 1)) % len(WORDS)] for i in range(n - 1)) + f" w{seed}."


def write_corpus(
    root: Path,
    stories: dict[str, str],
    paired: dict[str, dict[str, str]],
    held_out: list[str],
    concepts: list[str],
    held_out_stories: dict[str, str] | None = None,
) -> Path:
    for sub in ("stories", "direct", "paired", "held_out"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest = {
        "concepts": {c: {"definition": f"the state {c}", "cluster": "test"} for c in concepts},
        "held_out_scenarios": held_out,
        "held_out_split": "held_out",
    }
    for name, body in (held_out_stories or {}).items():
        (root / "held_out" / f"{name}.txt").write_text(body)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for name, body in stories.items():
        (root / "stories" / f"{name}.txt").write_text(body)
    for scenario, versions in paired.items():
        (root / "paired" / scenario).mkdir()
        for name, body in versions.items():
            (root / "paired" / scenario / f"{name}.txt").write_text(body)
    return root


def block(setting: str | None, text: str) -> str:
    return (f"# setting: {setting}\n" if setting else "") + text


def kinds(problems) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.kind, []).append(p.where + " " + p.message)
    return out


def test_each_rule_is_reported(tmp_path):
    good = "\n\n".join(block(s, prose(100, i)) for i, s in enumerate(["pier", "barn", "attic"]))
    stories = {
        "calm": good,
        "ghost": block("pier", prose(100, 50)),  # not in the manifest
        "short": block("pier", prose(20, 51)),  # under 80 words
        "named": block("pier", prose(90, 52) + " Her hands stayed named and still."),
        "nosetting": prose(100, 53),
        "dup": block("barn", prose(100, 0)),  # same text as calm's first story
        "_neutral": block("yard", prose(100, 54)),
    }
    paired = {
        "quay": {"baseline": prose(100, 60) + " quite bored.", "bored": prose(100, 61)},
        "loft": {"calm": prose(100, 62)},  # no baseline
    }
    root = write_corpus(
        tmp_path,
        stories,
        paired,
        held_out=["quay", "nowhere"],
        concepts=["calm", "short", "named", "nosetting", "dup", "bored"],
    )
    problems, counts = check(root)
    found = kinds(problems)
    assert any("ghost" in w for w in found["unknown concept"])
    assert any("short.txt" in w and "20 words" in w for w in found["length"])
    assert any("named.txt" in w and "'named'" in w for w in found["names its concept"])
    assert any("quay/baseline.txt" in w and "'bored'" in w for w in found["names its concept"])
    assert any("nosetting.txt" in w for w in found["setting"])
    assert any("dup.txt" in w for w in found["duplicate"])
    assert any("loft" in w for w in found["paired"])
    assert any("nowhere" in w for w in found["manifest"])
    assert {w.split()[0] for w in found["minimum"]} == set(MINIMUMS)
    assert counts["trained_concepts"] == 0 and counts["neutral_stories"] == 1


def test_a_clean_corpus_has_no_problems_except_minimums(tmp_path):
    stories = {
        "calm": "\n\n".join(
            block(s, prose(100, i)) for i, s in enumerate(["pier", "barn", "loft"])
        ),
        "_neutral": block("yard", prose(100, 9)),
    }
    root = write_corpus(tmp_path, stories, {}, held_out=[], concepts=["calm"])
    problems, _ = check(root)
    assert {p.kind for p in problems} == {"minimum"}
    corpus = load(root)
    assert len(corpus.positives("calm")) == 3 and len(corpus.neutral()) == 1
    assert {t.setting for t in corpus.positives("calm")} == {"pier", "barn", "loft"}


def test_held_out_split_rules(tmp_path):
    """A trained concept needs its stories over enough settings and held-out stories in
    settings none of its training texts use; held-out text never counts as training."""
    settings = [f"place {k}" for k in range(TRAINED_SETTINGS)]
    train = "\n\n".join(
        block(settings[k % len(settings)], prose(100, k)) for k in range(TRAINED_STORIES)
    )
    held = [block(f"elsewhere {k}", prose(100, 100 + k)) for k in range(HELD_OUT_STORIES)]
    stories = {
        "calm": train,
        "tense": train.replace(" w", " x"),
        "_neutral": block("yard", prose(100, 99)),
    }
    held_out = {
        "calm": "\n\n".join(held),
        # one story in a setting tense's training uses: reported, and tense is not trained
        "tense": "\n\n".join([*held[1:], block("Place 0", prose(100, 200))]).replace(" w", " y"),
        "_neutral": block("yard", prose(100, 300)),  # neutral training prose's setting
    }
    root = write_corpus(tmp_path, stories, {}, [], ["calm", "tense"], held_out)
    problems, counts = check(root)
    found = kinds(problems)
    assert len(found["held-out setting"]) == 2
    assert any("tense.txt" in w and "'Place 0'" in w for w in found["held-out setting"])
    assert any("_neutral.txt" in w for w in found["held-out setting"])
    corpus = load(root)
    assert trained_concepts(corpus) == ["calm", "tense"]  # counts, not settings
    assert counts["trained_concepts"] == 2 and counts["held_out_neutral"] == 1
    assert len(corpus.positives("calm")) == TRAINED_STORIES  # held-out stories excluded
    assert len(corpus.held_out_stories("calm")) == HELD_OUT_STORIES
    assert all(corpus.is_held_out(t) for t in corpus.held_out_stories(None))
    # one story fewer and the concept no longer counts as trained
    (root / "held_out" / "calm.txt").write_text("\n\n".join(held[1:]))
    assert trained_concepts(load(root)) == ["tense"]


def test_forbidden_forms_cover_inflections():
    assert {"nervous", "nervously", "nervousness"} <= set(forbidden_forms("nervous"))
    assert {"angrily", "angriness"} <= set(forbidden_forms("angry"))
    assert set(forbidden_forms("grief_stricken")) == {"grief stricken", "grief-stricken"}


@pytest.mark.skipif(not (DEFAULT_ROOT / "manifest.json").exists(), reason="corpus not built")
def test_the_corpus_passes_its_checker():
    result = subprocess.run(
        [sys.executable, "-m", "readout.corpus", "check"],
        capture_output=True,
        text=True,
        cwd=DEFAULT_ROOT.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:]
