"""Client file names made safe to show and to store: pure, no I/O."""

from __future__ import annotations

import re
import unicodedata

import pytest

from ingester.upload.filenames import sanitize_filename, storage_filename

FILE_ID = "3f2b8c1e-9d4a-4e7b-8a6f-0c1d2e3f4a5b"
SAFE_STORAGE_RE = re.compile(r"[A-Za-z0-9._-]+")

ATTACKS = [
    "../../etc/passwd",
    "..\\..\\win.ini",
    "/etc/shadow",
    "C:\\Windows\\System32\\cmd.exe",
    "\\\\server\\share\\x.txt",
    "a\x00b.txt",
    "evil\r\nContent-Type: text/html.txt",
    "invoice\u202egpj.exe",
    "..",
    ".",
    "....",
    " . . ",
    "dir/",
    "\x00",
    "\x7f\x85\x9f",
    "\u2028\u2029",
    "\ud800broken.txt",
    "x" * 1000,
    "ж" * 300 + ".txt",
]


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


# --- path components ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\win.ini", "win.ini"),
        ("C:\\Users\\me\\Documents\\report.pdf", "report.pdf"),
        ("/abs/path/x.txt", "x.txt"),
        ("mixed/sep\\arators/name.csv", "name.csv"),
        ("dir/", "upload"),
        ("dir\\..", "upload"),
        ("a/b/../..", "upload"),
        # Percent-escapes are text, never decoded into separators.
        ("..%2F..%2Fetc%2Fpasswd", "%2F..%2Fetc%2Fpasswd"),
        ("..%5cwin.ini", "%5cwin.ini"),
    ],
)
def test_only_the_last_path_component_is_kept(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


# --- control, bidi and other invisible characters -----------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\x00b.txt", "ab.txt"),
        ("evil\r\nSet-Cookie: x.txt", "evilSet-Cookie: x.txt"),
        ("tab\there.txt", "tabhere.txt"),
        ("del\x7f.txt", "del.txt"),
        ("c1\x85\x9b.txt", "c1.txt"),
        ("bell\x07\x1b[31m.txt", "bell[31m.txt"),
        ("line\u2028sep\u2029.txt", "linesep.txt"),
        ("\x00", "upload"),
    ],
)
def test_control_characters_are_removed(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("invoice\u202egpj.exe", "invoicegpj.exe"),
        ("\u202dleft\u202c.txt", "left.txt"),
        ("\u202aembed\u202b.txt", "embed.txt"),
        ("iso\u2066late\u2067d\u2068\u2069.txt", "isolated.txt"),
        ("mark\u200e\u200f\u061c.txt", "mark.txt"),
        ("\u202e", "upload"),
    ],
)
def test_bidi_controls_are_removed(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "\u05e9\u05dc\u05d5\u05dd.txt",  # Hebrew: displays right to left without any control
        "\u0645\u0631\u062d\u0628\u0627.pdf",  # Arabic
        "\U0001f468\u200d\U0001f469\u200d\U0001f467.png",  # emoji family joined by ZWJ
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.doc",  # Persian with ZWNJ
        "日本語のファイル名.txt",
        'what? "quoted" <tag> | pipe * star : colon.txt',
    ],
)
def test_legitimate_names_are_kept(raw: str) -> None:
    assert sanitize_filename(raw) == raw


def test_lone_surrogates_are_removed() -> None:
    assert sanitize_filename("\ud800na\udfffme.txt") == "name.txt"


# --- dots, spaces and fallbacks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "upload"),
        ("", "upload"),
        (".", "upload"),
        ("..", "upload"),
        ("...", "upload"),
        ("......", "upload"),
        ("   ", "upload"),
        (" . . ", "upload"),
        ("\u3000.\u00a0", "upload"),
        ("...hidden.txt", "hidden.txt"),
        ("name.txt...", "name.txt"),
        ("  spaced.txt  ", "spaced.txt"),
        (". leading dot and space.txt", "leading dot and space.txt"),
        ("trailing. . .", "trailing"),
        # A name that was only an extension keeps it as the type.
        (".pdf", "upload.pdf"),
        (".bashrc", "upload.bashrc"),
        ("...tar", "upload.tar"),
        (".a-very-long-dotfile-name", "a-very-long-dotfile-name"),
        (".config.json", "config.json"),
        ("README", "README"),
    ],
)
def test_dots_and_spaces(raw: str | None, expected: str) -> None:
    assert sanitize_filename(raw) == expected


# --- Unicode normalization ----------------------------------------------------------------------


def test_nfc_normalization() -> None:
    decomposed = "Cafe\u0301 re\u0301sume\u0301.txt"
    assert sanitize_filename(decomposed) == "Caf\u00e9 r\u00e9sum\u00e9.txt"


def test_normalization_after_removal() -> None:
    # The NUL kept "e" and its accent apart; once removed they compose.
    assert sanitize_filename("e\x00\u0301.txt") == "\u00e9.txt"


# --- length in UTF-8 bytes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("char", "width"),
    [("a", 1), ("ж", 2), ("語", 3), ("\U0001f600", 4)],
)
def test_truncation_keeps_extension_and_whole_characters(char: str, width: int) -> None:
    result = sanitize_filename(char * 300 + ".txt")
    assert result.endswith(".txt")
    assert utf8_len(result) <= 255
    stem = result[: -len(".txt")]
    assert set(stem) == {char}
    assert len(stem) == (255 - 4) // width


