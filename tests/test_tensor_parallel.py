"""Tensor parallel 2: vLLM's own engine on two CPU ranks, one trainer on both ranks'
memory (trainer/tensor_parallel.py). A step equals the one-rank step, every rank's copy
moves together, sync writes whole tensors, undo and rollback are exact, the live readout
reads the replicated residual stream, and a killed trainer comes back on both ranks.

The first tests need no server: the two ranks' memory is laid out here as vLLM lays it
out for the tiny Llama (2 heads, 1 KV head, so K/V are copies on both ranks), which lets
them tear one rank's copy on purpose."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    API_KEY,
    LOGPROB_ATOL,
    attach_request,
    make_trainer,
    start_server,
    write_readout,
)
from safetensors.torch import load_file
from steering_reference import HookedSteering, steer_vectors
from test_live_readout import check_parity, complete, tokenize
from torch import nn
from transformers import AutoModelForCausalLM

from livetrain.config import OptimizerSettings, TrainableFamilies
from livetrain.formats import messages as msg
from livetrain.formats import readout_format
from livetrain.formats.shared_tensors import export_tensor
from livetrain.tools.client import LivetrainClient
from livetrain.trainer.model import AttachError
from livetrain.trainer.trainer import Trainer
from livetrain.worker.export import export_weights

EVERYTHING = TrainableFamilies(embeddings=True, norms=True, lm_head=True)
TP_ATTACH = {"families": EVERYTHING, "undo_steps": 1}
ENV_EVERYTHING = {f"LIVETRAIN_TRAIN_{f}": "1" for f in ("EMBEDDINGS", "NORMS", "LM_HEAD")}
SAMPLES = [([5, 9, 14, 22, 31], [40, 41, 42, 43]), ([7, 3, 11], [50, 51, 60, 61, 62])]
# rows of q/gate/up, the vocabulary; columns of o/down; K/V (1 head) and norms: copies
ROWS = ("q_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
COLUMNS = ("o_proj", "down_proj")


def rank_slices(name: str, shape: torch.Size) -> list[tuple[slice, ...]]:
    """Each rank's box of a checkpoint tensor, as vLLM's loaders place it at TP = 2."""
    axis = 0 if any(k in name for k in ROWS) else 1 if any(k in name for k in COLUMNS) else None
    whole = tuple(slice(0, size) for size in shape)
    if axis is None:
        return [whole, whole]
    half = shape[axis] // 2
    return [whole[:axis] + (slice(half * r, half * (r + 1)),) + whole[axis + 1 :] for r in (0, 1)]


def split_like_vllm(files: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The two ranks' memory: each rank's own tensor per checkpoint tensor."""
    return [
        {name: t[rank_slices(name, t.shape)[rank]].clone() for name, t in files.items()}
        for rank in (0, 1)
    ]


def exports_of(ranks: list[dict[str, torch.Tensor]], files: dict[str, torch.Tensor]) -> list:
    exports = []
    for rank, memory in enumerate(ranks):
        views = {}
        for name, t in memory.items():
            origin = [s.start for s in rank_slices(name, files[name].shape)[rank]]
            views[name] = msg.TensorView(name, 0, list(t.shape), list(t.stride()), origin)
        params = {name: export_tensor(t) for name, t in memory.items()}
        exports.append(msg.WeightExport(params=params, map=views, dropped=[]))
    return exports


@pytest.fixture
def two_ranks(models: dict[str, Path]) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    files = load_file(models["llama"] / "model.safetensors")
    return files, split_like_vllm(files)


def test_the_split_is_the_one_tested_on_a_real_server(two_ranks):
    """The hand-made layout covers every tensor once per rank, halves where vLLM halves."""
    files, ranks = two_ranks
    for name, tensor in files.items():
        assert sum(ranks[r][name].numel() for r in (0, 1)) in (tensor.numel(), 2 * tensor.numel())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(torch.cat([ranks[0][q], ranks[1][q]]), files[q])
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(torch.cat([ranks[0][down], ranks[1][down]], 1), files[down])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(ranks[1][k], files[k])


