"""API server: the training subprocess as an object: start it, send it typed requests,
await its typed replies, learn when it exits.

One DEALER socket per trainer incarnation, bound on a private ipc:// path; each request
carries an id and its reply is delivered to the future waiting on that id. Nothing here
decides what to do about a failure: that is the supervisor's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from livetrain.formats.messages import Reply, TrainerRequest, decode, encode


class TrainerExited(RuntimeError):
    """The trainer process ended while a request was waiting for its reply."""


class TrainerProcess:
    def __init__(self, runtime_dir: Path, incarnation: int) -> None:
        # The pid keeps a restarted server's socket apart from the old one, which a
        # trainer still finishing its exit sync would otherwise reconnect to.
        self.endpoint = f"ipc://{runtime_dir}/trainer-{os.getpid()}-{incarnation}.sock"
        self.process: asyncio.subprocess.Process | None = None
        self.saved_version: int | None = None  # as of the latest reply
        self.save_error: str | None = None
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.endpoint)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, on_exit: Callable[[TrainerProcess, int], Awaitable[None]]) -> None:
        """Start `python -m livetrain.trainer`; `on_exit(self, code)` runs when it ends."""
        self._spawn(self._read_replies())
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "livetrain.trainer", "--connect", self.endpoint
        )
        self._spawn(self._watch(self.process, on_exit))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(
        self,
        process: asyncio.subprocess.Process,
        on_exit: Callable[[TrainerProcess, int], Awaitable[None]],
    ) -> None:
        code = await process.wait()
        self._fail_pending(TrainerExited(f"trainer exited with code {code}"))
        self.close()
        await on_exit(self, code)

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def _read_replies(self) -> None:
        with contextlib.suppress(zmq.ZMQError, asyncio.CancelledError):
            while True:
                frame = await self._socket.recv()
                try:
                    reply = decode(frame, Reply)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    self._fail_pending(TrainerExited(f"undecodable reply from the trainer: {exc}"))
                    continue
                self.saved_version, self.save_error = reply.saved_version, reply.save_error
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)

    def next_id(self) -> int:
        return next(self._ids)

    async def call(self, request: TrainerRequest, timeout: float | None = None) -> Reply:
        """Send `request` (built with `next_id()`) and wait for its reply."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        await self._socket.send(encode(request))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request.id, None)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def close(self) -> None:
        self._socket.close(linger=0)
