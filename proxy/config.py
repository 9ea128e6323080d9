"""The user's configuration: ``proxy.toml`` in the configuration directory.

``SCHEMA`` declares every key once (``proxy.setting``): parsing, validation,
defaults, the TOML names and docs/configuration.md all come from it. Each
TOML table is one frozen dataclass, its fields named as its keys
(``[upstream] connect_timeout`` is ``config.upstream.connect_timeout``).
Parsed and validated once into a frozen ``ProxyConfig``; the request path
only reads that object. Validation collects every problem (file, key, line
where it can be found, reason) instead of stopping at the first, so that a
push with three typos is fixed in one round trip.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cache_config
from .cache_config import CacheConfig
from .headers import HOP_BY_HOP, HeaderRules
from .setting import Boolean, Bytes, Invalid, Kind, OneOf, Problems, Seconds, Setting, Strings, Table

__all__ = [
    "CONFIG_FILE",
    "HEALTHZ_PATH",
    "SCHEMA",
    "AccessControl",
    "ConfigError",
    "ErrorPage",
    "HttpsRedirect",
    "MiddlewareCheck",
    "Network",
    "Problem",
    "ProxyConfig",
    "Tunnel",
    "Upstream",
    "active",
    "defaults",
    "load",
]

CONFIG_FILE = "proxy.toml"
HEALTHZ_PATH = "/.well-known/section-io/aee-hc/healthz"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_TABLE_HEADER = re.compile(r"\s*\[([^\[\]]+)\]\s*(?:#.*)?$")
_MIDDLEWARE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):([A-Za-z_][A-Za-z0-9_]*)")
#: Framing headers belong to the proxy; a rule changing them could desync
#: the connection (request smuggling), so rules may not touch them.
_PROTECTED_HEADERS = HOP_BY_HOP | {"content-length"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- the typed configuration: one frozen dataclass per table -------------------------


@dataclass(frozen=True)
class Upstream:
    connect_timeout: float
    read_timeout: float
    #: ``None`` means no limit.
    max_body_bytes: int | None


@dataclass(frozen=True)
class HttpsRedirect:
    enabled: bool
    #: 301 or 308.
    status: int
    exempt_paths: tuple[str, ...]


@dataclass(frozen=True)
class AccessControl:
    allow: tuple[Network, ...]
    deny: tuple[Network, ...]


@dataclass(frozen=True)
class Tunnel:
    #: Seconds a WebSocket/Upgrade tunnel may carry no byte either way.
    idle_timeout: float


@dataclass(frozen=True)
class ErrorPage:
    body: bytes
    content_type: str


@dataclass(frozen=True)
class ProxyConfig:
    upstream: Upstream
    request_headers: HeaderRules
    response_headers: HeaderRules
    https_redirect: HttpsRedirect
    access_control: AccessControl
    error_pages: dict[int, ErrorPage]
    #: ``(path of the module file, factory name)``.
    middleware: tuple[Path, str] | None
    tunnel: Tunnel
    cache: CacheConfig


#: The configuration the Gunicorn master validated last; workers inherit it
#: through fork, so every worker of one generation runs the same one.
active: ProxyConfig | None = None


# -- problems ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: Path
    key: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


#: Checks that a middleware module imports and has its factory: given the
#: module's path and the factory's name, returns a reason or None.
MiddlewareCheck = Callable[[Path, str], "str | None"]


class _Checker:
    """Walks the parsed TOML, recording a Problem for each bad value."""

    def __init__(self, path: Path, text: str, config_dir: Path, check_middleware: MiddlewareCheck | None) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.config_dir = config_dir
        self.check_middleware = check_middleware
        self.problems: list[Problem] = []

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(Problem(self.path, key, self.line_of(key), reason))

    def line_of(self, key: str) -> int | None:
        """Best-effort line of a dotted key: find its table, then the key;
        failing that, the line of the nearest enclosing key or table."""
        parts = key.split(".")
        while parts:
            line = self._line_of(parts)
            if line is not None:
                return line
            parts = parts[:-1]
        return None

    def _line_of(self, parts: list[str]) -> int | None:
        table = ".".join(parts[:-1])
        name = parts[-1]
        current = ""
        pattern = re.compile(rf"""\s*("{re.escape(name)}"|'{re.escape(name)}'|{re.escape(name)})\s*=""")
        for number, line in enumerate(self.lines, 1):
            header = _TABLE_HEADER.match(line)
            if header:
                current = ".".join(p.strip().strip("\"'") for p in header.group(1).split("."))
                if current == ".".join(parts):
                    return number
            elif current == table and pattern.match(line):
                return number
        return None

    def known(self, value: object, key: str, known: list[str]) -> dict[str, Any]:
        """``value`` as a table holding only ``known`` keys (a problem for each other)."""
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        for name in value.keys() - set(known):
            self.problem(f"{key}.{name}" if key else name, f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def value(self, data: dict[str, Any], key: str, setting: Setting[Any]) -> Any:
        if setting.name not in data:
            return setting.default
        try:
            return setting.kind.from_toml(data[setting.name], self, key)
        except Invalid as exc:
            self.problem(key, exc.reason)
            return setting.default


# -- kinds of the compound values ------------------------------------------------------------


def _header_name(problems: Problems, where: str, name: str) -> bool:
    if not _TOKEN.fullmatch(name):
        problems.problem(where, f"{name!r} is not a valid header name")
        return False
    if name.lower() in _PROTECTED_HEADERS:
        problems.problem(where, f"{name} is managed by the proxy (connection framing) and cannot be changed")
        return False
    return True


class _HeaderNames(Kind[frozenset[str]]):
    text = "list of header names"

    def from_toml(self, value: object, problems: Problems, key: str) -> frozenset[str]:
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise Invalid("must be a list of header names")
        return frozenset(n.lower() for n in value if _header_name(problems, key, n))


class _HeaderFields(Kind[tuple[tuple[str, str], ...]]):
    text = 'table `"Header-Name" = "value"`'

    def from_toml(self, value: object, problems: Problems, key: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise Invalid('must be a table of "Header-Name" = "value"')
        out = []
        for name, field in value.items():
            where = f"{key}.{name}"
            if _header_name(problems, where, name):
                if not isinstance(field, str) or not _FIELD_VALUE.fullmatch(field):
                    problems.problem(where, "value must be a string without control characters")
                else:
                    out.append((name, field))
        return tuple(out)


class _Networks(Kind[tuple[Network, ...]]):
    text = "list of strings: addresses or CIDR ranges, IPv4 or IPv6"

    def from_toml(self, value: object, problems: Problems, key: str) -> tuple[Network, ...]:
        if not isinstance(value, list):
            raise Invalid("must be a list of addresses or CIDR ranges")
        out = []
        for item in value:
            try:
                if not isinstance(item, str):
                    raise TypeError(item)
                out.append(ipaddress.ip_network(item.strip(), strict=False))
            except (TypeError, ValueError):
                problems.problem(key, f"{item!r} is not an IPv4/IPv6 address or CIDR range (as a string)")
        return tuple(out)


_PAGE_STATUSES = ["502", "503", "504"]


class _ErrorPages(Kind[dict[int, ErrorPage]]):
    text = "table: `502`, `503`, `504` = a file path relative to the configuration directory"

    def from_toml(self, value: object, problems: Problems, key: str) -> dict[int, ErrorPage]:
        check = _checker(problems)
        pages = {}
        for code, name in check.known(value, key, _PAGE_STATUSES).items():
            if code not in _PAGE_STATUSES:
                continue
            where = f"{key}.{code}"
            if not isinstance(name, str) or not name:
                check.problem(where, "must be a file name relative to the configuration directory")
                continue
            page = (check.config_dir / name).resolve()
            if not page.is_relative_to(check.config_dir.resolve()):
                check.problem(where, f"{name!r} is outside the configuration directory")
                continue
            try:
                body = page.read_bytes()
            except OSError as exc:
                check.problem(where, f"cannot read {name!r}: {exc.strerror}")
                continue
            kind = "text/html; charset=utf-8" if page.suffix in (".html", ".htm") else "text/plain; charset=utf-8"
            pages[int(code)] = ErrorPage(body, kind)
        return pages


class _Middleware(Kind["tuple[Path, str] | None"]):
    text = 'string `"module:factory"`'

    def from_toml(self, value: object, problems: Problems, key: str) -> tuple[Path, str] | None:
        check = _checker(problems)
        match = _MIDDLEWARE.fullmatch(value) if isinstance(value, str) else None
        if not match:
            raise Invalid(f'must be "module:factory", got {value!r}')
        module = check.config_dir / f"{match.group(1)}.py"
        if not module.is_file():
            raise Invalid(f"module file {module.name} not found in the configuration directory")
        reason = check.check_middleware(module, match.group(2)) if check.check_middleware else None
        if reason:
            check.problem(key, reason)
        return module, match.group(2)


def _checker(problems: Problems) -> _Checker:
    """Kinds that read files need the configuration directory the checker holds."""
    assert isinstance(problems, _Checker)
    return problems


# -- the declarations -------------------------------------------------------------------------

_HEADER_RULES = (
    Setting("remove", _HeaderNames(), frozenset(), "Every field with one of these names is dropped."),
    Setting(
        "set",
        _HeaderFields(),
        (),
        "Every existing field with that name is dropped, then this one is added: the header ends up with "
        "exactly this value.",
        default_text="`{}`",
    ),
    Setting(
        "append",
        _HeaderFields(),
        (),
        "This field is added after any existing ones with the same name (for list-valued headers such as "
        "`Vary`, `Via`, `Set-Cookie`).",
        default_text="`{}`",
    ),
)

SCHEMA: tuple[Table | Setting[Any], ...] = (
    Table(
        "upstream",
        Upstream,
        (
            Setting(
                "connect_timeout",
                Seconds(0.001, 3600),
                5.0,
                "Longest wait to open a TCP connection to next-hop; beyond it the client gets **504**. The same "
                "limit applies while the proxy is sending the request (head and body) to next-hop: a next-hop "
                "that accepts no request-body bytes for this long fails the request with **502**.",
                summary="upstream connect",
            ),
            Setting(
                "read_timeout",
                Seconds(0.001, 86400),
                60.0,
                "Longest silence from next-hop once the request is sent: waiting for the response head (**504** "
                "beyond it), and between two pieces of the response body (the transfer to the client is then "
                "cut, since its head is already sent).",
                summary="upstream read (between bytes)",
            ),
            Setting(
                "max_body_bytes",
                Bytes(),
                None,
                "Largest request body accepted. A request whose `Content-Length` is larger is answered **413** "
                "at once, before any of its body is read, and nothing goes to next-hop. A chunked body is "
                "streamed to next-hop until it passes the limit; the proxy then abandons that upstream request "
                "(next-hop sees an incomplete request on a connection that is closed) and answers 413.",
                default_text="no limit",
            ),
        ),
        doc="How the proxy talks to next-hop, and how much it accepts from clients.",
        after="""\
