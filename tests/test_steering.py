"""Steering inside vLLM: a request's `vllm_xargs` adds concept directions to the residual
stream at chosen blocks, for that request only.

On the shared readout server (compiled, as vLLM defaults to; chunked prefill forced by a
64-token step budget; prefix caching on), a steered completion must equal Hugging Face
with the same vector added by a forward hook, token for token and log-prob for log-prob;
unsteered requests in the same batch, and prefixes cached before or after, must be
untouched; bad steering is a 400 naming the field.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from livetrain.formats import readout_format
from tests.conftest import ReadoutServer, write_readout
from tests.steering_reference import HookedSteering, steer_vectors
from tests.test_live_readout import check_parity, tokenize

LOGPROB_ATOL = 1e-3  # fp32 end to end, compiled against eager; measured ~1e-5
# Over the 64-token step budget, so its prefill is chunked.
LONG = " ".join(["a lantern swung above the harbour wall while the boats came home"] * 7)


@pytest.fixture(scope="module")
def readout(readout_server: ReadoutServer) -> readout_format.Readout:
    return readout_format.load(readout_server.readout_dir)


def hf_greedy(readout_hf, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs, recomputing the whole sequence each step."""
    ids, logprobs = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            logits = readout_hf(torch.tensor([ids])).logits[0, -1].double()
            token = int(logits.argmax())
            logprobs.append(torch.log_softmax(logits, dim=0)[token].item())
            ids.append(token)
    return ids[len(prompt_ids) :], logprobs


def completion_body(readout_http, prompt: str, xargs: dict | None = None, **params) -> dict:
    body = {
        "model": readout_http.get("/v1/models").json()["data"][0]["id"],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 1,
        "return_token_ids": True,
        **params,
    }
    body["prompt"] = prompt
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def complete(
    readout_http, prompt: str, xargs: dict | None = None, route: str = "completions", **params
):
    body = completion_body(readout_http, prompt, xargs, **params)
    # json.dumps writes NaN and Infinity (as Python's json reads them); httpx's json= refuses
    headers = {"Content-Type": "application/json"}
    return readout_http.post(f"/v1/{route}", content=json.dumps(body), headers=headers)


def tokens_and_logprobs(completion: dict) -> tuple[list[int], list[float]]:
    choice = completion["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def assert_matches(completion: dict, want: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = tokens_and_logprobs(completion)
    assert tokens == want[0]
    assert logprobs == pytest.approx(want[1], abs=LOGPROB_ATOL)


SCALES = {"joyful": 6.0, "afraid": -4.0}


def test_steered_completion_equals_hugging_face_with_a_hook(readout_http, readout_hf, readout):
    """Prompt and generated tokens steered at both blocks, the prompt prefilled in
    chunks; the readout's rows of the steered request read the steered stream too."""
    xargs = {"steer": SCALES, "steer_layers": [0, 1], "readout": True, "readout_prompt": True}
    steered = complete(readout_http, LONG, xargs).raise_for_status().json()
    ids = tokenize(readout_http, LONG)
    with HookedSteering(readout_hf, steer_vectors(readout, SCALES, [0, 1])):
        want = hf_greedy(readout_hf, ids, 8)
        check_parity(readout_http, readout_hf, readout, steered, ids, prompt_rows=True)
    assert_matches(steered, want)
    plain = complete(readout_http, LONG).raise_for_status().json()
    assert tokens_and_logprobs(plain) != tokens_and_logprobs(steered)  # it did steer
    assert_matches(plain, hf_greedy(readout_hf, ids, 8))
    worker = readout_http.get("/readout").json()["worker"]
    assert worker["steered_steps"] > 0 and worker["steered_requests"] == 0


def test_generated_only_steering_reads_the_prompt_unsteered(readout_http, readout_hf, readout):
    """steer_prompt false: rows before the prompt's last token are not steered (at block 0,
    so steered prompt rows would change the KV block 1 attends to)."""
    prompt = "The kettle sang on the stove and the window fogged over."
    xargs = {"steer": {"calm": 8.0}, "steer_layers": [0], "steer_prompt": False}
    steered = complete(readout_http, prompt, xargs).raise_for_status().json()
    ids = tokenize(readout_http, prompt)
    with HookedSteering(readout_hf, steer_vectors(readout, {"calm": 8.0}, [0]), start=len(ids) - 1):
        assert_matches(steered, hf_greedy(readout_hf, ids, 8))
    whole = (
        complete(readout_http, prompt, {**xargs, "steer_prompt": True}).raise_for_status().json()
    )
    with HookedSteering(readout_hf, steer_vectors(readout, {"calm": 8.0}, [0])):
        assert_matches(whole, hf_greedy(readout_hf, ids, 8))
    assert tokens_and_logprobs(whole) != tokens_and_logprobs(steered)


def test_steered_and_unsteered_never_share_cached_prefixes(readout_http, readout_hf, readout):
    """The same long prompt plain, steered, plain again and steered again: were a steered
    request to read the plain prefix's KV (or the reverse), its block-1 attention would
    see the other stream, and it would no longer match its Hugging Face reference."""
    prompt = LONG + " and the night was"
    ids = tokenize(readout_http, prompt)
    xargs = {"steer": {"joyful": 5.0}, "steer_layers": [0]}
    plain_want = hf_greedy(readout_hf, ids, 6)
    with HookedSteering(readout_hf, steer_vectors(readout, {"joyful": 5.0}, [0])):
        steered_want = hf_greedy(readout_hf, ids, 6)
    assert plain_want != steered_want
    for _round in range(2):
        assert_matches(
            complete(readout_http, prompt, max_tokens=6).raise_for_status().json(), plain_want
        )
        steered = complete(readout_http, prompt, xargs, max_tokens=6).raise_for_status().json()
        assert_matches(steered, steered_want)


def test_only_the_steered_request_in_a_batch_is_steered(readout_http, readout_hf, readout):
    prompts = [f"{LONG[: 40 + 13 * k]} number {k}" for k in range(6)]
    xargs = {"steer": {"afraid": 7.0}, "steer_layers": [0, 1]}

    def run(k: int) -> dict:
        response = complete(readout_http, prompts[k], xargs if k == 2 else None, max_tokens=6)
        return response.raise_for_status().json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(run, range(len(prompts))))
    for k, completion in enumerate(results):
        ids = tokenize(readout_http, prompts[k])
        if k == 2:
            with HookedSteering(readout_hf, steer_vectors(readout, {"afraid": 7.0}, [0, 1])):
                assert_matches(completion, hf_greedy(readout_hf, ids, 6))
        else:
            assert_matches(completion, hf_greedy(readout_hf, ids, 6))


