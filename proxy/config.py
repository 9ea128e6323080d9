"""The user's configuration: ``proxy.toml`` in the configuration directory.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cache_config
from .cache_config import CacheConfig
from .headers import HOP_BY_HOP, HeaderRules

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


@dataclass(frozen=True)
class ErrorPage:
    body: bytes
    content_type: str


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: ``None`` means no limit.
    max_body_bytes: int | None = None
    #: Seconds a WebSocket/Upgrade tunnel may carry no byte either way.
    tunnel_idle_timeout: float = 3600.0
    request_headers: HeaderRules = field(default_factory=HeaderRules)
    response_headers: HeaderRules = field(default_factory=HeaderRules)
    #: 301 or 308 to redirect plain-HTTP requests to https, ``None`` for off.
    https_redirect: int | None = None
    redirect_exempt: tuple[str, ...] = ()
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    error_pages: dict[int, ErrorPage] = field(default_factory=dict)
    #: ``(path of the module file, factory name)``.
    middleware: tuple[Path, str] | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)


#: The configuration the Gunicorn master validated last; workers inherit it
#: through fork, so every worker of one generation runs the same one.
active: ProxyConfig | None = None


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


class _Checker:
    """Walks the parsed TOML, recording a Problem for each bad value."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
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

    def table(self, data: dict[str, Any], key: str, known: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        for name in value.keys() - known:
            self.problem(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def number(self, data: dict[str, Any], key: str, name: str, default: float, low: float, high: float) -> float:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            self.problem(f"{key}.{name}", f"must be a number from {low:g} to {high:g}, got {value!r}")
            return default
        return float(value)

    def header_rules(self, data: dict[str, Any], key: str) -> HeaderRules:
        table = self.table(data, key, {"set", "append", "remove"})
        pairs: dict[str, tuple[tuple[str, str], ...]] = {}
        for op in ("set", "append"):
            entries = table.get(op, {})
            if not isinstance(entries, dict):
                self.problem(f"{key}.{op}", 'must be a table of "Header-Name" = "value"')
                entries = {}
            out = []
            for name, value in entries.items():
                where = f"{key}.{op}.{name}"
                if self._header_name(where, name):
                    if not isinstance(value, str) or not _FIELD_VALUE.fullmatch(value):
                        self.problem(where, "value must be a string without control characters")
                    else:
                        out.append((name, value))
            pairs[op] = tuple(out)
        remove = table.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
            self.problem(f"{key}.remove", "must be a list of header names")
            remove = []
        names = frozenset(n.lower() for n in remove if self._header_name(f"{key}.remove", n))
        return HeaderRules(remove=names, set=pairs["set"], append=pairs["append"])

    def _header_name(self, where: str, name: str) -> bool:
        if not _TOKEN.fullmatch(name):
            self.problem(where, f"{name!r} is not a valid header name")
            return False
        if name.lower() in _PROTECTED_HEADERS:
            self.problem(where, f"{name} is managed by the proxy (connection framing) and cannot be changed")
            return False
        return True

    def networks(self, data: dict[str, Any], key: str) -> tuple[Network, ...]:
        value = data.get(key.rsplit(".", 1)[1], [])
        if not isinstance(value, list):
            self.problem(key, "must be a list of addresses or CIDR ranges")
            return ()
        out = []
        for item in value:
            try:
                if not isinstance(item, str):
                    raise TypeError(item)
                out.append(ipaddress.ip_network(item.strip(), strict=False))
            except (TypeError, ValueError):
                self.problem(key, f"{item!r} is not an IPv4/IPv6 address or CIDR range (as a string)")
        return tuple(out)


#: Checks that a middleware module imports and has its factory: given the
#: module's path and the factory's name, returns a reason or None.
MiddlewareCheck = Callable[[Path, str], "str | None"]


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
        return ProxyConfig()
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
    return _build(_Checker(path, text), data, config_dir, check_middleware)


def _build(
    check: _Checker, data: dict[str, Any], config_dir: Path, check_middleware: MiddlewareCheck | None
) -> ProxyConfig:
    known = {
        "upstream",
        "request_headers",
        "response_headers",
        "https_redirect",
        "access_control",
        "error_pages",
        "middleware",
        "tunnel",
        "cache",
    }
    for name in data.keys() - known:
        check.problem(name, f"unknown key (known: {', '.join(sorted(known))})")

    upstream = check.table(data, "upstream", {"connect_timeout", "read_timeout", "max_body_bytes"})
    connect_timeout = check.number(upstream, "upstream", "connect_timeout", 5.0, 0.001, 3600)
    read_timeout = check.number(upstream, "upstream", "read_timeout", 60.0, 0.001, 86400)
    max_body = upstream.get("max_body_bytes")
    if max_body is not None and (isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0):
        check.problem("upstream.max_body_bytes", f"must be a whole number of bytes (0 or more), got {max_body!r}")
        max_body = None

    tunnel = check.table(data, "tunnel", {"idle_timeout"})
    tunnel_idle = check.number(tunnel, "tunnel", "idle_timeout", 3600.0, 0.001, 7 * 86400)

    redirect = check.table(data, "https_redirect", {"enabled", "status", "exempt_paths"})
    enabled = redirect.get("enabled", False)
    if not isinstance(enabled, bool):
        check.problem("https_redirect.enabled", f"must be true or false, got {enabled!r}")
        enabled = False
    status = redirect.get("status", 301)
    if type(status) is not int or status not in (301, 308):
        check.problem("https_redirect.status", f"must be 301 or 308, got {status!r}")
        status = 301
    exempt = redirect.get("exempt_paths", [])
    if not isinstance(exempt, list) or not all(isinstance(p, str) and p.startswith("/") for p in exempt):
        check.problem("https_redirect.exempt_paths", 'must be a list of path prefixes starting with "/"')
        exempt = []

    access = check.table(data, "access_control", {"allow", "deny"})
    allow = check.networks(access, "access_control.allow")
    deny = check.networks(access, "access_control.deny")

    pages = check.table(data, "error_pages", {"502", "503", "504"})
    error_pages = {}
    for code, name in pages.items():
        if code not in ("502", "503", "504"):
            continue
        key = f"error_pages.{code}"
        if not isinstance(name, str) or not name:
            check.problem(key, "must be a file name relative to the configuration directory")
            continue
        page = (config_dir / name).resolve()
        if not page.is_relative_to(config_dir.resolve()):
            check.problem(key, f"{name!r} is outside the configuration directory")
            continue
        try:
            body = page.read_bytes()
        except OSError as exc:
            check.problem(key, f"cannot read {name!r}: {exc.strerror}")
            continue
        kind = "text/html; charset=utf-8" if page.suffix in (".html", ".htm") else "text/plain; charset=utf-8"
        error_pages[int(code)] = ErrorPage(body, kind)

    middleware = None
    spec = data.get("middleware")
    if spec is not None:
        match = _MIDDLEWARE.fullmatch(spec) if isinstance(spec, str) else None
        module = config_dir / f"{match.group(1)}.py" if match else None
        if not match:
            check.problem("middleware", f'must be "module:factory", got {spec!r}')
        elif not module.is_file():
            check.problem("middleware", f"module file {module.name} not found in the configuration directory")
        else:
            middleware = (module, match.group(2))
            reason = check_middleware(module, match.group(2)) if check_middleware else None
            if reason:
                check.problem("middleware", reason)

    request_headers = check.header_rules(data, "request_headers")
    response_headers = check.header_rules(data, "response_headers")
    cache = cache_config.parse(check, data)
    if check.problems:
        raise ConfigError(check.problems)
    return ProxyConfig(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_body_bytes=max_body,
        tunnel_idle_timeout=tunnel_idle,
        request_headers=request_headers,
        response_headers=response_headers,
        https_redirect=status if enabled else None,
        redirect_exempt=tuple(exempt),
        allow=allow,
        deny=deny,
        error_pages=error_pages,
        middleware=middleware,
        cache=cache,
    )
