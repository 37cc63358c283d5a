"""Decode speed with the live readout on against off, in the same server.

    python3 bench/bench_readout_decode.py [--model smollm2-135m|bench-llama-150m|bench-llama]
        [--rounds 6] [--streams 8] [--tokens 128] [--concepts 105] [--dtype float32]

The model served compiled (as vLLM defaults to) with a readout of 105 concepts on
4 blocks (evenly spaced). The default is the built-in real model; `--model
bench-llama` (12M, 2 minutes) is the worst case, where the readout's vectors are 1.7 %
of the weights a decode step reads.
Each round is one completion of `streams` prompts, so every step decodes a full batch;
rounds alternate (ABBA) between every prompt asking for the
readout (`vllm_xargs: {"readout": true}`) and none, so machine drift hits both sides.
Printed: the median of on/off over adjacent round pairs (target >= 0.97), and the
worker's own account of the time it spent on the readout as a share of the readout-on
rounds (a timer in the process, so free of the machine's noise). Then a second server
with no readout at launch measures what the capture costs requests that never ask
(separate processes: expect run-to-run noise of several %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_model_argument,
    bench_model,
    decode_tokens_per_s,
    model_config,
    paired_ratios,
)

from livetrain.formats import readout_format  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402

ON = {"vllm_xargs": {"readout": True}}


def write_readout(folder: Path, concepts: int, layers: list[int], hidden: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    vectors = {i: F.normalize(torch.randn(concepts, hidden, generator=gen), dim=1) for i in layers}
    readout_format.save(
        folder, readout_format.Readout([f"c{k}" for k in range(concepts)], layers, vectors)
    )
    return folder


def serve(model: Path, work: Path, name: str, readout: Path | None, dtype: str) -> Server:
    env = plugin_env()
    env["LIVETRAIN_STATE_DIR"] = str(work / "state")
    env["LIVETRAIN_RUNTIME_DIR"] = str(work / "run")
    if readout is not None:
        env["LIVETRAIN_READOUT"] = str(readout)
    args = ["--max-model-len", "512", "--max-num-seqs", "16", "--dtype", dtype]
    return Server(model, 8313, args, env=env, log_path=work / f"{name}.log")


def readout_layers(num_layers: int, count: int = 4) -> list[int]:
    return sorted({round(k * (num_layers - 1) / (count - 1)) for k in range(count)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concepts", type=int, default=105)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cli = parser.parse_args()
    model = bench_model(cli.model)
    config = model_config(model)
    layers = readout_layers(config["num_hidden_layers"])

    def rate(extra: dict | None) -> float:
        return decode_tokens_per_s(server.url, cli.streams, cli.tokens, extra, one_request=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        readout = write_readout(work / "readout", cli.concepts, layers, config["hidden_size"])
        with serve(model, work, "readout", readout, cli.dtype) as server:
            server.wait_healthy()
            for extra in (ON, None, ON, None):  # warm-up: compile, caches, allocator
                rate(extra)
            before = httpx.get(f"{server.url}/readout").json()["worker"]
            on, off, on_seconds = [], [], 0.0
            for k in range(cli.rounds):  # ABBA: neither side always runs first
                for extra in (ON, None) if k % 2 == 0 else (None, ON):
                    started = time.perf_counter()
                    (on if extra else off).append(rate(extra))
                    if extra:
                        on_seconds += time.perf_counter() - started
            after = httpx.get(f"{server.url}/readout").json()["worker"]
        with serve(model, work, "plain", None, cli.dtype) as server:
            server.wait_healthy()
            rate(None)
            plain = [rate(None) for _ in range(cli.rounds)]
    steps = after["steps"] - before["steps"]
    seconds = after["seconds"] - before["seconds"]
    print(
        f"{cli.model}, {cli.dtype}: {cli.streams} prompts x {cli.tokens} tokens per round, "
        f"{cli.concepts} concepts x layers {layers}"
    )
    print(f"readout on : {statistics.median(on):.0f} tok/s (rounds {[round(x) for x in on]})")
    print(f"readout off: {statistics.median(off):.0f} tok/s (rounds {[round(x) for x in off]})")
    print(f"on / off (median of paired rounds): {paired_ratios(on, off)}; target >= 0.97")
    print(
        f"worker time in the readout: {1e3 * seconds / max(steps, 1):.2f} ms/step over {steps} "
        f"steps = {seconds / on_seconds:.1%} of the readout-on rounds' wall time "
        f"(-> {1 - seconds / on_seconds:.3f}x); {after['dropped']} records dropped"
    )
    print(
        f"no readout at launch: {statistics.median(plain):.0f} tok/s; "
        f"readout-off / no-readout = {statistics.median(off) / statistics.median(plain):.3f}x"
    )


if __name__ == "__main__":
    main()
