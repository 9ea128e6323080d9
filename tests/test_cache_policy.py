"""RFC 9111 rules of the cache (proxy.cache_policy and proxy.cache_config), without sockets."""

from __future__ import annotations

import email.utils
import math

import pytest

from proxy import cache_policy as policy
from proxy.cache_config import TABLE, CacheConfig
from proxy.config import ConfigError, load

NOW = 1_800_000_000.0


def date(offset: float) -> str:
    return email.utils.formatdate(NOW + offset, usegmt=True)


def test_directives_parse_quoted_values_and_case():
    assert policy.directives('Max-Age=60, no-cache="Set-Cookie, X", private') == {
        "max-age": "60",
        "no-cache": "Set-Cookie, X",
        "private": None,
    }
    assert policy.directives("max-age=1, max-age=99") == {"max-age": "1"}


@pytest.mark.parametrize(
    "headers,lifetime",
    [
        ([("Cache-Control", "max-age=60, s-maxage=10")], 10.0),
        ([("Cache-Control", "max-age=60"), ("Expires", date(500)), ("Date", date(0))], 60.0),
        ([("Expires", date(500)), ("Date", date(0))], 500.0),
        ([("Expires", "0"), ("Date", date(0))], 0.0),
        ([("Cache-Control", "max-age=oops")], None),
        ([("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "max-age=5")], 5.0),
        ([("ETag", '"x"')], None),
    ],
)
def test_freshness_lifetime(headers, lifetime):
    assert policy.freshness_lifetime(policy.response_control(headers), headers) == lifetime


def test_cdn_cache_control_replaces_cache_control():
    headers = [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60")]
    assert policy.not_storable("GET", 200, headers, policy.RequestControl(), False) is None
    headers = [("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "no-store")]
    assert policy.not_storable("GET", 200, headers, policy.RequestControl(), False) == "no-store"


@pytest.mark.parametrize(
    "method,status,headers,request_cc,auth,reason",
    [
        ("GET", 200, [("Cache-Control", "max-age=60")], None, False, None),
        ("HEAD", 200, [("Cache-Control", "max-age=60")], None, False, "method"),
        ("GET", 206, [("Cache-Control", "max-age=60")], None, False, "status"),
        ("GET", 502, [("Cache-Control", "max-age=60")], None, False, "status"),
        ("GET", 200, [("Cache-Control", "max-age=60")], "no-store", False, "request-no-store"),
        ("GET", 200, [("Cache-Control", "max-age=60")], None, True, "authorization"),
        ("GET", 200, [("Cache-Control", "max-age=60, public")], None, True, None),
        ("GET", 200, [("Cache-Control", "s-maxage=60")], None, True, None),
        ("GET", 200, [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=1")], None, False, "set-cookie"),
        ("GET", 200, [("Cache-Control", "max-age=60"), ("Vary", "Accept, *")], None, False, "vary"),
        ("GET", 200, [("Cache-Control", "private, max-age=60")], None, False, "private"),
        ("GET", 200, [("Last-Modified", date(-9000))], None, False, "no-freshness"),
    ],
)
def test_not_storable(method, status, headers, request_cc, auth, reason):
    assert policy.not_storable(method, status, headers, policy.request_control(request_cc), auth) == reason


def test_age_includes_next_hop_age_and_response_delay():
    headers = [("Age", "30"), ("Date", date(-5))]
    assert policy.initial_age(headers, NOW - 2, NOW) == 32.0  # 30 + 2 s delay beats 5 s apparent
    assert policy.initial_age([("Date", date(-50))], NOW, NOW) == 50.0
    stored = policy.Stored.make(200, "OK", [("Cache-Control", "max-age=100"), ("Age", "30")], NOW, NOW)
    assert stored.age(NOW + 10) == 40.0 and stored.ttl(NOW + 10) == 60.0
    sent = dict(policy.sent_headers(stored, NOW + 10, 5, False))
    assert sent["Age"] == "40" and sent["Content-Length"] == "5"


def stored(cc: str, age: str = "0") -> policy.Stored:
    return policy.Stored.make(200, "OK", [("Cache-Control", cc), ("Age", age), ("ETag", '"a"')], NOW, NOW)


@pytest.mark.parametrize(
    "cc,age,request_cc,verdict",
    [
        ("max-age=60", "0", None, "fresh"),
        ("max-age=60", "70", None, "validate"),
        ("max-age=60", "70", "max-stale", "stale-ok"),
        ("max-age=60", "70", "max-stale=5", "validate"),
        ("max-age=60, must-revalidate", "70", "max-stale", "validate"),
        ("s-maxage=60", "70", "max-stale", "validate"),
        ("max-age=60", "30", "max-age=10", "validate"),
        ("max-age=60", "30", "min-fresh=40", "validate"),
        ("max-age=60", "0", "no-cache", "validate"),
        ("max-age=60, no-cache", "0", None, "validate"),
    ],
)
def test_usable(cc, age, request_cc, verdict):
    assert policy.usable(stored(cc, age), policy.request_control(request_cc), NOW) == verdict


def test_request_control_max_stale_without_value_is_unbounded():
    assert policy.request_control("max-stale").max_stale == math.inf
    assert policy.request_control("only-if-cached").only_if_cached


def test_refresh_after_304_replaces_fields_but_not_length_or_encoding():
    entry = policy.Stored.make(
        200,
        "OK",
        [("Cache-Control", "max-age=0"), ("ETag", '"a"'), ("Content-Encoding", "gzip"), ("X-Old", "1")],
        NOW,
        NOW,
    )
    fresh = entry.refreshed(
        [("Cache-Control", "max-age=90"), ("Content-Encoding", "br"), ("Content-Length", "0")], NOW + 5, NOW + 5
    )
    assert fresh.header("cache-control") == "max-age=90"
    assert fresh.header("content-encoding") == "gzip"
    assert fresh.header("x-old") == "1" and fresh.header("content-length") is None
    assert fresh.lifetime == 90.0 and fresh.ttl(NOW + 5) == 90.0


def test_client_conditionals():
    entry = policy.Stored.make(200, "OK", [("ETag", 'W/"a"'), ("Last-Modified", date(-100))], NOW, NOW)
    assert policy.not_modified(entry, '"b", "a"', None)
    assert not policy.not_modified(entry, '"b"', date(0))  # If-None-Match wins over If-Modified-Since
    assert policy.not_modified(entry, None, date(0))
    assert not policy.not_modified(entry, None, date(-200))
    headers = dict(policy.sent_headers(entry, NOW, 10, True))
    assert "Content-Length" not in headers and headers["ETag"] == 'W/"a"'


def test_vary_normalisation_and_bounds():
    def request(values):
        return lambda name: values.get(name)

    names = policy.vary_names([("Vary", "Accept-Encoding, accept-language"), ("Vary", "Origin")])
    assert names == ("accept-encoding", "accept-language", "origin")
    a = policy.variant(names, request({"accept-encoding": "gzip,  br", "origin": "x"}))
    b = policy.variant(names, request({"accept-encoding": "gzip, br ", "origin": "x"}))
    c = policy.variant(names, request({"accept-encoding": "gzip, br", "origin": "x", "accept-language": ""}))
    assert a == b != c  # an absent field differs from an empty one
    assert policy.vary_names([("Vary", ", ".join(f"X-{n}" for n in range(20)))]) is None
    assert policy.variant(("x",), request({"x": "v" * 5000})) is None


def test_stored_metadata_round_trips():
    entry = stored("max-age=60")
    assert policy.Stored.from_json(entry.to_json()) == entry


def test_hop_by_hop_and_recomputed_fields_are_not_stored():
    kept = policy.stored_headers(
        [("Connection", "x"), ("Keep-Alive", "1"), ("Age", "3"), ("Cache-Status", "up; hit"), ("X-A", "1")]
    )
    assert kept == (("X-A", "1"),)


def test_cache_status_members():
    assert policy.cache_status(hit=True, ttl=12.4) == "edge-proxy; hit; ttl=12"
    assert (
        policy.cache_status(fwd="stale", fwd_status=304, stored=True) == "edge-proxy; fwd=stale; fwd-status=304; stored"
    )


def test_unsafe_methods():
    assert [
        m for m in ("GET", "HEAD", "OPTIONS", "TRACE", "POST", "PUT", "DELETE", "PATCH", "PURGE") if policy.is_unsafe(m)
    ] == [
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "PURGE",
    ]


@pytest.fixture
def parse(tmp_path):
    def parse(text: str) -> CacheConfig:
        (tmp_path / "proxy.toml").write_text(text)
        return load(tmp_path).cache

    return parse


def test_cache_table_defaults_and_values(parse):
    assert parse("") == TABLE.defaults() == CacheConfig(False, 1 << 30, 64 << 20, 16, (), 5.0, 0)
    config = parse('[cache]\nenabled = true\nmax_size = 2097152\nmax_object_size = 1024\nbypass_paths = ["/api"]\n')
    assert config == CacheConfig(True, 2097152, 1024, 16, ("/api",), 5.0, 0)


def test_cache_table_problems_name_key_line_and_reason(parse):
    with pytest.raises(ConfigError) as caught:
        parse("[cache]\nenabled = 1\nmax_size = 2097152\nmax_object_size = 4194304\n")
    text = str(caught.value)
    assert "proxy.toml:2: cache.enabled: must be true or false, got 1" in text
    assert "proxy.toml:4: cache.max_object_size: must not exceed max_size (2097152)" in text
