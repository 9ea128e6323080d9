"""Property-based tests (hypothesis) of the header rules and of request-target
passthrough (issue 8).

The header functions are pure and tested directly with generated headers
and WSGI environs. Target passthrough is tested through a running proxy
(one per module, to stay fast): a generated target either reaches next-hop
byte for byte or is refused with 400 and forwards nothing.
"""

from __future__ import annotations

import socket
import string

import pytest
from conftest import Proxy
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from raw_origin import RawOrigin, split_responses

from proxy.headers import (
    HOP_BY_HOP,
    HeaderRules,
    connection_tokens,
    downstream_response_headers,
    upstream_request_headers,
)
from proxy.upstream import ResponseError, parse_head

PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# What Gunicorn puts in the environ: names upper-cased, "-" as "_", no "_" of their own.
NAME_CHARS = string.ascii_letters + string.digits + "-"
PLATFORM = ["Host", "X-Forwarded-For", "X-Forwarded-Proto", "True-Client-IP", "X-Request-Id"]
SPECIAL = sorted(HOP_BY_HOP | {"expect", "content-length", "content-type"}) + PLATFORM

names = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda n: n.strip("-")),
)
#: RFC 9110 field-value characters as Gunicorn hands them over (latin-1).
values = st.text(
    st.characters(codec="latin-1", exclude_categories=("Cc",)).filter(lambda c: c != "\x7f"), max_size=30
).map(lambda v: v.strip(" \t"))


def mixed_case(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True))
    )


headers = st.lists(st.tuples(names.flatmap(mixed_case), values), max_size=12)


# -- HeaderRules.apply ------------------------------------------------------------------


@PROPERTIES
@given(
    headers,
    st.frozensets(names.flatmap(mixed_case), max_size=4),
    st.lists(st.tuples(names, values), max_size=3),
    st.lists(st.tuples(names, values), max_size=3),
)
def test_rules_remove_then_set_then_append(pairs, remove, set_, append):
    rules = HeaderRules(remove=remove, set=tuple(set_), append=tuple(append))
    given_headers = list(pairs)
    out = rules.apply(given_headers)
    if not rules:
        assert out is given_headers
        return
    replaced = {n.lower() for n in remove} | {n.lower() for n, _ in set_}
    kept = [(n, v) for n, v in pairs if n.lower() not in replaced]
    assert list(out) == kept + list(set_) + list(append)
    # a removed name only comes back if the rules themselves add it
    readded = {n.lower() for n, _ in set_ + append}
    for name, _ in out:
        assert name.lower() not in {n.lower() for n in remove} - readded


# -- upstream_request_headers --------------------------------------------------------------


