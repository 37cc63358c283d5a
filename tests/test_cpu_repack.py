"""vLLM's packed CPU kernels, packed afresh from written weights (worker/repack.py), on
real oneDNN handlers from vLLM's own ops: what they compute after a swap is F.linear of
the written weight, whichever way the packing ran."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

vllm_ops = pytest.importorskip("vllm._custom_ops")
if not hasattr(torch.ops._C, "create_onednn_mm_handler"):
    pytest.skip("vLLM's CPU oneDNN ops are not in this build", allow_module_level=True)

from livetrain import vllm_internals as vllm  # noqa: E402
from livetrain.formats.messages import PackedCopies  # noqa: E402
from livetrain.worker.repack import Repacker  # noqa: E402


class Block(nn.Module):
    """Two linears served through oneDNN handlers, as the plugin leaves vLLM's layers."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in (("up", (96, 64)), ("down", (64, 96))):
            layer = nn.Module()
            layer.weight = nn.Parameter(torch.randn(shape, generator=gen), requires_grad=False)
            layer._livetrain_onednn = vllm_ops.create_onednn_mm(layer.weight.t(), 32)
            layer._livetrain_reads_plain = False
            self.add_module(name, layer)
        self.norm = nn.LayerNorm(64)

    def served(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        return vllm_ops.onednn_mm(layer._livetrain_onednn, x, None)


NAMES = ["up.weight", "down.weight"]


def write(block: Block) -> None:
    with torch.no_grad():
        block.up.weight.mul_(-0.5)
        block.down.weight.add_(1.0)


def assert_serves_plain(block: Block, x: dict[str, torch.Tensor]) -> None:
    for name in ("up", "down"):
        expected = F.linear(x[name], getattr(block, name).weight)
        torch.testing.assert_close(block.served(name, x[name]), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def block_and_inputs() -> tuple[Block, dict[str, torch.Tensor]]:
    return Block(), {"up": torch.randn(5, 64), "down": torch.randn(5, 96)}


def test_plan_says_which_writes_inference_reads_only_through_copies(block_and_inputs):
    block, _ = block_and_inputs
    assert Repacker.plan(block, NAMES) == PackedCopies(2, True)
    # the norm has no packed copy: inference reads it directly
    assert Repacker.plan(block, [*NAMES, "norm.weight"]).only_packed is False


def test_a_tied_embedding_is_packed_for_lm_head_but_read_plain_for_lookup(block_and_inputs):
    """vLLM packs a tied embedding for the lm_head and keeps the plain weight for the
    lookup: its copy is repacked, but writing it is never done while serving."""
    block, _ = block_and_inputs
    embed = nn.Embedding(32, 64)
    handler = vllm_ops.create_onednn_mm(embed.weight.detach().t(), 32)
    embed.cpu_linear = lambda x, weight, bias: vllm_ops.onednn_mm(handler, x, bias)
    vllm._keep_repackable(embed, None, reads_plain=True)
    block.add_module("embed", embed)
    assert Repacker.plan(block, ["embed.weight"]) == PackedCopies(1, False)
    assert Repacker.plan(block, [*NAMES, "embed.weight"]) == PackedCopies(3, False)


def test_a_write_is_served_only_after_the_swap_packed_ahead(block_and_inputs):
    block, x = block_and_inputs
    before = {name: block.served(name, x[name]) for name in x}
    repacker = Repacker()
    write(block)
    assert repacker.start(block, NAMES).tensors == 2
    deadline = time.monotonic() + 30
    while not repacker.ready().ready:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for name in x:  # packed, not swapped: still the previous weights, whole
        torch.testing.assert_close(block.served(name, x[name]), before[name])
    done = repacker.finish(block, NAMES)
    assert done.tensors == 2 and done.ready
    assert_serves_plain(block, x)


def test_finish_packs_itself_when_nothing_was_started_for_these_names(block_and_inputs):
    block, x = block_and_inputs
    repacker = Repacker()
    repacker.start(block, NAMES[:1])  # packed for another write: released, not served
    write(block)
    assert repacker.finish(block, NAMES).tensors == 2
    assert_serves_plain(block, x)
    write(block)
    assert repacker.finish(block, NAMES).tensors == 2  # nothing pending at all
    assert_serves_plain(block, x)


# --- fused experts: vLLM's CPU grouped-GEMM layout ------------------------------------

EXPERTS, INTER, HIDDEN = 4, 64, 128


class Experts(nn.Module):
    """A fused-experts layer as the plugin leaves vLLM's on CPU: the packed tensors
    inference reads, the plain ones beside them (`_livetrain_plain`)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        plain = {
            "w13_weight": torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * 0.1,
            "w2_weight": torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.1,
        }
        for name, tensor in plain.items():
            packed = vllm_ops.cpu_prepack_moe_weight(tensor, "vec")
            setattr(self, name, nn.Parameter(packed, requires_grad=False))
        self._livetrain_plain = plain
        self._livetrain_moe_isa = "vec"

    def served(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        vllm_ops.cpu_fused_moe(
            out, x, self.w13_weight, self.w2_weight, None, None, weights, ids, "silu", "vec"
        )
        return out

    def reference(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same mixture computed from the plain weights, expert by expert."""
        w13, w2 = self._livetrain_plain["w13_weight"], self._livetrain_plain["w2_weight"]
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                gate_up = w13[ids[t, k]] @ x[t]
                hidden = F.silu(gate_up[:INTER]) * gate_up[INTER:]
                out[t] += weights[t, k] * (w2[ids[t, k]] @ hidden)
        return out


EXPERT_NAMES = ["moe.w13_weight", "moe.w2_weight"]


@pytest.mark.parametrize("ahead", [True, False])
def test_written_experts_are_served_after_the_swap(ahead):
    if not hasattr(vllm_ops, "cpu_fused_moe"):
        pytest.skip("vLLM's CPU MoE ops are not in this build")
    model = nn.Module()
    model.moe = Experts()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, HIDDEN, generator=gen)
    ids = torch.randint(0, EXPERTS, (6, 2), generator=gen, dtype=torch.int32)
    weights = torch.softmax(torch.randn(6, 2, generator=gen), dim=-1)
    torch.testing.assert_close(
        model.moe.served(x, ids, weights), model.moe.reference(x, ids, weights)
    )
    before = model.moe.served(x, ids, weights)
    assert Repacker.plan(model, EXPERT_NAMES) == PackedCopies(2, True)
    repacker = Repacker()
    with torch.no_grad():  # a step: the trainer writes the plain tensors
        model.moe._livetrain_plain["w13_weight"][1].mul_(-2.0)
        model.moe._livetrain_plain["w2_weight"].add_(0.05)
    if ahead:
        repacker.start(model, EXPERT_NAMES)
        while not repacker.ready().ready:
            time.sleep(0.01)
        torch.testing.assert_close(model.moe.served(x, ids, weights), before)  # not yet
    assert repacker.finish(model, EXPERT_NAMES).tensors == 2
    served = model.moe.served(x, ids, weights)
    torch.testing.assert_close(served, model.moe.reference(x, ids, weights), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(served, before)
