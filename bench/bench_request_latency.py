"""How long the server's other requests wait while it takes the largest /train it accepts.

    python bench/bench_request_latency.py [--model smollm2-135m] [--probes 200]

Bodies are parsed and validated in a worker thread and the step runs in the training
subprocess, so `GET /health` should stay fast while a maximal request (LIVETRAIN_MAX_SAMPLES
samples filling LIVETRAIN_MAX_BATCH_TOKENS) is read, checked and trained. Prints /health
latency percentiles idle and during that request, and their ratio (same run).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model, model_config  # noqa: E402

from livetrain.config import PluginConfig  # noqa: E402
from livetrain.tools.client import LivetrainClient  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402


def health_latencies_ms(url: str, count: int, stop: threading.Event | None = None) -> list[float]:
    out: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as http:
        while len(out) < count and not (stop is not None and stop.is_set()):
            started = time.perf_counter()
            http.get("/health").raise_for_status()
            out.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
    return out


def largest_body(vocab: int) -> dict:
    """max_samples samples whose padded size is exactly max_batch_tokens."""
    config, rng = PluginConfig(), random.Random(0)
    per_sample = config.max_batch_tokens // config.max_samples
    half = per_sample // 2
    samples = [
        {
            "context_ids": [rng.randrange(vocab) for _ in range(per_sample - half)],
            "continuation_ids": [rng.randrange(vocab) for _ in range(half)],
        }
        for _ in range(config.max_samples)
    ]
    return {"samples": samples, "lr": 1e-5, "retrain": True}


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100)
    return {"p50": q[49], "p99": q[98], "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200)
    add_model_argument(parser)
    args = parser.parse_args()
    model = bench_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="livetrain-latency-"))
    env = {**plugin_env(), "LIVETRAIN_STATE_DIR": str(work / "state")}
    env["LIVETRAIN_SYNC_DELAY_S"] = "0"  # never write the bench's random steps into the model
    serve_args = ["--enforce-eager", "--max-model-len", "512", "--dtype", "float32"]
    with Server(model, 8313, serve_args, env=env, log_path=work / "server.log") as server:
        server.wait_healthy()
        client = LivetrainClient(server.url, timeout=1800)
        client.wait_trainer()
        idle = health_latencies_ms(server.url, args.probes)
        body = largest_body(model_config(model)["vocab_size"])
        stop, during = threading.Event(), []
        probe = threading.Thread(
            target=lambda: during.extend(health_latencies_ms(server.url, 10**9, stop))
        )
        probe.start()
        started = time.perf_counter()
        reply = client.http.post("/train", json=body)
        elapsed = time.perf_counter() - started
        stop.set()
        probe.join()
    idle_p, during_p = percentiles(idle), percentiles(during)
    print(
        json.dumps(
            {
                "model": str(model),
                "request_bytes": len(json.dumps(body)),
                "train_status": reply.status_code,
                "train_s": elapsed,
                "health_ms_idle": idle_p,
                "health_ms_during_largest_train": during_p,
                "ratio_p50": during_p["p50"] / idle_p["p50"],
                "ratio_p99": during_p["p99"] / idle_p["p99"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