A 413 closes the connection (`Connection: close`): the rest of the body is
never read as a request. So that a client still busy sending its body reads
the 413 rather than a "connection reset" (RFC 9112 section 9.6), the proxy
half-closes the connection after the 413 and discards whatever still
arrives until the client closes, for at most ${linger_seconds} seconds. Nothing of it is
parsed or forwarded.

```toml
[upstream]
connect_timeout = 2.5
read_timeout = 30
max_body_bytes = 10_485_760   # 10 MiB
```""",
    ),
    Table(
        "request_headers",
        HeaderRules,
        _HEADER_RULES,
        doc="""\
Header rules: `[request_headers]` edits what goes upstream to next-hop,
`[response_headers]` edits what goes back to the client. Each has three
optional parts, applied in this order:""",
        after="""\
Names are case-insensitive and must be valid header names (RFC 9110 tokens:
no spaces, no colon). Values are strings of printable characters (tab
allowed, no line breaks or other control characters). The proxy manages
connection framing itself, so rules may not name `Content-Length`,
`Transfer-Encoding`, `Connection`, `Keep-Alive`, `TE`, `Trailer`,
`Upgrade`, `Proxy-Connection`, `Proxy-Authenticate` or
`Proxy-Authorization` (a rule changing framing could desynchronise the
connection: request smuggling).

