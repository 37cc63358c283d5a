"""What every privileged route promises: the API key is demanded, bad input is refused
with a 4xx naming the field and changes nothing, and state files are private."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest
from conftest import API_KEY, served_state

from livetrain.api.http import RequestError, validate
from livetrain.api.requests import (
    CheckpointRequest,
    GuardRequest,
    ReadoutLoadRequest,
    ReadoutQuery,
    RollbackRequest,
    ScoreRequest,
    TrainRequest,
)
from livetrain.config import OptimizerSettings, PluginConfig

ONE = {"context_ids": [1], "continuation_ids": [2]}
BAD_BODIES = {
    "malformed JSON": (b'{"context_ids": [1, 2', 400, "body"),
    "nested too deeply": (
        b'{"context_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "body",
    ),
    "string rank": ({**ONE, "rank": "8"}, 422, "rank"),
    "string retrain": ({**ONE, "retrain": "yes"}, 422, "retrain"),
    "string lr": ({**ONE, "lr": "0.001"}, 422, "lr"),
    "rank over 2**64": ({**ONE, "rank": 2**70}, 422, "rank"),
    "lr over 1": ({**ONE, "lr": 1.5}, 422, "lr"),
    "weight decay over 1": ({**ONE, "weight_decay": 2.0}, 422, "weight_decay"),
    "too many samples": ({"samples": [ONE] * 257}, 422, None),
    "padded batch too large": (
        {"samples": [{"context_ids": [1] * 200, "continuation_ids": [2] * 50}] * 33},
        422,
        None,
    ),
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
    before = served_state(llama_server, sample)
    json_type = {"Content-Type": "application/json"}
    kwargs = {"content": body, "headers": json_type} if isinstance(body, bytes) else {"json": body}
    reply = llama_server.http.post("/train", **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    if field is not None:
        assert error["field"] == field, error
    assert error["message"]
    assert served_state(llama_server, sample) == before


@pytest.mark.parametrize(
    "route",
    [
        ("POST", "/train"),
        ("POST", "/train/score"),
        ("GET", "/train/status"),
        ("POST", "/checkpoint"),
        ("POST", "/train/rollback"),
        ("POST", "/train/guard"),
        ("DELETE", "/train/guard"),
    ],
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_routes_demand_the_api_key(llama_server, sample, route, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"context_ids": sample[0], "continuation_ids": sample[1]}
    before = llama_server.status()
    with httpx.Client(base_url=llama_server.http.base_url, timeout=60) as http:
        reply = http.request(
            route[0], route[1], headers=headers, json=body if route[0] == "POST" else None
        )
    assert reply.status_code == 401
    after = llama_server.status()
    assert (after["weight_version"], after["guard"]) == (before["weight_version"], before["guard"])


def test_the_right_key_is_accepted(llama_server):
    with httpx.Client(base_url=llama_server.http.base_url, timeout=60) as http:
        reply = http.get("/train/status", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200 and reply.json()["state"] == "idle"


def test_state_files_are_private(llama_server, sample):
    llama_server.train(*sample, lr=1e-4, retrain=True).raise_for_status()  # a state file
    body = {"context_ids": sample[0], "continuation_ids": sample[1]}
    llama_server.http.post("/train/score", json=body).raise_for_status()  # waits for its save
    state_root = llama_server.workdir / "state"
    model_dirs = list(state_root.iterdir())
    assert stat.S_IMODE(state_root.stat().st_mode) == 0o700
    assert len(model_dirs) == 1 and stat.S_IMODE(model_dirs[0].stat().st_mode) == 0o700
    state_file = model_dirs[0] / "trainer_state.pt"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((llama_server.workdir / "run").stat().st_mode) == 0o700
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("torch_")]


# ---- the request models alone (no server) ---------------------------------------------

# The tiny llama's, and the server's defaults, as the server passes them.
LIMITS = {
    "vocab_size": 1000,
    "max_model_len": 256,
    "max_samples": PluginConfig().max_samples,
    "max_batch_tokens": PluginConfig().max_batch_tokens,
    "undo_steps": 2,
}
BODY_CASES = [case for case, (_, status, _) in BAD_BODIES.items() if status == 422]


@pytest.mark.parametrize("kind", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_bodies_that_are_not_labelled_json_are_refused(llama_server, sample, kind):
    """A web page can POST text/plain or a form without a CORS preflight; JSON it cannot."""
    before = served_state(llama_server, sample)
    body = json.dumps({"context_ids": sample[0], "continuation_ids": sample[1]}).encode()
    headers = {"Content-Type": kind} if kind else {}
    reply = llama_server.http.post("/train", content=body, headers=headers)
    assert reply.status_code == 415 and reply.json()["error"]["field"] == "body", reply.text
    assert served_state(llama_server, sample) == before


@pytest.mark.parametrize("case", BODY_CASES)
def test_request_models_refuse_what_the_route_refuses(case):
    """The same bodies as the server test, through the request model the route uses."""
    body, status, field = BAD_BODIES[case]
    data = json.loads(body) if isinstance(body, bytes) else body
    with pytest.raises(RequestError) as refused:
        validate(TrainRequest, data, LIMITS)
    assert refused.value.status == status
    if field is not None:
        assert refused.value.field == field


def test_a_valid_body_gives_samples_and_typed_settings():
    body = {"samples": [{"context_ids": [1, 2], "continuation_ids": [3]}], "lr": 0.01}
    request = validate(TrainRequest, body, LIMITS)
    assert request.sample_list() == [([1, 2], [3])]
    assert request.settings() == OptimizerSettings(lr=0.01)
    inline = validate(ScoreRequest, {"context_ids": [1], "continuation_ids": [2]}, LIMITS)
    assert inline.sample_list() == [([1], [2])]


def test_limits_come_from_the_served_model():
    body = {"context_ids": [999], "continuation_ids": [1] * 100}
    validate(TrainRequest, body, LIMITS)
    with pytest.raises(RequestError, match="vocabulary size 999"):
        validate(TrainRequest, body, {**LIMITS, "vocab_size": 999})
    with pytest.raises(RequestError, match="over max_model_len 100"):
        validate(TrainRequest, body, {**LIMITS, "max_model_len": 100})


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (CheckpointRequest, {"force": True}, "force"),
        (RollbackRequest, {"steps": "1"}, "steps"),
        (RollbackRequest, {"steps": 0}, "steps"),
        (RollbackRequest, {"steps": 3}, "steps"),  # over the 2 kept (LIMITS)
        (GuardRequest, {"context_ids": [1], "continuation_ids": [2], "max_rise": -1}, "max_rise"),
        (GuardRequest, {"context_ids": [1], "continuation_ids": [2], "max_rise": "1"}, "max_rise"),
        (GuardRequest, {"max_rise": 0.1}, None),
        (ReadoutLoadRequest, {"path": ""}, "path"),
        (ReadoutLoadRequest, {}, "path"),
        (ReadoutQuery, {"choice": "-1"}, "choice"),
        (ReadoutQuery, {"rows": "perhaps"}, "rows"),
        (ReadoutQuery, {"choise": "1"}, "choise"),
    ],
)
def test_other_request_models_name_the_bad_field(model, data, field):
    with pytest.raises(RequestError) as refused:
        validate(model, data, LIMITS)
    assert refused.value.status == 422 and refused.value.field == field


def test_query_strings_are_parsed():
    query = validate(ReadoutQuery, {"choice": "2", "rows": "false"}, {})
    assert (query.choice, query.rows) == (2, False)
