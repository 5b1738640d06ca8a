"""Guided decoding: a grammar as a token mask on the logits, with xgrammar.

Why xgrammar: it is vLLM's and SGLang's default backend, installs as a CPU wheel next to torch 2.13
(`TokenizerInfo.from_huggingface` reads our byte-level BPE tokenizers), masks in place on CPU
tensors, fills a batch of bitmasks in parallel (`BatchGrammarMatcher`), and ships *structural
tags* — "this literal, then JSON matching this schema, then that literal" — which express a tool
call in the Hermes format directly, so `tool_choice=required`/named needs no hand-written EBNF.
llguidance would work too (it is the fallback if xgrammar stops installing); outlines-core builds
a regex index per schema, which is slower to compile for large schemas.

Pieces:

* `GrammarLibrary` — one per (tokenizer, logits width): the tokenizer's vocabulary as xgrammar
  sees it plus a bounded cache of compiled grammars keyed by their canonical spec, so a schema
  compiles once per model. `grammar_library()` memoises a library per tokenizer.
* `GuidedMatcher` — one per generated row: `mask(logits)` applies the next-token bitmask in place,
  `accept(token_id)` advances, `is_terminated()` says the grammar accepted a stop token.
  `prepare()` fills the bitmask ahead of time (e.g. while the swarm computes the next step).
* `apply_masks(matchers, logits)` — batched: one bitmask tensor for all rows, filled by a
  `BatchGrammarMatcher`, applied only to the rows that are guided.

Grammars: `json_schema(schema, strict=...)`, `json_object()` (any JSON object), and
`tool_calls(tools, choice)` — one or more Hermes calls `<tool_call>\\n{"name": "<tool>",
"arguments": <its parameter schema>}\\n</tool_call>` separated by newlines, for
`tool_choice="required"` (any tool) or a named function (that tool only); `parallel=False` stops
after the first call. JSON is generated without free whitespace (`{"a": 1, "b": [2]}`), which
keeps small models from padding forever.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr
from xgrammar.structural_tag import JSONSchemaFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat

from gateway.agents.tool_prompt import TOOL_CALL_BEGIN, TOOL_CALL_END
from gateway.agents.utf8 import BOUNDARY, Utf8Masks, Utf8State

__all__ = [
    "GrammarSpec",
    "GrammarLibrary",
    "GuidedMatcher",
    "apply_masks",
    "grammar_library",
    "json_object",
    "json_schema",
    "tool_calls",
]

# Whitespace allowed between JSON tokens inside a tool call's arguments (structural tags cannot
# forbid it outright; xgrammar requires a positive bound).
_TOOL_JSON_WHITESPACE = 1


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to, as a hashable key: `kind` plus canonical JSON of its arguments."""

    kind: str  # "json_schema" | "json_object" | "tool_calls"
    payload: str = ""  # canonical JSON (sorted keys), "" when none


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _fix_schema(node: Any) -> Any:
    """Work around xgrammar 0.2: a string with `minLength`/`maxLength` (and no pattern) compiles
    to `[^"\\\r\n]{m,n}`, which admits raw control characters, invalid in JSON strings. Such
    strings get the equivalent `pattern` without control characters instead (escapes stay
    unavailable in length-bounded strings, as in xgrammar's own rule)."""
    if isinstance(node, list):
        return [_fix_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _fix_schema(v) for k, v in node.items()}
    bounded = isinstance(node.get("minLength"), int) or isinstance(node.get("maxLength"), int)
    if node.get("type") == "string" and bounded and not ({"pattern", "format", "enum", "const"} & node.keys()):
        low, high = node.pop("minLength", 0), node.pop("maxLength", "")
        node["pattern"] = f'^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
    return node


def json_schema(schema: Mapping[str, Any] | str, *, strict: bool = True) -> GrammarSpec:
    """`response_format: {"type": "json_schema", ...}`; `strict` forbids properties the schema does
    not list (xgrammar's strict mode), as OpenAI's strict structured outputs do."""
    schema = json.loads(schema) if isinstance(schema, str) else dict(schema)
    return GrammarSpec("json_schema", _canonical({"schema": _fix_schema(schema), "strict": strict}))


