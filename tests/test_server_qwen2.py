"""Qwen2-style model (tied embeddings, q/k/v bias, GQA) on a real vLLM server."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.server

LOGPROB_ATOL = 1e-4  # vLLM CPU kernels vs Hugging Face SDPA, both fp32


def test_views_give_vllm_logprobs_before_and_after_training(qwen2_server):
    context = qwen2_server.tokenize("A narrow bridge crossed the river where")
    continuation = qwen2_server.tokenize(" the old mill still turned in spring.")
    body = {
        "samples": [
            {"context_ids": context, "continuation_ids": continuation},
            {"context_ids": context[:3], "continuation_ids": continuation[:5]},
        ]
    }
    for step in range(3):
        scored = qwen2_server.http.post("/train/score", json=body).raise_for_status().json()
        for sample, trainer_view in zip(body["samples"], scored["token_logprobs"], strict=True):
            served = qwen2_server.continuation_logprobs(
                sample["context_ids"], sample["continuation_ids"]
            )
            np.testing.assert_allclose(trainer_view, served, atol=LOGPROB_ATOL)
        reply = qwen2_server.http.post(
            "/train", json={**body, "lr": 3e-3, "retrain": True}
        ).raise_for_status()
        assert reply.json()["weight_version"] == step + 1
        assert reply.json()["tokens"] == len(continuation) + 5


def test_linear_biases_are_trained_and_embeddings_stay_frozen(qwen2_server):
    info = qwen2_server.status()["trainer"]
    assert info["apollo_tensors"] == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert info["adamw_tensors"] == 2 * 3  # q, k, v biases per layer


def test_trainer_refuses_views_that_differ_from_the_files(qwen2_server):
    """With untrained weights served (version 0), the files must match bit for bit."""
    model_dir = qwen2_server.workdir / "model"
    # Restart vLLM's view of things: this server has trained, so the check applies
    # only to frozen tensors; corrupt one of those on disk.
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    pid = qwen2_server.status()["trainer_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (status := qwen2_server.status())["state"] != "failed":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert "model.norm.weight" in status["reason"]
    reply = qwen2_server.http.post("/train", json={"context_ids": [1], "continuation_ids": [2]})
    assert reply.status_code == 503
    assert "model.norm.weight" in reply.json()["error"]["message"]
    before = path.read_bytes()
    assert qwen2_server.http.post("/checkpoint").status_code == 503
    assert path.read_bytes() == before
