"""Tool-call parsers and tool prompts (gateway.agents) on the families' real chat templates.

The templates below are the families' published ones, written out as strings (no downloads):
Qwen2.5-Instruct's (Hermes `<tool_call>` format), Llama 3.1's JSON tool-calling template (as
vLLM ships it, examples/tool_chat_template_llama3.1_json.jinja) and Mistral's v0.3
`[AVAILABLE_TOOLS]`/`[TOOL_CALLS]` template (vLLM's examples/tool_chat_template_mistral_official.jinja).
They render through a real `PreTrainedTokenizerFast` (the tiny checkpoints' BPE), and what the
model would answer in each format parses back into OpenAI tool calls, whole and streamed.
"""

from __future__ import annotations

import json
import random

import pytest

from blocks.tiny_checkpoints import CHAT_TEMPLATE, train_tokenizer
from gateway.agents.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    get_parser,
    parser_for_template,
)
from gateway.agents.tool_prompt import (
    default_tool_prompt,
    messages_with_default_tools,
    render_chat,
    template_supports_tools,
)

QWEN25_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA31_TEMPLATE = """\
{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_V03_TEMPLATE = """\
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token }}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- set content = message.content %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def base_tokenizer():
    return train_tokenizer()


def with_template(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


def streamed(parser, text, seed=0):
    """Stream `text` in random-sized pieces; merge the deltas as an OpenAI client does."""
    rng, stream, pos = random.Random(seed), parser.streaming(), 0
    deltas = []
    while pos < len(text):
        size = rng.randint(1, 6)
        deltas.append(stream.push(text[pos:pos + size]))
        pos += size
    deltas.append(stream.finish())
    content, calls = "", {}
    for delta in deltas:
        content += delta.content
        for d in delta.tool_calls:
            if d["index"] not in calls:
                assert {"id", "type"} <= d.keys() and d["function"].get("name"), "first delta must carry id+name"
                calls[d["index"]] = {"id": d["id"], "type": "function", "function": {"name": d["function"]["name"],
                                                                                    "arguments": ""}}
            else:
                assert "id" not in d and "name" not in d.get("function", {})
            calls[d["index"]]["function"]["arguments"] += d.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def assert_same_calls(got, want):
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want
    ]


def check_both_ways(parser, text, *, content, calls):
    """parse() and the streamed result both give `content` and calls [(name, args)]."""
    whole = parser.parse(text)
    assert whole.content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole.tool_calls] == calls
    for c in whole.tool_calls:
        assert c["type"] == "function" and isinstance(c["function"]["arguments"], str) and c["id"]
    for seed in range(3):
        got_content, got_calls = streamed(parser, text, seed)
        assert got_content == (content or "")
        assert_same_calls(got_calls, whole.tool_calls)
    return whole


# ------------------------------------------------------------------ template detection


@pytest.mark.parametrize(
    "template, parser, supports",
    [
        (QWEN25_TEMPLATE, HermesParser, True),
        (LLAMA31_TEMPLATE, Llama3JsonParser, True),
        (MISTRAL_V03_TEMPLATE, MistralParser, True),
        (CHAT_TEMPLATE, HermesParser, False),  # no tool support: the default format
    ],
)
def test_parser_and_support_detected_from_template(base_tokenizer, template, parser, supports):
    tokenizer = with_template(base_tokenizer, template)
    assert isinstance(parser_for_template(tokenizer), parser)
    assert template_supports_tools(tokenizer) is supports


# ------------------------------------------------------------------ Hermes / Qwen2.5


def test_qwen_template_renders_tools_and_history(base_tokenizer):
    tokenizer = with_template(base_tokenizer, QWEN25_TEMPLATE)
    messages = [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]
    prompt = render_chat(tokenizer, messages, tools=[WEATHER, TIME])
    assert "<tools>\n" + json.dumps(WEATHER) in prompt
    # arguments were decoded before rendering: no double-encoded JSON string
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "# Tools" not in render_chat(tokenizer, messages[:1], tools=[WEATHER], tool_choice="none")


