"""Training subprocess: the trainer, which owns the model views, APOLLO and a step.

A step is split in two so that the API server can pause inference only while weights
are written:
  prepare: forward, backward, optimizer math; nothing served changes.
  apply:   write the prepared update into the shared weights (engine paused).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livetrain.checkpoint import sync as checkpoint_sync
from livetrain.checkpoint.files import fingerprint
from livetrain.checkpoint.lock import writing
from livetrain.config import OptimizerSettings, PluginConfig
from livetrain.formats import messages as msg
from livetrain.trainer import state as trainer_state
from livetrain.trainer.apollo import Apollo, DestructiveUpdate, PendingStep, RefusedUpdate
from livetrain.trainer.loss import continuation_logprobs, mean_loss
from livetrain.trainer.model import (
    AttachedModel,
    attach,
    recomputed_blocks,
    restore_weights,
    writes_landed,
)
from livetrain.trainer.per_layer import PerLayerStep
from livetrain.trainer.plan import train_plan
from livetrain.trainer.shards import copy_of
from livetrain.trainer.tensor_parallel import attach_sharded

log = logging.getLogger("livetrain.trainer")


@dataclass(frozen=True)
class UndoRecord:
    """What serving was before one applied step: the trained tensors' values (copies),
    the optimizer state (its tensors are replaced by later steps, never written) and
    the trained-sample record."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    trained: frozenset[bytes]


@dataclass(frozen=True)
class PreparedStep:
    """A step between prepare and apply, and what applying it records."""

    update: PendingStep | None  # None: a per-layer step, written already
    keys: set[bytes]  # sample_key of the samples it trains
    guard: msg.GuardCheck | None
    undo: UndoRecord | None  # None: no undo history is kept


def sample_key(context: list[int], continuation: list[int]) -> bytes:
    """SHA-256 of a sample's token ids (the split point included)."""
    digest = hashlib.sha256(len(context).to_bytes(8, "little"))
    for token in (*context, *continuation):
        digest.update(token.to_bytes(8, "little"))
    return digest.digest()


