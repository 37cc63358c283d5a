"""The concept readout judged end to end on stories no trainer has seen.

    python3 bench/bench_readout_heldout.py [--readout DIR] [--tokens 8] [--model NAME]

Serves the model with a trained readout (default: the built-in model's, which
`python3 readout/train_with_library.py --aggregator pca` reproduces) and sends every
held-out text of the corpus (the held_out/ split and the held-out paired scenarios,
plus held-out neutral prose) as a raw completion prompt with
`"vllm_xargs": {"readout": true, "readout_prompt": true}`. Each text is scored as the
live readout scores it: the `summary` of GET /readout/{id}, the prompt and generated
rows averaged from the readout's start offset. Printed:
- per layer and for the mean z over layers: mean one-vs-rest AUROC over concepts
  (a concept's held-out stories against every other held-out text; target >= 0.92)
  and top-1 among the concepts by z (share of held-out stories whose own concept
  scores highest; aim >= 0.35);
- the same AUROC computed offline from Hugging Face activations of the same texts
  (quality.json's numbers), so a gap between training and serving would show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_model_argument, bench_model  # noqa: E402
from livetrain.formats import readout_format  # noqa: E402
from livetrain.tools.default_model import DEFAULT_READOUT  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402
from readout import corpus, dataset, evaluation  # noqa: E402

BATCH = 16  # prompts per completion request


def served_scores(url: str, texts: list[str], tokens: int) -> list[dict]:
    """The readout summary of each text, served as a prompt with `tokens` generated."""
    http = httpx.Client(base_url=url, timeout=600)
    model = http.get("/v1/models").json()["data"][0]["id"]
    out = []
    for start in range(0, len(texts), BATCH):
        body = {
            "model": model,
            "prompt": texts[start : start + BATCH],
            "max_tokens": tokens,
            "temperature": 0,
            "vllm_xargs": {"readout": True, "readout_prompt": True},
        }
        completion = http.post("/v1/completions", json=body).raise_for_status().json()
        for choice in range(len(body["prompt"])):
            params = {"choice": choice, "rows": "false"}  # the summary is all this needs
            got = http.get(f"/readout/{completion['id']}", params=params)
            out.append(got.raise_for_status().json()["summary"])
        print(f"  {len(out)}/{len(texts)} texts", end="\r", flush=True)
    print()
    return out


def score_matrix(summaries: list[dict], key: str, layer: str) -> torch.Tensor:
    return torch.tensor([s[key][layer] for s in summaries], dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--readout", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=8, help="generated tokens per text")
    parser.add_argument("--port", type=int, default=8317)
    cli = parser.parse_args()
    model = bench_model(cli.model)
    folder = cli.readout or DEFAULT_READOUT
    readout = readout_format.load(folder)
    ts = dataset.build(corpus.load(), seed=0)
    rows = sorted(set(ts.held_out_neg))
    work = Path(tempfile.mkdtemp(prefix="livetrain-heldout-"))
    env = {
        **plugin_env(),
        "LIVETRAIN_READOUT": str(folder),
        "LIVETRAIN_STATE_DIR": str(work / "state"),
        "LIVETRAIN_SYNC_DELAY_S": "0",
    }
    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024"]
    print(f"serving {model.name} with {folder} ({len(rows)} held-out texts) ...")
    with Server(model, cli.port, args, env=env, log_path=work / "vllm.log") as server:
        server.wait_healthy(timeout=600)
        summaries = served_scores(server.url, [ts.texts[r].text for r in rows], cli.tokens)
    held = evaluation.HeldOut(readout.concepts, ts.held_out_pos, rows).compact()
    layers = [str(i) for i in readout.layers]
    z = {layer: score_matrix(summaries, "z", layer) for layer in layers}
    candidates = {
        f"layer {layer}": (score_matrix(summaries, "scores", layer), z[layer]) for layer in layers
    }
    mean_z = torch.stack(list(z.values())).mean(dim=0)
    candidates["mean z over layers"] = (mean_z, mean_z)
    results = {}
    for name, (scores, zs) in candidates.items():
        per_concept = evaluation.held_out_auroc(scores, held)
        results[name] = {
            "auroc": statistics.fmean(per_concept.values()),
            "top1": evaluation.top1(zs, held),
        }
        print(
            f"{name:>20}: mean one-vs-rest AUROC {results[name]['auroc']:.3f} "
            f"(target >= 0.92), top-1 {results[name]['top1']:.3f} (aim >= 0.35)"
        )
    quality = folder / "quality.json"
    if quality.is_file():
        report = json.loads(quality.read_text())
        offline = {k: v["mean_auroc"] for k, v in report["held_out"]["layers"].items()}
        print(f"offline (Hugging Face, quality.json) mean AUROC by layer: {offline}")
    print(json.dumps({"readout": str(folder), "tokens": cli.tokens, "results": results}))


if __name__ == "__main__":
    main()
