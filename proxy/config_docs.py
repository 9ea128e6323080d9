"""docs/configuration.md and the README's Environment and Timeouts tables,
generated from the declarations (``config.SCHEMA``, ``settings.VARIABLES``)
and the fixed timeouts named in the modules that own them.

``python -m proxy.config_docs`` prints docs/configuration.md;
``--write`` rewrites it and the README's generated tables in place;
``--check`` exits 1 if either differs from what the declarations say.
The test suite runs the check, so the documentation cannot drift.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from string import Template
from typing import Any

from . import config, hooks, settings
from .setting import Seconds, Setting, Table

__all__ = ["FIXED_TIMEOUTS", "configuration_md", "environment_table", "main", "timeouts_table", "update_readme"]

ROOT = Path(__file__).resolve().parent.parent

#: Timeouts nobody tunes, as ``(module, constant, what it bounds)``: each is
#: declared and explained where it is used; listed here for the README.
FIXED_TIMEOUTS = (
    ("proxy.app", "LINGER_SECONDS", "discarding the rest of a body refused with 413"),
    ("proxy.worker", "SHUTDOWN_IDLE_GRACE", "idle keep-alive connection closed once shutdown starts"),
    ("proxy.worker", "SHUTDOWN_CUT_MARGIN", "what still runs is cut this long before the graceful deadline"),
    ("proxy.tunnel", "SPLICE_STOP_WAIT", "the two halves of a closing tunnel stopping"),
    ("proxy.balance", "PAUSE_S", "one accept pause of a worker over its share of connections"),
    ("proxy.balance", "MAX_PAUSE_S", "longest run of accept pauses (a stuck peer)"),
    ("proxy.hooks", "NEW_WORKERS_TIMEOUT", "`update.sh` waiting for the new workers"),
    ("proxy.hooks", "DRAIN_MARGIN", "`update.sh` waiting for the old workers, beyond the graceful timeout"),
    ("proxy.hooks", "REOPEN_TIMEOUT", "`logrotate.sh` waiting for every process to reopen its files"),
)


def _fixed(module: str, name: str) -> float:
    value: float = getattr(importlib.import_module(module), name)
    return value


def _variable(name: str) -> settings.Variable:
    return next(v for v in settings.VARIABLES if v.name == name)


def _graceful() -> int:
    return settings.from_environ({}).graceful_timeout


def _setting(table: str, name: str) -> Setting[Any]:
    entry = next(e for e in config.SCHEMA if e.name == table)
    assert isinstance(entry, Table)
    return next(s for s in entry.settings if s.name == name)


def _values() -> dict[str, str]:
    """What the prose says in numbers, from where each number is declared."""
    read = _setting("upstream", "read_timeout").kind
    assert isinstance(read, Seconds)
    return {
        "linger_seconds": f"{_fixed('proxy.app', 'LINGER_SECONDS'):g}",
        "graceful_timeout": f"{_graceful()}",
        "drain_timeout": f"{_graceful() + hooks.DRAIN_MARGIN:g}",
        "read_timeout_range": f"{read.low:g} to {read.high:g}",
        "config_dir": str(_variable("PROXY_CONFIG_DIR").default),
    }


def _prose(text: str) -> str:
    return Template(text).substitute(_values())


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _headings() -> list[tuple[str, list[Table | Setting[Any]]]]:
    """Each documented section: its heading and the entries it covers."""
    sections: list[tuple[str, list[Table | Setting[Any]]]] = []
    for entry in config.SCHEMA:
        is_table = isinstance(entry, Table) or isinstance(entry.default, dict)
        shown = f"`[{entry.name}]`" if is_table else f"`{entry.name}`"
        if isinstance(entry, Table) and entry.shares_section:
            heading, entries = sections[-1]
            sections[-1] = (f"{heading} and {shown}", [*entries, entry])
        else:
            sections.append((shown, [entry]))
    return sections


def _key_rows(entry: Table | Setting[Any]) -> list[str]:
    if isinstance(entry, Table):
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for s in entry.settings:
            rows.append(f"| `{s.name}` | {s.kind.text} | {s.shown_default()} | {_prose(s.doc)} |")
        return rows
    row = f"| `{entry.name}` | {entry.kind.text} | {entry.shown_default()} |"
    return ["| key | type | default |", "|---|---|---|", row]


def _keys_section() -> str:
    out = ["## Keys", ""]
    for heading, entries in _headings():
        first = entries[0]
        out += [f"### {heading}", ""]
        if isinstance(first, Table):
            if first.doc:
                out += [_prose(first.doc), ""]
            out += [*_key_rows(first), ""]
            if first.after:
                out += [_prose(first.after), ""]
        else:
            out += [*_key_rows(first), "", _prose(first.doc), ""]
    return "\n".join(out)


_INTRO = """\
# Configuring the proxy: `proxy.toml`

