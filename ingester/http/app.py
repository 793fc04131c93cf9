"""The ingester's QuartTrio app: routes for uploads, progress, probes, metrics and info."""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from typing import Any, Final, cast

import trio
from quart import Blueprint, Response, current_app, request
from quart_trio import QuartTrio

from .. import __version__, logs
from ..auth.principal import Principal
from ..auth.verifier import bearer_from_header, require_upload
from ..errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    IngesterError,
    InvalidField,
    Unauthorized,
    UploadNotFound,
)
from ..http.multipart import parse_boundary
from ..resilience.breaker import BreakerState
from ..service import Service
from ..settings import Settings
from ..upload.digest import parse_content_digest
from ..upload.idempotency import parse_key, scoped_key
from ..upload.ingest import body_fingerprint, collapse, ingest
from .base import make_app
from .cors import install_cors
from .docs import docs
from .openapi import openapi_document

log = logging.getLogger(__name__)

BREAKER_LEVELS: Final = {
    BreakerState.CLOSED: 0,
    BreakerState.HALF_OPEN: 1,
    BreakerState.OPEN: 2,
}
_UUID_RE: Final = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)

api = Blueprint("api", __name__)
ops = Blueprint("ops", __name__)


def service() -> Service:
    return cast(Service, current_app.config["INGESTER_SERVICE"])


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def authenticate() -> Principal:
    svc = service()
    try:
        if svc.verifier is None:
            raise Unauthorized("token verification is not configured on this ingester")
        token = await bearer_from_header(request.headers.get("Authorization"))
        principal = await svc.verifier.verify(token)
    except Unauthorized:
        svc.metrics.auth_failures.labels("401").inc()
        raise
    logs.bind(user=principal.username)
    return principal


async def authenticate_uploader() -> Principal:
    """The caller, who must be allowed to upload (403 otherwise, counted)."""
    principal = await authenticate()
    try:
        require_upload(principal)
    except IngesterError:
        service().metrics.auth_failures.labels("403").inc()
        raise
    return principal


# --- uploads -----------------------------------------------------------------------------


@api.post("/api/v1/files/upload")
async def upload_file() -> Response:
    svc = service()
    principal = await authenticate_uploader()
    boundary = parse_boundary(request.headers.get("Content-Type"))
    digest = parse_content_digest(request.headers.get("Content-Digest"))
    supplied_id = request.headers.get("X-Upload-ID")
    if supplied_id is not None and not _UUID_RE.match(supplied_id):
        raise InvalidField("X-Upload-ID must be a UUID")
    upload_id = str(uuid.UUID(supplied_id)) if supplied_id else str(uuid.uuid4())
    if svc.progress.get(upload_id) is not None:
        raise InvalidField(f"upload id {upload_id} is already in use")
    logs.bind(upload_id=upload_id)
    key = parse_key(request.headers.get("Idempotency-Key"))
    headers: dict[str, str] = {}
    if key is None:
        result = await ingest_request(svc, principal, upload_id, boundary, digest)
    else:
        scoped = scoped_key(principal.subject, key)
        first = await svc.idempotency.claim(scoped, upload_id)
        if first is None:
            result = await ingest_once(svc, principal, upload_id, boundary, digest, scoped)
        elif first.state != "done" or first.result is None:
            raise IdempotencyInProgress()
        else:
            seen = await body_fingerprint(svc, boundary=boundary, body=request.body)
            if seen != first.fingerprint:
                raise IdempotencyKeyReused()
            log.info(
                "repeated request: replaying the result of upload %s",
                first.owner,
                extra={"event": "idempotent_replay", "file_id": first.result.get("file_id")},
            )
            result = first.result
            headers["Idempotent-Replayed"] = "true"
    headers["Location"] = f"/api/v1/files/{result['file_id']}"
    return json_response(result, 201, headers=headers)


async def ingest_request(
    svc: Service, principal: Principal, upload_id: str, boundary: bytes, digest: bytes | None
) -> dict[str, Any]:
    return await ingest(
        svc,
        principal=principal,
        upload_id=upload_id,
        boundary=boundary,
        body=request.body,
        content_type=request.headers.get("Content-Type"),
        content_length=request.content_length,
        digest=digest,
    )


async def ingest_once(
    svc: Service,
    principal: Principal,
    upload_id: str,
    boundary: bytes,
    digest: bytes | None,
    key: str,
) -> dict[str, Any]:
    """The first request with an Idempotency-Key: run it holding the key; a failure lets the
    key go (the client may retry with it), a success keeps the result for repeats."""
    guard = svc.idempotency
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guard.keep, key, upload_id)
                try:
                    result = await ingest_request(svc, principal, upload_id, boundary, digest)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise collapse(group) from None
    except BaseException:
        await guard.release(key, upload_id)
        raise
    await guard.complete(key, upload_id, result)
    return result


