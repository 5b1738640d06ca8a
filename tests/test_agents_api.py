"""Tools, structured outputs and the Responses API through the real path.

A real uvicorn in a thread, the in-process backend (`tests.support.LocalBackend`) and the
official `openai` SDK, on a tiny random-weight checkpoint: guided decoding makes even random
weights produce output that parses and validates, which is what these tests check. Schemas keep
strings short (`maxLength`) and choices closed (enums, booleans) so that random walks end fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pydantic
import pytest
import torch
from fastapi import FastAPI

from blocks.head import ModelHead
from blocks.tiny_checkpoints import EOS, build_checkpoint
from gateway.app import create_app
from gateway.inference.sampling import Sampler, SamplingParams
from gateway.settings import Settings
from gateway.storage.tenants import KeyStore
from tests.support import LocalBackend

pytestmark = pytest.mark.e2e

MODEL = "tiny-agent"


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]
    precise: bool


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": Weather.model_json_schema(),
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("agents") / "tiny", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def app(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    data_dir = tmp_path_factory.mktemp("agents-data")
    head = ModelHead(checkpoint)
    settings = Settings(models={MODEL: checkpoint}, data_dir=data_dir, max_concurrent_requests=4)
    app = create_app(settings, LocalBackend(checkpoint, MODEL), head_loader=lambda path: head)
    app.state.test_keys = {tenant: KeyStore(data_dir).create_key(tenant) for tenant in ("acme", "globex")}
    return app


@pytest.fixture
def client(base_url: str, app: FastAPI) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=app.state.test_keys["acme"], max_retries=0, timeout=60)


@pytest.fixture
def other_client(base_url: str, app: FastAPI) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=app.state.test_keys["globex"], max_retries=0, timeout=60)


@pytest.fixture
def http(base_url: str, app: FastAPI) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {app.state.test_keys['acme']}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        yield http


class Time(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    zone: Literal["UTC", "CET"]


class Status(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    ok: bool
    level: int = pydantic.Field(ge=0, le=9)


VALIDATORS = {"get_weather": Weather, "get_time": Time}


def assert_valid_call(name: str, arguments: str, allowed: set[str]) -> dict:
    assert name in allowed
    value = json.loads(arguments)
    VALIDATORS[name].model_validate(value)
    return value


# --- structured outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_parse_with_a_pydantic_model(client, seed):
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Weather, max_tokens=200, seed=seed
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Weather)
    assert Weather.model_validate_json(message.content) == message.parsed


def test_json_schema_greedy_several_choices_and_streamed(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "level"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}}
    whole = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, max_tokens=100, temperature=0, n=2
    )
    for choice in whole.choices:
        Status.model_validate_json(choice.message.content)
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, max_tokens=100, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole.choices[0].message.content  # same grammar, same greedy walk


def test_json_object(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=300, seed=3,
        # min_tokens and ignore_eos must not keep a finished grammar from stopping
        extra_body={"min_tokens": 50},
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "schema", [{"type": "object", "properties": {"a": {"type": "nonsense"}}}, {"type": "string", "pattern": "(("}]
)
def test_bad_schema_is_a_400(client, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=10)
    assert error.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(
            model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "bad", "schema": schema}}
        )


# --- tool calls -----------------------------------------------------------------------------------


def test_streamed_required_tool_call_assembles_to_a_valid_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=200, stream=True, seed=5,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        assert not choice.delta.content  # guided tool calls leave no content
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            if delta.id:
                assert call["id"] is None, "a call's id is sent once"
                call.update(id=delta.id, name=delta.function.name)
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert_valid_call(calls[0]["name"], calls[0]["arguments"], {"get_weather", "get_time"})


def test_named_tool_choice(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_time"
    assert_valid_call(call.function.name, call.function.arguments, {"get_time"})


def test_tool_message_round_trip(client, checkpoint):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200
    )
    assert second.choices[0].finish_reason == "tool_calls"
    # the tool's answer and the earlier call are in the prompt
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20
    # tool_choice none: the same history, no tools rendered and nothing parsed
    plain = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert plain.choices[0].message.tool_calls is None and plain.usage.prompt_tokens < second.usage.prompt_tokens


def test_prompt_renders_tools_and_results(checkpoint):
    from gateway.inference.agentic import plan_chat
    from gateway.models import ServedModel
    from gateway.protocol.schemas import ChatCompletionRequest

    model = ServedModel.load(MODEL, checkpoint, lambda path: ModelHead(path))
    body = ChatCompletionRequest(model=MODEL, tools=TOOLS, messages=[
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ])
    plan = plan_chat(body, model)
    prompt = model.tokenizer.decode(plan.prompt_ids)
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>' in prompt
    assert "<tool_response>\n12:00\n</tool_response>" in prompt
    assert plan.guide is None and plan.tool_parser is not None  # auto: parsed, not forced


def test_auto_tool_choice_as_langchain_sends_it(http):
    """LangChain's bind_tools: tools, tool_choice auto and parallel_tool_calls; content or calls come back."""
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
            "max_tokens": 8, "stream": False, "n": 1, "temperature": 0.7}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and (message["content"] is not None or message["tool_calls"])


def test_tool_choice_validation(http):
    def post(**fields) -> httpx.Response:
        return http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **fields})

    assert post(tool_choice="required").status_code == 400
    assert post(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}).status_code == 400
    assert post(messages=[{"role": "tool", "content": "x"}, *ASK], max_tokens=1).status_code == 200


