"""tus headers in and out: each parser's accepted forms and the 4xx it raises otherwise."""

from __future__ import annotations

import base64
import email.utils
import hashlib

import pytest

from ingester.errors import IngesterError, InvalidField
from ingester.tus.errors import InvalidTusHeader, TusVersionUnsupported
from ingester.tus.protocol import (
    CHECKSUMS,
    EXTENSIONS,
    Concat,
    check_version,
    describe_file,
    effective_method,
    encode_metadata,
    http_date,
    is_offset_stream,
    options_headers,
    parse_checksum,
    parse_concat,
    parse_defer_length,
    parse_metadata,
    parse_size,
    parse_upload_id,
    upload_id_from_url,
)

ID_A = "0123456789abcdef0123456789abcdef"
ID_B = "fedcba9876543210fedcba9876543210"


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


# --- Tus-Resumable, methods ------------------------------------------------------------------


def test_version_1_0_0_is_accepted() -> None:
    check_version("1.0.0")
    check_version(" 1.0.0 ")


@pytest.mark.parametrize("value", [None, "", "0.2.2", "1.0", "2.0.0"])
def test_other_versions_are_412_with_tus_version(value: str | None) -> None:
    with pytest.raises(TusVersionUnsupported) as caught:
        check_version(value)
    assert caught.value.status == 412
    assert caught.value.headers["Tus-Version"] == "1.0.0"


@pytest.mark.parametrize(
    ("method", "override", "expected"),
    [
        ("POST", None, "POST"),
        ("POST", "PATCH", "PATCH"),
        ("POST", "patch", "PATCH"),
        ("POST", " DELETE ", "DELETE"),
        ("GET", "", "GET"),
        ("post", None, "POST"),
        # Only a POST may name another method: safe methods stay what they are.
        ("GET", "DELETE", "GET"),
        ("HEAD", "DELETE", "HEAD"),
        ("head", "PATCH", "HEAD"),
        ("OPTIONS", "DELETE", "OPTIONS"),
        ("PATCH", "DELETE", "PATCH"),
        ("DELETE", "PUT", "DELETE"),
    ],
)
def test_method_override(method: str, override: str | None, expected: str) -> None:
    assert effective_method(method, override) == expected


def test_an_override_naming_no_tus_method_is_400() -> None:
    with pytest.raises(InvalidTusHeader):
        effective_method("POST", "PUT")


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", 0), (" 42 ", 42)])
def test_sizes(value: str | None, expected: int | None) -> None:
    assert parse_size("Upload-Offset", value) == expected


@pytest.mark.parametrize("value", ["", "-1", "+5", "1.0", "1_000", "0x10", "٣", "9" * 19, "a"])
def test_sizes_that_are_not_non_negative_integers_are_400(value: str) -> None:
    with pytest.raises(InvalidTusHeader) as caught:
        parse_size("Upload-Offset", value)
    assert "Upload-Offset" in caught.value.message
    assert caught.value.status == 400


def test_defer_length_must_be_1() -> None:
    assert parse_defer_length(None) is False
    assert parse_defer_length("1") is True
    with pytest.raises(InvalidTusHeader):
        parse_defer_length("true")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/offset+octet-stream", True),
        ("Application/Offset+Octet-Stream; charset=x", True),
        ("application/octet-stream", False),
        (None, False),
        ("", False),
    ],
)
def test_offset_stream_content_type(value: str | None, expected: bool) -> None:
    assert is_offset_stream(value) is expected


@pytest.mark.parametrize(
    ("value", "valid"),
    [(ID_A, True), (ID_A.upper(), False), (ID_A[:-1], False), ("../" + ID_A[3:], False)],
)
def test_upload_ids_are_32_lowercase_hex_digits(value: str, valid: bool) -> None:
    assert (parse_upload_id(value) is not None) is valid


# --- Upload-Metadata -------------------------------------------------------------------------


def test_metadata_pairs_and_keys_without_value() -> None:
    header = f"filename {b64(b'cat.jpg')},is_confidential,empty ,note {b64('é'.encode())}"
    assert parse_metadata(header) == {
        "filename": b"cat.jpg",
        "is_confidential": b"",
        "empty": b"",
        "note": "é".encode(),
    }


@pytest.mark.parametrize("value", [None, "", "  "])
def test_no_or_empty_metadata_is_none(value: str | None) -> None:
    # tuspy sends an empty Upload-Metadata header when it has no metadata.
    assert parse_metadata(value) == {}


