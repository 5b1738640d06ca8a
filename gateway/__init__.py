"""The OpenAI-compatible gateway: tokenizer, embeddings, LM head and sampling at the edge of the swarm.

`app.create_app(settings, backend)` builds the FastAPI app. A request flows
protocol.schemas (validation) -> state/tenancy (auth) -> inference.serving (prepare: tokens,
limits; a tenant slot and a swarm session) -> inference.generation (embed ->
`backend.InferenceSession.step` -> logits -> sampling -> stops) -> chat/completions (response or
SSE via streaming). Errors leave in OpenAI's envelope (protocol.errors). Fine-tuning
(fine_tuning/) keeps its own state beside the shared one; storage/ holds what persists.
"""
