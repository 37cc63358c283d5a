"""Online training end to end: a real vLLM server (Llama-style tiny model, --api-key set,
compiled as vLLM defaults to) trains in place while it serves, and the Trainer itself on a
Hugging Face model of its own.

The server is shared by the session; every test states what it expects relative to the
state it found, so tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import LOGPROB_ATOL, make_trainer, served_state, snapshot
from transformers import AutoModelForCausalLM

from livetrain.config import OptimizerSettings, TrainableFamilies
from livetrain.formats import messages as msg
from livetrain.tools.tiny_model import FAMILIES, build_tiny_model
from livetrain.trainer import loss
from livetrain.trainer import state as trainer_state
from livetrain.trainer.apollo import Apollo
from livetrain.trainer.loss import continuation_logprobs
from livetrain.trainer.model import AttachError
from livetrain.trainer.trainer import Trainer


def score(client, context, continuation) -> list[float]:
    body = {"context_ids": context, "continuation_ids": continuation}
    reply = client.http.post("/train/score", json=body).raise_for_status().json()
    return reply["token_logprobs"][0]


def test_views_give_vllm_logprobs(llama_server, sample):
    served = llama_server.continuation_logprobs(*sample)
    np.testing.assert_allclose(score(llama_server, *sample), served, atol=LOGPROB_ATOL)


def test_training_raises_served_logprob_in_place(llama_server, sample):
    before = sum(llama_server.continuation_logprobs(*sample))
    start = llama_server.status()["weight_version"]
    versions = []
    for _ in range(4):
        reply = llama_server.train(*sample, lr=3e-3, retrain=True).raise_for_status().json()
        versions.append(reply["weight_version"])
        assert reply["tokens"] == len(sample[1]) and reply["elapsed_ms"] > 0
        # The very next completion already sees the new weights, exactly as trained.
        served = llama_server.continuation_logprobs(*sample)
        np.testing.assert_allclose(score(llama_server, *sample), served, atol=LOGPROB_ATOL)
    after = sum(served)
    assert versions == [start + 1, start + 2, start + 3, start + 4]
    assert after > before + 5.0, (before, after)


def test_vllms_packed_kernels_are_rebuilt_with_each_step(llama_server, sample, models):
    """On CPU vLLM runs oneDNN on a packed copy of each linear weight: every trained one
    (4 fused linears per block; the untied lm_head is frozen) is packed afresh from the
    written weight and swapped in. Inference reads these weights only through the
    copies, so the write and the packing run ahead of the pause; the served log-probs
    then equal the trainer's (also after every step of the test above)."""
    layers = json.loads((models["llama"] / "config.json").read_text())["num_hidden_layers"]
    reply = llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status().json()
    assert reply["repack"]["tensors"] == 4 * layers and reply["repack"]["ahead"] is True
    np.testing.assert_allclose(
        score(llama_server, *sample), llama_server.continuation_logprobs(*sample), atol=LOGPROB_ATOL
    )


def test_first_reply_loss_is_the_served_loss(llama_server, sample):
    served = llama_server.continuation_logprobs(*sample)
    start = llama_server.status()["weight_version"]
    reply = llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status().json()
    assert reply["loss"] == pytest.approx(-np.mean(served), abs=LOGPROB_ATOL)
    assert reply["weight_version"] == start + 1


def test_prefix_cache_never_serves_old_weights(llama_server, sample):
    # Same prompt twice warms the prefix cache; a step in between must invalidate it.
    first = llama_server.continuation_logprobs(*sample)
    assert llama_server.continuation_logprobs(*sample) == first
    llama_server.train(*sample, lr=3e-3, retrain=True).raise_for_status()
    again = llama_server.continuation_logprobs(*sample)
    np.testing.assert_allclose(again, score(llama_server, *sample), atol=LOGPROB_ATOL)
    assert again != first  # (a step need not raise them: Adam's momentum can overshoot)


def test_completions_succeed_while_training(llama_server, sample):
    done = threading.Event()

    def generate() -> int:
        """Completions until told to stop; raises on the first one that fails."""
        completed = 0
        with httpx.Client(
            base_url=llama_server.http.base_url, headers=llama_server.http.headers, timeout=120
        ) as http:
            while not done.is_set() or not completed:  # at least one each
                body = {
                    "model": llama_server.model,
                    "prompt": "Once upon a time",
                    "max_tokens": 24,
                    "temperature": 0,
                }
                reply = http.post("/v1/completions", json=body).raise_for_status()
                assert reply.json()["choices"][0]["text"], reply.text
                completed += 1
        return completed

    before = llama_server.status()["weight_version"]
    with ThreadPoolExecutor(3) as pool:
        generators = [pool.submit(generate) for _ in range(3)]
        try:
            for _ in range(3):
                llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status()
        finally:
            done.set()
        completed = [g.result() for g in generators]  # re-raises a generator's failure
    assert sum(completed) >= len(generators)
    assert llama_server.status()["weight_version"] == before + 3


