"""Model backends: small classes with load() once per process and run_batch() per batch."""
