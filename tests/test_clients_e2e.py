"""Real agent/RAG clients against a real `swarmgate up` process (servers + gateway, as a user runs it).

Each client is used the way its documentation shows, pointed at the gateway's base URL and key:
LangChain `ChatOpenAI` (`with_structured_output` with its default json_schema method, `bind_tools`
with a forced call), instructor in JSON-schema mode, openai-agents `Runner.run` with its default
(Responses API) model and a function tool, LlamaIndex `OpenAILike` (completions and chat), and the
openai SDK's embeddings.

On a tiny random-weight checkpoint, guided decoding is what makes structured answers valid, so
schemas keep strings short and choices closed (a random walk must end within `max_tokens`). On the
real embedded model (SmolLM2-135M-Instruct, `slow`), the answers must also mean something: the
greedy answer to "What is the capital of France?" names Paris, and 50 random (schema, prompt)
pairs through `response_format` json_schema strict all parse and validate.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import openai
import pydantic
import pytest

from blocks.tiny_checkpoints import build_checkpoint
from swarmgate.launcher import UpProcess, start_up
from tests.support import free_port

pytestmark = pytest.mark.e2e

# instructor (jiter<0.15, so openai<=3.3) and llama-index-llms-openai (openai<3) pin openai below
# what openai-agents (>=3) and this project's venv use, so they are not in the test extras; install
# them with `pip install --no-deps instructor llama-index-llms-openai llama-index-llms-openai-like`
# (plus `llama-index-core docstring-parser typer aiohttp "rich<15"`) to run their tests.
NOT_IN_EXTRAS = "not in the test extras (its openai pin conflicts with openai-agents'); see NOT_IN_EXTRAS"
READY_TIMEOUT = 240.0  # the embedded model's first conversion takes tens of seconds on top of startup


@contextmanager
def swarmgate_up(model: Path, data_dir: Path, *extra: str) -> Iterator[UpProcess]:
    """`swarmgate up --model MODEL` with one block server; stopped (SIGTERM, then SIGKILL) afterwards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    up = start_up(["--model", str(model), "--servers", "1", "--port", str(free_port()), "--data-dir", str(data_dir),
                   "--max-concurrent-requests", "8", *extra], log=data_dir / "up.log", timeout=READY_TIMEOUT)
    try:
        yield up
    finally:
        up.stop()


def sdk(up: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=0, timeout=120)


# --- what the clients are asked for ---------------------------------------------------------------


class Weather(pydantic.BaseModel):
    """The weather in a city."""

    # additionalProperties false: without it (and without `strict`) the gateway's grammar admits
    # extra properties, and a random model may add them until max_tokens runs out
    model_config = pydantic.ConfigDict(extra="forbid")

    city: str = pydantic.Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]
    precise: bool


class Verdict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    ok: bool
    level: int = pydantic.Field(ge=0, le=9)


class WeatherArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}, 21 degrees {unit}"


ASK = "What is the weather in Paris?"


# --- the clients: on a tiny random-weight checkpoint, and (slow) on the embedded model ------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    root = tmp_path_factory.mktemp("clients")
    checkpoint = build_checkpoint(root / "tiny-clients", max_position_embeddings=2048)
    with swarmgate_up(checkpoint, root / "data") as up:
        yield up


@pytest.fixture(scope="module", params=["tiny", pytest.param("smol", marks=pytest.mark.slow)])
def up(request: pytest.FixtureRequest) -> UpProcess:
    """Every client test runs on the tiny checkpoint and (slow) on the real embedded model."""
    return request.getfixturevalue(request.param)


def test_langchain_structured_output(up):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=up.model, base_url=up.base_url, api_key=up.api_key, max_retries=0, max_tokens=200,
                     seed=1)
    weather = llm.with_structured_output(Weather).invoke(ASK)  # method="json_schema" by default
    assert isinstance(weather, Weather)
    verdict = llm.with_structured_output(Verdict, method="json_schema", strict=True).invoke("Is it fine?")
    assert isinstance(verdict, Verdict)


def test_langchain_bind_tools_forced_call(up):
    from langchain_core.tools import StructuredTool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=up.model, base_url=up.base_url, api_key=up.api_key, max_retries=0, max_tokens=200,
                     seed=2)
    weather_tool = StructuredTool.from_function(get_weather, args_schema=WeatherArgs)  # short strings: see above
    for choice in ("get_weather", "any"):  # a named function; "any" is LangChain's word for "required"
        message = llm.bind_tools([weather_tool], tool_choice=choice, parallel_tool_calls=False).invoke(ASK)
        assert message.response_metadata["finish_reason"] == "tool_calls" and not message.invalid_tool_calls
        call = message.tool_calls[0]
        assert call["name"] == "get_weather" and call["id"]
        WeatherArgs.model_validate(call["args"])
        assert weather_tool.invoke(call["args"]).startswith("sunny in")


def test_instructor_json_schema_mode(up):
    instructor = pytest.importorskip("instructor", reason=NOT_IN_EXTRAS)

    client = instructor.from_openai(sdk(up), mode=instructor.Mode.JSON_SCHEMA)
    weather = client.chat.completions.create(
        model=up.model, response_model=Weather, messages=[{"role": "user", "content": ASK}], max_tokens=200,
        max_retries=0,
    )
    assert isinstance(weather, Weather)


