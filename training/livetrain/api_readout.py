"""API server: the live readout's routes, and the collector of the workers' scores.

GET  /readout                the loaded readout (concepts, layers, calibration)
POST /readout/load           swap in another readout folder; on any error the old one stays
GET  /readout/{id}           per-token scores of a completion, by the `id` it returned
GET  /readout/{id}/stream    the same as server-sent events while it generates
GET  /readout/ui             the playground page (static; it asks for the key itself)

The worker appends one record per engine step (worker_readout.py) to the shared-memory
score ring created at launch (readout_launch.py); a task here drains it every few
milliseconds, and every reply drains it first, so it reflects every step that has
finished. Rows arrive keyed by the engine's internal request id, which vLLM derives
from the id the client sees: `[{child}_]{cmpl-X-{prompt} | chatcmpl-X}-{8 hex}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from livetrain import readout_format
from livetrain.api_http import RequestError, read_json, validate
from livetrain.api_models import ReadoutLoadRequest, ReadoutQuery
from livetrain.config import PluginConfig
from livetrain.readout_launch import ENV_READOUT, captured_layers, launch_ring
from livetrain.score_ring import ScoreRing

log = logging.getLogger("livetrain.readout")
INTERNAL_ID = re.compile(r"(?:(\d+)_)?(.+)-[0-9a-f]{8}")
STREAM_WAIT_S = 10.0  # how long a stream waits for its completion's first token
DRAIN_EVERY_S = (0.005, 0.05)  # while records arrive, and when idle
MAX_FANOUTS = 100_000  # parents' n of recent n > 1 readout requests


def client_choice(internal_id: str, n: int) -> tuple[str, int] | None:
    """(the id the client saw, choice index) of an engine request id, or None."""
    match = INTERNAL_ID.fullmatch(internal_id)
    if match is None:
        return None
    child, external = int(match[1] or 0), match[2]
    if external.startswith("cmpl-"):  # completions append the prompt's index
        client, _, prompt = external.rpartition("-")
        if prompt.isdigit():
            return client, int(prompt) * n + child
    return external, child


@dataclass
class Scored:
    token_id: int
    version: int
    scores: np.ndarray  # [layers, concepts]


@dataclass
class RequestScores:
    choices: dict[int, dict[int, Scored]] = field(default_factory=dict)  # choice -> index -> row
    prompts: dict[int, dict[int, Scored]] = field(default_factory=dict)  # choice -> position -> row
    internal_ids: set[str] = field(default_factory=set)
    updated: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def has(self, choice: int) -> bool:
        return choice in self.choices or choice in self.prompts

    def version(self, choice: int) -> int:
        """The readout version of a choice's first row: a response lists only rows of
        that version (a swap mid-completion does not mix readouts)."""
        prompt, generated = self.prompts.get(choice), self.choices.get(choice)
        return (prompt[min(prompt)] if prompt else generated[min(generated)]).version

    def rows(self, choice: int, version: int) -> tuple[list[tuple[int, Scored]], ...]:
        """(prompt rows, generated rows) of a choice and readout version, in order."""
        return tuple(
            [(i, rows[i]) for i in sorted(rows) if rows[i].version == version]
            for rows in (self.prompts.get(choice, {}), self.choices.get(choice, {}))
        )


class ReadoutStore:
    """Scores by client id, bounded: idle entries expire and the least recently updated
    go first (kept in that order, so expiry looks at the front only)."""

    def __init__(self, ttl_s: float, max_requests: int) -> None:
        self.ttl_s, self.max_requests = ttl_s, max_requests
        self.requests: OrderedDict[str, RequestScores] = OrderedDict()

    def add(self, message: dict, fanout: Callable[[str], int | None] = lambda _id: None) -> None:
        """Store one worker message; `fanout` gives a request's `n` where the engine knows
        it (n > 1 children reach the worker with n = 1)."""
        rows, n_layers, n_concepts = message["shape"]
        scores = np.frombuffer(message["scores"], np.float32).reshape(rows, n_layers, n_concepts)
        prompt = message.get("prompt") or [False] * rows
        for k, internal in enumerate(message["req_ids"]):
            key = client_choice(internal, fanout(internal) or message["n"][k])
            if key is None:
                continue
            entry = self.requests.get(key[0])
            if entry is None:
                entry = self.requests[key[0]] = RequestScores()
            self.requests.move_to_end(key[0])  # least recently updated first
            entry.internal_ids.add(internal)
            row = Scored(message["token_ids"][k], message["v"], scores[k])
            rows = entry.prompts if prompt[k] else entry.choices
            rows.setdefault(key[1], {})[message["index"][k]] = row
            entry.updated = time.monotonic()
            entry.changed.set()
        self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        while self.requests and (
            len(self.requests) > self.max_requests
            or now - next(iter(self.requests.values())).updated > self.ttl_s
        ):
            self.requests.popitem(last=False)


@dataclass
class LoadedReadout:
    path: str
    concepts: list[str]
    layers: list[int]
    read_position: dict[str, Any]
    calibration: readout_format.Calibration | None  # of texts read at read_position
    token_calibration: readout_format.Calibration | None  # of single tokens

    @classmethod
    def of(cls, path: str, readout: readout_format.Readout) -> LoadedReadout:
        return cls(
            path,
            readout.concepts,
            readout.layers,
            readout.read_position,
            readout.calibration,
            readout.token_calibration,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "loaded": True,
            "path": self.path,
            "concepts": self.concepts,
            "layers": self.layers,
            "read_position": self.read_position,
            "calibrated": self.calibration is not None,
        }

    def z(self, scores: np.ndarray, cal: readout_format.Calibration | None) -> dict | None:
        """{layer: [z per concept]} of raw scores [layers, concepts], or None."""
        if cal is None:
            return None
        return {
            str(layer): ((scores[j] - np.asarray(cal.mean[layer])) / np.asarray(cal.std[layer]))
            .astype(float)
            .tolist()
            for j, layer in enumerate(self.layers)
        }

    def summary(
        self, prompt: list[tuple[int, Scored]], generated: list[tuple[int, Scored]]
    ) -> dict[str, Any] | None:
        """The whole text scored the way the directions were trained: the mean of its
        rows from `start` on (prompt rows by position; every generated token's row), or
        its latest row for last-token readouts. Rows are (index, row) in order; `prompt`
        is empty when the prompt was not read. The row that samples the first generated
        token reads the last prompt token, so with prompt rows it counts once."""
        if self.read_position["pooling"] == "last":
            rows = [row for _, row in (prompt + generated)[-1:]]
        else:
            start = self.read_position["start"]
            rows = [row for position, row in prompt if position >= start]
            rows += [row for index, row in generated if index > 0 or not prompt]
        if not rows:
            return None
        mean = np.mean([row.scores for row in rows], axis=0)
        body: dict[str, Any] = {
            "rows": len(rows),
            "scores": {str(layer): mean[j].tolist() for j, layer in enumerate(self.layers)},
        }
        if (z := self.z(mean, self.calibration)) is not None:
            body["z"] = z
        return body


class ReadoutRoutes:
    """The readout half of the endpoint plugin; LivetrainEndpoints owns auth and startup."""

    def __init__(self, config: PluginConfig) -> None:
        self.store = ReadoutStore(config.readout_ttl_s, config.readout_max_requests)
        self.versions: dict[int, LoadedReadout] = {}
        self.current = -1
        self.engine: Any = None
        self.tokenizer: Any = None
        self.ring: ScoreRing | None = None
        self.fanouts: OrderedDict[str, int] = OrderedDict()  # engine id -> parent's n
        self.decoder = msgspec.msgpack.Decoder()

    def attach(self, app: FastAPI, authorize) -> None:
        app.add_api_route("/readout/ui", self._ui, methods=["GET"])  # static: no data, no key
        router = APIRouter(dependencies=[Depends(authorize)])
        router.add_api_route("/readout", self._describe, methods=["GET"])
        router.add_api_route("/readout/load", self._load, methods=["POST"])
        router.add_api_route("/readout/{request_id}/stream", self._stream, methods=["GET"])
        router.add_api_route("/readout/{request_id}", self._get, methods=["GET"])
        app.include_router(router)

    async def start(self, engine_client: Any) -> None:
        """Start draining the score ring (when launched with a readout) and load the
        launch readout."""
        ring = launch_ring()
        if engine_client is None or ring is None:
            return
        self.engine, self.ring = engine_client, ring
        if hasattr(engine_client, "output_processor"):
            self._watch_fanout(engine_client.output_processor)
        tokenizer = engine_client.get_tokenizer()
        self.tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        if os.environ.get(ENV_READOUT):
            self._remember(
                0, os.environ[ENV_READOUT], readout_format.load(Path(os.environ[ENV_READOUT]))
            )
        asyncio.get_running_loop().create_task(self._collect())

    def _remember(self, version: int, path: str, readout: readout_format.Readout) -> None:
        self.versions[version] = LoadedReadout.of(path, readout)
        self.current = version

    async def _collect(self) -> None:
        busy, idle = DRAIN_EVERY_S
        while True:
            await asyncio.sleep(busy if self._drain() else idle)

    def _drain(self) -> int:
        """Store every record the worker has written so far; how many there were."""
        records = self.ring.drain()
        for record in records:
            try:
                self.store.add(self.decoder.decode(record), self._fanout)
            except Exception:  # a bad record must not end collection
                log.exception("live readout: dropped a record")
        return len(records)

    def _require_enabled(self) -> None:
        if self.ring is None:
            raise RequestError(
                409,
                "the live readout was not enabled at launch: start the server with "
                "LIVETRAIN_READOUT=DIR (or LIVETRAIN_READOUT_LAYERS=i,j,...)",
            )

    async def _ui(self) -> HTMLResponse:
        page = resources.files("livetrain").joinpath("data/readout_ui.html").read_text("utf-8")
        return HTMLResponse(page)

    async def _describe(self) -> JSONResponse:
        self._require_enabled()
        loaded = self.versions.get(self.current)
        body = loaded.describe() if loaded else {"loaded": False}
        worker = (await self.engine.collective_rpc("livetrain_readout_stats"))[0]
        return JSONResponse({**body, "captured_layers": captured_layers(), "worker": worker})

    async def _load(self, request: Request) -> JSONResponse:
        self._require_enabled()
        body = validate(ReadoutLoadRequest, await read_json(request, 1 << 16), {})
        try:
            readout = await asyncio.to_thread(readout_format.load, Path(body.path))
        except readout_format.ReadoutError as exc:
            raise RequestError(422, f"path: {exc}", field="path") from None
        hidden = self.engine.model_config.get_hidden_size()
        if readout.hidden_size != hidden:
            raise RequestError(
                422,
                f"path: hidden size {readout.hidden_size} does not match the model's {hidden}",
                field="path",
            )
        if missing := set(readout.layers) - set(captured_layers()):
            raise RequestError(
                422,
                f"path: layers {sorted(missing)} were not captured at launch "
                f"(captured: {captured_layers()})",
                field="path",
            )
        version = max(self.versions, default=0) + 1
        answers = await self.engine.collective_rpc(
            "livetrain_readout_load", args=(str(Path(body.path).resolve()), version)
        )
        if errors := [a["error"] for a in answers if "error" in a]:
            raise RequestError(422, f"path: {errors[0]}", field="path")
        self._remember(version, str(Path(body.path).resolve()), readout)
        return JSONResponse(self.versions[version].describe())

    def _query(self, request: Request) -> ReadoutQuery:
        return validate(ReadoutQuery, dict(request.query_params), {})

    async def _get(self, request_id: str, request: Request) -> JSONResponse:
        self._require_enabled()
        query = self._query(request)
        choice = query.choice
        self._drain()
        entry = self.store.requests.get(request_id)
        if entry is None or not entry.has(choice):
            raise RequestError(404, f"no readout for id {request_id!r} (choice {choice})")
        version = entry.version(choice)
        prompt, generated = entry.rows(choice, version)
        body = self._header(request_id, choice, version)
        body["finished"] = self._finished(entry)
        if prompt and query.rows:
            body["prompt_tokens"] = [self._token(i, row) for i, row in prompt]
        if query.rows:
            body["tokens"] = [self._token(i, row) for i, row in generated]
        summary = self.versions[version].summary(prompt, generated)
        if summary is not None:
            body["summary"] = summary
        return JSONResponse(body)

    async def _stream(self, request_id: str, request: Request) -> StreamingResponse:
        self._require_enabled()
        choice = self._query(request).choice
        return StreamingResponse(
            self._events(request_id, choice),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _events(self, request_id: str, choice: int) -> AsyncIterator[str]:
        """meta, then prompt rows (`event: prompt`, when the prompt is read) and generated
        rows (plain messages) as they arrive, then the whole-text summary and done."""
        deadline = time.monotonic() + STREAM_WAIT_S
        while (entry := self.store.requests.get(request_id)) is None or not entry.has(choice):
            if time.monotonic() > deadline:
                yield _sse({"message": f"no readout for id {request_id!r}"}, "error")
                return
            await asyncio.sleep(0.02)
        version = entry.version(choice)
        yield _sse(self._header(request_id, choice, version), "meta")
        sent = {"prompt": 0, None: 0}  # next index to send, per kind of row
        while True:
            for kind, rows in (("prompt", entry.prompts), (None, entry.choices)):
                rows = rows.get(choice, {})
                while sent[kind] in rows:
                    row = rows[sent[kind]]
                    if row.version == version:
                        yield _sse(self._token(sent[kind], row), kind)
                    sent[kind] += 1
            if self._finished(entry):
                self._drain()
                if sent[None] not in entry.choices.get(choice, {}):
                    break
                continue
            entry.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # re-check finished now and then
                await asyncio.wait_for(entry.changed.wait(), timeout=0.25)
        prompt, generated = entry.rows(choice, version)
        summary = self.versions[version].summary(prompt, generated)
        if summary is not None:
            yield _sse(summary, "summary")
        yield _sse({}, "done")

    def _fanout(self, internal_id: str) -> int | None:
        """`n` of the completion an engine request belongs to, for children of n > 1
        (they reach the worker with n = 1)."""
        return self.fanouts.get(internal_id)

    def _watch_fanout(self, processor: Any) -> None:
        """Remember each readout child's parent `n` as the API server adds it: the
        engine's own record of it is gone once the request finishes, which may be
        before the ring is drained."""
        add_request = processor.add_request

        def add_request_noting_n(request, prompt, parent_req=None, *args, **kwargs):
            extra = getattr(request.sampling_params, "extra_args", None) or {}
            if parent_req is not None and extra.get("readout"):
                self.fanouts[request.request_id] = parent_req.n
                while len(self.fanouts) > MAX_FANOUTS:
                    self.fanouts.popitem(last=False)
            return add_request(request, prompt, parent_req, *args, **kwargs)

        processor.add_request = add_request_noting_n

    def _finished(self, entry: RequestScores) -> bool:
        """No engine request of this completion is still running (vLLM's own bookkeeping)."""
        states = getattr(getattr(self.engine, "output_processor", None), "request_states", None)
        if states is None:  # unknown engine client: fall back on silence
            return time.monotonic() - entry.updated > 2.0
        return not any(internal in states for internal in entry.internal_ids)

    def _header(self, request_id: str, choice: int, version: int) -> dict[str, Any]:
        loaded = self.versions[version]
        return {
            "id": request_id,
            "choice": choice,
            "concepts": loaded.concepts,
            "layers": loaded.layers,
        }

    def _token(self, index: int, row: Scored) -> dict[str, Any]:
        loaded = self.versions[row.version]
        entry: dict[str, Any] = {
            "index": index,
            "token_id": row.token_id,
            "text": self.tokenizer.decode([row.token_id]) if self.tokenizer else None,
            "scores": {str(layer): row.scores[j].tolist() for j, layer in enumerate(loaded.layers)},
        }
        # One row is one token: z against single neutral tokens where the readout has
        # that calibration (readouts read at the last token have only one kind).
        z = loaded.z(row.scores, loaded.token_calibration or loaded.calibration)
        if z is not None:
            entry["z"] = z
        return entry


def _sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"
