"""Model output -> OpenAI `tool_calls`, whole or streamed, for the families' tool-call formats.

Formats (`PARSERS`):

* `hermes` (Hermes, Qwen2/2.5/3, and our default prompt): any number of
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, text around them is content.
* `llama3_json` (Llama 3.1/3.2/3.3 JSON tool calling): the answer *starts* with
  `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`); several calls are
  separated by `;`. An answer that starts otherwise is plain content.
* `mistral`: `[TOOL_CALLS]` then a JSON array `[{"name": ..., "arguments": {...}}, ...]`
  (v0.3 tokenizers), or `[TOOL_CALLS]name[ARGS]{...}` repeated per call (v11+ tokenizers,
  with an optional `[CALL_ID]id` before `[ARGS]`). Ids are 9 alphanumerics, as Mistral's
  templates demand when the calls come back in history.

Every parser reduces to one `scan(text, final)`: the content safe to show so far and the calls
seen so far (name once complete, the raw argument JSON text so far). `parse()` is the final scan;
`StreamingToolParser` rescans the growing text on every delta and emits the difference, so
streamed and whole results agree. Text that may be the start of a marker (`<tool_c`, `[TOOL_`)
is held back until it is known not to be one; trailing whitespace of content is held back too
(so the newlines between calls are never streamed as content).

As vLLM does, an output whose calls do not parse (unclosed, no name, arguments not JSON) is
returned whole as content by `parse()`; `StreamingToolParser.finish()` does the same when no
call was streamed yet.

The markers `[TOOL_CALLS]`, `[ARGS]` and `<|python_tag|>` are *special* tokens in those
tokenizers: the text fed to a parser must be decoded keeping them (`ToolParser.markers`).
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.agents.tool_prompt import TOOL_CALL_BEGIN, TOOL_CALL_END, _chat_template

__all__ = [
    "DEFAULT_PARSER",
    "PARSERS",
    "HermesParser",
    "Llama3JsonParser",
    "MistralParser",
    "ParsedOutput",
    "StreamDelta",
    "StreamingToolParser",
    "ToolParser",
    "get_parser",
    "parser_for_template",
]

_ALNUM = string.ascii_letters + string.digits


def openai_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def mistral_call_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


# ---------------------------------------------------------------- partial JSON scanning

_WS = " \t\r\n"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _value_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at `text[i]`, or None if the text stops first.

    A lenient scanner: brackets and strings are tracked, not validated (`json.loads` does that
    on the whole call). A bare scalar at the very end of the text counts as unfinished.
    """
    if i >= len(text):
        return None
    if text[i] == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    if text[i] in "{[":
        depth, j, in_string = 0, i, False
        while j < len(text):
            c = text[j]
            if in_string:
                if c == "\\":
                    j += 1
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + _WS:
        j += 1
    return j if j < len(text) else None


@dataclass
class _Call:
    """A call as seen so far."""

    name: str | None = None
    arguments: str = ""  # raw JSON text so far: only ever grows
    complete: bool = False
    valid: bool = True
    call_id: str | None = None  # an id the model wrote itself (Mistral's [CALL_ID])


_ARGUMENT_KEYS = ("arguments", "parameters")


def _scan_call_object(text: str, i: int, *, final: bool) -> tuple[_Call, int | None]:
    """The call object `{"name": ..., "arguments"|"parameters": ...}` at `text[i]` ('{').

    Returns the call and the end of the object (None while unfinished).
    """
    call, args_span, end = _Call(), None, None
    j = i + 1
    while True:
        j = _skip_ws(text, j)
        if j >= len(text):
            break
        if text[j] == "}":
            end = j + 1
            break
        if text[j] == ",":
            j += 1
            continue
        key_end = _value_end(text, j) if text[j] == '"' else None
        if key_end is None:
            call.valid = call.valid and text[j] == '"'  # an unfinished key is fine, anything else is not
            break
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if j >= len(text):
            break
        if text[j] != ":":
            call.valid = False
            break
        start = _skip_ws(text, j + 1)
        value_end = _value_end(text, start)
        if key == "name" and value_end is not None:
            name = json.loads(text[start:value_end]) if text[start] == '"' else None
            call.name, call.valid = (name, call.valid) if isinstance(name, str) else (None, False)
        elif key in _ARGUMENT_KEYS and start < len(text):
            args_span = (start, value_end)
        if value_end is None:
            break
        j = value_end
    if final and end is None:
        call.valid = False
    call.complete = end is not None
    if args_span is not None:
        call.arguments = _argument_text(text, *args_span)
    elif call.complete:
        call.arguments = "{}"
    return call, end