def test_concurrent_train_requests_queue(llama_server, sample):
    before = llama_server.status()

    def train() -> dict:
        with httpx.Client(
            base_url=llama_server.http.base_url, headers=llama_server.http.headers, timeout=120
        ) as http:
            body = {
                "context_ids": sample[0],
                "continuation_ids": sample[1],
                "lr": 1e-4,
                "retrain": True,
            }
            return http.post("/train", json=body).raise_for_status().json()

    with ThreadPoolExecutor(4) as pool:
        replies = [f.result() for f in [pool.submit(train) for _ in range(4)]]
    versions = sorted(r["weight_version"] for r in replies)
    steps = sorted(r["optimizer_steps"] for r in replies)
    assert versions == [before["weight_version"] + i for i in range(1, 5)]
    assert steps == [before["steps"] + i for i in range(1, 5)]


def test_a_sample_is_not_trained_twice_unless_asked(llama_server):
    old = (
        llama_server.tokenize("The ferry left at dawn;"),
        llama_server.tokenize(" gulls followed."),
    )
    new = (llama_server.tokenize("At noon the market"), llama_server.tokenize(" smelled of bread."))
    first = llama_server.train(*old, lr=1e-4).raise_for_status().json()
    assert first["skipped_samples"] == 0
    before = served_state(llama_server, old)
    again = llama_server.train(*old, lr=1e-4)
    assert again.status_code == 409 and "retrain" in again.json()["error"]["message"]
    assert served_state(llama_server, old) == before
    mixed = {"samples": [{"context_ids": c, "continuation_ids": t} for c, t in (old, new)]}
    reply = llama_server.http.post("/train", json={**mixed, "lr": 1e-4}).raise_for_status().json()
    assert reply["skipped_samples"] == 1 and reply["tokens"] == len(new[1])
    forced = llama_server.train(*old, lr=1e-4, retrain=True).raise_for_status().json()
    assert (
        forced["skipped_samples"] == 0 and forced["weight_version"] == reply["weight_version"] + 1
    )


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"lr": 1.0}, "of its norm, over the limit of 2"),  # the tiny model moves 61 x lr
        ({"lr": 1.0, "weight_decay": 1.0}, "decay factor 1 - lr * weight_decay = 0"),
    ],
)
def test_a_destructive_step_is_refused_and_changes_nothing(llama_server, sample, settings, says):
    """Both within the request bounds, both would wreck the model: refused by the trainer,
    naming the tensor (or setting) and the figure."""
    before = served_state(llama_server, sample)
    reply = llama_server.train(*sample, retrain=True, **settings)
    assert reply.status_code == 422, reply.text
    message = reply.json()["error"]["message"]
    assert "weights unchanged" in message and says in message, message
    assert served_state(llama_server, sample) == before
    assert llama_server.status()["state"] == "idle"


def test_metrics_in_vllms_own_endpoint_follow_steps_refusals_and_syncs(llama_server):
    """Scraped from /metrics, beside vLLM's own, labelled with the served model name;
    every counter moves by exactly what was done between two scrapes, and the gauges
    equal the replies."""
    client = llama_server
    label = ("model_name", client.model)

    def value(scraped: dict, name: str, **labels: str) -> float:
        return scraped[(name, frozenset({label, *labels.items()}))]

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    sample = (client.tokenize("The clockmaker oiled the gears and"), client.tokenize(" smiled."))
    before = client.metrics()
    step = client.train(*sample, lr=1e-4, retrain=True).raise_for_status().json()
    assert client.train(*sample, lr=1e-4).status_code == 409  # already trained
    assert client.train(*sample, lr=1.0, retrain=True).status_code == 422  # too large
    assert client.train(sample[0], [10**9], lr=1e-4).status_code == 422  # invalid
    synced = client.http.post("/checkpoint").raise_for_status().json()
    after = client.metrics()
    assert "vllm:num_requests_running" in client.http.get("/metrics").text

    assert delta("livetrain_steps_total") == 1
    assert delta("livetrain_trained_tokens_total") == step["tokens"] == len(sample[1])
    assert value(after, "livetrain_loss") == pytest.approx(step["loss"])
    assert delta("livetrain_step_seconds_count") == 1
    assert delta("livetrain_step_seconds_sum") == pytest.approx(step["elapsed_ms"] / 1000)
    assert delta("livetrain_pause_seconds_sum") == pytest.approx(step["pause_ms"] / 1000)
    assert delta("livetrain_update_visible_seconds_sum") == pytest.approx(step["update_ms"] / 1000)
    for reason, count in [("already_trained", 1), ("update_too_large", 1), ("invalid_request", 1)]:
        assert delta("livetrain_refused_steps_total", reason=reason) == count, reason
    assert delta("livetrain_refused_steps_total", reason="nonfinite_loss") == 0
    status = client.status()
    assert value(after, "livetrain_weight_version") == step["weight_version"]
    assert value(after, "livetrain_weight_version") == status["weight_version"]
    assert value(after, "livetrain_optimizer_steps") == status["steps"]
    assert delta("livetrain_syncs_total", trigger="manual") == 1
    assert delta("livetrain_sync_bytes_total") == synced["bytes_written"] > 0
    assert delta("livetrain_sync_seconds_count") == 1
    assert delta("livetrain_sync_errors_total") == 0
    states = {s: value(after, "livetrain_trainer_state", state=s) for s in ("idle", "failed")}
    assert states == {"idle": 1, "failed": 0}


