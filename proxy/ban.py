"""Ban expressions: a strict, documented subset of Varnish's ban language (docs/cache.md, "Ban expressions").

Sans-I/O: this module parses an expression and tests one stored object against it; when to test
and what to load is the cache's business (`BanExpression.fields` says what a test needs).
Regular expressions run on RE2, whose matching time is linear in the input, so no pattern can
stall a worker; the expression itself is bounded in length and in number of conditions.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import re2

__all__ = [
    "MAX_CONDITIONS",
    "MAX_LENGTH",
    "REGEX_MAX_MEM",
    "BanExpression",
    "BanSubject",
    "BanSyntaxError",
    "Condition",
    "parse",
]

MAX_LENGTH: Final = 4096
"""Characters in one expression: far above any hand-written ban, far below a costly parse."""
MAX_CONDITIONS: Final = 16
"""Conditions joined by && in one expression: bounds the work of testing one object."""
REGEX_MAX_MEM: Final = 1 << 20
"""RE2 memory budget of one regular expression (program and matcher); a larger pattern is refused."""

_STRING_OPERATORS: Final = ("==", "!=", "~", "!~")
_NUMBER_OPERATORS: Final = ("==", "!=", "<", "<=", ">", ">=", "~", "!~")
_OPERATORS: Final = ("==", "!=", "!~", "<=", ">=", "~", "<", ">")  # longest first: the scanner takes the first
_FIELD_CHARS: Final = frozenset(string.ascii_letters + string.digits + "._-")
_HEADER_CHARS: Final = frozenset(string.ascii_lowercase + string.digits + "_-")
_FIELDS_HELP: Final = "req.url, req.http.host, obj.status, obj.http.NAME"
_ECHO_WIDTH: Final = 72


class BanSyntaxError(ValueError):
    """A malformed expression: says where (offset, echoed text and caret) and why."""

    def __init__(self, text: str, offset: int, reason: str) -> None:
        self.text = text
        self.offset = offset
        self.reason = reason
        super().__init__(f"ban expression: at offset {offset}: {reason}\n{_caret(text, offset)}")


def _caret(text: str, offset: int) -> str:
    """The text around `offset` on one line and a caret under it (control characters shown as '?')."""
    start = max(0, min(offset - _ECHO_WIDTH // 2, len(text) - _ECHO_WIDTH))
    end = min(len(text), start + _ECHO_WIDTH)
    head = "..." if start > 0 else ""
    tail = "..." if end < len(text) else ""
    shown = "".join(c if c.isprintable() else "?" for c in text[start:end])
    return f"  {head}{shown}{tail}\n  {' ' * (len(head) + offset - start)}^"


@dataclass(frozen=True, slots=True)
class BanSubject:
    """What a ban can see of one stored object.

    url: the request target as the client sent it and the cache stored it (origin-form: path and
    query). host: the request's Host, lower-case. status: the stored response's status code.
    headers: the stored response's header fields, names lower-case, repeated fields joined by ", ".
    """

    url: str
    host: str
    status: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Condition:
    """One `field operator argument` test. Built by `parse` only, which checks the combination.

    regex: the compiled RE2 matcher (a `re2.Set` of one pattern) for ~ and !~, else None.
    """

    field: str
    operator: str
    argument: str | int
    test: Callable[[BanSubject], bool] = dataclasses.field(compare=False, repr=False)
    regex: object | None = dataclasses.field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        argument = str(self.argument) if isinstance(self.argument, int) else _quote(self.argument)
        return f"{self.field} {self.operator} {argument}"

    def _key(self) -> tuple[str, str, str]:
        return (self.field, self.operator, str(self))


@dataclass(frozen=True, slots=True)
class BanExpression:
    """Conditions that must all hold for a stored object to be banned.

    Kept in canonical order without duplicates, so equal bans compare, hash and print equal
    however they were spelled: a ban delivered twice (the platform retries and fans out) is one ban.
    """

    conditions: tuple[Condition, ...]

    @property
    def fields(self) -> frozenset[str]:
        """The fields the test reads (e.g. `obj.http.content-type`), so the cache loads only those."""
        return frozenset(c.field for c in self.conditions)

    def matches(self, subject: BanSubject) -> bool:
        for condition in self.conditions:  # a plain loop: all() over a generator costs ~1 us more
            if not condition.test(subject):
                return False
        return True

    def to_text(self) -> str:
        """The canonical text; `parse(e.to_text()) == e`."""
        return " && ".join(str(c) for c in self.conditions)

    def __str__(self) -> str:
        return self.to_text()


def _quote(value: str) -> str:
    """Double-quote `value`, escaping `"` always and a backslash only where parse would read an escape."""
    out = ['"']
    for i, c in enumerate(value):
        if c == '"':
            out.append('\\"')
        elif c == "\\" and (i + 1 == len(value) or value[i + 1] in '"\\'):
            out.append("\\\\")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def parse(text: str) -> BanExpression:
    """Parse a ban expression; raise BanSyntaxError (nothing partially accepted) when it is malformed."""
    if len(text) > MAX_LENGTH:
        reason = f"the expression is {len(text)} characters long; the limit is {MAX_LENGTH}"
        raise BanSyntaxError(text, MAX_LENGTH, reason)
    return _Parser(text).expression()


class _Parser:
    """A single left-to-right pass over the text; every error names the offset it stopped at."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, reason: str, offset: int | None = None) -> BanSyntaxError:
        return BanSyntaxError(self.text, self.pos if offset is None else offset, reason)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def found(self) -> str:
        """What stands at the current position, for an error message."""
        if self.pos >= len(self.text):
            return "the end of the expression"
        end = self.pos
        while end < len(self.text) and not self.text[end].isspace() and end - self.pos < 24:
            end += 1
        return repr(self.text[self.pos : max(end, self.pos + 1)])

    def expression(self) -> BanExpression:
        self.skip_space()
        if self.pos >= len(self.text):
            raise self.error(f'empty expression: expected a condition such as req.url ~ "^/products/" ({_FIELDS_HELP})')
        conditions: list[Condition] = []
        while True:
            if len(conditions) == MAX_CONDITIONS:
                raise self.error(f"more than {MAX_CONDITIONS} conditions; split the ban in several")
            conditions.append(self.condition())
            self.skip_space()
            if self.pos >= len(self.text):
                break
            if self.text.startswith("&&", self.pos):
                self.pos += 2
                self.skip_space()
                if self.pos >= len(self.text):
                    raise self.error("expected a condition after &&")
                continue
            if self.text.startswith("||", self.pos):
                raise self.error("|| is not supported: conditions are joined by && only; send one ban per alternative")
            raise self.error(f"expected && or the end of the expression, got {self.found()}")
        unique = {c._key(): c for c in conditions}
        return BanExpression(tuple(unique[k] for k in sorted(unique)))

    def condition(self) -> Condition:
        name = self.field_name()
        self.skip_space()
        op_at = self.pos
        operator = next((op for op in _OPERATORS if self.text.startswith(op, self.pos)), None)
        allowed = _NUMBER_OPERATORS if name == "obj.status" else _STRING_OPERATORS
        if operator is None:
            raise self.error(f"expected an operator ({', '.join(allowed)}) after {name}, got {self.found()}")
        if operator not in allowed:
            raise self.error(f"operator {operator} compares numbers: it applies to obj.status only", op_at)
        self.pos += len(operator)
        self.skip_space()
        arg_at = self.pos
        regex = operator in ("~", "!~")
        argument: str | int
        if name == "obj.status" and not regex:
            argument = self.status_code()
        else:
            argument = self.string(operator)
            if name == "req.http.host" and not regex:
                argument = argument.lower()
        matcher = _regex(argument, self, arg_at) if regex else None
        return Condition(name, operator, argument, _test(name, operator, argument, matcher), matcher)

    def field_name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _FIELD_CHARS:
            self.pos += 1
        word = self.text[start : self.pos]
        if not word:
            raise self.error(f"expected a field ({_FIELDS_HELP}), got {self.found()}")
        if word in ("req.url", "obj.status"):
            return word
        for prefix in ("obj.http.", "req.http."):
            if word.startswith(prefix):
                header = word[len(prefix) :].lower()
                if not header:
                    raise self.error(f"missing header name after {prefix}", start)
                if not set(header) <= _HEADER_CHARS:
                    raise self.error(f"header name {header!r}: only letters, digits, '-' and '_' are allowed", start)
                if prefix == "req.http." and header != "host":
                    raise self.error(
                        f"req.http.{header} is not supported: the cache keeps no request header but the host;"
                        " use req.http.host, or obj.http.NAME for a response header",
                        start,
                    )
                return prefix + header
        raise self.error(f"unknown field {word!r}; supported: {_FIELDS_HELP}", start)

    def status_code(self) -> int:
        start = self.pos
        quoted = self.pos < len(self.text) and self.text[self.pos] == '"'
        digits = self.string("==") if quoted else self.bare_word()
        if not (len(digits) == 3 and digits.isascii() and digits.isdigit() and digits[0] != "0"):
            raise self.error(f"obj.status takes a three-digit status code such as 404, got {digits!r}", start)
        return int(digits)

    def bare_word(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and not self.text[self.pos].isspace() and self.text[self.pos] != "&":
            self.pos += 1
        return self.text[start : self.pos]

    def string(self, operator: str) -> str:
        """A double-quoted string: \\" and \\\\ are escapes; any other backslash is kept, as regexes need."""
        open_at = self.pos
        if self.pos >= len(self.text):
            raise self.error(f"expected a double-quoted string after {operator}, got the end of the expression")
        first = self.text[self.pos]
        if first == "'":
            raise self.error(
                "single quotes do not delimit strings (nor do they in Varnish): use double quotes;"
                " in a shell, put the whole expression in single quotes"
            )
        if first != '"':
            word = self.bare_word() or self.text[self.pos]
            raise self.error(
                f"expected a double-quoted string after {operator}, got {word!r}"
                " (Varnish also takes bare words; here put them in double quotes)",
                open_at,
            )
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                raise self.error('unterminated string: no closing "', open_at)
            c = self.text[self.pos]
            if c == '"':
                self.pos += 1
                return "".join(out)
            if c == "\\" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] in '"\\':
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if (c < " " and c != "\t") or c == "\x7f":
                raise self.error(f"control character U+{ord(c):04X} in a string")
            if "\ud800" <= c <= "\udfff":
                raise self.error(f"U+{ord(c):04X} in a string is a lone surrogate, not text (undecodable bytes?)")
            out.append(c)
            self.pos += 1


