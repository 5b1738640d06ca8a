"""Request and response bodies of the OpenAI-compatible API, in OpenAI's exact shapes.

Requests accept OpenAI's parameters plus vLLM's sampling extras (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos), its `cache_salt`, and ignore unknown fields, as vLLM does. Parameters
that are recognised but not supported (echo, suffix, ...) are declared so they can be refused
with a 400 instead of being silently dropped. Tools, tool choice and `response_format` are served
through `gateway.inference.agentic` (rendering, guided decoding, tool-call parsing).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

# What the validators below enforce, stated in the OpenAPI schema too (so generated clients and
# schemathesis see the real constraints); the validators keep their clearer messages.
NON_EMPTY: dict[str, Any] = {"minLength": 1}
_CONTENT = {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}
_CALLS = {"required": ["role", "tool_calls"],
          "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}

FinishReason = Literal["stop", "length", "tool_calls"]
MAX_STOPS, MAX_STOP_LENGTH = 16, 1000  # stop strings per request, characters per stop string


# --- requests -------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    """An assistant's call of a function, as OpenAI writes it (`arguments` a JSON string)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # content, unless it is an assistant message with tool calls
    model_config = ConfigDict(json_schema_extra={"anyOf": [_CONTENT, _CALLS]})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None  # tool messages: the call they answer

    @model_validator(mode="after")
    def _content_unless_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required in {self.role} messages (assistant messages may have tool_calls)")
        return self

    def text(self) -> str:
        """The content as one string; text parts are joined with newlines, as vLLM does."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates (and `gateway.agents.tool_prompt`) take it."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = {"populate_by_name": True}


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON matching the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # `{"type": "json_object", "schema": {...}}` (Anyscale/Together style, sent by instructor's
    # JSON-schema mode): a JSON object matching the schema.
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    model_config = ConfigDict(populate_by_name=True, json_schema_extra={"anyOf": [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"properties": {"json_schema": {"type": "object"}}, "required": ["json_schema"]},
    ]})

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


# Constraints between fields, stated in the schema too (the validators below enforce them).
_STREAM_OPTIONS_NEED_STREAM = {"anyOf": [
    {"properties": {"stream_options": {"type": "null"}}},
    {"properties": {"stream": {"const": True}}, "required": ["stream"]},
]}
_TOP_LOGPROBS_NEED_LOGPROBS = {"anyOf": [
    {"properties": {"top_logprobs": {"type": "null"}}},
    {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
]}
_REQUIRED_TOOL_CHOICE_NEEDS_TOOLS = {"anyOf": [
    {"properties": {"tool_choice": {"not": {"const": "required"}}}},
    {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]},
]}


class SamplingFields(BaseModel):
    """Parameters shared by chat and text completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    model: str = Field(json_schema_extra=NON_EMPTY)
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
        {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}},
        {"type": "null"},
    ]})
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "object", "propertyNames": {"pattern": "^-?[0-9]+$"},
         "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
        {"type": "null"},
    ]})
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=256)  # prompts share cached starts only under one salt

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be between -100 and 100, got {value} for token {key}")
        return bias

    @field_validator("stop")
    @classmethod
    def _stops_bounded(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """Bounded: every token's text is checked against them on the head's thread, which all
        tenants share (OpenAI takes up to 4)."""
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_LENGTH} characters each")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS, _REQUIRED_TOOL_CHOICE_NEEDS_TOOLS,
    ]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        names = [tool.function.name for tool in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def tools_active(self) -> bool:
        """Tools are offered to the model (and its output is parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
    ]}, description="One prompt: text or token ids (a list of one prompt is that prompt).")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    # Recognised but unsupported: refused when set.
    echo: bool = Field(False, json_schema_extra={"const": False})
    suffix: str | None = Field(None, json_schema_extra={"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}]})

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int] | list[list[int]]) -> Any:
        """One prompt per request: a list of one prompt becomes that prompt (`str` or token ids)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            return prompt[0]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix


# --- responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not self.tool_calls:
            data.pop("tool_calls", None)  # as OpenAI: no key when no calls
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """A streamed message fragment; unset fields are left out, as in OpenAI's chunks."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's tool-call deltas (index, id, type, function)

    @model_serializer
    def _without_none(self) -> dict[str, Any]:
        fields = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
        return {key: value for key, value in fields if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A text completion; streamed chunks have the same shape (with `finish_reason` null)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swarmgate"
    max_model_len: int = Field(description="Context length in tokens (vLLM's extension).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"



# --- embeddings -----------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # as OpenAI: inputs per request


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: one text, texts, one token-id list or token-id lists."""

    model: str = Field(json_schema_extra=NON_EMPTY)
    input: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
    ]})
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs_not_empty(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            value = [value]  # one input
        if not value:
            raise ValueError("input must not be an empty list")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}")
        if any(not item for item in value):
            raise ValueError("inputs must not be empty strings or empty token lists")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list (one input becomes a list of one)."""
        return self.input  # type: ignore[return-value]  # normalised by `_inputs_not_empty`


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
