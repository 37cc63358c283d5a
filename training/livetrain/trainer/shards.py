"""Training subprocess: a Hugging Face parameter that tensor-parallel ranks hold in parts.

Under vLLM's tensor parallelism each rank keeps its own memory: a column-parallel
weight's rows, a row-parallel weight's columns, a slice of the vocabulary, or the whole
tensor again (norms; K/V heads when there are fewer than ranks). The trainer maps every
rank's memory and computes on the parts where they lie, so no full tensor is gathered
or copied: `Shards` is one parameter as its parts (the model computes with them, in
`ShardedLinear` and `ShardedEmbedding`) plus the other ranks' copies of each part,
which every write reaches too, in the same pause, so all ranks serve one version.

What needs the whole tensor gets it from the parts: the optimizer's gradient (the
trainer's own memory, the size of the tensor, as at one rank), norms and maxima (reduced
part by part), and reads for a sync (one tensor at a time). APOLLO therefore takes the
same step as on one rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(eq=False)
class Shards:
    """One parameter, tiled along `axis` by `parts` (in order), each part also held by
    the ranks in its `copies`."""

    parts: tuple[nn.Parameter, ...]
    axis: int
    copies: tuple[tuple[torch.Tensor, ...], ...]

    @property
    def shape(self) -> torch.Size:
        sizes = list(self.parts[0].shape)
        sizes[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return torch.Size(sizes)

    @property
    def ndim(self) -> int:
        return self.parts[0].dim()

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def requires_grad_(self, flag: bool = True) -> Shards:
        for part in self.parts:
            part.requires_grad_(flag)
        return self

    @property
    def grad(self) -> torch.Tensor | None:
        """The whole gradient (a new tensor when there are several parts)."""
        grads = [p.grad for p in self.parts]
        if any(g is None for g in grads):
            return None
        return grads[0] if len(grads) == 1 else torch.cat(grads, self.axis)  # type: ignore[arg-type]

    @grad.setter
    def grad(self, value: None) -> None:
        for part in self.parts:
            part.grad = value

    def sizes(self) -> list[int]:
        return [p.shape[self.axis] for p in self.parts]

    def split(self, whole: torch.Tensor) -> Sequence[torch.Tensor]:
        """`whole` (this parameter's shape, or 1 along `axis`: broadcast) as views, one
        per part."""
        if whole.dim() == 0 or whole.shape[self.axis] == 1:
            return [whole] * len(self.parts)
        return whole.split(self.sizes(), self.axis)

    def read(self) -> torch.Tensor:
        """The whole tensor: the one part itself, or the parts put together (a copy)."""
        if len(self.parts) == 1:
            return self.parts[0].detach()
        return torch.cat([p.detach() for p in self.parts], self.axis)

    def snapshot(self) -> torch.Tensor:
        """The whole tensor, in memory of its own."""
        return self.read().clone() if len(self.parts) == 1 else self.read()

    @torch.no_grad()
    def copy_(self, whole: torch.Tensor) -> Shards:
        """Write `whole` into every part and every copy of it."""
        for part, piece in zip(self.parts, self.split(whole), strict=True):
            part.copy_(piece)
        self.spread()
        return self

    @torch.no_grad()
    def spread(self) -> None:
        """Make every rank's copy of each part equal the part (after writing the parts)."""
        for part, copies in zip(self.parts, self.copies, strict=True):
            for copy in copies:
                copy.copy_(part)

    def consistent(self) -> bool:
        """Whether every rank's copy equals its part, bit for bit."""
        return all(
            torch.equal(copy, part)
            for part, copies in zip(self.parts, self.copies, strict=True)
            for copy in copies
        )

    def norm(self) -> torch.Tensor:
        """||W||_F in fp32."""
        norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in self.parts]
        return torch.linalg.vector_norm(torch.stack(norms))


Weight = nn.Parameter | Shards  # a trainable tensor: one rank's, or every rank's parts


def copy_of(weight: torch.Tensor | Shards) -> torch.Tensor:
    """A trainable weight's value, in memory of its own (an undo record, a preview)."""
    if isinstance(weight, Shards):
        return weight.snapshot()
    return weight.detach().clone()


class ShardedLinear(nn.Module):
    """`nn.Linear` whose weight is in parts: by output rows (vLLM's column-parallel
    layers: each part gives a slice of the output) or by input columns (row-parallel:
    the parts' products on their slices of the input add up)."""

    def __init__(self, weight: Shards, bias: Shards | nn.Parameter | None) -> None:
        super().__init__()
        self.axis = weight.axis
        self.weights = nn.ParameterList(weight.parts)
        self.widths = weight.sizes()
        if isinstance(bias, Shards) and (self.axis != 0 or bias.sizes() != self.widths):
            raise ValueError("a bias split unlike its weight's output rows")
        self.biases = nn.ParameterList(bias.parts if isinstance(bias, Shards) else [])
        self.bias = bias if isinstance(bias, nn.Parameter) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == 0:
            biases: Sequence[torch.Tensor | None] = [None] * len(self.widths)
            if len(self.biases):
                biases = list(self.biases)
            elif self.bias is not None:
                biases = self.bias.split(self.widths)
            outs = [F.linear(x, w, b) for w, b in zip(self.weights, biases, strict=True)]
            return torch.cat(outs, -1)
        pieces = x.split(self.widths, -1)
        out = sum(F.linear(p, w) for p, w in zip(pieces, self.weights, strict=True))
        assert isinstance(out, torch.Tensor)
        return out if self.bias is None else out + self.bias


class ShardedEmbedding(nn.Module):
    """`nn.Embedding` whose rows (the vocabulary) are in parts: each id is looked up in
    the part that holds it; the others contribute exact zeros."""

    def __init__(self, weight: Shards, padding_idx: int | None) -> None:
        super().__init__()
        if weight.axis != 0:
            raise ValueError("an embedding split along its width")
        self.weights = nn.ParameterList(weight.parts)
        self.starts = [sum(weight.sizes()[:i]) for i in range(len(weight.parts))]
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for start, weight in zip(self.starts, self.weights, strict=True):
            local = ids - start
            inside = (local >= 0) & (local < weight.shape[0])
            pad = self.padding_idx - start if self.padding_idx is not None else None
            pad = pad if pad is not None and 0 <= pad < weight.shape[0] else None
            rows = F.embedding(local.clamp(0, weight.shape[0] - 1), weight, pad)
            rows = rows * inside.unsqueeze(-1).to(rows.dtype)
            out = rows if out is None else out + rows
        assert out is not None
        return out