class Trainer:
    """Owns the model views, the optimizer and the pending (prepared) step.

    Built on an attached model (`from_attach` maps vLLM's weights; tests and the bench
    pass a Hugging Face model of their own); `weight_version` is the version vLLM
    serves, so a trainer started on trained weights knows the files lag behind."""

    def __init__(
        self,
        attached: AttachedModel,
        model_dir: Path,
        state_dir: Path | None = None,
        weight_version: int = 0,
        block_bytes: int = PluginConfig().sync_block_bytes,
        max_update_ratio: float = PluginConfig().max_update_ratio,
        sync_on_exit: bool = False,
        *,
        guard: msg.Guard | None = None,
        undo_steps: int = PluginConfig().undo_steps,
        recompute_above_tokens: int = PluginConfig().recompute_above_tokens,
        step_mode: str = PluginConfig().step_mode,
    ) -> None:
        self.attached, self.model_dir, self.state_dir = attached, model_dir, state_dir
        self.optimizer = Apollo(attached.apollo_params, attached.adamw_params)
        self.pending: PreparedStep | None = None
        self.guard = guard
        self._guard_loss: float | None = None  # on the served weights; None: not known
        self.history: deque[UndoRecord] = deque(maxlen=undo_steps)  # oldest first
        self.weight_version = weight_version
        self.block_bytes = block_bytes
        self.max_update_ratio = max_update_ratio
        self.sync_on_exit = sync_on_exit
        self.recompute_above_tokens = recompute_above_tokens
        self.step_mode = step_mode
        self.saved_version: int | None = None
        self.save_error: str | None = None
        self._saver: threading.Thread | None = None
        # Ids of parameters changed since the files were synced. After a restart on
        # trained weights we cannot know what the files already hold: compare everything.
        trained = weight_version > 0
        self.dirty: set[int] = {id(p) for p in attached.trainable.values()} if trained else set()
        self.trained: set[bytes] = set()  # sample_key of every sample a step was applied to

    @classmethod
    def from_attach(cls, request: msg.Attach) -> tuple[Trainer, msg.Attached]:
        """Map vLLM's weights, verify them, and resume any saved state that fits."""
        model_dir = Path(request.model_dir)
        # A torn write leaves the trainable tensors anywhere between two versions, even
        # at version 0; they are restored below, so only the frozen ones must match.
        trained = request.weight_version > 0 or request.restore_from_files
        attach_to = attach if len(request.exports) == 1 else attach_sharded
        attached = attach_to(model_dir, request.exports, request.families, weights_trained=trained)
        trainer = cls(
            attached,
            model_dir,
            Path(request.state_dir),
            request.weight_version,
            request.sync_block_bytes,
            request.max_update_ratio,
            request.sync_on_exit,
            guard=request.guard,
            undo_steps=request.undo_steps,
            recompute_above_tokens=request.recompute_above_tokens,
            step_mode=request.step_mode,
        )
        if request.restore_from_files:
            restored = trainer.rollback(request.weight_version + 1)
            resumed_from = restored.checkpoint_version
        else:
            resumed_from = trainer.resume()
        return trainer, msg.Attached(
            weight_version=trainer.weight_version,
            apollo_tensors=len(attached.apollo_params),
            adamw_tensors=len(attached.adamw_params),
            trainable_params=sum(p.numel() for p in attached.trainable.values()),
            trainable_names=sorted(attached.trainable),
            written_params=attached.written,
            frozen_tensors=len(attached.frozen),
            plan=attached.plan or train_plan(attached),
            resumed_from_version=resumed_from,
            guard_loss=trainer.guard_loss(),
            torch_threads=torch.get_num_threads(),
            optimizer=trainer.optimizer_status(),
        )

    def resume(self) -> int | None:
        """Load the saved optimizer state if it was written for the weights vLLM serves."""
        if self.weight_version == 0 and self._resume_checkpoint():
            return self.weight_version
        if self.state_dir is None:
            return None
        saved = trainer_state.load(self.state_dir)
        if saved is None:
            return None
        if 0 < saved["weight_version"] <= self.weight_version and self._adopt(saved):
            return saved["weight_version"]
        moved = trainer_state.set_aside(self.state_dir, "stale")
        log.warning(
            "optimizer state (version %s) is not for these weights; moved to %s",
            saved["weight_version"],
            moved,
        )
        return None

    def _resume_checkpoint(self) -> bool:
        """vLLM loaded the files: resume the state synced with them, if they are unchanged.

        The weight version continues from the checkpoint's, so the next step is the one
        an uninterrupted run would take.
        """
        if self.state_dir is None:
            return False
        saved = trainer_state.load(self.state_dir, trainer_state.CHECKPOINT_FILE)
        if saved is None or saved.get("files") != fingerprint(self.model_dir):
            return False
        if not self._adopt(saved):
            return False
        self.weight_version = saved["weight_version"]
        trainer_state.save(self.state_dir, self._snapshot())
        return True

    def rollback(self, weight_version: int) -> msg.RolledBack:
        """Make the served trainable weights equal the model files (the engine is paused),
        with the optimizer state and trained-sample record synced with them when the
        files are still the ones that sync wrote; otherwise a fresh optimizer state."""
        self.finish_save()
        self.discard()
        restore_weights(self.attached, self.model_dir)
        self.history.clear()  # the kept weights were steps on top of other weights
        self._guard_loss = None
        saved = None
        if self.state_dir is not None:
            saved = trainer_state.load(self.state_dir, trainer_state.CHECKPOINT_FILE)
        self.optimizer = Apollo(self.attached.apollo_params, self.attached.adamw_params)
        self.trained, self.dirty = set(), set()
        checkpoint_version = None
        if saved is not None and saved.get("files") == fingerprint(self.model_dir):
            checkpoint_version = saved["weight_version"] if self._adopt(saved) else None
        self.weight_version = weight_version
        self._start_save()
        return msg.RolledBack(weight_version, checkpoint_version, None, self.optimizer_status(), 0)

    def undo(self, steps: int, weight_version: int) -> msg.RolledBack | msg.Failed:
        """Serve the weights from before the last `steps` applied steps again, bit for
        bit, with the optimizer state and trained-sample record of that moment (the
        engine is paused). Only steps kept in memory (`undo_steps`) can be undone."""
        if not 1 <= steps <= len(self.history):
            kept = self.history.maxlen
            return refused(
                f"steps: {steps} steps cannot be undone; {len(self.history)} can (the "
                f"trainer keeps the last {kept}, LIVETRAIN_UNDO_STEPS, in memory; a "
                "restart or a rollback to the files clears them)",
                status=409,
            )
        self.discard()
        for _ in range(steps - 1):
            self.history.pop()
        record = self.history.pop()
        params = self.attached.trainable
        with torch.no_grad():
            for name, value in record.weights.items():
                params[name].copy_(value)
        writes_landed(self.attached)
        self.optimizer.load_state_dict(record.optimizer)
        self.trained, self._guard_loss = set(record.trained), None
        self.weight_version = weight_version
        self._start_save()
        return msg.RolledBack(
            weight_version, None, steps, self.optimizer_status(), len(self.history)
        )

    def _adopt(self, saved: dict[str, Any]) -> bool:
        """Take over a saved optimizer state and trained-sample record, if they fit."""
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as exc:
            log.warning("saved optimizer state does not fit this model: %s", exc)
            return False
        self.saved_version = saved["weight_version"]
        self.trained = trainer_state.samples_set(saved.get("trained_samples"))
        return True

    def _snapshot(self) -> dict[str, Any]:
        """What a state file holds; the tensors are never written to afterwards."""
        return {
            "weight_version": self.weight_version,
            "optimizer": self.optimizer.state_dict(),
            "trained_samples": trainer_state.samples_tensor(self.trained),
        }

    def optimizer_status(self) -> msg.OptimizerStatus:
        return msg.OptimizerStatus(
            optimizer_steps=self.optimizer.steps, state_bytes=self.optimizer.state_bytes()
        )

    def _start_save(self) -> None:
        """Save the state in the background, overlapping the next step's forward/backward.

        The snapshot stays valid while the thread runs: Apollo commits new state by
        swapping tensors, never by writing into them, and every op other than
        `prepare` waits for the save first (`finish_save`).
        """
        self.finish_save()
        snapshot, state_dir = self._snapshot(), self.state_dir
        if state_dir is None:  # a trainer without a state dir (tests, the bench) keeps none
            return

        def run() -> None:
            try:
                trainer_state.save(state_dir, snapshot)
                self.saved_version, self.save_error = snapshot["weight_version"], None
            except Exception as exc:  # surfaced in every reply and in /train/status
                log.exception("optimizer state not saved")
                self.save_error = f"{type(exc).__name__}: {exc}"

        self._saver = threading.Thread(target=run, name="livetrain-save")
        self._saver.start()

    def finish_save(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def prepare(
        self, samples: Sequence[msg.Sample], settings: OptimizerSettings, retrain: bool = False
    ) -> msg.Prepared | msg.Failed:
        """Forward, backward and optimizer math for one step; nothing served changes
        (but for a per-layer step, which writes each tensor during the backward pass)."""
        self.discard()
        keys = [sample_key(ctx, cont) for ctx, cont in samples]
        given = len(samples)
        if not retrain:
            fresh = [i for i, key in enumerate(keys) if key not in self.trained]
            if not fresh:
                return refused(
                    "every sample was already trained; send retrain: true to train on it again",
                    status=409,
                    reason="already_trained",
                )
            samples, keys = [samples[i] for i in fresh], [keys[i] for i in fresh]
        model = self.attached.model
        padded = len(samples) * max(len(ctx) + len(cont) for ctx, cont in samples)
        # a per-layer step frees each gradient at once; the blocks' activations, held
        # until the backward pass reaches them, are then what is left to free
        recompute = self.step_mode == "per_layer" or padded > self.recompute_above_tokens
        with torch.enable_grad(), recomputed_blocks(model) if recompute else nullcontext():
            loss = mean_loss(continuation_logprobs(model, samples))
            if not torch.isfinite(loss):
                return refused(f"non-finite loss ({loss.item()})", reason="nonfinite_loss")
            if self.step_mode == "per_layer":
                return self._per_layer(loss, settings, samples, keys, given - len(samples))
            loss.backward()
        try:
            update = self.optimizer.prepare(settings, self.max_update_ratio)
        except RefusedUpdate as exc:
            self.discard()
            too_large = isinstance(exc, DestructiveUpdate)
            return refused(str(exc), reason="update_too_large" if too_large else "nonfinite_update")
        guard = None
        if self.guard is not None:
            update = self.optimizer.preview(update)
            guard = self._judge(update, self.guard)
            if not (math.isfinite(guard.after) and guard.after - guard.before <= guard.max_rise):
                self.discard()
                return refused(
                    f"the guard set's loss would rise from {guard.before:.4f} to "
                    f"{guard.after:.4f}, more than max_rise {guard.max_rise:g}; nothing "
                    "was applied",
                    reason="guard",
                )
        undo = self._undo_record() if self.history.maxlen else None
        self.pending = PreparedStep(update, set(keys), guard, undo)
        return msg.Prepared(
            loss=loss.item(),
            tokens=sum(len(cont) for _, cont in samples),
            skipped_samples=given - len(samples),
            moments_reset=list(update.moments_reset),
            guard=guard,
        )

    def _per_layer(
        self,
        loss: torch.Tensor,
        settings: OptimizerSettings,
        samples: Sequence[msg.Sample],
        keys: list[bytes],
        skipped: int,
    ) -> msg.Prepared | msg.Failed:
        """The backward pass of a per-layer step, which writes each tensor's update as
        its gradient becomes whole (trainer/per_layer.py); apply() then only commits."""
        step = PerLayerStep(
            self.optimizer,
            self.attached.model,
            self.attached.trainable,
            settings,
            self.max_update_ratio,
        )
        with step.hooks():
            loss.backward()
        step.finish()
        if not step.written:
            self.discard()
            reasons = "; ".join(f"{n}: {r}" for n, r in sorted(step.refused.items()))
            return refused(
                f"every tensor's update was refused ({reasons}); nothing was written",
                reason="update_too_large" if step.too_large else "nonfinite_update",
            )
        self.pending = PreparedStep(None, set(keys), None, None)
        return msg.Prepared(
            loss=loss.item(),
            tokens=sum(len(cont) for _, cont in samples),
            skipped_samples=skipped,
            moments_reset=step.moments_reset,
            guard=None,
            refused_tensors=step.refused,
        )

    def _judge(self, update: PendingStep, guard: msg.Guard) -> msg.GuardCheck:
        """The guard set's mean loss on the served weights and on the step's result."""
        with torch.no_grad():
            values = self.attached.model_weights(update.values or {})
            after = continuation_logprobs(self.attached.model, guard.samples, values)
        before = self.guard_loss()
        assert before is not None  # a guard is set
        return msg.GuardCheck(before, mean_loss(after).item(), guard.max_rise)

    def guard_loss(self) -> float | None:
        """The guard set's mean loss on the served weights (kept until they change)."""
        if self.guard is not None and self._guard_loss is None:
            with torch.no_grad():
                logprobs = continuation_logprobs(self.attached.model, self.guard.samples)
            self._guard_loss = mean_loss(logprobs).item()
        return self._guard_loss

    def _undo_record(self) -> UndoRecord:
        weights = {name: copy_of(p) for name, p in self.attached.trainable.items()}
        return UndoRecord(weights, self.optimizer.state_dict(), frozenset(self.trained))

    def set_guard(self, guard: msg.Guard | None) -> msg.GuardSet | msg.Failed:
        """Replace the guard set; its loss on the served weights is the next baseline.
        A guard set whose loss is not finite is refused and the old one stays."""
        old = self.guard, self._guard_loss
        self.guard, self._guard_loss = guard, None
        loss = self.guard_loss()
        if loss is not None and not math.isfinite(loss):
            self.guard, self._guard_loss = old
            return refused(f"the guard set's loss is not finite ({loss}); guard unchanged")
        return msg.GuardSet(loss=loss)

    def apply(self, weight_version: int) -> msg.Applied | msg.Failed:
        """Write the prepared update into the served weights (vLLM is paused)."""
        if self.pending is None:
            return refused("no prepared step to apply")
        step = self.pending
        with torch.no_grad():
            if step.update is None:
                self.optimizer.end_step()
            else:
                self.optimizer.apply(step.update)
        writes_landed(self.attached)
        self.weight_version = weight_version
        self.dirty.update(id(p) for p in self.attached.trainable.values())
        self.trained |= step.keys
        if step.undo is not None:
            self.history.append(step.undo)
        if step.guard is not None:
            self._guard_loss = step.guard.after  # bit for bit what is now served
        self.discard()
        self._start_save()
        return msg.Applied(optimizer=self.optimizer_status(), undo_available=len(self.history))

    def checkpoint(self) -> msg.Synced | msg.Failed:
        """Write the live weights into the model's safetensors (changed blocks only)."""
        attached = self.attached
        # the state synced with the files is saved under the same lock: a server
        # restarted on the folder resumes from the pair
        with writing(self.model_dir, "checkpoint sync"):
            try:
                result = checkpoint_sync.sync(
                    self.model_dir,
                    live=attached.checkpoint_tensor,
                    dirty=lambda name: (
                        name in attached.checkpoint and id(attached.owner(name)) in self.dirty
                    ),
                    block_size=self.block_bytes,
                )
            except (OSError, checkpoint_sync.JournalCorrupt, checkpoint_sync.UnsafeModelDir) as e:
                return refused(f"checkpoint failed: {e}")
            self.dirty.clear()
            if self.state_dir is not None:
                snapshot = {**self._snapshot(), "files": fingerprint(self.model_dir)}
                trainer_state.save(self.state_dir, snapshot, trainer_state.CHECKPOINT_FILE)
        return msg.Synced(
            weight_version=self.weight_version,
            files=result.files,
            bytes_written=result.bytes_written,
            blocks_changed=result.blocks_changed,
            blocks_total=result.blocks_total,
            tensors_skipped=result.tensors_skipped,
            files_replaced=result.files_replaced,
        )

    def discard(self) -> None:
        """Forget a prepared step and its gradients (a refused or failed step)."""
        self.pending = None
        for param in self.attached.trainable.values():
            param.grad = None

    def score(self, samples: Sequence[msg.Sample]) -> msg.Scored:
        """Continuation log-probs as the trainer's model sees them; no step."""
        with torch.no_grad():
            logprobs = continuation_logprobs(self.attached.model, samples)
        return msg.Scored(
            token_logprobs=[lp.tolist() for lp in logprobs], loss=mean_loss(logprobs).item()
        )


def refused(
    error: str, status: int | None = None, reason: msg.RefusalReason = "error"
) -> msg.Failed:
    return msg.Failed(kind="refused", error=error, status=status, reason=reason)
