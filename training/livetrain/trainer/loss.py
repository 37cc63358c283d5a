"""Training subprocess: log-probabilities of continuation tokens, batched.

Only continuation tokens are scored: the context conditions the model but is not
learned. The batch is right-padded with an attention mask, so padding never
changes a real token's result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

Sample = tuple[Sequence[int], Sequence[int]]  # (context_ids, continuation_ids)


def continuation_logprobs(
    model: nn.Module,
    samples: Sequence[Sample],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per sample, log p(continuation token | everything before it), fp32; with the
    given `weights` in place of the model's own parameters of those names (a step
    judged before it is applied), none of which is written."""
    device = next(model.parameters()).device
    lengths = [len(ctx) + len(cont) for ctx, cont in samples]
    ids = torch.zeros(len(samples), max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, (ctx, cont) in enumerate(samples):
        ids[row, : lengths[row]] = torch.tensor([*ctx, *cont], device=device)
        mask[row, : lengths[row]] = 1
    # Logits only where a continuation token is predicted (the head's output is the
    # largest activation: positions x vocabulary, and its gradient again); the model
    # applies its own head, soft-capping and scaling included. No KV cache: nothing
    # reuses it, and a block recomputed in the backward pass would append to it twice.
    first = min(len(ctx) for ctx, _ in samples) - 1
    kept = torch.arange(first, max(lengths) - 1, device=device)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    inputs["logits_to_keep"] = kept
    if weights is None:
        logits = model(**inputs).logits
    else:
        logits = functional_call(model, dict(weights), (), inputs).logits
    out = []
    for row, (ctx, _) in enumerate(samples):
        # logits at position p predict token p + 1; kept position p is at p - first
        rows = logits[row, len(ctx) - 1 - first : lengths[row] - 1 - first].float()
        targets = ids[row, len(ctx) : lengths[row]]
        out.append(-F.cross_entropy(rows, targets, reduction="none"))
    return out


def mean_loss(logprobs: list[torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over all continuation tokens of the batch."""
    return -torch.cat(logprobs).mean()
