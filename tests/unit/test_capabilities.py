"""Element capabilities: where each comes from, what an upload needs, how a compressed file is
named; the artStore-compatible form; the finalizer's copy toward an element that drops
metadata. Pure, no I/O."""

from __future__ import annotations

import itertools
import logging
from urllib.parse import unquote

import pytest

from ingester.finalize.finalizer import as_stored_on
from ingester.finalize.record import SourceFile
from ingester.http.multipart import PartStart
from ingester.settings import CompressedNames, SEMode, StorageElementConfig
from ingester.storage.capabilities import (
    Fit,
    StoredForm,
    compressed_by_metadata,
    reported_flags,
    resolve,
    stored_as,
    stored_form,
)
from ingester.storage.registry import ElementHealth, Registry, note_mode
from ingester.storage.selection import Candidate
from ingester.storage_element.form import UploadForm

CAPABILITIES = ("keeps_metadata", "accepts_empty_files", "serves_any_name")
BOTH = (False, True)


def config(**fields: object) -> StorageElementConfig:
    return StorageElementConfig.model_validate(
        {"id": "se", "api_url": "http://se:8010", "mode": "edit", **fields}
    )


def candidate(
    *, keeps: bool = False, empty: bool = False, names: CompressedNames | None = None
) -> Candidate:
    return Candidate(
        id="se",
        api_url="http://se:8010",
        mode=SEMode.EDIT,
        priority=1,
        capacity_bytes=None,
        used_bytes=None,
        available=True,
        keeps_metadata=keeps,
        accepts_empty_files=empty,
        compressed_names=names,
    )


# --- where each capability comes from -------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "reported", "expected"),
    [
        (None, None, False),  # nobody says: the safe answer
        (None, True, True),  # the element's /api/v1/info says
        (None, False, False),
        (False, True, False),  # the registry overrides the element
        (True, None, True),
        (True, False, True),
    ],
)
def test_the_registry_then_the_element_then_no(
    configured: bool | None, reported: bool | None, expected: bool
) -> None:
    flags = {} if reported is None else dict.fromkeys(CAPABILITIES, reported)
    element = config(**dict.fromkeys(CAPABILITIES, configured))
    assert resolve(element, flags) == (expected, expected, expected)


def test_only_boolean_flags_of_info_count() -> None:
    assert reported_flags({}) == {}
    assert reported_flags({"capabilities": "yes"}) == {}
    assert reported_flags(
        {"capabilities": {"keeps_metadata": "true", "accepts_empty_files": True, "x": True}}
    ) == {"accepts_empty_files": True}


def test_an_element_stores_after_a_hangup_unless_it_says_it_does_not() -> None:
    """Whether a removal that finds nothing is final (the saga's landing windows): artStore's
    element says nothing and may store an upload after its caller left; the reference
    element says it never does."""
    registry = Registry([config()])
    assert registry.stores_after_hangup("se")  # not heard from yet: the safe answer
    assert registry.stores_after_hangup("gone")  # not in the registry (a record's old copy)
    registry.health_of("se").reported_capabilities = reported_flags(
        {"capabilities": {"stores_after_hangup": False}}
    )
    assert not registry.stores_after_hangup("se")
    registry.health_of("se").reported_capabilities = reported_flags({"status": "ok"})
    assert registry.stores_after_hangup("se")  # artStore's info: no capabilities at all


def test_registry_fields_parse_and_default_to_unknown() -> None:
    assert (
        config().keeps_metadata,
        config().accepts_empty_files,
        config().serves_any_name,
    ) == (None, None, None)
    assert config(compressed_names="off").compressed_names is CompressedNames.OFF
    with pytest.raises(ValueError, match="compressed_names"):
        config(compressed_names="zip")


# --- what an upload needs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keeps", "names", "default", "expected"),
    [
        (True, None, CompressedNames.OFF, StoredForm.METADATA),
        (True, CompressedNames.OFF, CompressedNames.SUFFIX, StoredForm.METADATA),
        (False, None, CompressedNames.SUFFIX, StoredForm.SUFFIX),
        (False, None, CompressedNames.OFF, StoredForm.OFF),
        (False, CompressedNames.OFF, CompressedNames.SUFFIX, StoredForm.OFF),
        (False, CompressedNames.SUFFIX, CompressedNames.OFF, StoredForm.SUFFIX),
    ],
)
def test_stored_form(
    keeps: bool, names: CompressedNames | None, default: CompressedNames, expected: StoredForm
) -> None:
    assert stored_form(candidate(keeps=keeps, names=names), default) is expected


