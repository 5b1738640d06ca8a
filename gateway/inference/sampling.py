"""Turning one step's logits into tokens, per request, with OpenAI's and vLLM's semantics.

Order follows vLLM: EOS suppression (min_tokens / ignore_eos) and logit_bias, then penalties
(repetition over prompt and output, presence/frequency over output), then greedy argmax when
temperature is 0, else temperature, min_p, top_k, top_p and a draw from the request's own
`torch.Generator` (same seed, same logits -> same tokens).

Guided rows (structured outputs, forced tool calls) carry a grammar matcher
(`gateway.agents.guided.GuidedMatcher`): after the penalties and before greedy/top-k/top-p, the
grammar's token mask sets every token it forbids to -inf; the sampled token then advances the
matcher. A grammar ends by allowing only the stop tokens, so EOS suppression (min_tokens,
ignore_eos) never applies to guided rows.

Logprobs are the *raw* model log-probabilities (log_softmax of the logits before any of the
processing above), as vLLM's default `raw_logprobs` mode reports them: they describe the model,
not the sampling settings, and stay comparable across temperatures.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gateway.agents.guided import GuidedMatcher

GREEDY_BELOW = 1e-5  # temperatures below this mean argmax, as in vLLM


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0 disables (vLLM's -1)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # alternatives reported per token; None reports no logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None  # None unless logprobs were asked for
    top: tuple[tuple[int, float], ...] = ()  # most likely alternatives, best first


class Sampler:
    """Sampling state of one request whose `batch` rows are its `n` choices.

    Rows share the prompt; they differ in what they generated, which the penalties track.
    Everything runs on the logits' device (the gateway's head device): the state tensors move
    there at the first step, the greedy path is one argmax, and a step copies to the host only
    the sampled ids (with their logprobs, when asked for) in one transfer. Grammar masks are
    filled on the CPU and applied on the device, to the guided rows only.
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        prompt_ids: Sequence[int],
        batch: int,
        vocab_size: int,
        eos_token_ids: Collection[int],
        matchers: Sequence[GuidedMatcher | None] | None = None,
    ):
        self.params = params
        self.matchers = list(matchers) if matchers is not None and any(m is not None for m in matchers) else None
        self._unguided = (
            torch.tensor([m is None for m in self.matchers], dtype=torch.bool) if self.matchers is not None else None
        )
        self.generated = 0
        self._penalized = params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)
        self._counts = torch.zeros(batch, vocab_size) if self._penalized else None
        self._in_prompt = None
        if params.repetition_penalty != 1.0:
            self._in_prompt = torch.zeros(vocab_size, dtype=torch.bool)
            self._in_prompt[torch.tensor(list(prompt_ids), dtype=torch.long)] = True
        self._bias = None
        if params.logit_bias:
            self._bias = torch.zeros(vocab_size)
            for token_id, bias in params.logit_bias.items():
                self._bias[token_id] = bias
        self._eos = torch.tensor([t for t in eos_token_ids if t < vocab_size], dtype=torch.long)
        self._seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator().manual_seed(self._seed)
        self._device = torch.device("cpu")

    def _move_to(self, device: torch.device) -> None:
        """The state goes where the logits are, once (a generator is per device: same seed)."""
        if device == self._device:
            return
        self._device = device
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        self._counts, self._in_prompt, self._bias = move(self._counts), move(self._in_prompt), move(self._bias)
        self._eos, self._unguided = move(self._eos), move(self._unguided)
        self._generator = torch.Generator(device=device).manual_seed(self._seed)

    @property
    def plain(self) -> bool:
        """Greedy with nothing to change, mask or report but the EOS ids it suppresses: each row's
        token is its argmax over the ids not `suppressed`, which a head round computes for many
        samplers at once (`sample`'s `argmax`)."""
        p = self.params
        return p.greedy and p.logprobs is None and self._bias is None and not self._penalized and self.matchers is None

    def suppressed(self) -> torch.Tensor | None:
        """The ids this step's token may not be (EOS, under min_tokens or ignore_eos), if any."""
        p = self.params
        return self._eos if (p.ignore_eos or self.generated < p.min_tokens) and len(self._eos) else None

    def sample(self, logits: torch.Tensor, argmax: list[int] | None = None) -> list[SampledToken]:
        """One token per row from float logits [batch, vocab], on whatever device they are.
        `argmax`, the rows' argmax computed elsewhere (over the ids not `suppressed`), is their
        tokens when the sampler is `plain`."""
        if argmax is not None and self.plain:
            self.generated += 1
            return [SampledToken(token, None) for token in argmax]
        logits = logits.detach()
        self._move_to(logits.device)
        logits = logits.float()
        p = self.params
        raw = torch.log_softmax(logits, dim=-1) if p.logprobs is not None else None
        if self._changes_logits():
            logits = self._process(logits.clone())  # in place below: never the caller's tensor
        if self.matchers is not None:
            from gateway.agents.guided import apply_masks

            apply_masks(self.matchers, logits)
        if p.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(self._truncate(logits / p.temperature), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)
        if self._counts is not None:
            self._counts[torch.arange(len(tokens), device=tokens.device), tokens] += 1
        self.generated += 1
        sampled = self._to_host(tokens, raw)
        if self.matchers is not None:
            for matcher, token in zip(self.matchers, sampled):
                if matcher is not None and not matcher.is_terminated():
                    matcher.accept(token.token_id)
        return sampled

    def _changes_logits(self) -> bool:
        return self.suppressed() is not None or self._bias is not None or self._penalized or self.matchers is not None

    def _to_host(self, tokens: torch.Tensor, raw: torch.Tensor | None) -> list[SampledToken]:
        """The step's one device-to-host copy: ids, and with logprobs their values and the top k."""
        if raw is None:
            return [SampledToken(int(token), None) for token in tokens.tolist()]
        k = self.params.logprobs or 0
        columns = [tokens.unsqueeze(-1).double(), raw.gather(-1, tokens.unsqueeze(-1)).double()]
        if k:
            values, ids = torch.topk(raw, k, dim=-1)
            columns += [ids.double(), values.double()]
        rows = torch.cat(columns, dim=-1).tolist()  # ids are exact in float64
        return [
            SampledToken(int(row[0]), row[1], tuple(zip((int(i) for i in row[2 : 2 + k]), row[2 + k :])))
            for row in rows
        ]

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if (p.ignore_eos or self.generated < p.min_tokens) and len(self._eos):
            if self._unguided is None:
                logits[:, self._eos] = float("-inf")
            else:  # a finished grammar allows only stop tokens: never suppress them on guided rows
                rows = self._unguided.nonzero().squeeze(-1)
                logits[rows.unsqueeze(-1), self._eos] = float("-inf")
        if self._bias is not None:
            logits += self._bias
        if p.repetition_penalty != 1.0:
            seen = self._in_prompt | (self._counts > 0)
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if p.frequency_penalty or p.presence_penalty:
            logits -= p.frequency_penalty * self._counts + p.presence_penalty * (self._counts > 0).float()
        return logits

    def prepare(self) -> None:
        """Fill the guided rows' next masks now (e.g. while the swarm computes the next step)."""
        for matcher in self.matchers or ():
            if matcher is not None:
                matcher.prepare()

    def _truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """min_p, then top_k, then top_p: mask the unlikely tail with -inf (never the best token)."""
        p = self.params
        if p.min_p > 0:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= p.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits
