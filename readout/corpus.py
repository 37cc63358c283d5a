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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "amygdala_stories"
MIN_WORDS, MAX_WORDS = 80, 200
MINIMUMS = {
    "concepts": 150,  # in the manifest
    "concepts_with_stories": 90,  # with >= 3 positives over >= 2 settings
    "paired_scenarios": 12,  # each with a baseline and >= 4 framings
    "neutral_stories": 30,
}


@dataclass(frozen=True)
class Text:
    """One story. `concept` is None for neutral prose and scenario baselines."""

    concept: str | None
    source: str  # "stories", "paired" or "direct"
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
    held_out: list[str]
    texts: list[Text] = field(default_factory=list)
    # scenario -> {"baseline" or concept: Text}
    scenarios: dict[str, dict[str, Text]] = field(default_factory=dict)

    def positives(self, concept: str) -> list[Text]:
        return [t for t in self.texts if t.concept == concept]

    def neutral(self) -> list[Text]:
        return [t for t in self.texts if t.concept is None and t.source != "paired"]


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
    )
    for source in ("stories", "direct"):
        for path in sorted((root / source).glob("*.txt")):
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
    counts = _counts(corpus)
    for name, minimum in MINIMUMS.items():
        if counts[name] < minimum:
            problems.append(Problem("minimum", name, f"{counts[name]} < {minimum}"))
    return problems, counts


def _counts(corpus: Corpus) -> dict[str, int]:
    settings: dict[str, set[str]] = defaultdict(set)
    positives: dict[str, int] = defaultdict(int)
    for t in corpus.texts:
        if t.concept is not None:
            positives[t.concept] += 1
            settings[t.concept].add((t.setting or "").lower())
    return {
        "concepts": len(corpus.definitions),
        "concepts_with_stories": sum(
            1 for c in positives if positives[c] >= 3 and len(settings[c]) >= 2
        ),
        "paired_scenarios": sum(
            1 for v in corpus.scenarios.values() if "baseline" in v and len(v) - 1 >= 4
        ),
        "neutral_stories": len(corpus.neutral()),
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
