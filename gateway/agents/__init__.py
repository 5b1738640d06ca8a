"""Agent features over the sampler: tool-call parsing, tool prompts and guided decoding."""
