"""Compression decisions, magic numbers and the streaming compressors: pure, no I/O."""

from __future__ import annotations

import gzip
import io
import random
import zipfile
import zlib
from collections.abc import Iterator, Sequence

import brotli
import pytest

from ingester.upload.compression import (
    ALREADY_COMPRESSED_TYPES,
    DEFAULT_ALGORITHM,
    MAGIC_SIGNATURES,
    SAMPLE_BYTES,
    Algorithm,
    CompressionDecision,
    Compressor,
    decide_compression,
    detect_compressed_format,
    is_compressed_extension,
    is_compressed_type,
    make_compressor,
    make_decompressor,
    sniff_first_chunk,
    trial_ratio,
)

MIN_SIZE = 4096
WHOLE = [10**9]
WORDS = [
    "storage",
    "element",
    "upload",
    "ingest",
    "trio",
    "stream",
    "chunk",
    "brotli",
    "gzip",
    "digest",
    "checksum",
    "retention",
    "temporary",
    "permanent",
    "policy",
    "metadata",
    "capacity",
    "priority",
    "failover",
    "spool",
    "saga",
    "lease",
]


def text_bytes(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.choice(WORDS).encode() + b" "
        if rng.random() < 0.05:
            out += f"{rng.randrange(10**6)}\n".encode()
    return bytes(out[:size])


def random_bytes(size: int, seed: int = 2) -> bytes:
    return random.Random(seed).randbytes(size)


def pieces(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """`data` cut into pieces of the given sizes in turn (0 gives an empty piece)."""
    pos = 0
    index = 0
    while pos < len(data):
        size = sizes[index % len(sizes)]
        index += 1
        yield data[pos : pos + size]
        pos += size
    yield b""


def compress_all(compressor: Compressor, data: bytes, sizes: Sequence[int]) -> bytes:
    return b"".join(compressor.compress(piece) for piece in pieces(data, sizes)) + (
        compressor.flush()
    )


def requested(algorithm: Algorithm = Algorithm.GZIP) -> CompressionDecision:
    return CompressionDecision(True, algorithm, "requested")


def sniff(
    chunk: bytes,
    decision: CompressionDecision | None = None,
    *,
    is_last: bool = False,
    min_size: int = MIN_SIZE,
    min_gain: float = 0.95,
) -> CompressionDecision:
    return sniff_first_chunk(
        chunk,
        decision if decision is not None else requested(),
        is_last=is_last,
        min_size=min_size,
        min_gain=min_gain,
        gzip_level=6,
        brotli_quality=4,
    )


def decide(
    *,
    requested: bool = True,
    algorithm: Algorithm | None = None,
    declared_size: int | None = None,
    content_type: str | None = None,
    filename: str | None = None,
    min_size: int = MIN_SIZE,
) -> CompressionDecision:
    return decide_compression(
        requested=requested,
        algorithm=algorithm,
        declared_size=declared_size,
        content_type=content_type,
        filename=filename,
        min_size=min_size,
    )


DATASETS = {
    "empty": b"",
    "one_byte": b"x",
    "text_300k": text_bytes(300_000),
    "random_200k": random_bytes(200_000),
    "exactly_64k": text_bytes(65536, seed=3),
}
CHUNKINGS = {
    "whole": WHOLE,
    "zero_and_one": [0, 1],
    "odd": [1, 7, 0, 4093, 65535, 65536, 65537],
    "one_mib": [1 << 20],
}


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("data", DATASETS.values(), ids=DATASETS.keys())
def test_gzip_round_trip_with_stdlib(data: bytes, chunking: list[int]) -> None:
    compressed = compress_all(
        make_compressor(Algorithm.GZIP, gzip_level=6, brotli_quality=4), data, chunking
    )
    assert compressed[:3] == b"\x1f\x8b\x08"
    assert gzip.decompress(compressed) == data


@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("data", DATASETS.values(), ids=DATASETS.keys())
def test_brotli_round_trip_with_library(data: bytes, chunking: list[int]) -> None:
    compressed = compress_all(
        make_compressor(Algorithm.BROTLI, gzip_level=6, brotli_quality=4), data, chunking
    )
    assert brotli.decompress(compressed) == data


@pytest.mark.parametrize("algorithm", list(Algorithm))
@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_own_decompressor_round_trip(algorithm: Algorithm, chunking: list[int]) -> None:
    data = DATASETS["text_300k"] + DATASETS["random_200k"]
    compressed = compress_all(
        make_compressor(algorithm, gzip_level=6, brotli_quality=4), data, [65537]
    )
    decompressor = make_decompressor(algorithm)
    out = b"".join(decompressor.decompress(piece) for piece in pieces(compressed, chunking))
    assert out + decompressor.flush() == data


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_compression_shrinks_text(algorithm: Algorithm) -> None:
    data = DATASETS["text_300k"]
    compressed = compress_all(make_compressor(algorithm, gzip_level=6, brotli_quality=4), data, [1])
    assert len(compressed) < len(data) // 3


def test_gzip_level_is_applied() -> None:
    data = DATASETS["text_300k"]
    fast = compress_all(
        make_compressor(Algorithm.GZIP, gzip_level=1, brotli_quality=4), data, WHOLE
    )
    best = compress_all(
        make_compressor(Algorithm.GZIP, gzip_level=9, brotli_quality=4), data, WHOLE
    )
    assert len(best) < len(fast)


def test_brotli_quality_is_applied() -> None:
    data = DATASETS["text_300k"]
    low = compress_all(
        make_compressor(Algorithm.BROTLI, gzip_level=6, brotli_quality=0), data, WHOLE
    )
    high = compress_all(
        make_compressor(Algorithm.BROTLI, gzip_level=6, brotli_quality=9), data, WHOLE
    )
    assert len(high) < len(low)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_compressor_is_finished_after_flush(algorithm: Algorithm) -> None:
    compressor = make_compressor(algorithm, gzip_level=6, brotli_quality=4)
    compressor.compress(b"abc")
    compressor.flush()
    with pytest.raises(ValueError, match="already flushed"):
        compressor.compress(b"more")
    with pytest.raises(ValueError, match="already flushed"):
        compressor.flush()


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_empty_input_gives_no_output_before_flush(algorithm: Algorithm) -> None:
    compressor = make_compressor(algorithm, gzip_level=6, brotli_quality=4)
    assert compressor.compress(b"") == b""


@pytest.mark.parametrize(
    ("algorithm", "gzip_level", "brotli_quality"),
    [
        (Algorithm.GZIP, 10, 4),
        (Algorithm.GZIP, -1, 4),
        (Algorithm.BROTLI, 6, 12),
        (Algorithm.BROTLI, 6, -1),
    ],
)
def test_invalid_levels_are_refused(
    algorithm: Algorithm, gzip_level: int, brotli_quality: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        make_compressor(algorithm, gzip_level=gzip_level, brotli_quality=brotli_quality)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_decompressor_refuses_truncated_stream(algorithm: Algorithm) -> None:
    compressed = compress_all(
        make_compressor(algorithm, gzip_level=6, brotli_quality=4), DATASETS["text_300k"], WHOLE
    )
    decompressor = make_decompressor(algorithm)
    decompressor.decompress(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="truncated"):
        decompressor.flush()


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_decompressor_refuses_corrupt_stream(algorithm: Algorithm) -> None:
    garbage = b"\xff" * 64
    if algorithm is Algorithm.GZIP:
        garbage = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + garbage
    with pytest.raises(ValueError, match="corrupt"):
        make_decompressor(algorithm).decompress(garbage)


def test_gzip_decompressor_reads_concatenated_members() -> None:
    stream = gzip.compress(b"first ") + gzip.compress(b"second")
    decompressor = make_decompressor(Algorithm.GZIP)
    out = b"".join(decompressor.decompress(piece) for piece in pieces(stream, [3]))
    assert out + decompressor.flush() == b"first second"


def test_gzip_decompressor_refuses_empty_stream() -> None:
    with pytest.raises(ValueError, match="empty"):
        make_decompressor(Algorithm.GZIP).flush()


def test_brotli_decompressor_refuses_data_after_the_end() -> None:
    decompressor = make_decompressor(Algorithm.BROTLI)
    decompressor.decompress(brotli.compress(b"done"))
    with pytest.raises(ValueError, match="after the end"):
        decompressor.decompress(b"extra")


# --- decide_compression --------------------------------------------------------------------


def test_not_requested() -> None:
    decision = decide(requested=False, algorithm=Algorithm.GZIP, declared_size=10**9)
    assert decision == CompressionDecision(False, None, "not_requested")


def test_requested_uses_default_algorithm() -> None:
    assert decide() == CompressionDecision(True, DEFAULT_ALGORITHM, "requested")
    assert DEFAULT_ALGORITHM is Algorithm.BROTLI


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_requested_keeps_explicit_algorithm(algorithm: Algorithm) -> None:
    assert decide(algorithm=algorithm) == CompressionDecision(True, algorithm, "requested")


@pytest.mark.parametrize(
    ("declared_size", "min_size", "compress"),
    [
        (MIN_SIZE - 1, MIN_SIZE, False),
        (MIN_SIZE, MIN_SIZE, True),
        (None, MIN_SIZE, True),
        (0, 0, False),
        (1, 0, True),
        (0, MIN_SIZE, False),
    ],
)
def test_declared_size_against_min_size(
    declared_size: int | None, min_size: int, compress: bool
) -> None:
    decision = decide(declared_size=declared_size, min_size=min_size)
    assert decision.compress is compress
    assert decision.reason == ("requested" if compress else "below_min_size")
    assert (decision.algorithm is None) is not compress


def test_not_requested_wins_over_everything() -> None:
    decision = decide(requested=False, declared_size=1, content_type="image/jpeg")
    assert decision.reason == "not_requested"


def test_size_is_checked_before_type() -> None:
    decision = decide(declared_size=1, content_type="image/jpeg")
    assert decision.reason == "below_min_size"


@pytest.mark.parametrize(
    "content_type",
    [
        "image/jpeg",
        "IMAGE/JPEG",
        "image/png; charset=binary",
        " image/webp ",
        "video/mp4",
        "video/x-matroska",
        "video/anything-at-all",
        "audio/mpeg",
        "application/zip",
        "application/gzip",
        "application/x-7z-compressed",
        "application/vnd.rar",
        "application/x-xz",
        "application/x-bzip2",
        "application/zstd",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/epub+zip",
        "application/vnd.example.bundle+zip",
        "image/avif",
        "image/heic",
        "font/woff2",
    ],
)
def test_already_compressed_type(content_type: str) -> None:
    assert is_compressed_type(content_type)
    decision = decide(content_type=content_type, filename="data.bin")
    assert decision == CompressionDecision(False, None, "already_compressed_type")


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/json",
        "application/octet-stream",
        "application/pdf",
        "audio/wav",
        "image/bmp",
        "image/tiff",
        "image/svg+xml",
        "text/csv; charset=utf-8",
        "application/zipper",
    ],
)
def test_compressible_type(content_type: str | None) -> None:
    assert not is_compressed_type(content_type)
    assert decide(content_type=content_type).reason == "requested"


@pytest.mark.parametrize(
    "filename",
    [
        "photo.jpg",
        "PHOTO.JPEG",
        "backup.tar.gz",
        "archive.7z",
        "a.zst",
        "movie.mkv",
        "song.mp3",
        "report.docx",
        "sheet.xlsx",
        "slides.pptx",
        "book.epub",
        "lib.whl",
    ],
)
def test_already_compressed_extension(filename: str) -> None:
    assert is_compressed_extension(filename)
    decision = decide(content_type="application/octet-stream", filename=filename)
    assert decision.reason == "already_compressed_type"


@pytest.mark.parametrize(
    "filename", [None, "", "notes.txt", "data.csv", "gz", "archive.gz.txt", "script.ts", "x."]
)
def test_compressible_extension(filename: str | None) -> None:
    assert not is_compressed_extension(filename)
    assert decide(content_type="text/plain", filename=filename).reason == "requested"


def test_type_set_holds_wildcard_families_only_as_declared() -> None:
    assert "video/*" in ALREADY_COMPRESSED_TYPES
    assert "audio/*" not in ALREADY_COMPRESSED_TYPES
    assert "application/pdf" not in ALREADY_COMPRESSED_TYPES


# --- magic numbers ----------------------------------------------------------------------------


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.txt", text_bytes(10_000))
    return buffer.getvalue()


MAGIC_SAMPLES = {
    "gzip": gzip.compress(text_bytes(10_000)),
    "zip": _zip_bytes(),
    "zip-empty": b"PK\x05\x06" + b"\x00" * 18,
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "gif89a": b"GIF89a\x01\x00\x01\x00",
    "7z": b"7z\xbc\xaf\x27\x1c\x00\x04",
    "xz": b"\xfd7zXZ\x00\x00\x04",
    "bzip2": b"BZh91AY&SY",
    "zstd": b"\x28\xb5\x2f\xfd\x04\x58",
    "rar": b"Rar!\x1a\x07\x01\x00",
    "webp": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
    "isobmff": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00",
    "matroska": b"\x1a\x45\xdf\xa3\x01\x00",
    "ogg": b"OggS\x00\x02",
    "flac": b"fLaC\x00\x00\x00\x22",
    "mp3-id3": b"ID3\x04\x00\x00\x00\x00\x00\x00",
    "woff2": b"wOF2\x00\x01\x00\x00",
    "lz4": b"\x04\x22\x4d\x18\x64\x40",
}


@pytest.mark.parametrize(("name", "sample"), MAGIC_SAMPLES.items(), ids=MAGIC_SAMPLES.keys())
def test_magic_numbers_are_detected(name: str, sample: bytes) -> None:
    assert detect_compressed_format(sample) == name
    padded = sample + text_bytes(100_000)
    decision = sniff(padded, requested(Algorithm.BROTLI))
    assert decision == CompressionDecision(False, None, "already_compressed_content")


def test_every_signature_has_a_sample() -> None:
    names = {signature.name for signature in MAGIC_SIGNATURES}
    assert set(MAGIC_SAMPLES) <= names


@pytest.mark.parametrize(
    "sample",
    [
        b"",
        b"\x1f",
        b"PK",
        b"ID3 tags are metadata in mp3 files",
        b"BZh is not bzip2 without a digit",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"%PDF-1.7\n",
        b"<?xml version='1.0'?>",
        b"\x00\x00\x00\x20ftxp",
    ],
)
def test_not_a_compressed_format(sample: bytes) -> None:
    assert detect_compressed_format(sample) is None


# --- sniff_first_chunk ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decision",
    [
        CompressionDecision(False, None, "not_requested"),
        CompressionDecision(False, None, "below_min_size"),
        CompressionDecision(False, None, "already_compressed_type"),
    ],
)
def test_sniff_keeps_a_no(decision: CompressionDecision) -> None:
    assert sniff(text_bytes(100_000), decision) is decision
    assert sniff(b"", decision, is_last=True) is decision


