"""Does steering toward a concept make the text about it, and what does fluency pay?

    python3 bench/bench_steering.py [--concepts joyful,afraid,angry,sad,calm]
        [--layers 12] [--scales 0,2,4,8,16] [--tokens 48] [--readout DIR] [--judge DIR]

The built-in model served with a readout (default: the built-in one). For each concept
and scale, four neutral chat prompts are answered greedily with
`"vllm_xargs": {"steer": {concept: scale}, "steer_layers": layers}`, steered by
`--readout`'s directions. Each answer is then judged with steering off, by `--judge`'s
detectors (default: the built-in readout, so readouts trained otherwise are judged
alike), as AxBench judges concept steering against fluency:
- concept score: the live readout's whole-text z of the concept (its detectors, read
  at the readout's read position, mean over its layers), the answer read alone as a
  story is (a readout request with prompt rows);
- agreement: the share of answers in which the concept ranks in the readout's top 5
  of all its concepts (the classifier validated on held-out stories);
- perplexity of the answer under the unsteered model given the prompt (POST
  /train/score: the served weights, no steering).
Printed per concept and scale, and the mean over concepts per scale.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model  # noqa: E402

from livetrain.tools.default_model import DEFAULT_READOUT  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402

PORT = 8341
PROMPTS = [
    "Describe your morning in a few sentences.",
    "Write two sentences about a train station.",
    "Tell me about the weather today.",
    "What happened at the market this afternoon?",
]
TOP = 5


def _numbers(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def answer(http: httpx.Client, model: str, prompt: str, steer: dict | None, tokens: int) -> dict:
    """One greedy chat answer: its prompt and answer token ids and its text."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body |= {"max_tokens": tokens, "temperature": 0, "return_token_ids": True}
    if steer:
        body["vllm_xargs"] = steer
    reply = http.post("/v1/chat/completions", json=body).raise_for_status().json()
    choice = reply["choices"][0]
    return {
        "context": reply["prompt_token_ids"],
        "answer": choice["token_ids"],
        "text": choice["message"]["content"],
    }


def judge(http: httpx.Client, model: str, concepts: list[str], done: dict) -> dict:
    """The unsteered readout's view of the answer text, and its perplexity."""
    body = {"model": model, "prompt": done["text"] or ".", "max_tokens": 1, "temperature": 0}
    body["vllm_xargs"] = {"readout": True, "readout_prompt": True}
    rid = http.post("/v1/completions", json=body).raise_for_status().json()["id"]
    summary = http.get(f"/readout/{rid}", params={"rows": "false"}).raise_for_status().json()
    z = summary["summary"]["z"]
    mean_z = [statistics.fmean(z[layer][k] for layer in z) for k in range(len(concepts))]
    score = {"context_ids": done["context"], "continuation_ids": done["answer"]}
    logprobs = http.post("/train/score", json=score).raise_for_status().json()["token_logprobs"][0]
    return {"z": mean_z, "ppl": math.exp(-statistics.fmean(logprobs))}


def generate(http: httpx.Client, model: str, cli: argparse.Namespace) -> dict:
    """(concept, scale) -> the four answers, steered by the loaded readout."""
    answers = {}
    for concept in cli.concepts:
        for scale in cli.scales:
            steer = {"steer": {concept: scale}, "steer_layers": cli.layers} if scale else None
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                asked = [pool.submit(answer, http, model, p, steer, cli.tokens) for p in PROMPTS]
                answers[concept, scale] = [a.result() for a in asked]
    return answers


def judged_row(http: httpx.Client, model: str, concepts: list[str], key, done: list) -> dict:
    concept, scale = key
    judged = [judge(http, model, concepts, a) for a in done]
    k = concepts.index(concept)
    ranks = [sorted(j["z"], reverse=True).index(j["z"][k]) + 1 for j in judged]
    return {
        "concept": concept,
        "scale": scale,
        "z": statistics.fmean(j["z"][k] for j in judged),
        "top5": sum(r <= TOP for r in ranks) / len(ranks),
        "ppl": statistics.median(j["ppl"] for j in judged),
        "example": done[0]["text"][:90].replace("\n", " "),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--concepts",
        type=lambda t: _numbers(t, str),
        default=["joyful", "afraid", "angry", "sad", "calm"],
    )
    parser.add_argument("--layers", type=lambda t: _numbers(t, int), default=[12])
    parser.add_argument("--scales", type=lambda t: _numbers(t, float), default=[0, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--readout", type=Path, default=DEFAULT_READOUT)
    parser.add_argument("--judge", type=Path, default=DEFAULT_READOUT)
    cli = parser.parse_args()
    readout, judge_dir = cli.readout.resolve(), cli.judge.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = plugin_env()
        env["LIVETRAIN_STATE_DIR"] = str(Path(tmp) / "state")
        env["LIVETRAIN_READOUT"] = str(readout)
        env["LIVETRAIN_READOUT_ROOTS"] = f"{readout.parent}:{judge_dir.parent}"
        args = ["--max-model-len", "1024"]
        with Server(bench_model(), PORT, args, env=env, log_path=Path(tmp) / "server.log") as srv:
            srv.wait_healthy()
            http = httpx.Client(base_url=srv.url, timeout=600)
            model = http.get("/v1/models").json()["data"][0]["id"]
            answers = generate(http, model, cli)
            loaded = http.post("/readout/load", json={"path": str(judge_dir)})
            concepts = loaded.raise_for_status().json()["concepts"]
            for key, done in answers.items():
                rows.append(judged_row(http, model, concepts, key, done))
                r = rows[-1]
                print(
                    f"{r['concept']:10s} x{r['scale']:5.1f}: z {r['z']:+6.2f}  top-{TOP} "
                    f"{r['top5']:.2f}  ppl {r['ppl']:7.1f}  {r['example']!r}",
                    flush=True,
                )
    print(
        f"\nmean over {len(cli.concepts)} concepts, steering at blocks {cli.layers} with "
        f"{readout}, judged by {judge_dir}:"
    )
    for scale in cli.scales:
        at = [r for r in rows if r["scale"] == scale]
        print(
            f"scale {scale:5.1f}: concept z {statistics.fmean(r['z'] for r in at):+6.2f}, "
            f"top-{TOP} {statistics.fmean(r['top5'] for r in at):.2f}, "
            f"median ppl {statistics.median(r['ppl'] for r in at):7.1f}"
        )


if __name__ == "__main__":
    main()
