"""Decode speed with steering against vLLM alone, both servers up, requests alternating.

    python3 bench/bench_steering_decode.py [--pairs 24] [--tokens 128] [--readout DIR]

Two servers of the built-in model, compiled (as vLLM defaults to): vLLM without
livetrain, and livetrain with the built-in readout (so every captured block adds its
steering buffer every step, steered or not). Each pair sends one batch of 8
completions to each cell in turn (the order reversed every other pair):

- `vllm`: vLLM alone, no request steers;
- `steer_0`: livetrain, no request steers (what requests that do not ask pay);
- `steer_1`: livetrain, 1 of the 8 steers (two concepts, one block);
- `steer_8`: livetrain, all 8 steer.

Printed: tokens/s per cell, and each livetrain cell over `vllm` in the same pair:
median and quartiles (targets: steer_0 >= 0.99x, steer_1 and steer_8 >= 0.97x).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model, paired_ratios  # noqa: E402

from livetrain.formats import readout_format  # noqa: E402
from livetrain.tools.default_model import DEFAULT_READOUT  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402

PORT = 8331
STREAMS = 8
PROMPT = "In the morning the harbour"


def serve(model: Path, work: Path, name: str, readout: Path | None, port: int) -> Server:
    env = plugin_env()
    env["LIVETRAIN_STATE_DIR"] = str(work / "state")
    if readout is None:
        env["VLLM_PLUGINS"] = ""
    else:
        env["LIVETRAIN_READOUT"] = str(readout)
    args = ["--max-model-len", "512", "--max-num-seqs", "16"]
    return Server(model, port, args, env=env, log_path=work / f"{name}.log")


def batch_rate(url: str, tokens: int, steer: dict | None, steered: int) -> float:
    """Generated tokens/s of 8 greedy completions decoded as one batch, the first
    `steered` of them with `steer` as their vllm_xargs. Prompts that share their
    vllm_xargs go in one request (a list of prompts), so they reach the engine together
    and every step decodes the full batch; concurrent HTTP requests instead interleave
    on 2 busy cores, which alone moved single rounds by +-20 % here."""
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "temperature": 0, "max_tokens": tokens, "ignore_eos": True}
    groups = [(STREAMS - steered, None), (steered, steer)]
    bodies = [
        {**body, "prompt": [PROMPT] * count, **({"vllm_xargs": xargs} if xargs else {})}
        for count, xargs in groups
        if count
    ]

    def one(sent: dict) -> int:
        reply = httpx.post(f"{url}/v1/completions", json=sent, timeout=600).raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        generated = sum(pool.map(one, bodies))
    return generated / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--readout", type=Path, default=DEFAULT_READOUT)
    cli = parser.parse_args()
    model = bench_model()
    readout = readout_format.load(cli.readout)
    concepts = readout.concepts[:2]
    middle = readout.layers[len(readout.layers) // 2]
    steer = {"steer": {concepts[0]: 4.0, concepts[1]: -2.0}, "steer_layers": [middle]}
    cells = {"vllm": ("vllm", 0), "steer_0": ("livetrain", 0)}
    cells |= {"steer_1": ("livetrain", 1), "steer_8": ("livetrain", STREAMS)}
    rates: dict[str, list[float]] = {cell: [] for cell in cells}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        servers = {
            name: stack.enter_context(serve(model, work, name, folder, PORT + k))
            for k, (name, folder) in enumerate((("vllm", None), ("livetrain", cli.readout)))
        }
        for server in servers.values():
            server.wait_healthy()
        for name, steered in cells.values():  # warm-up: compile, caches, allocator
            batch_rate(servers[name].url, 16, steer, steered)
        for pair in range(cli.pairs):
            order = list(cells) if pair % 2 == 0 else list(cells)[::-1]
            for cell in order:
                name, steered = cells[cell]
                # The first batch after the other server ran is ~15 % slower (caches,
                # the other's threads going idle): run a short one first, not measured.
                batch_rate(servers[name].url, 8, steer, steered)
                rates[cell].append(batch_rate(servers[name].url, cli.tokens, steer, steered))
            print({cell: round(r[-1], 1) for cell, r in rates.items()}, flush=True)
        worker = httpx.get(f"{servers['livetrain'].url}/readout").json()["worker"]
    print(
        f"built-in model, batches of {STREAMS} completions x {cli.tokens} tokens; steering "
        f"{steer['steer']} at block {middle}; worker steered {worker['steered_steps']} steps"
    )
    for cell, values in rates.items():
        print(f"{cell:8s} {statistics.median(values):7.1f} tok/s")
    for cell in ("steer_0", "steer_1", "steer_8"):
        print(f"{cell} / vllm: median {paired_ratios(rates[cell], rates['vllm'])}")


if __name__ == "__main__":
    main()
