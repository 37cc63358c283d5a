"""Training subprocess: entry point and request loop.

Started by the API server (`python -m livetrain.trainer_main --connect ipc://...`),
it holds a Hugging Face model whose parameters are views of vLLM's weights and an
APOLLO optimizer. A step is split in two so that the API server can pause
inference only while weights are written:
  prepare: forward, backward, optimizer math; nothing served changes.
  apply:   write the prepared update into the shared weights (engine paused).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from livetrain import checkpoint_sync, protocol, trainer_state
from livetrain.apollo import Apollo, NonFiniteUpdate, PendingStep
from livetrain.checkpoint_files import fingerprint
from livetrain.config import OptimizerSettings, PluginConfig
from livetrain.trainer_loss import continuation_logprobs, mean_loss
from livetrain.trainer_model import AttachedModel, AttachError, attach

log = logging.getLogger("livetrain.trainer")


def sample_key(context: list[int], continuation: list[int]) -> bytes:
    """SHA-256 of a sample's token ids (the split point included)."""
    digest = hashlib.sha256(len(context).to_bytes(8, "little"))
    for token in (*context, *continuation):
        digest.update(token.to_bytes(8, "little"))
    return digest.digest()


def settings_from(message: dict[str, Any]) -> OptimizerSettings:
    given = message.get("settings", {})
    known = {f.name for f in dataclasses.fields(OptimizerSettings)}
    values = {k: (tuple(v) if k == "betas" else v) for k, v in given.items() if k in known}
    return OptimizerSettings(**values)


