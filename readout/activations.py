"""Offline tool: one forward pass per unique text, recording what the direction trainers need.

Recording goes through steering-vectors' `record_activations` with an explicit layer
config (its guess from module names is not relied on), so "layer i" means what the
library means: the output of decoder block i, which is the residual stream the live
readout projects (Hugging Face `hidden_states[i+1]`, except that HF applies the final
norm to the last block's entry).

The read position is the last token of the raw text: the position whose residual
produces the next token, which is the position the live readout scores for each
generated token. Everything recorded is float32 on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from steering_vectors import record_activations
from torch import Tensor, nn
from tqdm import tqdm


@dataclass
class Recorded:
    last: dict[int, Tensor]  # layer -> [n_texts, hidden], at the read position
    heads: dict[int, Tensor] = field(default_factory=dict)  # layer -> [n_texts, heads*head_dim]
    tokens: dict[int, list[Tensor]] = field(
        default_factory=dict
    )  # layer -> per text [n_tok, hidden]
    forward_passes: int = 0  # one per text
    forward_seconds: float = 0.0  # model forward time alone


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Dotted path and module of the decoder block list (the ModuleList as long as the depth)."""
    depth = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return name, module
    raise ValueError(f"no ModuleList of {depth} decoder blocks in {type(model).__name__}")


def default_layers(n_layers: int) -> list[int]:
    """A spread over depth: blocks at 20/40/60/80% (deduplicated for shallow models)."""
    return sorted({min(n_layers - 1, int(n_layers * f)) for f in (0.2, 0.4, 0.6, 0.8)})


def record(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 8,
    heads: bool = False,
    tokens: bool = False,
    progress: bool = True,
) -> Recorded:
    """Forward every text once; keep read-position activations (and optional extras)."""
    blocks_path, blocks = decoder_blocks(model)
    layer_config = {"decoder_block": f"{blocks_path}.{{num}}"}
    tokenizer.padding_side = "right"  # real tokens keep their positions; pads trail
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Recorded({i: [] for i in layers})
    head_inputs: dict[int, list[Tensor]] = {i: [] for i in layers}
    hooks = [
        blocks[i].self_attn.o_proj.register_forward_pre_hook(_keeper(head_inputs[i]))
        for i in layers
        if heads and hasattr(getattr(blocks[i], "self_attn", None), "o_proj")
    ]
    device = next(model.parameters()).device
    token_lists: dict[int, list[Tensor]] = {i: [] for i in layers}
    try:
        batches = range(0, len(texts), batch_size)
        for start in tqdm(batches, desc="forward passes", unit="batch", disable=not progress):
            batch = list(texts[start : start + batch_size])
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
                model(**enc)
            out.forward_seconds += time.perf_counter() - started
            out.forward_passes += len(batch)
            for i in layers:
                acts = recorded[i][-1]
                out.last[i].append(acts[rows, read].float().cpu())
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
    out.last = {i: torch.cat(v) for i, v in out.last.items()}
    out.heads = {i: torch.cat(v) for i, v in out.heads.items()}
    if tokens:
        out.tokens = token_lists
    return out


def _keeper(store: list[Tensor]):
    def hook(_module: nn.Module, args: tuple) -> None:
        store.append(args[0].detach())

    return hook
