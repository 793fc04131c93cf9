"""The ingester's QuartTrio apps: the public one (uploads, progress, probes, metrics, info)
and, with INGESTER_INTERNAL_PORT, an internal one serving only probes and metrics; the public
readiness then says only `{"status"}` and its /metrics is 404 (element ids, modes, breaker
states and load are nobody else's business)."""

from __future__ import annotations

import logging
import math
import re
import uuid
from typing import Any, Final

import trio
from quart import Blueprint, Response, current_app, request
from quart_trio import QuartTrio

from .. import __version__, logs
from ..auth.principal import Principal
from ..concurrency import collapse
from ..errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidField,
    NotFound,
    UploadIdInUse,
    UploadNotFound,
)
from ..http.multipart import parse_boundary
from ..resilience.breaker import BreakerState
from ..service import Service
from ..settings import Settings
from ..upload.digest import ExpectedDigest, parse_content_digest
from ..upload.idempotency import IdempotentResult, parse_key, scoped_key
from .base import make_app
from .body import request_body
from .common import authenticate, authenticate_uploader, json_response, service
from .cors import install_cors
from .docs import docs
from .receive import ReceiveShare

log = logging.getLogger(__name__)

BREAKER_LEVELS: Final = {
    BreakerState.CLOSED: 0,
    BreakerState.HALF_OPEN: 1,
    BreakerState.OPEN: 2,
}
# Names the per-user ids of uploads whose id the caller chose (`scoped_upload_id`).
_UPLOAD_ID_NAMESPACE: Final = uuid.UUID("5b0c4c1e-6f7d-4d59-9a43-2c1e8f0d7a61")
_UUID_RE: Final = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)

api = Blueprint("api", __name__)
ops = Blueprint("ops", __name__)
# Probes and metrics: on the public app, and alone on the internal one.
probes = Blueprint("probes", __name__)
# app.config key: true when an internal listener serves metrics and readiness detail.
DETAIL_ELSEWHERE: Final = "INGESTER_DETAIL_ON_INTERNAL_PORT"


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
    if supplied_id:
        # The caller's own name for the upload, in the caller's own namespace: another
        # user's id is as free as an unknown one (ids must not tell who uploads what).
        shown_id = str(uuid.UUID(supplied_id))
        upload_id = scoped_upload_id(principal.subject, shown_id)
        known = svc.progress.get(upload_id)
        # Also while an earlier upload under it still has copies being removed (its saga
        # outlives its progress record when an element is down): found by a review.
        if known is not None or svc.progress.is_reserved(upload_id) or svc.sagas.in_use(upload_id):
            # Free again once its progress record goes (retention after the end).
            left = svc.settings.retry_after_s
            if known is not None and known.finished_at is not None:
                ends = known.finished_at + svc.settings.progress_retention_s
                left = max(1, math.ceil(ends - svc.progress.now()))
            raise UploadIdInUse(
                f"upload id {shown_id} is already in use", headers={"Retry-After": str(left)}
            )
        # Taken from this check on, before the first wait: a second request with the same
        # id arriving meanwhile is refused, not run under the same id (found by a review:
        # with an Idempotency-Key, the claim's Redis round trip let both through).
        with svc.progress.reserved(upload_id):
            return await _upload(svc, principal, upload_id, shown_id, boundary, digest)
    upload_id = shown_id = str(uuid.uuid4())
    return await _upload(svc, principal, upload_id, shown_id, boundary, digest)


async def _upload(
    svc: Service,
    principal: Principal,
    upload_id: str,
    shown_id: str,
    boundary: bytes,
    digest: ExpectedDigest | None,
) -> Response:
    logs.bind(upload_id=upload_id)
    key = parse_key(request.headers.get("Idempotency-Key"))
    headers: dict[str, str] = {}
    if key is None:
        result = await ingest_request(svc, principal, upload_id, shown_id, boundary, digest)
    else:
        scoped = scoped_key(principal.subject, key)
        first = await svc.idempotency.claim(scoped, upload_id)
        if first is None:
            result = await ingest_once(
                svc, principal, upload_id, shown_id, boundary, digest, scoped
            )
        elif first.state != "done" or first.result is None:
            retry_after = first.retry_after_s(svc.idempotency.lease_s)
            raise IdempotencyInProgress(headers={"Retry-After": str(retry_after)})
        else:
            seen = await svc.ingest.body_fingerprint(boundary=boundary, body=request_body())
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


def scoped_upload_id(user: str, shown_id: str) -> str:
    """The id an upload with a caller-chosen `X-Upload-ID` runs under (progress, saga, logs):
    unique per user and id, so two users' choices never meet."""
    return str(uuid.uuid5(_UPLOAD_ID_NAMESPACE, f"{user}\0{shown_id}"))


async def ingest_request(
    svc: Service,
    principal: Principal,
    upload_id: str,
    shown_id: str,
    boundary: bytes,
    digest: ExpectedDigest | None,
    commit: IdempotentResult | None = None,
) -> dict[str, Any]:
    result = await svc.ingest.run(
        principal=principal,
        upload_id=upload_id,
        source=svc.ingest.form_source(request_body(), boundary),
        content_length=request.content_length,
        digest=digest,
        commit=commit,
    )
    return {**result, "upload_id": shown_id}


