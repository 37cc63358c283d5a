"""`livetrain check` and the start-up refusal share one reading of a model folder: a
quantised checkpoint (by its config, or vLLM quantising it at load) or a GGUF file is
refused with the reason before anything attaches. The full check of every family is
in test_families.py, against the servers themselves."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_trainer

from livetrain.checkpoint.files import quantized
from livetrain.config import OptimizerSettings
from livetrain.formats.messages import PlanGroup, TrainPlan
from livetrain.tools.check import CheckReport, render
from livetrain.trainer.plan import train_plan


def test_a_quantised_checkpoint_is_refused_by_its_config(models, tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((models["llama"] / name).read_bytes())
    assert quantized(folder) is None
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    assert "quantised (awq): training needs the real weights" in quantized(folder)
    done = subprocess.run(
        [sys.executable, "-m", "livetrain", "check", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "BLOCKER: the model is quantised (awq)" in done.stdout
    assert done.stdout.rstrip().endswith("result: cannot train")


def test_vllm_quantising_at_load_and_gguf_files_are_refused(models, tmp_path):
    assert "quantised (fp8)" in quantized(models["llama"], engine_quantization="fp8")
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert "GGUF file" in quantized(gguf)


def test_the_report_says_what_trains_and_what_it_costs():
    plan = TrainPlan(
        dtype="bfloat16",
        groups=[
            PlanGroup("experts", "apollo", 48, 3_000_000_000, 6_000_000_000),
            PlanGroup("embeddings", "frozen", 1, 300_000_000, 600_000_000),
        ],
        trainable_bytes=6_000_000_000,
        gradient_bytes=6_000_000_000,
        largest_gradient_bytes=200_000_000,
        optimizer_bytes=250_000_000,
        rank=64,
        logits_bytes_per_token=1_200_000,
    )
    text = render(CheckReport("/m", "Qwen3MoeForCausalLM", "bfloat16", plan, ["a", "b"]))
    assert "experts     apollo     48 tensors  3,000,000,000 params     6.0 GB" in text
    assert "gradients 6.0 GB (per-layer steps: one tensor's at a time, at most 200.0 MB)" in text
    assert "optimizer state 250.0 MB (APOLLO rank 64)" in text
    assert text.endswith("result: trains in place")
    blocked = CheckReport("/m", blockers=["the model is quantised (gptq): ..."])
    assert render(blocked).endswith(
        "BLOCKER: the model is quantised (gptq): ...\nresult: cannot train"
    )


def test_the_plans_optimizer_memory_is_what_a_step_allocates(models):
    """The plan's optimizer figure is the moments APOLLO keeps after a step (the
    per-tensor counters aside), and its gradient figure the trained tensors' bytes."""
    trainer = make_trainer(models["llama"])
    plan = train_plan(trainer.attached)
    trainer.prepare([([5, 6, 7], [8, 9])], OptimizerSettings(lr=1e-3))
    grads = sum(p.grad.nbytes for p in trainer.attached.trainable.values())
    trainer.apply(1)
    moments = sum(t.nbytes for k, t in trainer.optimizer.state_dict().items() if "exp_avg" in k)
    assert plan.optimizer_bytes == moments and plan.gradient_bytes == grads
    largest = max(p.numel() * p.element_size() for p in trainer.attached.trainable.values())
    assert plan.largest_gradient_bytes == largest
    assert {(g.kind, g.optimizer) for g in plan.groups} == {
        ("linear", "apollo"),
        ("embeddings", "frozen"),
        ("lm_head", "frozen"),
        ("norms", "frozen"),
    }
