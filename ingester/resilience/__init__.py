"""Breakers and retries for the Storage Elements: plain state machines, no I/O. And `leases`:
the lease keeper, janitor and retry loops the saga book and the finalizer share, doing their
I/O through the callables they are given."""
