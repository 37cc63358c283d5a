"""Offline tool: load and check the amygdala_stories corpus.

    python -m readout.corpus check [--root amygdala_stories]

The loader defines the corpus format in code (see amygdala_stories/README.md); the
readout trainers read the corpus through it, and the checker enforces the style rules a
program can check plus the size minimums the readout needs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "amygdala_stories"
MIN_WORDS, MAX_WORDS = 80, 200
# A trained concept has this many stories in stories/ over this many settings, and
# this many held-out stories, none in a setting its training texts use.
TRAINED_STORIES, TRAINED_SETTINGS, HELD_OUT_STORIES = 12, 4, 3
MINIMUMS = {
    "concepts": 150,  # in the manifest
    "trained_concepts": 100,  # with the stories and held-out stories above
    "paired_scenarios": 12,  # each with a baseline and >= 4 framings
    "neutral_stories": 80,
    "held_out_neutral": 30,
}


@dataclass(frozen=True)
class Text:
    """One story. `concept` is None for neutral prose and scenario baselines."""

    concept: str | None
    source: str  # "stories", "paired", "direct" or "held_out"
    text: str
    setting: str | None
    path: Path
    index: int  # position in its file

    @property
    def where(self) -> str:
        return f"{self.path}#{self.index + 1}"


@dataclass
class Corpus:
    root: Path
    definitions: dict[str, str]
    clusters: dict[str, str]
    held_out: list[str]  # paired scenarios kept out of training
    held_out_split: str | None = None  # folder of held-out stories
    texts: list[Text] = field(default_factory=list)
    # scenario -> {"baseline" or concept: Text}
    scenarios: dict[str, dict[str, Text]] = field(default_factory=dict)

    def is_held_out(self, t: Text) -> bool:
        """Evaluation text, never seen by a trainer: the held-out split and scenarios."""
        return t.source == "held_out" or (t.source == "paired" and t.setting in self.held_out)

    def positives(self, concept: str) -> list[Text]:
        """A concept's training texts (stories, direct descriptions, paired framings)."""
        return [t for t in self.texts if t.concept == concept and not self.is_held_out(t)]

    def neutral(self) -> list[Text]:
        """Neutral training prose (the calibration reference)."""
        return [t for t in self.texts if t.concept is None and t.source in ("stories", "direct")]

    def held_out_stories(self, concept: str | None) -> list[Text]:
        """The held-out split's stories of a concept (None: its neutral prose)."""
        return [t for t in self.texts if t.source == "held_out" and t.concept == concept]


def _blocks(path: Path) -> list[tuple[str | None, str]]:
    """(setting, text) per blank-line-separated block; '#' lines are metadata."""
    out = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        lines = [line.strip() for line in block.strip().splitlines()]
        meta = [line for line in lines if line.startswith("#")]
        text = " ".join(line for line in lines if line and not line.startswith("#"))
        setting = next(
            (m.split(":", 1)[1].strip() for m in meta if m.lower().startswith("# setting:")), None
        )
        if text or meta:
            out.append((setting, text))
    return out


def _concept_of(path: Path) -> str | None:
    return None if path.stem.startswith("_") else path.stem


def load(root: Path = DEFAULT_ROOT) -> Corpus:
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    concepts = manifest["concepts"]
    corpus = Corpus(
        root,
        {c: v["definition"] for c, v in concepts.items()},
        {c: v["cluster"] for c, v in concepts.items()},
        list(manifest.get("held_out_scenarios", [])),
        manifest.get("held_out_split"),
    )
    folders = {"stories": "stories", "direct": "direct"}
    if corpus.held_out_split:
        folders["held_out"] = corpus.held_out_split
    for source, folder in folders.items():
        for path in sorted((root / folder).glob("*.txt")):
            for i, (setting, text) in enumerate(_blocks(path)):
                corpus.texts.append(Text(_concept_of(path), source, text, setting, path, i))
    for scenario_dir in sorted(p for p in (root / "paired").iterdir() if p.is_dir()):
        versions = {}
        for path in sorted(scenario_dir.glob("*.txt")):
            text = " ".join(b[1] for b in _blocks(path))
            concept = None if path.stem == "baseline" else path.stem
            versions[path.stem] = Text(concept, "paired", text, scenario_dir.name, path, 0)
            corpus.texts.append(versions[path.stem])
        corpus.scenarios[scenario_dir.name] = versions
    return corpus


def forbidden_forms(concept: str) -> list[str]:
    """The concept's own word(s) and the inflections the style rules exclude."""
    words = concept.split("_")
    if len(words) > 1:
        return [" ".join(words), "-".join(words)]
    (word,) = words
    forms = {word, word + "s", word + "ly", word + "ness", word + "ed", word + "ing"}
    if word.endswith("y"):
        forms |= {word[:-1] + "ily", word[:-1] + "iness", word[:-1] + "ied"}
    if word.endswith("e"):
        forms |= {word[:-1] + "ing", word + "d"}
    return sorted(forms)


