"""Training subprocess: log-probabilities of continuation tokens, batched.

Only continuation tokens are scored: the context conditions the model but is not
learned. The batch is right-padded with an attention mask, so padding never
changes a real token's result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

Sample = tuple[Sequence[int], Sequence[int]]  # (context_ids, continuation_ids)
log = logging.getLogger("livetrain.trainer")


# Continuation tokens whose logits exist at once (x vocabulary x 4 B: 12.6 MB for the
# built-in model). 64 and 256 took the same time per step there (bench/RESULTS.md).
HEAD_CHUNK = 64
_PROBE = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9])]
_HEAD_IN_CHUNKS: WeakKeyDictionary[nn.Module, bool] = WeakKeyDictionary()


def continuation_logprobs(
    model: nn.Module,
    samples: Sequence[Sample],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per sample, log p(continuation token | everything before it), fp32; with the
    given `weights` in place of the model's own parameters of those names (a step
    judged before it is applied), none of which is written.

    The head's output is the largest activation of a step: positions x vocabulary, for
    the logits, their log-softmax and both gradients. So the model runs without its
    head, and the head runs on continuation positions only, HEAD_CHUNK tokens at a
    time, each chunk recomputed in the backward pass (`_head_in_chunks` says where that
    gives the model's own numbers). No KV cache: nothing reuses it, and a block
    recomputed in the backward pass would append to it twice."""
    if _head_in_chunks(model):
        return _chunked(model, samples, weights)
    return _whole(model, samples, weights)


def _batch(model: nn.Module, samples: Sequence[Sample]) -> tuple[dict[str, Any], list[int]]:
    """Right-padded inputs and each sample's length."""
    device = next(model.parameters()).device
    lengths = [len(ctx) + len(cont) for ctx, cont in samples]
    ids = torch.zeros(len(samples), max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, (ctx, cont) in enumerate(samples):
        ids[row, : lengths[row]] = torch.tensor([*ctx, *cont], device=device)
        mask[row, : lengths[row]] = 1
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, lengths


def _forward(model: nn.Module, inputs: dict[str, Any], weights: Mapping | None) -> Any:
    if weights is None:
        return model(**inputs)
    return functional_call(model, dict(weights), (), inputs)


def _whole(
    model: nn.Module, samples: Sequence[Sample], weights: Mapping[str, torch.Tensor] | None
) -> list[torch.Tensor]:
    """The model's own head, on the positions that predict continuation tokens."""
    inputs, lengths = _batch(model, samples)
    first = min(len(ctx) for ctx, _ in samples) - 1
    kept = torch.arange(first, max(lengths) - 1, device=inputs["input_ids"].device)
    logits = _forward(model, {**inputs, "logits_to_keep": kept}, weights).logits
    out = []
    for row, (ctx, _) in enumerate(samples):
        # logits at position p predict token p + 1; kept position p is at p - first
        rows = logits[row, len(ctx) - 1 - first : lengths[row] - 1 - first].float()
        targets = inputs["input_ids"][row, len(ctx) : lengths[row]]
        out.append(-F.cross_entropy(rows, targets, reduction="none"))
    return out


def _chunked(
    model: nn.Module, samples: Sequence[Sample], weights: Mapping[str, torch.Tensor] | None
) -> list[torch.Tensor]:
    """The decoder's output at continuation positions, through the head in chunks."""
    inputs, lengths = _batch(model, samples)
    ids = inputs["input_ids"]
    captured: list[torch.Tensor] = []
    hook = _part(model, "get_decoder").register_forward_hook(
        lambda _m, _a, out: captured.append(out[0])
    )
    try:  # the model's own head runs on no position at all
        _forward(model, {**inputs, "logits_to_keep": ids.new_zeros(0)}, weights)
    finally:
        hook.remove()
    hidden = torch.cat(
        [captured[0][row, len(ctx) - 1 : lengths[row] - 1] for row, (ctx, _) in enumerate(samples)]
    )
    targets = torch.cat([ids[row, len(ctx) : lengths[row]] for row, (ctx, _) in enumerate(samples)])
    head = partial(_head_logprobs, model, _head_weights(model, weights))
    logprobs = torch.cat(
        [
            checkpoint(
                head, hidden[i : i + HEAD_CHUNK], targets[i : i + HEAD_CHUNK], use_reentrant=False
            )
            for i in range(0, len(targets), HEAD_CHUNK)
        ]
    )
    return list(logprobs.split([len(cont) for _, cont in samples]))


def _head_weights(
    model: nn.Module, weights: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Of `weights`, those that replace the head's own parameters (by the head's names;
    a tied head shares its weight with the embedding, under either name)."""
    if not weights:
        return {}
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    head = _part(model, "get_output_embeddings")
    return {
        attr: weights[name]
        for attr, param in head.named_parameters()
        for name in names.get(id(param), [])
        if name in weights
    }


def _head_logprobs(
    model: nn.Module,
    head_weights: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """log p(target) from the decoder's output, as the model's forward computes its logits
    (the head, then the family's soft-capping or scaling)."""
    head = _part(model, "get_output_embeddings")
    logits = functional_call(head, head_weights, (hidden,)) if head_weights else head(hidden)
    config = model.config
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:  # Gemma 2/3
        logits = torch.tanh(logits / cap) * cap
    if (scaling := getattr(config, "logits_scaling", None)) is not None:  # Granite
        logits = logits / scaling
    if (scale := getattr(model, "logit_scale", None)) is not None:  # Cohere
        logits = logits * scale
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def _head_in_chunks(model: nn.Module) -> bool:
    """Does the chunked head give the model's own log-probs (a family whose forward does
    something else after its head would not)? Probed once per model, without grad."""
    known = _HEAD_IN_CHUNKS.get(model)
    if known is None:
        with torch.no_grad():
            own, chunked = _whole(model, _PROBE, None), _chunked(model, _PROBE, None)
        known = all(
            torch.allclose(a, b, atol=1e-2, rtol=1e-3) for a, b in zip(own, chunked, strict=True)
        )
        if not known:
            log.warning("the head of %s is not computed in chunks", type(model).__name__)
        _HEAD_IN_CHUNKS[model] = known
    return known


def _part(model: nn.Module, accessor: str) -> nn.Module:
    """A part of a Hugging Face model by its accessor (`get_decoder`, ...)."""
    part: nn.Module = getattr(model, accessor)()
    return part


def mean_loss(logprobs: list[torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over all continuation tokens of the batch."""
    return -torch.cat(logprobs).mean()
