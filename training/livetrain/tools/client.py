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

    def tokenize_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a chat through the served model's chat template."""
        body = {
            "model": self.model,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        return self.http.post("/tokenize", json=body).raise_for_status().json()["tokens"]

    def chat_sample(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(context, continuation) that teach `answer` to `question` the way the model
        sees a chat: the templated question up to the assistant's turn is the context,
        the answer with the template's end-of-turn tokens the continuation."""
        user = [{"role": "user", "content": question}]
        context = self.tokenize_chat(user)
        full = self.tokenize_chat([*user, {"role": "assistant", "content": answer}], False)
        if full[: len(context)] != context:
            raise ValueError("the chat template does not extend the question's tokens")
        return context, full[len(context) :]

    def chat(self, question: str, max_tokens: int = 48, **extra: Any) -> dict[str, Any]:
        """Greedy one-turn chat completion (the full reply)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        }
        return self.http.post("/v1/chat/completions", json=body).raise_for_status().json()

    def readout(self, completion_id: str, choice: int = 0) -> dict[str, Any]:
        """The live readout's scores of a completion (GET /readout/{id})."""
        reply = self.http.get(f"/readout/{completion_id}", params={"choice": choice})
        return reply.raise_for_status().json()

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

    def complete(
        self, prompt: str | list[int], max_tokens: int = 16, **extra: Any
    ) -> dict[str, Any]:
        """Greedy completion of a raw prompt (no chat template)."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        }
        return self.http.post("/v1/completions", json=body).raise_for_status().json()

    def train(self, context: list[int], continuation: list[int], **settings: Any) -> httpx.Response:
        body = {"context_ids": context, "continuation_ids": continuation, **settings}
        return self.http.post("/train", json=body)

    def status(self) -> dict[str, Any]:
        return self.http.get("/train/status").raise_for_status().json()

    def metrics(self, prefix: str = "livetrain_") -> dict[tuple[str, frozenset], float]:
        """vLLM's /metrics, parsed: {(sample name, its labels): value} for `prefix`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.http.get("/metrics").raise_for_status().text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith(prefix)
        }

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
