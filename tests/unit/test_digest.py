"""The Content-Digest header (RFC 9530, structured-field dictionary): pure, no I/O."""

from __future__ import annotations

import base64
import hashlib

import pytest

from ingester.errors import DigestMismatch, InvalidDigestHeader, UnsupportedDigest
from ingester.upload.digest import ExpectedDigest, parse_content_digest

BODY = b"hello world"
DIGEST = hashlib.sha256(BODY).digest()
B64 = base64.b64encode(DIGEST).decode()
OTHER = hashlib.sha256(b"other").digest()
OTHER_B64 = base64.b64encode(OTHER).decode()
URLSAFE_B64 = base64.urlsafe_b64encode(bytes([0xFB]) * 32).decode()
SHA512 = hashlib.sha512(BODY).digest()
SHA512_B64 = base64.b64encode(SHA512).decode()


def sha256_of(header: str) -> bytes:
    expected = parse_content_digest(header)
    assert expected is not None
    return expected.values["sha-256"]


def invalid(header: str) -> str:
    with pytest.raises(InvalidDigestHeader) as caught:
        parse_content_digest(header)
    assert caught.value.code == "INVALID_CONTENT_DIGEST"
    assert caught.value.status == 400
    return caught.value.message


@pytest.mark.parametrize("header", [None, "", " ", "   "])
def test_absent_or_empty(header: str | None) -> None:
    assert parse_content_digest(header) is None


@pytest.mark.parametrize(
    "header",
    [
        f"sha-256=:{B64}:",
        f"  sha-256=:{B64}:  ",
        f"sha-512=:{SHA512_B64}:, sha-256=:{B64}:",
        f"sha-256=:{B64}:, sha-512=:{SHA512_B64}:",
        f"sha-512=:{SHA512_B64}:,sha-256=:{B64}:",
        f"sha-512=:{SHA512_B64}:,\tsha-256=:{B64}:",
        f"sha-256=:{B64}:;keyid=abc;v=1",
        f"sha-256=:{B64.rstrip('=')}:",  # padding left out, which RFC 8941 tolerates
        f"sha-256=:{OTHER_B64}:, sha-256=:{B64}:",  # the last of repeated keys counts
        f"md5=:AAAA:, unixsum=42, sha-256=:{B64}:",
    ],
)
def test_sha256_is_found(header: str) -> None:
    assert sha256_of(header) == DIGEST


def test_returns_raw_bytes_of_every_supported_algorithm() -> None:
    expected = parse_content_digest(f"sha-512=:{SHA512_B64}:, md5=:AAAA:, sha-256=:{B64}:")
    assert expected == ExpectedDigest({"sha-256": DIGEST, "sha-512": SHA512})
    assert all(type(value) is bytes for value in expected.values.values())


def test_other_structured_field_types_are_parsed_and_skipped() -> None:
    header = (
        'a=1, b=-2.5, c="say \\"hi\\" \\\\", d=?1, e=?0, f=tok/en:x, g=(1 "two" :AAAA:);p=1, '
        'h=@1700000000, i=%"caf%c3%a9", j, k;flag, l=*star, '
        f"sha-256=:{B64}:"
    )
    assert sha256_of(header) == DIGEST


def test_sha512_alone_is_found() -> None:
    assert parse_content_digest(f"sha-512=:{SHA512_B64}:") == ExpectedDigest({"sha-512": SHA512})


@pytest.mark.parametrize(
    "header",
    [
        "md5=:1B2M2Y8AsgTpgAmY7PhCfg==:",
        "unixsum=30637",
        "id-sha-256=:AAAA:",
        "sha-2567=:AAAA:",
        "md5=:AAAA:, sha=:AAAA:",
    ],
)
def test_only_unsupported_algorithms_are_refused_naming_the_supported_ones(header: str) -> None:
    with pytest.raises(UnsupportedDigest) as caught:
        parse_content_digest(header)
    assert caught.value.status == 400
    assert caught.value.code == "UNSUPPORTED_CONTENT_DIGEST"
    assert caught.value.message.endswith("this server verifies sha-256 and sha-512")
    assert caught.value.headers == {"Want-Content-Digest": "sha-256=10, sha-512=5"}


def verify(header: str, data: bytes) -> None:
    expected = parse_content_digest(header)
    assert expected is not None
    hashing = expected.hashing()
    for piece in (data[:3], data[3:]):
        hashing.update(piece)
    expected.verify(hashlib.sha256(data).digest(), hashing)


