"""The tiny-model builder: HF loads what it writes, shaped as promised, deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from livetrain.tools import tiny_model
from livetrain.tools.tiny_model import (
    ARCHS,
    FAMILIES,
    MOE_ARCHS,
    build_tiny_model,
    ensure_tiny_model,
)

SENTENCE = "The kettle whistled twice.\n\nThen,  at 10:30, Mara read 3 letters, cafe and café!"
# arch -> (attention heads, kv heads, lm_head tied to the embedding)
SHAPES = {"llama": (2, 1, False), "qwen2": (4, 2, True)}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch=arch) for arch in ARCHS}


def _load(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_loads_as_itself_with_random_norms(built: dict[str, Path], arch: str) -> None:
    model = _load(built[arch])
    assert model.config.model_type == FAMILIES[arch][0]
    assert model.config.num_hidden_layers == 2 and model.config.head_dim == 64
    names = [name for name, _ in model.named_parameters()]
    assert any("expert" in name for name in names) is (arch in MOE_ARCHS)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert not torch.allclose(param, torch.ones_like(param)), name
        if name.endswith("bias"):
            assert param.abs().min() > 0, name


@pytest.mark.parametrize("arch", SHAPES)
def test_hf_loads_model_with_requested_shape(built: dict[str, Path], arch: str) -> None:
    model = _load(built[arch])
    heads, kv_heads, tied = SHAPES[arch]
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.head_dim == 64 == cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (heads, kv_heads)
    assert cfg.tie_word_embeddings is tied
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) is tied
    if not tied:
        assert not torch.equal(head, embed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert not torch.allclose(param, torch.ones_like(param)), name


def test_qwen2_has_nonzero_qkv_biases(built: dict[str, Path]) -> None:
    model = _load(built["qwen2"])
    biases = {n: p for n, p in model.named_parameters() if n.endswith("_proj.bias")}
    expected = {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in ("q", "k", "v")
    }
    assert set(biases) == expected
    assert all(b.abs().min() > 0 for b in biases.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_size_is_tokenizer_length_and_not_64_aligned(
    built: dict[str, Path], arch: str
) -> None:
    model = _load(built[arch])
    tokenizer = AutoTokenizer.from_pretrained(built[arch])
    vocab = model.config.vocab_size
    assert vocab == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert vocab % 64 != 0
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    cfg = model.config
    assert special == (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == [
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_tokenizer_matches_saved_tokenizer_json(built: dict[str, Path], arch: str) -> None:
    # AutoTokenizer rebuilds qwen2 tokenizers as Qwen2Tokenizer; it must not change encoding.
    tokenizer = AutoTokenizer.from_pretrained(built[arch])
    raw = Tokenizer.from_file(str(built[arch] / "tokenizer.json"))
    assert tokenizer(SENTENCE)["input_ids"] == raw.encode(SENTENCE).ids


def test_tokenizer_round_trips(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["llama"])
    ids = tokenizer(SENTENCE)["input_ids"]
    assert len(ids) < len(SENTENCE.encode())  # BPE merged something
    assert tokenizer.decode(ids) == SENTENCE


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_gives_finite_logits(built: dict[str, Path], arch: str) -> None:
    model = _load(built[arch])
    ids = AutoTokenizer.from_pretrained(built[arch])(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_per_seed(built: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", arch="llama", seed=0)
    other = build_tiny_model(tmp_path / "other", arch="llama", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (built["llama"] / name).read_bytes(), name
    weights = (built["llama"] / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights


def test_bfloat16_build_stores_bfloat16(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "bf16", arch="qwen2", dtype="bfloat16")
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_rejects_unknown_arch_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3_moe"):  # the message lists the families
        build_tiny_model(tmp_path / "m", arch="gpt2")
    with pytest.raises(ValueError, match="dtype"):
        build_tiny_model(tmp_path / "m", dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_build_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = build_tiny_model(tmp_path / "existing")
    before = (existing / "model.safetensors").read_bytes()
    real_build_model = tiny_model._build_model

    def crash_after_saving(*args: object) -> PreTrainedModel:
        model = real_build_model(*args)
        save = model.save_pretrained

        def save_then_die(*save_args: object, **kwargs: object) -> None:
            save(*save_args, **kwargs)
            raise KeyboardInterrupt

        model.save_pretrained = save_then_die
        return model

    monkeypatch.setattr(tiny_model, "_build_model", crash_after_saving)
    for target in (tmp_path / "fresh", existing):
        with pytest.raises(KeyboardInterrupt):
            build_tiny_model(target, seed=1)
    assert (existing / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_ensure_tiny_model_keeps_a_complete_model(tmp_path: Path) -> None:
    out = ensure_tiny_model(tmp_path / "default")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_tiny_model(out) == out
    assert weights.stat().st_mtime_ns == mtime


def test_ensure_tiny_model_rebuilds_an_incomplete_dir(tmp_path: Path) -> None:
    out = ensure_tiny_model(tmp_path / "default")
    expected = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").unlink()
    ensure_tiny_model(out)
    assert (out / "model.safetensors").read_bytes() == expected
    assert _load(out).config.model_type == "llama"
