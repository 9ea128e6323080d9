"""The ban expression language (issue 15): parsing, matching, errors, bounds, canonical form.

proxy.ban is pure, so it is tested directly, without sockets.
"""

from __future__ import annotations

import re
import string
from random import Random

import pytest
import re2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.ban import (
    MAX_CONDITIONS,
    MAX_LENGTH,
    BanExpression,
    BanSubject,
    BanSyntaxError,
    parse,
)

PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def subject(
    url: str = "/products/shoes?size=42",
    host: str = "example.com",
    status: int = 200,
    **headers: str,
) -> BanSubject:
    return BanSubject(url, host, status, {k.replace("_", "-"): v for k, v in headers.items()})


def bans(text: str, obj: BanSubject) -> bool:
    return parse(text).matches(obj)


# --- fields and operators ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('req.url == "/products/shoes?size=42"', True),
        ('req.url == "/products/shoes"', False),  # == is the whole target, query included
        ('req.url != "/products/shoes"', True),
        ('req.url != "/products/shoes?size=42"', False),
        ('req.url ~ "shoes"', True),  # ~ searches: unanchored, like Varnish
        ('req.url ~ "^/products/"', True),
        ('req.url ~ "^/shoes"', False),
        ('req.url ~ "size=\\d+$"', True),
        ('req.url !~ "^/products/"', False),
        ('req.url !~ "^/blog/"', True),
        ('req.url ~ "(?i)^/PRODUCTS/"', True),
        ('req.url ~ "^/PRODUCTS/"', False),  # case-sensitive unless the pattern says otherwise
    ],
)
def test_req_url(text: str, expected: bool) -> None:
    assert bans(text, subject()) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('req.http.host == "example.com"', True),
        ('req.http.host == "Example.COM"', True),  # host names are case-insensitive
        ('req.http.Host == "example.com"', True),  # so are header names
        ('req.http.host != "example.com"', False),
        ('req.http.host != "example.org"', True),
        ('req.http.host ~ "(^|\\.)example\\.com$"', True),
        ('req.http.host !~ "example"', False),
    ],
)
def test_req_http_host(text: str, expected: bool) -> None:
    assert bans(text, subject(host="example.com")) is expected


def test_host_is_lower_cased_before_matching() -> None:
    assert bans('req.http.host == "example.com"', subject(host="EXAMPLE.com"))
    assert bans('req.http.host ~ "^example"', subject(host="EXAMPLE.com"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("obj.status == 404", True),
        ('obj.status == "404"', True),
        ("obj.status == 200", False),
        ("obj.status != 200", True),
        ("obj.status != 404", False),
        ("obj.status < 500", True),
        ("obj.status < 404", False),
        ("obj.status <= 404", True),
        ("obj.status > 403", True),
        ("obj.status > 404", False),
        ("obj.status >= 404", True),
        ("obj.status >= 405", False),
        ('obj.status ~ "^4"', True),  # as in Varnish, a regex sees the decimal code
        ('obj.status ~ "^5"', False),
        ('obj.status !~ "^5"', True),
    ],
)
def test_obj_status(text: str, expected: bool) -> None:
    assert bans(text, subject(status=404)) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('obj.http.content-type == "image/png"', True),
        ('obj.http.Content-Type == "image/png"', True),
        ('obj.http.CONTENT-TYPE != "image/png"', False),
        ('obj.http.content-type ~ "^image/"', True),
        ('obj.http.content-type !~ "^image/"', False),
        ('obj.http.x-tags ~ "(^|,)product-17(,|$)"', True),
        ('obj.http.x-tags ~ "(^|,)product-1(,|$)"', False),
    ],
)
def test_obj_http(text: str, expected: bool) -> None:
    assert bans(text, subject(content_type="image/png", x_tags="home,product-17,sale")) is expected


@pytest.mark.parametrize(
    ("operator", "expected"),
    [("==", False), ("!=", True), ("~", False), ("!~", True)],
)
def test_missing_header(operator: str, expected: bool) -> None:
    """An absent header equals and matches nothing; each negation is the exact opposite."""
    assert bans(f'obj.http.x-absent {operator} ""', subject()) is expected
    assert bans(f'obj.http.x-absent {operator} "a"', subject()) is expected


def test_empty_header_is_present() -> None:
    assert bans('obj.http.x-empty == ""', subject(x_empty=""))
    assert bans('obj.http.x-empty ~ ""', subject(x_empty=""))
    assert not bans('obj.http.x-empty !~ ""', subject(x_empty=""))


