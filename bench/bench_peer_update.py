"""An update reaching inference: livetrain's in-place write against the copy-based
path RL trainers use with vLLM, same model, same run.

    python bench/bench_peer_update.py [--trials 3] [--dtype float32]

Copy-based (TRL, verl, OpenRLHF): the trainer holds its own copy of the weights, takes
the optimizer step on it, then pushes the tensors into vLLM through `collective_rpc`
and vLLM's in-place `reload_weights` (which re-runs the CPU repacking), and drops the
prefix cache. Two hand-overs (bench/peer_worker.py):
- `shared`: the trainer's weights live in a shared-memory file from the start, so the
  hand-over is a table of offsets and the worker makes the one copy into vLLM's
  parameters (the best copy path);
- `serialized`: the trainer writes the tensors to a safetensors file in /dev/shm and
  the worker reads it back (as a weight push over a socket or file would).
livetrain: POST /train on a livetrain server; its time to visibility is the reply's
`update_ms`, from the step computed to the new weights served: the write into vLLM's
own memory, the packing of vLLM's CPU kernels (ahead of the pause) and the pause.

For each: ms from the end of the optimizer step until a completion sees the new
weights (that completion's own time excluded: it is the same for all), how long
inference was blocked, and the trainer's extra weight memory. Both servers run the
same flags (eager, so starting them does not dominate the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model  # noqa: E402

from livetrain.config import OptimizerSettings, TrainableFamilies  # noqa: E402
from livetrain.tools.client import LivetrainClient  # noqa: E402
from livetrain.tools.launch import PLUGINS, Server, plugin_env  # noqa: E402
from livetrain.trainer.apollo import Apollo  # noqa: E402
from livetrain.trainer.loss import continuation_logprobs, mean_loss  # noqa: E402
from livetrain.trainer.model import classify  # noqa: E402

LR = 1e-4
CONTEXT, CONTINUATION = "The lighthouse keeper counted", " the ships that never came."


class PeerTrainer:
    """A Hugging Face model whose parameters live in one shared-memory file, stepped by
    the same APOLLO livetrain runs: the copy-based trainer's own weights."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, shm: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        sizes = {n: p.numel() * p.element_size() for n, p in params.items()}
        self.bytes = sum(sizes.values())
        raw = torch.from_file(str(shm), shared=True, size=self.bytes, dtype=torch.uint8)
        self.table: dict[str, tuple[str, list[int], int, int]] = {}
        offset = 0
        for name, param in params.items():
            view = raw[offset : offset + sizes[name]].view(param.dtype).view(param.shape)
            view.copy_(param.data)
            param.data = view
            self.table[name] = (str(param.dtype).removeprefix("torch."), list(param.shape),
                                offset, sizes[name])  # fmt: skip
            offset += sizes[name]
        self.path = shm
        attached = classify(self.model, TrainableFamilies())
        self.trained = attached.apollo_params
        for p in self.trained.values():
            p.requires_grad_(True)
        self.apollo = Apollo(self.trained, {})

    def step(self, samples: list[tuple[list[int], list[int]]]) -> None:
        for p in self.trained.values():
            p.grad = None
        mean_loss(continuation_logprobs(self.model, samples)).backward()
        with torch.no_grad():
            self.apollo.step(OptimizerSettings(lr=LR))

    def shared_table(self) -> str:
        return json.dumps({"path": str(self.path), "bytes": self.bytes, "tensors": self.table})

    def serialize(self, path: Path) -> None:
        save_file({n: p.detach() for n, p in self.model.named_parameters()}, path)


def rpc(url: str, method: str, arg: str) -> tuple[float, float]:
    """(round-trip ms, the worker's ms) of a dev-mode collective_rpc."""
    started = time.perf_counter()
    reply = httpx.post(
        f"{url}/collective_rpc", json={"method": method, "args": [arg]}, timeout=600
    ).raise_for_status()
    worker_ms = float(reply.json()["results"][0])
    return (time.perf_counter() - started) * 1000, worker_ms


