"""Checkpoint sync through real vLLM restarts: train, sync, restart, continue."""

from __future__ import annotations

import contextlib
import shutil
import time

import numpy as np
import pytest
from conftest import start_server

from livetrain.checkpoint_files import list_tensors

pytestmark = pytest.mark.server

# The same fp32 weights served by two vLLM processes: only run-to-run kernel noise.
RESTART_ATOL = 1e-5


def test_train_sync_restart_continue(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ckpt")
    model = shutil.copytree(models["llama"], workdir / "model")
    layout = {n: (e.dtype, e.shape, e.begin, e.end) for n, e in list_tensors(model).items()}
    size = (model / "model.safetensors").stat().st_size
    serve = contextlib.contextmanager(start_server)

    # No automatic sync on the first server, so the manual one below is the only one.
    with serve(model, workdir, None, env={"LIVETRAIN_SYNC_DELAY_S": "0"}) as first:
        context = first.tokenize("Snow fell on the station roof and")
        continuation = first.tokenize(" the last train waited with its doors open.")
        for _ in range(3):
            first.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        synced = first.continuation_logprobs(context, continuation)
        reply = first.http.post("/checkpoint").raise_for_status().json()
        assert reply["weight_version"] == 3 and reply["files"] == ["model.safetensors"]
        assert 0 < reply["blocks_changed"] <= reply["blocks_total"]
        assert reply["tensors_skipped"] == 7  # frozen: embeddings, lm_head, 5 norms
        again = first.http.post("/checkpoint", json={}).raise_for_status().json()
        assert again["blocks_changed"] == 0 and again["bytes_written"] == 0
        # The uninterrupted run's next step, to compare with the restarted one.
        first.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        uninterrupted = first.continuation_logprobs(context, continuation)

    assert {n: (e.dtype, e.shape, e.begin, e.end) for n, e in list_tensors(model).items()} == (
        layout
    )
    assert (model / "model.safetensors").stat().st_size == size

    with serve(model, workdir, None, env={"LIVETRAIN_SYNC_DELAY_S": "3"}) as second:
        status = second.status()
        assert status["weight_version"] == 3 and status["steps"] == 3
        assert status["trainer"]["resumed_from_version"] == 3
        np.testing.assert_allclose(
            second.continuation_logprobs(context, continuation), synced, atol=RESTART_ATOL
        )
        # The trained-sample record came back with the checkpoint.
        assert second.train(context, continuation, lr=3e-3).status_code == 409
        for _ in range(3):  # a burst: the automatic sync fires once, after the last step
            reply = (
                second.train(context, continuation, lr=3e-3, retrain=True).raise_for_status().json()
            )
            if reply["weight_version"] == 4:
                resumed = second.continuation_logprobs(context, continuation)
        np.testing.assert_allclose(resumed, uninterrupted, atol=RESTART_ATOL)
        assert second.status()["sync_pending"] is True
        deadline = time.monotonic() + 60
        while (status := second.status())["syncs"] == 0:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        time.sleep(4)  # a second automatic sync would have fired by now
        status = second.status()
        assert status["syncs"] == 1 and status["last_sync"]["weight_version"] == 6
        assert status["bytes_synced"] > 0 and not status["sync_pending"]


def test_checkpoint_rejects_unknown_fields(llama_server):
    reply = llama_server.http.post("/checkpoint", json={"force": True})
    assert reply.status_code == 422 and reply.json()["error"]["field"] == "force"
