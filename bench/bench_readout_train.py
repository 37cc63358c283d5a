"""Direction training: one forward pass per unique text against the library per concept.

    python3 bench/bench_readout_train.py [--sample-concepts 4] [--model NAME]

On the real default model (or --model) and the story corpus, with the pca aggregator:
- forward passes: ours (one per unique text) against `train_steering_vector` called
  once per concept (two per pair), counted over every concept;
- wall time of the whole pipeline (corpus, forwards, directions, output) against the
  pure model-forward time of the unique texts, measured inside the same run;
- wall time of the library per concept, measured on --sample-concepts concepts and
  scaled to all of them, against our whole run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steering_vectors import pca_aggregator, train_steering_vector  # noqa: E402

from bench.common import add_model_argument, bench_model  # noqa: E402
from readout import activations, corpus, pipeline  # noqa: E402
from readout.train_with_library import library_method  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--sample-concepts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    cli = parser.parse_args()
    model_path = bench_model(cli.model)
    with tempfile.TemporaryDirectory() as out:
        args = argparse.Namespace(
            model=model_path,
            stories=corpus.DEFAULT_ROOT,
            out=Path(out),
            layers=None,
            read_position=pipeline.DEFAULT_READ_POSITION,
            seed=0,
            negatives_per_positive=4,
            quality_report=False,
            batch_size=cli.batch_size,
            device="cpu",
            dtype="float32",
        )
        started = time.perf_counter()
        result = pipeline.run(args, library_method("pca"), progress=False)
        ours = time.perf_counter() - started
    ts = result.training_set
    library_passes = sum(2 * len(pairs) for pairs in ts.pairs.values())
    print(
        f"model {model_path.name}, {len(ts.concepts)} concepts, {len(ts.texts)} texts, "
        f"layers {result.readout.layers}"
    )
    print(
        f"forward passes: ours {result.recorded.forward_passes}, library per concept "
        f"{library_passes} ({library_passes / result.recorded.forward_passes:.1f}x more)"
    )
    print(
        f"ours: {ours:.1f} s wall, {result.seconds['forward']:.1f} s of it model forward "
        f"(wall / forward = {ours / result.seconds['forward']:.2f}x)"
    )

    model, tokenizer = pipeline.load_model(model_path, "cpu")
    blocks_path, _ = activations.decoder_blocks(model)
    sample = ts.concepts[: cli.sample_concepts]
    started = time.perf_counter()
    for concept in sample:
        train_steering_vector(
            model,
            tokenizer,
            [(ts.texts[p].text, ts.texts[n].text) for p, n in ts.pairs[concept]],
            layers=result.readout.layers,
            layer_config={"decoder_block": f"{blocks_path}.{{num}}"},
            aggregator=pca_aggregator(),
            batch_size=cli.batch_size,
        )
    per_pair = (time.perf_counter() - started) / sum(len(ts.pairs[c]) for c in sample)
    library = per_pair * sum(len(p) for p in ts.pairs.values())
    print(
        f"library per concept (measured on {len(sample)}, scaled by pairs): {library:.1f} s "
        f"(ours / library = {ours / library:.3f}x)"
    )


if __name__ == "__main__":
    main()
