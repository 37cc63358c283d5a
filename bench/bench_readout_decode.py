"""Decode speed with the live readout on against off, in the same server.

    python3 bench/bench_readout_decode.py [--rounds 6] [--streams 8] [--tokens 64]

The bench model served (compiled, as vLLM defaults to) with a readout of 100 concepts
on all 4 of its blocks. Rounds alternate (ABBA): every stream asking for the readout
(`vllm_xargs: {"readout": true}`), or none, so machine drift hits both sides; the
printed ratio is the median of on/off over adjacent round pairs (target >= 0.97).
Then a second server with no readout at launch measures what the capture itself costs
requests that never ask (separate processes: expect run-to-run noise of several %).
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
from common import BENCH_CONFIG, bench_model, decode_tokens_per_s  # noqa: E402

from livetrain import readout_format  # noqa: E402
from livetrain.launch import Server, plugin_env  # noqa: E402

ON = {"vllm_xargs": {"readout": True}}


def write_readout(folder: Path, concepts: int, layers: list[int], hidden: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    vectors = {i: F.normalize(torch.randn(concepts, hidden, generator=gen), dim=1) for i in layers}
    readout_format.save(
        folder, readout_format.Readout([f"c{k}" for k in range(concepts)], layers, vectors)
    )
    return folder


def serve(model: Path, work: Path, name: str, readout: Path | None, dtype: str):
    env = plugin_env()
    env["LIVETRAIN_STATE_DIR"] = str(work / "state")
    env["LIVETRAIN_RUNTIME_DIR"] = str(work / "run")
    if readout is not None:
        env["LIVETRAIN_READOUT"] = str(readout)
    args = ["--max-model-len", "512", "--max-num-seqs", "16", "--dtype", dtype]
    return Server(model, 8313, args, env=env, log_path=work / f"{name}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cli = parser.parse_args()
    model = bench_model()
    layers = list(range(BENCH_CONFIG["num_hidden_layers"]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        readout = write_readout(work / "readout", cli.concepts, layers, BENCH_CONFIG["hidden_size"])
        with serve(model, work, "readout", readout, cli.dtype) as server:
            server.wait_healthy()
            decode_tokens_per_s(server.url, cli.streams, cli.tokens, ON)  # warm-up
            started = time.perf_counter()
            on, off = [], []
            for k in range(cli.rounds):  # ABBA: neither side always runs first
                for extra in (ON, None) if k % 2 == 0 else (None, ON):
                    rate = decode_tokens_per_s(server.url, cli.streams, cli.tokens, extra)
                    (on if extra else off).append(rate)
            both_sides_s = time.perf_counter() - started
            worker = httpx.get(f"{server.url}/readout").json()["worker"]
        with serve(model, work, "plain", None, cli.dtype) as server:
            server.wait_healthy()
            decode_tokens_per_s(server.url, cli.streams, cli.tokens)
            plain = [
                decode_tokens_per_s(server.url, cli.streams, cli.tokens) for _ in range(cli.rounds)
            ]
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    print(
        f"{cli.streams} streams x {cli.tokens} tokens, {cli.concepts} concepts x layers {layers}, "
        f"{cli.dtype}"
    )
    print(f"readout on : {statistics.median(on):.0f} tok/s (rounds {[round(x) for x in on]})")
    print(f"readout off: {statistics.median(off):.0f} tok/s (rounds {[round(x) for x in off]})")
    print(
        f"on / off (median of paired rounds): {statistics.median(ratios):.3f}x "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}; target >= 0.97)"
    )
    print(
        f"worker time in the readout: {worker['seconds']:.2f} s over {worker['steps']} steps "
        f"({1e3 * worker['seconds'] / max(worker['steps'], 1):.2f} ms/step), "
        f"{worker['seconds'] / (both_sides_s / 2):.1%} of the readout-on rounds' wall time "
        f"(approx.: half of all rounds); {worker['dropped']} messages dropped"
    )
    print(
        f"no readout at launch: {statistics.median(plain):.0f} tok/s; "
        f"readout-off / no-readout = {statistics.median(off) / statistics.median(plain):.3f}x"
    )


if __name__ == "__main__":
    main()
