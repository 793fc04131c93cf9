"""Finalization routes: start a move (202), poll it, list them (admins)."""

from __future__ import annotations

from quart import Blueprint, Response, request

from ..errors import Forbidden, InvalidField
from ..http.common import authenticate, authenticate_uploader, json_response, service
from .errors import TransactionNotFound
from .record import TxState

finalize = Blueprint("finalize", __name__)

MAX_LIST: int = 1000


@finalize.post("/api/v1/finalize/<file_id>")
async def start(file_id: str) -> Response:
    svc = service()
    principal = await authenticate_uploader()
    tx = await svc.finalizer.begin(file_id, principal)
    status_url = f"/api/v1/finalize/{tx.transaction_id}/status"
    return json_response(
        tx.public() | {"status_url": status_url}, 202, headers={"Location": status_url}
    )


@finalize.get("/api/v1/finalize/<transaction_id>/status")
async def status(transaction_id: str) -> Response:
    svc = service()
    principal = await authenticate()
    tx = await svc.finalizer.status(transaction_id)
    # Someone else's transaction is reported as missing, as uploads are.
    if tx is None or (
        principal.subject not in (tx.requested_by, tx.file.uploaded_by) and not principal.is_admin
    ):
        raise TransactionNotFound(f"no finalization {transaction_id} is known here")
    return json_response(tx.public(), headers={"Cache-Control": "no-store"})


@finalize.get("/api/v1/finalize")
async def listing() -> Response:
    svc = service()
    principal = await authenticate()
    if not principal.is_admin:
        svc.metrics.auth_failures.labels("403").inc()
        raise Forbidden("only admins see the list of finalizations")
    state = request.args.get("state")
    states = {s.value for s in TxState}
    if state is not None and state not in states:
        raise InvalidField(f"state must be one of {', '.join(sorted(states))}")
    raw_limit = request.args.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise InvalidField("limit must be an integer from 1 to 1000") from None
    if not 1 <= limit <= MAX_LIST:
        raise InvalidField("limit must be an integer from 1 to 1000")
    # Filtered after reading: the newest `limit` kept, then the state asked for.
    transactions = await svc.finalizer.recent(MAX_LIST if state else limit)
    if state is not None:
        transactions = [tx for tx in transactions if tx.state.value == state]
    items = [tx.public() for tx in transactions[:limit]]
    return json_response(
        {"transactions": items, "count": len(items)}, headers={"Cache-Control": "no-store"}
    )
