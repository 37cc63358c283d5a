"""A step is judged before it is served (the guard set) and can be taken back after it
was (undo): the Trainer on a Hugging Face model of its own, checked against the same
step taken without the feature, then the routes on the shared real server.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import make_trainer, served_state, snapshot

from livetrain.config import OptimizerSettings
from livetrain.formats import messages as msg

SAMPLE = ([5, 6, 7], [8, 9])
OTHER = ([5, 6, 7], [30, 31])  # same context, another continuation: teaching it hurts SAMPLE
STEP = OptimizerSettings(lr=1e-2)
FREE = {"max_update_ratio": math.inf}  # tiny random models move far per step


def stepped(trainer, samples, settings=STEP):
    """`trainer` after one prepared and applied step on `samples`."""
    prepared = trainer.prepare(samples, settings, retrain=True)
    assert isinstance(prepared, msg.Prepared), prepared
    assert isinstance(trainer.apply(trainer.weight_version + 1), msg.Applied)
    return trainer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_guarded_step_serves_exactly_what_the_guard_judged(models, dtype):
    """The guarded step is previewed into copies and applied by copying them; the
    result is bit for bit the unguarded in-place step, and the guard's "after" is the
    guard set's loss on what is then served."""
    guard = msg.Guard(samples=[OTHER], max_rise=100.0)
    judged = make_trainer(models["llama"], dtype=dtype, guard=guard, **FREE)
    plain = stepped(make_trainer(models["llama"], dtype=dtype, **FREE), [SAMPLE])
    reply = judged.prepare([SAMPLE], STEP)
    assert isinstance(reply, msg.Prepared) and reply.guard is not None
    assert reply.guard.before == judged.score([OTHER]).loss  # nothing was written yet
    assert isinstance(judged.apply(1), msg.Applied)
    for name, param in judged.attached.trainable.items():
        assert torch.equal(param, plain.attached.trainable[name]), name
    assert reply.guard.after == pytest.approx(judged.score([OTHER]).loss, abs=1e-6)


def test_a_step_that_raises_the_guard_loss_is_refused_and_changes_nothing(models):
    guard = msg.Guard(samples=[SAMPLE], max_rise=0.0)
    judged = make_trainer(models["llama"], guard=guard, **FREE)
    before = snapshot(judged)
    loss_before = judged.score([SAMPLE]).loss
    reply = judged.prepare([OTHER], STEP)
    assert isinstance(reply, msg.Failed) and reply.kind == "refused", reply
    found = re.search(r"would rise from (\S+) to (\S+), more than max_rise 0;", reply.error)
    assert found, reply.error
    # The figures are the guard set's loss now, and after the same step really taken.
    unguarded = stepped(make_trainer(models["llama"], **FREE), [OTHER])
    assert float(found[1]) == pytest.approx(loss_before, abs=1e-4)
    assert float(found[2]) == pytest.approx(unguarded.score([SAMPLE]).loss, abs=1e-4)
    assert judged.pending is None and judged.optimizer.steps == 0
    assert all(p.grad is None for p in judged.attached.trainable.values())
    assert all(torch.equal(v, before[k]) for k, v in judged.attached.model.state_dict().items())
    assert judged.trained == set()


def test_a_guard_set_with_a_non_finite_loss_is_refused(models):
    trainer = make_trainer(models["llama"])
    kept = msg.Guard(samples=[SAMPLE], max_rise=0.5)
    assert isinstance(trainer.set_guard(kept), msg.GuardSet)
    with torch.no_grad():
        trainer.attached.model.model.norm.weight[0] = float("nan")
    reply = trainer.set_guard(msg.Guard(samples=[OTHER], max_rise=0.5))
    assert isinstance(reply, msg.Failed) and "not finite" in reply.error
    assert trainer.guard == kept