def json_object() -> GrammarSpec:
    """`response_format: {"type": "json_object"}`: any JSON object."""
    return GrammarSpec("json_object")


def tool_calls(
    tools: Sequence[Mapping[str, Any]], choice: str = "required", *, parallel: bool = True
) -> GrammarSpec:
    """Tool calls in the default (Hermes) format for `tool_choice="required"` or a named function.

    `tools` are OpenAI tool objects (`{"type": "function", "function": {...}}`) or bare function
    objects; `choice` is `"required"` or the name of one function (OpenAI's
    `{"type": "function", "function": {"name": ...}}` is accepted too). `parallel` (OpenAI's
    `parallel_tool_calls`) allows several calls for `required`; a named function is called once.
    """
    functions = [dict(t.get("function", t)) for t in tools]
    if isinstance(choice, Mapping):
        choice = choice["function"]["name"]
    if choice != "required":
        functions = [f for f in functions if f.get("name") == choice]
        if not functions:
            raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
    if not functions:
        raise ValueError("tool_choice 'required' needs at least one tool")
    entries = [
        {"name": f["name"], "parameters": _fix_schema(f.get("parameters") or {"type": "object"})} for f in functions
    ]
    # A named function is called once (as vLLM and xgrammar's "forced" choice do).
    return GrammarSpec("tool_calls", _canonical({"functions": entries, "parallel": parallel and choice == "required"}))


def _tool_structural_tag(functions: list[dict[str, Any]], parallel: bool) -> StructuralTag:
    tags = [
        TagFormat(
            begin=f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(f["name"], ensure_ascii=False)}, "arguments": ',
            content=JSONSchemaFormat(json_schema=f["parameters"], max_whitespace_cnt=_TOOL_JSON_WHITESPACE),
            end=f"}}\n{TOOL_CALL_END}",
        )
        for f in functions
    ]
    return StructuralTag(
        format=TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
    )


class GrammarLibrary:
    """A tokenizer's vocabulary for xgrammar plus a bounded cache of compiled grammars.

    `vocab_size` is the width of the model's logits (may exceed the tokenizer's; the extra ids are
    never allowed). `stop_token_ids` are the ids that end generation (the model's EOS ids): a
    grammar, once complete, allows only those.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Collection[int] | None = None,
        cache_size: int = 256,
        max_threads: int = 1,
    ):
        stops = sorted(set(stop_token_ids)) if stop_token_ids else None
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.vocab_size = self.info.vocab_size
        self.utf8 = Utf8Masks(self.info.decoded_vocab, self.vocab_size)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar for `spec`, from the cache when it was compiled before.

        Raises `ValueError` for a schema xgrammar cannot compile (the route answers 400).
        """
        with self._lock:
            if (hit := self._cache.get(spec)) is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile(spec)  # outside the lock: compiling a big schema takes a while
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_json_schema(
                    {"type": "object"}, any_whitespace=False, strict_mode=False
                )
            payload = json.loads(spec.payload)
            if spec.kind == "json_schema":
                return self._compiler.compile_json_schema(
                    payload["schema"], any_whitespace=False, strict_mode=payload["strict"]
                )
            if spec.kind == "tool_calls":
                return self._compiler.compile_structural_tag(
                    _tool_structural_tag(payload["functions"], payload["parallel"])
                )
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad schemas as these
            raise ValueError(f"cannot build a grammar for {spec.kind}: {exc}") from exc
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def matcher(self, spec: GrammarSpec) -> GuidedMatcher:
        """A fresh per-row matcher for `spec`."""
        return GuidedMatcher(self.compile(spec), self.utf8)

    def matchers(self, spec: GrammarSpec, n: int) -> list[GuidedMatcher]:
        """`n` matchers (one per choice) sharing one compiled grammar."""
        compiled = self.compile(spec)
        return [GuidedMatcher(compiled, self.utf8) for _ in range(n)]


_libraries: weakref.WeakKeyDictionary[Any, dict[tuple, GrammarLibrary]] = weakref.WeakKeyDictionary()
_libraries_lock = threading.Lock()


