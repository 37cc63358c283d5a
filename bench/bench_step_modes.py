"""What the memory-saving step modes cost in time, against the default fenced step.

    python bench/bench_step_modes.py [--model smollm2-135m] [--samples 4 --tokens 128]
        [--steps 6]

One process, one trainer per mode, each on a Hugging Face model of its own (fp32), the
modes' steps taken in turn (the order reversed every other round) so the machine's
drift hits them alike; the first round is a warm-up. Prints each mode's median step
time (prepare + apply, the trainer's whole share of a /train) and its ratio to the
fenced step's, median and quartiles of the rounds. Modes: fenced (the default),
fenced with block activations recomputed, per layer (which recomputes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_model_argument,
    bench_model,
    model_config,
    paired_ratios,
    random_samples,
)

MODES = {
    "fenced": {},
    "fenced, recomputed": {"recompute_above_tokens": 0},
    "per layer": {"step_mode": "per_layer"},
}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from livetrain.config import OptimizerSettings, TrainableFamilies
    from livetrain.formats.messages import Applied, Prepared
    from livetrain.trainer.model import own_model
    from livetrain.trainer.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="per sample: half context")
    parser.add_argument("--steps", type=int, default=6, help="measured rounds")
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    trainers = {}
    for name, mode in MODES.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.requires_grad_(False)
        trainers[name] = Trainer(
            own_model(model, model_dir, TrainableFamilies()),
            model_dir,
            recompute_above_tokens=mode.get("recompute_above_tokens", 10**9),
            step_mode=mode.get("step_mode", "fenced"),
        )
    vocab = model_config(model_dir)["vocab_size"]
    batch = random_samples(args.samples, args.tokens // 2, args.tokens // 2, vocab)
    times: dict[str, list[float]] = {name: [] for name in MODES}
    for round_ in range(args.steps + 1):
        order = list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]
        for name in order:
            trainer = trainers[name]
            started = time.perf_counter()
            assert isinstance(trainer.prepare(batch, OptimizerSettings(lr=1e-5), True), Prepared)
            assert isinstance(trainer.apply(round_ + 1), Applied)
            if round_ > 0:
                times[name].append(time.perf_counter() - started)
    print(f"model {args.model}, fp32, {args.samples} x {args.tokens} tokens, {args.steps} rounds")
    for name, ts in times.items():
        print(
            f"{name:<20} {statistics.median(ts):6.2f} s/step  x fenced: "
            f"{paired_ratios(ts, times['fenced'])}"
        )


if __name__ == "__main__":
    main()
