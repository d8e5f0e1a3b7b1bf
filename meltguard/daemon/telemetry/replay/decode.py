"""Bytes of a trace file to text: UTF-8 (with or without BOM) and UTF-16 with a BOM (what a
PowerShell `>` redirect writes) are read; binary data and other encodings are refused with the
line and byte where they start, never guessed (a latin-1 guess could turn a digit into a letter)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from meltguard.daemon.telemetry.replay.errors import FORMATS_READ, ReplayFormatError, refuse

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8 with BOM"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16 BE"),
)
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data: decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive: unpack it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data: decompress it first (unzstd)"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x89PNG", "a PNG image"),
)


@dataclass(frozen=True, slots=True)
class DecodedText:
    text: str
    encoding: str  # how it was read, for the trace summary


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_trace(data: bytes, origin: str) -> DecodedText:
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            try:
                return DecodedText(data.decode(codec), label)
            except UnicodeDecodeError as exc:
                raise refuse(origin, _line_of(data, exc.start),
                             f"not valid {label}: bad bytes {data[exc.start:exc.end]!r} at byte "
                             f"{exc.start}") from None
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise refuse(origin, 1, f"binary file, not a text trace: this is {what}; formats "
                                    f"read: {FORMATS_READ}")
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        head = data[:512]
        # Text in UTF-16 has a NUL in every other byte; without a BOM its byte order is a guess.
        if max(head[1::2].count(0), head[0::2].count(0)) > len(head) // 4:
            hint = ("it looks like UTF-16 without a byte-order mark; convert it with "
                    "iconv -f UTF-16LE -t UTF-8")
        else:
            hint = f"formats read: {FORMATS_READ}"
        raise refuse(origin, _line_of(data, nul),
                     f"binary data (a NUL byte at byte {nul}), not a text trace; {hint}")
    try:
        return DecodedText(data.decode("utf-8"), "UTF-8")
    except UnicodeDecodeError as exc:
        line = _line_of(data, exc.start)
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        seen = data[line_start:exc.start].decode("utf-8", "replace")[-40:]
        raise refuse(origin, line,
                     f"not UTF-8: byte {data[exc.start]:#04x} at column "
                     f"{exc.start - line_start + 1}"
                     f" after {seen!r} (a latin-1 or Windows code page file?); convert it with "
                     "iconv -f LATIN1 -t UTF-8") from None


def read_trace_bytes(path: str, origin: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ReplayFormatError(
            f"{origin}:0: cannot read replay trace: {exc.strerror or exc}"
        ) from None
