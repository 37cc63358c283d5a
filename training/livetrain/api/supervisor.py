"""API server: the one owner of both vLLM's engine client and the trainer.

It serialises trainer operations (one at a time, in arrival order; one cancelled while
it waits, because its client hung up, never runs) and fences the weight write:
inference is paused only between `Prepare` (done while serving) and the end of
`Apply`, then the prefix cache is dropped so no KV computed with the old weights is
reused. It restarts a trainer that exits, up to a limit; after one died while writing,
generation stays paused until the next one has restored the weights from the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from livetrain import vllm_internals as vllm
from livetrain.api import replies
from livetrain.api.metrics import Metrics, SyncTrigger, TrainerState
from livetrain.api.sync_timer import SyncTimer
from livetrain.api.trainer_process import TrainerExited, TrainerProcess
from livetrain.checkpoint.files import checkpoint_tensors, quantized
from livetrain.config import OptimizerSettings, PluginConfig
from livetrain.formats import messages as msg

log = logging.getLogger("livetrain.api")
SYNC_RETRY_S = 30.0  # first retry of a failed automatic sync; doubles up to sync_delay_s
PACK_POLL_S = 0.005  # how often to ask whether the worker has packed fresh CPU copies
Body = TypeVar("Body", bound=msg.ReplyBody)
Result = TypeVar("Result")


class TrainerUnavailable(RuntimeError):
    """The trainer is starting or has failed; the message says which and why."""


class StepRefused(RuntimeError):
    """The trainer refused a request (e.g. non-finite loss); nothing was changed."""

    def __init__(
        self, message: str, status: int | None = None, reason: msg.RefusalReason = "error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


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
    def __init__(
        self,
        engine: Any,
        model_dir: Path,
        config: PluginConfig,
        metrics: Metrics,
        guard: msg.Guard | None = None,
    ) -> None:
        self.engine = engine
        self.model_dir = model_dir
        self.config = config
        self.metrics = metrics
        self.state = "starting"
        self.reason: str | None = "trainer is starting"
        self.weight_version = 0
        self.attached: msg.Attached | None = None
        self.optimizer = msg.OptimizerStatus(optimizer_steps=0, state_bytes=0)
        self.last_loss: float | None = None
        self.last_settings = OptimizerSettings()
        self.guard = guard  # kept here: a restarted trainer gets it in Attach
        self.guard_loss: float | None = None  # the guard set's loss on the served weights
        self.undo_available = 0
        self.restarts = 0  # in all
        self._restart_budget_used = 0  # since the last trainer that ran healthy_s
        self.trainer: TrainerProcess | None = None
        self._started_at = 0.0
        self.last_sync: replies.LastSync | None = None
        self.sync_error: replies.SyncError | None = None  # the last failed automatic sync
        self.bytes_synced = 0
        self.syncs = 0
        self.sync_timer = SyncTimer(config.sync_delay_s, self._automatic_sync)
        self._runtime_dir = config.private_runtime_dir()
        self._state_dir = model_state_dir(config, model_dir)
        self._lock = asyncio.Lock()
        self._writing = False  # True while the trainer writes into the served weights
        self._torn = False  # a write did not finish: generation paused until restored
        kernels = vllm.worker_settings(engine.vllm_config).cpu_kernels  # what the workers use
        self._packed_cpu = vllm.is_cpu() and kernels == "vllm"
        self._written: list[str] = []  # vLLM parameters the trainer writes (repacked after)
        self._unfenced_writes = False  # inference reads them only through packed copies
        self._launching: asyncio.Task[None] | None = None
        self._waiting = 0  # operations waiting for their turn
        self._operation: str | None = None  # the one running
        self._trainer_call: str | None = None  # the trainer request it awaits

    @property
    def state(self) -> TrainerState:
        return self._state

    @state.setter
    def state(self, state: TrainerState) -> None:
        self._state = state
        self.metrics.state(state)

    def _publish(self) -> None:
        """The served weights' gauges, after anything that may have changed them."""
        self.metrics.weights(self.weight_version, self.optimizer.optimizer_steps, self.guard_loss)

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._launching = asyncio.get_running_loop().create_task(self._launch())

    async def _launch(self) -> None:
        """Start a trainer. After one died writing weights (`_torn`), generation is still
        paused: the new one first restores the weights from the files, and only then
        does generation resume (also when that fails, with the reason in the state)."""
        self.state, self.reason = "starting", "trainer is starting"
        try:
            await self._start_trainer()
        except Exception as exc:
            log.exception("livetrain trainer failed to start")
            self._fail(f"trainer failed to start: {exc}")
        else:
            self.state, self.reason = "idle", None
            log.info("livetrain trainer ready (pid %s): %s", self.trainer_pid, self.attached)
        self._publish()
        await self._end_torn()

    async def _start_trainer(self) -> None:
        # A model that cannot train says so before any trainer runs (never half-attached).
        reason = quantized(self.model_dir, vllm.engine_quantization(self.engine))
        if reason is not None:
            raise TrainerUnavailable(reason)
        tensors = checkpoint_tensors(self.model_dir)
        frames = await self.engine.collective_rpc(
            "livetrain_export_weights", args=(msg.encode(tensors),)
        )
        exports = [msg.decode(frame, msg.WeightExport) for frame in frames]
        self.weight_version = parse_weight_version(await self.engine.get_weight_version())
        trainer = TrainerProcess(self._runtime_dir, self.restarts)
        await trainer.start(self._on_exit)
        self.trainer = trainer  # only now: status shows the previous pid until this one runs
        self._started_at = time.monotonic()
        attached, _ = await self._call(
            msg.Attach,
            msg.Attached,
            timeout=self.config.trainer_start_timeout_s,
            protocol_version=msg.PROTOCOL_VERSION,
            model_dir=str(self.model_dir),
            state_dir=str(self._state_dir),
            exports=exports,
            families=self.config.train,
            weight_version=self.weight_version,
            sync_block_bytes=self.config.sync_block_bytes,
            max_update_ratio=self.config.max_update_ratio,
            sync_on_exit=self.config.sync_delay_s > 0,
            restore_from_files=self._torn,
            guard=self.guard,
            undo_steps=self.config.undo_steps,
            recompute_above_tokens=self.config.recompute_above_tokens,
            step_mode=self.config.step_mode,
        )
        self._written = attached.written_params
        self._unfenced_writes = False
        if self._packed_cpu:
            (frame, *_) = await self.engine.collective_rpc(
                "livetrain_packed_copies", args=(self._written,)
            )
            self._unfenced_writes = msg.decode(frame, msg.PackedCopies).only_packed
        if self._torn or attached.weight_version != self.weight_version:  # written at attach
            await self._repack(attached.weight_version)
        if self._torn and not await self.engine.reset_prefix_cache(reset_running_requests=True):
            raise TrainerUnavailable("prefix cache reset refused after restoring the weights")
        if attached.weight_version != self.weight_version:  # resumed, or restored
            self.weight_version = attached.weight_version
            await self.engine.update_weight_version(str(self.weight_version))
        self.attached, self.optimizer = attached, attached.optimizer
        self.undo_available, self.guard_loss = 0, attached.guard_loss  # the trainer's

    async def _on_exit(self, trainer: TrainerProcess, code: int) -> None:
        if trainer is not self.trainer or self.state == "failed":
            return
        if self._writing:  # generation stays paused until the next trainer restores
            self._torn = True
            log.error("livetrain trainer exited (code %s) while writing weights", code)
        if time.monotonic() - self._started_at >= self.config.trainer_healthy_s:
            self._restart_budget_used = 0  # it ran healthy: this exit is not a crash loop
        if self._restart_budget_used >= self.config.trainer_max_restarts:
            self._fail(f"trainer exited with code {code}; restart limit reached")
            await self._end_torn()
            return
        self.restarts += 1
        self._restart_budget_used += 1
        self.metrics.restarted()
        log.warning("livetrain trainer exited with code %s; restarting", code)
        await self._launch()

    async def _end_torn(self) -> None:
        """Resume the generation a torn write left paused (restored, or not: then the
        failed state says the served weights may be partially updated)."""
        if not self._torn:
            return
        self._torn = False
        if self.state == "failed":
            self.reason = f"{self.reason}; the served weights may be partially updated"
        await self.engine.resume_generation()

    def _fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason
        if self.trainer is not None:
            self.trainer.kill()

    def _require_ready(self) -> TrainerProcess:
        if self.state in ("starting", "failed") or self.trainer is None:
            raise TrainerUnavailable(self.reason or self.state)
        return self.trainer

    async def _call(
        self,
        request: type[msg.TrainerRequest],
        expected: type[Body],
        timeout: float | None = None,
        **fields: Any,
    ) -> tuple[Body, float]:
        """One request to the trainer and the reply it must get, with the trainer's own
        time on it (ms): a `Failed` reply raises StepRefused (after failing the supervisor
        if it is fatal), an exit raises TrainerUnavailable, and so does a missed deadline,
        after killing the trainer (it is restarted like any trainer that exits)."""
        trainer = self.trainer
        assert trainer is not None
        if timeout is None:
            timeout = self.config.trainer_call_timeout_s
        try:
            self._trainer_call = request.__name__.lower()
            reply = await trainer.call(request(id=trainer.next_id(), **fields), timeout)
        except TrainerExited as exc:
            raise TrainerUnavailable(str(exc)) from None
        except asyncio.TimeoutError:
            op = request.__name__.lower()
            log.error("livetrain trainer missed the %s deadline (%s s); killing it", op, timeout)
            trainer.kill()
            self.state = "starting"  # until the exit is seen and a new trainer attached
            self.reason = (
                f"trainer did not answer {op} within {timeout:g} s; it was killed and restarts"
            )
            raise TrainerUnavailable(self.reason) from None
        finally:
            self._trainer_call = None
        body = reply.body
        if isinstance(body, msg.Failed):
            if body.kind == "fatal":
                self._fail(body.error)
            raise StepRefused(body.error, body.status, body.reason)
        if not isinstance(body, expected):
            self._fail(f"trainer answered {type(body).__name__} to {request.__name__}")
            raise TrainerUnavailable(self.reason)
        return body, reply.trainer_ms

    # ---- operations ----------------------------------------------------------------

    async def _serialised(self, name: str, operation: Callable[[], Awaitable[Result]]) -> Result:
        """Run `operation` once every earlier one is done. Cancelled while it waits for
        its turn (its client hung up), it never runs; once started it is shielded, so a
        hang-up cannot split a step or a write. `name` is what /train/status shows."""
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1

        async def run() -> Result:
            self._operation = name
            try:
                self._require_ready()
                return await operation()
            finally:
                self._operation = None
                self._publish()
                self._lock.release()

        return await asyncio.shield(asyncio.ensure_future(run()))

    async def train(
        self, samples: Sequence[msg.Sample], settings: OptimizerSettings, retrain: bool = False
    ) -> replies.TrainReply:
        """One optimizer step."""
        try:
            step = partial(self._train, list(samples), settings, retrain)
            return await self._serialised("train", step)
        except StepRefused as exc:
            self.metrics.refused(exc.reason)
            raise
        except TrainerUnavailable:
            self.metrics.refused("unavailable")
            raise

    async def _train(
        self, samples: list[msg.Sample], settings: OptimizerSettings, retrain: bool
    ) -> replies.TrainReply:
        started = time.perf_counter()
        self.state = "training"
        try:
            result = await self._step(samples, settings, retrain, started)
        finally:
            if self.state == "training":
                self.state = "idle"
        self.metrics.step(
            result.tokens,
            result.loss,
            result.elapsed_ms / 1000,
            result.pause_ms / 1000,
            result.update_ms / 1000,
        )
        return result

    async def _step(
        self,
        samples: list[msg.Sample],
        settings: OptimizerSettings,
        retrain: bool,
        started: float,
    ) -> replies.TrainReply:
        per_layer = self.config.step_mode == "per_layer"  # it writes while serving goes on
        async with self._tears(paused=False) if per_layer else contextlib.nullcontext():
            prepared, prepare_ms = await self._call(
                msg.Prepare, msg.Prepared, samples=samples, settings=settings, retrain=retrain
            )
        version = self.weight_version + 1
        computed = time.perf_counter()
        applied, apply_ms, pause_ms, repack = await self._write(msg.Apply, msg.Applied, version)
        update_ms = (time.perf_counter() - computed) * 1000
        self.last_loss, self.last_settings = prepared.loss, settings
        self.optimizer, self.undo_available = applied.optimizer, applied.undo_available
        if prepared.guard is not None:
            self.guard_loss = prepared.guard.after
        self.sync_timer.arm()
        return replies.TrainReply(
            loss=prepared.loss,
            tokens=prepared.tokens,
            skipped_samples=prepared.skipped_samples,
            weight_version=version,
            optimizer_steps=applied.optimizer.optimizer_steps,
            moments_reset=prepared.moments_reset,
            refused_tensors=prepared.refused_tensors,
            guard=prepared.guard,
            undo_available=self.undo_available,
            pause_ms=pause_ms,
            update_ms=update_ms,
            repack=repack,
            trainer_ms=replies.StepTimes(prepare=prepare_ms, apply=apply_ms),
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )

    async def _write(
        self,
        request: type[msg.Apply | msg.Rollback],
        expected: type[Body],
        version: int,
        **fields: Any,
    ) -> tuple[Body, float, float, replies.Repack]:
        """A write into the served weights, fenced: generation paused, the write (with
        its short deadline), the prefix cache dropped (running requests are recomputed:
        their KV came from the old weights), the new version announced, generation
        resumed. (body, trainer ms, pause ms, repack). A write that did not finish leaves
        generation paused until the next trainer has restored the weights (_launch).

        Where inference reads everything written only through vLLM's packed CPU copies
        (`_unfenced_writes`), the write and the packing of fresh copies run while
        generation goes on (it still serves the previous copies, whole), and the pause
        holds only the swap of the copies and the cache reset."""
        started = time.perf_counter()
        if not self._unfenced_writes:
            await vllm.pause_engine(self.engine)
        paused = started
        try:
            async with self._tears(paused=not self._unfenced_writes):
                body, trainer_ms = await self._call(
                    request,
                    expected,
                    timeout=self.config.trainer_apply_timeout_s,
                    weight_version=version,
                    **fields,
                )
            if self._unfenced_writes:
                await self._pack_ahead(version)
                paused = time.perf_counter()
                await vllm.pause_engine(self.engine)
            self.weight_version = version
            repacked = await self._repack(version)
            if not await self.engine.reset_prefix_cache(reset_running_requests=True):
                self._fail(f"prefix cache reset refused after writing version {version}")
                raise TrainerUnavailable(self.reason)
            await self.engine.update_weight_version(str(version))
        finally:
            if not self._torn:
                await self.engine.resume_generation()
        return body, trainer_ms, (time.perf_counter() - paused) * 1000, repacked

    @contextlib.asynccontextmanager
    async def _tears(self, paused: bool) -> AsyncIterator[None]:
        """Around a trainer call that writes the served weights: a trainer lost inside
        it leaves them torn, so generation is paused (if it was not) until the next
        trainer has restored them from the files."""
        self._writing = True
        try:
            yield
        except TrainerUnavailable as exc:
            self._torn = self.state != "failed"  # a restart restores, then resumes
            if self._torn and not paused:
                await vllm.pause_engine(self.engine)  # paused until restored, as fenced
            raise TrainerUnavailable(
                f"{exc}; the weights are being restored from the model files"
                if self._torn
                else str(exc)
            ) from None
        finally:
            self._writing = False

    async def _pack_ahead(self, version: int) -> None:
        """Have the worker pack fresh copies of the written weights in the background,
        and wait for it without holding generation."""
        try:
            await self.engine.collective_rpc("livetrain_repack_start", args=(self._written,))
            while True:
                (frame, *_) = await self.engine.collective_rpc("livetrain_repack_ready")
                if msg.decode(frame, msg.Repacked).ready:
                    return
                await asyncio.sleep(PACK_POLL_S)
        except Exception as exc:
            self._fail(f"packing vLLM's CPU weights for version {version} failed: {exc}")
            raise TrainerUnavailable(self.reason) from None

    async def _repack(self, version: int) -> replies.Repack:
        """Rebuild the worker's packed CPU kernels from the weights just written (vLLM
        keeps a packed copy of each; `LIVETRAIN_CPU_KERNELS`). Nothing to do on GPU or
        with plain kernels. A copy left stale would serve the old weights under the new
        version, so a failure here fails the server. Returns {tensors, ms, ahead}: the
        worker's packing time, and whether it ran ahead of the pause."""
        if not self._packed_cpu:
            return replies.Repack(tensors=0, ms=0.0, ahead=False)
        try:
            (frame, *_) = await self.engine.collective_rpc(
                "livetrain_repack", args=(self._written,)
            )
            repacked = msg.decode(frame, msg.Repacked)
            return replies.Repack(repacked.tensors, repacked.ms, ahead=self._unfenced_writes)
        except Exception as exc:
            self._fail(f"rebuilding vLLM's packed CPU weights for version {version} failed: {exc}")
            raise TrainerUnavailable(self.reason) from None

    async def rollback(self, steps: int | None = None) -> replies.RollbackReply:
        """Serve the weights in the model files again, or (`steps`) those from before
        the last `steps` steps."""
        return await self._serialised("rollback", lambda: self._rollback(steps))

    async def _rollback(self, steps: int | None) -> replies.RollbackReply:
        version = self.weight_version + 1
        rolled, trainer_ms, pause_ms, repack = await self._write(
            msg.Rollback, msg.RolledBack, version, steps=steps
        )
        self.metrics.paused(pause_ms / 1000)
        if steps is None:
            self.sync_timer.disarm()  # the served weights equal the files
        else:
            self.sync_timer.arm()  # they are earlier steps' weights, which the files may lack
        self.optimizer, self.last_loss = rolled.optimizer, None
        self.undo_available, self.guard_loss = rolled.undo_available, None
        return replies.RollbackReply(
            weight_version=version,
            checkpoint_version=rolled.checkpoint_version,
            undone_steps=rolled.undone_steps,
            undo_available=rolled.undo_available,
            optimizer_steps=rolled.optimizer.optimizer_steps,
            pause_ms=pause_ms,
            repack=repack,
            trainer_ms=trainer_ms,
        )

    async def set_guard(self, guard: msg.Guard | None) -> replies.GuardReply:
        """Replace the guard set (None removes it); answers its loss on the served weights."""
        return await self._serialised("guard", lambda: self._set_guard(guard))

    async def _set_guard(self, guard: msg.Guard | None) -> replies.GuardReply:
        if guard is not None and self.config.step_mode == "per_layer":
            raise StepRefused(
                "a per-layer step (LIVETRAIN_STEP_MODE=per_layer) is written during its "
                "backward pass, so no guard set can judge it first",
                status=409,
            )
        answer, _ = await self._call(msg.SetGuard, msg.GuardSet, guard=guard)
        self.guard, self.guard_loss = guard, answer.loss
        return replies.GuardReply(guard=self.guard_status())

    def guard_status(self) -> replies.GuardStatus | None:
        if self.guard is None:
            return None
        return replies.GuardStatus(
            samples=len(self.guard.samples),
            tokens=sum(len(cont) for _, cont in self.guard.samples),
            max_rise=self.guard.max_rise,
            loss=self.guard_loss,
        )

    async def _automatic_sync(self) -> None:
        """The timer's sync; a failure is kept for /train/status and retried, waiting
        twice as long each time (from SYNC_RETRY_S up to sync_delay_s)."""
        try:
            await self.checkpoint("automatic")
        except (TrainerUnavailable, StepRefused) as exc:
            failures = (self.sync_error.failures if self.sync_error else 0) + 1
            retry = min(SYNC_RETRY_S * 2 ** (failures - 1), self.config.sync_delay_s)
            self.sync_error = replies.SyncError(time.time(), str(exc), failures)
            log.error("automatic checkpoint sync failed (retry in %.0f s): %s", retry, exc)
            self.sync_timer.arm(retry)

    async def checkpoint(self, trigger: SyncTrigger = "manual") -> replies.CheckpointReply:
        """Write the live weights into the model files now (shielded like a step)."""
        try:
            result = await self._serialised("checkpoint", self._checkpoint)
        except (TrainerUnavailable, StepRefused):
            self.metrics.sync_failed()
            raise
        self.metrics.synced(trigger, result.bytes_written, result.elapsed_ms / 1000)
        return result

    async def _checkpoint(self) -> replies.CheckpointReply:
        self.sync_timer.disarm()  # this sync covers every step so far
        started = time.perf_counter()
        synced, _ = await self._call(msg.Checkpoint, msg.Synced)
        fields = msgspec.structs.asdict(synced)
        result = replies.CheckpointReply(
            **fields, elapsed_ms=(time.perf_counter() - started) * 1000
        )
        self.bytes_synced += synced.bytes_written
        self.syncs += 1
        self.last_sync = replies.LastSync(**msgspec.structs.asdict(result), at=time.time())
        self.sync_error = None
        return result

    async def score(self, samples: Sequence[msg.Sample]) -> replies.ScoreReply:
        return await self._serialised("score", lambda: self._score(list(samples)))

    async def _score(self, samples: list[msg.Sample]) -> replies.ScoreReply:
        scored, _ = await self._call(msg.Score, msg.Scored, samples=samples)
        return replies.ScoreReply(scored.token_logprobs, scored.loss, self.weight_version)

    # ---- status --------------------------------------------------------------------

    @property
    def trainer_pid(self) -> int | None:
        return self.trainer.pid if self.trainer else None

    def _trainer_info(self) -> replies.TrainerInfo | None:
        if self.attached is None:
            return None
        shown_elsewhere = {"weight_version", "optimizer", "guard_loss"}
        attached = msgspec.structs.asdict(self.attached)
        return replies.TrainerInfo(
            **{k: v for k, v in attached.items() if k not in shown_elsewhere},
            optimizer_steps=self.optimizer.optimizer_steps,
            state_bytes=self.optimizer.state_bytes,
        )

    def status(self) -> replies.StatusReply:
        return replies.StatusReply(
            state=self.state,
            reason=self.reason,
            weight_version=self.weight_version,
            steps=self.optimizer.optimizer_steps,
            last_loss=self.last_loss,
            settings=self.last_settings,
            trainer_pid=self.trainer_pid,
            optimizer_state_bytes=self.optimizer.state_bytes,
            saved_version=self.trainer.saved_version if self.trainer else None,
            save_error=self.trainer.save_error if self.trainer else None,
            restarts=self.restarts,
            guard=self.guard_status(),
            undo_available=self.undo_available,
            last_sync=self.last_sync,
            sync_error=self.sync_error,
            sync_pending=self.sync_timer.pending,
            sync_due_in_s=self.sync_timer.due_in_s(),
            bytes_synced=self.bytes_synced,
            syncs=self.syncs,
            model_dir=str(self.model_dir),
            trainer=self._trainer_info(),
            queue=replies.Queue(self._operation, self._trainer_call, self._waiting),
        )
