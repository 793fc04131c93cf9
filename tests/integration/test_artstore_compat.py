"""The ingester against elements that answer as artStore's own does (`--artstore-compat`).

The module's stack is two such elements (`as-edit`, `as-rw`) and an ingester that calls them
with a service account (`INGESTER_SE_AUTH=static`), as a production deployment does: each
element then records the service account as the uploader, drops `metadata` and
`content_type`, answers no `storage_filename`, refuses empty files with a 500 and reports no
capabilities in its `/api/v1/info`. What a user checks: status and `error.code`, the bytes on
the element (sha256 of a download, decompressed where the name says so), the names it holds,
how many upload requests each element saw, and that nothing is left behind.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import brotli
import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.chaos import (
    Ledger,
    assert_no_orphans,
    behind_proxy,
    snapshot,
    spool_files,
)
from tests.support.client import MIB, MultipartUpload, auth, post_upload, random_chunks, text_chunks
from tests.support.fault_proxy import Fault, FaultPlan
from tests.support.fixtures import KeyPair
from tests.support.fixtures import TokenFactory as SignedTokens
from tests.support.metrics import metric
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)
from tests.support.waiting import eventually

SERVICE_ACCOUNT: Final = "ingester-svc"
UPLOAD_REQUEST: Final = "POST /api/v1/files/upload"
ARTSTORE_201_KEYS: Final = {"file_id", "original_filename", "file_size", "checksum", "message"}


@pytest.fixture(scope="module")
def compat(
    tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair, token_factory: SignedTokens
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("compat")
    started: list[ManagedProcess] = []
    try:
        for element_id, mode in (("as-edit", "edit"), ("as-rw", "rw")):
            started.append(
                start_storage_element(
                    root,
                    element_id=element_id,
                    mode=mode,
                    public_key=keypair.public_path,
                    artstore_compat=True,
                )
            )
        se_edit, se_rw = started
        assert isinstance(se_edit, StorageElementProcess)
        assert isinstance(se_rw, StorageElementProcess)
        stack = Stack(root, keypair, se_edit, se_rw, ingester=None)  # type: ignore[arg-type]
        stack.ingester = stack.start_ingester(
            "ingester",
            INGESTER_SE_AUTH="static",
            INGESTER_SE_TOKEN=token_factory(sub=SERVICE_ACCOUNT, name=SERVICE_ACCOUNT),
            INGESTER_CLIENT_IDLE_TIMEOUT_S="5",
            INGESTER_FINALIZE_SOURCE_DELETE_DELAY_S="0.5",
        )
        started.append(stack.ingester)
        yield stack
    finally:
        for proc in reversed(started):
            proc.terminate()


def upload_requests(se: ManagedProcess) -> int:
    """Upload requests the element has answered (its access log)."""
    return sum(UPLOAD_REQUEST in line for line in se.log_lines())


def files_of(se: StorageElementProcess, file_id: str) -> list[Path]:
    return [p for p in se.stored_files() if file_id in p.name]


async def element_record(
    http: httpx.AsyncClient, se: StorageElementProcess, file_id: str, token: str
) -> dict[str, Any]:
    response = await http.get(f"{se.url}/api/v1/files/{file_id}", headers=auth(token))
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


async def downloaded(
    http: httpx.AsyncClient, se: StorageElementProcess, file_id: str, token: str
) -> bytes:
    response = await http.get(f"{se.url}/api/v1/files/{file_id}/download", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.content


async def finalized(http: httpx.AsyncClient, url: str, file_id: str, token: str) -> dict[str, Any]:
    """Finalize `file_id` through the ingester; its transaction's last status."""
    started = await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token))
    assert started.status_code == 202, started.text
    tx_id = started.json()["transaction_id"]
    while True:
        status = await http.get(f"{url}/api/v1/finalize/{tx_id}/status", headers=auth(token))
        assert status.status_code == 200, status.text
        state: dict[str, Any] = status.json()
        if state["status"] in ("done", "rolled_back"):
            return state
        await trio.sleep(0.05)


def logged(proc: ManagedProcess, event: str) -> list[dict[str, Any]]:
    """The process's JSON log lines of `event`."""
    return [
        line
        for text in proc.log_lines()
        if text.startswith("{") and (line := json.loads(text)).get("event") == event
    ]


