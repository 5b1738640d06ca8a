"""Locust user: streamed chat completions against a swarmgate gateway.

Reports ``chat stream`` (whole requests, failures included), ``TTFT`` (time to the first
content chunk) and ``completion tokens`` (one entry per successful request, its length = the
usage chunk's completion tokens), so `loadtests/run.py` can read requests/s, TTFT percentiles,
tokens/s and errors from locust's CSV.
"""

from __future__ import annotations

import json
import os
import time

from locust import HttpUser, between, task

API_KEY = os.environ.get("SWARMGATE_LOADTEST_KEY", "")
MODEL = os.environ.get("SWARMGATE_LOADTEST_MODEL", "")
MAX_TOKENS = int(os.environ.get("SWARMGATE_LOADTEST_MAX_TOKENS", "32"))
PROMPTS = [
    "Tell me a short story about the sea.",
    "What is a computer program?",
    "Write a poem about the moon and the stars.",
    "How are you today?",
]


class ChatStreamUser(HttpUser):
    wait_time = between(0.0, 0.2)

    @task
    def stream_chat(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPTS[int(time.time() * 1000) % len(PROMPTS)]}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.8,
        }
        headers = {"Authorization": f"Bearer {API_KEY}"}
        started = time.perf_counter()
        first_token_at = None
        tokens = 0
        done = False
        with self.client.post("/v1/chat/completions", json=body, headers=headers, stream=True,
                              name="chat stream", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for raw in response.iter_lines():
                line = raw.decode() if isinstance(raw, bytes) else raw
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") and first_token_at is None:
                        first_token_at = time.perf_counter()
            if not done:
                response.failure("stream ended without [DONE]")
                return
            response.success()
        self.environment.events.request.fire(
            request_type="SSE", name="completion tokens", response_time=0, response_length=tokens,
            exception=None, context={},
        )
        if first_token_at is not None:
            self.environment.events.request.fire(
                request_type="SSE", name="TTFT", response_time=(first_token_at - started) * 1000,
                response_length=0, exception=None, context={},
            )
