"""Soak: many /train steps with completions running alongside, on the built-in model.

    python bench/soak.py [--steps 500] [--sync-every 100] [--dtype float32]

Serves a private copy of the model (syncs write into it), compiled as vLLM defaults to, trains
one fresh sample per step while a client keeps asking for completions, syncs every
`--sync-every` steps, and reports: errors of either kind (target 0), the resident
memory of the API server and of the trainer after the warm-up steps and at the end
(target: growth under 5%), and whether the synced files hold the live weights (the
files' log-probs by Hugging Face against the trainer's own on vLLM's memory).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model  # noqa: E402

from livetrain.tools.client import LivetrainClient  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402
from livetrain.trainer.loss import continuation_logprobs  # noqa: E402

WARMUP_STEPS = 20  # allocator pools, compiled graphs and caches settle in these
SUBJECTS = ["The ferry", "A heron", "The night nurse", "Our neighbour", "The old clock"]
ACTIONS = ["waited by the", "sang near the", "slept under the", "walked past the"]
PLACES = ["harbour wall", "bakery", "red bridge", "school gate", "quiet river"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def samples(client: LivetrainClient, count: int) -> list[tuple[list[int], list[int]]]:
    """`count` different short sentences, split into context and continuation."""
    rng, out = random.Random(0), []
    for i in range(count):
        context = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}"
        ending = f" {rng.choice(PLACES)} on day {i}."
        out.append((client.tokenize(context), client.tokenize(ending)))
    return out


def complete_until(client: LivetrainClient, stop: threading.Event, log: dict) -> None:
    """Completions back to back, counting the ones that fail."""
    while not stop.is_set():
        try:
            client.complete("The lighthouse keeper said", max_tokens=16)
            log["completions"] += 1
        except httpx.HTTPError as exc:
            log["completion_errors"].append(str(exc))


def files_match_live(client: LivetrainClient, model: Path, dtype: str, probe: list) -> float:
    """Largest log-prob difference between the synced files (Hugging Face, cast to the
    served dtype as vLLM casts them) and the trainer's view of the live weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    worst = 0.0
    for context, continuation in probe:
        body = {"context_ids": context, "continuation_ids": continuation}
        live = client.http.post("/train/score", json=body).raise_for_status().json()
        with torch.no_grad():
            files = continuation_logprobs(hf, [(context, continuation)])[0]
        worst = max(worst, (files - torch.tensor(live["token_logprobs"][0])).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--sync-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    # fp32 as the demo serves it: this CPU's torch runs bf16 backward ~10x slower.
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_model_argument(parser)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the server is stopped too
    work = Path(tempfile.mkdtemp(prefix="livetrain-soak-"))
    model = shutil.copytree(bench_model(args.model), work / "model")
    env = {**plugin_env(), "LIVETRAIN_STATE_DIR": str(work / "state")}
    env["LIVETRAIN_SYNC_DELAY_S"] = "0"  # the soak syncs on its own schedule
    serve_args = ["--max-model-len", "512", "--dtype", args.dtype]
    with Server(model, 8315, serve_args, env=env, log_path=work / "server.log") as server:
        server.wait_healthy(600)
        client = LivetrainClient(server.url, timeout=600)
        trainer_pid = client.wait_trainer()["trainer_pid"]
        assert server.process is not None
        pids = {"api_server": server.process.pid, "trainer": trainer_pid}
        todo = samples(client, args.steps)
        log: dict = {"completions": 0, "completion_errors": [], "train_errors": []}
        stop = threading.Event()
        completer = threading.Thread(target=complete_until, args=(client, stop, log))
        completer.start()
        rss: dict[str, dict[str, int]] = {}
        timings: list[tuple[float, float]] = []  # (step ms, pause ms) of each good step
        started = time.perf_counter()
        try:
            for step, (context, continuation) in enumerate(todo, 1):
                reply = client.train(context, continuation, lr=args.lr)
                if reply.status_code != 200:
                    log["train_errors"].append(f"step {step}: {reply.status_code} {reply.text}")
                else:
                    timings.append((reply.json()["elapsed_ms"], reply.json()["pause_ms"]))
                if step % args.sync_every == 0:
                    client.http.post("/checkpoint").raise_for_status()
                if step == WARMUP_STEPS:
                    rss["after_warmup"] = {name: rss_bytes(pid) for name, pid in pids.items()}
                if step % 10 == 0:
                    print(f"step {step}: {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            stop.set()
            completer.join()
        elapsed = time.perf_counter() - started
        rss["end"] = {name: rss_bytes(pid) for name, pid in pids.items()}
        client.http.post("/checkpoint").raise_for_status()
        status = client.status()
        worst = files_match_live(client, model, args.dtype, todo[-5:])
    growth = {
        name: rss["end"][name] / rss["after_warmup"][name] - 1 for name in rss["after_warmup"]
    }
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "steps": args.steps,
        "seconds": round(elapsed, 1),
        "steps_per_s": round(args.steps / elapsed, 3),
        "step_ms_median": statistics.median(t for t, _ in timings),
        "pause_ms_median": statistics.median(p for _, p in timings),
        "train_errors": len(log["train_errors"]),
        "completions": log["completions"],
        "completion_errors": len(log["completion_errors"]),
        "first_errors": (log["train_errors"] + log["completion_errors"])[:3],
        "rss_after_warmup_mb": {k: v / 2**20 for k, v in rss["after_warmup"].items()},
        "rss_end_mb": {k: v / 2**20 for k, v in rss["end"].items()},
        "rss_growth": {k: round(v, 4) for k, v in growth.items()},
        "trainer_restarts": status["restarts"],
        "weight_version": status["weight_version"],
        "synced_version": status["last_sync"]["weight_version"],
        "files_vs_live_max_abs_logprob_diff": worst,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
