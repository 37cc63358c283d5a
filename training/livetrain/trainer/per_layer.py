"""Training subprocess: the per-layer step (`LIVETRAIN_STEP_MODE=per_layer`).

The fenced step holds every trainable tensor's gradient at once (as much memory as the
trained weights), checks the whole update, then writes it in one pause. Here each
tensor's update is computed, checked and written the moment its gradient is whole, in a
hook the backward pass calls, and the gradient is freed there: the trainer never holds
more than one tensor's gradient (plus the backward pass's own activations).

Why that is the same step: a layer's weight is read by the backward pass only inside
the node that also produces its gradient, and the hook runs after that node, so the
gradients of the layers below are computed from the same weights as in the fenced
step; each tensor's update is the fenced step's for that tensor (Apollo.step_tensor).
What differs is what inference sees: the step lands tensor by tensor while the
backward pass runs (vLLM's packed CPU kernels still read their old copies until the
step's repack), and a tensor whose update fails a check is left as it was while the
others are written. A tensor the model uses under several names (tied embeddings) has
its gradient whole only when the backward pass ends, so it is stepped then.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from livetrain.config import OptimizerSettings
from livetrain.trainer.apollo import Apollo, DestructiveUpdate, RefusedUpdate
from livetrain.trainer.shards import Shards, Weight


def _parts(weight: Weight) -> tuple[nn.Parameter, ...]:
    return weight.parts if isinstance(weight, Shards) else (weight,)


class PerLayerStep:
    """One per-layer step: `with step.hooks(): loss.backward()`, then `finish()`."""

    def __init__(
        self,
        optimizer: Apollo,
        model: nn.Module,
        trainable: dict[str, Weight],
        settings: OptimizerSettings,
        max_update_ratio: float,
    ) -> None:
        self.optimizer, self.settings, self.max_update_ratio = optimizer, settings, max_update_ratio
        self.trainable = trainable
        uses: dict[int, int] = {}
        for _, param in model.named_parameters(remove_duplicate=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
        self.deferred = [
            name for name, w in trainable.items() if any(uses[id(p)] > 1 for p in _parts(w))
        ]
        self.owner = {
            id(part): name
            for name, weight in trainable.items()
            if name not in self.deferred
            for part in _parts(weight)
        }
        self.moments_reset: list[str] = []
        self.refused: dict[str, str] = {}  # tensor -> why its update was not written
        self.written: list[str] = []
        self.too_large = False  # a refusal was for moving a tensor too far

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """While inside, a tensor's gradient becoming whole steps and writes it."""
        handles = [
            part.register_post_accumulate_grad_hook(self._accumulated)
            for name, weight in self.trainable.items()
            if name not in self.deferred
            for part in _parts(weight)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _accumulated(self, part: torch.Tensor) -> None:
        name = self.owner[id(part)]
        if all(p.grad is not None for p in _parts(self.trainable[name])):
            self._step(name)

    def _step(self, name: str) -> None:
        weight = self.trainable[name]
        try:
            if self.optimizer.step_tensor(name, self.settings, self.max_update_ratio):
                self.moments_reset.append(name)
            self.written.append(name)
        except (RefusedUpdate, ValueError) as exc:
            self.refused[name] = exc.reason if isinstance(exc, RefusedUpdate) else str(exc)
            self.too_large |= isinstance(exc, DestructiveUpdate)
        weight.grad = None

    def finish(self) -> None:
        """Step the deferred tensors; any tensor the backward pass never reached is
        refused (it had no gradient)."""
        for name in self.deferred:
            self._step(name)
        for name in self.trainable.keys() - {*self.written, *self.refused}:
            self.refused[name] = "no gradient"
