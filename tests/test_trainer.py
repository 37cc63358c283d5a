"""The trainer refuses a step whose loss is not finite, and touches nothing."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from livetrain import protocol, trainer_state
from livetrain.apollo import Apollo
from livetrain.config import PluginConfig
from livetrain.trainer_main import Trainer
from livetrain.trainer_model import classify


def make_trainer(model_dir, state_dir=None) -> Trainer:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainer = Trainer()
    trainer.attached = classify(model, PluginConfig())
    trainer.optimizer = Apollo(trainer.attached.apollo_params, trainer.attached.adamw_params)
    trainer.state_dir = state_dir
    return trainer


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.attached.model.state_dict().items()}


def test_classify_makes_only_linear_weights_trainable(models):
    attached = make_trainer(models["llama"]).attached
    assert set(attached.apollo_params) == {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert not attached.adamw_params
    assert "model.embed_tokens.weight" in attached.frozen and "lm_head.weight" in attached.frozen


def test_a_finite_step_changes_weights(models, tmp_path):
    trainer = make_trainer(models["llama"], tmp_path)
    before = snapshot(trainer)
    msg = {"samples": [([5, 6, 7], [8, 9])], "settings": {"lr": 1e-2}}
    assert trainer.prepare(msg)["ok"]
    assert trainer.apply({"weight_version": 1})["ok"]
    after = trainer.attached.model.state_dict()
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"],
                           before["model.layers.0.mlp.down_proj.weight"])  # fmt: skip
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # frozen


def test_non_finite_loss_is_refused_and_nothing_changes(models):
    trainer = make_trainer(models["llama"])
    with torch.no_grad():
        trainer.attached.model.model.norm.weight[3] = float("nan")
    before = snapshot(trainer)
    reply = trainer.prepare({"samples": [([5, 6, 7], [8, 9])], "settings": {}})
    assert reply == protocol.failure(protocol.REFUSED, "non-finite loss (nan)")
    assert trainer.pending is None and trainer.optimizer.steps == 0
    assert trainer.optimizer.state_bytes() == Apollo({}, {}).state_bytes()
    after = trainer.attached.model.state_dict()
    for name, tensor in before.items():
        assert torch.allclose(after[name], tensor, rtol=0, atol=0, equal_nan=True), name
    assert trainer.apply({"weight_version": 1})["ok"] is False


def saved_trainer(models, tmp_path, saved_version: int, served_version: int) -> Trainer:
    """A trainer whose state dir holds a state written at `saved_version`."""
    (tmp_path / "writer").mkdir(exist_ok=True)
    writer = make_trainer(models["llama"], tmp_path / "writer")
    msg = {"samples": [([5, 6, 7], [8, 9])], "settings": {"lr": 1e-3}}
    assert writer.prepare(msg)["ok"] and writer.apply({"weight_version": 1})["ok"]
    writer.finish_save()
    trainer_state.save(
        tmp_path, {"weight_version": saved_version, "optimizer": writer.optimizer.state_dict()}
    )
    trainer = make_trainer(models["llama"])
    trainer.state_dir, trainer.weight_version = tmp_path, served_version
    return trainer


def test_resume_at_the_served_version(models, tmp_path):
    trainer = saved_trainer(models, tmp_path, saved_version=4, served_version=4)
    assert trainer._resume() == 4 and trainer.optimizer.steps == 1


def test_resume_a_state_one_step_behind(models, tmp_path):
    # A trainer killed while its background save ran leaves the previous state.
    trainer = saved_trainer(models, tmp_path, saved_version=3, served_version=4)
    assert trainer._resume() == 3 and trainer.optimizer.steps == 1


def test_state_for_other_weights_is_set_aside(models, tmp_path):
    for served in (0, 2):  # vLLM reloaded the files / a state from the future
        trainer = saved_trainer(models, tmp_path, saved_version=3, served_version=served)
        assert trainer._resume() is None and trainer.optimizer.steps == 0
        assert not (tmp_path / trainer_state.STATE_FILE).exists()
    assert list(tmp_path.glob(f"{trainer_state.STATE_FILE}*")) == [
        tmp_path / f"{trainer_state.STATE_FILE}.stale"
    ]


def test_background_save_writes_the_applied_state(models, tmp_path):
    trainer = make_trainer(models["llama"], tmp_path)
    msg = {"samples": [([5, 6, 7], [8, 9])], "settings": {}}
    assert trainer.prepare(msg)["ok"] and trainer.apply({"weight_version": 7})["ok"]
    trainer.finish_save()
    saved = trainer_state.load(tmp_path)
    assert trainer.saved_version == saved["weight_version"] == 7
    state = trainer.optimizer.state_dict()
    assert all(torch.equal(saved["optimizer"][k], state[k]) for k in state)