def _regex(pattern: str | int, parser: _Parser, offset: int) -> object:
    """Compile `pattern` with RE2 into a one-pattern Set: an unanchored search, like Varnish's.

    A Set answers yes/no without building a match object: about 2.5 us a test against 20 us for
    re2's `search` (docs/cache.md, "Ban expressions"). Set.Compile refuses a pattern whose matcher would not fit
    REGEX_MAX_MEM, so the linear-time DFA never runs out of memory mid-match.
    """
    assert isinstance(pattern, str)
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True
    options.max_mem = REGEX_MAX_MEM
    try:
        re2.compile(pattern, options)  # the detailed error message; the Set below only says it failed
        matcher = re2.Set.SearchSet(options)
        matcher.Add(pattern)
        matcher.Compile()
    except re2.error as exc:
        raise parser.error(_regex_reason(exc), offset) from None
    return matcher


def _regex_reason(exc: Exception) -> str:
    raw = exc.args[0] if exc.args else ""
    detail = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if "invalid perl operator: (?=" in detail or "invalid perl operator: (?!" in detail or "(?<" in detail:
        return f"regular expression not supported: lookaround assertions are not available in RE2 ({detail})"
    if "invalid escape sequence: \\" in detail and detail[-1:].isdigit():
        return f"regular expression not supported: backreferences are not available in RE2 ({detail})"
    if "too large" in detail or "failed to compile Set" in detail:
        return f"regular expression too large: its matcher would need more than {REGEX_MAX_MEM} bytes"
    return f"invalid regular expression: {detail}"


