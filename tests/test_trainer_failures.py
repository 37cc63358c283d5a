"""A trainer that stops answering or keeps dying never takes the server with it: every
call has a deadline, a trainer that misses one is killed and restarted while inference
goes on, and the restart budget comes back after the trainer has run healthy."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_server

from livetrain.tools.client import LivetrainClient

DEADLINE_S = 5
HEALTHY_S = 3


@pytest.fixture(scope="module")
def strict_server(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    env = {
        "LIVETRAIN_TRAINER_CALL_TIMEOUT_S": str(DEADLINE_S),
        "LIVETRAIN_TRAINER_MAX_RESTARTS": "1",
        "LIVETRAIN_TRAINER_HEALTHY_S": str(HEALTHY_S),
        "LIVETRAIN_SYNC_DELAY_S": "0",
    }
    yield from start_server(models["llama"], tmp_path_factory.mktemp("strict"), None, env=env)


def sample(client: LivetrainClient) -> tuple[list[int], list[int]]:
    return client.tokenize("The harbour lights came on"), client.tokenize(" one by one.")


@pytest.mark.server
def test_a_stopped_trainer_is_killed_at_the_deadline_and_restarted(strict_server):
    before = strict_server.status()
    os.kill(before["trainer_pid"], signal.SIGSTOP)
    started = time.monotonic()
    reply = strict_server.train(*sample(strict_server), lr=1e-3, retrain=True)
    waited = time.monotonic() - started
    assert reply.status_code == 503, reply.text
    assert f"did not answer prepare within {DEADLINE_S} s" in reply.json()["error"]["message"]
    assert DEADLINE_S <= waited < DEADLINE_S + 30
    # Inference never waited on it (prepare does not pause generation).
    assert strict_server.complete("Once upon a time", max_tokens=4)["choices"][0]["text"]
    after = strict_server.wait_trainer()
    assert after["trainer_pid"] != before["trainer_pid"]
    assert after["restarts"] == before["restarts"] + 1
    assert after["weight_version"] == before["weight_version"]  # nothing was applied
    trained = strict_server.train(*sample(strict_server), lr=1e-3, retrain=True)
    assert trained.status_code == 200, trained.text


@pytest.mark.server
def test_the_restart_budget_comes_back_after_healthy_time(strict_server):
    """With a budget of one restart, a trainer killed twice, each time after it ran
    longer than LIVETRAIN_TRAINER_HEALTHY_S, is restarted both times."""
    for _ in range(2):
        status = strict_server.wait_trainer()
        time.sleep(HEALTHY_S + 0.5)
        os.kill(status["trainer_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while strict_server.status()["trainer_pid"] == status["trainer_pid"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert strict_server.wait_trainer()["state"] == "idle"


@pytest.fixture(scope="module")
def torn_server(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    """Every weight write misses its deadline: the trainer is killed while (or right
    after) writing, and the weights must come back from the files."""
    env = {"LIVETRAIN_TRAINER_APPLY_TIMEOUT_S": "1e-6", "LIVETRAIN_SYNC_DELAY_S": "0"}
    yield from start_server(models["llama"], tmp_path_factory.mktemp("torn"), None, env=env)


@pytest.mark.server
def test_a_trainer_killed_while_writing_weights_restores_them_from_the_files(torn_server):
    context, continuation = sample(torn_server)
    original = torn_server.continuation_logprobs(context, continuation)
    before = torn_server.status()
    reply = torn_server.train(context, continuation, lr=1e-3, retrain=True)
    assert reply.status_code == 503, reply.text
    assert "restored from the model files" in reply.json()["error"]["message"]
    after = torn_server.wait_trainer()
    assert after["restarts"] == before["restarts"] + 1
    assert after["weight_version"] == before["weight_version"] + 1  # the restore is a write
    assert torn_server.continuation_logprobs(context, continuation) == original
    body = {"context_ids": context, "continuation_ids": continuation}
    trainer = torn_server.http.post("/train/score", json=body).raise_for_status().json()
    assert trainer["token_logprobs"][0] == pytest.approx(original, abs=1e-4)
