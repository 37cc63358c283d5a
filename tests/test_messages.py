"""The typed messages of formats/messages.py: every message survives the wire as itself,
a malformed one is refused naming the field, and a real training subprocess answers
bad requests (malformed frames, another protocol version, no attach yet) without dying."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest
import zmq

from livetrain.config import OptimizerSettings, TrainableFamilies
from livetrain.formats import messages as msg

EXPORT = msg.WeightExport(
    params={
        "w": msg.CpuFdHandle(
            pid=1, fd=3, nbytes=64, dtype="float32", shape=[4, 4], stride=[4, 1], offset=0
        )
    },
    map={"model.w": msg.TensorView("w", 4, [3, 4], [4, 1], [1, 0])},
    dropped=["lm_head.weight"],
)
PLAN = msg.TrainPlan(
    dtype="float32",
    groups=[msg.PlanGroup("linear", "apollo", 14, 1000, 4000)],
    trainable_bytes=4000,
    gradient_bytes=4000,
    largest_gradient_bytes=1000,
    optimizer_bytes=512,
    rank=64,
    logits_bytes_per_token=8000,
)
REQUESTS = [
    msg.Attach(
        id=0,
        protocol_version=msg.PROTOCOL_VERSION,
        model_dir="/m",
        state_dir="/s",
        exports=[EXPORT],
        families=TrainableFamilies(norms=True, layers=(0, 3)),
        weight_version=3,
        sync_block_bytes=4096,
        max_update_ratio=0.1,
        sync_on_exit=True,
        restore_from_files=False,
        guard=msg.Guard(samples=[([1], [2])], max_rise=0.5),
        undo_steps=2,
        recompute_above_tokens=512,
        step_mode="per_layer",
    ),
    msg.Prepare(id=1, samples=[([1, 2], [3])], settings=OptimizerSettings(lr=0.5), retrain=True),
    msg.Apply(id=2, weight_version=4),
    msg.Score(id=3, samples=[([1], [2, 3])]),
    msg.Checkpoint(id=4),
    msg.Rollback(id=5, weight_version=9),
    msg.Rollback(id=6, weight_version=10, steps=2),
    msg.SetGuard(id=7, guard=msg.Guard(samples=[([4], [5, 6])], max_rise=0.0)),
]
BODIES = [
    msg.Attached(
        3, 14, 0, 1000, ["a.weight"], ["a.w"], 5, PLAN, None, None, 2, msg.OptimizerStatus(0, 0)
    ),
    msg.Prepared(loss=1.5, tokens=3, skipped_samples=0, moments_reset=["a"], guard=None),
    msg.Prepared(1.5, 3, 0, [], None, refused_tensors={"w": "non-finite gradient"}),
    msg.Prepared(1.5, 3, 0, [], msg.GuardCheck(before=2.0, after=1.9, max_rise=0.05)),
    msg.Applied(msg.OptimizerStatus(1, 123), undo_available=1),
    msg.Scored(token_logprobs=[[-0.5, -1.0]], loss=0.75),
    msg.Synced(4, ["model.safetensors"], 4096, 1, 10, 0),
    msg.RolledBack(9, 4, None, msg.OptimizerStatus(3, 100), 0),
    msg.RolledBack(10, None, 2, msg.OptimizerStatus(1, 100), 0),
    msg.GuardSet(loss=2.5),
    msg.Failed(kind="refused", error="no", status=409),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips_as_itself(request_):
    assert msg.decode(msg.encode(request_), msg.TrainerRequest) == request_


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_reply_round_trips_as_itself(body):
    reply = msg.Reply(id=7, body=body, trainer_ms=1.25, saved_version=2, save_error=None)
    assert msg.decode(msg.encode(reply), msg.Reply) == reply


def test_settings_arrive_typed():
    (_, prepare, *_) = REQUESTS
    decoded = msg.decode(msg.encode(prepare), msg.TrainerRequest)
    assert isinstance(decoded.settings, OptimizerSettings)
    assert decoded.settings.betas == (0.9, 0.999)  # a tuple again, not a list


def test_a_missing_field_is_named():
    frame = msgspec.msgpack.encode({"op": "apply", "id": 5})
    with pytest.raises(msgspec.ValidationError, match="weight_version"):
        msg.decode(frame, msg.TrainerRequest)


def test_an_unknown_op_is_refused():
    frame = msgspec.msgpack.encode({"op": "exec", "id": 5, "code": "import os"})
    with pytest.raises(msgspec.ValidationError, match="exec"):
        msg.decode(frame, msg.TrainerRequest)


def test_score_records_are_compact_arrays():
    record = msg.ScoreRecord(0, ["r"], [0], [1], [False], [5], (1, 1, 2), bytes(8))
    assert isinstance(msgspec.msgpack.decode(msg.encode(record)), list)
    assert msg.decode(msg.encode(record), msg.ScoreRecord) == record


@pytest.fixture
def trainer_process():
    """A real training subprocess on a DEALER socket bound here, as the API server does."""
    with tempfile.TemporaryDirectory() as run:
        endpoint = f"ipc://{Path(run) / 'trainer.sock'}"
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(endpoint)
        process = subprocess.Popen(
            [sys.executable, "-m", "livetrain.trainer", "--connect", endpoint]
        )

        def ask(frame: bytes) -> msg.Reply:
            socket.send(frame)
            assert socket.poll(60_000), "the trainer did not answer"
            return msg.decode(socket.recv(), msg.Reply)

        try:
            yield ask
            assert process.poll() is None, "a bad request must not end the trainer"
        finally:
            process.kill()
            process.wait()
            socket.close()


def test_the_trainer_answers_bad_requests_and_keeps_running(trainer_process):
    garbage = trainer_process(b"\xc1 not msgpack")
    assert garbage.id == -1 and isinstance(garbage.body, msg.Failed)
    assert "malformed request" in garbage.body.error

    missing = trainer_process(msgspec.msgpack.encode({"op": "apply", "id": 11}))
    assert missing.id == 11 and missing.body.kind == "refused"
    assert "weight_version" in missing.body.error

    early = trainer_process(msg.encode(msg.Apply(id=12, weight_version=1)))
    assert early.id == 12 and early.body == msg.Failed(
        kind="refused", error="trainer is not attached"
    )

    other = msgspec.structs.replace(REQUESTS[0], id=13, protocol_version=msg.PROTOCOL_VERSION + 1)
    mismatch = trainer_process(msg.encode(other))
    assert mismatch.id == 13 and mismatch.body.kind == "fatal"
    assert f"protocol version {msg.PROTOCOL_VERSION + 1}" in mismatch.body.error