def attr_of(se: StorageElementProcess, file_id: str) -> dict[str, Any]:
    (path,) = [p for p in files_of(se, file_id) if p.name.endswith(".attr.json")]
    record: dict[str, Any] = json.loads(path.read_text())
    return record


# --- the element itself --------------------------------------------------------------------


async def test_the_compat_element_answers_as_artstore_does(
    compat: Stack, token: TokenFactory
) -> None:
    se = compat.se_edit
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            body = MultipartUpload(
                [b"a,b\n1,2\n"],
                filename="notes.csv",
                file_content_type="text/plain",
                fields=[
                    ("description", "numbers"),
                    ("metadata", '{"project": "x"}'),
                    ("content_type", "text/csv"),
                ],
            )
            created = await post_upload(http, se.url, token(), body)
            assert created.status_code == 201, created.text
            result = created.json()
            # No storage_filename, content_type or created_at in the answer.
            assert set(result) == ARTSTORE_201_KEYS
            assert result["checksum"] == body.sha256
            file_id = result["file_id"]
            record = await element_record(http, se, file_id, token())
            # metadata and content_type were dropped: the part's own type is stored.
            assert record["content_type"] == "text/plain"
            assert record["description"] == "numbers"
            assert "metadata" not in record
            assert "created_by_id" not in record
            on_disk = attr_of(se, file_id)
            assert on_disk["metadata"] == {}
            assert on_disk["created_by_id"] == "alice"

            before = se.stored_files()
            empty = await post_upload(http, se.url, token(), MultipartUpload([]))
            assert empty.status_code == 500
            assert empty.json() == {"detail": "Failed to create file"}
            assert se.stored_files() == before

            info = (await http.get(f"{se.url}/api/v1/info")).json()
            assert {"name", "mode", "capacity_bytes", "used_bytes", "status"} <= set(info)
            assert info["mode"] == "edit"
            assert info["status"] == "operational"
            assert "element_id" not in info
            assert "capabilities" not in info

            unknown = str(uuid.uuid4())
            gone = await http.delete(f"{se.url}/api/v1/gc/{unknown}", headers=auth(token()))
            assert gone.status_code == 200
            assert gone.json()["status"] == "already_deleted"
            # Deleting needs the operator or admin role there.
            refused = await http.delete(f"{se.url}/api/v1/files/{file_id}", headers=auth(token()))
            assert refused.status_code == 403
            assert refused.json() == {"detail": "Operator or admin access required"}
            removed = await http.delete(
                f"{se.url}/api/v1/files/{file_id}", headers=auth(token(role="operator"))
            )
            assert removed.status_code == 204


