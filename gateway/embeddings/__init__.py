"""`POST /v1/embeddings`: a served model's final hidden states, mean-pooled and L2-normalised."""
