"""API server: the live readout's HTTP routes.

GET  /readout                the loaded readout (concepts, layers, calibration)
POST /readout/load           swap in another readout folder; on any error the old one stays
GET  /readout/{id}           per-token scores of a completion, by the `id` it returned
GET  /readout/{id}/stream    the same as server-sent events while it generates
GET  /readout/ui             the playground page (static; it asks for the key itself)

Scores come from the store the collector fills (readout_store.py, readout_collector.py).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from livetrain import vllm_internals as vllm
from livetrain.api.http import RequestError, parse, validate
from livetrain.api.metrics import Metrics
from livetrain.api.readout_collector import ScoreCollector
from livetrain.api.readout_launch import create_ring, remove
from livetrain.api.readout_store import ReadoutStore, ReadoutVersions, RequestScores, Scored
from livetrain.api.replies import (
    ReadoutHeader,
    ReadoutInfo,
    ReadoutReply,
    TokenRow,
    to_json,
)
from livetrain.api.requests import ReadoutLoadRequest, ReadoutQuery
from livetrain.api.steering import SteeringGate, SteeringMiddleware
from livetrain.config import PluginConfig
from livetrain.formats import readout_format
from livetrain.formats.messages import ReadoutLoaded, TapStats, decode

STREAM_WAIT_S = 10.0  # how long a stream waits for its completion's first token


def first_error(answers: list[bytes]) -> str | None:
    """The first worker's refusal among `ReadoutLoaded` RPC answers, if any."""
    errors = [a.error for a in (decode(x, ReadoutLoaded) for x in answers) if a.error]
    return errors[0] if errors else None


def readout_roots(config: PluginConfig) -> tuple[Path, ...]:
    """Where POST /readout/load may read (resolved): LIVETRAIN_READOUT_ROOTS, or the
    launch readout's parent, the built-in readouts and ./readout_out."""
    if config.readout_roots:
        return tuple(root.resolve() for root in config.readout_roots)
    built_in = Path(str(resources.files("livetrain").joinpath("data/readouts")))
    roots = [built_in, Path("readout_out")]
    if config.readout is not None:
        roots.append(config.readout.parent)
    return tuple(root.resolve() for root in roots)