def environ_key(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")


@st.composite
def environs(draw):
    env: dict[str, str] = {}
    for name, value in draw(st.lists(st.tuples(names, values), max_size=12)):
        env[environ_key(name)] = value
    if draw(st.booleans()):
        tokens = draw(st.lists(st.one_of(names, st.sampled_from(["close", "keep-alive", "upgrade"])), max_size=5))
        tokens = [draw(mixed_case(t)) for t in tokens]
        env["HTTP_CONNECTION"] = draw(st.sampled_from([",", ", ", " , ", ",\t"])).join(tokens)
    if draw(st.booleans()):
        env["CONTENT_LENGTH"] = draw(st.from_regex(r"0{0,3}[0-9]{1,12}", fullmatch=True))
    if draw(st.booleans()):
        env["CONTENT_TYPE"] = draw(values)
    env["REMOTE_ADDR"] = draw(st.sampled_from(["127.0.0.1", "10.1.2.3", "2001:db8::1"]))
    env["REQUEST_METHOD"] = "GET"
    env["wsgi.input"] = object()
    return env


NEVER_CONNECTION_OPTIONS = {"host", "x-forwarded-for", "x-forwarded-proto", "true-client-ip"}


@PROPERTIES
@given(environs(), st.booleans())
@example(
    {"HTTP_CONTENT_LENGTH": "50", "CONTENT_LENGTH": "5", "REMOTE_ADDR": "127.0.0.1"},
    False,
).via("finding: a middleware's HTTP_CONTENT_LENGTH went out as a second Content-Length")
def test_upstream_request_headers(env, keep_upgrade):
    out = upstream_request_headers(env, "generated-id", keep_upgrade=keep_upgrade)
    lowered = [n.lower() for n, _ in out]
    # Content-Length and -Type describe the body this hop sends: never removed.
    options = (
        connection_tokens(env.get("HTTP_CONNECTION")) - NEVER_CONNECTION_OPTIONS - {"content-length", "content-type"}
    )
    allowed_hop = {"connection", "upgrade"} if keep_upgrade else set()
    client_id = env.get("HTTP_X_REQUEST_ID") if "x-request-id" not in options else None
    for name in lowered:
        assert name not in (HOP_BY_HOP | {"expect"}) - allowed_hop, name
        if not (name == "x-request-id" and client_id is None):  # the generated one
            assert name not in options - allowed_hop, name
    if keep_upgrade:
        assert [v for n, v in out if n.lower() == "connection"] == ["Upgrade"]
    # framing: at most one Content-Length, canonical, and only from CONTENT_LENGTH
    lengths = [v for n, v in out if n.lower() == "content-length"]
    if "CONTENT_LENGTH" in env:
        assert lengths == [str(int(env["CONTENT_LENGTH"]))]
    else:
        assert lengths == []
    types = [v for n, v in out if n.lower() == "content-type"]
    assert types == ([env["CONTENT_TYPE"]] if "CONTENT_TYPE" in env else [])
    # exactly one X-Forwarded-For, the client's chain plus the peer
    xff = [v for n, v in out if n.lower() == "x-forwarded-for"]
    chain = env.get("HTTP_X_FORWARDED_FOR")
    assert xff == [f"{chain}, {env['REMOTE_ADDR']}" if chain else env["REMOTE_ADDR"]]
    # exactly one X-Request-Id: the client's, or the generated one
    ids = [v for n, v in out if n.lower() == "x-request-id"]
    assert ids == ([client_id] if client_id is not None else ["generated-id"])
    # the platform headers survive any Connection header
    for name in ("Host", "X-Forwarded-Proto", "True-Client-IP"):
        if environ_key(name) in env:
            assert (name.lower(), env[environ_key(name)]) in [(n.lower(), v) for n, v in out]
    # exactly one Host: next-hop gets HTTP/1.1, which requires it (empty when the client sent none)
    hosts = [v for n, v in out if n.lower() == "host"]
    assert hosts == [env.get("HTTP_HOST", "")]
    # every other field passes once, unchanged, in order
    dropped = (HOP_BY_HOP | {"expect", "content-length", "content-type", "x-forwarded-for"} | options) - (
        {"upgrade"} if keep_upgrade else set()
    )
    expected = [
        (key[5:].replace("_", "-").lower(), value)
        for key, value in env.items()
        if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in dropped
    ]
    passed = [
        (n.lower(), v)
        for n, v in out
        if n.lower() not in {"content-length", "content-type", "x-forwarded-for"}
        and not (n.lower() == "x-request-id" and client_id is None)
        and not (n.lower() == "host" and "HTTP_HOST" not in env)
        and not (keep_upgrade and n.lower() == "connection")
    ]
    assert passed == expected


# -- response headers ----------------------------------------------------------------------


@PROPERTIES
@given(headers, st.one_of(st.none(), st.lists(names.flatmap(mixed_case), max_size=4).map(", ".join)))
def test_downstream_response_headers_drop_hop_by_hop_and_keep_the_rest_in_order(pairs, connection):
    out = downstream_response_headers(pairs, connection)
    drop = HOP_BY_HOP | connection_tokens(connection)
    assert out == [(n, v) for n, v in pairs if n.lower() not in drop]


framing_values = st.one_of(
    st.from_regex(r"[0-9]{1,4}", fullmatch=True),
    st.sampled_from(["5, 5", "5,5", " 5 ", "-5", "+5", "0x5", "5x", "", "5, 7", "chunked", "gzip, chunked"]),
)
latin_1 = st.characters(max_codepoint=255)
response_headers = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding", "transfer-encoding"]),
            framing_values,
        ),
        st.tuples(names.flatmap(mixed_case), values),
        st.tuples(st.text(latin_1, min_size=1, max_size=5), st.text(latin_1, max_size=5)),  # anything at all
    ),
    max_size=10,
)


def _invalid_field(name: str, value: str) -> bool:
    return (
        not name or any(c not in TOKEN_CHARS for c in name) or any(c < " " and c != "\t" or c == "\x7f" for c in value)
    )


@PROPERTIES
@given(response_headers)
@example([("Content-Length", "100"), ("Transfer-Encoding", "chunked")]).via("finding: CL with TE relayed")
@example([("Content-Length", "-5")]).via("finding: negative length relayed")
@example([("X-A", "a\rSet-Cookie: injected=1")]).via("finding: bare CR split one field in two")
def test_parse_head_never_passes_ambiguous_framing(pairs):
    """Either the head is refused (ResponseError: the client gets a 502) or
    the parsed head has one readable framing and only valid fields."""
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in pairs)
    invalid_field = any(_invalid_field(n, v) for n, v in pairs)
    try:
        head = parse_head(raw)
    except ResponseError:
        lengths = [v for n, v in pairs if n.lower() == "content-length"]
        codings = [v for n, v in pairs if n.lower() == "transfer-encoding"]
        parts = {p.strip(" \t") for v in lengths for p in v.split(",")}
        assert (
            invalid_field
            or len(parts) > 1
            or any(not (p.isascii() and p.isdigit()) for p in parts)
            or (codings and ([c.strip(" \t").lower() for v in codings for c in v.split(",")] != ["chunked"] or lengths))
        ), pairs
        return
    lengths = [v for n, v in head.headers if n.lower() == "content-length"]
    assert len(lengths) <= 1 and all(v.isdigit() and str(int(v)) == v for v in lengths)
    assert head.length == (int(lengths[0]) if lengths else None)
    codings = [
        c.strip(" \t").lower() for n, v in head.headers if n.lower() == "transfer-encoding" for c in v.split(",")
    ]
    assert head.chunked == bool(codings) and codings in ([], ["chunked"])
    assert not (head.chunked and head.length is not None)
    for name, value in head.headers:
        assert not _invalid_field(name, value), (name, value)
    if not invalid_field:  # nothing else is changed or reordered
        assert [(n, v) for n, v in head.headers if n.lower() != "content-length"] == [
            (n, v.strip(" \t")) for n, v in pairs if n.lower() != "content-length"
        ]


