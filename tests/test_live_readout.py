"""Live readout: the shared-memory score ring across real processes, and the readout in a
real vLLM server (parity with Hugging Face, batching, streaming, swapping, bad input, auth,
bounded memory).

Every server score's reference is computed independently: the Hugging Face model run on
prompt + generated tokens, the output of each decoder block taken with a forward hook
(HF's own hidden_states[-1] is after the final norm), projected onto the readout's
vectors in float64."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from livetrain.api.readout_store import ReadoutStore, client_choice
from livetrain.formats import readout_format
from livetrain.formats.messages import ScoreRecord
from livetrain.formats.score_ring import HEADER_BYTES, RingError, ScoreRing
from livetrain.worker.readout_tap import _project
from tests.conftest import write_readout


def record(k: int) -> bytes:
    # Lengths that are not multiples of 8 exercise the padding.
    return struct.pack("<I", k) * (1 + k % 7) + bytes([k % 251]) * (k % 5)


def produce(path: str, count: int) -> None:
    ring = ScoreRing.open(Path(path))
    k = 0
    while k < count:
        if ring.put(record(k)):
            k += 1


def test_records_cross_processes_in_order(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 1024)  # small: wraps hundreds of times
    count = 5000
    child = multiprocessing.get_context("spawn").Process(
        target=produce, args=(str(ring.path), count)
    )
    child.start()
    received: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(received) < count and time.monotonic() < deadline:
        received += ring.drain()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert received == [record(k) for k in range(count)]


def test_full_ring_refuses_and_counts(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 64)
    assert ring.put(bytes(24))  # 8 + 24 = 32 bytes
    assert ring.put(bytes(20))  # 8 + 20 -> 32 bytes: full
    assert not ring.put(b"x")
    assert not ring.put(bytes(100))  # larger than the ring
    assert ring.dropped == 2
    assert ring.drain() == [bytes(24), bytes(20)]
    assert ring.put(bytes(50))  # wraps around the end
    assert ring.drain() == [bytes(50)]
    assert ring.drain() == []


def test_record_split_across_the_end_is_reassembled(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 64)
    assert ring.put(bytes(40)) and ring.drain() == [bytes(40)]  # write position 48
    payload = bytes(range(48))
    assert ring.put(payload)  # 8 bytes of length at 48, 8 + 40 bytes across the end
    assert ring.drain() == [payload]


def test_ring_file_is_private_and_checked(tmp_path):
    ring = ScoreRing.create(tmp_path / "ring", 100)
    assert ring.capacity == 104  # rounded up to 8 bytes
    assert stat.S_IMODE(os.stat(ring.path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        ScoreRing.create(ring.path, 100)
    (tmp_path / "other").write_bytes(bytes(HEADER_BYTES + 8))
    with pytest.raises(RingError, match="not a livetrain score ring"):
        ScoreRing.open(tmp_path / "other")
    with pytest.raises(RingError, match="cannot open"):
        ScoreRing.open(tmp_path / "missing")
    other_end = ScoreRing.open(ring.path)
    ring.unlink()
    assert not ring.path.exists()
    assert other_end.put(b"still mapped") and ring.drain() == [b"still mapped"]


def test_allocation_failure_is_clear_and_leaves_nothing(tmp_path):
    """A ring that cannot be allocated (a full /dev/shm in a container, say) fails with
    the size and the reason, and leaves no partial file."""
    script = f"""