def test_trainer_restart_keeps_state(llama_server, sample):
    llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status()  # trained once
    score(llama_server, *sample)  # any op but prepare waits for the background save
    before = llama_server.status()
    assert before["saved_version"] == before["weight_version"] > 0
    os.kill(before["trainer_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (pid := llama_server.status()["trainer_pid"]) == before["trainer_pid"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Freeze the new trainer while it is still importing torch: the route must say why.
    os.kill(pid, signal.SIGSTOP)
    try:
        assert llama_server.status()["state"] == "starting"
        reply = llama_server.train(*sample)
        assert reply.status_code == 503 and "starting" in reply.json()["error"]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    after = llama_server.wait_trainer()
    assert after["restarts"] == before["restarts"] + 1
    assert after["trainer"]["resumed_from_version"] == before["weight_version"]
    assert (after["weight_version"], after["steps"], after["optimizer_state_bytes"]) == (
        before["weight_version"],
        before["steps"],
        before["optimizer_state_bytes"],
    )
    assert llama_server.train(*sample, lr=1e-3).status_code == 409  # the record survived
    reply = llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status().json()
    assert reply["optimizer_steps"] == before["steps"] + 1
    assert reply["weight_version"] == before["weight_version"] + 1


def test_rollback_serves_the_last_checkpoint_again_exactly(llama_server, sample, tmp_path):
    """Train past a sync, roll back: the served weights are the files' bit for bit (the
    served log-probs are the synced ones, and equal Hugging Face's on the files), the
    optimizer state is the synced one, and the version moves on (a new write)."""
    llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status()  # a state to sync
    llama_server.http.post("/checkpoint").raise_for_status()
    synced = llama_server.continuation_logprobs(*sample)
    at_sync = llama_server.status()
    for _ in range(2):
        llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status()
    assert llama_server.continuation_logprobs(*sample) != synced
    reply = llama_server.http.post("/train/rollback").raise_for_status().json()
    assert reply["weight_version"] == at_sync["weight_version"] + 3
    assert reply["checkpoint_version"] == at_sync["weight_version"]
    assert reply["optimizer_steps"] == at_sync["steps"]
    assert llama_server.continuation_logprobs(*sample) == synced
    np.testing.assert_allclose(score(llama_server, *sample), synced, atol=LOGPROB_ATOL)
    status = llama_server.status()
    assert (status["steps"], status["optimizer_state_bytes"]) == (
        at_sync["steps"],
        at_sync["optimizer_state_bytes"],
    )
    assert not status["sync_pending"]  # nothing to sync: the weights are the files'


# ---- the Trainer on its own (no vLLM) ------------------------------------------------

SAMPLES = [([5, 6, 7], [8, 9])]


def test_classify_makes_only_linear_weights_trainable(models):
    attached = make_trainer(models["llama"]).attached
    assert set(attached.apollo_params) == {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert not attached.adamw_params
    assert "model.embed_tokens.weight" in attached.frozen and "lm_head.weight" in attached.frozen


def test_train_layers_leaves_every_other_block_as_it_was(models):
    """LIVETRAIN_TRAIN_LAYERS=1: only block 1's matrices train; a block the model does
    not have is refused with the count."""
    trainer = make_trainer(models["llama"], families=TrainableFamilies(layers=(1,)))
    assert {name.split(".")[2] for name in trainer.attached.trainable} == {"1"}
    assert len(trainer.attached.apollo_params) == 7
    before = snapshot(trainer)
    assert isinstance(trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3)), msg.Prepared)
    assert isinstance(trainer.apply(1), msg.Applied)
    after = trainer.attached.model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed == set(trainer.attached.trainable)
    with pytest.raises(AttachError, match=r"blocks \[2\]; the model has 2 \(0 to 1\)"):
        make_trainer(models["llama"], families=TrainableFamilies(layers=(1, 2)))


def test_recomputing_block_activations_gives_the_same_step(models):
    """A batch longer than recompute_above_tokens keeps only block inputs and runs each
    block again in the backward pass; the step is the same, bit for bit."""
    samples = [([5, 6, 7, 11, 12], [8, 9, 10]), ([3, 4], [13, 14, 15, 16])]
    runs = {}
    for threshold in (10**6, 0):  # never, always
        trainer = make_trainer(models["llama"], recompute_above_tokens=threshold)
        loss._head_in_chunks(trainer.attached.model)  # its one-off probe runs the model
        mlp = trainer.attached.model.model.layers[0].mlp  # inside the recomputed block
        calls: list[int] = []
        mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        prepared = trainer.prepare(samples, OptimizerSettings(lr=1e-3))
        assert isinstance(trainer.apply(1), msg.Applied)
        runs[threshold] = (prepared.loss, snapshot(trainer), len(calls))
    (first_loss, weights, once), (loss_again, weights_again, twice) = runs.values()
    assert (once, twice) == (1, 2)  # the block ran again in the backward pass
    assert first_loss == loss_again
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)


