"""Decode speed with livetrain loaded against vLLM without it, and the pause per step.

    python bench/bench_decode.py [--dtype float32] [--rounds 2] [--eager]
    python bench/bench_decode.py --paired [--pairs 8] --modes vllm_default,livetrain
    python bench/bench_decode.py --paired --tensor-parallel 2 --model bench-llama-150m

Modes, each a fresh server (compiled, as vLLM defaults to), rounds alternating
A/B/C/A/B/C so the machine's drift hits every mode. With `--paired`, the modes'
servers run at the same time instead and take one request each in turn (A/B, B/A, ...),
so each pair's ratio is measured within seconds; a round's servers drift apart by more
than the gap measured (10-20 % here).

- `vllm_default`: no livetrain plugin; vLLM packs its CPU linear weights.
- `livetrain`: the plugins loaded, LIVETRAIN_CPU_KERNELS=vllm (the default): vLLM's
  packed kernels, packed afresh from the written weights with each step.
- `livetrain_plain`: LIVETRAIN_CPU_KERNELS=plain: F.linear on the plain weights.
- `vllm_keep_plain` (a control, not in the default set): no livetrain; vLLM's own
  dispatch keeps the plain weights beside its packed copies (keep_plain_worker.py).
- `vllm_shared_weights` (a control): as `vllm_keep_plain`, and every parameter then
  moves into fd-backed shared memory, as livetrain's attach moves it
  (shared_weights_worker.py).

Decode: tokens/s of one stream, and of 8 prompts sent as one completion (so each
step decodes a full batch of 8). In each livetrain server three /train steps then
give the pause per step (`pause_ms`), the packing time (`repack.ms`, ahead of the
pause where `repack.ahead`), and the trainer's own write (`trainer_ms.apply`: the bare
in-place write), all three from the same steps.
`cpu_cores`: CPU each process of the server used during the batch-8 decodes, in cores
(from /proc), so a cost outside the model's kernels (the trainer, the API server) shows;
`worker_rss_mb`: the worker's resident memory after decoding (rank 0's under tensor
parallelism). `--tensor-parallel 2` serves every mode on two ranks, a core each (the
built-in model's 9 attention heads do not split in two: use a bench-llama shape).
`visible_ms` is a step's whole /train reply time: from then on completions use it.
Prints every round, the medians, and each livetrain mode over vllm_default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
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
CONTROLS = {  # run only if named in --modes
    "vllm_keep_plain": ("", None, "keep_plain_worker.KeepPlain"),
    "vllm_shared_weights": ("", None, "shared_weights_worker.SharedWeights"),
}
ALL_MODES = {**MODES, **CONTROLS}
REPEATS = 3  # decode measurements per server; the median is the round's figure
CELLS = {"batch_1": 1, "batch_8": 8}  # cell -> prompts sent as one completion
PORT = 8312


def loads_livetrain(mode: str) -> bool:
    return bool(ALL_MODES[mode][0])


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
    """Resident memory of vLLM's (first) worker process, shared weight memory counted
    once: `VLLM::Worker`, or `VLLM::Worker_TP0` of several."""
    assert server.process is not None
    workers = {}
    for pid in _process_tree(server.process.pid):
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        if status["Name"].strip().startswith("VLLM::Worker"):
            workers[status["Name"].strip()] = int(status["VmRSS"].split()[0]) / 1024  # kB
    if not workers:
        raise RuntimeError("no VLLM::Worker process under the server")
    return workers[min(workers)]


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
        "visible_ms": statistics.median(r["elapsed_ms"] for r in replies),
    }


@contextlib.contextmanager
def serving(
    model: Path, mode: str, args: argparse.Namespace, work: Path, port: int
) -> Iterator[tuple[Server, dict[int, str]]]:
    """A warmed-up server of `mode`, and the roles of its processes (for `cpu_cores`)."""
    plugins, kernels, extension = ALL_MODES[mode]
    env = plugin_env()
    env["VLLM_PLUGINS"] = plugins
    env["LIVETRAIN_STATE_DIR"] = str(work / "state" / mode)
    env["LIVETRAIN_SYNC_DELAY_S"] = "0"
    if kernels:
        env["LIVETRAIN_CPU_KERNELS"] = kernels
    vllm_args = ["--max-model-len", "512", "--dtype", args.dtype]
    vllm_args += ["--enforce-eager"] if args.eager else []
    if args.tensor_parallel > 1:
        vllm_args += ["--tensor-parallel-size", str(args.tensor_parallel)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(args.tensor_parallel)))
    if extension:  # a module in bench/
        env["PYTHONPATH"] = f"{Path(__file__).parent}:{env.get('PYTHONPATH', '')}"
        vllm_args += ["--worker-extension-cls", extension]
    with Server(model, port, vllm_args, env=env, log_path=work / f"{mode}.log") as server:
        server.wait_healthy()
        assert server.process is not None
        roles = {server.process.pid: "api_server"}
        if kernels:
            roles[LivetrainClient(server.url).wait_trainer()["trainer_pid"]] = "trainer"
        decode_tokens_per_s(server.url, 8, 16, one_request=True)  # warm-up
        yield server, roles


def after_decode(server: Server, mode: str) -> dict[str, Any]:
    """The worker's memory, then (livetrain modes) three steps' pause and write."""
    result: dict[str, Any] = {"worker_rss_mb": worker_rss_mb(server)}
    if loads_livetrain(mode):
        result |= measure_steps(server.url)
    return result


def measure(model: Path, mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One round of one mode: a server of its own, decoded REPEATS times per cell."""
    with serving(model, mode, args, work, PORT) as (server, roles):
        batch_1 = statistics.median(decode_tokens_per_s(server.url, 1, 128) for _ in range(REPEATS))
        batch_8, cores = batch_8_decode(server, roles)
        result: dict[str, Any] = {"batch_1": batch_1, "batch_8": batch_8, "cpu_cores": cores}
        result |= after_decode(server, mode)
        print(json.dumps({"mode": mode, **result}), flush=True)
        return result


