"""Endpoint plugin (API server process): the HTTP routes of livetrain.

POST /train          one optimizer step on raw token ids
POST /train/score    continuation log-probs as the trainer's model sees them
GET  /train/status   trainer state, weight version, optimizer settings and size
POST /checkpoint     write the trained weights into the model's safetensors now
POST /train/rollback serve the weights in the model's safetensors again, or undo steps
POST /train/guard    set the guard set a step must not make worse (DELETE: remove it)
/readout...          the live readout (readout_routes.py)

All of them change or reveal training state, so all honour vLLM's --api-key
(vLLM's own middleware only guards /v1 and a few other prefixes).
"""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from livetrain import vllm_internals
from livetrain.api.http import RequestError, parse, validate
from livetrain.api.metrics import Metrics
from livetrain.api.readout_routes import ReadoutRoutes
from livetrain.api.replies import to_json
from livetrain.api.requests import (
    CheckpointRequest,
    GuardRequest,
    RollbackRequest,
    ScoreRequest,
    TrainRequest,
)
from livetrain.api.supervisor import StepRefused, TrainerSupervisor, TrainerUnavailable
from livetrain.checkpoint.lock import claim_for_server
from livetrain.config import PluginConfig, plugin_config
from livetrain.formats import messages as msg

log = logging.getLogger("livetrain.api")


def load_guard(config: PluginConfig, limits: dict[str, int]) -> msg.Guard | None:
    """The launch guard set (LIVETRAIN_GUARD), validated like a POST /train/guard body;
    a bad file stops the server with the file and the field named."""
    if config.guard is None:
        return None
    try:
        body = validate(GuardRequest, json.loads(config.guard.read_text()), limits)
    except (OSError, ValueError, RequestError) as exc:
        raise RuntimeError(f"LIVETRAIN_GUARD {config.guard}: {exc}") from None
    return body.guard()


async def _hung_up(request: Request) -> None:
    """Return once the client has disconnected (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def resolve_model_dir(model: str) -> Path:
    """vLLM's --model as a local directory (a path, or a hub id already cached), or the
    file it names (a GGUF, which the trainer then refuses with the reason)."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