def test_hermes_outputs():
    p = HermesParser()
    text = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    check_both_ways(p, text, content="I will look both up.",
                    calls=[("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})])
    # Qwen without text, key order swapped, nested arguments with braces and escaped quotes in strings
    text = '<tool_call>\n{"arguments": {"q": "a } \\" {", "n": [1, {"x": 2}]}, "name": "search"}\n</tool_call>'
    check_both_ways(p, text, content=None, calls=[("search", {"q": 'a } " {', "n": [1, {"x": 2}]})])
    # arguments written as a JSON string; a call without arguments
    check_both_ways(p, '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', content=None,
                    calls=[("f", {"a": 1})])
    check_both_ways(p, '<tool_call>\n{"name": "get_time"}\n</tool_call>', content=None, calls=[("get_time", {})])
    # a whole object whose closing tag never came (EOS right after it) still counts, as in vLLM
    check_both_ways(p, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', content=None, calls=[("f", {"a": 1})])
    # plain answers, including ones that look like a marker's start
    check_both_ways(p, "Paris is sunny; 3 < 4 and <tool is not a call.", content="Paris is sunny; 3 < 4 and <tool is not a call.",
                    calls=[])


@pytest.mark.parametrize("broken", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # object never closed
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": {"a": 1',  # cut off (max_tokens)
    "<tool_call>not json</tool_call>",
])
def test_hermes_broken_calls_are_content(broken):
    assert HermesParser().parse(broken).content == broken
    assert HermesParser().parse(broken).tool_calls == []


def test_streaming_holds_back_marker_prefixes_and_streams_arguments():
    stream = HermesParser().streaming()
    assert stream.push("Let me check <tool").content == "Let me check"
    assert stream.push("_c").content == ""
    out = stream.push('all>\n{"name": "get_weather", "argu')
    assert out.tool_calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert out.tool_calls[0]["id"].startswith("call_") and out.tool_calls[0]["index"] == 0
    fragments = [stream.push(piece).tool_calls for piece in ['ments": {"ci', 'ty": "Par', 'is"}}\n</tool_call>']]
    assert "".join(f[0]["function"]["arguments"] for f in fragments if f) == '{"city": "Paris"}'
    assert not stream.finish()
    # text after a held-back "<" that turns out not to be a marker is released
    stream = HermesParser().streaming()
    assert stream.push("a <").content == "a" and stream.push("b").content == " <b"


# ------------------------------------------------------------------ Llama 3.1


def test_llama_template_and_outputs(base_tokenizer):
    tokenizer = with_template(base_tokenizer, LLAMA31_TEMPLATE)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert "Environment: ipython" in prompt and '"name": "get_weather"' in prompt
    p = parser_for_template(tokenizer)
    answer = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    whole = check_both_ways(p, answer, content=None, calls=[("get_weather", {"city": "Paris"})])
    # the parsed call goes back through the template as the model wrote it
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": whole.tool_calls},
               {"role": "tool", "tool_call_id": whole.tool_calls[0]["id"], "content": "18C"}]
    assert answer + "<|eot_id|>" in render_chat(tokenizer, history, tools=[WEATHER])
    check_both_ways(p, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                       '{"name": "get_time", "parameters": {}}',
                    content=None, calls=[("get_weather", {"city": "Paris"}), ("get_time", {})])
    check_both_ways(p, "The weather in Paris is {sunny}.", content="The weather in Paris is {sunny}.", calls=[])
    check_both_ways(p, '{"city": "Paris"}', content='{"city": "Paris"}', calls=[])  # JSON, but not a call


# ------------------------------------------------------------------ Mistral


def test_mistral_template_and_outputs(base_tokenizer):
    tokenizer = with_template(base_tokenizer, MISTRAL_V03_TEMPLATE)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert prompt.startswith("<|bos|>[AVAILABLE_TOOLS] [") and '"name": "get_weather"' in prompt
    p = parser_for_template(tokenizer)
    answer = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    whole = check_both_ways(p, answer, content=None, calls=[("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in whole.tool_calls)
    # Mistral's template insists on 9-character ids: ours round-trip
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": whole.tool_calls}]
    history += [{"role": "tool", "tool_call_id": c["id"], "content": '"ok"'} for c in whole.tool_calls]
    rendered = render_chat(tokenizer, history, tools=[WEATHER, TIME], add_generation_prompt=False)
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "' + whole.tool_calls[0]["id"] in rendered
    # newer tokenizers: name[ARGS]{...} per call, optionally with the model's own [CALL_ID]
    check_both_ways(p, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]abcDEF123[ARGS]{}',
                    content=None, calls=[("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert p.parse('[TOOL_CALLS]get_time[CALL_ID]abcDEF123[ARGS]{}').tool_calls[0]["id"] == "abcDEF123"
    check_both_ways(p, "It is sunny [in] Paris.", content="It is sunny [in] Paris.", calls=[])
    assert p.parse('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par').tool_calls == []


# ------------------------------------------------------------------ default prompt (no tool support)


def test_default_prompt_for_templates_without_tools(base_tokenizer):
    tokenizer = with_template(base_tokenizer, CHAT_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "windy"},
    ]
    prompt = render_chat(tokenizer, messages, tools=[WEATHER], tool_choice="required")
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER) in prompt and "You must call at least one" in prompt
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>") in prompt
    assert ("<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"
            "<|im_end|>") in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    named = default_tool_prompt([WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                parallel_tool_calls=False)
    assert 'You must call the function "get_weather"' in named and "at most one" in named
    plain = messages_with_default_tools([{"role": "user", "content": "hi"}], None)
    assert plain == [{"role": "user", "content": "hi"}]
    # the model answers in the default format: the default parser reads it
    check_both_ways(parser_for_template(tokenizer), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                    "</tool_call>", content=None, calls=[("get_weather", {"city": "Paris"})])


def test_get_parser_names():
    assert isinstance(get_parser("hermes"), HermesParser)
    assert isinstance(get_parser("llama3_json"), Llama3JsonParser)
    assert isinstance(get_parser("mistral"), MistralParser)
    with pytest.raises(ValueError):
        get_parser("nope")
