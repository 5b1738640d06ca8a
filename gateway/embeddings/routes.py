"""`POST /v1/embeddings` (OpenAI's shape): checks, tenant slot, swarm sessions, encoding.

Every 400 comes before any resource is taken: unknown model (404), `dimensions` other than the
model's hidden size, token ids outside the vocabulary, inputs longer than the context. Then, as
for chat: 503 when blocks are uncovered, 429 at the tenant's concurrency limit or when the swarm
is full. `dimensions` is refused rather than truncated (OpenAI's v3 models truncate and
renormalise because they were trained for it; these models were not, so a shorter vector would
silently lose meaning).
"""

from __future__ import annotations

from anyio.to_thread import run_sync
from fastapi import APIRouter, Request

from gateway.backend import BlocksUnavailable
from gateway.embeddings.pooling import embed_rows, encode
from gateway.inference.disconnect import unless_disconnected
from gateway.models import ServedModel
from gateway.protocol.errors import InvalidRequest
from gateway.protocol.schemas import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gateway.state import GatewayDep, TenantDep
from gateway.tenancy import swarm_salt

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embeddings(body: EmbeddingRequest, gateway: GatewayDep, tenant: TenantDep, request: Request) -> EmbeddingList:
    model = await gateway.models.resolve(body.model, tenant)
    hidden_size = int(model.head.config.hidden_size)
    if body.dimensions is not None and body.dimensions != hidden_size:
        raise InvalidRequest(
            f"This model's embeddings have {hidden_size} dimensions; `dimensions` must be {hidden_size} or left out "
            "(shortened embeddings are not supported).",
            param="dimensions",
        )
    rows = await _token_rows(body, model)
    coverage = gateway.backend.coverage(model.swarm_id)
    if not coverage.complete:
        raise BlocksUnavailable(model.swarm_id, coverage)
    lease = gateway.limiter.acquire(tenant)
    try:
        salt = swarm_salt(tenant, None, shared=gateway.settings.share_prefix_cache)
        vectors = await unless_disconnected(request, embed_rows(gateway.backend, model, rows, salt))
    finally:
        lease.release()
    tokens = sum(len(row) for row in rows)
    return EmbeddingList(
        data=[Embedding(index=i, embedding=encode(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=model.id,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


async def _token_rows(body: EmbeddingRequest, model: ServedModel) -> list[list[int]]:
    """Each input's token ids (texts tokenized in a worker thread, as completions tokenizes prompts)."""
    inputs = body.inputs()
    if isinstance(inputs[0], str):
        rows = await run_sync(lambda: [list(ids) for ids in model.tokenizer(list(inputs))["input_ids"]])
        if any(not row for row in rows):
            raise InvalidRequest("An input has no tokens.", param="input")
    else:
        rows = [list(row) for row in inputs]  # type: ignore[arg-type]
        vocab = model.head.vocab_size
        if any(not 0 <= token < vocab for row in rows for token in row):
            raise InvalidRequest(f"Input token ids must be in [0, {vocab}).", param="input")
    context = model.context_length
    for index, row in enumerate(rows):
        if len(row) > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens, however input {index} has {len(row)} "
                "tokens. Please reduce the length of the input.",
                param="input",
                code="context_length_exceeded",
            )
    return rows