Where they apply:

- Request rules apply to every request forwarded to next-hop (after the
  user's middleware, which may also change request headers through the WSGI
  environ), WebSocket/Upgrade requests included.
- Response rules apply to every response relayed from next-hop (and to a
  `101 Switching Protocols` head) and to every answer from the cache: they
  edit what the client gets, above the cache, so the cache stores next-hop's
  headers as they came and a hit gets the rules in force now (after a
  reload, the new ones), not those of when it was stored; they do not
  change what the cache stores nor how long. They do not apply to answers
  the proxy makes or replaces itself: the HTTPS redirect, 403, 413, custom
  or default error pages, the 500 of a failing middleware, and the 504 to
  `only-if-cached` when nothing is stored.
- The health check is forwarded like any request, so request rules reach
  next-hop with it; that changes nothing about the answer.
- Removing `Server` or `Date` from responses leaves Gunicorn's own value in
  place (HTTP requires `Date`; Gunicorn always sends a `Server`).

```toml
[request_headers]
remove = ["X-Debug"]

[request_headers.set]
"X-Edge-Proxy" = "1"

[request_headers.append]
"Via" = "1.1 edge-proxy"

[response_headers]
remove = ["X-Powered-By"]

[response_headers.set]
"Strict-Transport-Security" = "max-age=31536000; includeSubDomains"

[response_headers.append]
"Vary" = "Accept-Encoding"
```""",
    ),
    Table("response_headers", HeaderRules, _HEADER_RULES, shares_section=True),
    Table(
        "https_redirect",
        HttpsRedirect,
        (
            Setting("enabled", Boolean(), False, "Turns the redirect on."),
            Setting(
                "status",
                OneOf((301, 308)),
                301,
                "`301 Moved Permanently`, or `308 Permanent Redirect`, which makes clients repeat the same "
                "method and body (use it when plain-HTTP `POST`s must survive the redirect).",
            ),
            Setting(
                "exempt_paths",
                Strings("path prefixes, each starting with `/`", lambda path: path.startswith("/")),
                (),
                "Requests whose path starts with one of these are not redirected (e.g. "
                '`"/.well-known/acme-challenge/"`). Plain string prefixes, compared with the raw request path, '
                "case-sensitive.",
            ),
        ),
        doc="""\
