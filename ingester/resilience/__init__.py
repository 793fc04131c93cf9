"""Breakers and retries for the Storage Elements: plain state machines, no I/O."""
