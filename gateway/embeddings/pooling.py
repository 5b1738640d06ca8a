"""Embeddings from a causal LM through the swarm: final hidden state -> final norm -> mean -> L2.

What these embeddings are: for each input, the decoder's last hidden state (after the model's
final norm, i.e. exactly what the LM head reads) at every token, averaged over the input's tokens
and scaled to unit length. A generative model was not trained for this, so expect them to be far
weaker for retrieval than a dedicated embedding model's; they are the served model's own view of
the text (the same tokens, the same blocks, the same fine-tuned adapter), and they let RAG clients
that need `/v1/embeddings` run against the gateway.

Inputs are batched as rows of one swarm session: rows sorted by length, right-padded to the
longest of their batch. Decoder attention is causal, so padding after a row's last token changes
none of that row's hidden states; pooling ignores the padded positions. A session carries at most
`MAX_ROWS` rows and `MAX_BATCH_TOKENS` padded tokens (an input longer than that has a session of
its own), so no server is asked for more than a chat request with `n` choices would take.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import torch
import torch.nn.functional as F
from anyio.to_thread import run_sync

from gateway.backend import InferenceBackend
from gateway.models import ServedModel

log = logging.getLogger(__name__)

MAX_ROWS = 16  # a block server's default batch limit (blockserver.limits.ServerLimits.max_batch)
MAX_BATCH_TOKENS = 2048  # padded tokens (rows x length) per session


def batches(lengths: Sequence[int], *, max_rows: int = MAX_ROWS, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Input indices grouped into sessions: similar lengths together, each group within the limits."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        # sorted ascending: the new input is the group's longest, so it sets the padded length
        if group and len(group) < max_rows and (len(group) + 1) * lengths[index] <= max_tokens:
            group.append(index)
        else:
            groups.append([index])
    return groups


def pool(head: Any, output: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Last block's output [b, t, h] -> final norm -> mean over each row's first `lengths` tokens
    -> unit-length float32 vectors [b, h]."""
    with torch.inference_mode():
        normed = head.norm(output.to(head.device, head.dtype)).float()
        positions = torch.arange(normed.shape[1], device=normed.device)
        mask = (positions[None, :] < torch.tensor(lengths, device=normed.device)[:, None]).to(normed.dtype)
        summed = (normed * mask[:, :, None]).sum(dim=1)
        mean = summed / mask.sum(dim=1, keepdim=True)
        return F.normalize(mean, p=2, dim=-1).cpu()


async def embed_rows(backend: InferenceBackend, model: ServedModel, rows: Sequence[Sequence[int]],
                     cache_salt: str | None = None) -> list[torch.Tensor]:
    """Every row of token ids -> its embedding (float32 [h]), in the rows' order; `cache_salt` as a
    generation's (a lone row's start goes through the servers' prefix caches too).

    Raises what `open_session` raises (`SwarmBusy`, `BlocksUnavailable`) and the swarm's failures;
    every session is closed, also on cancellation.
    """
    results: list[torch.Tensor | None] = [None] * len(rows)
    for group in batches([len(row) for row in rows]):
        lengths = [len(rows[i]) for i in group]
        width = max(lengths)
        ids = torch.tensor([list(rows[i]) + [0] * (width - len(rows[i])) for i in group], dtype=torch.long)
        hidden = await run_sync(model.head.embed, ids)
        session = await backend.open_session(model.swarm_id, batch=len(group), max_length=width, adapter=model.adapter,
                                             cache_salt=cache_salt)
        try:
            output = await session.step(hidden)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await session.close()
                except Exception:
                    log.warning("closing the embedding session failed", exc_info=True)
        vectors = await run_sync(pool, model.head, output, lengths)
        for row, index in enumerate(group):
            results[index] = vectors[row]
    return [vector for vector in results if vector is not None]


def encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """`float`: a list of numbers; `base64`: the little-endian float32 bytes, as OpenAI sends them."""
    array = vector.to(torch.float32).numpy()
    if encoding_format == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return array.tolist()
