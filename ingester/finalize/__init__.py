"""Finalization: a temporary file (on an `edit` Storage Element) made permanent (on an `rw` one).

record.py     the transaction's states and transitions (no I/O)
store.py      where transactions live: Redis (`ingester:finalize:*`) or this process
finalizer.py  the move, run in the service nursery: copy, verify, commit, delete the source;
              leases, and the janitor that continues or rolls back a dead ingester's moves
routes.py     POST /api/v1/finalize/{file_id}, GET .../{transaction_id}/status, GET list
"""
