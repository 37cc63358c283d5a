"""A trainer that stops answering or keeps dying never takes the server with it: every
call has a deadline, a trainer that misses one is killed and restarted while inference
goes on, and the restart budget comes back after the trainer has run healthy. Clients
that hang up drop their queued steps; steps and syncs sent together never interleave.
The strict server also runs with a guard file named at launch."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import LOGPROB_ATOL, attach_request, files_logprobs, start_server
from safetensors.torch import load_file

from livetrain.api.endpoints import load_guard
from livetrain.config import PluginConfig
from livetrain.formats import messages as msg
from livetrain.formats.shared_tensors import export_tensor
from livetrain.tools.client import LivetrainClient
from livetrain.trainer.model import AttachError
from livetrain.trainer.trainer import Trainer

DEADLINE_S = 5
HEALTHY_S = 3
GUARD = {"samples": [{"context_ids": [5, 6, 7], "continuation_ids": [8, 9]}], "max_rise": 50.0}


@pytest.fixture(scope="module")
def strict_server(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    workdir = tmp_path_factory.mktemp("strict")
    (workdir / "guard.json").write_text(json.dumps(GUARD))
    env = {
        "LIVETRAIN_TRAINER_CALL_TIMEOUT_S": str(DEADLINE_S),
        "LIVETRAIN_TRAINER_MAX_RESTARTS": "1",
        "LIVETRAIN_TRAINER_HEALTHY_S": str(HEALTHY_S),
        "LIVETRAIN_SYNC_DELAY_S": "0",
        "LIVETRAIN_GUARD": str(workdir / "guard.json"),
        "LIVETRAIN_CPU_KERNELS": "plain",  # F.linear on the trained weights: no repack
        # a user's own worker extension beside livetrain's, called through vLLM's
        # development route /collective_rpc
        "VLLM_SERVER_DEV_MODE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    extension = ["--worker-extension-cls", "worker_probe.Probe"]
    yield from start_server(models["llama"], workdir, None, env=env, extra_args=extension)


@pytest.mark.server
def test_a_users_worker_extension_and_the_launch_settings_reach_the_worker(strict_server):
    """vLLM takes one worker extension: the user's own still answers, livetrain's
    methods work (the trainer attached through them), and the CPU kernels chosen at
    launch (plain: F.linear) reached the worker through vLLM's config."""
    reply = strict_server.http.post("/collective_rpc", json={"method": "probe_linear_kernels"})
    assert reply.raise_for_status().json() == {"results": [["linear"]]}
    assert strict_server.status()["trainer"]["apollo_tensors"] > 0
    step = strict_server.train(*sample(strict_server), lr=1e-4, retrain=True).raise_for_status()
    assert step.json()["repack"]["tensors"] == 0  # nothing packed to rebuild
    # the weight version is vLLM's own too (its development route shows it)
    version = strict_server.http.get("/weight_info").raise_for_status().json()
    assert version == {"weight_version": str(strict_server.status()["weight_version"])}


def wait_queue(client: LivetrainClient, **expected: object) -> dict:
    """Poll /train/status until its `queue` has `expected`; the status then."""
    deadline = time.monotonic() + 60
    while True:
        status = client.status()
        if status["queue"] == expected:
            return status
        assert time.monotonic() < deadline, status["queue"]
        time.sleep(0.02)


def killed_in_prepare(
    client: LivetrainClient, pid: int, context: list[int], continuation: list[int]
) -> httpx.Response:
    """A step whose trainer (`pid`) is SIGKILLed inside prepare; its reply."""
    os.kill(pid, signal.SIGSTOP)  # so that it dies inside prepare
    with ThreadPoolExecutor(1) as pool:
        step = pool.submit(client.train, context, continuation, lr=1e-3, retrain=True)
        wait_queue(client, operation="train", trainer_call="prepare", waiting=0)
        os.kill(pid, signal.SIGKILL)
        return step.result()


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
    label = frozenset({("model_name", strict_server.model)})
    assert strict_server.metrics()[("livetrain_trainer_restarts_total", label)] == after["restarts"]
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