class LivetrainEndpoints:
    """Entry point of the `vllm.endpoint_plugins` group (see vLLM's EndpointPlugin)."""

    name = "livetrain_api"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.config = plugin_config()
        self.supervisor: TrainerSupervisor | None = None
        self.limits: dict[str, int] = {}
        self.key_ok: Callable[[Any], bool] | None = None  # None: the server has no API key
        self.readout = ReadoutRoutes(self.config)
        self.lock: int | None = None  # the model folder's server lock (checkpoint/lock.py)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter(dependencies=[Depends(self._authorize)])
        router.add_api_route("/train", self._train, methods=["POST"])
        router.add_api_route("/train/score", self._score, methods=["POST"])
        router.add_api_route("/train/status", self._status, methods=["GET"])
        router.add_api_route("/checkpoint", self._checkpoint, methods=["POST"])
        router.add_api_route("/train/rollback", self._rollback, methods=["POST"])
        router.add_api_route("/train/guard", self._set_guard, methods=["POST"])
        router.add_api_route("/train/guard", self._clear_guard, methods=["DELETE"])
        app.include_router(router)
        self.readout.attach(app, self._authorize)
        app.add_exception_handler(RequestError, lambda _req, exc: exc.response())

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.key_ok = vllm_internals.api_key_checker(args)
        if engine_client is None:
            return
        if (count := getattr(args, "api_server_count", None) or 1) > 1:
            raise RuntimeError(
                f"livetrain needs one API server process (--api-server-count {count}): each "
                "would start its own trainer on the same weights"
            )
        model_config = engine_client.model_config
        model_dir = resolve_model_dir(model_config.model)
        # held for the server's lifetime; a single file (GGUF) is never synced into
        self.lock = claim_for_server(model_dir) if model_dir.is_dir() else None
        self.limits = {
            "vocab_size": model_config.get_vocab_size(),
            "max_model_len": model_config.max_model_len,
            "max_samples": self.config.max_samples,
            "max_batch_tokens": self.config.max_batch_tokens,
        }
        guard = load_guard(self.config, self.limits)
        metrics = Metrics(model_config.served_model_name)
        self.supervisor = TrainerSupervisor(engine_client, model_dir, self.config, metrics, guard)
        self.supervisor.start()
        await self.readout.start(engine_client, metrics)

    async def _authorize(self, request: Request) -> None:
        if self.key_ok is not None and not self.key_ok(request.headers):
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer ...)")

    def _ready_supervisor(self) -> TrainerSupervisor:
        if self.supervisor is None:
            raise RequestError(503, "livetrain needs a generation engine; none is running")
        return self.supervisor

    @staticmethod
    async def _answer(
        request: Request,
        supervisor: TrainerSupervisor,
        operation: Awaitable[msgspec.Struct],
        refused: Callable[[StepRefused], RequestError],
    ) -> Response:
        """The operation's result, or the HTTP error for how it failed: 503 while the
        trainer is unavailable, `refused(exc)` when it refused (nothing changed). A
        client that hangs up while its operation waits for its turn cancels it."""
        work = asyncio.ensure_future(operation)
        hangup = asyncio.ensure_future(_hung_up(request))
        try:
            await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if not work.done():
            work.cancel()  # dropped if still queued; a started one runs on (shielded)
            log.info("client of %s hung up; its request was cancelled", request.url.path)
            return Response(status_code=499)
        try:
            return JSONResponse(to_json(work.result()))
        except TrainerUnavailable as exc:
            raise RequestError(503, str(exc), state=supervisor.state) from None
        except StepRefused as exc:
            raise refused(exc) from None

    async def _train(self, request: Request) -> Response:
        supervisor = self._ready_supervisor()
        try:
            body = await parse(request, TrainRequest, self.config.max_body_bytes, self.limits)
        except RequestError:
            supervisor.metrics.refused("invalid_request")
            raise
        step = supervisor.train(body.sample_list(), body.settings(), body.retrain)
        return await self._answer(
            request,
            supervisor,
            step,
            lambda e: RequestError(e.status or 422, f"step refused, weights unchanged: {e}"),
        )

    async def _score(self, request: Request) -> Response:
        supervisor = self._ready_supervisor()
        body = await parse(request, ScoreRequest, self.config.max_body_bytes, self.limits)
        scored = supervisor.score(body.sample_list())
        return await self._answer(request, supervisor, scored, lambda e: RequestError(422, str(e)))

    async def _checkpoint(self, request: Request) -> Response:
        supervisor = self._ready_supervisor()
        await parse(request, CheckpointRequest, self.config.max_body_bytes, {}, empty={})
        return await self._answer(
            request,
            supervisor,
            supervisor.checkpoint(),
            lambda e: RequestError(500, f"{e}; the previous checkpoint is intact"),
        )

    async def _rollback(self, request: Request) -> Response:
        supervisor = self._ready_supervisor()
        kept = {"undo_steps": self.config.undo_steps}
        body = await parse(request, RollbackRequest, self.config.max_body_bytes, kept, empty={})
        return await self._answer(
            request,
            supervisor,
            supervisor.rollback(body.steps),
            lambda e: RequestError(
                e.status or 500, f"rollback failed: {e}", field="steps" if e.status else None
            ),
        )

    async def _set_guard(self, request: Request) -> Response:
        supervisor = self._ready_supervisor()
        body = await parse(request, GuardRequest, self.config.max_body_bytes, self.limits)
        return await self._answer(
            request,
            supervisor,
            supervisor.set_guard(body.guard()),
            # 409: this server steps per layer, no guard can judge it; 422: the set's loss
            lambda e: RequestError(e.status or 422, str(e), field=None if e.status else "samples"),
        )

    async def _clear_guard(self, request: Request) -> Response:
        supervisor = self._ready_supervisor()
        return await self._answer(
            request, supervisor, supervisor.set_guard(None), lambda e: RequestError(500, str(e))
        )

    async def _status(self) -> JSONResponse:
        return JSONResponse(to_json(self._ready_supervisor().status()))