@pytest.mark.parametrize(
    ("empty", "compressed", "accepts_empty", "names"),
    list(
        itertools.product(
            [False, True],
            [False, True],
            [False, True],
            [CompressedNames.SUFFIX, CompressedNames.OFF],
        )
    ),
)
def test_fit_takes_an_element_only_if_it_can_store_the_file(
    empty: bool, compressed: bool, accepts_empty: bool, names: CompressedNames
) -> None:
    fit = Fit(empty=empty, compressed=compressed, default_names=CompressedNames.SUFFIX)
    element = candidate(empty=accepts_empty, names=names)
    expected = (not empty or accepts_empty) and not (compressed and names is CompressedNames.OFF)
    assert fit.takes(element) is expected


# --- names ------------------------------------------------------------------------------------


def test_a_compressed_file_is_named_for_what_it_is_only_in_suffix_form() -> None:
    def as_(algorithm: str | None, form: StoredForm) -> tuple[str, str]:
        return stored_as("app.log", "text/plain", algorithm, form, any_name=False)

    assert as_("brotli", StoredForm.SUFFIX) == ("app.log.br", "application/x-brotli")
    assert as_("gzip", StoredForm.SUFFIX) == ("app.log.gz", "application/gzip")
    assert as_("gzip", StoredForm.METADATA) == ("app.log", "text/plain")
    assert as_(None, StoredForm.SUFFIX) == ("app.log", "text/plain")


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("report.pdf", "report.pdf"),
        ("café 100%.txt", "café 100%.txt"),  # Latin-1: served as it is
        ("отчёт.pdf", "%D0%BE%D1%82%D1%87%D1%91%D1%82.pdf"),
        ("年报 50%.xlsx", "%E5%B9%B4%E6%8A%A5 50%25.xlsx"),
        ("café ✓.txt", "caf%C3%A9 %E2%9C%93.txt"),
    ],
)
def test_a_name_an_element_could_not_serve_goes_percent_encoded(name: str, sent: str) -> None:
    """artStore's downloads fail on names outside Latin-1 (500): such a name goes to it
    percent-encoded, whole and readable back; an element that serves any name gets it as
    it is, compressed or not."""
    assert stored_as(name, "text/plain", None, StoredForm.SUFFIX, any_name=False) == (
        sent,
        "text/plain",
    )
    assert unquote(sent) == name or sent == name
    assert stored_as(name, "text/plain", None, StoredForm.SUFFIX, any_name=True)[0] == name
    compressed, _ = stored_as(name, "text/plain", "gzip", StoredForm.SUFFIX, any_name=False)
    assert compressed == stored_as(name + ".gz", "", None, StoredForm.OFF, any_name=False)[0]


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("é" * 45 + ".pdf", "é" * 45 + ".pdf"),  # within: as it is
        ("é" * 46 + ".pdf", "é" * 45 + ".pdf"),
        # Four two-byte letters in eight characters: 45 of them fit.
        ("Ünïcödé " * 40 + "report.docx", "Ünïcödé " * 11 + "Ün.docx"),
        ("a" * 500 + ".txt", "a" * 500 + ".txt"),  # ASCII: artStore cuts it itself
        ("ü" * 100, "ü" * 45),  # no extension
        ("x." + "é" * 60, "x." + "é" * 45),  # an "extension" over the budget: cut as a stem
    ],
)
def test_a_latin_1_name_is_cut_where_artstore_could_not_name_its_files_after_it(
    name: str, sent: str
) -> None:
    """artStore names its files after the first 200 characters of the name (with the
    uploader's name, a time and 32 hex digits), plus `.attr.json`: in two-byte characters
    that passed the file system's 255 bytes, and every write failed. The 200 characters may
    take 45 bytes more than one per character, so a name is cut to that."""
    got = stored_as(name, "text/plain", None, StoredForm.OFF, any_name=False)[0]
    assert got == sent
    assert len(got.encode()) - len(got) <= 45
    assert stored_as(name, "text/plain", None, StoredForm.OFF, any_name=True)[0] == name