def test_a_trainer_attaching_after_a_torn_write_restores_rather_than_refuses(models, tmp_path):
    """The server above kills its trainer at a deadline of 1 us, so whether the trainer
    wrote anything before it died is luck. Here the torn tensor is certain: the served
    weights (this process's, shared as vLLM's worker shares them) differ from the files
    at version 0. A trainer told to restore puts the file values back; one that is not
    told refuses to train on them."""
    files = load_file(models["llama"] / "model.safetensors")
    served = {name: tensor.clone() for name, tensor in files.items()}
    export = msg.WeightExport(
        params={name: export_tensor(t) for name, t in served.items()},
        map={
            name: msg.TensorView(name, 0, list(t.shape), list(t.stride()))
            for name, t in served.items()
        },
        dropped=[],
    )
    torn = "model.layers.0.mlp.down_proj.weight"
    served[torn][:2] += 1.0  # half a write: the first rows only

    def attach(restore: bool, state: str) -> None:
        request = attach_request(models["llama"], [export], tmp_path / state, restore)
        trainer, attached = Trainer.from_attach(request)
        trainer.finish_save()
        assert attached.weight_version == 1  # the restore is a write

    with pytest.raises(AttachError, match=f"{torn}: the served weights differ"):
        attach(restore=False, state="refused")
    attach(restore=True, state="restored")
    for name, tensor in files.items():
        assert torch.equal(served[name], tensor), name


@pytest.mark.server
def test_the_launch_guard_file_judges_every_step(strict_server):
    guard = strict_server.status()["guard"]
    assert guard["samples"] == 1 and guard["tokens"] == 2 and guard["max_rise"] == 50.0
    reply = strict_server.train(*sample(strict_server), lr=1e-3, retrain=True)
    assert reply.status_code == 200, reply.text
    judged = reply.json()["guard"]
    assert judged["before"] == pytest.approx(guard["loss"]) and judged["max_rise"] == 50.0
    score = {"context_ids": [5, 6, 7], "continuation_ids": [8, 9]}
    now = strict_server.http.post("/train/score", json=score).raise_for_status().json()["loss"]
    assert judged["after"] == pytest.approx(now, abs=1e-5)


def test_a_bad_guard_file_stops_the_server_naming_the_field(tmp_path):
    path = tmp_path / "guard.json"
    path.write_text(json.dumps({**GUARD, "max_rise": "0.1"}))
    with pytest.raises(RuntimeError, match=r"guard.json: max_rise: Input should be a valid"):
        load_guard(PluginConfig(guard=path), {})
    path.write_text("{not json")
    with pytest.raises(RuntimeError, match="guard.json"):
        load_guard(PluginConfig(guard=path), {})


