"""Offline tool: concept directions with the project's own extraction methods.

    python readout/train_steering_vectors.py --method caa|subspace [--subspace-k 5]
        [--quality-report]

- caa: pooled diff-of-means (contrastive activation addition) of the concept's positives
  against its paired negatives, at the read position.
- subspace: each story contributes the span of its token activations (SVD); a concept's
  direction is the eigenvalue-weighted sum of the top-k eigenvectors of
  M_pos - M_base (mean projector over positives minus over its negatives). The
  eigenvalues go into quality.json as `subspace_eigvals`: one dominant eigenvalue means
  one direction carries the concept; a flat top means several do.

Same corpus, pairing, layers, output format and quality report as train_with_library.py
(readout/pipeline.py). The subspace method keeps every token's activation of every text
in memory (texts x tokens x hidden x layers x 4 bytes); --max-rank bounds the bases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `readout` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from readout import pipeline, subspace


def caa_method() -> pipeline.Method:
    def direction(recorded, layer: int, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        acts = recorded.acts[layer]
        pos, neg = _unique_rows(pairs)
        return subspace.caa_direction(acts[pos], acts[neg]), {}

    return pipeline.Method(name="caa", settings={"library": None}, direction=direction)


def _unique_rows(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Pooled methods count each text once, however many pairs it is in."""
    pos, neg = pipeline.pair_rows(pairs)
    return sorted(set(pos)), sorted(set(neg))


def subspace_method(k: int, max_rank: int | None) -> pipeline.Method:
    bases: dict[tuple[int, int], torch.Tensor] = {}  # (layer, text row) -> story basis

    def basis(recorded, layer: int, row: int) -> torch.Tensor:
        if (layer, row) not in bases:
            bases[layer, row] = subspace.story_basis(recorded.tokens[layer][row], max_rank)
        return bases[layer, row]

    def direction(recorded, layer: int, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        acts = recorded.acts[layer]
        pos, neg = _unique_rows(pairs)
        vector, eigvals = subspace.subspace_direction(
            [basis(recorded, layer, r) for r in pos],
            [basis(recorded, layer, r) for r in neg],
            acts[pos].mean(dim=0),
            acts[neg].mean(dim=0),
            k=k,
        )
        return vector, {"subspace_eigvals": eigvals}

    return pipeline.Method(
        name="subspace",
        settings={"library": None, "subspace_k": k, "max_rank": max_rank},
        direction=direction,
        needs_tokens=True,
        whiten=False,  # its per-story bases are spans of raw token activations
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--method", choices=["caa", "subspace"], default="caa")
    parser.add_argument(
        "--subspace-k",
        type=int,
        default=5,
        help="eigenvectors of M_pos - M_base combined per concept",
    )
    parser.add_argument(
        "--max-rank",
        type=int,
        default=None,
        help="keep at most this many singular directions per story (default: all)",
    )
    pipeline.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.subspace_k < 1:
        parser.error("--subspace-k must be >= 1")
    method = (
        caa_method() if args.method == "caa" else subspace_method(args.subspace_k, args.max_rank)
    )
    pipeline.report_run(pipeline.run(args, method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