def test_our_metadata_names_the_algorithm() -> None:
    facts = {"compressed": True, "compression_algorithm": "brotli"}
    assert compressed_by_metadata({"_ingester": facts}) == "brotli"
    assert compressed_by_metadata({"_ingester": {**facts, "compressed": False}}) is None
    assert compressed_by_metadata({"_ingester": {**facts, "compression_algorithm": "xz"}}) is None
    assert compressed_by_metadata({"_ingester": "compressed"}) is None
    assert compressed_by_metadata({}) is None


def test_finalizing_a_compressed_copy_onto_an_element_that_drops_metadata_renames_it() -> None:
    source = SourceFile(
        original_filename="app.log",
        content_type="text/plain",
        checksum="0" * 64,
        file_size=10,
        metadata={"_ingester": {"compressed": True, "compression_algorithm": "gzip"}},
    )
    renamed = as_stored_on(source, candidate(keeps=False))
    assert (renamed.original_filename, renamed.content_type) == ("app.log.gz", "application/gzip")
    assert renamed.checksum == source.checksum
    assert as_stored_on(source, candidate(keeps=True)) is source
    plain = SourceFile("a.txt", "text/plain", "0" * 64, 1)
    assert as_stored_on(plain, candidate(keeps=False)) is plain


# --- the registry's view ------------------------------------------------------------------------


def test_an_element_whose_own_mode_refuses_writes_is_no_candidate() -> None:
    registry = Registry([config(id="a"), config(id="b")])
    registry.health_of("a").reported_mode = SEMode.RO
    registry.health_of("b").reported_mode = SEMode.RW
    for element_id in ("a", "b"):
        registry.health_of(element_id).ready = True
    available = {c.id: c.available for c in registry.candidates()}
    # A writable mode other than the registry's is shown, not excluded.
    assert available == {"a": False, "b": True}
    assert [e.id for e in registry.writable_ready()] == ["b"]
    a, b = registry.elements
    assert registry.report(a)["mode_mismatch"] is True
    assert registry.report(b)["mode_mismatch"] is True
    assert registry.report(a)["reported_mode"] == "ro"


def test_the_registry_capacity_wins_and_the_element_s_fills_the_gap() -> None:
    registry = Registry([config(id="a", capacity_bytes=100), config(id="b")])
    for element_id in ("a", "b"):
        registry.health_of(element_id).reported_capacity = 5000
    capacity = {c.id: c.capacity_bytes for c in registry.candidates()}
    assert capacity == {"a": 100, "b": 5000}


def test_a_mode_mismatch_is_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    element = config(id="a")
    health = ElementHealth()
    caplog.set_level(logging.INFO, logger="ingester.storage.registry")

    def seen(mode: SEMode | None) -> list[str]:
        health.reported_mode = mode
        caplog.clear()
        note_mode(element, health)
        return [r.getMessage() for r in caplog.records]

    assert seen(SEMode.EDIT) == []
    assert seen(SEMode.RO) == [
        "storage element a says its mode is ro, the registry says edit; no uploads go to it"
    ]
    assert seen(SEMode.RO) == []
    assert seen(SEMode.RW) == ["storage element a says its mode is rw, the registry says edit"]
    assert seen(SEMode.RW) == []
    assert seen(None) == []  # no answer is no news
    assert seen(SEMode.EDIT) == [
        "storage element a and the registry agree on its mode again (edit)"
    ]
    assert seen(SEMode.EDIT) == []


# --- the artStore-compatible form --------------------------------------------------------------


def test_the_artstore_form_drops_metadata_and_content_type() -> None:
    for extras, expected in ((True, "text/csv"), (False, "text/plain")):
        form = UploadForm(extras=extras)
        for name, value in (("metadata", b'{"a": 1}'), ("content_type", b"text/csv")):
            form.start_part(PartStart(name=name, filename=None, content_type=None, headers={}))
            form.add_field_data(value)
            form.end_part()
        form.start_part(
            PartStart(name="file", filename="a.csv", content_type="text/plain", headers={})
        )
        form.end_part()
        assert form.content_type() == expected
        assert form.metadata() == ({"a": 1} if extras else {})