import resource, signal
from pathlib import Path
from livetrain.formats.score_ring import RingError, ScoreRing
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    ScoreRing.create(Path({str(tmp_path / "ring")!r}), 8 << 20)
except RingError as e:
    print(e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cannot allocate a 8 MiB score ring" in result.stdout
    assert not (tmp_path / "ring").exists()


def test_launch_refuses_a_ring_too_small_to_hold_a_step(monkeypatch, tmp_path):
    from livetrain.api.readout_launch import launch_blocks
    from livetrain.config import PluginConfig
    from livetrain.formats.readout_format import ReadoutError
    from tests.conftest import write_readout

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "")  # undone after the test
    readout = write_readout(tmp_path / "r", ["a"], [0], 8, 0)
    config = PluginConfig(readout=readout, readout_layers=(0,), readout_ring_bytes=100)
    with pytest.raises(ReadoutError, match="LIVETRAIN_READOUT_RING_BYTES must be at least"):
        launch_blocks(config)
    assert launch_blocks(PluginConfig(readout=readout)) == [0]
    assert launch_blocks(PluginConfig()) == []


ATOL = 1e-4  # fp32 end to end; measured differences are ~1e-6


def block_outputs(readout_hf, ids: list[int]) -> dict[int, torch.Tensor]:
    """Output of every decoder block at every position, float64."""
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_hook(
            lambda _m, _a, out, i=i: outputs.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out)[0].double()
            )
        )
        for i, block in enumerate(readout_hf.model.layers)
    ]
    with torch.no_grad():
        readout_hf(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return outputs


def complete(
    readout_http: httpx.Client, prompt, readout: bool = True, prompt_rows: bool = False, **params
) -> dict:
    body = {
        "model": readout_http.get("/v1/models").json()["data"][0]["id"],
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "return_token_ids": True,
        **params,
    }
    if readout:
        body["vllm_xargs"] = {"readout": True, **({"readout_prompt": True} if prompt_rows else {})}
    return readout_http.post("/v1/completions", json=body).raise_for_status().json()


def _assert_row(row: dict, expected: dict[int, torch.Tensor], cal) -> None:
    """One row's scores against the reference projections {layer: [concepts]}, and its
    z against the calibration a single token is judged by."""
    for layer, want in expected.items():
        got = torch.tensor(row["scores"][str(layer)], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        if cal is None:  # raw projections only
            assert "z" not in row
            continue
        z = (want - torch.tensor(cal.mean[layer]).double()) / torch.tensor(cal.std[layer]).double()
        torch.testing.assert_close(
            torch.tensor(row["z"][str(layer)]).double(), z, atol=ATOL * 10, rtol=1e-5
        )


def check_parity(
    readout_http,
    readout_hf,
    readout: readout_format.Readout,
    completion: dict,
    prompt_ids: list[int],
    choice: int = 0,
    prompt_rows: bool = False,
) -> dict:
    """Every row of a completion's readout against Hugging Face; returns the readout."""
    got = (
        readout_http.get(f"/readout/{completion['id']}", params={"choice": choice})
        .raise_for_status()
        .json()
    )
    assert got["concepts"] == readout.concepts and got["layers"] == readout.layers
    generated = [t["token_id"] for t in got["tokens"]]
    assert [t["index"] for t in got["tokens"]] == list(range(len(generated)))
    # the tokens vLLM returned for this choice (a piece's text alone can be half a character)
    returned = next(c for c in completion["choices"] if c["index"] == choice)
    assert generated == returned["token_ids"]
    blocks = block_outputs(readout_hf, prompt_ids + generated[:-1])
    project = lambda position: {  # noqa: E731
        layer: blocks[layer][position] @ readout.detectors[layer].double().T
        for layer in readout.layers
    }
    token_cal = readout.token_calibration or readout.calibration
    for k, token in enumerate(got["tokens"]):
        _assert_row(token, project(len(prompt_ids) - 1 + k), token_cal)  # the row producing k
    if not prompt_rows:
        assert "prompt_tokens" not in got
        return got
    # one row per prompt token, in order: the block outputs at that token
    assert [t["index"] for t in got["prompt_tokens"]] == list(range(len(prompt_ids)))
    assert [t["token_id"] for t in got["prompt_tokens"]] == prompt_ids
    for position, row in enumerate(got["prompt_tokens"]):
        _assert_row(row, project(position), token_cal)
    # the whole text, read as the directions were trained
    read = readout.read_position
    if read["pooling"] == "last":
        positions = [len(prompt_ids) + len(generated) - 2]
    else:
        positions = list(range(read["start"], len(prompt_ids) + len(generated) - 1))
    mean = {
        layer: torch.stack([project(p)[layer] for p in positions]).mean(dim=0)
        for layer in readout.layers
    }
    assert got["summary"]["rows"] == len(positions)
    _assert_row(got["summary"], mean, readout.calibration)
    return got


def tokenize(readout_http, text: str) -> list[int]:
    return readout_http.post("/tokenize", json={"prompt": text}).raise_for_status().json()["tokens"]


def test_readout_and_training_metrics_in_multiprocess_mode(readout_server, readout_http):
    """With PROMETHEUS_MULTIPROC_DIR (vLLM then reads every process's metric files),
    livetrain's counters and gauges are in /metrics all the same: records collected
    move with a readout completion, none dropped; a refused step is counted; the
    gauges are the status's. (No step is applied: the other tests here compare the
    served model with the files.)"""
    client = readout_server.client
    label = ("model_name", client.model)

    def value(scraped: dict, name: str, **labels: str) -> float:
        return scraped.get((name, frozenset({label, *labels.items()})), 0.0)

    before = client.metrics()
    completion = complete(readout_http, "The lighthouse keeper", max_tokens=6)
    rows = readout_http.get(f"/readout/{completion['id']}").raise_for_status().json()["tokens"]
    assert client.train(client.tokenize("A gull"), [10**9]).status_code == 422
    after = client.metrics()
    status = client.status()
    collected = value(after, "livetrain_readout_records_total") - value(
        before, "livetrain_readout_records_total"
    )
    assert collected >= len(rows) == 6  # a record per engine step, a row per token
    for reason in ("ring_full", "malformed"):
        assert value(after, "livetrain_readout_dropped_records_total", reason=reason) == 0
    refused = "livetrain_refused_steps_total"
    invalid = {"reason": "invalid_request"}
    assert value(after, refused, **invalid) - value(before, refused, **invalid) == 1
    assert value(after, "livetrain_weight_version") == status["weight_version"]
    assert value(after, "livetrain_optimizer_steps") == status["steps"]
    assert value(after, "livetrain_trainer_state", state="idle") == 1
    assert list((readout_server.workdir / "prometheus").glob("gauge_mostrecent_*.db"))


def test_scores_match_hugging_face(readout_server, readout_http, readout_hf):
    readout = readout_format.load(readout_server.readout_dir)
    prompt = "The lamp flickered twice and the room went quiet."
    before = readout_http.get("/readout").json()["worker"]
    completion = complete(readout_http, prompt, max_tokens=10)
    check_parity(readout_http, readout_hf, readout, completion, tokenize(readout_http, prompt))
    after = readout_http.get("/readout").json()["worker"]
    assert after["steps"] >= before["steps"] + 10  # one message per generated token here
    assert after["dropped"] == 0


def test_concurrent_requests_each_get_their_own_rows(readout_server, readout_http, readout_hf):
    """Continuous batching with chunked prefill (prompts longer than the 64-token step
    budget), n=2, requests without readout mixed in, then a second wave that hits the
    prefix cache: every row must belong to its own request."""
    readout = readout_format.load(readout_server.readout_dir)
    words = [
        "river",
        "stone",
        "lantern",
        "window",
        "quiet",
        "morning",
        "bread",
        "letter",
        "garden",
        "engine",
    ]
    prompts = [" ".join(words[(k + j) % len(words)] for j in range(3 + 11 * k)) for k in range(8)]

    def run(k: int) -> tuple[dict, dict]:
        params = {"max_tokens": 4 + k % 5}
        if k == 3:
            params |= {"n": 2, "temperature": 1.0, "seed": None}
        read = complete(readout_http, prompts[k], **params)
        return read, complete(readout_http, prompts[k], readout=False, max_tokens=3)

    for _wave in range(2):  # the second wave reuses the first wave's cached prefixes
        with ThreadPoolExecutor(len(prompts)) as pool:
            done = [f.result() for f in [pool.submit(run, k) for k in range(len(prompts))]]
        results = {k: read for k, (read, _) in enumerate(done)}
        plain = {k: unread for k, (_, unread) in enumerate(done)}
        for k, completion in results.items():
            for choice in range(len(completion["choices"])):
                check_parity(
                    readout_http,
                    readout_hf,
                    readout,
                    completion,
                    tokenize(readout_http, prompts[k]),
                    choice,
                )
        for completion in plain.values():
            assert readout_http.get(f"/readout/{completion['id']}").status_code == 404


LONG_PROMPT = " ".join(["the tide came in over the flats while the gulls argued"] * 7)


def test_prompt_rows_match_hugging_face_chunked_and_cached(
    readout_server, readout_http, readout_hf, tmp_path
):
    """readout_prompt adds one row per prompt token. The prompt (> 64 tokens) is
    prefilled in chunks; asked again, its prefix is in vLLM's cache, and the rows must
    still all be there (such requests do not read the prefix cache)."""
    prompt_ids = tokenize(readout_http, LONG_PROMPT)
    assert len(prompt_ids) > 64  # the step budget: several prefill chunks
    readout = readout_format.load(readout_server.readout_dir)
    for _ in range(2):  # the second time, the prefix is cached
        completion = complete(readout_http, LONG_PROMPT, prompt_rows=True, max_tokens=5)
        check_parity(readout_http, readout_hf, readout, completion, prompt_ids, prompt_rows=True)
    # a readout trained on the mean from token 4: its summary is that mean
    pooled = write_readout(
        tmp_path / "pooled",
        readout.concepts[:7],
        [0, 1],
        128,
        seed=5,
        read_position={"pooling": "mean", "start": 4},
    )
    readout_http.post("/readout/load", json={"path": str(pooled)}).raise_for_status()
    try:
        completion = complete(readout_http, LONG_PROMPT, prompt_rows=True, max_tokens=3)
        got = check_parity(
            readout_http,
            readout_hf,
            readout_format.load(pooled),
            completion,
            prompt_ids,
            prompt_rows=True,
        )
        assert got["summary"]["rows"] == len(prompt_ids) - 4 + 2
        # rows=false: the same summary, no rows
        brief = readout_http.get(f"/readout/{completion['id']}", params={"rows": "false"}).json()
        assert brief["summary"] == got["summary"]
        assert "tokens" not in brief and "prompt_tokens" not in brief
    finally:
        readout_http.post(
            "/readout/load", json={"path": str(readout_server.readout_dir)}
        ).raise_for_status()


def test_several_prompts_with_several_choices(readout_server, readout_http, readout_hf):
    """Choice k of a multi-prompt completion is prompt k // n, sample k % n."""
    readout = readout_format.load(readout_server.readout_dir)
    prompts = ["The ferry left late", "Snow had covered the tracks by noon and"]
    completion = complete(readout_http, prompts, n=2, temperature=1.0, max_tokens=5)
    assert len(completion["choices"]) == 4
    for choice in range(4):
        check_parity(
            readout_http,
            readout_hf,
            readout,
            completion,
            tokenize(readout_http, prompts[choice // 2]),
            choice,
        )


def test_stream_delivers_every_token_while_generating(readout_server, readout_http):
    model = readout_http.get("/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "vllm_xargs": {"readout": True, "readout_prompt": True},
    }
    events: list[tuple[str, dict]] = []
    with readout_http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        completion_id = json.loads(first[6:])["id"]
        with readout_http.stream("GET", f"/readout/{completion_id}/stream") as sse:
            assert sse.headers["content-type"].startswith("text/event-stream")
            event = "message"
            for line in sse.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[6:])))
                    event = "message"
        for _ in lines:
            pass
    kinds = [kind for kind, _ in events]
    stored = readout_http.get(f"/readout/{completion_id}").json()
    n_prompt = len(tokenize(readout_http, "Once upon a time"))
    # meta, the prompt's rows, the generated ones, the whole-text summary, done
    assert kinds == ["meta"] + ["prompt"] * n_prompt + ["message"] * 12 + ["summary", "done"]
    assert [data for kind, data in events if kind == "prompt"] == stored["prompt_tokens"]
    assert [data for kind, data in events if kind == "message"] == stored["tokens"]
    assert events[-2][1] == stored["summary"]


def test_chat_completions_are_read_out(readout_server, readout_http):
    model = readout_http.get("/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6,
        "temperature": 0,
        "vllm_xargs": {"readout": True},
    }
    chat = readout_http.post("/v1/chat/completions", json=body).raise_for_status().json()
    got = readout_http.get(f"/readout/{chat['id']}").raise_for_status().json()
    assert len(got["tokens"]) == chat["usage"]["completion_tokens"]
    assert "".join(t["text"] for t in got["tokens"]) == chat["choices"][0]["message"]["content"]


def test_swap_readout_and_refuse_bad_ones(readout_server, readout_http, readout_hf, tmp_path):
    original = readout_format.load(readout_server.readout_dir)
    prompt = "A gull landed on the rail."
    bad = {
        "missing": tmp_path / "nothing-here",
        "bad-json": write_readout(tmp_path / "bad-json", ["a", "b"], [1], 128, seed=1),
        "wrong-hidden": write_readout(tmp_path / "wrong-hidden", ["a", "b"], [1], 64, seed=1),
    }
    (bad["bad-json"] / readout_format.MANIFEST_FILE).write_text("{")
    for name, folder in bad.items():
        response = readout_http.post("/readout/load", json={"path": str(folder)})
        assert response.status_code == 422, name
        assert response.json()["error"]["field"] == "path", name
    uncaptured = write_readout(tmp_path / "layer-5", ["a"], [5], 128, seed=2)
    response = readout_http.post("/readout/load", json={"path": str(uncaptured)})
    assert response.status_code == 422 and "not captured" in response.json()["error"]["message"]
    for body in ({}, {"path": ""}, {"path": "x", "extra": 1}, {"path": 3}):
        response = readout_http.post("/readout/load", json=body)
        assert response.status_code == 422 and response.json()["error"]["field"], body
    # nothing changed: the launch readout still answers, and still scores correctly
    assert readout_http.get("/readout").json()["path"] == str(readout_server.readout_dir)
    check_parity(
        readout_http,
        readout_hf,
        original,
        complete(readout_http, prompt),
        tokenize(readout_http, prompt),
    )

    # a readout without calibration: scores stay raw projections, no z
    swapped = write_readout(
        tmp_path / "second", ["x", "y", "z"], [1], 128, seed=3, calibrated=False
    )
    loaded = (
        readout_http.post("/readout/load", json={"path": str(swapped)}).raise_for_status().json()
    )
    assert loaded["concepts"] == ["x", "y", "z"] and loaded["layers"] == [1]
    assert loaded["calibrated"] is False
    try:
        check_parity(
            readout_http,
            readout_hf,
            readout_format.load(swapped),
            complete(readout_http, prompt),
            tokenize(readout_http, prompt),
        )
    finally:
        readout_http.post(
            "/readout/load", json={"path": str(readout_server.readout_dir)}
        ).raise_for_status()


def test_loading_is_confined_bounded_and_pruned(
    readout_server, readout_http, tmp_path, tmp_path_factory
):
    """Only folders under the allowed roots, only tensors up to the size limit (checked
    before any is read), and readouts no row uses any more are dropped."""
    outside = Path(tempfile.mkdtemp(prefix="livetrain-outside-"))
    try:
        write_readout(outside / "r", ["a"], [1], 128, seed=4)
        refused = readout_http.post("/readout/load", json={"path": str(outside / "r")})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "path"
        assert "not under an allowed readout root" in refused.json()["error"]["message"]
        sneaky = tmp_path / "link"  # inside a root, pointing outside: resolved first
        sneaky.symlink_to(outside / "r")
        assert readout_http.post("/readout/load", json={"path": str(sneaky)}).status_code == 422
    finally:
        shutil.rmtree(outside)
    concepts = [f"c{k}" for k in range(1100)]  # 1100 x 128 x 2 x 4 bytes > 1 MiB
    big = write_readout(tmp_path / "big", concepts, [0, 1], 128, seed=5)
    too_big = readout_http.post("/readout/load", json={"path": str(big)})
    assert too_big.status_code == 422 and "over the limit of 1048576" in too_big.text
    assert readout_http.get("/readout").json()["path"] == str(readout_server.readout_dir)

    before = readout_http.get("/readout").json()
    for k in range(3):  # nothing is generated with these: each is dropped by the next
        folder = write_readout(tmp_path / f"v{k}", ["p", "q"], [1], 128, seed=10 + k)
        readout_http.post("/readout/load", json={"path": str(folder)}).raise_for_status()
    after = readout_http.get("/readout").json()
    assert after["version"] == before["version"] + 3
    assert after["version"] in after["versions_kept"]
    assert not {before["version"] + 1, before["version"] + 2} & set(after["versions_kept"])
    readout_http.post(
        "/readout/load", json={"path": str(readout_server.readout_dir)}
    ).raise_for_status()


def test_every_readout_route_needs_the_key_but_the_page(readout_server):
    anonymous = httpx.Client(base_url=readout_server.url, timeout=30)
    assert anonymous.get("/readout").status_code == 401
    assert anonymous.get("/readout/cmpl-x").status_code == 401
    assert anonymous.get("/readout/cmpl-x/stream").status_code == 401
    assert anonymous.post("/readout/load", json={"path": "/"}).status_code == 401
    page = anonymous.get("/readout/ui")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_unknown_ids_and_bad_queries(readout_http):
    assert readout_http.get("/readout/cmpl-doesnotexist").status_code == 404
    response = readout_http.get("/readout/cmpl-x", params={"choice": -1})
    assert response.status_code == 422 and response.json()["error"]["field"] == "choice"


def test_memory_is_bounded(readout_server, readout_http):
    """The server keeps at most 40 requests' scores (LIVETRAIN_READOUT_MAX_REQUESTS)."""
    first = complete(readout_http, "first of many", max_tokens=1)
    assert readout_http.get(f"/readout/{first['id']}").status_code == 200
    for k in range(41):
        complete(readout_http, f"filler {k}", max_tokens=1)
    assert readout_http.get(f"/readout/{first['id']}").status_code == 404


def test_score_ring_leaves_nothing_behind(readout_server, readout_http):
    """The API server unlinks the ring file once every worker has it mapped (a crash
    leaves nothing in /dev/shm), and records still flow afterwards."""
    state = str(readout_server.workdir / "state")
    mapped = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            entries = (proc / "environ").read_bytes().split(b"\0")
            maps = (proc / "maps").read_text()
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)
        if env.get("LIVETRAIN_STATE_DIR") == state:
            mapped |= {
                line.split(None, 5)[5] for line in maps.splitlines() if "livetrain-readout-" in line
            }
    assert len(mapped) == 1, mapped  # one ring, mapped by the API server and the worker
    (ring,) = mapped
    assert ring.endswith(" (deleted)") and not Path(ring.removesuffix(" (deleted)")).parent.exists()
    completion = complete(readout_http, "After the rain", max_tokens=3)
    assert len(readout_http.get(f"/readout/{completion['id']}").json()["tokens"]) == 3


