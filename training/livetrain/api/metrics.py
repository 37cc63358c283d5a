"""API server: livetrain's Prometheus metrics, served in vLLM's own `/metrics`.

vLLM's API server exposes prometheus_client's global registry (or, when the operator
sets `PROMETHEUS_MULTIPROC_DIR`, every process's metric files in that folder), so
metrics created here with prometheus_client appear beside `vllm:*` with nothing else
to mount. Every value is set where it changes, never computed at scrape time: in
multiprocess mode only what was written to those files is read (gauges keep the most
recent value, `multiprocess_mode="mostrecent"`). Labelled like vLLM's (`model_name`,
the served model name). The families are created once per process and shared.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from typing import Literal, get_args

from prometheus_client import Counter, Gauge, Histogram

from livetrain.formats.messages import RefusalReason

TrainerState = Literal["starting", "idle", "training", "failed"]
DropReason = Literal["ring_full", "malformed"]
SyncTrigger = Literal["manual", "automatic"]
_LABELS = ("model_name",)
_QUICK = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class _Families:
    steps: Counter
    tokens: Counter
    refused: Counter
    loss: Gauge
    step_seconds: Histogram
    pause_seconds: Histogram
    visible_seconds: Histogram
    weight_version: Gauge
    optimizer_steps: Gauge
    guard_loss: Gauge
    syncs: Counter
    sync_bytes: Counter
    sync_seconds: Histogram
    sync_errors: Counter
    restarts: Counter
    state: Gauge
    readout_records: Counter
    readout_dropped: Counter


def _gauge(name: str, doc: str, labels: tuple[str, ...] = _LABELS) -> Gauge:
    return Gauge(name, doc, labels, multiprocess_mode="mostrecent")


@cache
def _families() -> _Families:
    """Registered once per process: prometheus_client refuses a second registration."""
    return _Families(
        steps=Counter("livetrain_steps", "Optimizer steps applied to the served weights", _LABELS),
        tokens=Counter("livetrain_trained_tokens", "Continuation tokens in applied steps", _LABELS),
        refused=Counter(
            "livetrain_refused_steps",
            "POST /train requests that changed nothing, by reason",
            (*_LABELS, "reason"),
        ),
        loss=_gauge("livetrain_loss", "Mean continuation loss of the last applied step"),
        step_seconds=Histogram(
            "livetrain_step_seconds", "POST /train from start to reply", _LABELS, buckets=_SLOW
        ),
        pause_seconds=Histogram(
            "livetrain_pause_seconds",
            "Generation paused for a write into the served weights",
            _LABELS,
            buckets=_QUICK,
        ),
        visible_seconds=Histogram(
            "livetrain_update_visible_seconds",
            "From a step computed to a completion able to see it",
            _LABELS,
            buckets=_QUICK,
        ),
        weight_version=_gauge("livetrain_weight_version", "The weight version vLLM serves"),
        optimizer_steps=_gauge(
            "livetrain_optimizer_steps", "Steps in the optimizer state (resumed ones included)"
        ),
        guard_loss=_gauge(
            "livetrain_guard_loss", "The guard set's loss on the served weights (NaN: none)"
        ),
        syncs=Counter("livetrain_syncs", "Checkpoint syncs completed", (*_LABELS, "trigger")),
        sync_bytes=Counter("livetrain_sync_bytes", "Bytes written by checkpoint syncs", _LABELS),
        sync_seconds=Histogram(
            "livetrain_sync_seconds", "Checkpoint sync duration", _LABELS, buckets=_SLOW
        ),
        sync_errors=Counter("livetrain_sync_errors", "Failed checkpoint syncs", _LABELS),
        restarts=Counter("livetrain_trainer_restarts", "Training subprocess restarts", _LABELS),
        state=_gauge(
            "livetrain_trainer_state", "1 for the trainer's current state", (*_LABELS, "state")
        ),
        readout_records=Counter(
            "livetrain_readout_records", "Live readout step records collected", _LABELS
        ),
        readout_dropped=Counter(
            "livetrain_readout_dropped_records",
            "Live readout step records lost, by reason",
            (*_LABELS, "reason"),
        ),
    )


class Metrics:
    """One served model's view of the families: what the supervisor and the readout
    collector call as things happen."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._f = _families()
        # every series exists from the start, at zero: a rate over a series that
        # appears only with its first event misses that event
        extra = {
            "refused": get_args(RefusalReason),
            "readout_dropped": get_args(DropReason),
            "syncs": get_args(SyncTrigger),
            "state": (),  # set below
        }
        for f in fields(self._f):
            family = getattr(self._f, f.name)
            for value in extra.get(f.name, (None,)):
                family.labels(model_name, *([] if value is None else [value]))
        self._f.guard_loss.labels(model_name).set(float("nan"))
        self.state("starting")

    def step(
        self, tokens: int, loss: float, seconds: float, pause_s: float, visible_s: float
    ) -> None:
        f, m = self._f, self.model_name
        f.steps.labels(m).inc()
        f.tokens.labels(m).inc(tokens)
        f.loss.labels(m).set(loss)
        f.step_seconds.labels(m).observe(seconds)
        f.pause_seconds.labels(m).observe(pause_s)
        f.visible_seconds.labels(m).observe(visible_s)

    def refused(self, reason: RefusalReason) -> None:
        self._f.refused.labels(self.model_name, reason).inc()

    def paused(self, seconds: float) -> None:
        """A write other than a step (a rollback) held generation this long."""
        self._f.pause_seconds.labels(self.model_name).observe(seconds)

    def weights(self, version: int, optimizer_steps: int, guard_loss: float | None) -> None:
        m = self.model_name
        self._f.weight_version.labels(m).set(version)
        self._f.optimizer_steps.labels(m).set(optimizer_steps)
        self._f.guard_loss.labels(m).set(float("nan") if guard_loss is None else guard_loss)

    def synced(self, trigger: SyncTrigger, nbytes: int, seconds: float) -> None:
        m = self.model_name
        self._f.syncs.labels(m, trigger).inc()
        self._f.sync_bytes.labels(m).inc(nbytes)
        self._f.sync_seconds.labels(m).observe(seconds)

    def sync_failed(self) -> None:
        self._f.sync_errors.labels(self.model_name).inc()

    def restarted(self) -> None:
        self._f.restarts.labels(self.model_name).inc()

    def state(self, state: TrainerState) -> None:
        for each in get_args(TrainerState):
            self._f.state.labels(self.model_name, each).set(1 if each == state else 0)

    def readout(self, records: int, dropped: dict[DropReason, int]) -> None:
        m = self.model_name
        self._f.readout_records.labels(m).inc(records)
        for reason, count in dropped.items():
            if count:
                self._f.readout_dropped.labels(m, reason).inc(count)