def test_undo_returns_weights_optimizer_and_record_bit_for_bit(models):
    trainer = make_trainer(models["llama"], undo_steps=2, **FREE)
    states = [
        (snapshot(trainer), {k: v.clone() for k, v in trainer.optimizer.state_dict().items()})
    ]
    for samples in ([SAMPLE], [OTHER], [SAMPLE, OTHER]):
        stepped(trainer, samples)
        optimizer = {k: v.clone() for k, v in trainer.optimizer.state_dict().items()}
        states.append((snapshot(trainer), optimizer))
    assert len(trainer.history) == 2  # the oldest step fell out of the window

    reply = trainer.undo(3, weight_version=4)
    assert isinstance(reply, msg.Failed) and reply.status == 409 and "2 can" in reply.error
    reply = trainer.undo(2, weight_version=4)
    assert reply == msg.RolledBack(4, None, 2, trainer.optimizer_status(), 0)
    weights, optimizer = states[1]  # as after the first step
    assert all(torch.equal(v, weights[k]) for k, v in trainer.attached.model.state_dict().items())
    state = trainer.optimizer.state_dict()
    assert state.keys() == optimizer.keys()
    assert all(torch.equal(state[k], optimizer[k]) for k in state)
    assert trainer.optimizer.steps == 1 and trainer.weight_version == 4
    # The record is the first step's: SAMPLE counts as trained, OTHER does not.
    assert isinstance(trainer.prepare([SAMPLE], STEP), msg.Failed)
    assert isinstance(trainer.prepare([OTHER], STEP), msg.Prepared)
    trainer.discard()
    assert isinstance(trainer.undo(1, weight_version=5), msg.Failed)  # nothing kept now


def test_no_undo_history_is_kept_by_default(models):
    trainer = stepped(make_trainer(models["llama"], **FREE), [SAMPLE])
    assert len(trainer.history) == 0
    reply = trainer.undo(1, weight_version=2)
    assert isinstance(reply, msg.Failed) and "keeps the last 0" in reply.error


# ---- the routes, on the shared server -------------------------------------------------


def test_the_guard_route_refuses_a_harmful_step_and_passes_a_good_one(llama_server, sample):
    context, continuation = sample
    harmful = [900] * len(continuation)  # one token over and over: unlike the guard's
    guard = {"context_ids": context, "continuation_ids": continuation, "max_rise": 0.0}
    set_reply = llama_server.http.post("/train/guard", json=guard)
    try:
        assert set_reply.status_code == 200, set_reply.text
        body = {"context_ids": context, "continuation_ids": continuation}
        loss = llama_server.http.post("/train/score", json=body).raise_for_status().json()["loss"]
        assert set_reply.json()["guard"] == {
            "samples": 1,
            "tokens": len(continuation),
            "max_rise": 0.0,
            "loss": pytest.approx(loss, abs=1e-5),
        }
        before = served_state(llama_server, sample)
        refused = llama_server.train(context, harmful, lr=1e-2, retrain=True)
        assert refused.status_code == 422, refused.text
        assert "guard set's loss would rise" in refused.json()["error"]["message"]
        assert served_state(llama_server, sample) == before

        accepted = llama_server.train(context, continuation, lr=1e-3, retrain=True)
        assert accepted.status_code == 200, accepted.text
        judged = accepted.json()["guard"]
        assert judged["after"] < judged["before"] == pytest.approx(loss, abs=1e-5)
        assert llama_server.status()["guard"]["loss"] == judged["after"]
    finally:
        cleared = llama_server.http.delete("/train/guard")
    assert cleared.status_code == 200 and cleared.json() == {"guard": None}
    assert llama_server.status()["guard"] is None


def test_undo_over_http_serves_the_earlier_weights_exactly(llama_server, sample):
    context, continuation = sample
    original = llama_server.continuation_logprobs(context, continuation)
    version = llama_server.status()["weight_version"]
    for lr in (1e-3, 2e-3):
        llama_server.train(context, continuation, lr=lr, retrain=True).raise_for_status()
    assert llama_server.continuation_logprobs(context, continuation) != original
    too_many = llama_server.http.post("/train/rollback", json={"steps": 3})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "steps"
    undone = llama_server.http.post("/train/rollback", json={"steps": 2})
    assert undone.status_code == 200, undone.text
    assert undone.json()["undone_steps"] == 2
    assert undone.json()["weight_version"] == version + 3  # two steps and the undo's write
    assert llama_server.continuation_logprobs(context, continuation) == original
    status = llama_server.status()
    assert status["undo_available"] == 0 and status["weight_version"] == version + 3
    again = llama_server.http.post("/train/rollback", json={"steps": 1})
    assert again.status_code == 409 and again.json()["error"]["field"] == "steps", again.text