@pytest.mark.parametrize("arch", sorted(FAMILIES))  # gemma: soft-capping; granite: scaling
def test_batched_logprobs_equal_each_sample_alone_from_full_logits(arch, tmp_path, monkeypatch):
    """The head runs on continuation positions only, in chunks (2 tokens here, so a
    sample spans several): each sample of a batch with other context lengths gets what
    its own full forward gives it, in every family."""
    monkeypatch.setattr(loss, "HEAD_CHUNK", 2)
    model_dir = build_tiny_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = [([5, 6, 7, 11, 12], [8, 9, 10]), ([3, 4], [13, 14, 15, 16]), ([20], [23])]
    batched = continuation_logprobs(model, samples)
    assert loss._head_in_chunks(model)  # the chunked path is the one measured
    for (context, continuation), got in zip(samples, batched, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation])).logits[0]
        predicting = logits[len(context) - 1 : -1].float().log_softmax(-1)
        alone = predicting.gather(1, torch.tensor(continuation)[:, None])[:, 0]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_a_step_through_the_chunked_head_equals_one_through_the_models_own(models, monkeypatch):
    """The gradient through the chunked, recomputed head is the one through the whole
    logits (up to the order of float sums)."""
    samples = [([5, 6, 7, 11, 12], [8, 9, 10]), ([3, 4], [13, 14, 15, 16])]
    monkeypatch.setattr(loss, "HEAD_CHUNK", 3)
    weights = []
    for chunked in (True, False):
        trainer = make_trainer(models["llama"])
        loss._HEAD_IN_CHUNKS[trainer.attached.model] = chunked
        assert isinstance(trainer.prepare(samples, OptimizerSettings(lr=1e-3)), msg.Prepared)
        assert isinstance(trainer.apply(1), msg.Applied)
        weights.append(snapshot(trainer))
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], atol=1e-6, rtol=1e-5)


def test_a_finite_step_changes_weights(models, tmp_path):
    trainer = make_trainer(models["llama"], tmp_path)
    before = snapshot(trainer)
    assert isinstance(trainer.prepare(SAMPLES, OptimizerSettings(lr=1e-3)), msg.Prepared)
    assert isinstance(trainer.apply(1), msg.Applied)
    after = trainer.attached.model.state_dict()
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"],
                           before["model.layers.0.mlp.down_proj.weight"])  # fmt: skip
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # frozen


def test_non_finite_loss_is_refused_and_nothing_changes(models):
    trainer = make_trainer(models["llama"])
    with torch.no_grad():
        trainer.attached.model.model.norm.weight[3] = float("nan")
    before = snapshot(trainer)
    reply = trainer.prepare(SAMPLES, OptimizerSettings())
    assert reply == msg.Failed(
        kind="refused", error="non-finite loss (nan)", reason="nonfinite_loss"
    )
    assert trainer.pending is None and trainer.optimizer.steps == 0
    assert trainer.optimizer.state_bytes() == Apollo({}, {}).state_bytes()
    after = trainer.attached.model.state_dict()
    for name, tensor in before.items():
        assert torch.allclose(after[name], tensor, rtol=0, atol=0, equal_nan=True), name
    assert trainer.apply(1) == msg.Failed(kind="refused", error="no prepared step to apply")


