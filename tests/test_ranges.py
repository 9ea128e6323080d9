"""Range and If-Range rules (proxy/ranges.py), without sockets."""

from __future__ import annotations

import email.utils

import pytest

from proxy.ranges import MAX_RANGES, UNSATISFIABLE, ByteRange, if_range_holds, multipart_heads, parse


@pytest.mark.parametrize(
    "value,expected",
    [
        ("bytes=0-9", [(0, 9)]),
        ("bytes=90-", [(90, 99)]),
        ("bytes=-10", [(90, 99)]),
        ("bytes=-500", [(0, 99)]),  # a suffix longer than the body is the whole body
        ("bytes=95-200", [(95, 99)]),  # last-pos past the end is cut to it
        ("BYTES = 0-0 ,, 5-5", [(0, 0), (5, 5)]),  # unit case-insensitive, empty list elements
        ("bytes=50-59, 0-9", [(0, 9), (50, 59)]),  # sorted
        ("bytes=0-10, 5-20, 21-30", [(0, 30)]),  # overlapping and adjacent merged
        ("bytes=0-0, 200-300", [(0, 0)]),  # the unsatisfiable one dropped
    ],
)
def test_satisfiable(value, expected):
    assert parse(value, 100) == [ByteRange(a, b) for a, b in expected]


@pytest.mark.parametrize("value", ["bytes=100-", "bytes=200-300", "bytes=-0", "bytes=100-100, -0"])
def test_unsatisfiable(value):
    assert parse(value, 100) == UNSATISFIABLE


@pytest.mark.parametrize(
    "value",
    ["items=0-1", "bytes", "bytes=", "bytes=5-1", "bytes=a-b", "bytes=-", "bytes=0-1-2", "bytes=1 -2", "bytes=0x1-2"],
)
def test_ignored(value):
    assert parse(value, 100) is None


def test_too_many_ranges_are_ignored_and_empty_bodies_have_none():
    assert parse("bytes=" + ",".join(f"{n}-{n}" for n in range(0, 2 * MAX_RANGES, 2)), 100) is not None
    assert parse("bytes=" + ",".join(f"{n}-{n}" for n in range(0, 2 * MAX_RANGES + 2, 2)), 100) is None
    assert parse("bytes=0-0", 0) is None


def test_content_range_and_parts():
    assert ByteRange(5, 9).content_range(100) == "bytes 5-9/100"
    heads = multipart_heads([ByteRange(0, 1), ByteRange(5, 6)], 10, "text/plain", "B")
    assert heads == [
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n",
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 5-6/10\r\n\r\n",
        b"\r\n--B--\r\n",
    ]


def test_if_range():
    modified = email.utils.formatdate(1_000_000, usegmt=True)
    later = email.utils.formatdate(1_000_100, usegmt=True)
    assert if_range_holds(None, None, None, None)
    assert if_range_holds('"v1"', '"v1"', None, None)
    assert not if_range_holds('"v2"', '"v1"', None, None)
    assert not if_range_holds('W/"v1"', 'W/"v1"', None, None)  # weak tags never match (strong comparison)
    assert not if_range_holds('"v1"', 'W/"v1"', None, None)
    assert if_range_holds(modified, None, modified, later)
    assert not if_range_holds(later, None, modified, later)  # a date must match exactly
    assert not if_range_holds(modified, None, modified, modified)  # Last-Modified not strong (Date too close)
    assert not if_range_holds(modified, '"v1"', None, later)
    assert not if_range_holds("garbage", '"v1"', modified, later)