Sends browsers that came over plain HTTP to the HTTPS address. The platform
sets `X-Forwarded-Proto: https` at the edge when the browser used HTTPS; any
other value, or none, counts as plain HTTP.""",
        after="""\
The answer carries `Location: https://<Host header><path and query>`, with
the request target exactly as received, and an empty body; next-hop
is not contacted. A request without a `Host` header is not redirected
(there is no address to send it to) and is forwarded.

```toml
[https_redirect]
enabled = true
status = 308
exempt_paths = ["/.well-known/acme-challenge/"]
```""",
    ),
    Table(
        "access_control",
        AccessControl,
        (
            Setting("allow", _Networks(), (), "When not empty, only these addresses are admitted."),
            Setting("deny", _Networks(), (), "These addresses are refused, even if `allow` lists them."),
        ),
        doc="""\
Allows or denies requests by the browser's address, which the platform puts
in `True-Client-IP` (exactly one address). Denied requests get **403
Forbidden**; next-hop is not contacted.""",
        after="""\
- `deny` wins over `allow`.
- With a non-empty `allow`, a request without a usable `True-Client-IP`
  (missing or not an address) is refused: nothing proves it is allowed.
  With only `deny`, such a request is admitted: nothing proves it is denied.
- Entries are `"192.0.2.10"`, `"192.0.2.0/24"`, `"2001:db8::1"`,
  `"2001:db8::/32"`. Host bits in a range are ignored (`"10.1.2.3/8"` means
  `10.0.0.0/8`). IPv6 is written in any valid form.
- An IPv4-mapped IPv6 client address (`::ffff:192.0.2.10`) is matched as
  the IPv4 address it carries.

```toml
[access_control]
allow = ["203.0.113.0/24", "2001:db8::/32"]
deny = ["203.0.113.66"]
```""",
    ),
    Setting(
        "error_pages",
        _ErrorPages(),
        {},
        """\
Custom bodies for **502**, **503** and **504**, from files in the
configuration directory: each key is a status, its value the file sent as
the body of answers with that status.

- **Which answers get the page: every 502, 503 and 504 the client would
  get**, whoever produced it: the proxy's own (next-hop unreachable: 502;
  next-hop timed out: 504) and those relayed from next-hop (another proxy
  in the chain, or the origin). This is deliberate: the page is what the
  site's visitors see when the site is unavailable, and the chain's other
  links and the origin's server software answer these statuses with their
  own bare pages; replacing all of them gives visitors one consistent page.
  The consequence to know: an origin that serves its own designed 503
  (a maintenance page, say) has it replaced by this file when a 503 page is
  configured here; leave `503` out to let the origin's page through.
- A replaced response keeps its status and next-hop's `Retry-After`, if
  any; its other headers and its body are dropped (the next-hop body is not
  read; that connection is closed rather than reused).
- Content type: `text/html; charset=utf-8` for `.html`/`.htm` files,
  `text/plain; charset=utf-8` for anything else. Files are sent as they are
  (write them in UTF-8).
- The file must exist, be readable and lie inside the configuration
  directory (`../` or a symlink leading out of it is an error). Files are
  read when the configuration is loaded; change one, then run `update.sh`.