@pytest.mark.parametrize("step_mode", ["fenced", "per_layer"])
def test_steps_on_two_ranks_equal_steps_on_one(models, two_ranks, tmp_path, step_mode):
    """Against a fenced trainer on one rank's whole tensors; the per-layer step steps
    a tensor when every part's gradient is in."""
    files, ranks = two_ranks
    settings = {**TP_ATTACH, "undo_steps": 0, "step_mode": step_mode}
    trainer, attached = Trainer.from_attach(
        attach_request(models["llama"], exports_of(ranks, files), tmp_path / "tp", **settings)
    )
    reference = make_trainer(models["llama"], families=EVERYTHING, max_update_ratio=2.0)
    assert attached.trainable_names == sorted(reference.attached.trainable)
    for version, lr in ((1, 1e-3), (2, 2e-3)):
        settings = OptimizerSettings(lr=lr)
        got = trainer.prepare(SAMPLES, settings, retrain=True)
        want = reference.prepare(SAMPLES, settings, retrain=True)
        assert isinstance(got, msg.Prepared) and isinstance(want, msg.Prepared)
        assert got.loss == pytest.approx(want.loss, abs=1e-5)
        trainer.apply(version)
        reference.apply(version)
    trainer.finish_save()
    moved = 0
    for name, whole in reference.attached.model.state_dict().items():
        if name not in files:
            continue
        moved += not torch.equal(whole, files[name])
        for rank, box in enumerate(rank_slices(name, files[name].shape)):
            torch.testing.assert_close(ranks[rank][name], whole[box], atol=2e-6, rtol=0, msg=name)
    assert moved == len(files)  # every family trained, on both ranks


def test_undo_on_two_ranks_is_exact(models, two_ranks, tmp_path):
    files, ranks = two_ranks
    trainer, _ = Trainer.from_attach(
        attach_request(models["llama"], exports_of(ranks, files), tmp_path / "tp", **TP_ATTACH)
    )
    before = [{n: t.clone() for n, t in memory.items()} for memory in ranks]
    assert isinstance(trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3)), msg.Prepared)
    trainer.apply(1)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(ranks[1][norm], before[1][norm])  # the other rank's copy moved
    assert isinstance(trainer.undo(1, 2), msg.RolledBack)
    trainer.finish_save()
    for memory, old in zip(ranks, before, strict=True):
        for name in memory:
            assert torch.equal(memory[name], old[name]), name


def test_a_guard_judges_the_step_on_two_ranks_before_it_is_written(models, two_ranks, tmp_path):
    """The guard set's loss after the step is computed on the step's values, split into
    the parts the model computes with; it is then exactly the served loss."""
    files, ranks = two_ranks
    trainer, _ = Trainer.from_attach(
        attach_request(models["llama"], exports_of(ranks, files), tmp_path / "tp", **TP_ATTACH)
    )
    guard = msg.Guard(samples=[([8, 9, 10], [11, 12, 13])], max_rise=50.0)
    assert isinstance(trainer.set_guard(guard), msg.GuardSet)
    before = [{n: t.clone() for n, t in memory.items()} for memory in ranks]
    prepared = trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3))
    assert isinstance(prepared, msg.Prepared) and prepared.guard is not None
    assert all(torch.equal(t, before[r][n]) for r, m in enumerate(ranks) for n, t in m.items())
    assert prepared.guard.after != prepared.guard.before
    trainer.apply(1)
    trainer.finish_save()
    served = trainer.score(guard.samples).loss
    assert served == pytest.approx(prepared.guard.after, abs=1e-6)


def test_a_torn_copy_on_one_rank_is_restored_or_refused(models, two_ranks, tmp_path):
    """A trainer that died writing may leave the ranks' copies of a tensor apart. Told to
    restore, the next one puts the files back on every rank; otherwise it refuses."""
    files, ranks = two_ranks
    norm = "model.norm.weight"
    ranks[1][norm][:3] += 1.0
    with pytest.raises(AttachError, match="copies of .*model.norm.weight.* differ"):
        Trainer.from_attach(
            attach_request(models["llama"], exports_of(ranks, files), tmp_path, **TP_ATTACH)
        )
    trainer, attached = Trainer.from_attach(
        attach_request(models["llama"], exports_of(ranks, files), tmp_path / "r", True, **TP_ATTACH)
    )
    trainer.finish_save()
    assert attached.weight_version == 1
    for rank, memory in enumerate(ranks):
        for name, tensor in memory.items():
            box = rank_slices(name, files[name].shape)[rank]
            assert torch.equal(tensor, files[name][box]), name


