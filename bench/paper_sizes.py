"""On paper: what training in place needs for a 27B and a 70B model on 80 GB GPUs.

    python bench/paper_sizes.py [--gpu-gb 80] [--tokens 2048] [--rank 64]

Nothing runs on a GPU: the figures are arithmetic on the models' published shapes,
with the per-step terms this repository measured on the built-in model (the head in
chunks of 64 tokens, block inputs kept when recomputing). Served in bf16; every linear
weight trains (embeddings, norms and head frozen: the defaults).

Per mode, beside the served weights, per GPU (tensor parallel ranks split weights,
gradients and optimizer state evenly; one batch of `--tokens` tokens):
- fenced: a whole gradient (the trained weights' bytes, bf16) + APOLLO state
  (fp32 moments, 2·r·max(m, n) per matrix) + activations with recompute;
- per_layer: the largest single gradient + APOLLO state + the same activations.
Activations with recompute: every block's input (tokens × hidden × 2 B), one block
recomputed (about 16 hidden-sized and 3 intermediate-sized fp32 tensors per token, the
built-in model's measured transient scaled), and the head's chunk (64 tokens × vocabulary
× 4 B, four tensors). KV cache left = GPU − weights − trainer − vLLM's own working
memory (`--vllm-overhead-gb`, 4 GB assumed: CUDA graphs, sampler, activations).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) of every linear weight of one block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def params(self) -> int:
        linear = self.layers * sum(m * n for m, n in self.matrices())
        return linear + self.vocab * self.hidden * (1 if self.tied else 2)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


# Published configurations (config.json of each model).
GEMMA_3_27B = Shape("Gemma 3 27B", 5376, 62, 21504, 32, 16, 128, 262208, True)
LLAMA_3_70B = Shape("Llama 3 70B", 8192, 80, 28672, 64, 8, 128, 128256, False)

GB = 1e9


def trainer_bytes(shape: Shape, mode: str, tokens: int, rank: int, tp: int) -> dict[str, float]:
    mats = shape.matrices()
    trained = shape.layers * sum(m * n for m, n in mats) * 2
    state = shape.layers * sum(2 * min(rank, m, n) * max(m, n) * 4 for m, n in mats)
    largest = max(m * n for m, n in mats) * 2
    activations = (
        tokens * shape.hidden * 2 * shape.layers
        + tokens * (16 * shape.hidden + 3 * shape.intermediate) * 4
        + 4 * 64 * shape.vocab * 4
    )
    gradient = trained / tp if mode == "fenced" else largest / tp
    return {
        "trained": trained / tp,
        "gradient": gradient,
        "state": state / tp,
        "activations": activations,
        "total": gradient + state / tp + activations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gb", type=float, default=80)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--vllm-overhead-gb", type=float, default=4)
    args = parser.parse_args()
    print(f"bf16 weights, {args.gpu_gb:g} GB GPUs, {args.tokens} tokens per step, rank {args.rank}")
    print(
        f"{'model':<12} {'TP':>2} {'mode':<9} {'weights':>8} {'gradient':>9} {'state':>6} "
        f"{'activ.':>6} {'trainer':>8} {'/trained':>8} {'KV left':>8} {'KV tokens':>10}"
    )
    for shape in (GEMMA_3_27B, LLAMA_3_70B):
        for tp in (1, 2, 4):
            weights = shape.params() * 2 / tp
            if weights > args.gpu_gb * GB:
                continue
            for mode in ("fenced", "per_layer"):
                t = trainer_bytes(shape, mode, args.tokens, args.rank, tp)
                left = args.gpu_gb * GB - weights - t["total"] - args.vllm_overhead_gb * GB
                kv = shape.kv_bytes_per_token() / tp
                fits = f"{max(left, 0) / kv:>10,.0f}" if left > 0 else "  no fit"
                print(
                    f"{shape.name[-3:]:<12} {tp:>2} {mode:<9} {weights / GB:>6.1f}GB "
                    f"{t['gradient'] / GB:>7.2f}GB {t['state'] / GB:>4.1f}GB "
                    f"{t['activations'] / GB:>4.1f}GB {t['total'] / GB:>6.1f}GB "
                    f"{t['total'] / t['trained']:>7.2f}x {left / GB:>6.1f}GB {fits}"
                )


if __name__ == "__main__":
    main()
