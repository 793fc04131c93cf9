"""OpenAPI 3.1 description of the ingester's HTTP API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(version: str) -> dict[str, Any]:
    upload_result = {
        "type": "object",
        "required": [
            "file_id", "upload_id", "original_filename", "storage_filename", "content_type",
            "file_size", "stored_size", "compressed", "compression_algorithm",
            "compression_ratio", "checksum", "uploaded_at", "retention_policy",
            "ttl_expires_at", "storage_element_id", "storage_element_url",
        ],
        "properties": {
            "file_id": {"type": "string", "format": "uuid"},
            "upload_id": {"type": "string", "format": "uuid"},
            "original_filename": {"type": "string"},
            "storage_filename": {"type": "string"},
            "content_type": {"type": "string"},
            "file_size": {"type": "integer", "minimum": 0},
            "stored_size": {"type": "integer", "minimum": 0},
            "compressed": {"type": "boolean"},
            "compression_algorithm": {"type": ["string", "null"], "enum": ["gzip", "brotli", None]},
            "compression_ratio": {"type": "number"},
            "compression_decision": {"type": "string"},
            "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "uploaded_at": {"type": "string", "format": "date-time"},
            "retention_policy": {"type": "string", "enum": ["temporary", "permanent"]},
            "ttl_days": {"type": ["integer", "null"]},
            "ttl_expires_at": {"type": ["string", "null"], "format": "date-time"},
            "storage_element_id": {"type": "string"},
            "storage_element_url": {"type": "string"},
        },
    }  # fmt: skip
    upload_form = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "description": {"type": "string", "maxLength": 1000},
            "retention_policy": {"type": "string", "enum": ["temporary", "permanent"]},
            "ttl_days": {"type": "integer", "minimum": 1, "maximum": 365},
            "compress": {"type": "boolean"},
            "compression_algorithm": {"type": "string", "enum": ["gzip", "brotli"]},
            "metadata": {"type": "string", "description": "a JSON object"},
            "storage_mode": {
                "type": "string",
                "enum": ["edit", "rw"],
                "deprecated": True,
                "description": "edit = temporary, rw = permanent; ro and ar are refused",
            },
        },
    }
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "artStore Ingester", "version": version},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message", "request_id"],
                            "properties": {
                                "code": {"type": "string", "pattern": "^[A-Z_]+$"},
                                "message": {"type": "string"},
                                "request_id": {"type": "string"},
                            },
                        }
                    },
                },
                "UploadResult": upload_result,
            },
        },
        "paths": {
            "/api/v1/files/upload": {
                "post": {
                    "summary": "Upload one file (streamed to a Storage Element)",
                    "security": bearer,
                    "parameters": [
                        {"name": "Content-Digest", "in": "header", "schema": {"type": "string"}},
                        {"name": "X-Upload-ID", "in": "header", "schema": {"type": "string", "format": "uuid"}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"multipart/form-data": {"schema": upload_form}},
                    },
                    "responses": {
                        "201": _json("stored", {"$ref": "#/components/schemas/UploadResult"}),
                        "400": _error("bad field, broken multipart, missing file, digest mismatch"),
                        "401": _error("missing or invalid token"),
                        "403": _error("the token's role cannot upload"),
                        "408": _error("the client stopped sending"),
                        "413": _error("file too large"),
                        "415": _error("not multipart/form-data"),
                        "429": _error("too many uploads for this user"),
                        "502": _error("a Storage Element failed or stored different bytes"),
                        "503": _error("busy, shutting down, or no Storage Element"),
                        "507": _error("no Storage Element has room"),
                    },
                }
            },
            "/api/v1/files/uploads/{upload_id}": {
                "get": {
                    "summary": "Progress of an upload in flight or just finished",
                    "security": bearer,
                    "parameters": [
                        {"name": "upload_id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": _json("progress", {"type": "object"}),
                        "401": _error("missing or invalid token"),
                        "404": _error("unknown upload"),
                    },
                }
            },
            "/health/live": {"get": {"summary": "Liveness", "responses": {"200": _json("alive", {"type": "object"})}}},
            "/health/ready": {
                "get": {
                    "summary": "Readiness: a writable Storage Element answers and not shutting down",
                    "responses": {
                        "200": _json("ready", {"type": "object"}),
                        "503": _json("not ready", {"type": "object"}),
                    },
                }
            },
            "/api/v1/health/live": {"get": {"summary": "Liveness", "responses": {"200": _json("alive", {"type": "object"})}}},
            "/api/v1/health/ready": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": _json("ready", {"type": "object"}),
                        "503": _json("not ready", {"type": "object"}),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                }
            },
            "/": {"get": {"summary": "Service info", "responses": {"200": _json("info", {"type": "object"})}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})}}},
        },
    }  # fmt: skip
