"""Every livetrain setting and its default, written once.

`OptimizerSettings` is what a /train request may override per step; `PluginConfig`
is fixed for the lifetime of a server and read from `LIVETRAIN_*` environment
variables, because vLLM's own argument parser does not know about plugins.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class OptimizerSettings:
    """APOLLO (2-D linear weights) and AdamW (other trainable tensors) settings."""

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


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


def _parse(text: str, kind: type) -> object:
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    return kind(text)


def _private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@dataclass(frozen=True)
class PluginConfig:
    """Server-lifetime settings; `from_env()` is the only constructor callers use."""

    state_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "livetrain" / "state")
    runtime_dir: Path | None = None  # sockets; a fresh private temp dir when None
    max_body_bytes: int = 8 * 1024 * 1024
    trainer_start_timeout_s: float = 600.0
    trainer_max_restarts: int = 3
    # Checkpoint sync: automatic sync this long after the last step (0 disables it),
    # comparing and writing the files in blocks of this many bytes.
    sync_delay_s: float = 600.0
    sync_block_bytes: int = 4096
    # Which tensor families may change. Linear weights are APOLLO's job; the others
    # are large (embeddings) or sensitive (norms) and stay frozen unless asked for.
    train_linear: bool = True
    train_embeddings: bool = False
    train_norms: bool = False
    train_lm_head: bool = False
    # Live readout: scores of a request are kept this long after its last token, and at
    # most this many requests are kept (oldest dropped first). The worker hands scores
    # over through a shared-memory ring of this size (a step of 256 rows x 4 layers x
    # 100 concepts is 400 KiB; the API server drains it every few milliseconds).
    readout_ttl_s: float = 600.0
    readout_max_requests: int = 1000
    readout_ring_bytes: int = 32 * 1024 * 1024

    @classmethod
    def from_env(cls) -> PluginConfig:
        defaults = cls()
        env = {
            "state_dir": _env_path("LIVETRAIN_STATE_DIR", defaults.state_dir),
            "runtime_dir": (
                Path(os.environ["LIVETRAIN_RUNTIME_DIR"])
                if os.environ.get("LIVETRAIN_RUNTIME_DIR")
                else None
            ),
        }
        for f in fields(cls):
            key = f"LIVETRAIN_{f.name.upper()}"
            if f.name not in env and key in os.environ:
                env[f.name] = _parse(os.environ[key], type(getattr(defaults, f.name)))
        return cls(**env)

    def private_state_dir(self) -> Path:
        return _private_dir(self.state_dir)

    def private_runtime_dir(self) -> Path:
        if self.runtime_dir is not None:
            return _private_dir(self.runtime_dir)
        return Path(tempfile.mkdtemp(prefix="livetrain-"))  # mkdtemp makes it 0700
