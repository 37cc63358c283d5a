"""Training subprocess: entry point and request loop.

Started by the API server (`python -m livetrain.trainer --connect ipc://...`). It
answers each `TrainerRequest` (formats/messages.py) with one `Reply`; the work itself
is the Trainer's (trainer.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

import msgspec
import torch
import zmq

from livetrain.checkpoint.lock import writing
from livetrain.formats import messages as msg
from livetrain.trainer.model import AttachError
from livetrain.trainer.trainer import Trainer, refused

log = logging.getLogger("livetrain.trainer")


def fatal(error: str) -> msg.Failed:
    return msg.Failed(kind="fatal", error=error)


def _attach(request: msg.Attach) -> tuple[Trainer | None, msg.ReplyBody]:
    if request.protocol_version != msg.PROTOCOL_VERSION:
        return None, fatal(
            f"protocol version {request.protocol_version} from the API server, but this "
            f"trainer speaks {msg.PROTOCOL_VERSION}: both must come from one livetrain install"
        )
    return Trainer.from_attach(request)


def _run(trainer: Trainer, request: msg.TrainerRequest) -> msg.ReplyBody:
    if isinstance(request, msg.Prepare):
        return trainer.prepare(request.samples, request.settings, request.retrain)
    trainer.finish_save()  # every op but prepare waits for the background save
    if isinstance(request, msg.Apply):
        return trainer.apply(request.weight_version)
    if isinstance(request, msg.Score):
        return trainer.score(request.samples)
    if isinstance(request, msg.Checkpoint):
        return trainer.checkpoint()
    if isinstance(request, msg.Rollback):
        if request.steps is not None:
            return trainer.undo(request.steps, request.weight_version)
        return trainer.rollback(request.weight_version)
    if isinstance(request, msg.SetGuard):
        return trainer.set_guard(request.guard)
    return refused("already attached")


def handle(
    trainer: Trainer | None, request: msg.TrainerRequest
) -> tuple[Trainer | None, msg.ReplyBody]:
    """(the trainer after the request, the reply's body). A failure in attach or apply
    is fatal: the views, or the served weights, can no longer be vouched for."""
    op = type(request).__name__.lower()
    try:
        if isinstance(request, msg.Attach):
            if trainer is not None:
                return trainer, refused("already attached")
            return _attach(request)
        if trainer is None:
            return None, refused("trainer is not attached")
        return trainer, _run(trainer, request)
    except AttachError as exc:
        return trainer, fatal(str(exc))
    except Exception as exc:  # reported to the API server, which decides what to do
        log.exception("op %s failed", op)
        if trainer is not None:
            trainer.discard()
        error = f"{type(exc).__name__}: {exc}"
        writes = ("attach", "apply", "rollback")  # a failure there leaves unknown weights
        return trainer, fatal(error) if op in writes else refused(error)


def _decode(frame: bytes) -> msg.TrainerRequest | msg.Reply:
    """The request in `frame`, or the reply to send when it is not a valid one."""
    try:
        return msg.decode_request(frame)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        try:
            request_id = msg.decode(frame, msg.RequestId).id
        except (msgspec.ValidationError, msgspec.DecodeError):
            request_id = -1
        return msg.Reply(
            id=request_id,
            body=refused(f"malformed request: {exc}"),
            trainer_ms=0.0,
            saved_version=None,
            save_error=None,
        )


def _finish(trainer: Trainer | None) -> None:
    """Before exiting: let the state save land, and sync the steps the files lack when
    automatic syncs are on (the views stay valid on CPU after vLLM's worker exits: the
    mapping keeps the shared memory; on CUDA only while the worker still lives).

    The folder lock is taken first, before the state save: a server restarted on the
    folder at once then waits for this sync instead of loading the files before it."""
    if trainer is None:
        return
    if not (trainer.sync_on_exit and trainer.dirty):
        trainer.finish_save()
        return
    with writing(trainer.model_dir, "exit sync"):
        trainer.finish_save()
        log.info("syncing unsynced steps into %s before exiting", trainer.model_dir)
        result = trainer.checkpoint()
        log.info("exit sync: %s", result)


def serve(endpoint: str) -> None:
    """Answer requests until the API server (our parent) goes away or SIGTERM arrives
    (vLLM's graceful shutdown reaches the whole process group).

    Polling the parent pid is the other shutdown signal: vLLM owns the server's
    lifespan, and its engine processes are killed, not asked, when it stops.
    """
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    parent = os.getppid()
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    trainer: Trainer | None = None
    while os.getppid() == parent and not stopping.is_set():
        if not socket.poll(1000):
            continue
        request = _decode(socket.recv())
        if isinstance(request, msg.Reply):
            socket.send(msg.encode(request))
            continue
        started = time.perf_counter()
        trainer, body = handle(trainer, request)
        reply = msg.Reply(
            id=request.id,
            body=body,
            trainer_ms=(time.perf_counter() - started) * 1000,
            saved_version=trainer.saved_version if trainer else None,
            save_error=trainer.save_error if trainer else None,
        )
        socket.send(msg.encode(reply))
    log.info("trainer stopping (%s)", "SIGTERM" if stopping.is_set() else "parent exited")
    _finish(trainer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="livetrain training subprocess")
    parser.add_argument("--connect", required=True, help="ZMQ endpoint of the API server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="livetrain.trainer %(levelname)s %(message)s")
    torch.set_grad_enabled(False)
    serve(args.connect)


if __name__ == "__main__":
    main()
