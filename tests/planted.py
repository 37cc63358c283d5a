"""A tiny model with known concept directions planted in its residual stream, and a corpus.

Every text of the synthetic corpus has its own single-token word, which ends it and
is every other word. A concept's direction u_c is added (times a strength) to the
input embedding of that word in each of its texts, so the residual stream carries
strength * u_c at the last token and about half of it in the mean over the tokens,
through every decoder block (the blocks of a freshly initialised model write little):
last-token and mean read positions both have a known answer.
Known answers for the quality report:
- alpha, zeta, eta, theta: strong, orthogonal directions (clean);
- beta and gamma: one shared direction (redundant);
- delta: a strength far below the embedding noise (weak);
- epsilon: +u in training, -u in its held-out texts (sign-flipped).
Every concept has held-out stories (the held_out/ split) besides the held-out scenario.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from livetrain.tools.tiny_model import build_tiny_model

STRONG, WEAK = 2.0, 0.002
CLUSTERS = {
    "alpha": "A",
    "epsilon": "A",
    "beta": "B",
    "gamma": "B",
    "delta": "C",
    "zeta": "C",
    "eta": "D",
    "theta": "D",
}
STRENGTH = {c: (WEAK if c == "delta" else STRONG) for c in CLUSTERS}
HELD_OUT = "held_room"
# scenario -> framings besides the baseline; the held-out one holds epsilon's flip
SCENARIOS = {"scene_one": ["alpha", "zeta"], HELD_OUT: ["epsilon", "alpha", "eta"]}


@dataclass
class Planted:
    model: Path
    stories: Path
    directions: dict[str, torch.Tensor]  # concept -> planted unit direction


def _single_token_words(tokenizer, n: int) -> list[str]:
    """Words that the tokenizer keeps whole after a space (so they are a text's last token)."""
    words = []
    for token, _id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = token[1:]
        if token.startswith("Ġ") and word.isalpha() and len(word) >= 3:
            ids = tokenizer("we saw " + word).input_ids
            if tokenizer.convert_ids_to_tokens(ids[-1]) == token:
                words.append(word)
    if len(words) < n:
        raise RuntimeError(f"only {len(words)} single-token words, need {n}")
    return words


def build(root: Path, seed: int = 0) -> Planted:
    model_dir = build_tiny_model(root / "base-model", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    words = _single_token_words(tokenizer, 110)
    rng.shuffle(words)
    filler, endings = words[:40], iter(words[40:])

    def text() -> tuple[str, str]:
        own = next(endings)
        words = [own if k % 2 else rng.choice(filler) for k in range(rng.randint(20, 35))]
        return " ".join(words) + " " + own, own

    gen = torch.Generator().manual_seed(seed)
    hidden = AutoModelForCausalLM.from_pretrained(str(model_dir)).config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(hidden, len(CLUSTERS), generator=gen))
    directions = {c: basis[:, k] for k, c in enumerate(CLUSTERS)}
    directions["gamma"] = directions["beta"]
    plants: list[tuple[str, torch.Tensor]] = []  # (ending word, vector added to its embedding)

    stories = root / "stories"
    (stories / "stories").mkdir(parents=True)
    for concept in CLUSTERS:
        blocks = []
        for k in range(4):
            body, ending = text()
            plants.append((ending, STRENGTH[concept] * directions[concept]))
            blocks.append(f"# setting: {'park' if k % 2 else 'harbour'}\n{body}")
        (stories / "stories" / f"{concept}.txt").write_text("\n\n".join(blocks) + "\n")
    neutral = [f"# setting: street\n{text()[0]}" for _ in range(10)]
    (stories / "stories" / "_neutral.txt").write_text("\n\n".join(neutral) + "\n")
    (stories / "held_out").mkdir()
    for concept in CLUSTERS:
        sign = -1.0 if concept == "epsilon" else 1.0
        blocks = []
        for _ in range(2):
            body, ending = text()
            plants.append((ending, sign * STRENGTH[concept] * directions[concept]))
            blocks.append(f"# setting: far room\n{body}")
        (stories / "held_out" / f"{concept}.txt").write_text("\n\n".join(blocks) + "\n")
    held_neutral = [f"# setting: far street\n{text()[0]}" for _ in range(4)]
    (stories / "held_out" / "_neutral.txt").write_text("\n\n".join(held_neutral) + "\n")
    for scenario, framings in SCENARIOS.items():
        folder = stories / "paired" / scenario
        folder.mkdir(parents=True)
        (folder / "baseline.txt").write_text(text()[0] + "\n")
        for concept in framings:
            body, ending = text()
            sign = -1.0 if (scenario == HELD_OUT and concept == "epsilon") else 1.0
            plants.append((ending, sign * STRENGTH[concept] * directions[concept]))
            (folder / f"{concept}.txt").write_text(body + "\n")
    manifest = {
        "description": "synthetic corpus with planted directions",
        "clusters": sorted(set(CLUSTERS.values())),
        "concepts": {
            c: {"definition": f"planted concept {c}", "cluster": k} for c, k in CLUSTERS.items()
        },
        "held_out_scenarios": [HELD_OUT],
        "held_out_split": "held_out",
    }
    (stories / "manifest.json").write_text(json.dumps(manifest, indent=1))

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for ending, vector in plants:
            embed[tokenizer.convert_tokens_to_ids("Ġ" + ending)] += vector
    planted_dir = root / "planted-model"
    model.save_pretrained(planted_dir)
    tokenizer.save_pretrained(planted_dir)
    return Planted(planted_dir, stories, directions)
