"""Compute of a block server and of the client's ends of the model; no networking.

checkpoint: read a local safetensors checkpoint · family: per-family layout and masks ·
span: decoder layers [start, end) · head: embeddings, final norm, LM head ·
cache: per-session KV-cache bookkeeping · lora: per-request LoRA on a span's layers ·
adapter_cache: adapters by digest · tiny_checkpoints: small real-architecture models.
"""
