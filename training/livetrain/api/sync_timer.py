"""API server: the delayed automatic checkpoint sync.

Each step re-arms the timer, so a burst of steps produces one sync, after the last;
an explicit sync disarms it, since it covers every step so far.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class SyncTimer:
    def __init__(self, delay_s: float, sync: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.delay_s, self._sync = delay_s, sync
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def arm(self, delay_s: float | None = None) -> None:
        """(Re)start the countdown (`delay_s`, default the configured delay); a configured
        delay of 0 disables automatic syncs."""
        if self.delay_s <= 0:
            return
        self.disarm()
        when = self.delay_s if delay_s is None else delay_s
        self._handle = asyncio.get_running_loop().call_later(when, self._fire)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        task = asyncio.get_running_loop().create_task(self._sync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> bool:
        return self._handle is not None

    def due_in_s(self) -> float | None:
        if self._handle is None:
            return None
        return max(0.0, self._handle.when() - asyncio.get_running_loop().time())
