"""API server: starts, talks to and restarts the training subprocess.

The supervisor is the only code that touches both vLLM's engine client and the
trainer. It serialises steps (one at a time, in arrival order) and fences the
weight write: inference is paused only between `prepare` (done while serving)
and the end of `apply`, then the prefix cache is dropped so no KV computed with
the old weights is reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from livetrain import protocol
from livetrain.checkpoint_files import list_tensors
from livetrain.config import OptimizerSettings, PluginConfig

log = logging.getLogger("livetrain.api")


class TrainerUnavailable(RuntimeError):
    """The trainer is starting or has failed; the message says which and why."""


class StepRefused(RuntimeError):
    """The trainer refused a step (e.g. non-finite loss); nothing was changed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def model_state_dir(config: PluginConfig, model_dir: Path) -> Path:
    """Per-model state directory, private to the user."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
    path = config.private_state_dir() / f"{model_dir.name}-{digest}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def parse_weight_version(value: str) -> int:
    """vLLM starts at "default" (weights as loaded); we count steps from there."""
    if value == "default":
        return 0
    try:
        return int(value)
    except ValueError:
        raise TrainerUnavailable(
            f"vLLM's weight version {value!r} was set by something other than livetrain"
        ) from None


class TrainerSupervisor:
    def __init__(self, engine: Any, model_dir: Path, config: PluginConfig) -> None:
        self.engine = engine
        self.model_dir = model_dir
        self.config = config
        self.state = "starting"
        self.reason: str | None = "trainer is starting"
        self.weight_version = 0
        self.info: dict[str, Any] = {}
        self.last_loss: float | None = None
        self.last_settings: dict[str, Any] = dataclasses.asdict(OptimizerSettings())
        self.restarts = 0
        self.saved: dict[str, Any] = {"saved_version": None, "save_error": None}
        self.process: asyncio.subprocess.Process | None = None
        self._runtime_dir = config.private_runtime_dir()
        self._state_dir = model_state_dir(config, model_dir)
        self._ctx = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._writing = False  # True while the trainer writes into the served weights
        self.last_sync: dict[str, Any] | None = None
        self.bytes_synced = 0
        self.syncs = 0
        self._sync_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._launch())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self) -> None:
        self.state, self.reason = "starting", "trainer is starting"
        try:
            await self._start_trainer()
        except Exception as exc:
            log.exception("livetrain trainer failed to start")
            await self._fail(f"trainer failed to start: {exc}")
            return
        self.state, self.reason = "idle", None
        log.info("livetrain trainer ready (pid %s): %s", self.process.pid, self.info)

    async def _start_trainer(self) -> None:
        names = list(list_tensors(self.model_dir))
        (export,) = await self.engine.collective_rpc("livetrain_export_weights", args=(names,))
        self.weight_version = parse_weight_version(await self.engine.get_weight_version())
        endpoint = f"ipc://{self._runtime_dir}/trainer-{self.restarts}.sock"
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._spawn(self._read_replies(self._socket))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "livetrain.trainer_main", "--connect", endpoint
        )
        self._spawn(self._watch(self.process))
        families = {
            k: v for k, v in dataclasses.asdict(self.config).items() if k.startswith("train_")
        }
        reply = await self._call(
            {
                "op": "attach",
                "model_dir": str(self.model_dir),
                "export": export,
                "families": families,
                "state_dir": str(self._state_dir),
                "weight_version": self.weight_version,
                "sync_block_bytes": self.config.sync_block_bytes,
            },
            timeout=self.config.trainer_start_timeout_s,
        )
        if not reply["ok"]:
            raise TrainerUnavailable(reply["error"])
        if reply["weight_version"] != self.weight_version:  # resumed from a checkpoint
            self.weight_version = reply["weight_version"]
            await self.engine.update_weight_version(str(self.weight_version))
        skip = ("ok", "id", "trainer_ms", "saved_version", "save_error", "weight_version")
        self.info = {k: v for k, v in reply.items() if k not in skip}

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if process is not self.process:
            return
        for future in self._pending.values():
            if not future.done():
                future.set_exception(TrainerUnavailable(f"trainer exited with code {code}"))
        if self.state == "failed":
            return
        if self._writing:
            await self._fail(
                f"trainer exited (code {code}) while writing weights; the served weights may "
                "be partially updated, restart vLLM"
            )
            return
        if self.restarts >= self.config.trainer_max_restarts:
            await self._fail(f"trainer exited with code {code}; restart limit reached")
            return
        self.restarts += 1
        log.warning("livetrain trainer exited with code %s; restarting", code)
        self._close_socket()
        await self._launch()

    async def _fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    # ---- request/reply -----------------------------------------------------------

    async def _read_replies(self, socket: zmq.asyncio.Socket) -> None:
        with contextlib.suppress(zmq.ZMQError, asyncio.CancelledError):
            while True:
                reply = protocol.decode(await socket.recv())
                self.saved = {k: reply.get(k) for k in ("saved_version", "save_error")}
                future = self._pending.pop(reply.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(reply)

    async def _call(self, message: dict[str, Any], timeout: float | None = None) -> dict:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await self._socket.send(protocol.encode({**message, "id": request_id}))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)

    def _require_ready(self) -> None:
        if self.state in ("starting", "failed"):
            raise TrainerUnavailable(self.reason or self.state)

    # ---- operations ----------------------------------------------------------------

    async def train(
        self, samples: list, settings: dict[str, Any], retrain: bool = False
    ) -> dict[str, Any]:
        """One optimizer step; shielded so a client hang-up cannot split a step."""
        step = self._train(samples, settings, retrain)
        return await asyncio.shield(asyncio.ensure_future(step))

    async def _train(
        self, samples: list, settings: dict[str, Any], retrain: bool
    ) -> dict[str, Any]:
        async with self._lock:
            self._require_ready()
            started = time.perf_counter()
            self.state = "training"
            try:
                result = await self._step(samples, settings, retrain)
            finally:
                if self.state == "training":
                    self.state = "idle"
            result["elapsed_ms"] = (time.perf_counter() - started) * 1000
            return result

    async def _step(self, samples: list, settings: dict[str, Any], retrain: bool) -> dict[str, Any]:
        prepared = await self._call(
            {"op": "prepare", "samples": samples, "settings": settings, "retrain": retrain}
        )
        if not prepared["ok"]:
            await self._escalate(prepared)
            raise StepRefused(prepared["error"], prepared.get("status"))
        version = self.weight_version + 1
        paused = time.perf_counter()
        await self._pause()
        try:
            self._writing = True
            try:
                applied = await self._call({"op": "apply", "weight_version": version})
            finally:
                self._writing = False
            if not applied["ok"]:
                await self._escalate(applied)
                raise StepRefused(applied["error"])
            self.weight_version = version
            # Running requests are preempted and recomputed: their KV came from the old weights.
            if not await self.engine.reset_prefix_cache(reset_running_requests=True):
                await self._fail(f"prefix cache reset refused after step {version}")
                raise TrainerUnavailable(self.reason)
            await self.engine.update_weight_version(str(version))
        finally:
            await self.engine.resume_generation()
        pause_ms = (time.perf_counter() - paused) * 1000
        self.last_loss, self.last_settings = prepared["loss"], settings
        self._schedule_sync()
        self.info.update(
            optimizer_steps=applied["optimizer_steps"], state_bytes=applied["state_bytes"]
        )
        return {
            "loss": prepared["loss"],
            "tokens": prepared["tokens"],
            "skipped_samples": prepared["skipped_samples"],
            "weight_version": version,
            "optimizer_steps": applied["optimizer_steps"],
            "moments_reset": prepared["moments_reset"],
            "pause_ms": pause_ms,
            "trainer_ms": {"prepare": prepared["trainer_ms"], "apply": applied["trainer_ms"]},
        }

    async def _pause(self) -> None:
        """Hold all requests in place until resume_generation().

        AsyncLLM.pause_generation adds a fixed 20 ms sleep after the engine has paused
        (for log ordering, "not required for correctness" in vLLM's source); calling the
        engine-core client directly keeps the pause to the write itself.
        """
        core = getattr(self.engine, "engine_core", None)
        if hasattr(core, "pause_scheduler_async"):
            await core.pause_scheduler_async(mode="keep", clear_cache=False)
        else:
            await self.engine.pause_generation(mode="keep", clear_cache=False)

    async def _escalate(self, reply: dict[str, Any]) -> None:
        if reply.get("kind") == protocol.FATAL:
            await self._fail(reply["error"])

    def _schedule_sync(self) -> None:
        """(Re)arm the automatic sync: a burst of steps produces one sync, after the last."""
        if self.config.sync_delay_s <= 0:
            return
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        loop = asyncio.get_running_loop()
        self._sync_timer = loop.call_later(
            self.config.sync_delay_s, lambda: self._spawn(self._automatic_sync())
        )

    async def _automatic_sync(self) -> None:
        self._sync_timer = None
        try:
            await self.checkpoint()
        except (TrainerUnavailable, StepRefused) as exc:
            log.error("automatic checkpoint sync failed: %s", exc)

    async def checkpoint(self) -> dict[str, Any]:
        """Write the live weights into the model files now (shielded like a step)."""
        return await asyncio.shield(asyncio.ensure_future(self._checkpoint()))

    async def _checkpoint(self) -> dict[str, Any]:
        async with self._lock:
            self._require_ready()
            if self._sync_timer is not None:  # this sync covers every step so far
                self._sync_timer.cancel()
                self._sync_timer = None
            started = time.perf_counter()
            reply = await self._call({"op": "checkpoint"})
            if not reply["ok"]:
                await self._escalate(reply)
                raise StepRefused(reply["error"])
            result = {
                k: reply[k]
                for k in (
                    "weight_version",
                    "files",
                    "bytes_written",
                    "blocks_changed",
                    "blocks_total",
                    "tensors_skipped",
                )
            }
            result["elapsed_ms"] = (time.perf_counter() - started) * 1000
            self.bytes_synced += result["bytes_written"]
            self.syncs += 1
            self.last_sync = {**result, "at": time.time()}
            return result

    async def score(self, samples: list) -> dict[str, Any]:
        async with self._lock:
            self._require_ready()
            reply = await self._call({"op": "score", "samples": samples})
            if not reply["ok"]:
                raise StepRefused(reply["error"])
            return {
                "token_logprobs": reply["token_logprobs"],
                "loss": reply["loss"],
                "weight_version": self.weight_version,
            }

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "weight_version": self.weight_version,
            "steps": self.info.get("optimizer_steps", 0),
            "last_loss": self.last_loss,
            "settings": self.last_settings,
            "trainer_pid": self.process.pid if self.process else None,
            "optimizer_state_bytes": self.info.get("state_bytes", 0),
            **self.saved,
            "restarts": self.restarts,
            "last_sync": self.last_sync,
            "sync_pending": self._sync_timer is not None,
            "sync_due_in_s": (
                max(0.0, self._sync_timer.when() - asyncio.get_running_loop().time())
                if self._sync_timer is not None
                else None
            ),
            "bytes_synced": self.bytes_synced,
            "syncs": self.syncs,
            "model_dir": str(self.model_dir),
            "trainer": self.info,
        }