- Other statuses (500, 404, ...) are always passed through untouched.

```toml
[error_pages]
502 = "errors/502.html"
503 = "errors/503.html"
504 = "errors/504.html"
```""",
        default_text="none",
    ),
    Setting(
        "middleware",
        _Middleware(),
        None,
        """\
A top-level string `"module:factory"`: `module.py` is a Python file in the
configuration directory, `factory` a callable in it. Each worker imports the
module once and calls `factory(app)`; `app` is the proxy's WSGI application
(it forwards to next-hop), and what `factory` returns is the WSGI
application that handles every request except the health check.

```toml
middleware = "site_middleware:wrap"
```

- A middleware can change the request (its headers are taken from the
  WSGI environ: set `environ["HTTP_X_SOMETHING"]`), change the response
  (wrap `start_response`), or answer a request itself without calling
  `app`.
- **An exception raised by the middleware fails that request only**: the
  client gets `500 Internal Server Error` (if no response byte was sent
  yet; otherwise the connection is closed), the error log gets the
  exception with its traceback, the access log line says `"outcome":
  "error"`, and the worker carries on with its other requests. This holds
  for exceptions raised when it is called and while the first piece of the
  body is produced (generator middlewares), `SystemExit` included.
- The module is a single file: the configuration directory is not on
  Python's import path, so it cannot import sibling files; it can import
  the standard library and the packages installed in the image. It is
  loaded under the name `proxy_user_<module>`, so its file name cannot
  shadow a standard module. No bytecode is written.
- `validate.sh` imports the module and calls `factory(app)` with a stand-in
  app (with stdout and stderr silenced), so keep import and factory cheap
  and free of network access (validation has no network). Per-request work
  belongs in the returned application.
- The middleware runs inside a gevent worker: blocking I/O through the
  standard library cooperates, but CPU-heavy work delays the worker's
  other requests.
- If, despite validation, the module fails to load in a worker (say it was
  changed after validation), the proxy stays up: that worker answers 500 to
  every request but the health check, and logs why.""",
        default_text="none",
    ),
    Table(
        "tunnel",
        Tunnel,
        (
            Setting(
                "idle_timeout",
                Seconds(0.001, 7 * 86400),
                3600.0,
                "A WebSocket (or other `Upgrade`) tunnel carrying no byte either way for this long is closed.",
                summary="WebSocket tunnel idle",
            ),
        ),
    ),
    cache_config.TABLE,
)


def defaults() -> ProxyConfig:
    """The configuration of an empty directory: plain pass-through."""
    return ProxyConfig(**{e.name: e.defaults() if isinstance(e, Table) else e.default for e in SCHEMA})


# -- loading ------------------------------------------------------------------------------------


def load(config_dir: Path, check_middleware: MiddlewareCheck | None = None) -> ProxyConfig:
    """Read and validate ``proxy.toml``; a missing file means pass-through.

    The Gunicorn master does not import the user's middleware (workers do,
    after fork and gevent's patching); ``validate.sh`` passes
    ``check_middleware`` to import it in its own throw-away process, so an
    import error is reported together with every other problem.
    """
    path = config_dir / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return defaults()
    except OSError as exc:
        raise ConfigError([Problem(path, "", None, f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(path, "", None, f"not UTF-8: {exc.reason}")]) from None
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError([Problem(path, "", int(line.group(1)) if line else None, f"TOML syntax: {exc}")]) from None
    check = _Checker(path, text, config_dir, check_middleware)
    config = _build(check, data)
    if check.problems:
        raise ConfigError(check.problems)
    return config


def _build(check: _Checker, data: dict[str, Any]) -> ProxyConfig:
    """Every entry of ``SCHEMA`` from the parsed TOML, each problem recorded."""
    check.known(data, "", [entry.name for entry in SCHEMA])
    values: dict[str, Any] = {}
    for entry in SCHEMA:
        if isinstance(entry, Table):
            table = check.known(data.get(entry.name, {}), entry.name, [s.name for s in entry.settings])
            values[entry.name] = entry.cls(
                **{s.name: check.value(table, f"{entry.name}.{s.name}", s) for s in entry.settings}
            )
            for key, reason in entry.validate(values[entry.name]) if entry.validate else ():
                check.problem(f"{entry.name}.{key}", reason)
        else:
            values[entry.name] = check.value(data, entry.name, entry)
    return ProxyConfig(**values)
