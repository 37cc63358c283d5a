"""The trainer's peak memory per step beside the weights, against the trained weights' bytes.

    python bench/bench_trainer_memory.py [--model smollm2-135m] [--samples 4 --tokens 128]

Each mode runs in a fresh process on a Hugging Face model of its own (fp32): the
weights are loaded, the kernel's peak-RSS mark is reset (/proc/self/clear_refs), two
steps run (the first allocates the optimizer state, which the trainer then keeps), and
the peak RSS above the loaded weights is what a step needs beside them: gradients,
optimizer state, activations, logits. The baseline printed next to it is the bytes of
the weights that mode trains. Modes: every linear weight; the same recomputing block
activations in the backward pass (LIVETRAIN_RECOMPUTE_ABOVE_TOKENS=0); a quarter of
the blocks (LIVETRAIN_TRAIN_LAYERS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model, model_config, random_samples  # noqa: E402

MODES = {
    "all linear": {},
    "all linear, recomputed": {"recompute_above_tokens": 0},
    "last quarter of the blocks": {"layers": "quarter"},
}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(model_dir: Path, mode: dict, samples: int, tokens: int) -> dict:
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
    )
    vocab = model_config(model_dir)["vocab_size"]
    batch = random_samples(samples, tokens // 2, tokens // 2, vocab)
    before = _kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark starts again here
    for step in (1, 2):
        assert isinstance(trainer.prepare(batch, OptimizerSettings(lr=1e-4), True), Prepared)
        assert isinstance(trainer.apply(step), Applied)
    trained = sum(p.numel() * p.element_size() for p in attached.trainable.values())
    return {"peak_above_weights": _kib("VmHWM:") - before, "trained_bytes": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="per sample: half context")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    if args.child:
        print(json.dumps(child(model_dir, json.loads(args.child), args.samples, args.tokens)))
        return
    print(f"model {args.model}, fp32, {args.samples} samples x {args.tokens} tokens, 2 steps")
    print(f"{'mode':<30} {'peak beside weights':>20} {'trained weights':>16} {'ratio':>7}")
    for name, mode in MODES.items():
        command = [sys.executable, __file__, "--model", args.model, "--child", json.dumps(mode)]
        command += ["--samples", str(args.samples), "--tokens", str(args.tokens)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        peak, trained = result["peak_above_weights"], result["trained_bytes"]
        ratio = peak / trained
        print(f"{name:<30} {peak / 1e6:>17.1f} MB {trained / 1e6:>13.1f} MB {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
