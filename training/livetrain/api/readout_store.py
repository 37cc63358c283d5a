"""API server: the live readout's scores, kept by the id the client sees, and the
readouts they were scored with.

Rows arrive keyed by the engine's internal request id, which vLLM derives from the id
the client sees: `[{child}_]{cmpl-X-{prompt} | chatcmpl-X}-{8 hex}`. Each row records
the readout version it was scored with, so a swap mid-completion never mixes readouts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from livetrain.api.replies import ReadoutInfo, ReadoutStatus, ReadoutSummary, Scores
from livetrain.formats import readout_format
from livetrain.formats.messages import ScoreRecord, TapStats

INTERNAL_ID = re.compile(r"(?:(\d+)_)?(.+)-[0-9a-f]{8}")


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
        rows = self.prompts.get(choice) or self.choices[choice]
        return rows[min(rows)].version

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

    def add(
        self, record: ScoreRecord, fanout: Callable[[str], int | None] = lambda _id: None
    ) -> None:
        """Store one step's record; `fanout` gives a request's `n` where the engine knows
        it (n > 1 children reach the worker with n = 1)."""
        scores = np.frombuffer(record.scores, np.float32).reshape(record.shape)
        for k, internal in enumerate(record.req_ids):
            key = client_choice(internal, fanout(internal) or record.n[k])
            if key is None:
                continue
            entry = self.requests.get(key[0])
            if entry is None:
                entry = self.requests[key[0]] = RequestScores()
            self.requests.move_to_end(key[0])  # least recently updated first
            entry.internal_ids.add(internal)
            row = Scored(record.token_ids[k], record.version, scores[k])
            rows = entry.prompts if record.prompt[k] else entry.choices
            rows.setdefault(key[1], {})[record.index[k]] = row
            entry.updated = time.monotonic()
            entry.changed.set()
        self.expire()

    def versions_in_use(self) -> set[int]:
        """Readout versions some stored row was scored with."""
        return {
            row.version
            for entry in self.requests.values()
            for rows in (*entry.choices.values(), *entry.prompts.values())
            for row in rows.values()
        }

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
    steerable: bool  # has concept directions (format 2)

    @classmethod
    def of(cls, path: str, readout: readout_format.Readout) -> LoadedReadout:
        return cls(
            path,
            readout.concepts,
            readout.layers,
            readout.read_position,
            readout.calibration,
            readout.token_calibration,
            readout.steerable,
        )

    def describe(self) -> ReadoutInfo:
        return ReadoutInfo(
            loaded=True,
            path=self.path,
            concepts=self.concepts,
            layers=self.layers,
            read_position=self.read_position,
            calibrated=self.calibration is not None,
            steerable=self.steerable,
        )

    def z(self, scores: np.ndarray, cal: readout_format.Calibration | None) -> Scores | None:
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
    ) -> ReadoutSummary | None:
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
        return ReadoutSummary(
            rows=len(rows),
            scores={str(layer): mean[j].tolist() for j, layer in enumerate(self.layers)},
            z=self.z(mean, self.calibration),
        )


@dataclass
class ReadoutVersions:
    """Every readout loaded since launch, by version (each row names the one it was
    scored with); the worker scores new rows with `current`."""

    loaded: dict[int, LoadedReadout] = field(default_factory=dict)
    current: int = -1

    def add(self, version: int, path: str, readout: readout_format.Readout) -> LoadedReadout:
        self.loaded[version] = LoadedReadout.of(path, readout)
        self.current = version
        return self.loaded[version]

    def next_version(self) -> int:
        return max(self.loaded, default=0) + 1

    def prune(self, in_use: set[int]) -> None:
        """Forget readouts no stored row and no new row will need."""
        for version in [v for v in self.loaded if v != self.current and v not in in_use]:
            del self.loaded[version]

    def __getitem__(self, version: int) -> LoadedReadout:
        return self.loaded[version]

    def describe(self, captured: list[int], worker: TapStats) -> ReadoutStatus:
        loaded = self.loaded.get(self.current)
        info = loaded.describe() if loaded else ReadoutInfo(loaded=False)
        return ReadoutStatus(
            **msgspec.structs.asdict(info),
            version=self.current,
            versions_kept=sorted(self.loaded),
            captured_layers=captured,
            worker=worker,
        )
