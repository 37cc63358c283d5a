"""Every livetrain setting and its default, written once, and the only reader of them.

`OptimizerSettings` is what a /train request may override per step; `PluginConfig`
is fixed for the lifetime of a server and read from `LIVETRAIN_*` environment
variables, because vLLM's own argument parser does not know about plugins. The
environment is read once per process (`plugin_config()`), by the API server only, and
never written: the training subprocess gets its settings in its `Attach` message,
vLLM's workers get theirs (`WorkerSettings`: the CPU kernels, the readout's captured
blocks) inside vLLM's own config, so every process runs the API server's settings.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import get_type_hints


@dataclass(frozen=True)
class OptimizerSettings:
    """APOLLO (weight matrices) and AdamW (other trainable tensors) settings."""

    lr: float = 1e-3
    rank: int = 64
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scale: float = 1.0
    proj_refresh: int = 200
    norm_growth_limit: float = 1.01
    seed: int = 0


@dataclass(frozen=True)
class TrainableFamilies:
    """Which tensor families may change. Linear weights are APOLLO's job; the others are
    large (embeddings) or sensitive (norms) and stay frozen unless asked for. Fixed per
    server: the set of tensors defines the optimizer state."""

    linear: bool = True  # every weight matrix but embeddings: MoE routers, experts, biases
    embeddings: bool = False
    norms: bool = False
    lm_head: bool = False
    # Decoder blocks whose tensors may train (LIVETRAIN_TRAIN_LAYERS="10-19,23"); empty:
    # all. Tensors outside the blocks (embeddings, final norm, lm_head) follow their
    # families. Fewer blocks: proportionally less gradient and optimizer memory.
    layers: tuple[int, ...] = ()


def _parse(name: str, text: str, kind: object) -> object:
    """One environment value as the type of the field it sets; errors name the variable."""
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"expected a boolean, got {text!r}")
            return text.lower() in ("1", "true", "yes")
        if kind is str:
            return text
        if kind in (int, float):
            return kind(text)
        if kind == tuple[int, ...]:
            return tuple(
                sorted({i for part in text.split(",") if part.strip() for i in _span(part)})
            )
        if kind == tuple[Path, ...]:
            return tuple(Path(p).expanduser() for p in text.split(os.pathsep) if p)
        return Path(text).expanduser()  # Path and Path | None
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _span(part: str) -> range:
    """ "7" or an inclusive range "10-19"."""
    first, _, last = part.strip().partition("-")
    if int(last or first) < int(first):
        raise ValueError(f"empty range {part.strip()!r}")
    return range(int(first), int(last or first) + 1)


def _private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


CPU_KERNELS = ("vllm", "plain")
STEP_MODES = ("fenced", "per_layer")


@dataclass(frozen=True)
class PluginConfig:
    """Server-lifetime settings; `from_env()` is the only constructor callers use."""

    state_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "livetrain" / "state")
    runtime_dir: Path | None = None  # sockets; a fresh private temp dir when None
    max_body_bytes: int = 8 * 1024 * 1024
    # One /train or /train/score request: at most this many samples, and this many tokens
    # once padded to the longest sample. The logits alone are padded tokens x vocabulary
    # x 4 bytes, twice with their gradient (2048 tokens of a 49k vocabulary: ~0.8 GB),
    # and the built-in model trains ~22 tokens/s on 2 CPU cores, so 2048 is ~90 s there.
    max_samples: int = 256
    max_batch_tokens: int = 2048
    # A step that would move any tensor by more than this fraction of its norm
    # (||delta W|| / ||W||) is refused: see bench/RESULTS.md for the figures it was chosen from.
    max_update_ratio: float = 0.1
    # The guard set loaded at launch (LIVETRAIN_GUARD: a JSON file with the body of
    # POST /train/guard); a step that would raise its loss by more than its max_rise is
    # refused. Each guarded step previews its result: one more copy of the trained
    # tensors while it is judged, and a forward pass of the guard set.
    guard: Path | None = None
    # Steps that POST /train/rollback {"steps": k} can undo; each one kept costs a copy
    # of the trained tensors in the trainer's memory (the built-in model's linear
    # weights: 212 MB in bf16, 425 MB in fp32), so the default keeps none.
    undo_steps: int = 0
    # A step whose batch is longer than this many tokens (once padded) keeps only each
    # decoder block's input for the backward pass and recomputes the rest: activation
    # memory of about one block instead of all of them, for one more forward pass. The
    # built-in model's figures: bench/RESULTS.md (bench_trainer_memory.py).
    recompute_above_tokens: int = 1024
    # "fenced": a step's update is computed whole, checked whole, and written in one
    # pause (inference sees all of it or none). "per_layer": each tensor's update is
    # written as soon as its gradient exists and the gradient freed, so no whole
    # gradient is ever held (and every batch recomputes block activations, whatever
    # recompute_above_tokens: otherwise they, not gradients, set the peak); inference
    # may see a step half-applied while the backward pass runs, a tensor whose update
    # fails a check is left as it was while the others are written, and a guard set or
    # undo (which need the whole step first) is refused.
    step_mode: str = "fenced"
    trainer_start_timeout_s: float = 600.0
    # Deadlines of trainer calls: a trainer that misses one is killed (and restarted).
    # Writing the weights (apply) holds generation paused, so its deadline is short; a
    # prepare or score is a forward and backward of at most max_batch_tokens; a sync
    # reads and writes the model files.
    trainer_apply_timeout_s: float = 30.0
    trainer_call_timeout_s: float = 600.0
    # A trainer that ran this long before exiting gives back the restart budget.
    trainer_healthy_s: float = 600.0
    trainer_max_restarts: int = 3
    # Checkpoint sync: automatic sync this long after the last step (0 disables it),
    # comparing and writing the files in blocks of this many bytes.
    sync_delay_s: float = 600.0
    sync_block_bytes: int = 4096
    train: TrainableFamilies = field(default_factory=TrainableFamilies)  # LIVETRAIN_TRAIN_*
    # CPU inference kernels (vllm_internals.install_cpu_linear): "vllm" keeps vLLM's
    # packed kernels and packs the trained ones afresh with each step (decode at vLLM's
    # speed; a second copy of each packed weight); "plain" runs F.linear on the weights
    # the trainer writes (no copy; slower batched decode). GPUs always read the plain
    # weight. Figures: bench/RESULTS.md.
    cpu_kernels: str = "vllm"
    # Live readout: scores of a request are kept this long after its last token, and at
    # most this many requests are kept (oldest dropped first). The worker hands scores
    # over through a shared-memory ring of this size (a step of 256 rows x 4 layers x
    # 100 concepts is 400 KiB; the API server drains it every few milliseconds).
    readout_ttl_s: float = 600.0
    readout_max_requests: int = 1000
    readout_ring_bytes: int = 32 * 1024 * 1024
    # The readout folder loaded at launch (LIVETRAIN_READOUT), and the blocks whose
    # outputs the worker captures (LIVETRAIN_READOUT_LAYERS; default: the readout's).
    # Captured blocks are fixed at launch because they shape the compiled graph.
    readout: Path | None = None
    readout_layers: tuple[int, ...] = ()
    # POST /readout/load reads folders under these roots only (LIVETRAIN_READOUT_ROOTS,
    # separated like PATH); empty: the launch readout's folder's parent, the built-in
    # readouts, and ./readout_out (where the readout trainers write by default). Its
    # tensors file may be at most readout_max_bytes.
    readout_roots: tuple[Path, ...] = ()
    readout_max_bytes: int = 1 << 30
    # Largest |scale| a request may steer a concept by, in steering units (the mean shift
    # its stories make along its direction; api/steering.py). Far past where text stays
    # fluent on the built-in model (bench/bench_steering.py), below where bf16 overflows.
    steer_max_scale: float = 50.0

    def __post_init__(self) -> None:
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(
                f"LIVETRAIN_CPU_KERNELS: expected one of {', '.join(CPU_KERNELS)}, "
                f"got {self.cpu_kernels!r}"
            )
        if self.step_mode not in STEP_MODES:
            raise ValueError(
                f"LIVETRAIN_STEP_MODE: expected one of {', '.join(STEP_MODES)}, "
                f"got {self.step_mode!r}"
            )
        if self.step_mode == "per_layer" and (self.guard is not None or self.undo_steps):
            raise ValueError(
                "LIVETRAIN_STEP_MODE=per_layer writes each tensor during the backward pass, "
                "so a step cannot be judged or kept for an undo first: unset LIVETRAIN_GUARD "
                "and LIVETRAIN_UNDO_STEPS, or use LIVETRAIN_STEP_MODE=fenced"
            )

    @property
    def readout_enabled(self) -> bool:
        return self.readout is not None or bool(self.readout_layers)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PluginConfig:
        """Settings from `LIVETRAIN_<FIELD>` (`LIVETRAIN_TRAIN_<FAMILY>` for `train`)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, kind in get_type_hints(cls).items():
            key = f"LIVETRAIN_{name.upper()}"
            if name == "train":
                families = {
                    family: _parse(f"{key}_{family.upper()}", env[f"{key}_{family.upper()}"], hint)
                    for family, hint in get_type_hints(TrainableFamilies).items()
                    if f"{key}_{family.upper()}" in env
                }
                values[name] = TrainableFamilies(**families)  # type: ignore[arg-type]
            elif env.get(key):
                values[name] = _parse(key, env[key], kind)
        return cls(**values)  # type: ignore[arg-type]

    def private_state_dir(self) -> Path:
        return _private_dir(self.state_dir)

    def private_runtime_dir(self) -> Path:
        if self.runtime_dir is not None:
            return _private_dir(self.runtime_dir)
        return Path(tempfile.mkdtemp(prefix="livetrain-"))  # mkdtemp makes it 0700


@cache
def plugin_config() -> PluginConfig:
    """This process's settings, read from its environment the first time they are asked for."""
    return PluginConfig.from_env()
