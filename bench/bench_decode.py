"""Decode speed with livetrain loaded against vLLM without it, and the pause per step.

    python bench/bench_decode.py [--dtype float32] [--rounds 2] [--eager]

Modes, each a fresh server (compiled, as vLLM defaults to), rounds alternating
A/B/C/A/B/C so the machine's drift hits every mode:

- `vllm_default`: no livetrain plugin; vLLM packs its CPU linear weights.
- `livetrain`: the plugins loaded, LIVETRAIN_CPU_KERNELS=vllm (the default): vLLM's
  packed kernels, packed afresh from the written weights with each step.
- `livetrain_plain`: LIVETRAIN_CPU_KERNELS=plain: F.linear on the plain weights.
- `vllm_keep_plain` (a control, not in the default set): no livetrain; vLLM's own
  dispatch keeps the plain weights beside its packed copies (keep_plain_worker.py).

Decode: tokens/s of one stream, and of 8 prompts sent as one completion (so each
step decodes a full batch of 8). In each livetrain server three /train steps then
give the pause per step (`pause_ms`), the packing time (`repack.ms`, ahead of the
pause where `repack.ahead`), and the trainer's own write (`trainer_ms.apply`: the bare
in-place write), all three from the same steps.
`cpu_cores`: CPU each process of the server used during the batch-8 decodes, in cores
(from /proc), so a cost outside the model's kernels (the trainer, the API server) shows;
`worker_rss_mb`: the worker's resident memory after decoding.
Prints every round, the medians, and each livetrain mode over vllm_default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model, decode_tokens_per_s  # noqa: E402

from livetrain.tools.client import LivetrainClient  # noqa: E402
from livetrain.tools.launch import PLUGINS, Server, plugin_env  # noqa: E402

MODES = {  # mode -> (VLLM_PLUGINS, LIVETRAIN_CPU_KERNELS, --worker-extension-cls)
    "vllm_default": ("", None, None),
    "livetrain": (",".join(PLUGINS), "vllm", None),
    "livetrain_plain": (",".join(PLUGINS), "plain", None),
}
CONTROLS = {"vllm_keep_plain": ("", None, "keep_plain_worker.KeepPlain")}  # only if named
REPEATS = 3  # decode measurements per server; the median is the round's figure


def _process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """(command name, user + system seconds) of each process still alive."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = (
            stat[stat.index("(") + 1 : stat.rindex(")")],
            (int(fields[11]) + int(fields[12])) / ticks,
        )
    return out


def worker_rss_mb(server: Server) -> float:
    """Resident memory of vLLM's worker process (shared weight memory counted once)."""
    assert server.process is not None
    for pid in _process_tree(server.process.pid):
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        if status["Name"].strip() == "VLLM::Worker":
            return int(status["VmRSS"].split()[0]) / 1024  # kB
    raise RuntimeError("no VLLM::Worker process under the server")


def batch_8_decode(server: Server, roles: dict[int, str]) -> tuple[float, dict[str, float]]:
    """Median batch-8 tokens/s, and the cores each process used meanwhile (keyed by
    `roles`, else by command name)."""
    pids = _process_tree(server.process.pid)
    before, started = _cpu_seconds(pids), time.perf_counter()
    rates = [decode_tokens_per_s(server.url, 8, 128, one_request=True) for _ in range(REPEATS)]
    after, wall = _cpu_seconds(pids), time.perf_counter() - started
    cores = {
        roles.get(pid, name): round((seconds - before.get(pid, (name, 0.0))[1]) / wall, 3)
        for pid, (name, seconds) in after.items()
    }
    return statistics.median(rates), cores


def measure_steps(url: str) -> dict[str, float]:
    """Median pause, repack and trainer write of three small /train steps."""
    client = LivetrainClient(url, timeout=600)
    client.wait_trainer()
    context, continuation = client.tokenize("The lighthouse keeper"), client.tokenize(" slept.")
    replies = [
        client.train(context, continuation, lr=1e-5, retrain=True).raise_for_status().json()
        for _ in range(3)
    ]
    return {
        "pause_ms": statistics.median(r["pause_ms"] for r in replies),
        "repack_ms": statistics.median(r["repack"]["ms"] for r in replies),
        "repacked_tensors": replies[-1]["repack"]["tensors"],
        "packed_ahead": replies[-1]["repack"]["ahead"],
        "trainer_apply_ms": statistics.median(r["trainer_ms"]["apply"] for r in replies),
    }


def measure(model: Path, mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plugins, kernels, extension = {**MODES, **CONTROLS}[mode]
    env = plugin_env()
    env["VLLM_PLUGINS"] = plugins
    env["LIVETRAIN_STATE_DIR"] = str(work / "state" / mode)
    env["LIVETRAIN_SYNC_DELAY_S"] = "0"
    if kernels:
        env["LIVETRAIN_CPU_KERNELS"] = kernels
    vllm_args = ["--max-model-len", "512", "--dtype", args.dtype]
    vllm_args += ["--enforce-eager"] if args.eager else []
    if extension:  # a module in bench/
        env["PYTHONPATH"] = f"{Path(__file__).parent}:{env.get('PYTHONPATH', '')}"
        vllm_args += ["--worker-extension-cls", extension]
    with Server(model, 8312, vllm_args, env=env, log_path=work / f"{mode}.log") as server:
        server.wait_healthy()
        assert server.process is not None
        roles = {server.process.pid: "api_server"}
        if kernels:
            roles[LivetrainClient(server.url).wait_trainer()["trainer_pid"]] = "trainer"
        decode_tokens_per_s(server.url, 8, 16, one_request=True)  # warm-up
        batch_1 = statistics.median(decode_tokens_per_s(server.url, 1, 128) for _ in range(REPEATS))
        batch_8, cores = batch_8_decode(server, roles)
        result: dict[str, Any] = {"batch_1": batch_1, "batch_8": batch_8, "cpu_cores": cores}
        result["worker_rss_mb"] = worker_rss_mb(server)
        if kernels:
            result |= measure_steps(server.url)
        print(json.dumps({"mode": mode, **result}), flush=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default compiled)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    add_model_argument(parser)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    model, work = bench_model(args.model), Path(tempfile.mkdtemp(prefix="livetrain-decode-"))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            runs[mode].append(measure(model, mode, args, work))
    summary = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "cpu_cores"}
        for mode, rs in runs.items()
    }
    base = runs.get("vllm_default")
    ratios = {
        mode: {
            cell: {
                "median": summary[mode][cell] / summary["vllm_default"][cell],
                "rounds": [r[cell] / b[cell] for r, b in zip(runs[mode], base, strict=True)],
            }
            for cell in ("batch_1", "batch_8")
        }
        for mode in modes
        if base and mode != "vllm_default"
    }
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "eager": args.eager,
                "tokens_per_s": summary,
                "over_vllm_default": ratios,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
