"""API server: validate a completion's steering request and hand it to the workers.

A client asks for steering in the body of any generation route vLLM serves
(`/v1/completions`, `/v1/chat/completions`, ...):

    "vllm_xargs": {"steer": {"<concept>": scale, ...}, "steer_layers": [i, ...],
                   "steer_prompt": false}

vLLM's own request models cannot carry it (`vllm_xargs` values are strings, numbers or
lists, never objects), and a bad concept name must be a 4xx naming the field, not a
worker-side surprise. So this ASGI middleware, inside vLLM's API-key middleware, reads
every JSON POST that mentions `steer`, validates it against the readout the workers
score with now (api/requests.py `SteerArgs`), and rewrites it before vLLM parses it:
`vllm_xargs["steer"]` becomes a `SteerSpec` as JSON text (what worker/steering.py
reads), and `cache_salt` gains a hash of the spec. The salt enters vLLM's prefix-cache
key, so a steered request never reads or leaves KV that an unsteered request (or one
steered otherwise) can read: steered KV is not the model's KV.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from livetrain.api.http import RequestError, validate
from livetrain.api.readout_store import ReadoutVersions
from livetrain.api.requests import SteeredCompletion
from livetrain.formats.messages import SteerSpec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
SALT_PREFIX = "livetrain-steer-"


class SteeringGate:
    """Turns a request body that asks for steering into one vLLM accepts, or refuses it."""

    def __init__(self, versions: ReadoutVersions, max_scale: float) -> None:
        self.versions = versions
        self.max_scale = max_scale
        self.enabled = False  # set once the live readout has started (captured blocks)

    def rewrite(self, body: bytes) -> bytes:
        """`body` unchanged when it does not steer; else the rewritten body (RequestError
        when the steering is malformed or cannot run)."""
        if b"steer" not in body:
            return body
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return body  # not ours to judge: vLLM answers malformed JSON itself
        xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
        if not isinstance(xargs, dict) or not ({"steer", "steer_layers"} & set(xargs)):
            return body
        spec = self.spec(xargs)
        xargs["steer"] = spec.to_text()
        xargs.pop("steer_layers", None)
        xargs.pop("steer_prompt", None)
        data["cache_salt"] = _salt(data.get("cache_salt"), xargs["steer"])
        return json.dumps(data).encode()

    def spec(self, xargs: dict[str, Any]) -> SteerSpec:
        version = self.versions.current
        loaded = self.versions.loaded.get(version) if self.enabled else None
        if loaded is None:
            raise RequestError(
                400,
                "vllm_xargs.steer: steering adds a loaded readout's concept directions; "
                "start the server with LIVETRAIN_READOUT=DIR (or load one: POST /readout/load)",
                field="vllm_xargs.steer",
            )
        if not loaded.steerable:
            raise RequestError(
                400,
                f"vllm_xargs.steer: the loaded readout ({loaded.path}) has detectors but no "
                "concept directions (readout format 1); retrain it with "
                "readout/train_with_library.py",
                field="vllm_xargs.steer",
            )
        context = {
            "concepts": loaded.concepts,
            "layers": loaded.layers,
            "max_scale": self.max_scale,
        }
        try:
            args = validate(SteeredCompletion, {"vllm_xargs": xargs}, context).vllm_xargs
        except RequestError as exc:
            raise RequestError(400, str(exc), field=exc.field, **exc.extra) from None
        return SteerSpec(version, args.steer, args.steer_layers, bool(args.steer_prompt))


def _salt(user_salt: Any, spec_text: str) -> str:
    """A prefix-cache salt for the spec (and the client's own salt, kept apart by it)."""
    own = user_salt if isinstance(user_salt, str) else ""
    digest = hashlib.sha256(f"{own}\0{spec_text}".encode()).hexdigest()[:40]
    return SALT_PREFIX + digest


class SteeringMiddleware:
    """ASGI: every POST body under /v1/ (vLLM's generation routes) passes
    `SteeringGate.rewrite` before the route reads it; the plugin's own routes stream
    their bodies under a size cap, so they are left alone."""

    def __init__(self, app: ASGIApp, gate: SteeringGate) -> None:
        self.app, self.gate = app, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith("/v1/")
        ):
            return await self.app(scope, receive, send)
        body, tail = await _read_body(receive)
        try:
            new_body = self.gate.rewrite(body)
        except RequestError as exc:
            return await exc.response()(scope, receive, send)
        if new_body is not body:
            scope = {**scope, "headers": _with_length(scope["headers"], len(new_body))}
        await self.app(scope, _replay(new_body, tail, receive), send)


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    """The whole body, and any non-body message that arrived while reading it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), [message]
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), []


def _replay(body: bytes, tail: list[Message], receive: Receive) -> Receive:
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *tail]

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]
