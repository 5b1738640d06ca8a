"""Guided decoding (gateway.agents.guided): under the mask, random logits still give valid output.

Uses the tiny checkpoints' real byte-level BPE tokenizer (blocks.tiny_checkpoints, the one every
test checkpoint saves) and seeded random logits; a bias towards closing characters keeps the
random walks short. Every sampled text must parse and validate against its schema.
"""

from __future__ import annotations

import json
import random

import hypothesis
import numpy as np
import pytest
import torch

from blocks.tiny_checkpoints import EOS, END_OF_TEXT, train_tokenizer
from gateway.agents import guided, utf8
from gateway.agents.tool_parsers import HermesParser

try:
    import jsonschema
except ImportError:  # not a dependency: fall back to the checker below
    jsonschema = None

PADDED_VOCAB = 600  # logits wider than the tokenizer, as real models' are


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def stops(tokenizer):
    return [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(END_OF_TEXT)]


@pytest.fixture(scope="module")
def library(tokenizer, stops):
    return guided.grammar_library(tokenizer, vocab_size=PADDED_VOCAB, stop_token_ids=stops)


@pytest.fixture(scope="module")
def closer_bias(tokenizer):
    """+bias on tokens that close strings, objects, arrays and numbers (and on the stop tokens)."""
    bias = torch.zeros(PADDED_VOCAB)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if any(c in text for c in '"}],') or token_id in tokenizer.all_special_ids:
            bias[token_id] = 4.0
    return bias


def sample_rows(library, matchers, tokenizer, closer_bias, *, seed, max_steps=400, batched=True):
    """Sample all rows to termination under their grammars; returns the texts."""
    rng = np.random.default_rng(seed)  # numpy, not torch: torch's intra-op threads stall on a busy 2-core box
    rows = len(matchers)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_steps):
        if all(m.is_terminated() for m in matchers):
            break
        logits = torch.from_numpy(rng.standard_normal((rows, PADDED_VOCAB), dtype=np.float32) * 2)
        if step > 6:
            logits += closer_bias
        if batched:
            guided.apply_masks(matchers, logits)
        else:
            for row, m in enumerate(matchers):
                m.mask(logits[row])
        # Gumbel-max: a draw from softmax(logits)
        picks = (logits.numpy() + rng.gumbel(size=(rows, PADDED_VOCAB))).argmax(axis=-1).tolist()
        for row, (m, token) in enumerate(zip(matchers, picks)):
            if m.is_terminated():
                continue
            assert token < len(tokenizer), "a padded id beyond the tokenizer was allowed"
            assert m.accept(token), f"sampled token {token} rejected by its own mask"
            tokens[row].append(token)
    assert all(m.is_terminated() for m in matchers), "grammar did not finish within the step budget"
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    assert not any("\ufffd" in text for text in texts), f"ill-formed UTF-8 got through the mask: {texts}"
    return texts


# ------------------------------------------------------------------ random schemas


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "object", "null", "anyOf"]
    kind = rng.choice(kinds if depth < 2 else kinds[:5])
    if kind == "string":
        schema = {"type": "string"}
        if rng.random() < 0.5:
            schema["maxLength"] = rng.randint(1, 8)
        return schema
    if kind == "integer":
        schema = {"type": "integer"}
        if rng.random() < 0.5:
            schema.update(minimum=-5, maximum=rng.randint(0, 500))
        return schema
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "a b", "x\"y"], rng.randint(1, 3))}
    if kind == "array":
        schema = {"type": "array", "items": random_schema(rng, depth + 1)}
        if rng.random() < 0.7:
            schema.update(minItems=rng.randint(0, 1), maxItems=rng.randint(1, 3))
        return schema
    if kind == "object":
        return random_object(rng, depth + 1)
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    return {"type": kind}


def random_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["name", "age", "tags", "city", "ok", "score", "items", "meta"], rng.randint(1, 4))
    properties = {name: random_schema(rng, depth) for name in names}
    return {
        "type": "object",
        "properties": properties,
        "required": [n for n in names if rng.random() < 0.7],
        "additionalProperties": False,
    }


def check(value, schema) -> None:
    """Validate `value` against the subset of JSON Schema random_schema writes."""
    if jsonschema is not None:
        jsonschema.validate(value, schema)
        return
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return check(value, option)
            except AssertionError as exc:
                errors.append(exc)
        raise AssertionError(f"{value!r} matches no anyOf option: {errors}")
    kind = schema.get("type")
    if "enum" in schema:
        assert value in schema["enum"], (value, schema)
    if kind == "string":
        assert isinstance(value, str), (value, schema)
        assert len(value) <= schema.get("maxLength", len(value)), (value, schema)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), (value, schema)
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), (value, schema)
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (value, schema)
    elif kind == "boolean":
        assert isinstance(value, bool), (value, schema)
    elif kind == "null":
        assert value is None, (value, schema)
    elif kind == "array":
        assert isinstance(value, list), (value, schema)
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), (value, schema)
        for item in value:
            check(item, schema["items"])
    elif kind == "object":
        assert isinstance(value, dict), (value, schema)
        assert set(schema.get("required", [])) <= value.keys(), (value, schema)
        if schema.get("additionalProperties") is False:
            assert value.keys() <= schema["properties"].keys(), (value, schema)
        for key, item in value.items():
            if key in schema["properties"]:
                check(item, schema["properties"][key])


# ------------------------------------------------------------------ tests