class Trainer:
    """Owns the model views, the optimizer and the pending (prepared) step."""

    def __init__(self) -> None:
        self.attached: AttachedModel | None = None
        self.optimizer: Apollo | None = None
        self.pending: PendingStep | None = None
        self.state_dir: Path | None = None
        self.weight_version = 0
        self.saved_version: int | None = None
        self.save_error: str | None = None
        self._saver: threading.Thread | None = None
        self.model_dir: Path | None = None
        self.block_bytes = PluginConfig().sync_block_bytes
        self.dirty: set[int] = set()  # ids of parameters changed since the files were synced
        self.trained: set[bytes] = set()  # sample_key of every sample a step was applied to
        self.pending_keys: set[bytes] = set()

    def attach(self, msg: dict[str, Any]) -> dict[str, Any]:
        config = PluginConfig(**msg["families"])
        self.state_dir, self.model_dir = Path(msg["state_dir"]), Path(msg["model_dir"])
        self.block_bytes = msg["sync_block_bytes"]
        self.weight_version = msg["weight_version"]
        trained = self.weight_version > 0
        self.attached = attach(self.model_dir, msg["export"], config, weights_trained=trained)
        self.optimizer = Apollo(self.attached.apollo_params, self.attached.adamw_params)
        # After a restart we cannot know what the files already hold: compare everything.
        self.dirty = {id(p) for p in self.attached.trainable.values()} if trained else set()
        resumed_from = self._resume()
        return {
            "weight_version": self.weight_version,
            "ok": True,
            "apollo_tensors": len(self.attached.apollo_params),
            "adamw_tensors": len(self.attached.adamw_params),
            "trainable_params": sum(p.numel() for p in self.attached.trainable.values()),
            "frozen_tensors": len(self.attached.frozen),
            "resumed_from_version": resumed_from,
            "torch_threads": torch.get_num_threads(),
            **self._optimizer_status(),
        }

    def _resume(self) -> int | None:
        """Load the saved optimizer state if it was written for the weights vLLM serves."""
        if self.weight_version == 0 and self._resume_checkpoint():
            return self.weight_version
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
        saved = trainer_state.load(self.state_dir, trainer_state.CHECKPOINT_FILE)
        if saved is None or saved.get("files") != fingerprint(self.model_dir):
            return False
        if not self._adopt(saved):
            return False
        self.weight_version = saved["weight_version"]
        trainer_state.save(self.state_dir, self._snapshot())
        return True

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

    def _optimizer_status(self) -> dict[str, Any]:
        return {
            "optimizer_steps": self.optimizer.steps,
            "state_bytes": self.optimizer.state_bytes(),
        }

    def _start_save(self) -> None:
        """Save the state in the background, overlapping the next step's forward/backward.

        The snapshot stays valid while the thread runs: Apollo commits new state by
        swapping tensors, never by writing into them, and every op other than
        `prepare` waits for the save first (`finish_save`).
        """
        self.finish_save()
        snapshot = self._snapshot()

        def run() -> None:
            try:
                trainer_state.save(self.state_dir, snapshot)
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

    def prepare(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.discard()
        settings = settings_from(msg)
        samples = msg["samples"]
        keys = [sample_key(ctx, cont) for ctx, cont in samples]
        if not msg.get("retrain", False):
            fresh = [i for i, key in enumerate(keys) if key not in self.trained]
            if not fresh:
                return protocol.failure(
                    protocol.REFUSED,
                    "every sample was already trained; send retrain: true to train on it again",
                    status=409,
                )
            samples, keys = [samples[i] for i in fresh], [keys[i] for i in fresh]
        model = self.attached.model
        with torch.enable_grad():
            loss = mean_loss(continuation_logprobs(model, samples))
            if not torch.isfinite(loss):
                return protocol.failure(protocol.REFUSED, f"non-finite loss ({loss.item()})")
            loss.backward()
        try:
            self.pending = self.optimizer.prepare(settings)
        except NonFiniteUpdate as exc:
            self.discard()
            return protocol.failure(protocol.REFUSED, str(exc))
        self.pending_keys = set(keys)
        return {
            "ok": True,
            "loss": loss.item(),
            "tokens": sum(len(cont) for _, cont in samples),
            "skipped_samples": len(msg["samples"]) - len(samples),
            "moments_reset": list(self.pending.moments_reset),
        }

    def apply(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.pending is None:
            return protocol.failure(protocol.REFUSED, "no prepared step to apply")
        with torch.no_grad():
            self.optimizer.apply(self.pending)
        if next(self.attached.model.parameters()).is_cuda:
            torch.cuda.synchronize()  # the write must land before vLLM resumes
        self.weight_version = msg["weight_version"]
        self.dirty.update(id(p) for p in self.attached.trainable.values())
        self.trained |= self.pending_keys
        self.discard()
        self._start_save()
        return {"ok": True, **self._optimizer_status()}

    def checkpoint(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Write the live weights into the model's safetensors (changed blocks only)."""
        params = dict(self.attached.model.named_parameters(remove_duplicate=False))
        try:
            result = checkpoint_sync.sync(
                self.model_dir,
                live=params.__getitem__,
                dirty=lambda name: id(params[name]) in self.dirty,
                block_size=self.block_bytes,
            )
        except (OSError, checkpoint_sync.JournalCorrupt) as exc:
            return protocol.failure(protocol.REFUSED, f"checkpoint failed: {exc}")
        self.dirty.clear()
        snapshot = {**self._snapshot(), "files": fingerprint(self.model_dir)}
        trainer_state.save(self.state_dir, snapshot, trainer_state.CHECKPOINT_FILE)
        return {"ok": True, "weight_version": self.weight_version, **dataclasses.asdict(result)}

    def discard(self) -> None:
        """Forget a prepared step and its gradients (a refused or failed step)."""
        self.pending, self.pending_keys = None, set()
        if self.attached is not None:
            for param in self.attached.trainable.values():
                param.grad = None

    def score(self, msg: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            logprobs = continuation_logprobs(self.attached.model, msg["samples"])
        return {
            "ok": True,
            "token_logprobs": [lp.tolist() for lp in logprobs],
            "loss": mean_loss(logprobs).item(),
        }


def handle(trainer: Trainer, msg: dict[str, Any]) -> dict[str, Any]:
    op = msg.get("op")
    if op not in ("attach", "prepare", "apply", "score", "checkpoint"):
        return protocol.failure(protocol.REFUSED, f"unknown op {op!r}")
    if op != "attach" and trainer.attached is None:
        return protocol.failure(protocol.REFUSED, "trainer is not attached")
    if op != "prepare":
        trainer.finish_save()
    try:
        return getattr(trainer, op)(msg)
    except AttachError as exc:
        return protocol.failure(protocol.FATAL, str(exc))
    except Exception as exc:  # reported to the API server, which decides what to do
        log.exception("op %s failed", op)
        kind = protocol.FATAL if op in ("attach", "apply") else protocol.REFUSED
        trainer.discard()
        return protocol.failure(kind, f"{type(exc).__name__}: {exc}")


def serve(endpoint: str) -> None:
    """Answer requests until the API server (our parent) goes away.

    Polling the parent pid is the shutdown signal: vLLM owns the server's lifespan,
    and its engine processes are killed, not asked, when it stops.
    """
    parent = os.getppid()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    trainer = Trainer()
    while os.getppid() == parent:
        if not socket.poll(1000):
            continue
        msg = protocol.decode(socket.recv())
        started = time.perf_counter()
        reply = handle(trainer, msg)
        reply["id"] = msg.get("id")
        reply["trainer_ms"] = (time.perf_counter() - started) * 1000
        reply["saved_version"], reply["save_error"] = trainer.saved_version, trainer.save_error
        socket.send(protocol.encode(reply))
    trainer.finish_save()
    log.info("parent process exited; trainer stopping")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, help="ZMQ endpoint of the API server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="livetrain.trainer %(levelname)s %(message)s")
    torch.set_grad_enabled(False)
    serve(args.connect)


if __name__ == "__main__":
    sys.exit(main())