<!-- Generated from proxy/config.py by `python -m proxy.config_docs --write`: edit the declarations there. -->

The user's configuration is the directory `${config_dir}/` (the proxy's
subdirectory of the application's git repository; `PROXY_CONFIG_DIR` moves
it). The proxy reads one file there, `proxy.toml` ([TOML 1.0](https://toml.io)),
plus the files it names (error pages, a middleware module). It never writes
to the directory.

**No file, or an empty directory, means plain pass-through**: every request
goes to next-hop unchanged, with the default timeouts and no body limit.
Every key is optional; an absent key has the default given below.

A complete example, which `validate.sh` accepts and the tests run, is in
[`examples/proxy_config/`](../examples/proxy_config/): `proxy.toml`, three
error pages and a middleware module.
"""

_APPLIED = """\
## How the configuration is read and applied

The Gunicorn master parses and validates `proxy.toml` once (at start-up and
on every reload) into one immutable object; the workers it forks inherit
that object, so all workers of a generation run the same configuration and
nothing is parsed per request. Error pages are read into memory at the same
time, so changing an error page file also needs an `update.sh`.

- At start-up, an invalid configuration stops the proxy with every reason
  (on stderr, or in `error.log` with the file log target).
- `update.sh` (and the `updateenvironment` message) validates the directory
  first. Invalid: it fails with the reasons and the running proxy is not
  touched. Valid: the master is sent SIGHUP; Gunicorn forks a new generation
  of workers with the new configuration and SIGTERMs the old one. The old
  workers stop accepting connections, finish the requests they are serving
  (each answered with `Connection: close`), close their idle keep-alive
  connections and exit. No connection is refused meanwhile: the listening
  socket belongs to the master, and connections wait in its backlog while
  the new workers boot. `update.sh` returns when the old generation has
  exited (or after ${drain_timeout} s if a long download or WebSocket keeps one busy;
  Gunicorn ends those at its graceful timeout, ${graceful_timeout} s), so from then on every
  request sees the new configuration.
- Should the directory change between `update.sh`'s check and the reload
  (or SIGHUP come from elsewhere), the master re-validates: an invalid
  configuration is logged and the previous one stays in force. Nothing is
  ever half-applied.
"""

_ORDER = """\
## Order of the rules, and the health check

For every request, in this order:

1. `CONNECT` is refused (405).
2. **The platform's health check**, `GET /.well-known/section-io/aee-hc/healthz`
   (with or without a query string), goes straight to next-hop: it is
   never redirected, never refused by access control or the body limit,
   and never passes through the middleware. Only the path
   `/.well-known/section-io/aee-hc/healthz` itself counts (not
   `.../healthzX` nor `.../healthz/x`).
3. `[https_redirect]`.
4. `[access_control]`.
5. `max_body_bytes` for a declared `Content-Length`.
6. `middleware`, which calls the proxy's forwarding app:
7. `[request_headers]` rules, then the request goes to next-hop;
   `[response_headers]` rules or `[error_pages]` on the way back.

## Validation errors

Everything wrong is reported at once, one line per problem, as

```
${config_dir}/proxy.toml:LINE: KEY: REASON
```

`LINE` is the line of the key (or of the table or key that contains it,
when the key is inside an inline table); it is left out when it cannot be
found. A TOML syntax error stops parsing, so it is reported alone, with its
line. These are all errors:

- a key the proxy does not know, at any level (`colour = 1`,
  `[upstream] retries = 3`, `[error_pages] 404 = "..."`);
- a value of the wrong type or out of range (`read_timeout = "5"`,
  `connect_timeout = 0`, `max_body_bytes = 1.5`, `status = 302`,
  `enabled = "yes"`, a table expected and something else given);
- an address or range that is not one (`"10.0.0.0/33"`, `"example.com"`,
  a number instead of a string);
- an invalid header name, a header value with control characters, a rule
  naming a framing header;
- an error page file that is missing, unreadable, a directory, or outside
  the configuration directory;
- a `middleware` that is not `"module:factory"`, whose file is missing,
  whose import fails (syntax error, missing package, exception, `sys.exit`),
  which has no callable `factory`, whose `factory(app)` raises or returns
  something that is not callable;
- a `proxy.toml` that is not UTF-8, not readable, or not TOML.

For example, for a file with three mistakes:

```
${config_dir}/proxy.toml:1: middleware: syntax.py: import failed: line 3: SyntaxError: invalid syntax
${config_dir}/proxy.toml:4: upstream.read_timeout: must be a number from ${read_timeout_range}, got 'soon'
${config_dir}/proxy.toml:7: access_control.deny: '1.2.3.4/40' is not an IPv4/IPv6 address or CIDR range (as a string)
```

## The hooks: validate.sh, update.sh, messagehandler.sh

The platform runs these from `/opt/section/`; each is a two-line shell
script calling `python -m proxy.hooks`. Failure is always a non-zero exit
with the reason on stderr.

| hook | does |
|---|---|
| `validate.sh` | Checks `$$PROXY_CONFIG_DIR` (default `${config_dir}`) as described above. Valid: exit 0 and no output at all, on stdout or stderr (even if the middleware prints at import). Invalid: exit 1 and every problem on stderr. It reads only: it writes nothing (no bytecode), works on a read-only directory, needs no network, and takes about 0.1 s. |
| `update.sh` | Validates (invalid: exit 1 with the reasons, the running proxy untouched), then reloads the running proxy as described in [How the configuration is read and applied](#how-the-configuration-is-read-and-applied), returning once the old workers have exited. No proxy running (no pidfile, or a stale one naming a dead process): exit 0, the configuration will be read at start-up. |
| `messagehandler.sh NAME ARGS` | `updateenvironment` and `reload`: what `update.sh` does. `reopen-logs`: the master and its workers reopen their log files (file log target; nothing to do otherwise). Any other name: exit 1 with `unknown message: NAME` on stderr. `ARGS` is not used. |
| `logrotate.sh` | See the README's Logs section. |

To check a configuration before pushing it, from a checkout of this
repository:

```sh
PROXY_CONFIG_DIR=path/to/proxy_config PROXY_PYTHON=.venv/bin/python hooks/validate.sh && echo valid
```
"""  # noqa: E501 (table rows are one line each in Markdown)


def _contents() -> str:
    keys = " ·\n  ".join(f"[{heading}](#{_slug(heading)})" for heading, _ in _headings())
    return f"""\
- [How the configuration is read and applied](#how-the-configuration-is-read-and-applied)
- [Keys](#keys): {keys}
- [Order of the rules, and the health check](#order-of-the-rules-and-the-health-check)
- [Validation errors](#validation-errors)
- [The hooks](#the-hooks-validatesh-updatesh-messagehandlersh)
"""


def configuration_md() -> str:
    """docs/configuration.md as the declarations say it."""
    return "\n".join([_prose(_INTRO), _contents(), _prose(_APPLIED), _keys_section(), _prose(_ORDER)])


def environment_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.shown_default()} | {v.doc} |" for v in settings.VARIABLES]
    rows.append("| `GUNICORN_CMD_ARGS` | | Gunicorn's own override mechanism, e.g. `--graceful-timeout 10` |")
    return "\n".join(rows)


def timeouts_table() -> str:
    rows = ["| timeout | default | where |", "|---|---|---|"]
    for entry in config.SCHEMA:
        for s in entry.settings if isinstance(entry, Table) else (entry,):
            if isinstance(s.kind, Seconds):
                rows.append(f"| {s.summary} | {s.default:g} s | `[{entry.name}] {s.name}` in `proxy.toml` |")
    for v in settings.VARIABLES:
        if isinstance(v.kind, Seconds):
            rows.append(f"| {v.summary} | {v.default} s | `{v.name}` |")
    for module, name, what in FIXED_TIMEOUTS:
        path = module.replace(".", "/") + ".py"
        rows.append(f"| {what} | {_fixed(module, name):g} s | fixed: `{name}` in `{path}` |")
    return "\n".join(rows)


_GENERATED = re.compile(r"(<!-- generated: (\w+) -->\n)(?:[^<]*\n)?(<!-- end generated -->)")


def update_readme(text: str) -> str:
    """``text`` with each generated README table (between its markers) redone."""
    tables = {"environment": environment_table, "timeouts": timeouts_table}
    return _GENERATED.sub(lambda m: m.group(1) + tables[m.group(2)]() + "\n" + m.group(3), text)


def main(argv: list[str]) -> int:
    docs, readme = ROOT / "docs" / "configuration.md", ROOT / "README.md"
    wanted = {docs: configuration_md(), readme: update_readme(readme.read_text())}
    if not argv:
        sys.stdout.write(wanted[docs])
        return 0
    if argv == ["--write"]:
        for path, text in wanted.items():
            path.write_text(text)
        return 0
    if argv == ["--check"]:
        stale = [path.name for path, text in wanted.items() if path.read_text() != text]
        for name in stale:
            print(f"{name} is not what the declarations say: run python -m proxy.config_docs --write", file=sys.stderr)
        return 1 if stale else 0
    print("usage: python -m proxy.config_docs [--write | --check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
