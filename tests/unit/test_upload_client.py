"""The pure parts of `ingester upload`: sizes, backoff, state keys and files, what a refused
token means, hashing while reading, the command line's checks, the tus metadata."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from ingester.auth.tokens import generate_keypair, make_token
from ingester.client.errors import UploadFailed, UsageError
from ingester.client.job import human_bytes
from ingester.client.options import (
    DEFAULT_RESUMABLE_ABOVE,
    DEFAULT_URL,
    Options,
    add_arguments,
    parse_size,
    resolve,
)
from ingester.client.resume import ResumeState, ResumeStore, cache_dir, state_key
from ingester.client.retry import RETRY_AFTER_CAP_S, Backoff
from ingester.client.source import SourceFile
from ingester.client.tokens import explain_rejection, unverified_claims

# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("16M", 16 * 1024 * 1024),
        ("16MiB", 16 * 1024 * 1024),
        ("16mb", 16 * 1024 * 1024),
        ("512k", 512 * 1024),
        ("2 GiB", 2 * 1024**3),
    ],
)
def test_sizes_are_read_in_powers_of_1024(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5M", "16 MiBs", "lots"])
def test_what_is_not_a_size_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 20 * 1024**2, 3 * 1024**3, 5 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "20.0 MiB",
        "3.0 GiB",
        "5120.0 GiB",
    ]


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_up_to_the_cap_then_gives_up() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, max_failures=6, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for delay, step in zip(delays, steps, strict=True):
        assert delay is not None
        assert step / 2 <= delay <= step
    assert backoff.next_delay() is None


def test_progress_resets_the_failures() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0, max_failures=2, rng=random.Random(1))
    assert backoff.next_delay() is not None
    assert backoff.next_delay() is not None
    backoff.progressed()
    first = backoff.next_delay()
    assert first is not None
    assert 0.5 <= first <= 1.0  # from the first step again
    assert backoff.next_delay() is not None
    assert backoff.next_delay() is None


def test_retry_after_is_honoured_up_to_a_cap() -> None:
    backoff = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(3))
    assert backoff.next_delay(retry_after=5.0) == 5.0
    assert backoff.next_delay(retry_after=3600.0) == RETRY_AFTER_CAP_S


# --- state files -----------------------------------------------------------------------------


def test_the_cache_dir_follows_xdg(tmp_path: Path) -> None:
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "artstore-ingester/uploads"
    # A relative XDG_CACHE_HOME is invalid per the spec, and ignored.
    home = Path.home() / ".cache" / "artstore-ingester" / "uploads"
    assert cache_dir({"XDG_CACHE_HOME": "relative"}) == home
    assert cache_dir({}) == home


def test_the_key_changes_with_path_size_mtime_and_target() -> None:
    base = (Path("/data/a.bin"), 10, 1_000, "http://h:8020")
    key = state_key(*base)
    assert key == state_key(*base)
    assert len(key) == 32
    variants = [
        (Path("/data/b.bin"), 10, 1_000, "http://h:8020"),
        (Path("/data/a.bin"), 11, 1_000, "http://h:8020"),
        (Path("/data/a.bin"), 10, 1_001, "http://h:8020"),
        (Path("/data/a.bin"), 10, 1_000, "http://other:8020"),
    ]
    assert len({state_key(*variant) for variant in variants} | {key}) == 5


def _state(key: str = "k" * 32) -> ResumeState:
    return ResumeState(
        key=key,
        kind="tus",
        path="/data/a.bin",
        size=10,
        mtime_ns=1,
        target="http://h",
        options="[]",
        upload_url="http://h/api/v1/uploads/x",
    )


def test_states_are_saved_loaded_and_removed(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "uploads")
    assert store.load("k" * 32) is None
    store.save(_state())
    loaded = store.load("k" * 32)
    assert loaded is not None
    assert loaded.upload_url == "http://h/api/v1/uploads/x"
    assert loaded.created_at > 0
    assert (tmp_path / "uploads").stat().st_mode & 0o777 == 0o700
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == ["k" * 32 + ".json"]
    store.remove("k" * 32)
    assert store.load("k" * 32) is None
    store.remove("k" * 32)  # gone already: no error


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"key": "x"}),
        json.dumps({**_state().__dict__, "key": "other"}),
    ],
)
def test_an_unusable_state_file_is_dropped(tmp_path: Path, content: str) -> None:
    store = ResumeStore(tmp_path)
    path = tmp_path / f"{'k' * 32}.json"
    path.write_text(content)
    assert store.load("k" * 32) is None
    assert not path.exists()


def test_an_unwritable_cache_dir_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UploadFailed, match=r"cannot keep the resume state in .*XDG_CACHE_HOME"):
        ResumeStore(blocker / "uploads").save(_state())


# --- the local file --------------------------------------------------------------------------


def test_the_hash_counts_each_byte_once_whatever_is_read_again(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with SourceFile(path) as source:
        assert source.size == len(data)
        assert source.read(0, 1000) == data[:1000]
        assert source.read(0, 2000) == data[:2000]  # a chunk sent again after a failure
        assert source.read(500, 1500) == data[500:2000]
        assert source.hashed == 2000
        source.hash_up_to(1_000_000)  # a resume at the server's offset
        assert source.read(1_000_000, 10) == data[1_000_000:1_000_010]
        assert source.sha256() == hashlib.sha256(data).hexdigest()
        source.restart_hash()
        assert source.hashed == 0
        assert source.sha256() == hashlib.sha256(data).hexdigest()
        source.check_unchanged()


def test_a_file_that_changed_or_shrank_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    with SourceFile(path) as source:
        os.utime(path, ns=(0, source.mtime_ns + 10**9))
        with pytest.raises(UploadFailed, match="changed during the upload"):
            source.check_unchanged()
        path.write_bytes(b"x" * 10)
        with pytest.raises(UploadFailed, match="shrank"):
            source.read(50, 50)
    with pytest.raises(UploadFailed, match="cannot read the file"):
        SourceFile(tmp_path / "missing")


# --- what a refused token means --------------------------------------------------------------


@pytest.fixture(scope="module")
def private_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    private, _ = generate_keypair(tmp_path_factory.mktemp("keys"))
    return private.read_bytes()


def test_claims_are_read_without_the_key(private_pem: bytes) -> None:
    token = make_token(private_pem, sub="ann", role="user", ttl=60)
    claims = unverified_claims(token)
    assert claims is not None
    assert claims["sub"] == "ann"
    assert unverified_claims("not-a-token") is None
    assert unverified_claims("a.%%%.c") is None


def test_an_expired_token(private_pem: bytes) -> None:
    token = make_token(private_pem, sub="ann", role="user", ttl=60)
    exp = unverified_claims(token)["exp"]  # type: ignore[index]
    line = explain_rejection(
        401,
        "401 UNAUTHORIZED: the token has expired",
        'Bearer realm="artstore", error="invalid_token", error_description="expired"',
        token,
        now=exp + 3 * 3600,
    )
    assert line == (
        "the server refused the token (401 UNAUTHORIZED: the token has expired): "
        "it expired 3 h ago; get a new one (dev stack: ingester token --key "
        ".dev/keys/private.pem)"
    )


def test_a_refresh_token_a_future_one_and_a_foreign_one(private_pem: bytes) -> None:
    now = time.time()
    refresh = make_token(private_pem, sub="ann", role="user", ttl=60, token_type="refresh")
    # The challenge's description is added when the answer does not say it already.
    challenge = 'Bearer error="invalid_token", error_description="no refresh tokens"'
    assert explain_rejection(401, "401 UNAUTHORIZED", challenge, refresh) == (
        "the server refused the token (401 UNAUTHORIZED (no refresh tokens)): "
        "it is a refresh token; uploads need an access token"
    )
    future = make_token(private_pem, sub="ann", role="user", ttl=600)
    nbf = unverified_claims(future)["nbf"]  # type: ignore[index]
    assert "not valid for another 5 min" in explain_rejection(
        401, "401 UNAUTHORIZED", None, future, now=nbf - 300
    )
    valid = make_token(private_pem, sub="ann", role="user", ttl=600)
    assert "signed with another key" in explain_rejection(
        401, "401 UNAUTHORIZED", None, valid, now=now
    )


def test_a_role_that_may_not_upload(private_pem: bytes) -> None:
    token = make_token(private_pem, sub="ann", role="auditor", ttl=60)
    assert explain_rejection(403, "403 FORBIDDEN: role auditor cannot upload", None, token) == (
        "the token may not upload (403 FORBIDDEN: role auditor cannot upload); its role is "
        "auditor: ask for a token with role admin, operator, super_admin or user, or the "
        "files:write scope"
    )


# --- the command line ------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_url_and_token_come_from_the_environment_when_not_given(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    options = resolve(
        _args(str(tmp_path / "f")),
        {"INGESTER_URL": "https://ingest.example/", "INGESTER_TOKEN": "Bearer abc"},
    )
    assert options.url == "https://ingest.example"
    assert options.token == "abc"
    assert options.paths == (tmp_path / "f",)
    assert options.resumable_above == DEFAULT_RESUMABLE_ABOVE
    assert options.resume
    flags = resolve(
        _args(str(tmp_path / "f"), "--url", "http://x:1", "--token", "t", "--no-resume"),
        {"INGESTER_URL": "https://ignored", "INGESTER_TOKEN": "ignored"},
    )
    assert (flags.url, flags.token, flags.resume) == ("http://x:1", "t", False)
    assert resolve(_args(str(tmp_path / "f")), {"INGESTER_TOKEN": "t"}).url == DEFAULT_URL


def test_the_fingerprint_follows_the_choices_that_shape_the_stored_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    env = {"INGESTER_TOKEN": "t"}

    def fingerprint(*argv: str) -> str:
        options: Options = resolve(_args(str(tmp_path / "f"), *argv), env)
        return options.fingerprint()

    plain = fingerprint()
    assert plain == fingerprint("--json", "--chunk-size", "1MiB")
    others = [
        fingerprint("--compress"),
        fingerprint("--retention", "permanent"),
        fingerprint("--description", "d"),
        fingerprint("--metadata", "{}"),
    ]
    assert len({plain, *others}) == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--metadata", "[]"), "--metadata must be a JSON object"),
        (("--metadata", "{"), "--metadata is not JSON"),
        (("--description", "d" * 1001), "--description is longer than 1000"),
        (("--url", "127.0.0.1:8020"), "--url must be an http(s) URL"),
        (("--token", " "), "no token"),
    ],
)
def test_command_line_mistakes(tmp_path: Path, argv: tuple[str, ...], message: str) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve(_args(str(tmp_path / "f"), *argv), {"INGESTER_TOKEN": "t"})


def test_tus_metadata_carries_the_form_fields(tmp_path: Path) -> None:
    from ingester.client.job import Job
    from ingester.client.progress import NoProgress
    from ingester.client.tus import upload_metadata

    path = tmp_path / "photo.jpg"
    path.write_bytes(b"x")
    options = resolve(
        _args(str(path), "--compress", "--description", "día", "--metadata", '{"a": 1}'),
        {"INGESTER_TOKEN": "t"},
    )
    with SourceFile(path) as source:
        job = Job(
            http=None,  # type: ignore[arg-type]
            options=options,
            source=source,
            name="photo.jpg",
            key="k",
            store=ResumeStore(tmp_path),
            progress=NoProgress(),
        )
        header = upload_metadata(job)
    pairs = dict(item.split(" ") for item in header.split(","))
    decoded = {key: base64.b64decode(value).decode() for key, value in pairs.items()}
    assert decoded == {
        "filename": "photo.jpg",
        "filetype": "image/jpeg",
        "retention_policy": "temporary",
        "compress": "true",
        "description": "día",
        "metadata": '{"a": 1}',
    }