def test_random_schemas_always_validate(library, tokenizer, closer_bias):
    rng = random.Random(1234)
    for case in range(20):
        schema = random_object(rng)
        matchers = library.matchers(guided.json_schema(schema, strict=True), 2)
        for text in sample_rows(library, matchers, tokenizer, closer_bias, seed=case):
            check(json.loads(text), schema)


def test_json_object_always_parses_as_object(library, tokenizer, closer_bias):
    matchers = library.matchers(guided.json_object(), 3)
    for text in sample_rows(library, matchers, tokenizer, closer_bias, seed=7):
        assert isinstance(json.loads(text), dict)


def test_batched_mask_equals_per_row_mask(library, tokenizer):
    spec = guided.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    rows = library.matchers(spec, 3)
    assert rows[1].accept_text('{"a": 1')
    logits = torch.randn(4, PADDED_VOCAB)
    expected = logits[[0, 1, 3]].clone()
    for row, m in enumerate(rows):
        m.mask(expected[row])
    guided.apply_masks([rows[0], rows[1], None, rows[2]], got := logits.clone())
    assert torch.equal(got[[0, 1, 3]], expected)
    assert torch.equal(got[2], logits[2]), "an unguided row was masked"
    allowed = rows[1].allowed()
    assert allowed.sum() < len(tokenizer) and not allowed[len(tokenizer):].any()


def test_grammars_are_compiled_once_per_spec(library, tokenizer, stops):
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    assert library.compile(guided.json_schema(schema)) is library.compile(guided.json_schema(json.dumps(schema)))
    assert guided.grammar_library(tokenizer, vocab_size=PADDED_VOCAB, stop_token_ids=stops) is library
    with pytest.raises(ValueError):
        library.compile(guided.json_schema({"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}))


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
                       "required": ["zone"], "additionalProperties": False},
    },
}


def test_named_tool_call_grammar_yields_a_parseable_call(library, tokenizer, closer_bias):
    spec = guided.tool_calls([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    for seed, text in enumerate(sample_rows(library, library.matchers(spec, 3), tokenizer, closer_bias, seed=3)):
        parsed = HermesParser().parse(text)
        assert parsed.content is None and len(parsed.tool_calls) == 1, text
        call = parsed.tool_calls[0]["function"]
        assert call["name"] == "get_time"
        check(json.loads(call["arguments"]), TIME["function"]["parameters"])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_use_the_tools_schemas(library, tokenizer, closer_bias, parallel):
    spec = guided.tool_calls([WEATHER, TIME], "required", parallel=parallel)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    texts = sample_rows(library, library.matchers(spec, 4), tokenizer, closer_bias, seed=11 + parallel)
    for text in texts:
        calls = HermesParser().parse(text).tool_calls
        assert calls and (parallel or len(calls) == 1), text
        for call in calls:
            check(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_tool_call_spec_rejects_unknown_names():
    with pytest.raises(ValueError):
        guided.tool_calls([WEATHER], "nope")
    with pytest.raises(ValueError):
        guided.tool_calls([], "required")


def test_matcher_only_allows_stop_after_completion(library, stops):
    m = library.matcher(guided.json_schema({"type": "object", "properties": {"a": {"type": "boolean"}},
                                            "required": ["a"]}))
    assert m.accept_text('{"a": true}') and m.is_completed() and not m.is_terminated()
    assert set(torch.nonzero(m.allowed()).flatten().tolist()) <= set(stops)
    assert not m.accept(0)  # <|pad|> is not allowed
    assert m.accept(stops[0]) and m.is_terminated()
    logits = torch.randn(PADDED_VOCAB)
    assert torch.equal(m.mask(logits.clone()), logits), "a terminated matcher must not mask"


# ------------------------------------------------------------------ well-formed UTF-8


@hypothesis.settings(max_examples=2000, deadline=None)
@hypothesis.given(hypothesis.strategies.binary(max_size=12))
def test_utf8_states_accept_exactly_well_formed_text(data):
    """`advance` ends on a boundary exactly for the byte strings a strict decoder accepts."""
    try:
        data.decode("utf-8")
        well_formed = True
    except UnicodeDecodeError:
        well_formed = False
    assert (utf8.advance(utf8.BOUNDARY, data) == utf8.BOUNDARY) == well_formed


@pytest.mark.parametrize(
    ("lead", "bad"),
    [(b"\xe0", 0x84), (b"\xed", 0xA6), (b"\xf0", 0x8B), (b"\xf4", 0x90), (b"", 0xC0), (b"\xe4", 0x41)],
    ids=["overlong-3", "surrogate", "overlong-4", "past-10FFFF", "overlong-2", "missing-continuation"],
)
def test_guided_strings_cannot_spell_ill_formed_utf8(library, lead, bad):
    """Byte by byte (the tiny vocabulary has every single byte): the lead is allowed, the byte
    that would make the character ill-formed is not, and after a rollback any lead is fine again."""
    byte_token = {data: i for i, data in enumerate(library.info.decoded_vocab) if len(data) == 1}

    def allowed(m: guided.GuidedMatcher, byte: int) -> bool:
        return bool(torch.isfinite(m.mask(torch.zeros(PADDED_VOCAB))[byte_token[bytes([byte])]]))

    m = library.matcher(guided.json_schema({"type": "string"}))
    assert m.accept_text('"')
    for byte in lead:
        assert allowed(m, byte) and m.accept(byte_token[bytes([byte])])
    assert not allowed(m, bad)
    m.rollback(len(lead))
    assert allowed(m, 0xE4) and allowed(m, 0x41)
