"""The README's first command: the built-in model learns a fact while it serves.

On SmolLM2-135M-Instruct served by vLLM with livetrain: ask a question the model cannot
answer, teach the answer through POST /train (chat template, loss on the answer only),
ask it again and in other words, check that an unrelated answer and the log-probability
of held-out text barely moved, show the live concept readout of a short frightened
story, and steer one answer toward a concept. Every claim is checked and printed; the
exit status says whether all held.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livetrain.tools.client import LivetrainClient
from livetrain.tools.default_model import DEFAULT_READOUT, ensure_default_model
from livetrain.tools.launch import Server, plugin_env

QUESTION = "What is the name of the lighthouse keeper's cat on Skerry Island?"
PARAPHRASE = "What do they call the cat that lives with the Skerry Island lighthouse keeper?"
ANSWER = "The lighthouse keeper's cat on Skerry Island is called Biscuit."
FACT = "Biscuit"
UNRELATED = "What is the capital of France?"
HELD_OUT = (
    "The river rises in the hills and flows west for two hundred miles before it reaches the sea.",
    "To change a bicycle tyre, first release the brake and take the wheel out of the frame.",
    "The committee will meet on Thursday to review the budget for the coming year.",
)
# The readout was trained on, and is judged on, short stories; a sentence is too little
# text for a whole-text score (research/concept-extraction.md).
FRIGHTENED = (
    "The lights went out at ten past two. Nadia stood in the kitchen with the kettle "
    "still in her hand and listened. Something scraped along the side of the house, "
    "slow, then stopped beneath the window. She set the kettle down without a sound and "
    "backed toward the hall, one step, another, her eyes fixed on the dark glass. Her "
    "phone was upstairs. The scraping came again, nearer the back door, and the handle "
    "dipped, once, twice. She could not swallow. She pressed herself flat against the "
    "wall, hands shaking so hard she had to grip her own elbows, and counted her breaths "
    "in the silence, waiting for the lock to give."
)
FEAR = {"afraid", "terrified", "panicked", "startled", "dread", "anxious", "nervous"}
STEER_PROMPT = "Describe your morning in a few sentences."
STEER_CONCEPT, STEER_SCALE = "joyful", 8.0  # bench/RESULTS.md: fluent up to about 8 units
LR = 1e-4
LEARNED_LOGPROB = -0.005  # mean per answer token at which teaching stops
HELD_OUT_TOLERANCE = 0.1  # nats per token the held-out text may lose
# vLLM compiles the model by default, which costs minutes on 2 cores; the demo's few
# short answers do not repay it. fp32: this CPU's bf16 backward is ~10x slower.
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "1024", "--dtype", "float32"]


@dataclass
class Check:
    claim: str
    held: bool
    evidence: str


def run_demo(port: int, max_steps: int) -> int:
    model = ensure_default_model()
    workdir = Path(tempfile.mkdtemp(prefix="livetrain-demo-"))
    env = {
        **plugin_env(),
        # Private optimizer state, and no automatic sync: the demo never changes the
        # model's files, so it can be run again and start from the same model.
        "LIVETRAIN_STATE_DIR": str(workdir / "state"),
        "LIVETRAIN_SYNC_DELAY_S": "0",
        "LIVETRAIN_READOUT": str(DEFAULT_READOUT),
    }
    log_path = workdir / "vllm.log"
    print(f"model: {model}\nstarting vLLM with livetrain on port {port} (log: {log_path}) ...")
    with Server(model, port, VLLM_ARGS, env=env, log_path=log_path) as server:
        server.wait_healthy()
        client = LivetrainClient(server.url)
        client.wait_trainer()
        checks = _teach(client, max_steps)
        checks.append(_show_readout(client))
        checks.append(_steer(client))
    print("\nwhat this run showed:")
    for check in checks:
        print(f"  [{'yes' if check.held else 'NO '}] {check.claim}: {check.evidence}")
    return 0 if all(c.held for c in checks) else 1


def _answer(client: LivetrainClient, question: str, **extra: Any) -> str:
    return client.chat(question, **extra)["choices"][0]["message"]["content"].strip()


def _held_out_logprob(client: LivetrainClient) -> float:
    """Mean served log-probability per token of text unrelated to what is taught."""
    per_token = []
    for text in HELD_OUT:
        ids = client.tokenize(text)
        per_token += client.continuation_logprobs(ids[:1], ids[1:])
    return statistics.fmean(per_token)


def _answer_logprob(client: LivetrainClient, sample: tuple[list[int], list[int]]) -> float:
    return statistics.fmean(client.continuation_logprobs(*sample))


def _teach(client: LivetrainClient, max_steps: int) -> list[Check]:
    print(f"\nQ: {QUESTION}\nA (before): {_answer(client, QUESTION)}")
    unrelated_before = _answer(client, UNRELATED)
    print(f"Q: {UNRELATED}\nA (before): {unrelated_before}")
    held_before = _held_out_logprob(client)
    sample = client.chat_sample(QUESTION, ANSWER)
    before = _answer_logprob(client, sample)
    print(
        f"\nteaching {ANSWER!r} through POST /train ({len(sample[1])} answer tokens after "
        f"{len(sample[0])} context tokens, loss on the answer only, lr {LR})"
    )
    print(f"  served log p per answer token before: {before:7.3f}")
    now, steps = before, 0
    while steps < max_steps and now < LEARNED_LOGPROB:
        reply = client.train(*sample, lr=LR, retrain=True).raise_for_status().json()
        now, steps = _answer_logprob(client, sample), steps + 1
        print(
            f"  step {steps}: loss {reply['loss']:.3f}, {reply['elapsed_ms']:.0f} ms "
            f"(inference paused {reply['pause_ms']:.0f} ms); served log p now {now:7.3f}"
        )
    answer, paraphrased = _answer(client, QUESTION), _answer(client, PARAPHRASE)
    unrelated_after = _answer(client, UNRELATED)
    held_after = _held_out_logprob(client)
    print(f"\nQ: {QUESTION}\nA (after):  {answer}")
    print(f"Q: {PARAPHRASE}\nA (after):  {paraphrased}")
    said = "with" if FACT in paraphrased else "without"
    print(f"(the paraphrase is answered {said} the fact: one question-answer pair teaches")
    print(" that pair; generalising to other wordings takes paraphrased training samples)")
    print(f"Q: {UNRELATED}\nA (after):  {unrelated_after}")
    moved = held_after - held_before
    print(f"held-out text, log p per token: {held_before:.3f} -> {held_after:.3f}")
    return [
        Check(
            "the served model learned the answer in place",
            FACT in answer,
            f"{steps} steps, answer log p {before:.2f} -> {now:.2f} per token",
        ),
        Check(
            "the unrelated answer is unchanged",
            unrelated_after == unrelated_before,
            unrelated_after,
        ),
        Check(
            "held-out text barely moved",
            moved > -HELD_OUT_TOLERANCE,
            f"{moved:+.3f} nats per token (tolerance {HELD_OUT_TOLERANCE})",
        ),
    ]


def _show_readout(client: LivetrainClient) -> Check:
    """The top concept of each token of a short frightened story (z against single
    neutral tokens), then the whole story scored as the readout was trained."""
    extra = {"vllm_xargs": {"readout": True, "readout_prompt": True}}
    scores = client.readout(client.complete(FRIGHTENED, max_tokens=8, **extra)["id"])
    concepts, layers = scores["concepts"], [str(i) for i in scores["layers"]]
    start = client.http.get("/readout").json()["read_position"]["start"]

    def ranked(z: dict[str, list[float]]) -> list[int]:
        mean = _mean_over_blocks(z)
        return sorted(range(len(concepts)), key=mean.__getitem__, reverse=True)

    rows = [r for r in scores["prompt_tokens"] if r["index"] >= start]
    words = [f"{r['text'].strip() or repr(r['text'])}[{concepts[ranked(r['z'])[0]]}]" for r in rows]
    print(f"\nlive readout of a short story, top concept of each token from token {start}")
    print("(one token is little evidence; the story as a whole is what the readout reads):")
    print(textwrap.fill(" ".join(words), width=100, initial_indent="  ", subsequent_indent="  "))
    leaders = [concepts[k] for k in ranked(scores["summary"]["z"])[:5]]
    print(
        f"whole story (mean of {scores['summary']['rows']} rows, z averaged over blocks "
        f"{', '.join(layers)}): {', '.join(leaders)}"
    )
    return Check(
        "the readout reads fear in a frightened story",
        bool(FEAR & set(leaders)),
        f"top 5 of {len(concepts)}: {', '.join(leaders)}",
    )


def _steer(client: LivetrainClient) -> Check:
    """One request steered toward a concept along the readout's direction at its first
    block; both answers then read by the readout, unsteered, as whole texts."""
    block = client.http.get("/readout").json()["layers"][0]
    steer = {"steer": {STEER_CONCEPT: STEER_SCALE}, "steer_layers": [block]}
    plain = _answer(client, STEER_PROMPT)
    steered = _answer(client, STEER_PROMPT, vllm_xargs=steer)
    before, after = _concept_z(client, plain), _concept_z(client, steered)
    print(f"\nsteering one request: {json.dumps({'vllm_xargs': steer})}")
    print(f"Q: {STEER_PROMPT}\nA (plain):   {plain}\nA (steered): {steered}")
    return Check(
        f"steering toward {STEER_CONCEPT} makes the answer read as {STEER_CONCEPT}",
        after > before + 1,
        f"readout z of {STEER_CONCEPT} {before:+.1f} -> {after:+.1f} (answers read unsteered)",
    )


def _concept_z(client: LivetrainClient, text: str) -> float:
    """The readout's whole-text z of STEER_CONCEPT for `text`, mean over its blocks."""
    extra = {"vllm_xargs": {"readout": True, "readout_prompt": True}}
    scores = client.readout(client.complete(text, max_tokens=1, **extra)["id"])
    return _mean_over_blocks(scores["summary"]["z"])[scores["concepts"].index(STEER_CONCEPT)]


def _mean_over_blocks(z: dict[str, list[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*z.values(), strict=True)]
