"""A finished resumable upload as a multipart form: what the pipeline's parser reads back,
and fields that settle the storage plan before the file (so nothing is spooled)."""

from __future__ import annotations

import pytest

from ingester.http.multipart import (
    BodyEnd,
    Event,
    MultipartStreamParser,
    PartData,
    PartEnd,
    PartStart,
)
from ingester.http.multipart_writer import tail
from ingester.tus.form import canonical_fields, form_head
from ingester.upload.fields import parse_upload_fields
from ingester.upload.pipeline import plan_is_settled


def parse(body: bytes, boundary: str) -> list[Event]:
    parser = MultipartStreamParser(boundary.encode())
    events = parser.feed(body)
    parser.close()
    return events


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"compress": "true"},
        {"compress": "yes", "compression_algorithm": "GZIP", "retention_policy": "permanent"},
        {"storage_mode": "rw"},
        {"ttl_days": "7", "description": "notes", "metadata": '{"a": [1, "é"]}'},
    ],
)
def test_canonical_fields_mean_the_same_and_settle_the_plan(fields: dict[str, str]) -> None:
    options = parse_upload_fields(fields, max_description_length=1000)
    canonical = canonical_fields(options)
    assert plan_is_settled(canonical)
    assert parse_upload_fields(canonical, max_description_length=1000) == options
    again = parse_upload_fields(canonical, max_description_length=1000)
    assert again.metadata == options.metadata


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("plain.txt", "plain.txt"),
        ('quo"te\\back.txt', 'quo"te\\back.txt'),
        ("line\r\nbreak.txt", "linebreak.txt"),
        ("héllo wörld.txt", "héllo wörld.txt"),
        (None, None),
    ],
)
def test_the_parser_reads_back_fields_name_type_and_bytes(
    filename: str | None, expected: str | None
) -> None:
    boundary = "tusabc123"
    head = form_head(
        boundary, {"retention_policy": "temporary", "compress": "false"}, filename, "text/plain"
    )
    data = b"--tusabc12 not the boundary\r\n" * 3
    events = parse(head + data + tail(boundary), boundary)
    starts = [e for e in events if isinstance(e, PartStart)]
    assert [s.name for s in starts] == ["retention_policy", "compress", "file"]
    assert starts[-1].filename == expected
    assert starts[-1].content_type == "text/plain"
    file_index = events.index(starts[-1])
    file_data = b"".join(e.data for e in events[file_index:] if isinstance(e, PartData))
    assert file_data == data
    assert isinstance(events[-2], PartEnd)
    assert isinstance(events[-1], BodyEnd)
