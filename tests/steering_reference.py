"""Steering as the docs define it, written independently of the worker: the vector is
scale x unit x direction summed over concepts, added to a block's output by a forward
hook on the Hugging Face model. Tests compare vLLM's steered requests with this."""

from __future__ import annotations

import torch

from livetrain.formats import readout_format


def steer_vectors(
    readout: readout_format.Readout, scales: dict[str, float], layers: list[int]
) -> dict[int, torch.Tensor]:
    """The documented sum, computed here: scale x unit x direction per concept."""
    out = {}
    for layer in layers:
        total = torch.zeros(readout.hidden_size, dtype=torch.float64)
        for name, scale in scales.items():
            k = readout.concepts.index(name)
            total += (
                scale * readout.units[layer][k].double() * readout.directions[layer][k].double()
            )
        out[layer] = total.float()
    return out


class HookedSteering:
    """Adds each layer's vector to that block's output from position `start` on."""

    def __init__(self, hf, vectors: dict[int, torch.Tensor], start: int = 0) -> None:
        self.hf, self.vectors, self.start, self.hooks = hf, vectors, start, []

    def __enter__(self) -> HookedSteering:
        for layer, vector in self.vectors.items():
            self.hooks.append(self.hf.model.layers[layer].register_forward_hook(self._add(vector)))
        return self

    def _add(self, vector: torch.Tensor):
        def hook(_module, _args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden.clone()
            hidden[:, self.start :] += vector
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        return hook

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
