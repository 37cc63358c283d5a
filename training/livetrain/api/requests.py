"""API server: request bodies of the plugin routes, validated before anything runs.

Limits that depend on the served model or the server (vocabulary size, maximum length,
samples and padded tokens per step) come in through pydantic's validation context, so
one model class serves every server. Types are strict: JSON "8" is not a number and
"yes" is not a boolean. Every setting has an upper bound, named in the error.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from livetrain.config import OptimizerSettings
from livetrain.formats.messages import Guard

_DEFAULTS = OptimizerSettings()
# Measured on the built-in model (bench/RESULTS.md): a first step at lr 1e-3 moves an unrelated
# guard set's loss by -0.32 to +0.19 nats, one at lr 5e-3 (which the update-size limit
# admits) by +4.8 to +8.9: this default lets the first kind through and stops the second.
DEFAULT_MAX_RISE = 0.5
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Beta = Annotated[float, Field(strict=True, ge=0, lt=1)]


def _below_vocab(ids: list[int] | None, info: ValidationInfo) -> list[int] | None:
    vocab = (info.context or {}).get("vocab_size")
    if ids is not None and vocab is not None:
        for i, token in enumerate(ids):
            if token >= vocab:
                raise ValueError(
                    f"id {token} at index {i} is not below the vocabulary size {vocab}"
                )
    return ids


def _fits_batch(samples: list[tuple[list[int], list[int]]], info: ValidationInfo) -> None:
    """At most `max_samples` samples, and at most `max_batch_tokens` once padded to the
    longest (the trainer's forward and logits are that size)."""
    limits = info.context or {}
    if (most := limits.get("max_samples")) is not None and len(samples) > most:
        raise ValueError(f"{len(samples)} samples, over the limit of {most} per request")
    padded = len(samples) * max(len(c) + len(t) for c, t in samples)
    if (budget := limits.get("max_batch_tokens")) is not None and padded > budget:
        raise ValueError(
            f"{len(samples)} samples padded to the longest are {padded} tokens, over the "
            f"limit of {budget} per request"
        )


def _fits_length(context: list[int], continuation: list[int], info: ValidationInfo) -> None:
    max_len = (info.context or {}).get("max_model_len")
    total = len(context) + len(continuation)
    if max_len is not None and total > max_len:
        raise ValueError(
            f"context_ids + continuation_ids is {total} tokens, over max_model_len {max_len}"
        )


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context_ids: TokenIds
    continuation_ids: TokenIds

    _vocab = field_validator("context_ids", "continuation_ids")(_below_vocab)

    @model_validator(mode="after")
    def _fits_model(self, info: ValidationInfo) -> Sample:
        _fits_length(self.context_ids, self.continuation_ids, info)
        return self


class _Samples(BaseModel):
    """Either one sample inline or a list of samples; `samples()` normalises."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    context_ids: TokenIds | None = None
    continuation_ids: TokenIds | None = None
    samples: Annotated[list[Sample], Field(min_length=1)] | None = None

    _vocab = field_validator("context_ids", "continuation_ids")(_below_vocab)

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        inline = "context_ids" in data or "continuation_ids" in data
        if inline and "samples" in data:
            raise ValueError("give either samples or context_ids + continuation_ids, not both")
        if not inline and "samples" not in data:
            raise ValueError("missing field: samples (or context_ids + continuation_ids)")
        if inline:
            for key in ("context_ids", "continuation_ids"):
                data.setdefault(key, None)
        return data

    @model_validator(mode="after")
    def _inline_is_valid(self, info: ValidationInfo) -> _Samples:
        if self.samples is None:
            for key in ("context_ids", "continuation_ids"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: field required")
            _fits_length(self.context_ids or [], self.continuation_ids or [], info)
        _fits_batch(self.sample_list(), info)
        return self

    def sample_list(self) -> list[tuple[list[int], list[int]]]:
        if self.samples is not None:
            return [(s.context_ids, s.continuation_ids) for s in self.samples]
        assert self.context_ids is not None and self.continuation_ids is not None  # validated
        return [(self.context_ids, self.continuation_ids)]


class ScoreRequest(_Samples):
    """POST /train/score: continuation log-probs from the trainer's model, no step."""


class TrainRequest(_Samples):
    """POST /train: one optimizer step on the given samples."""

    # Upper bounds are what any sane step stays far below; they keep a typo (lr 10 for
    # 1e-1) or a hostile value from reaching the optimizer at all. strict=True on floats:
    # an int is a number, a string is not.
    lr: float = Field(_DEFAULTS.lr, strict=True, ge=0, le=1)
    rank: StrictInt = Field(_DEFAULTS.rank, ge=1, le=4096)
    betas: tuple[Beta, Beta] = _DEFAULTS.betas
    eps: float = Field(_DEFAULTS.eps, strict=True, gt=0, le=1)
    weight_decay: float = Field(_DEFAULTS.weight_decay, strict=True, ge=0, le=1)
    warmup_steps: StrictInt = Field(_DEFAULTS.warmup_steps, ge=0, le=1_000_000)
    scale: float = Field(_DEFAULTS.scale, strict=True, gt=0, le=1000)
    proj_refresh: StrictInt = Field(_DEFAULTS.proj_refresh, ge=1, le=1_000_000)
    norm_growth_limit: float = Field(_DEFAULTS.norm_growth_limit, strict=True, ge=1, le=100)
    seed: StrictInt = Field(_DEFAULTS.seed, ge=0, lt=2**63)
    retrain: StrictBool = False  # train samples even if an earlier step already trained them

    def settings(self) -> OptimizerSettings:
        """The step's optimizer settings (finite: the model forbids inf and nan)."""
        return OptimizerSettings(
            **{f.name: getattr(self, f.name) for f in fields(OptimizerSettings)}
        )


class CheckpointRequest(BaseModel):
    """POST /checkpoint takes no settings today; an empty object (or no body) is fine."""

    model_config = ConfigDict(extra="forbid")


class RollbackRequest(BaseModel):
    """POST /train/rollback: no body (or `{}`) serves the model files' weights again;
    `{"steps": k}` undoes the last k steps, of the `undo_steps` the trainer keeps."""

    model_config = ConfigDict(extra="forbid")
    steps: StrictInt | None = Field(None, ge=1)

    @field_validator("steps")
    @classmethod
    def _kept(cls, steps: int | None, info: ValidationInfo) -> int | None:
        kept = (info.context or {}).get("undo_steps")
        if steps is not None and kept is not None and steps > kept:
            raise ValueError(
                f"{steps} steps, but the server keeps at most {kept} for an undo "
                "(LIVETRAIN_UNDO_STEPS)"
            )
        return steps


class GuardRequest(_Samples):
    """POST /train/guard (or the LIVETRAIN_GUARD file): samples whose mean loss a step
    may raise by at most `max_rise` nats per token; a step that would is refused."""

    max_rise: float = Field(DEFAULT_MAX_RISE, strict=True, ge=0, le=100)

    def guard(self) -> Guard:
        return Guard(samples=self.sample_list(), max_rise=self.max_rise)


class ReadoutLoadRequest(BaseModel):
    """POST /readout/load: a readout folder on the server's filesystem."""

    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, Field(min_length=1)]


