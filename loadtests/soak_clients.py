"""The soak's users: concurrent streams of greedy requests through the ``openai`` SDK, every answer
checked against local transformers' greedy answer, every request bounded by a deadline.

Half the prompts are chat completions (the checkpoint's chat template), half text completions.
A request ends one way only: ``ok`` (the reference answer, with a finish reason), ``wrong`` (an
answer that differs), ``error`` (an HTTP status, an SSE error event or a broken connection: each
says what happened), ``truncated`` (the stream ended without a finish reason and without an
error) or ``hang`` (no end within the deadline).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:  # openai >= 3.63 runs on httpx2: a stream broken mid-way raises httpx2's errors, not httpx's
    from httpx2 import HTTPError as _Httpx2Error

    TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, _Httpx2Error)
except ImportError:
    TRANSPORT_ERRORS = (httpx.HTTPError,)

CHAT_PROMPTS = [
    "Tell me about the sea.",
    "What is a computer program?",
    "Write a short poem about the moon.",
    "How do birds learn to fly?",
    "Why is the weather cold in winter?",
    "Explain how a train reaches the city.",
    "What would you like to talk about today?",
    "Describe the small village by the sea.",
]
COMPLETION_PROMPTS = [
    "Once upon a time there was",
    "The quick brown fox",
    "Networks of computers share work",
    "The teacher asked the students",
    "Water boils at one hundred degrees",
    "The little girl found an old map",
    "Scientists study the world by",
    "My favourite food is",
]
Status = Literal["ok", "wrong", "error", "truncated", "hang"]


@dataclass(frozen=True)
class Prompt:
    kind: Literal["chat", "completion"]
    text: str
    expected: str  # local transformers' greedy answer
    tokens: int  # ... and its length in tokens


@dataclass(frozen=True)
class Outcome:
    prompt: int
    started: float  # monotonic
    ended: float
    status: Status
    detail: str = ""  # the error, or the wrong answer


def reference_prompts(model_path: Path, max_tokens: int) -> list[Prompt]:
    """Every prompt's greedy answer from plain transformers (float32, CPU), decoded as the gateway does."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def answer(ids: list[int]) -> tuple[str, int]:
        with torch.no_grad():
            output = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):]
        return tokenizer.decode(output, skip_special_tokens=True), len(output)

    chats = [Prompt("chat", text, *answer(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)))
        for text in CHAT_PROMPTS]
    completions = [Prompt("completion", text, *answer(tokenizer(text)["input_ids"])) for text in COMPLETION_PROMPTS]
    return [p for pair in zip(chats, completions) for p in pair]


@dataclass
class Progress:
    """What a stream delivered so far: tells a stalled request from a slow one when time runs out."""

    started: float
    chunks: int = 0
    last: float = 0.0

    def chunk(self) -> None:
        self.chunks += 1
        self.last = time.monotonic()

    def describe(self) -> str:
        if not self.chunks:
            return "no chunk at all"
        return f"{self.chunks} chunks, the last {time.monotonic() - self.last:.0f} s ago"


async def _stream(client: openai.AsyncOpenAI, model: str, prompt: Prompt, max_tokens: int,
                  progress: Progress) -> tuple[str, str | None]:
    """The streamed answer and its finish reason (None: the stream ended without one)."""
    text, finish = "", None
    if prompt.kind == "chat":
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt.text}], max_tokens=max_tokens,
            temperature=0, stream=True)
        async for chunk in stream:
            progress.chunk()
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    else:
        stream = await client.completions.create(model=model, prompt=prompt.text, max_tokens=max_tokens,
                                                 temperature=0, stream=True)
        async for chunk in stream:
            progress.chunk()
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
    return text, finish


async def one_request(client: openai.AsyncOpenAI, model: str, prompts: list[Prompt], index: int,
                      max_tokens: int, deadline: float) -> Outcome:
    prompt = prompts[index]
    progress = Progress(time.monotonic())

    def outcome(status: Status, detail: str = "") -> Outcome:
        return Outcome(index, progress.started, time.monotonic(), status, detail)

    try:
        async with asyncio.timeout(deadline):
            text, finish = await _stream(client, model, prompt, max_tokens, progress)
    except TimeoutError:
        return outcome("hang", f"no end within {deadline:.0f} s ({progress.describe()})")
    except openai.APIStatusError as error:
        return outcome("error", f"HTTP {error.status_code}: {error.message}"[:200])
    except (openai.APIError, *TRANSPORT_ERRORS) as error:  # SSE error events, refused or broken connections
        return outcome("error", f"{type(error).__name__}: {error}"[:200])
    if finish is None:
        return outcome("truncated", repr(text))
    return outcome("ok") if text == prompt.expected else outcome("wrong", f"{text!r} != {prompt.expected!r}")


@dataclass
class Load:
    """``streams`` workers, each sending request after request until ``until`` (monotonic; it may be
    moved while they run)."""

    base_url: str
    key: str
    model: str
    prompts: list[Prompt]
    streams: int
    max_tokens: int
    deadline: float
    seed: int = 0

    def __post_init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.until = 0.0
        self._thread: threading.Thread | None = None

    def start(self, until: float) -> Load:
        self.until = until
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Whether every worker ended (each in-flight request ends within the deadline)."""
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.key, max_retries=0,
                                    timeout=openai.Timeout(self.deadline, connect=10))
        async with client:
            await asyncio.gather(*(self._worker(client, random.Random(self.seed + i))
                                   for i in range(self.streams)))

    async def _worker(self, client: openai.AsyncOpenAI, rng: random.Random) -> None:
        while time.monotonic() < self.until:
            outcome = await one_request(client, self.model, self.prompts, rng.randrange(len(self.prompts)),
                                        self.max_tokens, self.deadline)
            self.outcomes.append(outcome)
            if outcome.status == "error":
                await asyncio.sleep(1.0)  # a gateway that is down is not hammered