def measure_paired(
    model: Path, modes: list[str], args: argparse.Namespace, work: Path
) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, Any]]]:
    """Every mode's server up at once, one request to each in turn (the order reversed
    every other pair), so the machine's drift, which moves a whole round by 10-20 %
    here, hits both sides of a pair alike. The idle servers poll meanwhile, the same
    for every mode. Returns the pairs' rates per mode and each server's after_decode."""
    if sum(loads_livetrain(m) for m in modes) > 1:
        raise SystemExit("--paired: one livetrain mode at most (it locks the model folder)")
    rates: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with contextlib.ExitStack() as stack:
        servers = {
            mode: stack.enter_context(serving(model, mode, args, work, PORT + i))[0]
            for i, mode in enumerate(modes)
        }
        for pair in range(args.pairs):
            order = modes if pair % 2 == 0 else modes[::-1]
            measured: dict[str, dict[str, float]] = {mode: {} for mode in modes}
            for cell, streams in CELLS.items():
                for mode in order:
                    url = servers[mode].url
                    measured[mode][cell] = decode_tokens_per_s(url, streams, 128, one_request=True)
            print(json.dumps({"pair": pair, **measured}), flush=True)
            for mode in modes:
                rates[mode].append(measured[mode])
        return rates, {mode: after_decode(servers[mode], mode) for mode in modes}


def over_baseline(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each mode's decode over vllm_default's: the ratio of the medians, the median and
    quartiles of the rounds' (or pairs') ratios, and every round's."""
    base = runs.get("vllm_default")
    if not base:
        return {}
    ratios: dict[str, Any] = {}
    for mode, rs in runs.items():
        if mode == "vllm_default":
            continue
        ratios[mode] = {}
        for cell in CELLS:
            each = [r[cell] / b[cell] for r, b in zip(rs, base, strict=True)]
            ratios[mode][cell] = {
                "median": statistics.median(r[cell] for r in rs)
                / statistics.median(b[cell] for b in base),
                "median_of_rounds": statistics.median(each),
                "quartiles": statistics.quantiles(each, n=4) if len(each) > 1 else None,
                "rounds": each,
            }
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paired", action="store_true", help="all servers at once, see above")
    parser.add_argument("--pairs", type=int, default=8, help="requests per cell with --paired")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default compiled)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--tensor-parallel", type=int, default=1, choices=(1, 2))
    add_model_argument(parser)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    model, work = bench_model(args.model), Path(tempfile.mkdtemp(prefix="livetrain-decode-"))
    report: dict[str, Any] = {"dtype": args.dtype, "eager": args.eager, "paired": args.paired}
    report["tensor_parallel"] = args.tensor_parallel
    if args.paired:
        runs, report["servers"] = measure_paired(model, modes, args, work)
    else:
        runs = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(measure(model, mode, args, work))
    report["tokens_per_s"] = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "cpu_cores"}
        for mode, rs in runs.items()
    }
    report["over_vllm_default"] = over_baseline(runs)
    report["runs"] = runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
