"""A small HTTP client for a livetrain-enabled vLLM server (demo, tests, bench)."""

from __future__ import annotations

import time
from typing import Any

import httpx


class LivetrainClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self._model: str | None = None

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        return self._model

    def tokenize(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return self.http.post("/tokenize", json=body).raise_for_status().json()["tokens"]

    def continuation_logprobs(self, context: list[int], continuation: list[int]) -> list[float]:
        """What the served model assigns to each continuation token, via vLLM's echo."""
        body = {
            "model": self.model,
            "prompt": context + continuation,
            "max_tokens": 1,
            "echo": True,
            "logprobs": 0,
            "temperature": 0,
        }
        reply = self.http.post("/v1/completions", json=body).raise_for_status().json()
        logprobs = reply["choices"][0]["logprobs"]["token_logprobs"]
        return logprobs[len(context) : len(context) + len(continuation)]

    def complete(self, prompt: str | list[int], max_tokens: int = 16) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return self.http.post("/v1/completions", json=body).raise_for_status().json()

    def train(self, context: list[int], continuation: list[int], **settings: Any) -> httpx.Response:
        body = {"context_ids": context, "continuation_ids": continuation, **settings}
        return self.http.post("/train", json=body)

    def status(self) -> dict[str, Any]:
        return self.http.get("/train/status").raise_for_status().json()

    def wait_trainer(self, timeout: float = 300, states: tuple[str, ...] = ("idle",)) -> dict:
        """Wait until the trainer reaches one of `states`; raise if it failed instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["state"] in states:
                return status
            if status["state"] == "failed":
                raise RuntimeError(f"trainer failed: {status['reason']}")
            time.sleep(0.5)
        raise TimeoutError(f"trainer not in {states} after {timeout} s: {status}")
