"""Chat and text completions: routes, the shared serving base, generation, sampling, stops, streaming, logprobs."""
