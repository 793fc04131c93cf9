"""Resumable uploads: the tus 1.0.0 protocol at `/api/v1/uploads`.

protocol.py   headers in and out (no I/O)
state.py      one upload's state and its transitions (no I/O)
store.py      where states and locks live: Redis or this process
locks.py      one request per upload; a waiting request asks the holder to let go
data.py       the bytes, one file per upload under <spool_dir>/tus/
service.py    what each request does; completion through `ingest`; the janitor
routes.py     the Quart blueprint (imported by `create_app`)
"""
