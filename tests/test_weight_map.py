"""weight_map: where a loader puts each checkpoint tensor, found by running it on meta
tensors, is where the same loader puts it for real; a loader that computes, reorders
or drops elements is refused, naming the tensor and what it did.

Each loader below mimics a real one (vLLM's fused q/k/v rows, per-expert rows of a
fused `w13`, gpt-oss's transposed experts, fused experts chunked per expert, a padded
vocabulary). The test runs it twice: once under `Provenance` on meta tensors, once on
real tensors; every placement must then view exactly the checkpoint's values.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from livetrain.weight_map import (
    MappingError,
    Piece,
    Placement,
    Provenance,
    assemble,
    meta_twin,
    parameters_on_meta,
    parameters_replaced,
    pieces_by_source,
)

Loader = Callable[[dict[str, torch.Tensor], str, torch.Tensor], None]
EXPERTS, INTER, H = 3, 4, 5  # experts, intermediate size, hidden


def fused_rows(params, name, w):  # vLLM's QKVParallelLinear
    start = {"q": 0, "k": 4, "v": 6}[name]
    params["qkv"].narrow(0, start, w.shape[0]).copy_(w)


def expert_rows(params, name, w):  # vLLM's FusedMoE, per-expert checkpoint tensors
    expert, kind = name.split(".")
    e = int(expert)
    if kind == "down":
        params["w2"][e].copy_(w)
    else:
        params["w13"][e].narrow(0, 0 if kind == "gate" else INTER, INTER).copy_(w)


def transposed_experts(params, name, w):  # vLLM's gpt-oss: permute(0, 2, 1).contiguous()
    params["w13" if name == "gate_up" else "w2"].copy_(w.permute(0, 2, 1).contiguous())


def chunked_experts(params, name, w):  # vLLM's FusedMoE, a fused gate_up checkpoint tensor
    for shard, half in enumerate(w.chunk(2, dim=1)):
        for e, expert in enumerate(half.unbind()):
            params["w13"][e].narrow(0, shard * INTER, INTER).copy_(expert)


def padded_vocab(params, name, w):  # vLLM's VocabParallelEmbedding
    params["embed"].narrow(0, 0, w.shape[0]).copy_(w)


CASES: dict[str, tuple[Loader, dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]] = {
    "fused rows": (fused_rows, {"qkv": (8, H)}, {"q": (4, H), "k": (2, H), "v": (2, H)}),
    "experts": (
        expert_rows,
        {"w13": (EXPERTS, 2 * INTER, H), "w2": (EXPERTS, H, INTER)},
        {
            f"{e}.{kind}": (H, INTER) if kind == "down" else (INTER, H)
            for e in range(EXPERTS)
            for kind in ("gate", "up", "down")
        },
    ),
    "transposed": (
        transposed_experts,
        {"w13": (EXPERTS, 2 * INTER, H), "w2": (EXPERTS, H, INTER)},
        {"gate_up": (EXPERTS, H, 2 * INTER), "down": (EXPERTS, INTER, H)},
    ),
    "chunked": (
        chunked_experts,
        {"w13": (EXPERTS, 2 * INTER, H)},
        {"gate_up": (EXPERTS, 2 * INTER, H)},
    ),
    "padded": (padded_vocab, {"embed": (16, H)}, {"vocab": (11, H)}),
}


def placements(loader: Loader, params: dict[str, tuple], tensors: dict[str, tuple]):
    """What Provenance says, the loader run on meta tensors only."""
    mode = Provenance()
    meta = {name: torch.empty(shape, device="meta") for name, shape in params.items()}
    for name, tensor in meta.items():
        mode.destination(name, tensor)
    probes = {name: torch.empty(shape, device="meta") for name, shape in tensors.items()}
    for name, probe in probes.items():
        mode.track(name, probe)
    with mode:
        for name, probe in probes.items():
            loader(meta, name, probe)
    assert not mode.computed, mode.computed
    grouped = pieces_by_source(mode.pieces)
    return {name: assemble(name, tensors[name], grouped[name]) for name in tensors}, mode


@pytest.mark.parametrize("case", CASES)
def test_placements_view_exactly_what_the_loader_writes(case):
    loader, param_shapes, tensor_shapes = CASES[case]
    found, _ = placements(loader, param_shapes, tensor_shapes)
    params = {name: torch.full(shape, float("nan")) for name, shape in param_shapes.items()}
    tensors = {name: torch.randn(shape) for name, shape in tensor_shapes.items()}
    for name, tensor in tensors.items():
        loader(params, name, tensor)
    for name, placement in found.items():
        assert torch.equal(placement.view(params[placement.tensor]), tensors[name]), name
    # and a view is memory: writing through it is what the loader's tensor would hold
    name, placement = next(iter(found.items()))
    placement.view(params[placement.tensor]).fill_(7.0)
    tensors[name].fill_(7.0)
    loader(params, name, tensors[name])  # idempotent: the same bytes land there
    assert (placement.view(params[placement.tensor]) == 7.0).all()


def test_expert_placements_are_each_experts_rows():
    found, _ = placements(*CASES["experts"])
    assert found["2.up"] == Placement("w13", 2 * 2 * INTER * H + INTER * H, (INTER, H), (H, 1))
    assert found["1.down"] == Placement("w2", H * INTER, (H, INTER), (INTER, 1))


def test_a_transposed_placement_works_on_a_non_contiguous_base():
    """Positions are logical (row-major), so a placement maps through whatever strides
    the tensor it names has in memory (the trainer's views are often transposed)."""
    base = torch.arange(24.0).reshape(4, 6).t()  # [6, 4], strides (1, 6)
    placement = Placement("base", 4, (2, 4), (4, 1))  # rows 1..2 of base, as positions
    assert torch.equal(placement.view(base), base[1:3])
    assert torch.equal(Placement("base", 0, (4, 6), (1, 4)).view(base), base.t())


@pytest.mark.parametrize(
    ("loader", "said"),
    [
        (lambda p, n, w: p["qkv"].copy_(w * 2.0), "computes with it (aten.mul.Tensor)"),
        (lambda p, n, w: p["qkv"].copy_(torch.cat([w[4:], w[:4]])), "computes with it"),
        (
            # vLLM's Bloom: heads interleaved in the checkpoint, grouped in memory
            lambda p, n, w: p["qkv"].copy_(w.view(2, 4, H).transpose(0, 1).reshape(8, H)),
            "reorders it in a way no strided view can express (aten.clone.default)",
        ),
    ],
)
def test_a_loader_that_computes_or_reorders_is_named(loader, said):
    mode = Provenance()
    mode.destination("qkv", torch.empty(8, H, device="meta"))
    probe = torch.empty(8, H, device="meta")
    mode.track("w", probe)
    with mode:
        loader({"qkv": torch.empty(8, H, device="meta")}, "w", probe)
    assert mode.computed.get("w", "").startswith(said.split(" (")[0]), mode.computed
    assert said.split(" (")[-1].rstrip(")") in mode.computed["w"]
    assert not mode.pieces


def test_pieces_that_do_not_tile_the_tensor_once_are_refused():
    rows = lambda start, dest, to="qkv": Piece("q", (2, H), start * H, (H, 1), to, dest, (H, 1))  # noqa: E731
    assert assemble("q", (4, H), [rows(0, 0), rows(2, 10)]) == Placement("qkv", 0, (4, H), (H, 1))
    with pytest.raises(MappingError, match="placed 10 of 20 elements"):
        assemble("q", (4, H), [rows(0, 0)])  # half of it is loaded nowhere
    with pytest.raises(MappingError, match="placed some elements twice"):
        assemble("q", (4, H), [rows(0, 0), rows(0, 10)])
    with pytest.raises(MappingError, match="split across"):
        assemble("q", (4, H), [rows(0, 0), rows(2, 0, to="other")])
    with pytest.raises(MappingError, match="not one strided view"):
        assemble("q", (4, H), [rows(0, 0), rows(2, 11)])  # rows 2.. shifted by one element


def test_swapped_parameters_come_back_even_when_the_body_raises():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied
    before = [id(p) for p in model.parameters()]
    with pytest.raises(RuntimeError), parameters_replaced(model, meta_twin) as twins:
        assert model[0].weight.is_meta and model[1].weight is model[0].weight
        assert len(twins) == len(before)
        raise RuntimeError
    assert [id(p) for p in model.parameters()] == before and not model[0].weight.is_meta


def test_modules_built_on_meta_keep_buffers_and_late_attributes():
    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4, 4))
            self.weight.loader = "set after registering it"  # vLLM's set_weight_attrs
            self.register_buffer("table", torch.arange(4.0))
            self.slopes = self.table.tolist()  # a constructor reading a value back

    with parameters_on_meta():
        layer = Layer()
    assert layer.weight.is_meta and isinstance(layer.weight, torch.nn.Parameter)
    assert layer.weight.loader == "set after registering it"
    assert layer.slopes == [0.0, 1.0, 2.0, 3.0] and not layer.table.is_meta
