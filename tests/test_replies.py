"""README's reply tables list exactly the fields the routes answer with (the typed
classes of api/replies.py), and those classes encode to plain JSON."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from livetrain.api import replies
from livetrain.formats.messages import GuardCheck, TapStats

README = (Path(__file__).parent.parent / "README.md").read_text()

ROUTES = [
    ("POST /train`", "reply field", replies.TrainReply),
    ("POST /train/score`", "reply field", replies.ScoreReply),
    ("POST /checkpoint`", "reply field", replies.CheckpointReply),
    ("POST /train/rollback`", "reply field", replies.RollbackReply),
    ("POST /train/guard`", "reply field", replies.GuardReply),
    ("GET /train/status`", "reply field", replies.StatusReply),
    ("GET /train/status`", "`trainer` field", replies.TrainerInfo),
    ("GET /readout/{id}`", "reply field", replies.ReadoutReply),
    ("GET /readout/{id}`", "row field", replies.TokenRow),
    ("GET /readout/{id}`", "`summary` field", replies.ReadoutSummary),
    ("GET /readout`", "reply field", replies.ReadoutStatus),
    ("POST /readout/load`", "reply field", replies.ReadoutInfo),
]


def documented(route: str, header: str) -> set[str]:
    """The first column of the table headed `| {header} |` in the README section
    whose heading names `route`."""
    section = re.split(r"\n### ", README.split(f"### `{route}", 1)[1], maxsplit=1)[0]
    table = section.split(f"| {header} | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1] for line in table.strip().splitlines()[1:]]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row)}


@pytest.mark.parametrize(("route", "header", "reply"), ROUTES, ids=lambda x: str(x))
def test_the_readme_lists_exactly_the_fields_a_route_answers_with(route, header, reply):
    assert documented(route, header) == set(reply.__struct_fields__)


def test_a_sync_error_and_the_last_sync_are_documented_by_field():
    status = README.split("### `GET /train/status`", 1)[1]
    for field in replies.SyncError.__struct_fields__:
        assert f"`{field}`" in status
    assert set(replies.LastSync.__struct_fields__) == {
        *replies.CheckpointReply.__struct_fields__,
        "at",
    }


def test_the_readout_workers_fields_and_stream_events_are_documented():
    section = README.split("### `GET /readout`\n", 1)[1].split("\n### ", 1)[0]
    assert "`{" + ", ".join(TapStats.__struct_fields__) + "}`" in section
    stream = README.split("### `GET /readout/{id}/stream`", 1)[1].split("\n### ", 1)[0]
    header = ", ".join(f"`{f}`" for f in replies.ReadoutHeader.__struct_fields__)
    assert header in stream


def test_fields_that_do_not_apply_are_left_out():
    """A readout row without a calibration has no `z` at all (not a null)."""
    row = replies.TokenRow(index=0, token_id=5, text=None, scores={"1": [0.5]})
    assert replies.to_json(row) == {"index": 0, "token_id": 5, "text": None, "scores": {"1": [0.5]}}


def test_replies_encode_to_plain_json():
    step = replies.TrainReply(
        loss=1.5,
        tokens=3,
        skipped_samples=0,
        weight_version=2,
        optimizer_steps=2,
        moments_reset=[],
        refused_tensors={"w": "non-finite gradient"},
        guard=GuardCheck(1.0, 1.1, 0.5),
        undo_available=0,
        pause_ms=1.0,
        update_ms=2.0,
        repack=replies.Repack(0, 0.0, False),
        trainer_ms=replies.StepTimes(3.0, 4.0),
        elapsed_ms=9.0,
    )
    body = msgspec.json.decode(msgspec.json.encode(replies.to_json(step)))
    assert body["guard"] == {"before": 1.0, "after": 1.1, "max_rise": 0.5}
    assert body["repack"] == {"tensors": 0, "ms": 0.0, "ahead": False}
    assert body["trainer_ms"] == {"prepare": 3.0, "apply": 4.0}
