"""The gateway's persistent state: one SQLite database, uploaded files, jobs, fine-tuned models, keys."""