def test_a_split_the_sharded_layers_cannot_compute_is_refused(models, tmp_path, monkeypatch):
    """An embedding split along its width (no vLLM layout does that) is refused by name."""
    monkeypatch.setitem(globals(), "ROWS", tuple(r for r in ROWS if r != "embed_tokens"))
    monkeypatch.setitem(globals(), "COLUMNS", (*COLUMNS, "embed_tokens"))
    files = load_file(models["llama"] / "model.safetensors")
    ranks = split_like_vllm(files)
    with pytest.raises(AttachError, match="model.embed_tokens: an embedding split along its"):
        Trainer.from_attach(attach_request(models["llama"], exports_of(ranks, files), tmp_path))


def test_untested_parallel_layouts_are_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="tensor parallel sizes \\[1, 2\\]; 4 is refused"):
        export_weights(nn.Linear(2, 2), [], 4, 1)
    with pytest.raises(RuntimeError, match="pipeline parallelism"):
        export_weights(nn.Linear(2, 2), [], 1, 2)


@pytest.fixture(scope="module")
def tp2(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    """The tiny Llama served by vLLM at tensor parallel 2 (a core per rank), every
    family trainable, the live readout on both blocks, one step kept for an undo."""
    workdir = tmp_path_factory.mktemp("tp2")
    concepts = [f"concept{i}" for i in range(8)]
    readout = write_readout(workdir / "readout", concepts, [0, 1], 128, seed=1)
    env = {
        **ENV_EVERYTHING,
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        "LIVETRAIN_READOUT": str(readout),
        "LIVETRAIN_UNDO_STEPS": "1",
        "LIVETRAIN_SYNC_DELAY_S": "0",
    }
    args = ["--tensor-parallel-size", "2"]
    yield from start_server(models["llama"], workdir, API_KEY, env=env, extra_args=args)


@pytest.fixture(scope="module")
def http(tp2: LivetrainClient) -> httpx.Client:
    return tp2.http


def files_model(client: LivetrainClient) -> Path:
    return Path(client.status()["model_dir"])


@pytest.mark.server
def test_the_live_readout_reads_the_replicated_stream_once(tp2, http):
    """Each rank has the residual stream; the readout has one row per token, equal to
    Hugging Face's block outputs on the files."""
    model = files_model(tp2)
    readout = readout_format.load(tp2.workdir / "readout")  # type: ignore[attr-defined]
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    prompt = "The lamp flickered twice"
    records = ("livetrain_readout_records_total", frozenset({("model_name", tp2.model)}))
    before = tp2.metrics()[records]
    completion = complete(http, prompt, max_tokens=8)
    got = check_parity(http, hf, readout, completion, tokenize(http, prompt))
    assert len(got["tokens"]) == 8
    collected = tp2.metrics()[records] - before
    assert 8 <= collected < 16  # a record per engine step, from one rank only
    # steered at block 0: every rank adds the vector (a rank that did not would compute
    # block 1 from another stream than its peer, and the rows would not match)
    scales = {readout.concepts[0]: 6.0}
    steer = {"steer": scales, "steer_layers": [0], "readout": True}
    body = {"model": tp2.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body |= {"return_token_ids": True, "vllm_xargs": steer}
    steered = http.post("/v1/completions", json=body).raise_for_status().json()
    with HookedSteering(hf, steer_vectors(readout, scales, [0])):
        check_parity(http, hf, readout, steered, tokenize(http, prompt))


@pytest.mark.server
def test_steps_at_tp2_serve_what_one_rank_computes_and_sync_whole_tensors(tp2, models):
    """Four steps through /train: the losses and then the served log-probs are those of
    the same steps taken on one rank (a trainer on Hugging Face's model of the files);
    the sync then writes whole tensors, the files' own names, shapes and dtypes, holding
    that one-rank result."""
    model = files_model(tp2)
    original = load_file(model / "model.safetensors")
    reference = make_trainer(models["llama"], families=EVERYTHING, max_update_ratio=2.0)
    status = tp2.status()
    for lr in (1e-3, 2e-3):
        for context, continuation in SAMPLES:
            reply = tp2.train(context, continuation, lr=lr, retrain=True)
            assert reply.status_code == 200, reply.text
            want = reference.prepare([(context, continuation)], OptimizerSettings(lr=lr), True)
            assert isinstance(want, msg.Prepared)
            assert reply.json()["loss"] == pytest.approx(want.loss, abs=1e-5)
            reference.apply(reference.weight_version + 1)
    assert tp2.status()["weight_version"] == status["weight_version"] + 4
    for context, continuation in SAMPLES:
        served = tp2.continuation_logprobs(context, continuation)
        scored = reference.score([(context, continuation)]).token_logprobs[0]
        assert served == pytest.approx(scored, abs=LOGPROB_ATOL)
    synced = tp2.http.post("/checkpoint").raise_for_status().json()
    assert synced["bytes_written"] > 0
    files = load_file(model / "model.safetensors")
    assert {n: (t.shape, t.dtype) for n, t in files.items()} == {
        n: (t.shape, t.dtype) for n, t in original.items()
    }
    trained = reference.attached.model.state_dict()
    for name, tensor in files.items():
        assert not torch.equal(tensor, original[name]), name
        # summation order differs (a row-parallel product is two partial sums), and four
        # APOLLO steps carry it: within 1 % of how far the step moved the tensor
        moved = (trained[name] - original[name]).abs().max()
        assert (tensor - trained[name]).abs().max() <= 0.01 * moved, name


@pytest.mark.server
def test_undo_and_rollback_at_tp2_are_exact(tp2):
    """Undo serves the weights from before the step bit for bit; rollback serves the
    files (synced by the test above, or the originals) bit for bit, on both ranks."""
    context, continuation = SAMPLES[0]
    files = tp2.continuation_logprobs(context, continuation)  # served == files here
    tp2.http.post("/checkpoint").raise_for_status()
    tp2.train(context, continuation, lr=1e-3, retrain=True).raise_for_status()
    assert tp2.continuation_logprobs(context, continuation) != files
    tp2.http.post("/train/rollback", json={"steps": 1}).raise_for_status()
    assert tp2.continuation_logprobs(context, continuation) == files
    tp2.train(context, continuation, lr=1e-3, retrain=True).raise_for_status()
    tp2.http.post("/train/rollback", json={}).raise_for_status()
    assert tp2.continuation_logprobs(context, continuation) == files


@pytest.mark.server
def test_a_killed_trainer_reattaches_to_both_ranks(tp2):
    """SIGKILL the trainer between steps: the next one maps both ranks again, the served
    weights stay, and it trains."""
    context, continuation = SAMPLES[1]
    tp2.train(context, continuation, lr=1e-3, retrain=True).raise_for_status()
    served = tp2.continuation_logprobs(context, continuation)
    before = tp2.status()
    os.kill(before["trainer_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while tp2.status()["trainer_pid"] in (before["trainer_pid"], None):
        assert time.monotonic() < deadline, "no new trainer"
        time.sleep(0.2)
    after = tp2.wait_trainer()
    assert after["restarts"] == before["restarts"] + 1
    assert after["weight_version"] == before["weight_version"]
    assert tp2.continuation_logprobs(context, continuation) == served
    scored = tp2.http.post(
        "/train/score", json={"context_ids": context, "continuation_ids": continuation}
    )
    assert scored.raise_for_status().json()["token_logprobs"][0] == pytest.approx(
        served, abs=LOGPROB_ATOL
    )
    tp2.train(context, continuation, lr=1e-3, retrain=True).raise_for_status()
    assert tp2.continuation_logprobs(context, continuation) != served