@pytest.mark.parametrize(
    "value",
    [
        "filename notbase64!",
        "filename YQ",  # missing padding
        f"a {b64(b'1')},a {b64(b'2')}",
        f" {b64(b'x')},",
        f"k\x01ey {b64(b'x')}",
    ],
)
def test_bad_metadata_is_400(value: str) -> None:
    with pytest.raises(InvalidTusHeader):
        parse_metadata(value)


def test_metadata_round_trips() -> None:
    metadata = {"filename": b"a b,c.txt", "flag": b"", "bin": bytes(range(256))}
    assert parse_metadata(encode_metadata(metadata)) == metadata


def test_describe_file_maps_tus_and_uppy_keys() -> None:
    described = describe_file(
        {
            "name": b"report.pdf",
            "type": b"application/pdf",
            "retention_policy": b"permanent",
            "compress": b"true",
            "metadata": b'{"project": "x"}',
            "relativePath": b"ignored",
        }
    )
    assert described.filename == "report.pdf"
    assert described.filetype == "application/pdf"
    assert described.fields == {
        "retention_policy": "permanent",
        "compress": "true",
        "metadata": '{"project": "x"}',
    }
    # The tus names win over Uppy's.
    both = describe_file({"filename": b"a.txt", "name": b"b.txt", "filetype": b"text/plain"})
    assert (both.filename, both.filetype) == ("a.txt", "text/plain")


@pytest.mark.parametrize("filetype", [b"", b"text/plain\r\nX-Evil: 1", b"nonsense", b"a/b c"])
def test_a_filetype_that_is_no_media_type_is_dropped(filetype: bytes) -> None:
    assert describe_file({"filetype": filetype}).filetype is None


def test_metadata_text_must_be_utf8() -> None:
    with pytest.raises(InvalidField):
        describe_file({"description": b"\xff\xfe"})


# --- Upload-Checksum -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(CHECKSUMS))
def test_checksums(algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"hello world").digest()
    checksum = parse_checksum(f"{algorithm} {b64(digest)}")
    assert checksum is not None
    hasher = checksum.hasher()
    hasher.update(b"hello world")
    assert hasher.digest() == checksum.digest


def test_the_spec_example_checksum() -> None:
    checksum = parse_checksum("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=")
    assert checksum is not None
    assert checksum.digest == hashlib.sha1(b"hello world").digest()


@pytest.mark.parametrize(
    "value",
    [
        "crc32 AAAAAA==",
        "SHA1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=",
        "sha1 not-base64",
        "sha1 " + b64(b"short"),
        "sha1",
    ],
)
def test_unsupported_or_malformed_checksums_are_400(value: str) -> None:
    with pytest.raises(InvalidTusHeader) as caught:
        parse_checksum(value)
    assert caught.value.status == 400


# --- Upload-Concat ---------------------------------------------------------------------------


def test_concat_partial_and_final() -> None:
    assert parse_concat(None) is None
    assert parse_concat("partial") == Concat(partial=True)
    final = parse_concat(
        f"final;/api/v1/uploads/{ID_A} http://host:1/prefix/api/v1/uploads/{ID_B}/"
    )
    assert final == Concat(partial=False, parts=(ID_A, ID_B))


@pytest.mark.parametrize(
    "value", ["final;", "final", "complete;/x", f"final;/api/v1/uploads/{ID_A}/../etc"]
)
def test_bad_concat_is_400(value: str) -> None:
    with pytest.raises(InvalidTusHeader):
        parse_concat(value)


def test_upload_id_from_relative_and_absolute_urls() -> None:
    assert upload_id_from_url(f"/api/v1/uploads/{ID_A}") == ID_A
    assert upload_id_from_url(f"https://x.example/api/v1/uploads/{ID_A}?q=1") == ID_A
    with pytest.raises(InvalidTusHeader):
        upload_id_from_url("/api/v1/uploads/")


# --- responses -------------------------------------------------------------------------------


def test_upload_expires_is_an_rfc_7231_date() -> None:
    text = http_date(1_700_000_000)
    assert text == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert email.utils.parsedate_to_datetime(text).timestamp() == 1_700_000_000


def test_options_headers() -> None:
    headers = options_headers(1234)
    assert headers["Tus-Version"] == "1.0.0"
    assert headers["Tus-Max-Size"] == "1234"
    assert set(headers["Tus-Extension"].split(",")) == set(EXTENSIONS)
    assert set(headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "md5", "sha256"}


def test_every_tus_error_is_a_project_error() -> None:
    assert issubclass(InvalidTusHeader, IngesterError)
    assert issubclass(TusVersionUnsupported, IngesterError)