def test_store_expires_idle_requests():
    store = ReadoutStore(ttl_s=0.05, max_requests=10)
    record = ScoreRecord(
        version=0,
        req_ids=["cmpl-abc-0-0123abcd"],
        index=[0],
        n=[1],
        prompt=[False],
        token_ids=[5],
        shape=(1, 1, 2),
        scores=bytes(8),
    )
    store.add(record)
    assert "cmpl-abc" in store.requests
    time.sleep(0.1)
    store.expire()
    assert not store.requests


@pytest.mark.parametrize(
    ("internal", "n", "expected"),
    [
        ("cmpl-99ce57acec5b3963-0-a085133b", 1, ("cmpl-99ce57acec5b3963", 0)),
        ("1_cmpl-9b83f43086e982ad-1-a6872d17", 2, ("cmpl-9b83f43086e982ad", 3)),
        ("cmpl-my_id-0-a3802167", 1, ("cmpl-my_id", 0)),
        ("1_chatcmpl-a7134d7d70cbc1c0-a7d8bbc3", 2, ("chatcmpl-a7134d7d70cbc1c0", 1)),
        ("not an engine id", 1, None),
    ],
)
def test_engine_ids_map_to_client_ids(internal, n, expected):
    # Shapes observed on vLLM 0.32: [{child}_]{cmpl-X-{prompt} | chatcmpl-X}-{8 hex}
    assert client_choice(internal, n) == expected