def test_a_step_moving_a_tensor_too_far_is_refused_with_its_true_ratio(models):
    """The guard's figure is the real movement: refused at the default limit, the same
    step applied by a trainer without a limit moves that tensor by exactly that much."""
    guarded = make_trainer(models["llama"])  # the default limit
    before = snapshot(guarded)
    reply = guarded.prepare(SAMPLES, OptimizerSettings(lr=1e-2))
    assert isinstance(reply, msg.Failed) and reply.kind == "refused"
    match = re.fullmatch(r"(\S+): the step would move it by (\S+) of its norm, .*", reply.error)
    assert match and "over the limit of 0.1" in reply.error, reply.error
    name, ratio = match[1], float(match[2])
    assert guarded.pending is None and guarded.optimizer.steps == 0
    assert all(p.grad is None for p in guarded.attached.trainable.values())
    assert all(torch.equal(v, before[k]) for k, v in guarded.attached.model.state_dict().items())

    free = make_trainer(models["llama"], max_update_ratio=math.inf)
    weight = free.attached.model.get_parameter(name)
    old = weight.detach().clone()
    assert isinstance(free.prepare(SAMPLES, OptimizerSettings(lr=1e-2)), msg.Prepared)
    assert isinstance(free.apply(1), msg.Applied)
    moved = torch.linalg.vector_norm(weight.detach() - old) / torch.linalg.vector_norm(old)
    assert moved.item() == pytest.approx(ratio, rel=1e-2)


def test_a_decay_factor_outside_zero_one_is_refused(models):
    trainer = make_trainer(models["llama"], max_update_ratio=math.inf)
    reply = trainer.prepare(SAMPLES, OptimizerSettings(lr=1.0, weight_decay=1.0))
    assert isinstance(reply, msg.Failed) and "decay factor" in reply.error
    assert trainer.pending is None


def saved_trainer(models, tmp_path, saved_version: int, served_version: int) -> Trainer:
    """A trainer whose state dir holds a state written at `saved_version`."""
    (tmp_path / "writer").mkdir(exist_ok=True)
    writer = make_trainer(models["llama"], tmp_path / "writer")
    assert isinstance(writer.prepare(SAMPLES, OptimizerSettings()), msg.Prepared)
    assert isinstance(writer.apply(1), msg.Applied)
    writer.finish_save()
    trainer_state.save(
        tmp_path, {"weight_version": saved_version, "optimizer": writer.optimizer.state_dict()}
    )
    return make_trainer(models["llama"], tmp_path, weight_version=served_version)


def test_resume_at_the_served_version(models, tmp_path):
    trainer = saved_trainer(models, tmp_path, saved_version=4, served_version=4)
    assert trainer.resume() == 4 and trainer.optimizer.steps == 1


def test_resume_a_state_one_step_behind(models, tmp_path):
    # A trainer killed while its background save ran leaves the previous state.
    trainer = saved_trainer(models, tmp_path, saved_version=3, served_version=4)
    assert trainer.resume() == 3 and trainer.optimizer.steps == 1


def test_state_for_other_weights_is_set_aside(models, tmp_path):
    for served in (0, 2):  # vLLM reloaded the files / a state from the future
        trainer = saved_trainer(models, tmp_path, saved_version=3, served_version=served)
        assert trainer.resume() is None and trainer.optimizer.steps == 0
        assert not (tmp_path / trainer_state.STATE_FILE).exists()
    assert list(tmp_path.glob(f"{trainer_state.STATE_FILE}*")) == [
        tmp_path / f"{trainer_state.STATE_FILE}.stale"
    ]


def test_background_save_writes_the_applied_state(models, tmp_path):
    trainer = make_trainer(models["llama"], tmp_path)
    assert isinstance(trainer.prepare(SAMPLES, OptimizerSettings()), msg.Prepared)
    assert isinstance(trainer.apply(7), msg.Applied)
    trainer.finish_save()
    saved = trainer_state.load(tmp_path)
    assert trainer.saved_version == saved["weight_version"] == 7
    state = trainer.optimizer.state_dict()
    assert all(torch.equal(saved["optimizer"][k], state[k]) for k in state)