class ReadoutRoutes:
    """The readout half of the endpoint plugin; LivetrainEndpoints owns auth and startup."""

    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.store = ReadoutStore(config.readout_ttl_s, config.readout_max_requests)
        self.versions = ReadoutVersions()
        self.engine: Any = None
        self.tokenizer: Any = None
        self.captured: list[int] = []
        self.collector: ScoreCollector | None = None
        self.roots = readout_roots(config)
        self.steering = SteeringGate(self.versions, config.steer_max_scale)
        self._loading = asyncio.Lock()  # one swap at a time: versions are handed out in order

    def attach(self, app: FastAPI, authorize: Callable[[Request], Awaitable[None]]) -> None:
        app.add_api_route("/readout/ui", self._ui, methods=["GET"])  # static: no data, no key
        router = APIRouter(dependencies=[Depends(authorize)])
        router.add_api_route("/readout", self._describe, methods=["GET"])
        router.add_api_route("/readout/load", self._load, methods=["POST"])
        router.add_api_route("/readout/{request_id}/stream", self._stream, methods=["GET"])
        router.add_api_route("/readout/{request_id}", self._get, methods=["GET"])
        app.include_router(router)
        app.add_middleware(SteeringMiddleware, gate=self.steering)

    async def start(self, engine_client: Any, metrics: Metrics) -> None:
        """When the launch captured blocks: create the score ring, have the workers open
        it and load the launch readout, and start draining it."""
        self.captured = vllm.worker_settings(engine_client.vllm_config).readout_layers
        if not self.captured:
            return
        ring = create_ring(self.config)
        atexit.register(remove, ring)  # if a worker fails before it has mapped the ring
        launch = str(self.config.readout) if self.config.readout else None
        answers = await engine_client.collective_rpc(
            "livetrain_readout_start", args=(str(ring.path), launch)
        )
        remove(ring)  # both ends have it mapped now; nothing is left behind on a crash
        if error := first_error(answers):
            raise readout_format.ReadoutError(f"live readout: {error}")
        self.engine = engine_client
        self.steering.enabled = True
        self.collector = ScoreCollector(ring, self.store, metrics)
        vllm.watch_added_requests(engine_client, self.collector.note_fanout)
        tokenizer = engine_client.get_tokenizer()
        self.tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        if self.config.readout is not None:
            self.versions.add(0, str(self.config.readout), readout_format.load(self.config.readout))
        asyncio.get_running_loop().create_task(self.collector.run())

    def _drain(self) -> None:
        if self.collector is not None:
            self.collector.drain()

    def _require_enabled(self) -> None:
        if self.collector is None:
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
        (answer, *_) = await self.engine.collective_rpc("livetrain_readout_stats")
        worker = decode(answer, TapStats)
        return JSONResponse(to_json(self.versions.describe(self.captured, worker)))

    async def _load(self, request: Request) -> JSONResponse:
        self._require_enabled()
        body = await parse(request, ReadoutLoadRequest, 1 << 16, {})
        resolved = Path(body.path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            roots = ", ".join(map(str, self.roots))
            raise RequestError(
                422,
                f"path: {resolved} is not under an allowed readout root ({roots}); "
                "set LIVETRAIN_READOUT_ROOTS at launch to allow others",
                field="path",
            )
        async with self._loading:
            return JSONResponse(to_json(await self._swap(str(resolved))))

    async def _swap(self, path: str) -> ReadoutInfo:
        try:
            readout = await asyncio.to_thread(
                readout_format.load, Path(path), self.config.readout_max_bytes
            )
            readout_format.check_fits(
                readout, self.engine.model_config.get_hidden_size(), self.captured
            )
        except readout_format.ReadoutError as exc:
            raise RequestError(422, f"path: {exc}", field="path") from None
        version = self.versions.next_version()
        answers = await self.engine.collective_rpc("livetrain_readout_load", args=(path, version))
        if error := first_error(answers):
            raise RequestError(422, f"path: {error}", field="path")
        loaded = self.versions.add(version, path, readout)
        self._drain()
        self.versions.prune(self.store.versions_in_use())
        return loaded.describe()

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
        reply = ReadoutReply(
            **msgspec.structs.asdict(self._header(request_id, choice, version)),
            finished=self._finished(entry),
            prompt_tokens=[self._token(i, row) for i, row in prompt]
            if prompt and query.rows
            else None,
            tokens=[self._token(i, row) for i, row in generated] if query.rows else None,
            summary=self.versions[version].summary(prompt, generated),
        )
        return JSONResponse(to_json(reply))

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
        yield _sse(to_json(self._header(request_id, choice, version)), "meta")
        sent = {"prompt": 0, None: 0}  # next index to send, per kind of row
        while True:
            for kind, by_choice in (("prompt", entry.prompts), (None, entry.choices)):
                rows = by_choice.get(choice, {})
                while sent[kind] in rows:
                    row = rows[sent[kind]]
                    if row.version == version:
                        yield _sse(to_json(self._token(sent[kind], row)), kind)
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
            yield _sse(to_json(summary), "summary")
        yield _sse({}, "done")

    def _finished(self, entry: RequestScores) -> bool:
        """No engine request of this completion is still running (vLLM's own bookkeeping)."""
        states = vllm.running_request_ids(self.engine)
        if states is None:  # unknown engine client: fall back on silence
            return time.monotonic() - entry.updated > 2.0
        return not any(internal in states for internal in entry.internal_ids)

    def _header(self, request_id: str, choice: int, version: int) -> ReadoutHeader:
        loaded = self.versions[version]
        return ReadoutHeader(request_id, choice, loaded.concepts, loaded.layers)

    def _token(self, index: int, row: Scored) -> TokenRow:
        loaded = self.versions[row.version]
        return TokenRow(
            index=index,
            token_id=row.token_id,
            text=self.tokenizer.decode([row.token_id]) if self.tokenizer else None,
            scores={str(layer): row.scores[j].tolist() for j, layer in enumerate(loaded.layers)},
            # One row is one token: z against single neutral tokens where the readout
            # has that calibration (readouts read at the last token have only one kind).
            z=loaded.z(row.scores, loaded.token_calibration or loaded.calibration),
        )


def _sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"