def test_guided_rows_stop_despite_min_tokens():
    vocab, eos = 8, 7

    class Done:
        """A grammar that is complete: only EOS is allowed."""

        vocab_size = vocab

        def is_terminated(self) -> bool:
            return False

        def prepare(self) -> None: ...

        def accept(self, token: int) -> bool:
            return token == eos

    from gateway.agents import guided

    original = guided.apply_masks
    guided.apply_masks = lambda matchers, logits: logits.__setitem__((0, slice(0, eos)), float("-inf")) or logits
    try:
        sampler = Sampler(SamplingParams(temperature=0, min_tokens=5), prompt_ids=[1], batch=2, vocab_size=vocab,
                          eos_token_ids=[eos], matchers=[Done(), None])
        logits = torch.zeros(2, vocab)
        logits[:, eos] = 10.0
        tokens = sampler.sample(logits)
    finally:
        guided.apply_masks = original
    assert tokens[0].token_id == eos  # the guided row may stop
    assert tokens[1].token_id != eos  # the unguided row still waits for min_tokens


# --- the Responses API ----------------------------------------------------------------------------


def test_responses_create_plain(client):
    response = client.responses.create(model=MODEL, input="Hello there", instructions="Be brief.", max_output_tokens=8)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == MODEL
    assert response.status in ("completed", "incomplete")
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.output_text == item.content[0].text
    assert response.usage.output_tokens <= 8 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"


def test_responses_streamed_text_event_order(client):
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=12, stream=True,
                                         extra_body={"seed": 1}))
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    middle = [t for t in types[2:-1] if t != "response.output_text.delta"]
    assert middle == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
    ]
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = next(event for event in events if event.type == "response.output_text.done")
    final = events[-1].response
    assert done.text == text == final.output_text
    assert final.usage.output_tokens == 12 or final.status == "completed"


def test_responses_streamed_function_call(client):
    tools = [{"type": "function", "name": "get_time", "parameters": TIME_TOOL["function"]["parameters"],
              "strict": True}]
    events = list(client.responses.create(
        model=MODEL, input="What time is it?", tools=tools, tool_choice="required", stream=True,
        parallel_tool_calls=False, max_output_tokens=100,
    ))
    types = [event.type for event in events]
    middle = [t for t in types[2:-1] if t != "response.function_call_arguments.delta"]
    assert middle == ["response.output_item.added", "response.function_call_arguments.done", "response.output_item.done"]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (call,) = events[-1].response.output
    assert call.type == "function_call" and call.name == "get_time" and call.arguments == arguments
    assert_valid_call(call.name, arguments, {"get_time"})


def test_responses_text_format_json_schema(client):
    response = client.responses.parse(model=MODEL, input="Weather?", text_format=Weather, max_output_tokens=200)
    assert isinstance(response.output_parsed, Weather)


def test_previous_response_id_and_function_call_output_round_trip(client):
    tools = [{"type": "function", "name": "get_time", "parameters": TIME_TOOL["function"]["parameters"]}]
    first = client.responses.create(
        model=MODEL, input="What time is it?", tools=tools, tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=100,
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_time"
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=tools, max_output_tokens=4,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12:00 UTC"}],
    )
    assert second.previous_response_id == first.id
    # the conversation (question, call, result) is in the prompt
    assert second.usage.input_tokens > first.usage.input_tokens + 10
    items = client.responses.input_items.list(second.id)
    assert [item.type for item in items.data] == ["function_call_output"]


def test_retrieve_delete_store_false_and_tenants(client, other_client):
    stored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    assert client.responses.retrieve(stored.id).output_text == stored.output_text
    with pytest.raises(openai.NotFoundError):
        other_client.responses.retrieve(stored.id)  # another tenant's response
    with pytest.raises(openai.NotFoundError):
        other_client.responses.create(model=MODEL, input="Hi", previous_response_id=stored.id, max_output_tokens=3)
    with pytest.raises(openai.NotFoundError):
        other_client.responses.delete(stored.id)
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)

    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hi", previous_response_id=unstored.id, max_output_tokens=3)


def test_responses_accepts_what_openai_agents_sends(http):
    body = {
        "model": MODEL,
        "instructions": "You are a helpful agent.",
        "input": [
            {"role": "user", "content": "What time is it?"},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_time",
             "arguments": '{"zone": "UTC"}', "status": "completed"},
            {"type": "function_call_output", "call_id": "call_1", "output": "12:00"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
        ],
        "tools": [{"type": "function", "name": "get_time", "description": "Time now.", "strict": True,
                   "parameters": TIME_TOOL["function"]["parameters"]}],
        "tool_choice": "auto", "parallel_tool_calls": False, "include": [], "store": True, "stream": False,
        "truncation": "disabled", "reasoning": None, "prompt_cache_key": "x", "top_logprobs": None,
        "max_output_tokens": 4, "temperature": 0.5, "top_p": 0.9, "metadata": {"k": "v"},
        "extra_unknown_field": {"anything": 1},
    }
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["metadata"] == {"k": "v"} and data["usage"]["output_tokens"] <= 4

    refused = http.post("/v1/responses", json={"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools[0]"


def test_json_object_with_a_schema_as_instructor_sends_it(http):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 100, "seed": 2,
            "response_format": {"type": "json_object", "schema": Time.model_json_schema()}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    Time.model_validate_json(response.json()["choices"][0]["message"]["content"])


def test_decoding_keeps_tool_markers_only():
    from blocks.tiny_checkpoints import train_tokenizer
    from gateway.inference.generation import marker_decoder

    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    ids = tokenizer.encode("Hi" + EOS + "[TOOL_CALLS]" + "x", add_special_tokens=False)
    assert marker_decoder(tokenizer, ())(ids) == "Hix"
    assert marker_decoder(tokenizer, ("[TOOL_CALLS]", "[ARGS]"))(ids) == "Hi[TOOL_CALLS]x"
