"""vLLM worker: rebuilding vLLM's packed CPU kernels from the weights the trainer wrote.

On CPU vLLM serves linear layers and fused experts from packed copies of their
weights; livetrain keeps the plain weight (the trainer's view) beside each copy. After
a write, the copies of what was written are packed afresh and swapped in while
generation is paused (vllm_internals.OneDnnCopy, MoePackedCopy).

Packing takes far longer than the swap (~3 ms against ~1 µs per weight on the built-in
model). When inference reads every written tensor only through a packed copy, the
write itself changes nothing inference reads, so `start` packs in a thread while
generation goes on, and the pause holds only the swap (`finish`). Otherwise `finish`
packs inside the pause.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import nn

from livetrain import vllm_internals as vllm
from livetrain.formats.messages import PackedCopies, Repacked


class Repacker:
    """One per worker; the API server calls it in the order start, ready..., finish."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="livetrain-repack")
        self._pending: _Job | None = None
        # The trainer writes the same parameters every step, and a copy's handler object
        # outlives its swaps (only the pointer inside it changes): resolve them once.
        self._resolved: tuple[tuple[str, ...], tuple[list[vllm.PackedCopy], bool]] | None = None

    @staticmethod
    def plan(model: nn.Module, names: list[str]) -> PackedCopies:
        copies, only_packed = vllm.packed_copies(model, names)
        return PackedCopies(len(copies), only_packed)

    def start(self, model: nn.Module, names: list[str]) -> PackedCopies:
        """Pack fresh copies of the named weights in the background (serving goes on)."""
        copies, only_packed = self._copies(model, names)
        self._discard()
        self._pending = _Job(tuple(names), copies, self._pool.submit(_timed_pack, copies))
        return PackedCopies(len(copies), only_packed)

    def ready(self) -> Repacked:
        done = self._pending is None or self._pending.future.done()
        return Repacked(0, 0.0, ready=done)

    def finish(self, model: nn.Module, names: list[str]) -> Repacked:
        """Swap in the copies `start` packed for these names, or pack them now (generation
        is paused either way). `ms` is the packing time, wherever it ran."""
        copies, _ = self._copies(model, names)
        pending, self._pending = self._pending, None
        if pending is not None and pending.names == tuple(names):
            fresh, ms = pending.future.result()
        else:
            if pending is not None:
                pending.release()
            fresh, ms = _timed_pack(copies)
        for copy, packed in zip(copies, fresh, strict=True):
            copy.swap(packed)
        return Repacked(len(copies), ms)

    def _copies(self, model: nn.Module, names: list[str]) -> tuple[list[vllm.PackedCopy], bool]:
        if self._resolved is None or self._resolved[0] != tuple(names):
            self._resolved = (tuple(names), vllm.packed_copies(model, names))
        return self._resolved[1]

    def _discard(self) -> None:
        if self._pending is not None:
            self._pending.release()
        self._pending = None


@dataclass(frozen=True)
class _Job:
    """Copies being packed in the background for a write of `names`."""

    names: tuple[str, ...]
    copies: list[vllm.PackedCopy]
    future: Future[tuple[list[Any], float]]

    def release(self) -> None:
        """Free copies packed for a write that was never swapped in."""
        for copy, packed in zip(self.copies, self.future.result()[0], strict=True):
            copy.release(packed)


def _timed_pack(copies: list[vllm.PackedCopy]) -> tuple[list[Any], float]:
    started = time.perf_counter()
    fresh = [copy.pack() for copy in copies]
    return fresh, (time.perf_counter() - started) * 1000