@pytest.mark.server
def test_clients_that_hang_up_drop_their_queued_steps(strict_server):
    """50 clients send a step behind one that waits on a stopped trainer, and hang up:
    when the trainer goes on, only the first step is taken, and the server serves."""
    before = strict_server.wait_trainer()
    context, continuation = sample(strict_server)
    body = {"context_ids": context, "continuation_ids": continuation, "retrain": True}
    os.kill(before["trainer_pid"], signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(51) as pool:
            first = pool.submit(strict_server.http.post, "/train", json=body)
            wait_queue(strict_server, operation="train", trainer_call="prepare", waiting=0)

            def hang_up(_: int) -> str:
                url = str(strict_server.http.base_url.join("/train"))
                try:
                    httpx.post(url, json=body, timeout=1.0)
                except httpx.TimeoutException:
                    return "hung up"
                return "answered"

            assert set(pool.map(hang_up, range(50))) == {"hung up"}
            wait_queue(strict_server, operation="train", trainer_call="prepare", waiting=0)
            os.kill(before["trainer_pid"], signal.SIGCONT)
            assert first.result().status_code == 200, first.result().text
    finally:
        os.kill(before["trainer_pid"], signal.SIGCONT)
    # nothing runs and nothing waits: a queued step that was not dropped would show
    after = wait_queue(strict_server, operation=None, trainer_call=None, waiting=0)
    assert after["weight_version"] == before["weight_version"] + 1
    assert after["steps"] == before["steps"] + 1 and after["state"] == "idle"
    assert strict_server.complete("Once upon a time", max_tokens=4)["choices"][0]["text"]


@pytest.mark.server
def test_a_trainer_killed_during_a_step_before_its_write_changes_nothing(strict_server):
    context, continuation = sample(strict_server)
    original = strict_server.continuation_logprobs(context, continuation)
    before = strict_server.wait_trainer()
    time.sleep(HEALTHY_S + 0.5)  # this death is not part of a crash loop
    reply = killed_in_prepare(strict_server, before["trainer_pid"], context, continuation)
    assert reply.status_code == 503 and "exited" in reply.json()["error"]["message"], reply.text
    after = strict_server.wait_trainer()
    assert after["trainer_pid"] != before["trainer_pid"]
    assert after["weight_version"] == before["weight_version"]
    assert strict_server.continuation_logprobs(context, continuation) == original


@pytest.mark.server
def test_a_trainer_stopped_after_a_write_is_replaced_and_the_weights_stay(strict_server):
    context, continuation = sample(strict_server)
    strict_server.wait_trainer()
    reply = strict_server.train(context, continuation, lr=1e-3, retrain=True)
    assert reply.raise_for_status().json()["repack"]["tensors"] == 0  # plain kernels
    trained = strict_server.continuation_logprobs(context, continuation)
    body = {"context_ids": context, "continuation_ids": continuation}
    scored = strict_server.http.post("/train/score", json=body).raise_for_status().json()
    np.testing.assert_allclose(scored["token_logprobs"][0], trained, atol=LOGPROB_ATOL)
    before = strict_server.status()
    os.kill(before["trainer_pid"], signal.SIGSTOP)
    reply = strict_server.http.post("/checkpoint")
    assert reply.status_code == 503, reply.text
    assert f"did not answer checkpoint within {DEADLINE_S} s" in reply.json()["error"]["message"]
    after = strict_server.wait_trainer()
    assert after["trainer_pid"] != before["trainer_pid"]
    assert after["weight_version"] == before["weight_version"]
    assert strict_server.continuation_logprobs(context, continuation) == trained
    strict_server.http.post("/checkpoint").raise_for_status()  # the new trainer syncs them
    model = strict_server.workdir / "model"
    np.testing.assert_allclose(files_logprobs(model, context, continuation), trained, atol=1e-4)


@pytest.mark.server
def test_steps_and_syncs_sent_together_do_not_interleave(strict_server):
    """Each /train and /checkpoint pair runs one after the other (never both in the
    trainer at once); afterwards the files hold exactly the served weights."""
    context, continuation = sample(strict_server)
    strict_server.wait_trainer()
    version = strict_server.status()["weight_version"]
    body = {"context_ids": context, "continuation_ids": continuation, "retrain": True}
    barrier = threading.Barrier(2)

    def send(route: str, payload: dict | None) -> int:
        barrier.wait()
        return strict_server.http.post(route, json=payload).status_code

    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            pair = [pool.submit(send, "/train", body), pool.submit(send, "/checkpoint", None)]
            assert [job.result() for job in pair] == [200, 200]
    strict_server.http.post("/checkpoint").raise_for_status()
    status = strict_server.status()
    assert status["weight_version"] == version + 3
    assert status["last_sync"]["weight_version"] == version + 3
    served = strict_server.continuation_logprobs(context, continuation)
    on_disk = files_logprobs(strict_server.workdir / "model", context, continuation)
    np.testing.assert_allclose(on_disk, served, atol=LOGPROB_ATOL * 10)
