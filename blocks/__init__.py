"""Compute only, no networking: checkpoints, families, spans of layers, the head, KV caches, quantization, LoRA."""
