"""steering-vectors on the installed transformers, and our one-pass recording against it.

steering-vectors pins transformers<5 and is installed without its dependencies; these
tests are what proves it still works with the transformers vLLM needs. They also prove
that recording each text once and handing cached rows to the library's aggregators gives
the directions `train_steering_vector` computes itself, two forwards per pair.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from steering_vectors import train_steering_vector

from readout import activations, corpus, dataset
from readout.pipeline import load_model
from readout.train_with_library import AGGREGATORS

LAYERS = [0, 1]


@pytest.fixture(scope="module")
def model_and_tokenizer(models):
    return load_model(models["llama"])


@pytest.fixture(scope="module")
def training_set():
    return dataset.build(corpus.load(), seed=0, negatives_per_positive=2)


def test_installed_versions_are_the_conflicting_pair():
    # The point of the --no-deps install: the library's pin says no, and it works anyway.
    assert importlib.metadata.version("transformers").startswith("5.")
    assert importlib.metadata.version("steering-vectors") == "0.12.2"


LAST, MEAN = activations.ReadPosition("last"), activations.ReadPosition("mean", 2)


def test_recorded_layers_are_decoder_block_outputs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # longest last: recording sorts by length, results must come back in this order
    texts = ["The kettle clicked off and nobody moved at all.", "A short one.", "Hi"]
    rec = activations.record(
        model, tokenizer, texts, LAYERS, [MEAN, LAST], batch_size=2, moments_of={0, 1}
    )
    assert rec.acts is rec.reads[MEAN]  # the first position is the trainer's
    tokens = []
    for row, text in enumerate(texts):
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        # Block 0's output is HF hidden_states[1]; padding (shorter rows) changes nothing.
        last, mean = rec.reads[LAST], rec.reads[MEAN]
        torch.testing.assert_close(last[0][row], hidden[1][0, -1], atol=1e-5, rtol=1e-5)
        n = enc.input_ids.shape[1]
        expected = hidden[1][0, 2:].mean(dim=0) if n > 2 else hidden[1][0, -1]
        torch.testing.assert_close(mean[0][row], expected, atol=1e-5, rtol=1e-5)
        if row < 2:
            tokens.append(hidden[1][0, 2:])
        # HF's last entry has the final norm applied; the readout reads the block output.
        normed = model.model.norm(last[1][row])
        torch.testing.assert_close(normed, hidden[2][0, -1], atol=1e-5, rtol=1e-5)
    # token moments of texts 0 and 1, from the first position's start
    x = torch.cat(tokens).double()
    mean, cov = rec.token_moments[0]
    torch.testing.assert_close(mean, x.mean(dim=0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cov, torch.cov(x.T, correction=0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_cached_rows_give_the_library_direction(model_and_tokenizer, training_set, aggregator):
    model, tokenizer = model_and_tokenizer
    ts = training_set
    concept = ts.concepts[0]
    pairs = ts.pairs[concept]
    rows = sorted({r for pair in pairs for r in pair})
    # The library reads one token per text (the last): so does this recording.
    rec = activations.record(
        model, tokenizer, [ts.texts[r].text for r in rows], LAYERS, [LAST], progress=False
    )
    index = {r: k for k, r in enumerate(rows)}
    aggregate, _ = AGGREGATORS[aggregator]
    samples = [(ts.texts[p].text, ts.texts[n].text) for p, n in pairs]
    library = train_steering_vector(
        model,
        tokenizer,
        samples,
        layers=LAYERS,
        layer_config={"decoder_block": "model.layers.{num}"},
        aggregator=aggregate,
    )
    for layer in LAYERS:
        acts = rec.acts[layer]
        ours = aggregate(acts[[index[p] for p, _ in pairs]], acts[[index[n] for _, n in pairs]])
        expected = F.normalize(library.layer_activations[layer].float(), dim=0)
        got = F.normalize(ours.float(), dim=0)
        assert torch.isfinite(got).all()
        assert torch.dot(got, expected).item() > 0.9999, (aggregator, layer)
    # The library spent two forward passes per pair; we spent one per distinct text.
    assert rec.forward_passes == len(rows) < 2 * len(pairs)