async def test_a_full_compat_element_answers_500_never_507(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    se = start_storage_element(
        tmp_path,
        element_id="as-full",
        mode="edit",
        public_key=keypair.public_path,
        capacity_bytes=1000,
        artstore_compat=True,
    )
    try:
        with trio.fail_after(20):
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                body = MultipartUpload(random_chunks(MIB, seed=3))
                # A declared size over the capacity too: artStore checks nothing up front.
                for stream in (True, False):
                    response = await post_upload(http, se.url, token(), body, stream=stream)
                    assert response.status_code == 500, response.text
                    assert response.json() == {"detail": "Failed to create file"}
        assert [p for p in se.stored_files() if p.name != ".lock"] == []
    finally:
        se.terminate()


async def test_a_compat_element_whose_temporary_disk_is_full_answers_fastapis_400(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """FastAPI spools a form's file part past its first MiB before the route runs; when that
    disk cannot take it, the answer is its generic 400 and nothing is stored. The space
    comes back once the request is answered."""
    se = start_storage_element(
        tmp_path,
        element_id="as-tmp",
        mode="edit",
        public_key=keypair.public_path,
        artstore_compat=True,
        extra_args=("--artstore-tmp-bytes", str(MIB)),
    )
    try:
        with trio.fail_after(20):
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                big = MultipartUpload(random_chunks(3 * MIB, seed=5))
                response = await post_upload(http, se.url, token(), big)
                assert response.status_code == 400, response.text
                assert response.json() == {"detail": "There was an error parsing the body"}
                assert [p for p in se.stored_files() if p.name != ".lock"] == []
                # Within the space, and again: what the refused one took was given back.
                for seed in (6, 7):
                    fits = MultipartUpload(random_chunks(3 * MIB // 2, seed=seed))
                    response = await post_upload(http, se.url, token(), fits)
                    assert response.status_code == 201, response.text
                    assert response.json()["checksum"] == fits.sha256
    finally:
        se.terminate()


async def test_a_compat_element_cannot_serve_a_name_outside_latin_1(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """artStore's download writes the name raw into Content-Disposition (Latin-1 only):
    the upload of such a name works, its download is a 500."""
    se = start_storage_element(
        tmp_path, element_id="as-names", mode="edit", public_key=keypair.public_path,
        artstore_compat=True,
    )  # fmt: skip
    try:
        with trio.fail_after(20):
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                for name, served in (("café.txt", True), ("отчёт.txt", False)):
                    body = MultipartUpload([b"x" * 100], filename=name)
                    response = await post_upload(http, se.url, token(), body)
                    assert response.status_code == 201, response.text
                    file_id = response.json()["file_id"]
                    download = await http.get(
                        f"{se.url}/api/v1/files/{file_id}/download", headers=auth(token())
                    )
                    if served:
                        assert download.status_code == 200
                    else:
                        assert download.status_code == 500
                        assert download.json() == {"detail": "Failed to download file"}
    finally:
        se.terminate()


# --- through the ingester --------------------------------------------------------------------


async def test_an_upload_round_trips_with_no_invented_storage_filename(
    compat: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            body = MultipartUpload(
                random_chunks(3 * MIB + 5, seed=11),
                filename="blob.bin",
                fields=[("retention_policy", "temporary"), ("metadata", '{"k": 1}')],
            )
            response = await post_upload(http, compat.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["storage_filename"] is None
            assert result["storage_element_id"] == "as-edit"
            assert result["checksum"] == body.sha256
            stored = await downloaded(http, compat.se_edit, result["file_id"], token())
            assert hashlib.sha256(stored).hexdigest() == body.sha256
            # The element recorded the ingester's service account, not alice.
            record = await element_record(http, compat.se_edit, result["file_id"], token())
            assert record["created_by_username"] == SERVICE_ACCOUNT


@pytest.mark.parametrize(
    ("algorithm", "suffix", "media_type"),
    [("brotli", ".br", "application/x-brotli"), ("gzip", ".gz", "application/gzip")],
)
async def test_compressed_bytes_are_stored_under_a_name_that_says_so(
    compat: Stack, token: TokenFactory, algorithm: str, suffix: str, media_type: str
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            body = MultipartUpload(
                text_chunks(2 * MIB),
                filename="app.log",
                file_content_type="text/plain",
                fields=[
                    ("retention_policy", "temporary"),
                    ("compress", "true"),
                    ("compression_algorithm", algorithm),
                ],
            )
            response = await post_upload(http, compat.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["compressed"] is True
            assert result["compression_algorithm"] == algorithm
            # The client's view keeps its own name; the element's says what the bytes are.
            assert (result["original_filename"], result["content_type"]) == (
                "app.log",
                "text/plain",
            )
            file_id = result["file_id"]
            record = await element_record(http, compat.se_edit, file_id, token())
            assert record["original_filename"] == "app.log" + suffix
            assert record["content_type"] == media_type
            assert record["file_size"] == result["stored_size"] < result["file_size"]
            stored = await downloaded(http, compat.se_edit, file_id, token())
            original = (
                brotli.decompress(stored) if algorithm == "brotli" else gzip.decompress(stored)
            )
            assert hashlib.sha256(original).hexdigest() == body.sha256


async def test_an_empty_file_is_400_before_anything_is_sent(
    compat: Stack, token: TokenFactory
) -> None:
    elements = compat.elements
    before_files = compat.all_files()
    before_requests = [upload_requests(se) for se in elements]
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            for policy in ("temporary", "permanent"):
                body = MultipartUpload([], fields=[("retention_policy", policy)])
                response = await post_upload(http, compat.url, token(), body)
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert error["code"] == "EMPTY_FILE"
                assert "empty" in error["message"]
            # A zero-length resumable upload: refused at its creation, nothing kept.
            created = await http.post(
                compat.url + "/api/v1/uploads",
                headers=auth(
                    token(),
                    **{
                        "Tus-Resumable": "1.0.0",
                        "Upload-Length": "0",
                        "Upload-Metadata": "filename " + base64.b64encode(b"e.txt").decode(),
                    },
                ),
            )
            assert created.status_code == 400, created.text
            assert created.json()["error"]["code"] == "EMPTY_FILE"
            # The service keeps serving.
            ok = await post_upload(http, compat.url, token(), MultipartUpload([b"x"]))
            assert ok.status_code == 201, ok.text
    # Not one upload request reached an element for the empty files; the one that follows did.
    assert [upload_requests(se) for se in elements] == [
        before_requests[0] + 1,
        before_requests[1],
    ]
    assert len(compat.all_files() - before_files) == 2


async def test_a_resumable_upload_completes_on_a_compat_element(
    compat: Stack, token: TokenFactory
) -> None:
    data = b"".join(random_chunks(MIB + 3, seed=13))
    headers = {"Tus-Resumable": "1.0.0"}
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            created = await http.post(
                compat.url + "/api/v1/uploads",
                headers=auth(
                    token(),
                    **headers,
                    **{
                        "Upload-Length": str(len(data)),
                        "Upload-Metadata": "filename " + base64.b64encode(b"r.bin").decode(),
                    },
                ),
            )
            assert created.status_code == 201, created.text
            location = compat.url + created.headers["Location"]
            patched = await http.patch(
                location,
                content=data,
                headers=auth(
                    token(),
                    **headers,
                    **{
                        "Upload-Offset": "0",
                        "Content-Type": "application/offset+octet-stream",
                    },
                ),
            )
            assert patched.status_code == 204, patched.text
            file_id = patched.headers["Upload-File-Id"]
            assert patched.headers["Upload-Storage-Element-Id"] == "as-edit"
            result = (await http.get(location, headers=auth(token(), **headers))).json()
            assert result["result"]["storage_filename"] is None
            stored = await downloaded(http, compat.se_edit, file_id, token())
            assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_repeat_with_an_idempotency_key_stores_once(
    compat: Stack, token: TokenFactory
) -> None:
    key = f"compat-{uuid.uuid4()}"
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            answers = []
            for _ in range(2):
                body = MultipartUpload(random_chunks(256 * 1024, seed=17), filename="same.bin")
                answers.append(
                    await post_upload(
                        http, compat.url, token(), body, headers={"Idempotency-Key": key}
                    )
                )
    first, again = answers
    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["file_id"] == first.json()["file_id"]
    assert len(files_of(compat.se_edit, first.json()["file_id"])) == 2


async def test_the_uploader_finalizes_though_the_element_recorded_the_service_account(
    compat: Stack, token: TokenFactory
) -> None:
    url = compat.url
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            body = MultipartUpload(
                random_chunks(2 * MIB, seed=19),
                filename="report.bin",
                fields=[("retention_policy", "temporary"), ("description", "q3")],
            )
            response = await post_upload(http, url, token(), body)
            assert response.status_code == 201, response.text
            file_id = response.json()["file_id"]
            record = await element_record(http, compat.se_edit, file_id, token())
            assert record["created_by_username"] == SERVICE_ACCOUNT

            # Another user cannot, as for an unknown file.
            other = await http.post(
                f"{url}/api/v1/finalize/{file_id}", headers=auth(token(sub="bob"))
            )
            assert other.status_code == 404, other.text
            assert other.json()["error"]["code"] == "FILE_NOT_FOUND"

            state = await finalized(http, url, file_id, token())
            assert state["status"] == "done", state
            assert state["storage_element_id"] == "as-rw"
            stored = await downloaded(http, compat.se_rw, file_id, token())
            assert hashlib.sha256(stored).hexdigest() == body.sha256
            # The source went (through gc: the element refuses a user's DELETE).
            gone = await http.get(
                f"{compat.se_edit.url}/api/v1/files/{file_id}", headers=auth(token())
            )
            assert gone.status_code == 404
    assert files_of(compat.se_edit, file_id) == []
    assert len(files_of(compat.se_rw, file_id)) == 2


async def test_a_cyrillic_name_is_stored_so_that_it_can_be_downloaded_and_finalized(
    compat: Stack, token: TokenFactory
) -> None:
    """Toward artStore's element a name outside Latin-1 goes percent-encoded: otherwise
    every download of the file fails there, and so does its finalization (a copy made by
    downloading it), for good."""
    url = compat.url
    name = "отчёт за 2026.pdf"
    sent = "%D0%BE%D1%82%D1%87%D1%91%D1%82 %D0%B7%D0%B0 2026.pdf"
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            body = MultipartUpload(
                random_chunks(MIB + 5, seed=41),
                filename=name,
                fields=[("retention_policy", "temporary"), ("compress", "false")],
            )
            response = await post_upload(http, url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["original_filename"] == name
            file_id = result["file_id"]
            record = await element_record(http, compat.se_edit, file_id, token())
            assert record["original_filename"] == sent
            stored = await downloaded(http, compat.se_edit, file_id, token())
            assert hashlib.sha256(stored).hexdigest() == body.sha256

            state = await finalized(http, url, file_id, token())
            assert state["status"] == "done", state
            moved = await downloaded(http, compat.se_rw, file_id, token())
            assert hashlib.sha256(moved).hexdigest() == body.sha256
            record = await element_record(http, compat.se_rw, file_id, token())
            assert record["original_filename"] == sent


async def test_a_long_accented_name_is_cut_so_that_artstore_can_write_the_file(
    compat: Stack, token: TokenFactory
) -> None:
    """artStore names its files after the upload's name, cut to 200 characters: in accented
    letters (two bytes each) that passed the file system's 255 bytes, and every element
    failed the write (`502` after two). The name is cut where its files fit; our answer
    keeps it whole."""
    name = "àéèêëïîôùûüç" * 10 + ".pdf"  # 244 bytes: a name the ingester takes whole
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            body = MultipartUpload(
                random_chunks(MIB + 3, seed=43), filename=name, fields=[("compress", "false")]
            )
            response = await post_upload(http, compat.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["original_filename"] == name
            record = await element_record(http, compat.se_edit, result["file_id"], token())
            sent = record["original_filename"]
            assert sent == "àéèêëïîôùûüç" * 3 + "àéèêëïîôù.pdf"  # 45 letters of two bytes
            stored = await downloaded(http, compat.se_edit, result["file_id"], token())
            assert hashlib.sha256(stored).hexdigest() == body.sha256


# --- refusals, modes, mixed elements -----------------------------------------------------------


async def test_an_element_whose_temporary_disk_is_full_is_failed_over_not_blamed_on_the_file(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, token_factory: SignedTokens
) -> None:
    """artStore's `400 "There was an error parsing the body"` (its temporary disk) is the
    element's failure: the upload moves on to an element with room and is stored whole, and
    the element that refused holds nothing."""
    async with contextlib.AsyncExitStack() as stack:
        cramped = start_storage_element(
            tmp_path,
            element_id="as-cramped",
            mode="edit",
            public_key=keypair.public_path,
            artstore_compat=True,
            extra_args=("--artstore-tmp-bytes", str(MIB)),
        )
        stack.callback(cramped.terminate)
        roomy = start_storage_element(
            tmp_path,
            element_id="as-roomy",
            mode="edit",
            public_key=keypair.public_path,
            artstore_compat=True,
        )
        stack.callback(roomy.terminate)
        assert isinstance(cramped, StorageElementProcess)
        assert isinstance(roomy, StorageElementProcess)
        ingester = start_ingester(
            tmp_path,
            name="ingester",
            public_key=keypair.public_path,
            elements=[cramped.registry_entry(priority=10), roomy.registry_entry(priority=20)],
            env={
                "INGESTER_SE_AUTH": "static",
                "INGESTER_SE_TOKEN": token_factory(sub=SERVICE_ACCOUNT, name=SERVICE_ACCOUNT),
            },
        )
        stack.callback(ingester.terminate)
        ingester.wait_ready()
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                body = MultipartUpload(
                    random_chunks(4 * MIB + 3, seed=29),
                    fields=[("retention_policy", "temporary"), ("compress", "false")],
                )
                response = await post_upload(http, ingester.url, token(), body)
                assert response.status_code == 201, response.text
                result = response.json()
                assert result["storage_element_id"] == "as-roomy"
                assert result["checksum"] == body.sha256
                stored = await downloaded(http, roomy, result["file_id"], token())
                assert hashlib.sha256(stored).hexdigest() == body.sha256
        assert upload_requests(cramped) == 1
        assert [p for p in cramped.stored_files() if p.name != ".lock"] == []


async def test_a_file_stored_after_its_client_left_past_the_last_byte_is_removed(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, token_factory: SignedTokens
) -> None:
    """artStore's element writes the file after the last byte and finishes whoever hung up.
    A client that leaves between the two cancels its upload, and the removal sent at once
    finds nothing (`already_deleted`): the saga checks the element again, and removes the
    file once it has landed. Nothing is left."""
    async with contextlib.AsyncExitStack() as stack:
        slow = start_storage_element(
            tmp_path,
            element_id="as-slow",
            mode="edit",
            public_key=keypair.public_path,
            artstore_compat=True,
            extra_args=("--artstore-write-delay-s", "2", "--log-format", "json"),
        )
        stack.callback(slow.terminate)
        assert isinstance(slow, StorageElementProcess)
        ingester = start_ingester(
            tmp_path,
            name="ingester",
            public_key=keypair.public_path,
            elements=[slow.registry_entry()],
            env={
                "INGESTER_SE_AUTH": "static",
                "INGESTER_SE_TOKEN": token_factory(sub=SERVICE_ACCOUNT, name=SERVICE_ACCOUNT),
                "INGESTER_SAGA_RECHECK_S": "8",
                "INGESTER_COMPENSATION_BACKOFF_MAX_S": "1",
            },
        )
        stack.callback(ingester.terminate)
        ingester.wait_ready()
        body = MultipartUpload(random_chunks(2 * MIB, seed=31))
        payload = b"".join(body.parts())
        head = (
            f"POST /api/v1/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token()}\r\nContent-Type: {body.content_type}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        port = int(ingester.url.rsplit(":", 1)[1])

        with trio.fail_after(40):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(head + payload)
            # Every byte is on the element, which writes the file now; the client leaves.
            await eventually(lambda: bool(logged(slow, "se_body_received")), timeout_s=20)
            await client.aclose()
            file_id = logged(slow, "se_body_received")[0]["file_id"]

            def left() -> list[Path]:
                return [p for p in slow.stored_files() if p.name != ".lock"]

            # The file lands 2 s after the removal that found nothing; the saga's next check
            # removes it (the recheck window is 8 s).
            with contextlib.suppress(trio.TooSlowError):
                await eventually(
                    lambda: not left() and bool(logged(slow, "se_deleted")), timeout_s=15
                )
        assert left() == [], "the file stored after its client left is still on the element"
        assert [line["file_id"] for line in logged(slow, "se_deleted")] == [file_id]
        # The removals before it landed found nothing, and the saga said it would check again.
        assert {line["file_id"] for line in logged(ingester, "compensation_recheck")} == {file_id}


async def test_a_finalization_copy_stored_after_its_timeout_is_removed(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, token_factory: SignedTokens
) -> None:
    """The permanent copy goes first to an artStore element whose write after the last byte
    outlasts the ingester's response timeout: the copy moves on to the next rw element and
    is committed there, and the first element stores its copy after all, when the removal
    sent at once had found nothing. The finalization checks that element again and removes
    the late copy before it is done: one permanent copy, nothing left."""
    async with contextlib.AsyncExitStack() as stack:
        elements = []
        for element_id, mode, delay in (
            ("as-temp", "edit", "0"),
            ("as-slow", "rw", "3"),
            ("as-good", "rw", "0"),
        ):
            extra = ["--log-format", "json"]
            if delay != "0":
                extra += ["--artstore-write-delay-s", delay]
            se = start_storage_element(
                tmp_path,
                element_id=element_id,
                mode=mode,
                public_key=keypair.public_path,
                artstore_compat=True,
                extra_args=extra,
            )
            stack.callback(se.terminate)
            assert isinstance(se, StorageElementProcess)
            elements.append(se)
        temp, slow, good = elements
        ingester = start_ingester(
            tmp_path,
            name="ingester",
            public_key=keypair.public_path,
            elements=[
                temp.registry_entry(),
                slow.registry_entry(priority=10),
                good.registry_entry(priority=20),
            ],
            env={
                "INGESTER_SE_AUTH": "static",
                "INGESTER_SE_TOKEN": token_factory(sub=SERVICE_ACCOUNT, name=SERVICE_ACCOUNT),
                "INGESTER_SE_RESPONSE_TIMEOUT_S": "1",
                "INGESTER_SAGA_RECHECK_S": "8",
                "INGESTER_COMPENSATION_BACKOFF_MAX_S": "1",
                "INGESTER_FINALIZE_SOURCE_DELETE_DELAY_S": "0.2",
            },
        )
        stack.callback(ingester.terminate)
        ingester.wait_ready()
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                body = MultipartUpload(
                    random_chunks(2 * MIB, seed=37), fields=[("retention_policy", "temporary")]
                )
                response = await post_upload(http, ingester.url, token(), body)
                assert response.status_code == 201, response.text
                file_id = response.json()["file_id"]
                state = await finalized(http, ingester.url, file_id, token())
                assert state["status"] == "done", state
                assert state["storage_element_id"] == "as-good"
                stored = await downloaded(http, good, file_id, token())
                assert hashlib.sha256(stored).hexdigest() == body.sha256

            def late_copies() -> list[Path]:
                return [p for p in slow.stored_files() if p.name != ".lock"]

            # The slow element got the whole copy, and wrote it 3 s later.
            assert [line["file_id"] for line in logged(slow, "se_body_received")] == [file_id]
            with contextlib.suppress(trio.TooSlowError):
                await eventually(
                    lambda: not late_copies() and bool(logged(slow, "se_deleted")), timeout_s=12
                )
        assert late_copies() == [], "the copy stored after its timeout is still there"
        assert [line["file_id"] for line in logged(slow, "se_deleted")] == [file_id]
        assert [p for p in temp.stored_files() if p.name != ".lock"] == []


async def test_an_identical_refusal_from_two_elements_ends_the_upload(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """Two full compat elements answer the same 500 to the same file: the upload ends after
    those two requests with a clear 502, not after every element in every retry round."""
    async with contextlib.AsyncExitStack() as stack:
        elements = [
            start_storage_element(
                tmp_path,
                element_id=f"as-full-{n}",
                mode="edit",
                public_key=keypair.public_path,
                capacity_bytes=1000,
                artstore_compat=True,
            )
            for n in (1, 2)
        ]
        for se in elements:
            stack.callback(se.terminate)
        ingester = start_ingester(
            tmp_path,
            name="ingester",
            public_key=keypair.public_path,
            elements=[se.registry_entry() for se in elements],
            env={"INGESTER_RETRY_MAX_ATTEMPTS": "4", "INGESTER_RETRY_BASE_S": "0.05"},
        )
        stack.callback(ingester.terminate)
        ingester.wait_ready()
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                started = trio.current_time()
                body = MultipartUpload(random_chunks(MIB, seed=23))
                response = await post_upload(http, ingester.url, token(), body)
                took = trio.current_time() - started
                assert response.status_code == 502, response.text
                error = response.json()["error"]
                assert error["code"] == "STORAGE_ELEMENT_REJECTED"
                assert "Failed to create file" in error["message"]
                assert "not retried" in error["message"]
                ready = await http.get(ingester.url + "/health/ready")
                assert ready.status_code == 200
        assert sum(upload_requests(se) for se in elements) == 2
        assert took < 5, took
        for se in elements:
            assert [p for p in se.stored_files() if p.name != ".lock"] == []


async def test_an_element_whose_own_mode_refuses_writes_gets_none_and_readiness_says_so(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """The registry says `edit`; the element says `ro`: it is shown as a mismatch, logged once,
    left out of the writable list, and uploads go to the next element."""
    async with contextlib.AsyncExitStack() as stack:
        stale = start_storage_element(
            tmp_path,
            element_id="as-stale",
            mode="ro",
            public_key=keypair.public_path,
            artstore_compat=True,
        )
        stack.callback(stale.terminate)
        good = start_storage_element(
            tmp_path,
            element_id="as-good",
            mode="edit",
            public_key=keypair.public_path,
            artstore_compat=True,
        )
        stack.callback(good.terminate)
        entries = [
            {**stale.registry_entry(priority=1), "mode": "edit"},
            good.registry_entry(priority=2),
        ]
        ingester = start_ingester(
            tmp_path, name="ingester", public_key=keypair.public_path, elements=entries
        )
        stack.callback(ingester.terminate)
        ingester.wait_ready()
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:

                async def report() -> dict[str, Any]:
                    ready = (await http.get(ingester.url + "/health/ready")).json()
                    return {e["id"]: e for e in ready["storage_elements"]} | {
                        "writable": ready["writable_storage_elements"]
                    }

                await eventually_async(
                    lambda r: r["as-stale"]["reported_mode"] == "ro", report, timeout_s=10
                )
                shown = await report()
                assert shown["as-stale"]["mode_mismatch"] is True
                assert shown["as-good"]["mode_mismatch"] is False
                assert shown["writable"] == ["as-good"]
                for seed in (1, 2):
                    body = MultipartUpload(random_chunks(64 * 1024, seed=seed))
                    response = await post_upload(http, ingester.url, token(), body)
                    assert response.status_code == 201, response.text
                    assert response.json()["storage_element_id"] == "as-good"
                # Several probes later, the mismatch is still logged once.
                await trio.sleep(1.5)
        assert upload_requests(stale) == 0
        mismatches = [line for line in ingester.log_lines() if "se_mode_mismatch" in line]
        assert len(mismatches) == 1, mismatches


async def test_a_failover_between_element_kinds_sends_each_its_own_head(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """A brotli upload cut on a reference element (which keeps our metadata: stored as
    `app.log`) fails over to a compat one, which is given `app.log.br` and the brotli type;
    the bytes there decompress to the original, and nothing is left on the first."""
    proxied = start_storage_element(
        tmp_path, element_id="se-keeps", mode="edit", public_key=keypair.public_path
    )
    direct = start_storage_element(
        tmp_path,
        element_id="as-drops",
        mode="edit",
        public_key=keypair.public_path,
        artstore_compat=True,
    )
    try:
        elements = (proxied, direct)
        before = snapshot(elements)
        ledger = Ledger()
        with trio.fail_after(60):
            async with (
                behind_proxy(tmp_path, keypair, proxied, direct) as (proxy, ingester),
                httpx.AsyncClient(trust_env=False, timeout=30) as http,
            ):
                proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=MIB))
                body = MultipartUpload(
                    text_chunks(16 * MIB),
                    filename="app.log",
                    file_content_type="text/plain",
                    fields=[
                        ("retention_policy", "temporary"),
                        ("compress", "true"),
                        ("compression_algorithm", "brotli"),
                    ],
                )
                response = await post_upload(http, ingester.url, token(), body)
                stored = ledger.add(response, body)
                assert stored is not None, response.text
                assert proxy.faults_fired == 1
                assert stored.element_id == "as-drops"
                record = await element_record(http, direct, stored.file_id, token())
                assert record["original_filename"] == "app.log.br"
                assert record["content_type"] == "application/x-brotli"
                data = await downloaded(http, direct, stored.file_id, token())
                assert hashlib.sha256(brotli.decompress(data)).hexdigest() == body.sha256
                metrics = (await http.get(ingester.url + "/metrics")).text
                assert metric(metrics, "ingester_failovers_total", element_id="se-keeps") == 1
            await assert_no_orphans(elements, ledger, baseline=before)
            assert spool_files(ingester) == []
    finally:
        for se in (proxied, direct):
            se.terminate()


async def eventually_async(
    check: Callable[[Any], bool], probe: Callable[[], Awaitable[Any]], *, timeout_s: float
) -> None:
    """Until `check(await probe())` holds."""
    with trio.fail_after(timeout_s):
        while True:
            if check(await probe()):
                return
            await trio.sleep(0.05)