def test_chat_completions_steer_too(readout_http, readout_hf, readout):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True}
    xargs = {"steer": {"joyful": 6.0}, "steer_layers": [1]}
    model = readout_http.get("/v1/models").json()["data"][0]["id"]

    def chat(extra: dict) -> list[int]:
        response = readout_http.post("/v1/chat/completions", json={"model": model, **body, **extra})
        content = response.raise_for_status().json()["choices"][0]["logprobs"]["content"]
        return [item["logprob"] for item in content]

    assert chat({"vllm_xargs": xargs}) != chat({})


@pytest.mark.parametrize(
    ("xargs", "field", "words"),
    [
        (
            {"steer": {"joyfull": 1.0}, "steer_layers": [0]},
            "vllm_xargs.steer",
            "did you mean joyful",
        ),
        ({"steer": {"joyful": 1e6}, "steer_layers": [0]}, "vllm_xargs.steer", "within ±50"),
        ({"steer": {"joyful": math.nan}, "steer_layers": [0]}, "vllm_xargs.steer", "not finite"),
        ({"steer": {"joyful": math.inf}, "steer_layers": [0]}, "vllm_xargs.steer", "not finite"),
        ({"steer": {"joyful": True}, "steer_layers": [0]}, "vllm_xargs.steer.joyful", ""),
        ({"steer": {"joyful": "2"}, "steer_layers": [0]}, "vllm_xargs.steer.joyful", ""),
        ({"steer": {}, "steer_layers": [0]}, "vllm_xargs.steer", ""),
        ({"steer": "joyful", "steer_layers": [0]}, "vllm_xargs.steer", ""),
        ({"steer": {"joyful": 1.0}}, "vllm_xargs.steer_layers", "required"),
        ({"steer": {"joyful": 1.0}, "steer_layers": [5]}, "vllm_xargs.steer_layers", "[5]"),
        ({"steer": {"joyful": 1.0}, "steer_layers": []}, "vllm_xargs.steer_layers", ""),
        (
            {"steer": {"joyful": 1.0}, "steer_layers": [0], "steer_prompt": 2},
            "vllm_xargs.steer_prompt",
            "",
        ),
        ({"steer_layers": [0]}, "vllm_xargs.steer", "required"),
    ],
)
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_bad_steering_is_a_400_naming_the_field(readout_http, xargs, field, words, route):
    extra = {"messages": [{"role": "user", "content": "hi"}]} if route != "completions" else {}
    response = complete(readout_http, "hi", xargs, route=route, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"].startswith(field) and words in error["message"], error


def test_steering_needs_a_readout_with_directions(readout_server, readout_http, tmp_path):
    old = write_readout(tmp_path / "detectors-only", readout_server.concepts, [0, 1], 128, seed=4)
    readout = readout_format.load(old)
    readout.directions, readout.units = {}, {}
    readout_format.save(old, readout)
    loaded = readout_http.post("/readout/load", json={"path": str(old)}).raise_for_status().json()
    try:
        assert loaded["steerable"] is False
        response = complete(readout_http, "hi", {"steer": {"joyful": 1.0}, "steer_layers": [0]})
        assert response.status_code == 400
        assert "no concept directions" in response.json()["error"]["message"]
    finally:
        readout_http.post(
            "/readout/load", json={"path": str(readout_server.readout_dir)}
        ).raise_for_status()
    assert readout_http.get("/readout").json()["steerable"] is True


def test_a_body_that_only_mentions_steering_passes_untouched(readout_http):
    """The middleware reads bodies that contain the word; only vllm_xargs keys count."""
    response = complete(
        readout_http, "steer the boat to the steering wall", {"readout": True}, max_tokens=2
    )
    assert response.status_code == 200, response.text


def test_streamed_steering_equals_the_whole_reply(readout_http):
    """`stream: true` goes through the same rewrite: the streamed text is the steered one."""
    xargs = {"steer": SCALES, "steer_layers": [0, 1]}
    whole = complete(readout_http, LONG, xargs).raise_for_status().json()["choices"][0]["text"]
    plain = complete(readout_http, LONG).raise_for_status().json()["choices"][0]["text"]
    assert whole != plain
    body = completion_body(readout_http, LONG, xargs, stream=True)
    with readout_http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == whole


def test_steering_without_the_api_key_is_refused_before_it_is_read(readout_server):
    """vLLM's key check runs first: an outsider learns nothing about concepts or layers."""
    body = {"model": "x", "prompt": "hi", "vllm_xargs": {"steer": {"nope": 1e9}}}
    response = httpx.post(f"{readout_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 401, response.text
    assert "nope" not in response.text
