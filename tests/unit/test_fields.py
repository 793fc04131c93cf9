"""Validation of the upload form's text fields: pure, no I/O."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ingester.errors import InvalidField, InvalidMetadata
from ingester.settings import SEMode
from ingester.upload.compression import DEFAULT_ALGORITHM, Algorithm
from ingester.upload.fields import (
    MAX_METADATA_BYTES,
    RetentionPolicy,
    UploadOptions,
    parse_upload_fields,
)

MAX_DESCRIPTION = 1000
TTL_MESSAGE = "ttl_days must be an integer between 1 and 365"


def parse(**fields: str) -> UploadOptions:
    return parse_upload_fields(fields, max_description_length=MAX_DESCRIPTION)


def field_error(**fields: str) -> str:
    with pytest.raises(InvalidField) as caught:
        parse(**fields)
    assert caught.value.code == "INVALID_FIELD"
    assert caught.value.status == 400
    return caught.value.message


def metadata_error(value: str) -> str:
    with pytest.raises(InvalidMetadata) as caught:
        parse(metadata=value)
    assert caught.value.code == "INVALID_METADATA"
    return caught.value.message


def nested(depth: int) -> dict[str, object]:
    """An object `depth` levels deep: nested(1) == {"v": 1}."""
    value: dict[str, object] = {"v": 1}
    for _ in range(depth - 1):
        value = {"v": value}
    return value


# --- defaults and the whole object --------------------------------------------------------------


def test_defaults() -> None:
    options = parse()
    assert options == UploadOptions(
        description=None,
        retention_policy=RetentionPolicy.TEMPORARY,
        ttl_days=30,
        compress=False,
        compression_algorithm=None,
        metadata={},
    )
    assert options.target_mode is SEMode.EDIT


def test_every_field() -> None:
    options = parse(
        description="Quarterly report",
        retention_policy="temporary",
        ttl_days="7",
        compress="true",
        compression_algorithm="gzip",
        metadata='{"project": "apollo", "tags": ["a", "b"]}',
    )
    assert options == UploadOptions(
        description="Quarterly report",
        retention_policy=RetentionPolicy.TEMPORARY,
        ttl_days=7,
        compress=True,
        compression_algorithm=Algorithm.GZIP,
        metadata={"project": "apollo", "tags": ["a", "b"]},
    )


def test_options_are_frozen() -> None:
    options = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.compress = True  # type: ignore[misc]


def test_unknown_fields_are_ignored() -> None:
    assert parse(version="3", file_id="x", colour="blue") == parse()


@pytest.mark.parametrize(
    "name",
    [
        "description",
        "retention_policy",
        "ttl_days",
        "compress",
        "compression_algorithm",
        "metadata",
        "storage_mode",
    ],
)
@pytest.mark.parametrize("blank", ["", "   ", "\t\r\n"])
def test_blank_value_counts_as_not_sent(name: str, blank: str) -> None:
    assert parse(**{name: blank}) == parse()


# --- retention policy and target mode -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "policy", "mode", "ttl"),
    [
        ("temporary", RetentionPolicy.TEMPORARY, SEMode.EDIT, 30),
        ("permanent", RetentionPolicy.PERMANENT, SEMode.RW, None),
        ("  Permanent ", RetentionPolicy.PERMANENT, SEMode.RW, None),
        ("TEMPORARY", RetentionPolicy.TEMPORARY, SEMode.EDIT, 30),
    ],
)
def test_retention_policy(
    value: str, policy: RetentionPolicy, mode: SEMode, ttl: int | None
) -> None:
    options = parse(retention_policy=value)
    assert options.retention_policy is policy
    assert options.target_mode is mode
    assert options.retention_policy.target_mode is mode
    assert options.ttl_days == ttl


@pytest.mark.parametrize("value", ["forever", "temp", "edit", "1"])
def test_invalid_retention_policy(value: str) -> None:
    message = field_error(retention_policy=value)
    assert message.startswith("retention_policy must be 'temporary' or 'permanent'")
    assert repr(value) in message


# --- deprecated storage_mode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "policy"),
    [
        ("edit", RetentionPolicy.TEMPORARY),
        ("rw", RetentionPolicy.PERMANENT),
        (" RW ", RetentionPolicy.PERMANENT),
        ("Edit", RetentionPolicy.TEMPORARY),
    ],
)
def test_storage_mode_maps_to_policy(value: str, policy: RetentionPolicy) -> None:
    assert parse(storage_mode=value).retention_policy is policy


@pytest.mark.parametrize("value", ["ro", "ar", "RO", " ar "])
def test_storage_mode_read_only_and_archive_are_refused(value: str) -> None:
    message = field_error(storage_mode=value)
    assert message == (
        f"storage_mode '{value.strip().lower()}' does not accept uploads; "
        "use retention_policy 'temporary' or 'permanent'"
    )


@pytest.mark.parametrize("value", ["archive", "readwrite", "temporary"])
def test_storage_mode_unknown(value: str) -> None:
    message = field_error(storage_mode=value)
    assert message.startswith("storage_mode must be 'edit' or 'rw'")
    assert repr(value) in message


@pytest.mark.parametrize(
    ("storage_mode", "retention_policy", "policy"),
    [
        ("edit", "temporary", RetentionPolicy.TEMPORARY),
        ("rw", "permanent", RetentionPolicy.PERMANENT),
    ],
)
def test_storage_mode_agreeing_with_policy(
    storage_mode: str, retention_policy: str, policy: RetentionPolicy
) -> None:
    options = parse(storage_mode=storage_mode, retention_policy=retention_policy)
    assert options.retention_policy is policy


@pytest.mark.parametrize(
    ("storage_mode", "retention_policy"), [("edit", "permanent"), ("rw", "temporary")]
)
def test_storage_mode_conflicting_with_policy(storage_mode: str, retention_policy: str) -> None:
    message = field_error(storage_mode=storage_mode, retention_policy=retention_policy)
    assert message == (
        f"storage_mode '{storage_mode}' conflicts with retention_policy '{retention_policy}'; "
        "send retention_policy only"
    )


def test_storage_mode_read_only_refused_even_beside_a_policy() -> None:
    assert "does not accept uploads" in field_error(storage_mode="ro", retention_policy="temporary")


# --- ttl_days -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("1", 1), ("365", 365), (" 7 ", 7), ("030", 30), ("180", 180)]
)
def test_ttl_days_valid(value: str, expected: int) -> None:
    assert parse(ttl_days=value).ttl_days == expected


@pytest.mark.parametrize(
    "value",
    ["0", "366", "-1", "+5", "1_0", "7.0", "1e2", "abc", "\u0663", "99999999999", "3 0", "0x10"],
)
def test_ttl_days_invalid(value: str) -> None:
    message = field_error(ttl_days=value)
    assert message.startswith(TTL_MESSAGE)
    assert repr(value.strip()) in message


@pytest.mark.parametrize(
    "fields",
    [
        {"retention_policy": "permanent", "ttl_days": "30"},
        {"retention_policy": "permanent", "ttl_days": "7"},
        {"storage_mode": "rw", "ttl_days": "7"},
    ],
)
def test_ttl_days_with_permanent_is_refused(fields: dict[str, str]) -> None:
    assert field_error(**fields) == "ttl_days applies only to retention_policy 'temporary'"


def test_ttl_days_range_is_checked_before_policy() -> None:
    assert field_error(retention_policy="permanent", ttl_days="0").startswith(TTL_MESSAGE)


# --- compress and compression_algorithm ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("YES", True),
        ("on", True),
        (" On ", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_compress_booleans(value: str, expected: bool) -> None:
    options = parse(compress=value)
    assert options.compress is expected
    assert options.compression_algorithm == (DEFAULT_ALGORITHM if expected else None)


@pytest.mark.parametrize("value", ["maybe", "2", "t", "y", "enabled", "truee", "-1"])
def test_compress_invalid(value: str) -> None:
    message = field_error(compress=value)
    assert message == (
        f"compress must be a boolean (true/false, 1/0, yes/no, on/off), not {value!r}"
    )


@pytest.mark.parametrize(
    ("value", "algorithm"),
    [
        ("gzip", Algorithm.GZIP),
        ("brotli", Algorithm.BROTLI),
        (" GZIP ", Algorithm.GZIP),
        ("Brotli", Algorithm.BROTLI),
    ],
)
def test_compression_algorithm_with_compress(value: str, algorithm: Algorithm) -> None:
    options = parse(compress="true", compression_algorithm=value)
    assert options.compress is True
    assert options.compression_algorithm is algorithm


def test_compress_without_algorithm_gets_the_default() -> None:
    assert parse(compress="true").compression_algorithm is Algorithm.BROTLI


@pytest.mark.parametrize("compress", [None, "false", "0"])
def test_algorithm_alone_does_not_turn_compression_on(compress: str | None) -> None:
    fields = {"compression_algorithm": "gzip"}
    if compress is not None:
        fields["compress"] = compress
    options = parse(**fields)
    assert options.compress is False
    assert options.compression_algorithm is None


@pytest.mark.parametrize("compress", ["true", "false"])
@pytest.mark.parametrize("value", ["zstd", "deflate", "br", "gzip9"])
def test_compression_algorithm_invalid_even_when_unused(compress: str, value: str) -> None:
    message = field_error(compress=compress, compression_algorithm=value)
    assert message == f"compression_algorithm must be 'gzip' or 'brotli', not {value!r}"


# --- description ----------------------------------------------------------------------------------


def test_description_is_stripped() -> None:
    assert parse(description="  hello world \n").description == "hello world"


def test_description_keeps_inner_line_breaks_and_tabs() -> None:
    text = "line one\r\nline two\tcolumn"
    assert parse(description=text).description == text


def test_description_at_the_limit() -> None:
    text = "é" * MAX_DESCRIPTION  # characters, not bytes
    assert parse(description=text).description == text


def test_description_over_the_limit() -> None:
    message = field_error(description="x" * (MAX_DESCRIPTION + 1))
    assert message == "description must be at most 1000 characters (got 1001)"


def test_description_limit_is_configurable() -> None:
    assert (
        parse_upload_fields({"description": "12345"}, max_description_length=5).description
        == "12345"
    )
    with pytest.raises(InvalidField, match="description must be at most 5 characters"):
        parse_upload_fields({"description": "123456"}, max_description_length=5)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x0b"])
def test_description_control_characters(char: str) -> None:
    message = field_error(description=f"bad{char}text")
    assert message == "description must not contain control characters"


# --- metadata -------------------------------------------------------------------------------------


def test_metadata_object() -> None:
    value = {"owner": "Zoë", "n": 3, "ok": True, "none": None, "list": [1, 2.5, "x"]}
    assert parse(metadata=json.dumps(value)).metadata == value


def test_metadata_empty_object() -> None:
    assert parse(metadata="{}").metadata == {}


def test_metadata_nesting_at_the_limit() -> None:
    value = nested(8)
    assert parse(metadata=json.dumps(value)).metadata == value


@pytest.mark.parametrize(
    "value",
    [
        json.dumps(nested(9)),
        json.dumps({"a": [[[[[[[[1]]]]]]]]}),
        '{"a": ' + "[" * 30_000 + "]" * 30_000 + "}",
    ],
    ids=["objects", "arrays", "very_deep"],
)
def test_metadata_too_deep(value: str) -> None:
    assert metadata_error(value) == "metadata must not nest deeper than 8 levels"


def test_metadata_arrays_count_as_levels() -> None:
    assert parse(metadata=json.dumps({"a": [[[[[[1]]]]]]})).metadata["a"] == [[[[[[1]]]]]]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("[1, 2]", "an array"),
        ('"text"', "a string"),
        ("42", "a number"),
        ("1.5", "a number"),
        ("true", "a boolean"),
        ("null", "null"),
    ],
)
def test_metadata_must_be_an_object(value: str, kind: str) -> None:
    assert metadata_error(value) == f"metadata must be a JSON object, not {kind}"


@pytest.mark.parametrize(
    "value",
    [
        "{",
        "{'single': 'quotes'}",
        '{"a": 1,}',
        '{"a": NaN}',
        '{"a": Infinity}',
        '{"a": -Infinity}',
        '{"a": 1e999}',
        '{"a": ' + "1" * 5000 + "}",
        '{"a": 1} trailing',
        "not json",
    ],
)
def test_metadata_invalid_json(value: str) -> None:
    assert metadata_error(value).startswith("metadata is not valid JSON: ")


def test_metadata_at_the_size_limit() -> None:
    padding = MAX_METADATA_BYTES - len('{"p":""}')
    value = json.dumps({"p": "x" * padding}, separators=(",", ":"))
    assert len(value) == MAX_METADATA_BYTES
    assert parse(metadata=value).metadata == {"p": "x" * padding}


def test_metadata_over_the_size_limit_in_bytes() -> None:
    # Characters under the limit, UTF-8 bytes over it.
    value = json.dumps({"p": "é" * (MAX_METADATA_BYTES // 2)}, ensure_ascii=False)
    assert len(value) < MAX_METADATA_BYTES < len(value.encode())
    assert metadata_error(value) == "metadata must be at most 65536 bytes of JSON"


def test_metadata_over_the_size_limit_once_serialized() -> None:
    # "1e5" arrives as 3 bytes and is stored as "100000.0".
    value = '{"n":[' + ",".join(["1e5"] * 15_000) + "]}"
    assert len(value) < MAX_METADATA_BYTES
    assert metadata_error(value) == "metadata must be at most 65536 bytes of JSON"


@pytest.mark.parametrize("value", ['{"a": "\\ud800"}', '{"\\udfff": 1}', '{"a": ["x\\ud83d"]}'])
def test_metadata_with_a_lone_surrogate_escape_is_invalid(value: str) -> None:
    """A review found these gave 500: JSON may spell them, UTF-8 cannot hold them."""
    assert metadata_error(value) == (
        "metadata must be valid Unicode text: it holds a lone surrogate escape"
    )


def test_metadata_with_an_escaped_surrogate_pair_is_fine() -> None:
    assert parse(metadata='{"a": "\\ud83d\\ude00"}').metadata == {"a": "\U0001f600"}


def test_metadata_reserved_key() -> None:
    assert metadata_error('{"_ingester": {}}') == "metadata key '_ingester' is reserved"


def test_metadata_duplicate_keys_last_wins() -> None:
    assert parse(metadata='{"a": 1, "a": 2}').metadata == {"a": 2}


# --- every error names its field ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"description": "x" * 1001}, "description"),
        ({"retention_policy": "x"}, "retention_policy"),
        ({"ttl_days": "x"}, "ttl_days"),
        ({"compress": "x"}, "compress"),
        ({"compression_algorithm": "x"}, "compression_algorithm"),
        ({"storage_mode": "x"}, "storage_mode"),
        ({"metadata": "x"}, "metadata"),
    ],
)
def test_every_error_names_its_field(fields: dict[str, str], name: str) -> None:
    with pytest.raises((InvalidField, InvalidMetadata)) as caught:
        parse(**fields)
    assert caught.value.message.startswith(name + " ")


def test_long_bad_values_are_cut_in_messages() -> None:
    message = field_error(compress="y" * 500)
    assert len(message) < 200
    assert "..." in message