def test_openai_agents_runner_with_a_function_tool(up):
    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_api,
                        set_default_openai_client, set_tracing_disabled)

    set_tracing_disabled(True)
    set_default_openai_api("responses")  # the default; said so the test states what it proves
    set_default_openai_client(openai.AsyncOpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=0),
                              use_for_tracing=False)
    calls: list[dict] = []

    @function_tool
    def weather(city: Annotated[str, pydantic.Field(max_length=8)], unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        calls.append({"city": city, "unit": unit})
        return get_weather(city, unit)

    agent = Agent(
        name="forecaster", instructions="Answer with the weather tool.", model=up.model, tools=[weather],
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=200),
        tool_use_behavior="stop_on_first_tool",  # a random model would otherwise never stop calling
    )
    result = asyncio.run(Runner.run(agent, ASK, max_turns=3))
    assert len(calls) == 1 and calls[0]["unit"] in ("celsius", "fahrenheit")
    assert result.final_output == get_weather(**calls[0])
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item"]


def test_llamaindex_openai_like_complete_and_chat(up):
    pytest.importorskip("llama_index.llms.openai_like", reason=NOT_IN_EXTRAS)
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    common = dict(model=up.model, api_base=up.base_url, api_key=up.api_key, max_tokens=8, max_retries=0,
                  context_window=2048, timeout=120)
    completion = OpenAILike(**common, is_chat_model=False).complete("Once upon a time")
    assert completion.text and completion.raw is not None
    reply = OpenAILike(**common, is_chat_model=True).chat([ChatMessage(role="user", content="Hello!")])
    assert reply.message.role == "assistant" and reply.message.content


def test_embeddings_through_the_swarm(up):
    client = sdk(up)
    response = client.embeddings.create(model=up.model, input=["hello", "a longer sentence than hello"])
    vectors = [item.embedding for item in response.data]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    assert response.usage.prompt_tokens > 2


# --- the real embedded model (SmolLM2-135M-Instruct) ----------------------------------------------

STRUCTURED_PAIRS = 50


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    try:
        from blocks.gguf_checkpoint import embedded_model_path

        path = embedded_model_path()
    except Exception as error:  # the package or its GGUF is missing: say so, don't fail unrelated tests
        pytest.skip(f"the embedded model is not available: {error!r}")
    with swarmgate_up(path, tmp_path_factory.mktemp("smol")) as up:
        yield up


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france(smol):
    reply = sdk(smol).chat.completions.create(
        model=smol.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=20,
    )
    assert "Paris" in reply.choices[0].message.content


def random_schema(rng: random.Random) -> dict:
    """A small strict-mode schema (every property required, no others) of bounded output length."""
    words = ["red", "green", "blue", "cat", "dog", "yes", "no", "north", "south", "alpha", "beta"]

    def leaf() -> dict:
        kind = rng.choice(["boolean", "integer", "enum", "string", "array", "number"])
        if kind == "integer":
            low = rng.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
        if kind == "enum":
            return {"type": "string", "enum": rng.sample(words, rng.randint(2, 4))}
        if kind == "string":
            return {"type": "string", "minLength": 1, "maxLength": rng.randint(3, 12)}
        if kind == "array":
            return {"type": "array", "items": {"type": "string", "enum": rng.sample(words, 3)},
                    "minItems": 1, "maxItems": 3}
        if kind == "number":
            return {"type": "number", "minimum": 0, "maximum": 10}
        return {"type": "boolean"}

    def obj(depth: int) -> dict:
        names = rng.sample(["name", "color", "count", "ok", "size", "kind", "tags", "score", "place"],
                           rng.randint(1, 3 if depth else 4))
        properties = {name: obj(depth + 1) if depth == 0 and rng.random() < 0.15 else leaf() for name in names}
        return {"type": "object", "properties": properties, "required": names, "additionalProperties": False}

    return obj(0)


PROMPTS = [
    "Describe a pet as JSON.", "Give me today's weather as JSON.", "Summarise a short story as JSON.",
    "Invent a product and describe it in JSON.", "What colour is the sky? Answer in JSON.",
    "Rate a movie you like, in JSON.", "Describe a city in JSON.", "List some facts about cats in JSON.",
]


@pytest.mark.slow
def test_embedded_model_structured_outputs_always_validate(smol):
    import jsonschema
    from concurrent.futures import ThreadPoolExecutor

    client = sdk(smol)
    rng = random.Random(12)
    cases = [(random_schema(rng), rng.choice(PROMPTS)) for _ in range(STRUCTURED_PAIRS)]

    def ask(index: int) -> tuple[dict, str, str]:
        schema, prompt = cases[index]
        reply = client.chat.completions.create(
            model=smol.model, messages=[{"role": "user", "content": prompt}], max_tokens=160, temperature=0.7,
            seed=index,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema,
                                                                     "strict": True}},
        )
        return schema, reply.choices[0].message.content, reply.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(len(cases))))
    failures = []
    for schema, content, finish in results:
        try:
            assert finish == "stop", f"finish_reason {finish}"
            jsonschema.validate(json.loads(content), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as error:
            failures.append(f"{json.dumps(schema)} -> {content!r}: {error}")
    assert not failures, f"{len(failures)} of {len(cases)} invalid:\n" + "\n".join(failures[:5])


@pytest.mark.slow
def test_embedded_model_embeddings_rank_the_paraphrase_first(smol):
    response = sdk(smol).embeddings.create(model=smol.model, input=[
        "The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply on Monday.",
    ])
    cat, paraphrase, stocks = ([*item.embedding] for item in response.data)
    cosine = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 (unit vectors)
    assert len(cat) == 576
    assert cosine(cat, paraphrase) > cosine(cat, stocks)
