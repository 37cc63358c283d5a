"""The README's first command: serve the tiny model, train it through /train, show it learn."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from livetrain.client import LivetrainClient
from livetrain.launch import Server
from livetrain.tiny_model import ensure_default_model

CONTEXT = "The keeper of the lighthouse wrote in the log:"
CONTINUATION = " the lamp burned all night and every ship came home."


def run_demo(port: int, steps: int) -> None:
    model = ensure_default_model()
    log_path = Path(tempfile.gettempdir()) / f"livetrain-demo-{port}.log"
    print(f"model: {model}\nstarting vLLM with livetrain on port {port} (log: {log_path})")
    vllm_args = ["--enforce-eager", "--max-model-len", "512", "--dtype", "float32"]
    with Server(model, port, vllm_args, log_path=log_path) as server:
        server.wait_healthy()
        client = LivetrainClient(server.url)
        client.wait_trainer()
        context, continuation = client.tokenize(CONTEXT), client.tokenize(CONTINUATION)
        before = sum(client.continuation_logprobs(context, continuation))
        print(f"\ncontinuation: {CONTINUATION!r} ({len(continuation)} tokens)")
        print(f"log p(continuation | context) served before training: {before:9.3f}")
        for _ in range(steps):
            reply = (
                client.train(context, continuation, lr=3e-3, retrain=True).raise_for_status().json()
            )
            after = sum(client.continuation_logprobs(context, continuation))
            print(
                f"  /train -> loss {reply['loss']:.3f}, weight_version "
                f"{reply['weight_version']}, {reply['elapsed_ms']:.0f} ms; "
                f"served log p now {after:9.3f}"
            )
        gain = after - before
        print(
            f"\nthe served model learned in place: log p rose by {gain:.3f} "
            f"(x{math.exp(gain):.3g} in probability)"
        )
        greedy = client.complete(context, max_tokens=len(continuation))
        print(f"greedy continuation now: {greedy['choices'][0]['text']!r}")
