"""Tools and structured outputs for chat-shaped requests (chat completions and the Responses API).

Three things happen per request, all before a swarm session is opened:

* the prompt: plain messages go through the chat template as before; with tools, tool messages or
  assistant tool calls, through `gateway.agents.tool_prompt.render_chat` (the template's own tool
  rendering when it has one, else the default Hermes-style tool prompt);
* the grammar: `tool_choice` `required`/named -> `guided.tool_calls` (Hermes format, whatever the
  template; such requests are therefore prompted in that format too), else `response_format`
  `json_schema`/`json_object` -> the JSON grammar; compiled (or found in the model's grammar
  cache) in a worker thread, a bad schema being a 400;
* the output: with tools active, the tool parser of the template's family (Hermes for guided
  rows) turns the text into `tool_calls`, whole (`ChatOutput.whole`) or as OpenAI's deltas
  (`ChatOutput.push`/`finish`), and the decoder keeps the parser's marker tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from gateway.agents import guided
from gateway.agents.tool_parsers import HermesParser, StreamDelta, StreamingToolParser, ToolParser, parser_for_template
from gateway.agents.tool_prompt import messages_with_default_tools, render_chat
from gateway.inference.generation import Guide
from gateway.models import ServedModel
from gateway.protocol.errors import InvalidRequest
from gateway.protocol.schemas import ChatCompletionRequest, FinishReason, NamedToolChoice


@dataclass(frozen=True)
class ChatPlan:
    """What a chat-shaped request becomes before generation."""

    prompt_ids: list[int]
    guide: Guide | None
    tool_parser: ToolParser | None


def _tool_choice(body: ChatCompletionRequest) -> Any:
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return choice.model_dump()
    return choice or "auto"


def _forced(body: ChatCompletionRequest) -> bool:
    return body.tools_active and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice))


def grammar_spec(body: ChatCompletionRequest) -> tuple[guided.GrammarSpec | None, str]:
    """The grammar the request asks for and the parameter that asked (for 400s)."""
    if _forced(body):
        assert body.tools is not None
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        choice = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else "required"
        return guided.tool_calls(tools, choice, parallel=body.parallel_tool_calls is not False), "tools"
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None, ""
    if fmt.type == "json_object":
        if fmt.schema_:
            return guided.json_schema(fmt.schema_, strict=False), "response_format"
        return guided.json_object(), "response_format"
    assert fmt.json_schema is not None
    schema = fmt.json_schema.schema_
    if schema is None or schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object.", param="response_format")
    return guided.json_schema(schema, strict=True), "response_format"  # as vLLM: no extra properties, strict or not


def _render(body: ChatCompletionRequest, model: ServedModel, forced_hermes: bool) -> list[int]:
    tokenizer = model.tokenizer
    messages = [message.template_message() for message in body.messages]
    plain = not body.tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if plain:  # exactly the template, as before tools existed
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice, parallel = _tool_choice(body), body.parallel_tool_calls is not False
    if forced_hermes:  # the grammar writes Hermes calls: ask for them in that format
        text = tokenizer.apply_chat_template(
            messages_with_default_tools(messages, tools, tool_choice=choice, parallel_tool_calls=parallel),
            tokenize=False, add_generation_prompt=True,
        )
    else:
        text = render_chat(tokenizer, messages, tools=tools or None, tool_choice=choice, parallel_tool_calls=parallel)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def plan_chat(body: ChatCompletionRequest, model: ServedModel) -> ChatPlan:
    """Blocking (templates, tokenizer, grammar compilation): run it in a worker thread."""
    if model.tokenizer.chat_template is None:
        raise InvalidRequest(f"Model '{model.id}' has no chat template; use /v1/completions.", param="model")
    spec, param = grammar_spec(body)
    guide = None
    if spec is not None:
        library = model.grammars()
        try:
            library.compile(spec)  # cached for the rows' matchers; a bad schema is the client's 400
        except ValueError as error:
            raise InvalidRequest(f"Invalid {param}: {error}", param=param) from None
        guide = Guide(library, spec)
    parser: ToolParser | None = None
    forced_hermes = False
    if guide is not None and guide.kind == "tool_calls":
        parser = HermesParser()
        forced_hermes = not isinstance(parser_for_template(model.tokenizer), HermesParser)
    elif body.tools_active:
        parser = parser_for_template(model.tokenizer)
    try:
        prompt_ids = _render(body, model, forced_hermes)
    except TemplateError as error:  # templates reject e.g. non-alternating roles
        raise InvalidRequest(f"The chat template rejected the messages: {error}", param="messages") from None
    return ChatPlan(prompt_ids, guide, parser)


class ChatOutput:
    """A request's choices' text -> content and tool calls (a pass-through without a tool parser).

    `parallel=False` keeps only the first call (OpenAI's `parallel_tool_calls: false`).
    """

    def __init__(self, parser: ToolParser | None, n: int, *, parallel: bool = True):
        self.parser = parser
        self.parallel = parallel
        self._streams: list[StreamingToolParser] | None = (
            [parser.streaming() for _ in range(n)] if parser is not None else None
        )

    def push(self, index: int, text: str) -> StreamDelta:
        if self._streams is None:
            return StreamDelta(content=text)
        return self._limit(self._streams[index].push(text))

    def finish(self, index: int, finish_reason: FinishReason) -> tuple[StreamDelta, FinishReason]:
        """The choice's held-back rest, and its finish reason (`tool_calls` when it called any)."""
        if self._streams is None:
            return StreamDelta(), finish_reason
        stream = self._streams[index]
        delta = self._limit(stream.finish())
        return delta, "tool_calls" if stream.has_tool_calls and finish_reason == "stop" else finish_reason

    def whole(self, text: str, finish_reason: FinishReason | None) -> tuple[str | None, list[dict[str, Any]], Any]:
        """(content, OpenAI tool_calls dicts, finish reason) of a whole choice."""
        if self.parser is None:
            return text, [], finish_reason
        parsed = self.parser.parse(text)
        calls = parsed.tool_calls if self.parallel else parsed.tool_calls[:1]
        if not calls:
            return text, [], finish_reason
        return parsed.content, calls, "tool_calls" if finish_reason == "stop" else finish_reason

    def _limit(self, delta: StreamDelta) -> StreamDelta:
        if not self.parallel:
            delta.tool_calls = [call for call in delta.tool_calls if call["index"] == 0]
        return delta


def chat_output(body: ChatCompletionRequest, parser: ToolParser | None, n: int) -> ChatOutput:
    return ChatOutput(parser, n, parallel=body.parallel_tool_calls is not False)

