"""The per-layer step (LIVETRAIN_STEP_MODE=per_layer): each tensor written as soon as
its gradient is whole, the gradient freed. It takes the fenced step's trajectory, holds
one gradient at a time, leaves a refused tensor as it was, refuses a guard or undo, and
a trainer lost while it writes is a torn write, restored from the files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import LOGPROB_ATOL, make_trainer, start_server
from test_trainer_failures import killed_in_prepare

from livetrain.config import OptimizerSettings, PluginConfig, TrainableFamilies
from livetrain.formats import messages as msg
from livetrain.tools.client import LivetrainClient
from livetrain.trainer import loss

EVERYTHING = TrainableFamilies(embeddings=True, norms=True, lm_head=True)
SAMPLES = [([5, 9, 14, 22, 31], [40, 41, 42, 43]), ([7, 3, 11], [50, 51, 60, 61, 62])]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied; tied embeddings and head
def test_per_layer_steps_follow_the_fenced_trajectory(models, arch):
    fenced = make_trainer(models[arch], families=EVERYTHING, max_update_ratio=2.0)
    per_layer = make_trainer(
        models[arch], families=EVERYTHING, max_update_ratio=2.0, step_mode="per_layer"
    )
    for version, lr in enumerate((1e-3, 2e-3, 1e-3), start=1):
        settings = OptimizerSettings(lr=lr)
        want = fenced.prepare(SAMPLES, settings, retrain=True)
        got = per_layer.prepare(SAMPLES, settings, retrain=True)
        assert isinstance(want, msg.Prepared) and isinstance(got, msg.Prepared), got
        assert got.loss == pytest.approx(want.loss, abs=1e-6)
        assert got.refused_tensors == {}
        fenced.apply(version)
        per_layer.apply(version)
    trained = fenced.attached.model.state_dict()
    for name, tensor in per_layer.attached.model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], atol=1e-6, rtol=0, msg=name)
    assert per_layer.optimizer.steps == fenced.optimizer.steps == 3
    state, want_state = per_layer.optimizer.state_dict(), fenced.optimizer.state_dict()
    assert state.keys() == want_state.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, want_state[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_per_layer_step_holds_one_gradient_at_a_time(models):
    """Counted by hooks of the test's own, called before the step's: whenever a tensor's
    gradient has just been accumulated, it is the only trainable one holding one."""
    trainer = make_trainer(models["llama"], families=EVERYTHING, step_mode="per_layer")
    params = list(trainer.attached.trainable.values())
    held: list[int] = []
    handles = [
        p.register_post_accumulate_grad_hook(
            lambda _: held.append(sum(q.grad is not None for q in params))
        )
        for p in params
    ]
    try:
        assert isinstance(trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3)), msg.Prepared)
    finally:
        for handle in handles:
            handle.remove()
    assert len(held) == len(params) and max(held) == 1
    assert all(p.grad is None for p in params)


def test_a_per_layer_step_recomputes_every_batch(models):
    """Its memory gain needs the blocks' activations recomputed too: a short batch, far
    under LIVETRAIN_RECOMPUTE_ABOVE_TOKENS, still runs each block twice."""
    trainer = make_trainer(models["llama"], step_mode="per_layer", recompute_above_tokens=1024)
    loss._head_in_chunks(trainer.attached.model)  # its one-off probe runs the model
    mlp = trainer.attached.model.model.layers[0].mlp  # inside a block
    calls: list[int] = []
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert isinstance(trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3)), msg.Prepared)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_a_refused_tensor_is_left_while_the_others_are_written(models):
    """A tensor shrunk a million times would move by far more than the limit of its norm:
    its update is refused and it stays as it was; every other tensor takes its step."""
    trainer = make_trainer(models["llama"], max_update_ratio=0.5, step_mode="per_layer")
    small = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        trainer.attached.trainable[small].mul_(1e-6)
    before = {n: p.detach().clone() for n, p in trainer.attached.trainable.items()}
    prepared = trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3))
    assert isinstance(prepared, msg.Prepared)
    assert list(prepared.refused_tensors) == [small]
    assert "of its norm" in prepared.refused_tensors[small]
    trainer.apply(1)
    for name, param in trainer.attached.trainable.items():
        assert torch.equal(param, before[name]) == (name == small), name


def test_every_tensor_refused_is_a_refused_step(models):
    trainer = make_trainer(models["llama"], max_update_ratio=1e-9, step_mode="per_layer")
    before = {n: p.detach().clone() for n, p in trainer.attached.trainable.items()}
    refused = trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3))
    assert isinstance(refused, msg.Failed) and refused.reason == "update_too_large"
    assert "nothing was written" in refused.error
    assert all(torch.equal(p, before[n]) for n, p in trainer.attached.trainable.items())


@pytest.mark.parametrize(
    "settings", [{"undo_steps": 1}, {"guard": Path("guard.json")}], ids=["undo", "guard"]
)
def test_per_layer_refuses_what_needs_the_whole_step_first(settings):
    with pytest.raises(ValueError, match="LIVETRAIN_GUARD and LIVETRAIN_UNDO_STEPS"):
        PluginConfig(step_mode="per_layer", **settings)
    with pytest.raises(ValueError, match="LIVETRAIN_STEP_MODE: expected one of fenced"):
        PluginConfig(step_mode="layerwise")


@pytest.fixture(scope="module")
def per_layer_server(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    """Plain kernels: inference reads the weights the backward pass writes."""
    env = {"LIVETRAIN_STEP_MODE": "per_layer", "LIVETRAIN_CPU_KERNELS": "plain"}
    workdir = tmp_path_factory.mktemp("per_layer")
    yield from start_server(models["llama"], workdir, None, env=env)


@pytest.mark.server
def test_per_layer_steps_are_served_and_refuse_a_guard(per_layer_server):
    client = per_layer_server
    context, continuation = SAMPLES[0]
    original = client.continuation_logprobs(context, continuation)
    reply = client.train(context, continuation, lr=1e-3)
    assert reply.status_code == 200, reply.text
    assert reply.json()["refused_tensors"] == {}
    served = client.continuation_logprobs(context, continuation)
    assert served != original
    body = {"context_ids": context, "continuation_ids": continuation}
    scored = client.http.post("/train/score", json=body).raise_for_status().json()
    assert scored["token_logprobs"][0] == pytest.approx(served, abs=LOGPROB_ATOL)
    guard = {"samples": [{"context_ids": [5, 6], "continuation_ids": [7]}], "max_rise": 0.5}
    refused = client.http.post("/train/guard", json=guard)
    assert refused.status_code == 409 and "per-layer" in refused.text, refused.text
    assert client.status()["guard"] is None


@pytest.mark.server
def test_a_trainer_lost_in_a_per_layer_step_is_a_torn_write(per_layer_server):
    """The step writes during prepare, so a trainer killed there may have written part
    of it: generation waits while the next trainer restores the files' weights."""
    client = per_layer_server
    context, continuation = SAMPLES[1]
    client.http.post("/train/rollback", json={}).raise_for_status()
    files = client.continuation_logprobs(context, continuation)
    before = client.wait_trainer()
    reply = killed_in_prepare(client, before["trainer_pid"], context, continuation)
    assert reply.status_code == 503, reply.text
    assert "restored from the model files" in reply.json()["error"]["message"]
    deadline = time.monotonic() + 120
    while (after := client.status())["trainer_pid"] in (before["trainer_pid"], None):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    after = client.wait_trainer()
    assert after["weight_version"] == before["weight_version"] + 1  # the restore is a write
    assert client.continuation_logprobs(context, continuation) == files