async def ingest_once(
    svc: Service,
    principal: Principal,
    upload_id: str,
    shown_id: str,
    boundary: bytes,
    digest: ExpectedDigest | None,
    key: str,
) -> dict[str, Any]:
    """The first request with an Idempotency-Key: run it holding the key; a failure lets the
    key go (the client may retry with it), a success keeps the result for repeats (written
    with the upload's saga settle, so a stored file always has it)."""
    guard = svc.idempotency
    commit = guard.commit(key, upload_id, {"upload_id": shown_id})
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guard.keep, key, upload_id)
                try:
                    result = await ingest_request(
                        svc, principal, upload_id, shown_id, boundary, digest, commit
                    )
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise collapse(group) from None
    except BaseException:
        await guard.release(key, upload_id)
        raise
    # The result is recorded: the upload's saga settled with `commit`.
    return result


@api.get("/api/v1/files/uploads/<upload_id>")
async def upload_progress(upload_id: str) -> Response:
    svc = service()
    principal = await authenticate()
    entry = None
    if _UUID_RE.match(upload_id):
        # An id the caller chose (X-Upload-ID) lives in the caller's namespace.
        shown_id = str(uuid.UUID(upload_id))
        entry = svc.progress.get(scoped_upload_id(principal.subject, shown_id))
    if entry is None:
        shown_id = upload_id
        entry = svc.progress.get(upload_id)
    # Someone else's upload is reported as missing: ids must not leak who uploads what.
    if entry is None or (entry.owner != principal.subject and not principal.is_admin):
        raise UploadNotFound(f"no upload {upload_id[:64]} is known here")
    view = entry.as_json(svc.progress.now())
    view["upload_id"] = shown_id
    if view.get("result") is not None:
        view["result"] = {**view["result"], "upload_id": shown_id}
    return json_response(view, headers={"Cache-Control": "no-store"})


# --- probes, metrics, info -------------------------------------------------------------------


@probes.get("/health/live")
@probes.get("/api/v1/health/live")
async def live() -> Response:
    return json_response({"status": "alive"})


@probes.get("/health/ready")
@probes.get("/api/v1/health/ready")
async def ready() -> Response:
    svc = service()
    payload = readiness(svc)
    if current_app.config.get(DETAIL_ELSEWHERE):
        payload = {"status": payload["status"]}
    if payload["status"] == "not_ready":
        return json_response(payload, 503, headers={"Retry-After": str(svc.settings.retry_after_s)})
    return json_response(payload)


def readiness(svc: Service) -> dict[str, Any]:
    """The readiness detail; `status` is `ready`, `degraded` (still serving) or `not_ready`."""
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
    return payload


@probes.get("/metrics")
async def metrics() -> Response:
    svc = service()
    if current_app.config.get(DETAIL_ELSEWHERE):
        raise NotFound("metrics are served on the internal port")
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
    share = current_app.config.get("RECEIVE_SHARE")
    if isinstance(share, ReceiveShare):
        svc.metrics.receive_held.set(share.held)
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
    # Imported when first asked for: the description's builders are a megabyte of RSS in
    # every replica, and most never serve it.
    from .openapi import openapi_document

    return json_response(openapi_document(__version__))


def receive_share(settings: Settings) -> ReceiveShare:
    """The one receive share of this process's listeners and request bodies."""
    return ReceiveShare(
        total_bytes=settings.receive_memory_bytes,
        max_read=settings.socket_read_size,
        queue_size=settings.app_queue_size,
    )


def create_app(settings: Settings) -> tuple[QuartTrio, Service]:
    svc = Service(settings)
    share = receive_share(settings)
    app = make_app(
        "ingester",
        buffer_limit=settings.body_buffer_limit,
        receive_share=share,
        min_rate_bytes=settings.client_min_rate_bytes,
        min_rate_window_s=settings.client_min_rate_window_s,
    )
    app.config["RETRY_AFTER_S"] = settings.retry_after_s
    app.config["INGESTER_SERVICE"] = svc
    # The listener that serves this app sizes its reads from the same share (app_main).
    app.config["RECEIVE_SHARE"] = share
    install_cors(app, settings.cors_origins)
    app.config[DETAIL_ELSEWHERE] = settings.internal_port is not None
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.register_blueprint(probes)
    app.register_blueprint(docs)
    # Imported here: the tus routes use this module's authenticate() and service().
    from ..tus.routes import tus

    app.register_blueprint(tus)
    from ..finalize.routes import finalize

    app.register_blueprint(finalize)
    return app, svc


def create_internal_app(svc: Service) -> QuartTrio:
    """The internal listener's app (INGESTER_INTERNAL_PORT): probes with their detail, and
    /metrics; nothing else (no uploads, no docs)."""
    app = make_app("ingester-internal", access_log=False)
    app.config["RETRY_AFTER_S"] = svc.settings.retry_after_s
    app.config["INGESTER_SERVICE"] = svc
    app.config[DETAIL_ELSEWHERE] = False
    app.register_blueprint(probes)
    return app