def test_all_conditions_must_hold() -> None:
    text = 'req.url ~ "^/products/" && req.http.host == "example.com" && obj.status == 200'
    assert bans(text, subject())
    assert not bans(text, subject(host="example.org"))
    assert not bans(text, subject(url="/blog/"))
    assert not bans(text, subject(status=301))


def test_fields_say_what_the_test_reads() -> None:
    e = parse('obj.http.Content-Type ~ "^image/" && req.url ~ "^/a" && obj.status == 200 && req.url != "/a/b"')
    assert e.fields == frozenset({"obj.http.content-type", "req.url", "obj.status"})
    assert parse('req.http.host == "a"').fields == frozenset({"req.http.host"})


# --- quoting and layout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (r'obj.http.etag == "\"v1\""', '"v1"'),
        (r'obj.http.x == "back\\slash"', "back\\slash"),
        (r'obj.http.x == "trailing\\"', "trailing\\"),
        (r'obj.http.x == "\\\""', '\\"'),
        (r'obj.http.x == "a\.b"', "a\\.b"),  # any other backslash is kept, so regexes read as in VCL
        ('obj.http.x == "tab\there"', "tab\there"),
        ('obj.http.x == "sp  aces & && || == \'"', "sp  aces & && || == '"),
        ('obj.http.x == ""', ""),
        ('obj.http.x == "caf\u00e9"', "caf\u00e9"),
        ('obj.http.x == "nb\u00a0sp\u200b"', "nb\u00a0sp\u200b"),  # only C0 controls and DEL are refused
    ],
)
def test_string_escapes(text: str, value: str) -> None:
    e = parse(text)
    assert e.conditions[0].argument == value
    assert e.matches(subject(x=value, etag=value))


def test_undecodable_bytes_in_a_stored_value_do_not_break_matching() -> None:
    assert bans('req.url ~ "^/a"', subject(url="/a\udc80"))
    assert bans('req.url !~ "b"', subject(url="/a\udc80"))


def test_backslash_in_regex_needs_no_doubling() -> None:
    assert parse(r'req.url ~ "\.jpg$"') == parse(r'req.url ~ "\\.jpg$"')
    assert bans(r'req.url ~ "\.jpg$"', subject(url="/a/b.jpg"))
    assert not bans(r'req.url ~ "\.jpg$"', subject(url="/a/bxjpg"))


@pytest.mark.parametrize(
    "text",
    [
        'req.url=="/a"&&obj.status==200',
        '  req.url  ==  "/a"  &&  obj.status  ==  200  ',
        '\treq.url\t==\t"/a"\t&&\tobj.status == "200"',
    ],
)
def test_layout_is_free(text: str) -> None:
    assert str(parse(text)) == 'obj.status == 200 && req.url == "/a"'


# --- syntax errors: where and why -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "offset", "reason"),
    [
        ("", 0, "empty expression"),
        ("   ", 3, "empty expression"),
        ('"/a" == req.url', 0, "expected a field"),
        ('req.method == "GET"', 0, "unknown field 'req.method'"),
        ('REQ.URL == "/a"', 0, "unknown field"),
        ("obj.ttl > 1h", 0, "unknown field 'obj.ttl'"),
        ('req.http.cookie == "a"', 0, "req.http.cookie is not supported"),
        ('obj.http. == "a"', 0, "missing header name"),
        ('obj.http.x.y == "a"', 0, "header name 'x.y'"),
        ("req.url", 7, "expected an operator"),
        ('req.url = "/a"', 8, "expected an operator (==, !=, ~, !~) after req.url, got '='"),
        ('req.url === "/a"', 10, "expected a double-quoted string after =="),
        ('req.url < "/a"', 8, "operator < compares numbers"),
        ('obj.http.x >= "1"', 11, "operator >= compares numbers"),
        ("req.url ==", 10, "got the end of the expression"),
        ("req.url == /a", 11, "got '/a' (Varnish also takes bare words; here put them in double quotes)"),
        ("req.url == '/a'", 11, "single quotes do not delimit strings"),
        ('req.url == "/a', 11, "unterminated string"),
        ('req.url == "/a\\"', 11, "unterminated string"),
        ('obj.http.x == "a\nb"', 16, "control character U+000A"),
        ('obj.http.x == "a\x00b"', 16, "control character U+0000"),
        ('obj.http.x == "a\x7fb"', 16, "control character U+007F"),
        ('req.url ~ "a\udc80"', 12, "U+DC80 in a string is a lone surrogate"),
        ("obj.status == 20", 14, "three-digit status code"),
        ("obj.status == 2000", 14, "three-digit status code"),
        ("obj.status == 099", 14, "three-digit status code"),
        ('obj.status == "ok"', 14, "three-digit status code"),
        ("obj.status == ", 14, "three-digit status code"),
        ('req.url == "/a" obj.status == 200', 16, "expected && or the end of the expression"),
        ('req.url == "/a" & obj.status == 200', 16, "expected && or the end"),
        ('req.url == "/a" || req.url == "/b"', 16, "|| is not supported"),
        ('req.url == "/a" &&', 18, "expected a condition after &&"),
        ('req.url == "/a" && && req.url == "/b"', 19, "expected a field"),
        ('(req.url == "/a")', 0, "expected a field"),
        ('!req.url == "/a"', 0, "expected a field"),
        ('req.url ~ "["', 10, "invalid regular expression: missing ]"),
        ('req.url ~ "a{1001}"', 10, "invalid repetition size"),
    ],
)
def test_syntax_error_says_where_and_why(text: str, offset: int, reason: str) -> None:
    with pytest.raises(BanSyntaxError) as caught:
        parse(text)
    error = caught.value
    assert error.offset == offset
    assert reason in error.reason
    assert error.text == text
    head, echo, caret = str(error).split("\n")
    assert head == f"ban expression: at offset {offset}: {error.reason}"
    assert echo == "  " + "".join(c if c.isprintable() else "?" for c in text)
    assert caret == "  " + " " * offset + "^"