@api.get("/api/v1/files/uploads/<upload_id>")
async def upload_progress(upload_id: str) -> Response:
    svc = service()
    principal = await authenticate()
    entry = svc.progress.get(upload_id)
    # Someone else's upload is reported as missing: ids must not leak who uploads what.
    if entry is None or (entry.owner != principal.subject and not principal.is_admin):
        raise UploadNotFound(f"no upload {upload_id} is known here")
    return json_response(entry.as_json(svc.progress.now()), headers={"Cache-Control": "no-store"})


# --- probes, metrics, info -------------------------------------------------------------------


@ops.get("/health/live")
@ops.get("/api/v1/health/live")
async def live() -> Response:
    return json_response({"status": "alive"})


@ops.get("/health/ready")
@ops.get("/api/v1/health/ready")
async def ready() -> Response:
    svc = service()
    registry = svc.registry
    elements = [
        {
            "id": element.id,
            "mode": element.mode.value,
            "status": element.status,
            "ready": registry.health_of(element.id).ready,
            "last_error": registry.health_of(element.id).last_error,
            "breaker": svc.breakers.breaker(element.id).state(trio.current_time()).value,
            **registry.report(element),
        }
        for element in registry.elements
    ]
    writable = registry.writable_ready()
    reasons = []
    if svc.draining:
        reasons.append("shutting down")
    if not svc.started:
        reasons.append("starting")
    if not writable:
        reasons.append("no writable Storage Element answers")
    payload: dict[str, Any] = {
        "status": "ready" if not reasons else "not_ready",
        "reasons": reasons,
        "writable_storage_elements": [element.id for element in writable],
        "storage_elements": elements,
        "registry_source": registry.source,
        "uploads_in_flight": svc.admission.in_flight,
    }
    # Where the registry comes from; a Redis outage with a writable element known degrades
    # readiness but keeps it 200 (uploads still work).
    sync = svc.registry_sync
    age = sync.age_s(trio.current_time()) if sync is not None else None
    payload["registry"] = {
        "source": registry.source,
        "age_s": None if age is None else round(age, 3),
        "redis_connected": sync.connected if sync is not None else None,
    }
    if sync is not None and not sync.connected and not reasons:
        payload["status"] = "degraded"
        payload["degraded"] = [f"Redis unreachable: serving the {registry.source} registry"]
    if reasons:
        return json_response(payload, 503, headers={"Retry-After": str(svc.settings.retry_after_s)})
    return json_response(payload)


@ops.get("/metrics")
async def metrics() -> Response:
    svc = service()
    now = trio.current_time()
    # Per-element series are rebuilt from the registry in use: an element that left it
    # (or changed mode) must not keep reporting its last value.
    svc.metrics.breaker_state.clear()
    svc.metrics.se_up.clear()
    for element in svc.registry.elements:
        state = svc.breakers.breaker(element.id).state(now)
        svc.metrics.breaker_state.labels(element.id).set(BREAKER_LEVELS[state])
    svc.metrics.spool_bytes.set(svc.spool_budget.used)
    svc.metrics.spool_limit.set(svc.spool_budget.max_bytes)
    svc.metrics.memory_budget_used.set(svc.memory_budget.used)
    for element in svc.registry.elements:
        up = svc.registry.health_of(element.id).ready
        svc.metrics.se_up.labels(element.id, element.mode.value).set(1 if up else 0)
    sync = svc.registry_sync
    age = sync.age_s(trio.current_time()) if sync is not None else 0.0
    svc.metrics.registry_age.set(math.inf if age is None else age)
    svc.metrics.registry_elements.set(len(svc.registry.elements))
    for source in ("redis", "redis-stale", "static"):
        svc.metrics.registry_source.labels(source).set(1 if source == svc.registry.source else 0)
    return Response(svc.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")


@ops.get("/")
async def info() -> Response:
    svc = service()
    return json_response(
        {
            "service": "artstore-ingester",
            "version": __version__,
            "storage_elements": len(svc.registry.elements),
            "registry_source": svc.registry.source,
            "max_file_size": svc.settings.max_file_size,
            "endpoints": {
                "upload": "/api/v1/files/upload",
                "progress": "/api/v1/files/uploads/{upload_id}",
                "health": ["/health/live", "/health/ready"],
                "resumable_uploads": "/api/v1/uploads",
                "finalize": "/api/v1/finalize/{file_id}",
                "finalize_status": "/api/v1/finalize/{transaction_id}/status",
                "metrics": "/metrics",
                "openapi": "/openapi.json",
                **({"docs": "/docs"} if svc.settings.docs_enabled else {}),
            },
        }
    )


@ops.get("/openapi.json")
async def openapi() -> Response:
    return json_response(openapi_document(__version__))


def create_app(settings: Settings) -> tuple[QuartTrio, Service]:
    svc = Service(settings)
    app = make_app("ingester", buffer_limit=settings.body_buffer_limit)
    app.config["RETRY_AFTER_S"] = settings.retry_after_s
    app.config["INGESTER_SERVICE"] = svc
    install_cors(app, settings.cors_origins)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.register_blueprint(docs)
    # Imported here: the tus routes use this module's authenticate() and service().
    from ..tus.routes import tus

    app.register_blueprint(tus)
    from ..finalize.routes import finalize

    app.register_blueprint(finalize)
    return app, svc
