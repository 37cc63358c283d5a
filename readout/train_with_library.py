"""Offline tool: concept directions from the story corpus with the steering-vectors library.

    python readout/train_with_library.py --aggregator pca [--quality-report]

Activations are recorded once per unique text (steering-vectors' `record_activations`,
see readout/activations.py) and each concept's (positive, negative) pairs are handed to
the library's aggregator, in float32. Calling `train_steering_vector` once per concept
would give the same directions (tests/test_readout_library.py proves it) at the cost of
two forward passes per pair per concept. Writes readout.safetensors + readout.json (and
quality.json with plots) to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `readout` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from steering_vectors import logistic_aggregator, mean_aggregator, pca_aggregator
from steering_vectors.aggregators import Aggregator

from readout import pipeline

L1_C = 1.0  # inverse L1 strength for activations of unit scale (see _l1_logistic)


def _l1_logistic(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The library's logistic aggregator with an L1 penalty: noise coordinates go to zero.

    liblinear's C trades the penalty against the data term, whose size scales with the
    activations, and activation scales differ by orders of magnitude between models;
    dividing by the activations' scale makes one C mean the same sparsity anywhere.
    """
    scale = ((pos - neg).float() / 2).std().item() or 1.0  # what the library fits on
    # liblinear visits coordinates in a random order: seeded, so a readout is reproducible
    kwargs = {"l1_ratio": 1.0, "solver": "liblinear", "C": L1_C / scale, "random_state": 0}
    return logistic_aggregator(kwargs)(pos, neg)


AGGREGATORS: dict[str, tuple[Aggregator, dict]] = {
    "mean": (mean_aggregator(), {}),
    "pca": (pca_aggregator(), {}),
    "logistic": (logistic_aggregator(), {}),
    "logistic_l1": (_l1_logistic, {"l1_c": L1_C, "c_relative_to": "activation std"}),
}


def library_method(aggregator: str) -> pipeline.Method:
    """A pipeline Method that applies one steering-vectors aggregator per concept."""
    aggregate, settings = AGGREGATORS[aggregator]

    def direction(recorded, layer: int, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        acts = recorded.acts[layer]
        pos, neg = pipeline.pair_rows(pairs)
        return F.normalize(aggregate(acts[pos], acts[neg]).float(), dim=0), {}

    return pipeline.Method(
        name=aggregator,
        settings={"library": "steering-vectors", "aggregator": aggregator, **settings},
        direction=direction,
        whiten=aggregator != "logistic_l1",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--aggregator", choices=sorted(AGGREGATORS), default="pca")
    pipeline.add_arguments(parser)
    args = parser.parse_args(argv)
    pipeline.report_run(pipeline.run(args, library_method(args.aggregator)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