def test_sniff_confirms_compressible_text() -> None:
    decision = requested(Algorithm.GZIP)
    assert sniff(text_bytes(1 << 20), decision) is decision


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_sniff_refuses_random_data(algorithm: Algorithm) -> None:
    decision = sniff(random_bytes(1 << 20), requested(algorithm))
    assert decision == CompressionDecision(False, None, "no_gain")


@pytest.mark.parametrize(
    ("size", "is_last", "reason"),
    [
        (MIN_SIZE - 1, True, "below_min_size"),
        (MIN_SIZE, True, "requested"),
        (MIN_SIZE - 1, False, "requested"),
        (0, True, "below_min_size"),
    ],
)
def test_sniff_whole_file_below_min_size(size: int, is_last: bool, reason: str) -> None:
    assert sniff(text_bytes(size), is_last=is_last).reason == reason


def test_sniff_empty_file_is_below_min_size_even_with_no_minimum() -> None:
    assert sniff(b"", is_last=True, min_size=0).reason == "below_min_size"


def test_sniff_size_is_checked_before_content() -> None:
    assert sniff(gzip.compress(b"x"), is_last=True).reason == "below_min_size"


def test_sniff_samples_only_the_start() -> None:
    text_then_noise = text_bytes(SAMPLE_BYTES) + random_bytes(1 << 20)
    noise_then_text = random_bytes(SAMPLE_BYTES) + text_bytes(1 << 20)
    assert sniff(text_then_noise).reason == "requested"
    assert sniff(noise_then_text).reason == "no_gain"


