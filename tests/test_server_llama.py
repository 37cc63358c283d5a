"""End to end on a real vLLM server (Llama-style tiny model, --api-key set).

Tests in this module share one server and run in file order; each one states the
weight version it expects so a failure points at the step that went wrong.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import API_KEY

pytestmark = pytest.mark.server

CONTEXT = "The keeper of the lighthouse wrote in the log:"
CONTINUATION = " the lamp burned all night and every ship came home."
# vLLM (CPU kernels, fp32) against Hugging Face eager/SDPA on the same memory.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def sample(llama_server):
    return llama_server.tokenize(CONTEXT), llama_server.tokenize(CONTINUATION)


def score(client, context, continuation) -> list[float]:
    body = {"context_ids": context, "continuation_ids": continuation}
    reply = client.http.post("/train/score", json=body).raise_for_status().json()
    return reply["token_logprobs"][0]


def test_views_give_vllm_logprobs(llama_server, sample):
    served = llama_server.continuation_logprobs(*sample)
    np.testing.assert_allclose(score(llama_server, *sample), served, atol=LOGPROB_ATOL)


def test_training_raises_served_logprob_in_place(llama_server, sample):
    before = sum(llama_server.continuation_logprobs(*sample))
    versions = []
    for _ in range(4):
        reply = llama_server.train(*sample, lr=3e-3, retrain=True).raise_for_status().json()
        versions.append(reply["weight_version"])
        assert reply["tokens"] == len(sample[1]) and reply["elapsed_ms"] > 0
        # The very next completion already sees the new weights, exactly as trained.
        served = llama_server.continuation_logprobs(*sample)
        np.testing.assert_allclose(score(llama_server, *sample), served, atol=LOGPROB_ATOL)
    after = sum(served)
    assert versions == [1, 2, 3, 4]
    assert after > before + 5.0, (before, after)


def test_first_reply_loss_is_the_served_loss(llama_server, sample):
    served = llama_server.continuation_logprobs(*sample)
    reply = llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status().json()
    assert reply["loss"] == pytest.approx(-np.mean(served), abs=LOGPROB_ATOL)
    assert reply["weight_version"] == 5


def test_prefix_cache_never_serves_old_weights(llama_server, sample):
    # Same prompt twice warms the prefix cache; a step in between must invalidate it.
    first = llama_server.continuation_logprobs(*sample)
    assert llama_server.continuation_logprobs(*sample) == first
    llama_server.train(*sample, lr=3e-3, retrain=True).raise_for_status()
    again = llama_server.continuation_logprobs(*sample)
    np.testing.assert_allclose(again, score(llama_server, *sample), atol=LOGPROB_ATOL)
    assert sum(again) > sum(first)


def test_completions_succeed_while_training(llama_server, sample):
    failures, done = [], threading.Event()

    def generate() -> None:
        with httpx.Client(
            base_url=llama_server.http.base_url, headers=llama_server.http.headers, timeout=120
        ) as http:
            while not done.is_set():
                body = {
                    "model": llama_server.model,
                    "prompt": "Once upon a time",
                    "max_tokens": 24,
                    "temperature": 0,
                }
                reply = http.post("/v1/completions", json=body)
                if reply.status_code != 200 or not reply.json()["choices"][0]["text"]:
                    failures.append(reply.text)

    workers = [threading.Thread(target=generate) for _ in range(3)]
    for w in workers:
        w.start()
    before = llama_server.status()["weight_version"]
    for _ in range(3):
        llama_server.train(*sample, lr=1e-3, retrain=True).raise_for_status()
    done.set()
    for w in workers:
        w.join()
    assert not failures
    assert llama_server.status()["weight_version"] == before + 3


def test_concurrent_train_requests_queue(llama_server, sample):
    before = llama_server.status()
    replies: list[dict] = []

    def train() -> None:
        with httpx.Client(
            base_url=llama_server.http.base_url, headers=llama_server.http.headers, timeout=120
        ) as http:
            body = {
                "context_ids": sample[0],
                "continuation_ids": sample[1],
                "lr": 1e-4,
                "retrain": True,
            }
            replies.append(http.post("/train", json=body).raise_for_status().json())

    threads = [threading.Thread(target=train) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
    before = _state(llama_server, old)
    again = llama_server.train(*old, lr=1e-4)
    assert again.status_code == 409 and "retrain" in again.json()["error"]["message"]
    assert _state(llama_server, old) == before
    mixed = {"samples": [{"context_ids": c, "continuation_ids": t} for c, t in (old, new)]}
    reply = llama_server.http.post("/train", json={**mixed, "lr": 1e-4}).raise_for_status().json()
    assert reply["skipped_samples"] == 1 and reply["tokens"] == len(new[1])
    forced = llama_server.train(*old, lr=1e-4, retrain=True).raise_for_status().json()
    assert (
        forced["skipped_samples"] == 0 and forced["weight_version"] == reply["weight_version"] + 1
    )


def _state(client, sample):
    status = client.status()
    return (
        status["weight_version"],
        status["steps"],
        status["optimizer_state_bytes"],
        client.continuation_logprobs(*sample),
    )


BAD_BODIES = {
    "malformed JSON": (b'{"context_ids": [1, 2', 400, "body"),
    "not an object": (b"[1, 2, 3]", 422, None),
    "missing continuation": ({"context_ids": [1, 2]}, 422, None),
    "empty context": ({"context_ids": [], "continuation_ids": [1]}, 422, "context_ids"),
    "empty continuation": ({"context_ids": [1], "continuation_ids": []}, 422, "continuation_ids"),
    "float id": ({"context_ids": [1.5], "continuation_ids": [2]}, 422, "context_ids.0"),
    "string id": ({"context_ids": ["7"], "continuation_ids": [2]}, 422, "context_ids.0"),
    "negative id": ({"context_ids": [1], "continuation_ids": [-3]}, 422, "continuation_ids.0"),
    "id over vocab": ({"context_ids": [1], "continuation_ids": [10**6]}, 422, "continuation_ids"),
    "too long": ({"context_ids": [1] * 200, "continuation_ids": [2] * 100}, 422, None),
    "nan lr": (b'{"context_ids": [1], "continuation_ids": [2], "lr": NaN}', 422, "lr"),
    "infinite lr": (b'{"context_ids": [1], "continuation_ids": [2], "lr": Infinity}', 422, "lr"),
    "negative lr": ({"context_ids": [1], "continuation_ids": [2], "lr": -1e-3}, 422, "lr"),
    "rank zero": ({"context_ids": [1], "continuation_ids": [2], "rank": 0}, 422, "rank"),
    "unknown field": ({"context_ids": [1], "continuation_ids": [2], "lrr": 1}, 422, "lrr"),
    "both forms": ({"context_ids": [1], "continuation_ids": [2], "samples": []}, 422, None),
    "bad sample": (
        {"samples": [{"context_ids": [1], "continuation_ids": [2], "x": 1}]},
        422,
        "samples.0.x",
    ),
    "oversized body": (
        b'{"context_ids": [1], "continuation_ids": [2], "pad": "' + b"x" * (9 * 2**20) + b'"}',
        413,
        "body",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_is_refused_and_changes_nothing(llama_server, sample, case):
    body, status, field = BAD_BODIES[case]
    before = _state(llama_server, sample)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = llama_server.http.post("/train", **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    if field is not None:
        assert error["field"] == field, error
    assert error["message"]
    assert _state(llama_server, sample) == before


def test_overflowing_update_is_refused_and_changes_nothing(llama_server, sample):
    before = _state(llama_server, sample)
    reply = llama_server.train(*sample, lr=1e300, retrain=True)
    assert reply.status_code == 422, reply.text
    assert "weights unchanged" in reply.json()["error"]["message"]
    assert _state(llama_server, sample) == before
    assert llama_server.status()["state"] == "idle"


@pytest.mark.parametrize(
    "route",
    [
        ("POST", "/train"),
        ("POST", "/train/score"),
        ("GET", "/train/status"),
        ("POST", "/checkpoint"),
    ],
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_routes_demand_the_api_key(llama_server, sample, route, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"context_ids": sample[0], "continuation_ids": sample[1]}
    version = llama_server.status()["weight_version"]
    with httpx.Client(base_url=llama_server.http.base_url, timeout=60) as http:
        reply = http.request(
            route[0], route[1], headers=headers, json=body if route[0] == "POST" else None
        )
    assert reply.status_code == 401
    assert llama_server.status()["weight_version"] == version


def test_the_right_key_is_accepted(llama_server):
    with httpx.Client(base_url=llama_server.http.base_url, timeout=60) as http:
        reply = http.get("/train/status", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200 and reply.json()["state"] == "idle"


def test_state_files_are_private(llama_server):
    state_root = llama_server.workdir / "state"
    model_dirs = list(state_root.iterdir())
    assert stat.S_IMODE(state_root.stat().st_mode) == 0o700
    assert len(model_dirs) == 1 and stat.S_IMODE(model_dirs[0].stat().st_mode) == 0o700
    state_file = model_dirs[0] / "trainer_state.pt"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((llama_server.workdir / "run").stat().st_mode) == 0o700
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("torch_")]


def test_trainer_restart_keeps_state(llama_server, sample):
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