def _test(name: str, operator: str, argument: str | int, matcher: Any) -> Callable[[BanSubject], bool]:
    """The test for one condition, built once so matching does no parsing.

    A missing response header is never equal to nor matched by anything: == and ~ are false,
    != and !~ true (each negated operator is the exact negation of its positive one).
    """
    get: Callable[[BanSubject], str | None]
    if name == "obj.status":
        if isinstance(argument, int):
            return _number_test(operator, argument)

        def get(s: BanSubject) -> str | None:
            return str(s.status)

    elif name == "req.url":

        def get(s: BanSubject) -> str | None:
            return s.url

    elif name == "req.http.host":

        def get(s: BanSubject) -> str | None:
            return s.host.lower()

    else:
        header = name.removeprefix("obj.http.")

        def get(s: BanSubject) -> str | None:
            return s.headers.get(header)

    assert isinstance(argument, str)
    if operator in ("~", "!~"):
        match = matcher.Match  # given bytes: "surrogatepass" lets no str make the encoding fail
        if operator == "~":
            return lambda s: (v := get(s)) is not None and match(v.encode("utf-8", "surrogatepass")) is not None
        return lambda s: (v := get(s)) is None or match(v.encode("utf-8", "surrogatepass")) is None
    if operator == "==":
        return lambda s: get(s) == argument
    return lambda s: get(s) != argument


def _number_test(operator: str, code: int) -> Callable[[BanSubject], bool]:
    tests: dict[str, Callable[[BanSubject], bool]] = {
        "==": lambda s: s.status == code,
        "!=": lambda s: s.status != code,
        "<": lambda s: s.status < code,
        "<=": lambda s: s.status <= code,
        ">": lambda s: s.status > code,
        ">=": lambda s: s.status >= code,
    }
    return tests[operator]
