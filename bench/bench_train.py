"""Training through vLLM: memory, optimizer state, HTTP + ZMQ overhead, weight latency.

    python bench/bench_train.py [--steps 8]

Every figure is printed next to a baseline measured in the same run:
- memory the trainer holds for weights, against the size of the weights;
- optimizer bytes per parameter, against 8r/min(m,n) (APOLLO) and 8 (AdamW);
- /train tokens/s through HTTP + ZMQ + the engine pause, against the same step run
  directly in one process (`Trainer.prepare` + `apply`, no IPC). The baseline runs
  while the same vLLM server is up and idle, so both sides share the machine's load
  (vLLM's CPU worker polls even when idle), in alternating rounds;
- the optimizer's own step (`Apollo.step`: its prepare and apply, no forward or
  backward) against `torch.optim.AdamW.step` on the same linear weights and gradients,
  in the same process;
- latency from /train returning to the first completion that uses the new weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_model_argument,
    bench_model,
    model_config,
    random_samples,
    shared_weight_memory,
)

from livetrain.config import OptimizerSettings, TrainableFamilies  # noqa: E402
from livetrain.formats.messages import Applied, Prepared  # noqa: E402
from livetrain.tools.client import LivetrainClient  # noqa: E402
from livetrain.tools.launch import Server, plugin_env  # noqa: E402
from livetrain.trainer.apollo import Apollo  # noqa: E402
from livetrain.trainer.loss import continuation_logprobs, mean_loss  # noqa: E402
from livetrain.trainer.model import classify, own_model  # noqa: E402
from livetrain.trainer.trainer import Trainer  # noqa: E402

SETTINGS = {"lr": 1e-4}


def in_process_trainer(model_dir: Path, state_dir: Path) -> Trainer:
    """A Trainer on a Hugging Face model of its own; it saves its state after each step,
    as the server's does."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return Trainer(own_model(model, model_dir, TrainableFamilies()), model_dir, state_dir)


def in_process_tokens_per_s(trainer: Trainer, samples, steps: int) -> float:
    settings = OptimizerSettings(**SETTINGS)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        assert isinstance(trainer.prepare(samples, settings, retrain=True), Prepared)
        assert isinstance(trainer.apply(step + 1), Applied)
        times.append(time.perf_counter() - started)
    tokens = sum(len(c) for _, c in samples)
    return tokens / statistics.median(times[2:])


