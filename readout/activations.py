"""Offline tool: one forward pass per unique text, recording what the direction trainers need.

Recording goes through steering-vectors' `record_activations` with an explicit layer
config (its guess from module names is not relied on), so "layer i" means what the
library means: the output of decoder block i, which is the residual stream the live
readout projects (Hugging Face `hidden_states[i+1]`, except that HF applies the final
norm to the last block's entry).

A text's activation is read at a `ReadPosition`: its last token, or the mean over its
tokens from a start offset on (research/concept-extraction.md compares them on the real
model: the mean reads what a story is about, the last token mostly what comes next).
The live readout scores every token, and averages those scores from the same offset to
score a text the way the directions were trained. One forward pass serves any number
of read positions. Everything recorded is float32 on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from steering_vectors import record_activations
from torch import Tensor, nn
from tqdm import tqdm


@dataclass(frozen=True)
class ReadPosition:
    """Where a text is read: `last` token, or the `mean` over tokens `start`.. (a text
    shorter than that is read at its last token)."""

    pooling: str
    start: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in ("last", "mean") or self.start < 0:
            raise ValueError(f"read position must be last or mean from start >= 0: {self}")

    @classmethod
    def parse(cls, text: str) -> ReadPosition:
        """`last`, `mean` (from token 0) or `mean:K` (from token K)."""
        pooling, _, start = text.partition(":")
        try:
            return cls(pooling, int(start or 0)) if pooling == "mean" else cls(pooling, 0)
        except ValueError:
            raise ValueError(f"read position {text!r}: expected last, mean or mean:K") from None

    def __str__(self) -> str:
        return "last" if self.pooling == "last" else f"mean:{self.start}"

    def describe(self) -> dict:
        """What readout.json records, so the live readout can score the same way."""
        return {"pooling": self.pooling, "start": self.start}

    def read(self, acts: Tensor, length: int) -> Tensor:
        """[hidden] of one text from its activations [tokens, hidden] (`length` real)."""
        if self.pooling == "last" or length <= self.start:
            return acts[length - 1]
        return acts[self.start : length].mean(dim=0)


@dataclass
class Recorded:
    reads: dict[ReadPosition, dict[int, Tensor]]  # position -> layer -> [n_texts, hidden]
    heads: dict[int, Tensor] = field(default_factory=dict)  # layer -> [n_texts, heads*head_dim]
    # layer -> (mean [hidden], covariance [hidden, hidden]) of single tokens of the
    # `moments_of` texts, from the first read position's start on (float64)
    token_moments: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    tokens: dict[int, list[Tensor]] = field(
        default_factory=dict
    )  # layer -> per text [n_tok, hidden]
    forward_passes: int = 0  # one per text
    forward_seconds: float = 0.0  # model forward time alone

    @property
    def acts(self) -> dict[int, Tensor]:
        """layer -> [n_texts, hidden] at the first (the trainer's) read position."""
        return next(iter(self.reads.values()))


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Dotted path and module of the decoder block list (the ModuleList as long as the depth)."""
    depth = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return name, module
    raise ValueError(f"no ModuleList of {depth} decoder blocks in {type(model).__name__}")


def default_layers(n_layers: int) -> list[int]:
    """Blocks at 40/50/60/70% of depth (deduplicated for shallow models): on the real
    model's held-out stories concepts read best there (research/concept-extraction.md),
    earlier blocks still carry mostly the words, the last ones the next token."""
    return sorted({min(n_layers - 1, int(n_layers * f)) for f in (0.4, 0.5, 0.6, 0.7)})


def record(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    positions: Sequence[ReadPosition],
    batch_size: int = 8,
    heads: bool = False,
    tokens: bool = False,
    moments_of: Collection[int] = (),
    progress: bool = True,
) -> Recorded:
    """Forward every text once; keep its activation at each read position (the first is
    `Recorded.acts`), and optionally every token's, the token moments of the texts
    `moments_of` (row indices) and the attention heads' inputs at the last token."""
    blocks_path, blocks = decoder_blocks(model)
    layer_config = {"decoder_block": f"{blocks_path}.{{num}}"}
    tokenizer.padding_side = "right"  # real tokens keep their positions; pads trail
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    reads: dict[ReadPosition, dict[int, list[Tensor]]] = {
        p: {i: [] for i in layers} for p in positions
    }
    out = Recorded({})
    head_inputs: dict[int, list[Tensor]] = {i: [] for i in layers}
    hooks = [
        blocks[i].self_attn.o_proj.register_forward_pre_hook(_keeper(head_inputs[i]))
        for i in layers
        if heads and hasattr(getattr(blocks[i], "self_attn", None), "o_proj")
    ]
    device = next(model.parameters()).device
    token_lists: dict[int, list[Tensor]] = {i: [] for i in layers}
    moments = {i: _Moments() for i in layers} if moments_of else {}
    first = positions[0].start if positions[0].pooling == "mean" else 0
    # Texts of similar length share a batch, so little of a batch is padding; the
    # results are put back in the caller's order at the end.
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    try:
        batches = range(0, len(texts), batch_size)
        for start in tqdm(batches, desc="forward passes", unit="batch", disable=not progress):
            batch_rows = order[start : start + batch_size]
            batch = [texts[k] for k in batch_rows]
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            read = enc["attention_mask"].sum(dim=1) - 1
            rows = torch.arange(len(batch), device=device)
            started = time.perf_counter()
            with (
                torch.no_grad(),
                record_activations(
                    model, "decoder_block", layer_config, layer_nums=list(layers)
                ) as recorded,
            ):
                _forward_until(model, blocks[max(layers)], enc)
            out.forward_seconds += time.perf_counter() - started
            out.forward_passes += len(batch)
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            for i in layers:
                acts = recorded[i][-1].float()
                for position in positions:
                    reads[position][i].append(
                        torch.stack(
                            [position.read(acts[b], n) for b, n in enumerate(lengths)]
                        ).cpu()
                    )
                for b, n in enumerate(lengths):
                    if moments and batch_rows[b] in moments_of:
                        moments[i].add(acts[b, min(first, n - 1) : n])
                if tokens:
                    token_lists[i] += [
                        acts[b, : read[b] + 1].float().cpu() for b in range(len(batch))
                    ]
                if head_inputs[i]:
                    out.heads.setdefault(i, []).append(
                        head_inputs[i].pop()[rows, read].float().cpu()
                    )
    finally:
        for hook in hooks:
            hook.remove()
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    out.reads = {p: {i: torch.cat(v)[inverse] for i, v in per.items()} for p, per in reads.items()}
    out.heads = {i: torch.cat(v)[inverse] for i, v in out.heads.items()}
    if tokens:
        out.tokens = {i: [lists[k] for k in inverse.tolist()] for i, lists in token_lists.items()}
    out.token_moments = {i: m.result() for i, m in moments.items()}
    return out


class _Moments:
    """Running sum and sum of outer products of token activations, in float64."""

    def __init__(self) -> None:
        self.n, self.sum, self.outer = 0, 0.0, 0.0

    def add(self, x: Tensor) -> None:
        x = x.double().cpu()
        self.n, self.sum, self.outer = self.n + len(x), self.sum + x.sum(0), self.outer + x.T @ x

    def result(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.n
        return mean, self.outer / self.n - torch.outer(mean, mean)


class _Stop(Exception):
    """Raised after the last recorded block: nothing later is needed."""


def _forward_until(model: nn.Module, last: nn.Module, inputs) -> None:
    """Run the model only as far as block `last`. The blocks after it and the LM head
    (a 49152 x 576 product per token on SmolLM2, a fifth of its compute) are skipped.
    The stop hook is registered after the recording hooks, so they have run."""

    def stop(*_args) -> None:
        raise _Stop

    handle = last.register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


def _keeper(store: list[Tensor]):
    def hook(_module: nn.Module, args: tuple) -> None:
        store.append(args[0].detach())

    return hook