def test_truncation_to_a_custom_length() -> None:
    result = sanitize_filename("ж" * 300 + ".tar.gz", max_length=16)
    assert result == "ж" * 6 + ".gz"


def test_extension_of_sixteen_characters_is_kept() -> None:
    extension = "." + "e" * 16
    result = sanitize_filename("s" * 300 + extension)
    assert result == "s" * (255 - 17) + extension


def test_extension_of_seventeen_characters_is_not_an_extension() -> None:
    result = sanitize_filename("s" * 300 + "." + "e" * 17)
    assert result == "s" * 255


def test_extension_counted_in_characters_but_cut_in_bytes() -> None:
    extension = "." + "語" * 16  # 49 bytes
    result = sanitize_filename("s" * 300 + extension)
    assert result.endswith(extension)
    assert utf8_len(result) == 255


def test_extension_wider_than_the_limit_is_dropped() -> None:
    # ".語語語語語語" is 19 bytes: with max_length 16 no stem character fits beside it.
    result = sanitize_filename("name." + "語" * 6, max_length=16)
    assert result == "name." + "語" * 3
    assert utf8_len(result) == 14


def test_truncation_does_not_split_combining_marks() -> None:
    # "q" + COMBINING ACUTE has no precomposed form: 3 bytes that belong together.
    pair = "q\u0301"
    result = sanitize_filename(pair * 100, max_length=100)
    assert utf8_len(result) <= 100
    assert result == pair * 33


def test_truncation_exposing_a_trailing_dot_strips_it() -> None:
    raw = "a" * 10 + "." + "b" * 300  # the "extension" is too long to be one
    assert sanitize_filename(raw, max_length=11) == "a" * 10


def test_truncation_exposing_trailing_spaces_before_extension_strips_them() -> None:
    raw = "a" * 10 + " " * 300 + "z.txt"
    assert sanitize_filename(raw, max_length=20) == "a" * 10 + ".txt"


def test_short_names_are_not_touched() -> None:
    raw = "ж" * 100 + ".txt"  # 204 bytes
    assert sanitize_filename(raw) == raw


# --- properties over attacks ----------------------------------------------------------------------


@pytest.mark.parametrize("raw", ATTACKS)
def test_attack_results_are_safe(raw: str) -> None:
    result = sanitize_filename(raw)
    assert result
    assert utf8_len(result) <= 255
    assert "/" not in result
    assert "\\" not in result
    assert result not in (".", "..")
    assert not result.startswith((".", " "))
    assert not result.endswith((".", " "))
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in result)
    assert "\u202e" not in result
    assert unicodedata.is_normalized("NFC", result)


@pytest.mark.parametrize("raw", ATTACKS)
def test_sanitizing_is_idempotent(raw: str) -> None:
    once = sanitize_filename(raw)
    assert sanitize_filename(once) == once


# --- storage_filename ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        ("report.pdf", f"report_{FILE_ID}.pdf"),
        ("README", f"README_{FILE_ID}"),
        ("my photo (1).JPG", f"my_photo_1_{FILE_ID}.JPG"),
        ("backup.tar.gz", f"backup.tar_{FILE_ID}.gz"),
        ("фото.jpg", f"{FILE_ID}.jpg"),
        ("отчёт 2024.pdf", f"2024_{FILE_ID}.pdf"),
        ("a.фото", f"a_{FILE_ID}"),
        (".env", f"{FILE_ID}.env"),
        ("-rf.txt", f"rf_{FILE_ID}.txt"),
        ("...", FILE_ID),
        ("", FILE_ID),
        ("../../etc/passwd", f"passwd_{FILE_ID}"),
        ("a\x00b;rm -rf.sh", f"a_b_rm_-rf_{FILE_ID}.sh"),
        ("name.t$x", f"name_{FILE_ID}.t_x"),
    ],
)
def test_storage_filename(original: str, expected: str) -> None:
    assert storage_filename(original, FILE_ID) == expected


@pytest.mark.parametrize("original", [*ATTACKS[:-1], "a" * 300 + ".txt", "語" * 200 + ".語語"])
def test_storage_filename_is_ascii_safe_and_bounded(original: str) -> None:
    result = storage_filename(sanitize_filename(original), FILE_ID)
    assert SAFE_STORAGE_RE.fullmatch(result)
    assert len(result.encode()) <= 255
    assert FILE_ID in result
    assert not result.startswith((".", "-"))


def test_storage_filename_long_stem_is_cut_to_255() -> None:
    result = storage_filename("a" * 300 + ".txt", FILE_ID)
    assert len(result) == 255
    assert result == "a" * (255 - len(FILE_ID) - 5) + f"_{FILE_ID}.txt"


def test_storage_filename_is_unique_per_file_id() -> None:
    first = storage_filename("same.txt", FILE_ID)
    second = storage_filename("same.txt", "0" * 8 + FILE_ID[8:])
    assert first != second


@pytest.mark.parametrize("file_id", ["", "///", "..."])
def test_storage_filename_needs_a_usable_file_id(file_id: str) -> None:
    with pytest.raises(ValueError, match="file_id"):
        storage_filename("x.txt", file_id)


def test_storage_filename_makes_the_file_id_safe_too() -> None:
    assert storage_filename("x.txt", "../id") == "x_id.txt"
