"""API server: drains the workers' score ring into the readout store.

The worker appends one `ScoreRecord` per engine step to the shared-memory ring
(worker/readout_tap.py); a task here drains it every few milliseconds, and every reply
drains it first, so a reply reflects every step that has finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import msgspec

from livetrain.api.metrics import DropReason, Metrics
from livetrain.api.readout_store import ReadoutStore
from livetrain.formats.messages import ScoreRecord, decode
from livetrain.formats.score_ring import ScoreRing

log = logging.getLogger("livetrain.readout")
DRAIN_EVERY_S = (0.005, 0.05)  # while records arrive, and when idle
MAX_FANOUTS = 100_000  # parents' n of recent n > 1 readout requests


class ScoreCollector:
    def __init__(self, ring: ScoreRing, store: ReadoutStore, metrics: Metrics) -> None:
        self.ring, self.store, self.metrics = ring, store, metrics
        self.fanouts: OrderedDict[str, int] = OrderedDict()  # engine id -> parent's n
        self._ring_dropped = 0  # the ring's drop count as of the last drain

    def note_fanout(self, request_id: str, extra_args: dict[str, Any], parent_n: int) -> None:
        """Remember a readout child's parent `n` (vllm_internals.watch_added_requests)."""
        if extra_args.get("readout"):
            self.fanouts[request_id] = parent_n
            while len(self.fanouts) > MAX_FANOUTS:
                self.fanouts.popitem(last=False)

    def drain(self) -> int:
        """Store every record the worker has written so far; how many there were."""
        records = self.ring.drain()
        malformed = 0
        for record in records:
            try:
                self.store.add(decode(record, ScoreRecord), self.fanouts.get)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
                log.exception("live readout: dropped a malformed record")
                malformed += 1
        ring_dropped, self._ring_dropped = self.ring.dropped - self._ring_dropped, self.ring.dropped
        if records or ring_dropped:
            drops: dict[DropReason, int] = {"ring_full": ring_dropped, "malformed": malformed}
            self.metrics.readout(len(records) - malformed, drops)
        return len(records)

    async def run(self) -> None:
        busy, idle = DRAIN_EVERY_S
        while True:
            await asyncio.sleep(busy if self.drain() else idle)