def test_long_expression_is_echoed_around_the_error() -> None:
    good = " && ".join(f'req.url != "/{i:03}"' for i in range(8))
    text = f'{good} && req.url = "/x" && {good}'
    error = pytest.raises(BanSyntaxError, parse, text).value
    assert error.offset == text.index(" = ") + 1
    _, echo, caret = str(error).split("\n")
    assert echo.startswith("  ...") and echo.endswith("...") and len(echo) < 90
    assert echo[caret.index("^")] == "="


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="at offset 8"):
        parse('req.url = "/a"')


# --- RE2: what it refuses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "backreferences are not available in RE2"),
        (r"(?P<x>a)(?P=x)", "invalid regular expression"),
        (r"foo(?=bar)", "lookaround assertions are not available in RE2"),
        (r"foo(?!bar)", "lookaround assertions are not available in RE2"),
        (r"(?<=foo)bar", "lookaround assertions are not available in RE2"),
        (r"(?<!foo)bar", "lookaround assertions are not available in RE2"),
        (r"\pL{100}", "regular expression too large"),
        ("(.{1000}){1000}", "invalid repetition size"),
        (".{1000}.{1000}.{1000}", "regular expression too large"),
    ],
)
def test_re2_rejections(pattern: str, reason: str) -> None:
    text = f'obj.status == 200 && req.url ~ "{pattern}"'
    error = pytest.raises(BanSyntaxError, parse, text).value
    assert reason in error.reason
    assert error.offset == text.index('"')  # the pattern's opening quote


def test_hostile_pattern_runs_on_re2_in_linear_time() -> None:
    """(a+)+$ backtracks exponentially in Python's re; RE2 has no backtracking at all."""
    e = parse('req.url ~ "(a+)+$"')
    assert isinstance(e.conditions[0].regex, re2.Set)
    assert not e.matches(subject(url="/" + "a" * 100_000 + "!"))
    assert e.matches(subject(url="/" + "a" * 100_000))


# --- bounds -----------------------------------------------------------------------------------


def test_length_bound() -> None:
    exact = 'req.url == "' + "a" * (MAX_LENGTH - 13) + '"'
    assert len(exact) == MAX_LENGTH
    parse(exact)
    error = pytest.raises(BanSyntaxError, parse, exact + " ").value
    assert error.offset == MAX_LENGTH
    assert f"the limit is {MAX_LENGTH}" in error.reason


def test_condition_bound() -> None:
    conditions = [f'req.url != "/{i}"' for i in range(MAX_CONDITIONS + 1)]
    assert len(parse(" && ".join(conditions[:MAX_CONDITIONS])).conditions) == MAX_CONDITIONS
    text = " && ".join(conditions)
    error = pytest.raises(BanSyntaxError, parse, text).value
    assert error.offset == text.rindex("req.url")
    assert f"more than {MAX_CONDITIONS} conditions" in error.reason


# --- canonical form ---------------------------------------------------------------------------