def test_sniff_min_gain_boundary_is_inclusive() -> None:
    # Half text, half noise: a ratio well inside (0, 1) to put the threshold on.
    sample = text_bytes(SAMPLE_BYTES // 2) + random_bytes(SAMPLE_BYTES // 2)
    ratio = trial_ratio(sample, Algorithm.GZIP, gzip_level=6, brotli_quality=4)
    assert 0.3 < ratio < 0.9
    assert sniff(sample, min_gain=ratio).reason == "requested"
    assert sniff(sample, min_gain=ratio * 0.999).reason == "no_gain"


def test_sniff_uses_the_decisions_algorithm_and_settings() -> None:
    sample = text_bytes(SAMPLE_BYTES)
    gzip_ratio = trial_ratio(sample, Algorithm.GZIP, gzip_level=6, brotli_quality=4)
    brotli_ratio = trial_ratio(sample, Algorithm.BROTLI, gzip_level=6, brotli_quality=4)
    assert gzip_ratio != brotli_ratio
    threshold = (gzip_ratio + brotli_ratio) / 2
    better = Algorithm.GZIP if gzip_ratio < brotli_ratio else Algorithm.BROTLI
    worse = Algorithm.BROTLI if better is Algorithm.GZIP else Algorithm.GZIP
    assert sniff(sample, requested(better), min_gain=threshold).reason == "requested"
    assert sniff(sample, requested(worse), min_gain=threshold).reason == "no_gain"


def test_trial_ratio_of_empty_sample_is_one() -> None:
    assert trial_ratio(b"", Algorithm.BROTLI, gzip_level=6, brotli_quality=4) == 1.0


def test_trial_ratio_matches_real_compression() -> None:
    sample = text_bytes(SAMPLE_BYTES)
    expected = len(zlib.compress(sample, 6)) / len(sample)
    # gzip framing (18 bytes) versus zlib framing (6 bytes) over 64 KiB.
    assert trial_ratio(sample, Algorithm.GZIP, gzip_level=6, brotli_quality=4) == pytest.approx(
        expected, abs=0.001
    )
