"""The trainer's private memory per step, against the trained weights' bytes.

    python bench/bench_trainer_memory.py [--model smollm2-135m] [--samples 4 --tokens 128]
        [--rank 64]

Each mode runs in a fresh process on a Hugging Face model of its own (fp32). A step's
memory is what it holds beside the weights: the optimizer state it keeps (its tensors'
bytes, exact) plus the peak of what the step allocates and frees again (gradients,
activations, logits): the process's anonymous resident memory sampled every
millisecond, above its level when the step starts. The children run with
MALLOC_MMAP_THRESHOLD_=65536, so every tensor of 64 KiB or more is its own mapping
and goes back to the kernel when freed: resident memory then follows the live tensors
(by default glibc keeps freed blocks, and a peak would stay resident for good). The
first step is a warm-up, reported apart: it allocates the optimizer state, and torch's
libraries allocate buffers of their own the first time they run a backward pass (about
0.4 GB here, whatever the mode: not tensors, and not per step). Steps 2 and 3 are
measured; the larger is printed.

Modes: every linear weight, fenced (the default); the same recomputing block
activations in the backward pass (LIVETRAIN_RECOMPUTE_ABOVE_TOKENS=0); a quarter of
the blocks (LIVETRAIN_TRAIN_LAYERS); the per-layer step (LIVETRAIN_STEP_MODE=per_layer,
which recomputes every batch). `--rank 1` is APOLLO-Mini's state (a request's `rank`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model, model_config, random_samples  # noqa: E402

MODES = {
    "all linear": {},
    "all linear, recomputed": {"recompute_above_tokens": 0},
    "last quarter of the blocks": {"layers": "quarter"},
    "all linear, per layer (recomputes)": {"step_mode": "per_layer"},
}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonPeak:
    """The peak of the process's anonymous resident memory while it runs, sampled
    every millisecond in a thread of its own."""

    def __init__(self) -> None:
        self.peak = _kib("RssAnon:")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _kib("RssAnon:"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(model_dir: Path, mode: dict, samples: int, tokens: int, rank: int) -> dict:
    """One mode, measured in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM

    from livetrain.config import OptimizerSettings, TrainableFamilies
    from livetrain.formats.messages import Applied, Prepared
    from livetrain.trainer.model import decoder_blocks, own_model
    from livetrain.trainer.trainer import Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    blocks = len(decoder_blocks(model))
    layers = tuple(range(blocks - blocks // 4, blocks)) if mode.get("layers") else ()
    attached = own_model(model, model_dir, TrainableFamilies(layers=layers))
    trainer = Trainer(
        attached,
        model_dir,
        recompute_above_tokens=mode.get("recompute_above_tokens", 10**9),
        step_mode=mode.get("step_mode", "fenced"),
    )
    vocab = model_config(model_dir)["vocab_size"]
    batch = random_samples(samples, tokens // 2, tokens // 2, vocab)
    settings = OptimizerSettings(lr=1e-4, rank=rank)
    transient = []
    for step in (1, 2, 3):
        start = _kib("RssAnon:")
        peak = AnonPeak()
        assert isinstance(trainer.prepare(batch, settings, True), Prepared)
        assert isinstance(trainer.apply(step), Applied)
        transient.append(peak.stop() - start)
        if step == 1:
            first_step_kept = _kib("RssAnon:") - start
    state = trainer.optimizer.state_bytes()
    return {
        "step_peak": max(transient[1:]),
        "optimizer_bytes": state,
        "first_step_libraries": first_step_kept - state,
        "trained_bytes": sum(p.numel() * p.element_size() for p in attached.trainable.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="per sample: half context")
    parser.add_argument("--rank", type=int, default=64, help="APOLLO's rank (1: APOLLO-Mini)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    if args.child:
        result = child(model_dir, json.loads(args.child), args.samples, args.tokens, args.rank)
        print(json.dumps(result))
        return
    print(f"model {args.model}, fp32, {args.samples} x {args.tokens} tokens, rank {args.rank}")
    print(
        f"{'mode':<34} {'step peak':>10} {'optimizer':>10} {'together':>10} {'ratio':>6} "
        f"{'trained':>9} {'first step':>11}"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name, mode in MODES.items():
        command = [sys.executable, __file__, "--model", args.model, "--child", json.dumps(mode)]
        command += ["--samples", str(args.samples), "--tokens", str(args.tokens)]
        command += ["--rank", str(args.rank)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        together = r["step_peak"] + r["optimizer_bytes"]
        mb = lambda b: f"{b / 1e6:>7.1f} MB"  # noqa: E731
        print(
            f"{name:<34} {mb(r['step_peak'])} {mb(r['optimizer_bytes'])} {mb(together)} "
            f"{together / r['trained_bytes']:>5.2f}x {mb(r['trained_bytes'])} "
            f"{mb(r['first_step_libraries'])}"
        )


if __name__ == "__main__":
    main()