def grammar_library(
    tokenizer: Any, *, vocab_size: int | None = None, stop_token_ids: Collection[int] | None = None
) -> GrammarLibrary:
    """The `GrammarLibrary` of `tokenizer` for these logits width and stop ids, built once."""
    key = (vocab_size, tuple(sorted(set(stop_token_ids))) if stop_token_ids else None)
    with _libraries_lock:
        per_tokenizer = _libraries.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = GrammarLibrary(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        return per_tokenizer[key]


class GuidedMatcher:
    """Grammar state of one generated row, plus where its text stands in a UTF-8 character."""

    def __init__(self, compiled: xgr.CompiledGrammar, utf8: Utf8Masks):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._utf8 = utf8
        self._utf8_states: list[Utf8State] = [BOUNDARY]  # one per accepted token, for rollback
        self.vocab_size = utf8.vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._ready = False  # the bitmask describes the current state

    def prepare(self) -> None:
        """Fill the next-token bitmask now (idempotent until the next `accept`)."""
        if not self._ready and not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(self._bitmask, 0)
            self._bitmask[0] &= self.utf8_mask()
            self._ready = True

    def utf8_mask(self) -> torch.Tensor:
        """The bitmask row of tokens that keep the text well-formed UTF-8 from here."""
        return self._utf8.mask(self._utf8_states[-1])

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed tokens to -inf in place, on a row `[vocab]` or a single-row `[1, vocab]`;
        returns `logits`. A terminated matcher leaves the logits alone."""
        if self._matcher.is_terminated():
            return logits
        self.prepare()
        row = logits.view(1, -1) if logits.dim() == 1 else logits
        if row.shape[0] != 1:
            raise ValueError("GuidedMatcher.mask takes one row; use apply_masks for a batch")
        xgr.apply_token_bitmask_inplace(row, self._bitmask.to(row.device), vocab_size=self.vocab_size)
        return logits

    def allowed(self) -> torch.Tensor:
        """Boolean `[vocab]` of the tokens the grammar allows next (for tests and debugging)."""
        scores = torch.zeros(self.vocab_size)
        return torch.isfinite(self.mask(scores))

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and no change) if the grammar forbids it."""
        self._ready = False
        if not self._matcher.accept_token(int(token_id)):
            return False
        self._utf8_states.append(self._utf8.after(self._utf8_states[-1], int(token_id)))
        return True

    def accept_text(self, text: str) -> bool:
        """Advance by a literal string (e.g. a forced prefix; whole characters, so no UTF-8 state)."""
        self._ready = False
        return bool(self._matcher.accept_string(text))

    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: nothing more may follow."""
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """The text so far is a complete sentence of the grammar (only a stop token may follow)."""
        return bool(self._matcher.is_completed())

    def rollback(self, num_tokens: int = 1) -> None:
        self._ready = False
        self._matcher.rollback(num_tokens)
        del self._utf8_states[len(self._utf8_states) - num_tokens :]

    def reset(self) -> None:
        self._ready = False
        self._matcher.reset()
        self._utf8_states = [BOUNDARY]


_batch_matcher = threading.local()


def apply_masks(matchers: Sequence[GuidedMatcher | None], logits: torch.Tensor) -> torch.Tensor:
    """Mask a batch `[rows, vocab]` in place: row i by `matchers[i]` (None or terminated: untouched).

    One bitmask for the batch, filled in parallel by xgrammar's `BatchGrammarMatcher`; rows whose
    matcher was `prepare()`d already reuse their own bitmask.
    """
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"{len(matchers)} matchers for logits of shape {tuple(logits.shape)}")
    active = [(i, m) for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    if not active:
        return logits
    vocab_size = active[0][1].vocab_size
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    to_fill = [(i, m) for i, m in active if not m._ready]
    for i, m in active:
        if m._ready:
            bitmask[i] = m._bitmask[0]
    if to_fill:
        batch = getattr(_batch_matcher, "value", None)
        if batch is None:
            batch = _batch_matcher.value = xgr.BatchGrammarMatcher(max_threads="auto")
        batch.batch_fill_next_token_bitmask([m._matcher for _, m in to_fill], bitmask, [i for i, _ in to_fill])
        for i, m in to_fill:
            bitmask[i] &= m.utf8_mask()
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device), vocab_size=vocab_size, indices=[i for i, _ in active]
    )
    return logits