@PROPERTIES
@given(response_headers, st.one_of(st.none(), st.sampled_from(["close", "keep-alive", "X-A, Content-Length"])))
def test_parsed_heads_reach_the_client_without_hop_by_hop_fields(pairs, connection):
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in pairs)
    if connection is not None:
        raw += f"Connection: {connection}\r\n".encode()
    try:
        head = parse_head(raw)
    except ResponseError:
        return
    out = downstream_response_headers(head.headers, head.connection)
    assert not any(n.lower() in HOP_BY_HOP | connection_tokens(head.connection) for n, _ in out)
    assert head.keep_alive == ("close" not in connection_tokens(head.connection))


# -- request-target passthrough, through the running proxy ------------------------------


@pytest.fixture(scope="module")
def target_origin():
    origin = RawOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def target_proxy(tmp_path_factory, target_origin):
    proxy = Proxy(tmp_path_factory.mktemp("targets"), target_origin).start()
    yield proxy
    proxy.stop()


def send(port: int, target: bytes) -> tuple[int, bool]:
    """One request on a new connection: (status, connection closed after)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    [response] = split_responses(data)
    return response.status, True


UNRESERVED = string.ascii_letters + string.digits + "-._~"
SUB_DELIMS = "!$&'()*+,;="
pct_encoded = st.tuples(st.sampled_from(string.hexdigits), st.sampled_from(string.hexdigits)).map(
    lambda t: "%" + "".join(t)
)
pchar = st.one_of(st.sampled_from(UNRESERVED + SUB_DELIMS + ":@"), pct_encoded)
segment = st.lists(pchar, max_size=8).map("".join)
#: RFC 9112 origin-form: absolute-path [ "?" query ]
origin_form = st.tuples(
    st.lists(segment, min_size=1, max_size=6).map(lambda s: "/" + "/".join(s)),
    st.one_of(st.none(), st.lists(st.one_of(pchar, st.sampled_from("/?")), max_size=20).map("".join)),
).map(lambda t: t[0] + ("" if t[1] is None else "?" + t[1]))


@PROPERTIES
@given(origin_form)
@example("/a%2Fb/%7e/%7E?q=%41&r=a+b")
@example("//double//slash/")
@example("/dots/../../up/./here")
@example("/?")
def test_valid_targets_reach_next_hop_byte_for_byte(target_proxy, target_origin, target):
    target_origin.reset()
    status, _ = send(target_proxy.port, target.encode())
    assert status == 200
    [request] = target_origin.received()
    assert request.target == target.encode()


@PROPERTIES
@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(lambda t: "/" + t))
@example("/#fragment")
@example("//[::1")
@example("/a\\b")
def test_any_printable_target_is_forwarded_byte_for_byte_or_refused(target_proxy, target_origin, target):
    """Gunicorn takes any printable ASCII target (RFC 3986's stray ``"<>\\^`{|}``
    and ``#`` included): whatever it accepts goes to next-hop unchanged; what
    it refuses reaches nothing."""
    target_origin.reset()
    status, _ = send(target_proxy.port, target.encode())
    received = target_origin.received()
    if status == 400:
        assert received == []
    else:
        assert status == 200
        assert [r.target for r in received] == [target.encode()]


@PROPERTIES
@given(
    st.sampled_from(["http", "https", "HTTP"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,5}){0,2}(:[0-9]{1,5})?", fullmatch=True),
    st.one_of(st.just(""), origin_form),
)
def test_absolute_form_goes_on_as_origin_form_with_its_host(target_proxy, target_origin, scheme, authority, path):
    assume(not path.startswith("//"))
    target_origin.reset()
    status, _ = send(target_proxy.port, f"{scheme}://{authority}{path}".encode())
    assert status == 200
    [request] = target_origin.received()
    expected = path if path.startswith("/") else "/" + path
    assert request.target == expected.encode()
    assert request.all("Host") == [authority.encode()]