def optimizer_step_ms(model_dir: Path, samples, steps: int) -> dict[str, float]:
    """Median ms of one optimizer step over the linear weights, gradients from the same
    batch: APOLLO (livetrain's) against torch's AdamW, each on a fresh copy of the model."""
    out = {}
    for name in ("apollo", "adamw"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.requires_grad_(False)
        params = classify(model, TrainableFamilies()).apollo_params
        for p in params.values():
            p.requires_grad_(True)
        mean_loss(continuation_logprobs(model, samples)).backward()
        if name == "adamw":
            adamw = torch.optim.AdamW(list(params.values()), lr=SETTINGS["lr"])
            step = adamw.step
        else:
            step = functools.partial(Apollo(params, {}).step, OptimizerSettings(**SETTINGS))
        times = []
        with torch.no_grad():
            for _ in range(steps + 1):  # one warm-up: state allocation
                started = time.perf_counter()
                step()
                times.append((time.perf_counter() - started) * 1000)
        out[f"{name}_step_ms"] = statistics.median(times[1:])
    out["apollo_over_adamw"] = out["apollo_step_ms"] / out["adamw_step_ms"]
    return out


def http_tokens_per_s(client: LivetrainClient, samples, steps: int) -> tuple[float, float]:
    body = {"samples": [{"context_ids": c, "continuation_ids": t} for c, t in samples]}
    times, pauses = [], []
    for _ in range(steps + 2):
        started = time.perf_counter()
        reply = (
            client.http.post("/train", json={**body, **SETTINGS, "retrain": True})
            .raise_for_status()
            .json()
        )
        times.append(time.perf_counter() - started)
        pauses.append(reply["pause_ms"])
    tokens = sum(len(c) for _, c in samples)
    return tokens / statistics.median(times[2:]), statistics.median(pauses[2:])


def weight_latency(client: LivetrainClient, sample, trials: int) -> dict[str, float]:
    """ms from /train returning until a completion that reflects the new weights."""
    context, continuation = sample
    fresh, plain = [], []
    for _ in range(trials):
        t0 = time.perf_counter()
        client.continuation_logprobs(context, continuation)
        plain.append((time.perf_counter() - t0) * 1000)
        old = client.continuation_logprobs(context, continuation)
        client.train(context, continuation, lr=1e-3, retrain=True).raise_for_status()
        t0 = time.perf_counter()
        new = client.continuation_logprobs(context, continuation)
        fresh.append((time.perf_counter() - t0) * 1000)
        assert new != old, "the first completion after /train must see the new weights"
    return {
        "first_completion_ms": statistics.median(fresh),
        "same_completion_no_train_ms": statistics.median(plain),
        "trials_with_new_weights": trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="context and continuation each")
    add_model_argument(parser)
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    config = model_config(model_dir)
    samples = random_samples(args.batch, args.tokens, args.tokens, config["vocab_size"])
    results: dict[str, object] = {
        "model": str(model_dir),
        "batch": args.batch,
        "tokens_per_sample": 2 * args.tokens,
    }

    work = Path(tempfile.mkdtemp(prefix="livetrain-bench-"))
    env = plugin_env()
    env["LIVETRAIN_STATE_DIR"] = str(work / "state")
    env["LIVETRAIN_SYNC_DELAY_S"] = "0"  # never write the bench's random steps into the model
    vllm_args = ["--enforce-eager", "--max-model-len", "512", "--dtype", "float32"]
    with Server(model_dir, 8311, vllm_args, env=env, log_path=work / "server.log") as server:
        server.wait_healthy()
        client = LivetrainClient(server.url)
        client.wait_trainer()
        direct, http, pauses = [], [], []
        trainer = in_process_trainer(model_dir, work)
        for _ in range(args.rounds):
            direct.append(in_process_tokens_per_s(trainer, samples, args.steps))
            tps, pause_ms = http_tokens_per_s(client, samples, args.steps)
            http.append(tps)
            pauses.append(pause_ms)
        results["in_process_tokens_per_s"] = statistics.median(direct)
        results["http_tokens_per_s"] = statistics.median(http)
        results["median_pause_ms"] = statistics.median(pauses)
        results["http_over_in_process"] = results["http_tokens_per_s"] / statistics.median(direct)
        results["per_round_ratio"] = [h / d for h, d in zip(http, direct, strict=True)]
        status = client.status()
        results["trainer_memory"] = shared_weight_memory(status["trainer_pid"])
        results["weight_bytes"] = (model_dir / "model.safetensors").stat().st_size
        trainable = status["trainer"]["trainable_params"]
        results["optimizer_bytes_per_param"] = status["optimizer_state_bytes"] / trainable
        rank = OptimizerSettings().rank
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        results["apollo_formula_bytes_per_param"] = _apollo_formula(config, rank)
        results["adamw_bytes_per_param"] = 8.0
        results["shapes"] = f"hidden {hidden}, intermediate {inter}, rank {rank}"
        results["weight_latency"] = weight_latency(client, samples[0], trials=5)
    results["optimizer_step"] = optimizer_step_ms(model_dir, samples, args.steps)
    print(json.dumps(results, indent=2))


def _apollo_formula(config: dict, rank: int) -> float:
    """8 r / min(m, n) bytes per parameter, averaged over the model's linear weights."""
    h, i = config["hidden_size"], config["intermediate_size"]
    hd, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes = [(nq * hd, h), (nkv * hd, h), (nkv * hd, h), (h, nq * hd), (i, h), (i, h), (h, i)]
    state = sum(8 * min(rank, m, n) * max(m, n) for m, n in shapes)
    return state / sum(m * n for m, n in shapes)


if __name__ == "__main__":
    main()