def test_canonical_form() -> None:
    spellings = [
        'req.url ~ "^/products/" && req.http.host == "example.com"',
        'req.http.Host == "Example.com" && req.url ~ "^/products/"',
        'req.http.HOST=="EXAMPLE.COM"&&req.url~"^/products/"&&req.url ~ "^/products/"',
    ]
    expressions = [parse(t) for t in spellings]
    assert {str(e) for e in expressions} == {'req.http.host == "example.com" && req.url ~ "^/products/"'}
    assert len(set(expressions)) == 1
    assert all(parse(e.to_text()) == e for e in expressions)


def test_canonical_quoting() -> None:
    e = parse(r'obj.http.ETag == "\"v1\"" && obj.http.x ~ "\.jpg$" && obj.http.y == "a\\" && obj.status == "301"')
    canonical = r'obj.http.etag == "\"v1\"" && obj.http.x ~ "\.jpg$" && obj.http.y == "a\\" && obj.status == 301'
    assert e.to_text() == canonical
    assert parse(e.to_text()) == e
    assert parse(e.to_text()).to_text() == e.to_text()


def test_different_bans_differ() -> None:
    assert parse('req.url == "/a"') != parse('req.url != "/a"')
    assert parse('req.url ~ "a"') != parse('req.url ~ "(?i)a"')
    assert parse("obj.status == 200") != parse('obj.status ~ "200"')
    assert parse('obj.http.x == "a"') != parse('obj.http.x == "A"')  # values are case-sensitive


# --- properties -------------------------------------------------------------------------------

header_names = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=10)
values = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\n\r"), max_size=12)
regexes = st.lists(
    st.sampled_from(["a", "b", "/", ".", "^", "$", "\\.", "\\d", "[a-c]", "(a|b)", "x*", "y+", "z?", "é"]),
    max_size=6,
).map("".join)


@st.composite
def conditions(draw: st.DrawFn) -> str:
    """One condition as a user might type it: any field, operator, quoting and spacing."""
    space = draw(st.sampled_from(["", " ", "  ", "\t"]))
    kind = draw(st.sampled_from(["req.url", "req.http.host", "obj.status", "obj.http"]))
    if kind == "obj.http":
        kind = "obj.http." + draw(header_names)
    elif kind == "req.http.host":
        kind = draw(st.sampled_from(["req.http.host", "req.http.Host", "req.http.HOST"]))
    if kind == "obj.status" and draw(st.booleans()):
        operator = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
        code = str(draw(st.integers(100, 999)))
        argument = f'"{code}"' if draw(st.booleans()) else code
    else:
        operator = draw(st.sampled_from(["~", "!~"] if kind == "obj.status" else ["==", "!=", "~", "!~"]))
        value = draw(regexes if "~" in operator else values)
        argument = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{kind}{space}{operator}{space}{argument}"


expressions = st.lists(conditions(), min_size=1, max_size=6).map(" && ".join)


@PROPERTIES
@given(expressions)
def test_round_trip(text: str) -> None:
    e = parse(text)
    canonical = e.to_text()
    again = parse(canonical)
    assert again == e
    assert again.to_text() == canonical
    assert hash(again) == hash(e)


@PROPERTIES
@given(st.lists(conditions(), min_size=1, max_size=5), st.randoms())
def test_order_and_repetition_do_not_change_a_ban(parts: list[str], random: Random) -> None:
    shuffled = parts + parts[:1]
    random.shuffle(shuffled)
    assert parse(" && ".join(shuffled)) == parse(" && ".join(parts))


@PROPERTIES
@given(st.text(string.printable + "éü\x00\x7f", max_size=60))
@example('req.url ~ "')
@example('obj.http."')
@example('req.url ~ "\udcff"')
def test_any_text_parses_or_says_where(text: str) -> None:
    try:
        e = parse(text)
    except BanSyntaxError as error:
        assert 0 <= error.offset <= len(text)
        assert error.reason
    else:
        assert isinstance(e, BanExpression)
        assert parse(e.to_text()) == e


@PROPERTIES
@given(regexes, st.text("ab/.1é", max_size=12))
def test_re2_set_agrees_with_a_search(pattern: str, value: str) -> None:
    """The one-pattern RE2 Set answers exactly as an unanchored search would."""
    expected = re.search(pattern, value) is not None
    assert bans(f'obj.http.x ~ "{pattern.replace(chr(92), chr(92) * 2)}"', subject(x=value)) is expected
    assert bans(f'obj.http.x !~ "{pattern.replace(chr(92), chr(92) * 2)}"', subject(x=value)) is not expected