def _argument_text(text: str, start: int, end: int | None) -> str:
    """The arguments' JSON text to stream: raw for objects (growing), whole for the rest."""
    if text[start] == "{":
        return text[start:end] if end is not None else text[start:].rstrip()
    if end is None:
        return ""
    raw = text[start:end]
    if raw.startswith('"'):  # some models write the arguments as a JSON string of JSON
        inner = json.loads(raw)
        return inner if isinstance(inner, str) else raw
    return raw


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ---------------------------------------------------------------- parsers


@dataclass
class _Scan:
    content: str
    calls: list[_Call] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedOutput:
    """A whole answer: `content` (None when only calls) and OpenAI `tool_calls` dicts."""

    content: str | None
    tool_calls: list[dict[str, Any]]


class ToolParser:
    """One family's format. Subclasses implement `scan`."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # marker strings that must survive detokenization
    new_id: Callable[[], str] = staticmethod(openai_call_id)

    def scan(self, text: str, *, final: bool) -> _Scan:
        raise NotImplementedError

    def parse(self, text: str) -> ParsedOutput:
        scan = self.scan(text, final=True)
        if not scan.calls or not all(_usable(c) for c in scan.calls):
            return ParsedOutput(content=text, tool_calls=[])
        return ParsedOutput(
            content=scan.content.rstrip() or None,
            tool_calls=[_openai_call(c.call_id or self.new_id(), c.name, c.arguments) for c in scan.calls],
        )

    def streaming(self) -> StreamingToolParser:
        return StreamingToolParser(self)


def _usable(call: _Call) -> bool:
    if not (call.valid and call.complete and call.name):
        return False
    try:
        return isinstance(json.loads(call.arguments), dict)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
        return False


def _openai_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class HermesParser(ToolParser):
    """`<tool_call>{json}</tool_call>` blocks anywhere in the answer (also the default format)."""

    name = "hermes"
    markers = (TOOL_CALL_BEGIN, TOOL_CALL_END)

    def scan(self, text: str, *, final: bool) -> _Scan:
        content: list[str] = []
        calls: list[_Call] = []
        pos = 0
        while True:
            start = text.find(TOOL_CALL_BEGIN, pos)
            if start == -1:
                tail = text[pos:]
                content.append(tail if final else tail[: len(tail) - _held_back(tail, TOOL_CALL_BEGIN)])
                break
            content.append(text[pos:start])
            body = start + len(TOOL_CALL_BEGIN)
            end = text.find(TOOL_CALL_END, body)
            region = text[body:] if end == -1 else text[body:end]
            if end == -1 and not final:
                region = region[: len(region) - _held_back(region, TOOL_CALL_END)]
            calls.append(self._call(region, closed=end != -1 or final))
            if end == -1:
                break
            pos = end + len(TOOL_CALL_END)
        return _Scan("".join(content), calls)

    @staticmethod
    def _call(region: str, *, closed: bool) -> _Call:
        i = _skip_ws(region, 0)
        if i >= len(region):
            return _Call(valid=not closed)
        if region[i] != "{":
            return _Call(valid=False)
        call, end = _scan_call_object(region, i, final=closed)
        if closed and (end is None or region[end:].strip()):
            call.valid = False
        return call


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the answer is `[<|python_tag|>]{"name": ..., "parameters": ...}[; {...}]*`."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    markers = (PYTHON_TAG,)

    def scan(self, text: str, *, final: bool) -> _Scan:
        i = _skip_ws(text, 0)
        rest = text[i:]
        if not final and (not rest or (self.PYTHON_TAG.startswith(rest) and rest != self.PYTHON_TAG)):
            return _Scan("")  # undecided: hold everything back
        if rest.startswith(self.PYTHON_TAG):
            i = _skip_ws(text, i + len(self.PYTHON_TAG))
        if i < len(text) and text[i] != "{" or not rest:
            return _Scan(text)
        calls: list[_Call] = []
        while i < len(text) and text[i] == "{":
            call, end = _scan_call_object(text, i, final=final)
            calls.append(call)
            if end is None:
                break
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ";":
                i = _skip_ws(text, i + 1)
        else:
            if i < len(text):  # something after the calls that is not another call
                if calls:
                    calls[-1].valid = False
        return _Scan("", calls)


class MistralParser(ToolParser):
    """`[TOOL_CALLS][{...}, ...]` or `[TOOL_CALLS]name[ARGS]{...}` (repeated)."""

    name = "mistral"
    TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    markers = (TOOL_CALLS, ARGS, CALL_ID)
    new_id = staticmethod(mistral_call_id)

    def scan(self, text: str, *, final: bool) -> _Scan:
        start = text.find(self.TOOL_CALLS)
        if start == -1:
            return _Scan(text if final else text[: len(text) - _held_back(text, self.TOOL_CALLS)])
        content, i = text[:start], _skip_ws(text, start + len(self.TOOL_CALLS))
        if i >= len(text):
            return _Scan(content, [_Call(valid=False)] if final else [])
        calls = self._array(text, i, final) if text[i] == "[" else self._named(text, i, final)
        return _Scan(content, calls)

    @staticmethod
    def _array(text: str, i: int, final: bool) -> list[_Call]:
        calls: list[_Call] = []
        i += 1
        while True:
            i = _skip_ws(text, i)
            if i >= len(text) or text[i] == "]":
                if i >= len(text) and final and calls:
                    calls[-1].valid = False  # the array never closed
                return calls
            if text[i] == ",":
                i += 1
                continue
            if text[i] != "{":
                return calls + [_Call(valid=False)]
            call, end = _scan_call_object(text, i, final=final)
            calls.append(call)
            if end is None:
                return calls
            i = end

    def _named(self, text: str, i: int, final: bool) -> list[_Call]:
        calls: list[_Call] = []
        while True:
            args_at = text.find(self.ARGS, i)
            if args_at == -1:
                if final:
                    calls.append(_Call(valid=False))
                return calls
            name, _, call_id = text[i:args_at].partition(self.CALL_ID)
            start = _skip_ws(text, args_at + len(self.ARGS))
            end = _value_end(text, start)
            if end is None and final:
                end = len(text)
            call = _Call(name=name.strip() or None, call_id=call_id.strip() or None, complete=end is not None)
            call.arguments = _argument_text(text, start, end) if start < len(text) else ""
            calls.append(call)
            if end is None:
                return calls
            i = _skip_ws(text, end)
            if not text.startswith(self.TOOL_CALLS, i):
                if i < len(text) and final:
                    call.valid = False
                return calls
            i = _skip_ws(text, i + len(self.TOOL_CALLS))


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
DEFAULT_PARSER = HermesParser.name  # the format of the default tool prompt


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(PARSERS)}") from None


def parser_for_template(tokenizer_or_template: Any) -> ToolParser:
    """The parser for a chat template's tool format, from the markers its text mentions.

    `[TOOL_CALLS]` -> mistral; `<tool_call>` -> hermes; Llama 3 headers with `<|python_tag|>` or
    `ipython` -> llama3_json; anything else (no tool support) -> the default (hermes), matching
    `gateway.agents.tool_prompt`'s default prompt.
    """
    template = _chat_template(tokenizer_or_template)
    if MistralParser.TOOL_CALLS in template:
        return MistralParser()
    if TOOL_CALL_BEGIN in template:
        return HermesParser()
    if "<|start_header_id|>" in template and (Llama3JsonParser.PYTHON_TAG in template or "ipython" in template):
        return Llama3JsonParser()
    return get_parser(DEFAULT_PARSER)


# ---------------------------------------------------------------- streaming


@dataclass
class StreamDelta:
    """What one pushed text delta releases: content text and OpenAI tool-call delta dicts."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class StreamingToolParser:
    """Feed text deltas with `push()`, then `finish()`; each returns a `StreamDelta`.

    Tool-call deltas follow OpenAI's stream: a call's first delta carries `index`, `id`, `type`
    and `function.name` (with `arguments: ""`), later ones `index` and `function.arguments`
    fragments whose concatenation is the arguments JSON.
    """

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self._sent = ""  # content released so far
        self._ids: list[str] = []
        self._args_sent: list[int] = []
        self._finished = False

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._ids)

    def push(self, delta: str) -> StreamDelta:
        self.text += delta
        return self._emit(final=False)

    def finish(self) -> StreamDelta:
        if self._finished:
            return StreamDelta()
        self._finished = True
        out = self._emit(final=True)
        if not self._ids and self.text.startswith(self._sent):
            # nothing became a call: as parse() does, the whole text is content
            out.content += self.text[len(self._sent):]
            self._sent = self.text
        return out

    def _emit(self, *, final: bool) -> StreamDelta:
        scan = self.parser.scan(self.text, final=final)
        out = StreamDelta()
        content = scan.content if final and not scan.calls else scan.content.rstrip()
        if len(content) > len(self._sent):
            out.content = content[len(self._sent):]
            self._sent = content
        for index, call in enumerate(scan.calls):
            if call.name is None or (index == len(self._ids) and not call.valid):
                break  # calls stream in order: a nameless call blocks the ones after it
            entry: dict[str, Any] = {"index": index}
            if index == len(self._ids):
                self._ids.append(call.call_id or self.parser.new_id())
                self._args_sent.append(0)
                entry.update(id=self._ids[index], type="function", function={"name": call.name, "arguments": ""})
            if len(call.arguments) > self._args_sent[index]:
                entry.setdefault("function", {})["arguments"] = call.arguments[self._args_sent[index]:]
                self._args_sent[index] = len(call.arguments)
            if len(entry) > 1:
                out.tool_calls.append(entry)
        return out
