"""The OpenAI-compatible gateway: tokenizer, embeddings, LM head and sampling at the edge of the swarm.

`app.create_app(settings, backend)` builds the FastAPI app. A request flows
schemas (validation) -> state (auth, tenant slot) -> prepare (tokens, limits) -> generation
(embed -> `backend.InferenceSession.step` -> logits -> sampling -> stops) -> chat/completions
(response or SSE via streaming). Errors leave in OpenAI's envelope (errors).
"""