def failed_launch_log(model, tmp_path, env: dict[str, str]) -> str:
    """Start a server that must exit before serving; its log."""
    from livetrain.tools.launch import Server, plugin_env
    from tests.conftest import free_port

    env = {
        **plugin_env(),
        **env,
        "LIVETRAIN_STATE_DIR": str(tmp_path / "state"),
        "LIVETRAIN_RUNTIME_DIR": str(tmp_path / "run"),
    }
    log = tmp_path / "server.log"
    with Server(model, free_port(), ["--enforce-eager"], env=env, log_path=log) as server:
        assert server.process.wait(timeout=240) != 0
    return log.read_text()


@pytest.mark.server
def test_malformed_readout_at_launch_stops_the_server(models, tmp_path):
    folder = write_readout(tmp_path / "broken", ["a"], [0], 128, seed=0)
    (folder / readout_format.TENSORS_FILE).write_bytes(b"not safetensors")
    log = failed_launch_log(models["llama"], tmp_path, {"LIVETRAIN_READOUT": str(folder)})
    assert "readout.safetensors: unreadable" in log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [1, 4], [5], [0, 1, 1, 2, 3, 5]])
def test_projection_of_chosen_rows_in_every_dtype(dtype, rows):
    """Both paths (every row of the step, a subset, a row read twice: a prompt's last
    row also samples its first token) against a float64 reference; bf16 and fp16
    activations are widened exactly before the float32 product."""
    gen = torch.Generator().manual_seed(0)
    aux = [torch.randn(6, 8, generator=gen).to(dtype) for _ in range(3)]
    matrices = torch.randn(2, 8, 5, generator=gen)  # readout layers = captured slots 2, 0
    scores = _project(aux, [2, 0], rows, matrices)
    assert scores.dtype == torch.float32 and scores.shape == (len(rows), 2, 5)
    for j, slot in enumerate([2, 0]):
        expected = aux[slot][rows].double() @ matrices[j].double()
        torch.testing.assert_close(scores[:, j].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.server
def test_v2_model_runner_is_refused_at_launch(models, tmp_path):
    """The readout patches vLLM's V1 runner; asking for V2 must fail loudly, not serve
    a readout that stays silent."""
    folder = write_readout(tmp_path / "readout", ["a"], [0], 128, seed=0)
    env = {"LIVETRAIN_READOUT": str(folder), "VLLM_USE_V2_MODEL_RUNNER": "1"}
    assert "unset VLLM_USE_V2_MODEL_RUNNER" in failed_launch_log(models["llama"], tmp_path, env)
