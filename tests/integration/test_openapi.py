"""The OpenAPI description and the /docs page, as a client and an operator see them."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import httpx
import schemathesis
import trio

from ingester import __version__
from ingester.http.app import create_app
from ingester.http.docs import bundle_dir
from ingester.http.openapi import openapi_document
from ingester.settings import Settings
from tests.conftest import Stack

HTTP_METHODS: Final = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
_CONVERTER_RE: Final = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


async def served_routes() -> dict[str, set[str]]:
    """The app's routes as OpenAPI paths (`<upload_id>` -> `{upload_id}`) and methods."""
    app, service = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    await service.http.aclose()
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = set(rule.methods or ())
        # What the framework adds by itself: HEAD beside GET, OPTIONS answered for us.
        if "GET" in methods:
            methods.discard("HEAD")
        if getattr(rule, "provide_automatic_options", False):
            methods.discard("OPTIONS")
        routes.setdefault(_CONVERTER_RE.sub(r"{\1}", rule.rule), set()).update(methods)
    return routes


def described_routes(document: dict[str, Any]) -> dict[str, set[str]]:
    routes = {
        path: {method.upper() for method in item if method in HTTP_METHODS}
        for path, item in document["paths"].items()
    }
    # The route table cannot tell a HEAD served on purpose (tus) from the one added beside
    # GET: compare both sides without it.
    for methods in routes.values():
        if "GET" in methods:
            methods.discard("HEAD")
    return routes


async def get_document(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await http.get(url + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    document: dict[str, Any] = response.json()
    return document


async def test_served_description_matches_the_routes(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            document = await get_document(http, stack.url)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == __version__
    # A valid OpenAPI 3.1 document (checked against the specification's JSON schema).
    schemathesis.openapi.from_dict(document).validate()
    # What is served is what the fuzzing test (test_schemathesis.py) runs with.
    assert document == openapi_document(__version__)
    # Every route is described with its methods, and every described path is served.
    assert described_routes(document) == await served_routes()


async def test_every_answer_is_described_with_its_headers_and_error_body(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            document = await get_document(http, stack.url)
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"], bearer["bearerFormat"]) == ("http", "bearer", "JWT")
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            responses = operation["responses"]
            assert "500" in responses, where
            for status, response in responses.items():
                headers = response["headers"]
                assert "X-Request-ID" in headers, f"{where} {status}"
                # Errors use the JSON envelope; a readiness probe's 503 says why it is not.
                if int(status) >= 400 and operation["operationId"] not in ("ready", "readyV1"):
                    content = response["content"]["application/json"]
                    assert content["schema"] == error_ref, f"{where} {status}"
                if status in ("429", "503"):
                    assert "Retry-After" in headers, f"{where} {status}"
            if operation.get("security"):
                assert operation["security"] == [{"bearer": []}], where
                assert "WWW-Authenticate" in responses["401"]["headers"], where
    upload = document["paths"]["/api/v1/files/upload"]["post"]
    statuses = {"201", "400", "401", "403", "409", "413", "415", "422", "429", "502", "503", "507"}
    assert statuses <= set(upload["responses"])
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form == {"$ref": "#/components/schemas/UploadForm"}
    fields = document["components"]["schemas"]["UploadForm"]["properties"]
    assert set(fields) == {
        "file", "description", "retention_policy", "ttl_days", "compress",
        "compression_algorithm", "metadata", "storage_mode",
    }  # fmt: skip
    # The 400 answer lists the codes a client can meet, read from the code.
    assert "`DIGEST_MISMATCH`" in upload["responses"]["400"]["description"]


async def test_docs_page_is_off_by_default(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            page = await http.get(stack.url + "/docs")
            asset = await http.get(stack.url + "/docs/swagger-ui-bundle.js")
    for response in (page, asset):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "NOT_FOUND"
        assert response.headers["X-Request-ID"]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


async def test_docs_page_works_with_nothing_but_the_ingester(stack: Stack) -> None:
    with trio.fail_after(30):
        proc = await trio.to_thread.run_sync(
            lambda: stack.start_ingester("docs", INGESTER_DOCS_ENABLED="true")
        )
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                page = await http.get(proc.url + "/docs")
                assert page.status_code == 200
                assert page.headers["Content-Type"].startswith("text/html")
                assert "default-src 'self'" in page.headers["Content-Security-Policy"]
                parser = _Links()
                parser.feed(page.text)
                # Everything the page loads comes from the ingester itself: no CDN.
                assert parser.links
                for link in parser.links:
                    assert not urlsplit(link).netloc, link
                loaded = {}
                for link in parser.links:
                    response = await http.get(urljoin(str(page.url), link))
                    assert response.status_code == 200, link
                    loaded[link.rsplit("/", 1)[-1]] = response
                initializer = loaded["swagger-initializer.js"].text
                # Swagger UI is pointed at the description, relative to the page, with the
                # online validator off.
                assert 'url: "openapi.json"' in initializer
                assert "validatorUrl: null" in initializer
                described = await http.get(urljoin(proc.url + "/docs", "openapi.json"))
                missing = await http.get(proc.url + "/docs/index.html")
                traversal = await http.get(proc.url + "/docs/..%2F..%2Fsettings.py")
        finally:
            await trio.to_thread.run_sync(proc.terminate)
    assert described.status_code == 200
    assert described.json()["openapi"] == "3.1.0"
    bundle = loaded["swagger-ui-bundle.js"]
    assert bundle.headers["Content-Type"].startswith("text/javascript")
    assert loaded["swagger-ui.css"].headers["Content-Type"].startswith("text/css")
    # The pinned package's Swagger UI, whose major version 5 renders OpenAPI 3.1.
    assert bundle.content == await trio.Path(bundle_dir() / "swagger-ui-bundle.js").read_bytes()
    assert bundle_dir().name.startswith("swagger-ui-5.")
    for response in (missing, traversal):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "NOT_FOUND"
