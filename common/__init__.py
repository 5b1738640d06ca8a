"""Neither networking nor compute: atomic file writes (atomic_files), owner-only secret files
(secret_file), calls handed to another thread's event loop in batches (mailbox)."""
