"""Shared pieces of the benchmarks: the bench models, samples, memory accounting.

Every bench runs on the built-in real model (SmolLM2-135M-Instruct) by default:
figures measured on random toy models have not held on it. `--model` picks one of the
random-weight shapes instead, for quick runs and worst cases.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from livetrain.tools.default_model import ensure_default_model
from livetrain.tools.tiny_model import build_tiny_model

MODELS_DIR = Path.home() / ".cache" / "livetrain" / "models"
# ~12M parameters: big enough that a step is not all fixed costs, small enough for 2 cores.
BENCH_CONFIG = dict(
    hidden_size=512,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1408,
    num_hidden_layers=4,
)
# ~150M parameters, the shape of a small real model: for costs that are fixed per step.
LARGER_CONFIG = dict(
    hidden_size=1024,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    num_hidden_layers=8,
)
DEFAULT_MODEL = "smollm2-135m"
BENCH_MODELS = {
    DEFAULT_MODEL: None,  # the built-in real model
    "bench-llama": BENCH_CONFIG,
    "bench-llama-150m": LARGER_CONFIG,
}


def bench_model(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a bench model: the real default, or a random one built once."""
    if BENCH_MODELS[name] is None:
        return ensure_default_model()
    folder = MODELS_DIR / name
    if not (folder / "model.safetensors").exists():
        build_tiny_model(folder, config_overrides=BENCH_MODELS[name])
    return folder


def model_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(BENCH_MODELS),
        help=f"default {DEFAULT_MODEL} (the built-in real model); the others are random",
    )


def random_samples(n: int, context: int, continuation: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [(ids(context), ids(continuation)) for _ in range(n)]


def shared_weight_memory(pid: int) -> dict[str, int]:
    """Bytes of a process's memory, split into shared-weight mappings and the rest.

    Weight views are mappings of torch's shared-memory segments (unlinked
    /dev/shm/torch_* files). `Private_*` inside them would be a private copy.
    """
    totals = {"weights_mapped": 0, "weights_private": 0, "process_private": 0}
    in_weights = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            in_weights = "/torch_" in line
            continue
        key, _, value = line.partition(":")
        if key not in ("Size", "Private_Clean", "Private_Dirty"):
            continue
        kib = int(value.split()[0]) * 1024
        if key == "Size" and in_weights:
            totals["weights_mapped"] += kib
        elif key != "Size":
            totals["process_private"] += kib
            if in_weights:
                totals["weights_private"] += kib
    return totals


def decode_tokens_per_s(
    url: str, streams: int, tokens: int, extra: dict | None = None, one_request: bool = False
) -> float:
    """Generated tokens per second of `streams` concurrent greedy completions.

    `one_request` sends them as one completion with `streams` prompts: they reach the
    engine together and decode as one full batch every step, so the figure measures
    the engine, not how the HTTP requests happened to interleave on a busy machine."""
    prompt = "In the morning the harbour"
    body = {
        "model": _model_name(url),
        "prompt": [prompt] * streams if one_request else prompt,
        "temperature": 0,
        "max_tokens": tokens,
        "ignore_eos": True,
        **(extra or {}),
    }

    def one(_: int) -> int:
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        generated = sum(pool.map(one, range(1 if one_request else streams)))
    return generated / (time.perf_counter() - started)


def paired_ratios(values: list[float], baseline: list[float]) -> str:
    """The median and quartiles of value / baseline over rounds measured in pairs: the
    figure this machine's drift (10-20 % between runs) leaves meaningful."""
    ratios = [a / b for a, b in zip(values, baseline, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    median = statistics.median(ratios)
    return f"{median:.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}, {len(ratios)} pairs)"


def _model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