def peer_runs(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    env = plugin_env()
    env["VLLM_PLUGINS"] = ""  # vLLM as the peers run it: no livetrain
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env["PYTHONPATH"] = f"{Path(__file__).parent}:{env.get('PYTHONPATH', '')}"
    vllm_args = ["--enforce-eager", "--max-model-len", "512", "--dtype", args.dtype]
    vllm_args += ["--worker-extension-cls", "peer_worker.PeerUpdate"]
    results: dict[str, dict] = {}
    with Server(model_dir, 8313, vllm_args, env=env, log_path=work / "peer.log") as server:
        server.wait_healthy()
        client = LivetrainClient(server.url)
        sample = (client.tokenize(CONTEXT), client.tokenize(CONTINUATION))
        trainer = PeerTrainer(model_dir, getattr(torch, args.dtype), work / "peer-weights.bin")
        for variant in ("shared", "serialized"):
            visible, blocked = [], []
            for _ in range(args.trials):
                before = client.continuation_logprobs(*sample)
                trainer.step([sample])
                started = time.perf_counter()
                if variant == "shared":
                    _, worker_ms = rpc(server.url, "peer_load_shared", trainer.shared_table())
                else:
                    path = work / "push.safetensors"
                    trainer.serialize(path)
                    _, worker_ms = rpc(server.url, "peer_load_serialized", str(path))
                httpx.post(f"{server.url}/reset_prefix_cache", timeout=60).raise_for_status()
                visible.append((time.perf_counter() - started) * 1000)
                blocked.append(worker_ms)
                assert client.continuation_logprobs(*sample) != before, "update not visible"
            results[variant] = {
                "to_visible_ms": statistics.median(visible),
                "inference_blocked_ms": statistics.median(blocked),
                "trainer_weight_copy_bytes": trainer.bytes,
            }
    return results


def livetrain_run(model_dir: Path, args: argparse.Namespace, work: Path) -> dict:
    env = plugin_env()
    env["VLLM_PLUGINS"] = ",".join(PLUGINS)
    env["LIVETRAIN_STATE_DIR"] = str(work / "state")
    env["LIVETRAIN_SYNC_DELAY_S"] = "0"
    vllm_args = ["--enforce-eager", "--max-model-len", "512", "--dtype", args.dtype]
    with Server(model_dir, 8314, vllm_args, env=env, log_path=work / "livetrain.log") as server:
        server.wait_healthy()
        client = LivetrainClient(server.url, timeout=600)
        client.wait_trainer()
        sample = (client.tokenize(CONTEXT), client.tokenize(CONTINUATION))
        replies = []
        for _ in range(args.trials + 1):  # one warm-up
            before = client.continuation_logprobs(*sample)
            reply = client.train(*sample, lr=LR, retrain=True).raise_for_status().json()
            replies.append(reply)
            assert client.continuation_logprobs(*sample) != before, "update not visible"
        replies = replies[1:]
        return {
            "to_visible_ms": statistics.median(r["update_ms"] for r in replies),
            "inference_blocked_ms": statistics.median(r["pause_ms"] for r in replies),
            "trainer_write_ms": statistics.median(r["trainer_ms"]["apply"] for r in replies),
            "packing_ms": statistics.median(r["repack"]["ms"] for r in replies),
            "packed_ahead_of_pause": replies[-1]["repack"]["ahead"],
            "trainer_weight_copy_bytes": 0,  # views of vLLM's memory (bench_train measures)
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    add_model_argument(parser)
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="livetrain-peer-", dir="/dev/shm"))
    peers = peer_runs(model_dir, args, work)
    ours = livetrain_run(model_dir, args, work)
    best = min(peers.values(), key=lambda r: r["to_visible_ms"])
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "livetrain": ours,
                "copy_based": peers,
                "livetrain_over_best_copy": {
                    "to_visible": ours["to_visible_ms"] / best["to_visible_ms"],
                    "inference_blocked": ours["inference_blocked_ms"]
                    / best["inference_blocked_ms"],
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
