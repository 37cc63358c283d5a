"""bfloat16 serving from fp32 files (Qwen2: tied embeddings, q/k/v bias)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.server

# vLLM's bf16 CPU kernels against HF's bf16 forward on the same memory; measured ≤ 0.008
# on this model over several steps.
BF16_LOGPROB_ATOL = 0.03


def test_bf16_views_attach_match_and_learn(bf16_server):
    status = bf16_server.status()
    assert status["trainer"]["apollo_tensors"] == 14  # attach check passed in bf16
    context = bf16_server.tokenize("Rain moved over the hills while")
    continuation = bf16_server.tokenize(" the shepherd counted every lamb twice.")
    body = {"context_ids": context, "continuation_ids": continuation}
    before = None
    for step in range(3):
        served = bf16_server.continuation_logprobs(context, continuation)
        before = before if before is not None else sum(served)
        scored = bf16_server.http.post("/train/score", json=body).raise_for_status().json()
        np.testing.assert_allclose(scored["token_logprobs"][0], served, atol=BF16_LOGPROB_ATOL)
        reply = (
            bf16_server.train(context, continuation, lr=3e-3, retrain=True)
            .raise_for_status()
            .json()
        )
        assert reply["weight_version"] == step + 1
    after = sum(bf16_server.continuation_logprobs(context, continuation))
    assert after > before + 3.0, (before, after)