class ReadoutQuery(BaseModel):
    """Query of GET /readout/{id}: which choice (for n > 1 or several prompts), and
    whether to list every row (`rows=false`: the header and the whole-text summary,
    for clients that score texts, without serialising every token's scores)."""

    model_config = ConfigDict(extra="forbid")
    choice: Annotated[int, Field(ge=0)] = 0
    rows: bool = True


def _known(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{name!r} is not a concept of the loaded readout{hint}"


class SteerArgs(BaseModel):
    """The steering keys of a completion's `vllm_xargs` (other keys pass through).

    `steer`: concept -> scale, in units of the concept's steering unit at each layer
    (readout_format.py: the mean shift its stories make along its direction);
    `steer_layers`: blocks whose outputs get the sum; `steer_prompt`: false steers the
    generated tokens only (the prompt is read unsteered, from its last token on every
    row is steered, so the first generated token is too). The readout's concepts,
    layers and the largest scale come in through the validation context."""

    model_config = ConfigDict(extra="ignore")

    steer: Annotated[dict[str, Annotated[float, Field(strict=True)]], Field(min_length=1)]
    steer_layers: Annotated[list[StrictInt], Field(min_length=1)]
    steer_prompt: StrictBool | Annotated[StrictInt, Field(ge=0, le=1)] = True

    @field_validator("steer")
    @classmethod
    def _known_and_bounded(cls, steer: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        context = info.context or {}
        concepts, limit = context.get("concepts", []), context.get("max_scale", math.inf)
        for name, scale in steer.items():
            if name not in concepts:
                raise ValueError(_known(name, concepts))
            if not math.isfinite(scale) or abs(scale) > limit:
                raise ValueError(f"{name}: scale {scale} is not finite and within ±{limit}")
        return steer

    @field_validator("steer_layers")
    @classmethod
    def _steerable_layers(cls, layers: list[int], info: ValidationInfo) -> list[int]:
        readout_layers = (info.context or {}).get("layers", [])
        if missing := sorted(set(layers) - set(readout_layers)):
            raise ValueError(
                f"layers {missing} have no directions in the loaded readout (steerable: "
                f"{readout_layers}; a block steers only where the readout captures it)"
            )
        return sorted(set(layers))


class SteeredCompletion(BaseModel):
    """The part of a completion body that steering reads: field names in errors then
    start at `vllm_xargs`, as the client wrote them."""

    model_config = ConfigDict(extra="ignore")
    vllm_xargs: SteerArgs