@pytest.mark.parametrize(
    "header",
    [f"sha-256=:{B64}:", f"sha-512=:{SHA512_B64}:", f"sha-256=:{B64}:, sha-512=:{SHA512_B64}:"],
)
def test_verify_accepts_the_right_bytes(header: str) -> None:
    verify(header, BODY)


OTHER_SHA512_B64 = base64.b64encode(hashlib.sha512(b"other").digest()).decode()


@pytest.mark.parametrize(
    ("header", "data", "algorithm"),
    [
        (f"sha-256=:{B64}:", b"not the body", "sha-256"),
        (f"sha-512=:{SHA512_B64}:", b"not the body", "sha-512"),
        # Every supported algorithm named is checked, not only the preferred one.
        (f"sha-256=:{OTHER_B64}:, sha-512=:{SHA512_B64}:", BODY, "sha-256"),
        (f"sha-256=:{B64}:, sha-512=:{OTHER_SHA512_B64}:", BODY, "sha-512"),
    ],
)
def test_verify_refuses_other_bytes(header: str, data: bytes, algorithm: str) -> None:
    with pytest.raises(DigestMismatch) as caught:
        verify(header, data)
    assert caught.value.message == (
        f"the file's {algorithm} does not match the Content-Digest header"
    )


def test_a_sha256_only_digest_hashes_nothing_more() -> None:
    expected = parse_content_digest(f"sha-256=:{B64}:")
    assert expected is not None
    assert not expected.hashing()


@pytest.mark.parametrize(
    "header",
    [
        f"SHA-256=:{B64}:",  # keys are lower case
        f"Sha-256=:{B64}:",
        f"sha-256=:{B64}",  # unterminated
        f"sha-256=:{B64}:,",  # trailing comma
        f"sha-256=:{B64}:, ",
        f",sha-256=:{B64}:",
        f"sha-256=:{B64}: garbage",
        f"sha-256=:{B64}:;",
        f"sha-256 = :{B64}:",
        "sha-256=:!!!!:",
        "sha-256=:ab=c:",  # padding in the middle
        "sha-256=:a:",  # not a whole byte
        f"sha-256=:{URLSAFE_B64}:",  # URL-safe alphabet
        f'sha-512="not bytes, with a comma", sha-256=:{B64}:x',
        'md5="unterminated',
        "md5=?2",
        "md5=1.2345",  # decimals have at most three fraction digits
        "md5=1234567890123456",  # integers have at most 15 digits
        "md5=(1 2",
        "md5=(1,2)",
        'md5="bad \\escape"',
        'md5="tab\tinside"',
        'md5=%"bad %XX escape"',
        "md5=:AAAA:, sha-256=é",
        "=:AAAA:",
        "sha-256=:",
        "sha-256=",
    ],
)
def test_malformed_header(header: str) -> None:
    assert invalid(header).startswith("Content-Digest is not a valid structured-field dictionary")


@pytest.mark.parametrize(
    "header",
    [
        "sha-256",  # a bare key is the boolean true
        "sha-256=?1",
        "sha-256=abc",
        'sha-256="AAAA"',
        "sha-256=42",
        f"sha-256=(:{B64}:)",
    ],
)
def test_sha256_not_a_byte_sequence(header: str) -> None:
    message = invalid(header)
    assert message == "Content-Digest sha-256 must be a byte sequence: sha-256=:<base64>:"


@pytest.mark.parametrize(
    ("raw", "length"),
    [
        (hashlib.sha1(BODY).digest(), 20),
        (hashlib.sha512(BODY).digest(), 64),
        (DIGEST[:31], 31),
        (DIGEST + b"\x00", 33),
        (b"", 0),
    ],
)
def test_sha256_of_wrong_length(raw: bytes, length: int) -> None:
    header = f"sha-256=:{base64.b64encode(raw).decode()}:"
    assert invalid(header) == f"Content-Digest sha-256 must be 32 bytes, not {length}"


def test_sha512_of_wrong_length_or_type() -> None:
    assert invalid(f"sha-512=:{B64}:") == "Content-Digest sha-512 must be 64 bytes, not 32"
    assert invalid("sha-512=42") == (
        "Content-Digest sha-512 must be a byte sequence: sha-512=:<base64>:"
    )


def test_malformed_other_member_is_refused_even_with_a_good_sha256() -> None:
    invalid(f"sha-256=:{B64}:, sha-512=:not base64!:")