def _mentions(text: str, concept: str) -> str | None:
    for form in forbidden_forms(concept):
        if re.search(rf"\b{re.escape(form)}\b", text, flags=re.IGNORECASE):
            return form
    return None


@dataclass(frozen=True)
class Problem:
    kind: str
    where: str
    message: str


def check(root: Path = DEFAULT_ROOT) -> tuple[list[Problem], dict[str, int]]:
    """Every rule violation, and the counts the minimums are judged on."""
    corpus = load(root)
    problems: list[Problem] = []
    known = set(corpus.definitions)
    for concept in known:
        if not corpus.definitions[concept].strip() or not corpus.clusters[concept].strip():
            problems.append(Problem("manifest", concept, "missing definition or cluster"))
    seen: dict[str, str] = {}
    for t in corpus.texts:
        if t.concept is not None and t.concept not in known:
            problems.append(Problem("unknown concept", t.where, f"{t.concept!r} not in manifest"))
        if not t.text.strip():
            problems.append(Problem("empty", t.where, "no text"))
            continue
        words = len(t.text.split())
        if not MIN_WORDS <= words <= MAX_WORDS:
            problems.append(
                Problem("length", t.where, f"{words} words, not {MIN_WORDS}-{MAX_WORDS}")
            )
        key = re.sub(r"\W+", " ", t.text.lower()).strip()
        if key in seen:
            problems.append(Problem("duplicate", t.where, f"same text as {seen[key]}"))
        seen.setdefault(key, t.where)
        if t.concept is not None and (form := _mentions(t.text, t.concept)):
            problems.append(Problem("names its concept", t.where, f"contains {form!r}"))
        if t.source != "paired" and not t.setting:
            problems.append(Problem("setting", t.where, "no '# setting:' line"))
    for scenario, versions in corpus.scenarios.items():
        baseline = versions.get("baseline")
        if baseline is None:
            problems.append(Problem("paired", scenario, "no baseline.txt"))
            continue
        for concept in versions:
            if concept != "baseline" and (form := _mentions(baseline.text, concept)):
                problems.append(Problem("names its concept", baseline.where, f"contains {form!r}"))
    for scenario in corpus.held_out:
        if scenario not in corpus.scenarios:
            problems.append(Problem("manifest", scenario, "held-out scenario does not exist"))
    if corpus.held_out_split and not (root / corpus.held_out_split).is_dir():
        problems.append(Problem("manifest", corpus.held_out_split, "held-out folder missing"))
    problems += _held_out_settings(corpus)
    counts = _counts(corpus)
    for name, minimum in MINIMUMS.items():
        if counts[name] < minimum:
            problems.append(Problem("minimum", name, f"{counts[name]} < {minimum}"))
    return problems, counts


def _setting(t: Text) -> str:
    return re.sub(r"\W+", " ", (t.setting or "").lower()).strip()


def _held_out_settings(corpus: Corpus) -> list[Problem]:
    """Held-out stories must not share a setting with their concept's training texts,
    or the evaluation would reward reading the scene instead of the state."""
    problems = []
    for t in corpus.texts:
        if t.source != "held_out":
            continue
        same = corpus.positives(t.concept) if t.concept else corpus.neutral()
        if any(_setting(o) == _setting(t) for o in same):
            what = f"{t.concept}'s" if t.concept else "neutral"
            problems.append(
                Problem(
                    "held-out setting", t.where, f"{t.setting!r} is used by {what} training text"
                )
            )
    return problems


def trained_concepts(corpus: Corpus) -> list[str]:
    """Concepts with enough stories and held-out stories to train and evaluate one
    direction (the minimums above)."""
    out = []
    for concept in corpus.definitions:
        stories = [t for t in corpus.texts if t.source == "stories" and t.concept == concept]
        if (
            len(stories) >= TRAINED_STORIES
            and len({_setting(t) for t in stories}) >= TRAINED_SETTINGS
            and len(corpus.held_out_stories(concept)) >= HELD_OUT_STORIES
        ):
            out.append(concept)
    return out


def _counts(corpus: Corpus) -> dict[str, int]:
    return {
        "concepts": len(corpus.definitions),
        "trained_concepts": len(trained_concepts(corpus)),
        "paired_scenarios": sum(
            1 for v in corpus.scenarios.values() if "baseline" in v and len(v) - 1 >= 4
        ),
        "neutral_stories": len(corpus.neutral()),
        "held_out_neutral": len(corpus.held_out_stories(None)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readout.corpus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check_cmd = sub.add_parser("check", help="report rule violations and size minimums")
    check_cmd.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args(argv)
    problems, counts = check(args.root)
    for p in problems:
        print(f"{p.kind}: {p.where}: {p.message}")
    print("counts: " + ", ".join(f"{k} {v} (min {MINIMUMS[k]})" for k, v in counts.items()))
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
