"""Neither networking nor compute: atomic file writes (atomic_files) and owner-only secret files (secret_file)."""
