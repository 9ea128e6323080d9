"""Byte ranges (RFC 9110 section 14) and ``If-Range`` (section 13.1.5), pure.

The cache answers ``Range`` from a complete stored entry; what a range
request may ask (how many ranges, which forms) and when ``If-Range`` lets
it through are decided here, without I/O, so they are tested without
sockets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from .cache_policy import http_date

__all__ = ["MAX_RANGES", "UNSATISFIABLE", "ByteRange", "if_range_holds", "multipart_heads", "parse"]

#: More range-specs than this in one request: the field is ignored (a 200
#: with the whole body), as nginx does; many tiny ranges are a known way to
#: make a server do much work for little.
MAX_RANGES: Final = 16
#: ``parse``'s answer when no range is satisfiable (a 416).
UNSATISFIABLE: Final = "unsatisfiable"

_SPEC = re.compile(r"(\d{1,18})?-(\d{1,18})?")


@dataclass(frozen=True, slots=True)
class ByteRange:
    first: int
    last: int  #: inclusive, as in ``Content-Range``

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, total: int) -> str:
        return f"bytes {self.first}-{self.last}/{total}"


def parse(value: str, length: int) -> list[ByteRange] | Literal["unsatisfiable"] | None:
    """The ranges of a ``Range`` value for a representation of ``length``
    bytes, sorted with overlapping and adjacent ones merged (section 14.1.1
    allows it); ``UNSATISFIABLE`` when none is (a 416); None when the field
    is to be ignored: another unit, malformed, more than ``MAX_RANGES``
    ranges, or an empty representation (section 14.2: a server may ignore it)."""
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes" or length <= 0:
        return None
    found: list[ByteRange] = []
    specs = [s.strip(" \t") for s in spec.split(",")]
    specs = [s for s in specs if s]  # empty list elements are allowed (RFC 9110 section 5.6.1)
    if not specs or len(specs) > MAX_RANGES:
        return None
    for item in specs:
        match = _SPEC.fullmatch(item)
        if match is None:
            return None
        first, last = match.group(1), match.group(2)
        if first is None:
            if last is None:
                return None
            suffix = int(last)
            if suffix > 0:  # a suffix range is satisfiable when it is not empty
                found.append(ByteRange(max(0, length - suffix), length - 1))
            continue
        start = int(first)
        if last is not None and int(last) < start:
            return None  # invalid: the whole field is
        if start < length:
            found.append(ByteRange(start, length - 1 if last is None else min(int(last), length - 1)))
    if not found:
        return UNSATISFIABLE
    found.sort(key=lambda r: r.first)
    merged = [found[0]]
    for r in found[1:]:
        top = merged[-1]
        if r.first <= top.last + 1:
            merged[-1] = ByteRange(top.first, max(top.last, r.last))
        else:
            merged.append(r)
    return merged


def if_range_holds(value: str | None, etag: str | None, last_modified: str | None, date: str | None) -> bool:
    """Whether ``If-Range`` lets the ranges through (section 13.1.5): an
    entity-tag must match the stored one by strong comparison (weak tags
    never do); a date must equal ``Last-Modified`` exactly, and only a strong
    one counts (the response's ``Date`` at least a second later, section
    8.8.2.2). Absent: it holds."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return etag is not None and not value.startswith("W/") and value == etag.strip() and etag.startswith('"')
    when = http_date(value)
    modified = http_date(last_modified)
    sent = http_date(date)
    if when is None or modified is None or sent is None:
        return False
    return sent - modified >= 1 and when == modified


def multipart_heads(ranges: list[ByteRange], total: int, content_type: str | None, boundary: str) -> list[bytes]:
    """The delimiter and part header before each range's bytes, then the
    closing delimiter (RFC 9110 section 14.6): a ``multipart/byteranges`` body
    is these interleaved with the ranges."""
    kind = f"Content-Type: {content_type}\r\n" if content_type else ""
    heads = [
        f"\r\n--{boundary}\r\n{kind}Content-Range: {r.content_range(total)}\r\n\r\n".encode("latin-1", "replace")
        for r in ranges
    ]
    heads.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return heads
