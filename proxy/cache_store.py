"""Where cached responses live: body files plus one SQLite index.

Layout under ``PROXY_CACHE_DIR``::

    index.sqlite3          the index (WAL mode), shared by every process
    index.generation       moves after every change of the entries (``proxy.generation``)
    objects/ab/<name>      one entry file per stored response
    tmp/<name>             fills in progress (same file system: rename is atomic)

The index row is the truth: a response is served only while its row exists,
so deleting rows (purge, ban, invalidation, eviction) takes effect for every
worker at the commit. Entry files are named by random tokens, never by
anything from the request, and carry a header (magic, format version, the
row's id, the URL, body length) checked on every open, so a truncated,
overwritten or foreign file is a miss and is removed.

Every statement is short (an indexed SELECT for a lookup; one transaction to
publish), so a gevent worker blocks its loop for microseconds, not for as
long as another process holds the write lock beyond ``BUSY_TIMEOUT_MS``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import secrets
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import gevent

from .cache_config import CacheConfig
from .cache_policy import Stored, surrogate_keys
from .cache_policy import variant as select
from .generation import Generation

if TYPE_CHECKING:  # at run time proxy.ban (and re2) is imported only where a ban is checked
    from .ban import BanSubject

__all__ = [
    "BUSY_TIMEOUT_MS",
    "COUNTERS",
    "COUNTS_FLUSH_S",
    "INVALIDATION_WINDOW_S",
    "LOOKUP_SQL",
    "MAGIC",
    "MEMORY_BODY_BYTES",
    "ROWS_TRUSTED_S",
    "CacheDirError",
    "Claim",
    "Entry",
    "Fill",
    "FillRow",
    "Key",
    "Lookup",
    "Store",
    "TAGGED_SQL",
    "index_path",
    "open_index",
    "prepare",
    "read_stats",
]

log = logging.getLogger("proxy")
_T = TypeVar("_T")

INDEX = "index.sqlite3"
GENERATION = "index.generation"
MAGIC = b"EPCACHE\x00"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct(">8sHI")  # magic, version, length of the JSON header
#: Longest a writer waits for another process's transaction (all are short).
BUSY_TIMEOUT_MS = 2000
#: Invalidation records (purges, bans, unsafe-method answers) are kept this
#: long for fills in flight to check before they publish; a fill older than
#: the oldest dropped record is not published.
INVALIDATION_WINDOW_S = 600.0
#: Longest host and target in a key; longer requests are not cached.
MAX_HOST_BYTES = 255
MAX_TARGET_BYTES = 8192
#: The index's ``used`` time is written at most this often per entry (LRU
#: granularity), so hits do not each take the write lock.
TOUCH_INTERVAL_S = 10.0
#: Hard upper bound on variants read per lookup, whatever the configuration says.
_VARIANT_ROWS = 256
#: Decoded index columns and verified entry files a worker remembers (each
#: memo is emptied when it reaches this size): a hit on an entry the worker
#: has served before runs no SELECT, decodes no JSON and reads no entry
#: header while the index is unchanged.
_MEMO_SIZE = 4096
#: Bodies up to this size are kept in the worker once their file is verified
#: (at most ``_MEMORY_TOTAL`` bytes, emptied when full): such a hit opens no
#: file and leaves in one ``send`` with its head. The verified copy is what is
#: served while the index row names the file; damage done to the file since
#: is found when it is next read (by another worker, or once the memo empties).
MEMORY_BODY_BYTES = 16 * 1024
_MEMORY_TOTAL = 4 * 1024 * 1024
#: A URL's remembered rows are read again after this long even if the shared
#: generation has not moved: a process that died between its commit and
#: moving it (or a writer other than this module) is noticed within this time.
ROWS_TRUSTED_S = 1.0
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: The counters ``cache-stats`` prints (with the ``entries`` and
#: ``bytes_stored`` gauges, read from the index). ``hits``: answered from an
#: entry without asking next-hop (``stale`` ones included); ``misses``: the
#: body came from next-hop (MISS, EXPIRED); ``revalidated``: a 304 let the
#: stored body go out; ``collapsed``: requests fed from another's fill;
#: ``evictions``: entries removed for space or past ``max_variants``;
#: ``purges``, ``bans``: messages handled.
COUNTERS = ("hits", "misses", "revalidated", "stale", "collapsed", "evictions", "purges", "bans")
#: A worker adds the counts of its requests to the index this often (one
#: short transaction), and when it exits: hits never take the write lock.
COUNTS_FLUSH_S = 1.0
#: Fill states: a fill in flight is ``pending`` (waiting for next-hop's head)
#: or ``streaming`` (the temp file grows); ``refreshed`` (a 304 refreshed the
#: entry), ``released`` (nothing will be stored) and ``done`` end it.
ACTIVE_FILLS = ("pending", "streaming")
#: Ended fill rows are kept this long for late readers, then deleted.
_FILL_ROW_KEEP_S = 60.0
#: Room in a temp file's header for the final body length and ``done`` flag.
_HEAD_ROOM = 40

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    scheme TEXT NOT NULL,
    host TEXT NOT NULL,
    target TEXT NOT NULL,
    vary TEXT NOT NULL,
    variant TEXT NOT NULL,
    file TEXT NOT NULL,
    body_size INTEGER NOT NULL,
    disk_size INTEGER NOT NULL,
    status INTEGER NOT NULL,
    meta TEXT NOT NULL,
    stored REAL NOT NULL,
    used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_url ON entries (host, target, scheme);
CREATE INDEX IF NOT EXISTS entries_target ON entries (target);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries
    BEGIN UPDATE totals SET bytes = bytes + NEW.disk_size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries
    BEGIN UPDATE totals SET bytes = bytes - OLD.disk_size WHERE id = 0; END;
CREATE TABLE IF NOT EXISTS invalidations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    host TEXT,
    target TEXT,
    expr TEXT
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('pruned_upto', 0);
CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, entry TEXT NOT NULL, PRIMARY KEY (tag, entry)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_entry ON tags (entry);
CREATE TRIGGER IF NOT EXISTS entries_untagged AFTER DELETE ON entries
    BEGIN DELETE FROM tags WHERE entry = OLD.id; END;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fills (
    url TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    beat REAL NOT NULL,
    temp TEXT,
    body_offset INTEGER,
    vary TEXT,
    variant TEXT,
    meta TEXT,
    length INTEGER
);
CREATE INDEX IF NOT EXISTS fills_beat ON fills (beat);
"""


#: The whole of a lookup: the rows of one URL, through ``entries_url`` (the
#: tests check the query plan), so its cost grows with neither the number
#: of entries nor of bans (bans are never evaluated on lookup).
LOOKUP_SQL = (
    "SELECT id, vary, variant, file, body_size, meta, used FROM entries"
    " WHERE host = ? AND target = ? AND scheme = ? LIMIT ?"
)
#: The rows a ``purge-key`` removes, through the tags table's primary key.
TAGGED_SQL = "SELECT e.id, e.file FROM tags t JOIN entries e ON e.id = t.entry WHERE t.tag IN ({})"


class CacheDirError(Exception):
    """``PROXY_CACHE_DIR`` cannot hold the cache; the message says why."""


class _Invalidated(Exception):
    """A fill about to publish was hit by a purge, ban or invalidation since it began."""


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock at once (so that it
    never fails half-way on a lock upgrade), committed if the block ends,
    rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a failed COMMIT may leave it open
            db.execute("ROLLBACK")
        raise


def index_path(directory: Path) -> Path:
    return directory / INDEX


def _connect(directory: Path) -> sqlite3.Connection:
    db = sqlite3.connect(index_path(directory), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    # WAL + NORMAL: a commit survives any process crash; only a power loss
    # may lose the last commits (their files then fail verification).
    db.execute("PRAGMA synchronous = NORMAL")
    return db


def prepare(directory: Path, config: CacheConfig, sweep: bool) -> None:
    """Master start-up and reload: create the directory and the index, apply
    ``max_size``, and (``sweep``, at start-up only, when no fill can be in
    flight) remove temp files and entry files no row names."""
    try:
        for sub in ("objects", "tmp"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        probe = directory / "tmp" / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        Generation(directory / GENERATION).close()
        db = _connect(directory)
        store = Store(directory, config, db)
        try:
            db.executescript(_SCHEMA)
            store.evict(0)
            if sweep:
                store.sweep()
        finally:
            store.close()
    except OSError as exc:
        raise CacheDirError(f"{exc.strerror or exc} ({exc.filename or directory})") from None
    except sqlite3.Error as exc:
        raise CacheDirError(f"index {index_path(directory)}: {exc}") from None


def open_index(directory: Path, config: CacheConfig) -> Store | None:
    """The hooks' handle on an existing index, None when there is none. Its
    schema is completed first: a master creating it at start-up (or killed
    while it did) leaves an index without every table, and no entries; an
    index an older version made lacks the newer tables."""
    if not index_path(directory).is_file():
        return None
    db = _connect(directory)
    try:
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return Store(directory, config, db)


@dataclass(frozen=True, slots=True)
class Key:
    """What identifies a URL: the scheme the client used, host, raw target."""

    scheme: str
    host: str
    target: str

    @classmethod
    def make(cls, scheme: str, host: str, target: str) -> Key | None:
        """None when the request is too long to be a key."""
        host = host.lower()
        if len(host) > MAX_HOST_BYTES or len(target) > MAX_TARGET_BYTES:
            return None
        return cls(scheme, host, target)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.target}"

    def entry_id(self, vary: str, variant: str) -> str:
        data = "\0".join((self.scheme, self.host, self.target, vary, variant))
        return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    key: Key
    file: str
    body_size: int
    stored: Stored
    used: float


@dataclass(frozen=True, slots=True)
class Lookup:
    entry: Entry | None
    #: ``uri-miss`` (no entry for the URL) or ``vary-miss`` (none for this variant).
    miss: str


_URI_MISS = Lookup(None, "uri-miss")
_VARY_MISS = Lookup(None, "vary-miss")
#: One index row as a lookup uses it: its ``vary`` text, the names that
#: text lists, the variant the row was stored for, and the row as a hit.
_Row = tuple[str, tuple[str, ...], str, Lookup]


def _one(db: sqlite3.Connection, sql: str, args: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
    """The first row. ``fetchall``, not ``fetchone``: a statement left
    unfinished keeps its read transaction open, and the connection would go
    on seeing that old snapshot of the index (purged rows included)."""
    rows = db.execute(sql, args).fetchall()
    return tuple(rows[0]) if rows else None


def _value(db: sqlite3.Connection, sql: str, args: tuple[object, ...] = ()) -> Any:
    """The single value of an aggregate query."""
    row = _one(db, sql, args)
    return row[0] if row else None


def _add(db: sqlite3.Connection, counts: dict[str, int]) -> None:
    """Add to the shared counters (inside the caller's transaction)."""
    db.executemany(
        "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        [(name, n) for name, n in counts.items() if n],
    )


def read_stats(directory: Path) -> dict[str, int]:
    """The counters and gauges of the cache in ``directory``, as every
    worker last flushed them (zeros when there is no index): for
    ``cache-stats`` and a metrics endpoint."""
    stats = dict.fromkeys((*COUNTERS, "entries", "bytes_stored"), 0)
    if not index_path(directory).is_file():
        return stats
    db = sqlite3.connect(f"file:{index_path(directory)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        for table, sql in (
            ("counters", "SELECT name, value FROM counters"),
            ("entries", "SELECT 'entries', COUNT(*) FROM entries"),
            ("totals", "SELECT 'bytes_stored', bytes FROM totals WHERE id = 0"),
        ):
            try:
                rows = db.execute(sql).fetchall()
            except sqlite3.OperationalError as exc:  # an index from before the table existed
                if f"no such table: {table}" not in str(exc):
                    raise
                continue
            for name, value in rows:
                if name in stats:
                    stats[name] = int(value)
    finally:
        db.close()
    return stats


def _is_full(exc: BaseException) -> bool:
    return (
        isinstance(exc, OSError)
        and exc.errno in _FULL
        or (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc))
    )


class _Trouble:
    """Logs the first failure of a kind, then stays quiet until a success."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def report(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.failing:
            self.failing.add(kind)
            log.error(message, *args)

    def ok(self, kind: str) -> None:
        self.failing.discard(kind)


def _memo(memo: dict[str, _T], text: str, decode: Callable[[str], _T]) -> _T:
    """``decode(text)``, remembered in ``memo`` (emptied when full)."""
    value = memo.get(text)
    if value is None:
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        value = memo[text] = decode(text)
    return value


def _vary_names(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What says an entry file is the one verified: any rewrite, cut or replacement changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _verify(f: BinaryIO, size: int, entry: Entry) -> int:
    """Check an entry file's header (``f`` at its start, ``size`` bytes long)
    against the index row; the body's offset. Raises ValueError."""
    magic, version, length = _PREAMBLE.unpack(f.read(_PREAMBLE.size))
    if magic != MAGIC or version != FORMAT_VERSION or length > 65536:
        raise ValueError("not an entry file of this format")
    head = json.loads(f.read(length))
    if head.get("id") != entry.id or head.get("body") != entry.body_size:
        raise ValueError("header names another entry")
    if size != _PREAMBLE.size + length + entry.body_size:
        raise ValueError("size does not match the header")
    return int(_PREAMBLE.size + length)


class Store:
    """One process's handle on the shared cache (open it after fork)."""

    def __init__(self, directory: Path, config: CacheConfig, db: sqlite3.Connection | None = None) -> None:
        self.directory = directory
        self.config = config
        self._db = db
        self.trouble = _Trouble()
        self._objects = f"{directory}/objects/"
        self._generation: Generation | None = None
        #: A URL's rows as last read (with when, by the monotonic clock), while
        #: the generation is the one they were read at.
        self._rows: dict[tuple[str, str, str], tuple[float, list[_Row]]] = {}
        self._rows_generation = -1
        #: ``meta`` column text -> its Stored; ``vary`` column text -> its names.
        self._stored: dict[str, Stored] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        #: Entry file -> (what fstat said of it, entry id, body size, body offset)
        #: when this worker last verified its header.
        self._verified: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
        #: Entry file -> (entry id, its verified body), for bodies up to
        #: ``MEMORY_BODY_BYTES``: served from here while the row names the file.
        self._bodies: dict[str, tuple[str, bytes]] = {}
        self._bodies_size = 0
        self._counts: dict[str, int] = {}
        self._flush_due = False
        self._exit_flush = False

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = _connect(self.directory)
        return self._db

    @property
    def generation(self) -> Generation:
        if self._generation is None:
            self._generation = Generation(self.directory / GENERATION)
        return self._generation

    @contextlib.contextmanager
    def _changing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that changes the entries: once it has
        committed the generation moves, so every process's next lookup reads
        the index again (a purge holds for every request after it returns)."""
        db = self.db
        with _transaction(db):
            yield db
        self.generation.bump()

    def _path(self, file: str) -> Path:
        return self.directory / "objects" / file[:2] / file

    def _unlink(self, files: list[str]) -> None:
        for file in files:
            try:
                self._path(file).unlink()
            except FileNotFoundError:
                pass

    # -- counters --------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of ``COUNTERS``: the one call for every request path. Kept
        in this process and added to the index within ``COUNTS_FLUSH_S``."""
        if name not in COUNTERS:
            raise ValueError(f"unknown cache counter {name!r}")
        self._counts[name] = self._counts.get(name, 0) + n
        if not self._flush_due:
            self._flush_due = True
            gevent.spawn_later(COUNTS_FLUSH_S, self.flush_counts)
            if not self._exit_flush:
                self._exit_flush = True
                atexit.register(self.flush_counts)

    def flush_counts(self) -> None:
        counts, self._counts = self._counts, {}
        self._flush_due = False
        if not counts:
            return
        db = self.db
        try:
            with _transaction(db):
                _add(db, counts)
        except sqlite3.Error as exc:
            self.trouble.report("index", "cache: counters not written: %s", exc)

    # -- lookup and hits ----------------------------------------------------------

    def _rows_of(self, key: Key) -> list[_Row]:
        """The URL's index rows, decoded: one indexed SELECT, or none at all
        when this worker read them less than ``ROWS_TRUSTED_S`` ago and the
        generation has not moved since (every purge, ban, fill, refresh and
        eviction, by any process, moves it after its commit)."""
        generation = self.generation.value  # before the SELECT: a commit after it moves it again
        if generation != self._rows_generation:
            self._rows.clear()
            self._rows_generation = generation
        where = (key.host, key.target, key.scheme)
        now = time.monotonic()
        kept = self._rows.get(where)
        if kept is not None and now - kept[0] < ROWS_TRUSTED_S:
            return kept[1]
        rows = [
            (
                vary,
                _memo(self._names, vary, _vary_names),
                variant,
                Lookup(Entry(entry_id, key, file, body_size, _memo(self._stored, meta, Stored.from_json), used), ""),
            )
            for entry_id, vary, variant, file, body_size, meta, used in self.db.execute(
                LOOKUP_SQL, (*where, _VARIANT_ROWS)
            ).fetchall()
        ]
        if len(self._rows) >= _MEMO_SIZE:
            self._rows.clear()
        self._rows[where] = (now, rows)
        return rows

    def lookup(self, key: Key, request_header: Callable[[str], str | None]) -> Lookup:
        """The variant stored for this request, if any."""
        rows = self._rows_of(key)
        if not rows:
            return _URI_MISS
        chosen: dict[str, str | None] = {}
        for vary, names, variant, found in rows:
            if vary not in chosen:
                chosen[vary] = select(names, request_header)
            if chosen[vary] == variant:
                return found
        return _VARY_MISS

    def open(self, entry: Entry) -> BinaryIO | None:
        """The entry's body, verified: its file positioned at the body, or,
        up to ``MEMORY_BODY_BYTES``, an ``io.BytesIO`` of the copy this worker
        keeps. None (and the entry removed) when the file is missing,
        truncated, overwritten or foreign.

        The header is read once per worker and file: later opens compare what
        fstat says (device, inode, size, mtime, ctime) with what it said then,
        so a file replaced, cut, grown or written to since is read again."""
        file = entry.file
        kept = self._bodies.get(file)
        if kept is not None and kept[0] == entry.id:
            return io.BytesIO(kept[1])
        known = self._verified.get(file)
        try:
            # Unbuffered: the descriptor sits at the body, which is sent from
            # it by sendfile(2) or pread(2), not read through a buffer.
            f = open(f"{self._objects}{file[:2]}/{file}", "rb", buffering=0)
        except FileNotFoundError:
            self.remove(entry, "file missing")
            return None
        try:
            # fstat before reading: what is remembered is never newer than its stamp.
            stamp = _stamp(os.fstat(f.fileno()))
            if known is not None and known[:3] == (stamp, entry.id, entry.body_size):
                f.seek(known[3])
            else:
                known = (stamp, entry.id, entry.body_size, _verify(f, stamp[2], entry))
                if len(self._verified) >= _MEMO_SIZE:
                    self._verified.clear()
                self._verified[file] = known
            if entry.body_size > MEMORY_BODY_BYTES:
                return f
            body = f.read(entry.body_size)
            if len(body) != entry.body_size:
                raise ValueError("the file ends before the body does")
        except (ValueError, struct.error, OSError, AttributeError) as exc:
            f.close()
            self._verified.pop(file, None)
            self.remove(entry, f"corrupt entry file {file}: {exc}")
            return None
        f.close()
        if self._bodies_size + len(body) > _MEMORY_TOTAL:
            self._bodies.clear()
            self._bodies_size = 0
        self._bodies[file] = (entry.id, body)
        self._bodies_size += len(body)
        return io.BytesIO(body)

    def remove(self, entry: Entry, why: str) -> None:
        log.warning("cache: removing %s (%s)", entry.key.url, why)
        try:
            with self._changing() as db:
                db.execute("DELETE FROM entries WHERE id = ? AND file = ?", (entry.id, entry.file))
        except sqlite3.Error as exc:
            self.trouble.report("index", "cache: index write failed: %s", exc)
        self._unlink([entry.file])

    def touch(self, entry: Entry, now: float) -> None:
        if now - entry.used < TOUCH_INTERVAL_S:
            return
        key = entry.key
        self._rows.pop((key.host, key.target, key.scheme), None)  # read again, with the new time
        try:
            self.db.execute("UPDATE entries SET used = ? WHERE id = ?", (now, entry.id))
        except sqlite3.Error as exc:
            self.trouble.report("index", "cache: index write failed: %s", exc)

    def refresh(self, entry: Entry, stored: Stored) -> None:
        """A 304 refreshed the entry's headers (the body file is unchanged)."""
        try:
            with self._changing() as db:
                db.execute(
                    "UPDATE entries SET meta = ?, used = ? WHERE id = ? AND file = ?",
                    (stored.to_json(), time.time(), entry.id, entry.file),
                )
        except sqlite3.Error as exc:
            self.trouble.report("index", "cache: index write failed: %s", exc)

    # -- fills ----------------------------------------------------------------------

    def begin_fill(self, key: Key, vary: tuple[str, ...], variant: str, stored: Stored) -> Fill | None:
        """A temp file to stream the body into; None if the cache cannot take it."""
        try:
            start_seq = _value(self.db, "SELECT COALESCE(MAX(seq), 0) FROM invalidations")
        except sqlite3.Error as exc:
            self.trouble.report("index", "cache: index unusable, passing through: %s", exc)
            return None
        vary_text = json.dumps(list(vary), separators=(",", ":"))
        fill = Fill(self, key, key.entry_id(vary_text, variant), vary_text, variant, stored, start_seq)
        return fill if fill.open() else None

    def _invalidated(self, db: sqlite3.Connection, fill: Fill) -> bool:
        """Whether a purge, ban or invalidation issued since the fill began hits it."""
        pruned = _value(db, "SELECT value FROM state WHERE name = 'pruned_upto'")
        if pruned > fill.start_seq:
            return True
        rows = db.execute(
            "SELECT kind, host, target, expr FROM invalidations WHERE seq > ?", (fill.start_seq,)
        ).fetchall()
        key = fill.key
        tags = set(surrogate_keys(fill.stored.header("surrogate-key")) or ())
        for kind, host, target, expr in rows:
            if kind == "url" and (host is None or host == key.host) and target == key.target:
                return True
            if kind == "ban" and _ban_matches(expr, key, fill.stored):
                return True
            if kind == "tag" and tags.intersection(expr.split()):
                return True
        return False

    def publish(self, fill: Fill, disk_size: int) -> bool:
        """Rename the finished temp file into place and add its row, atomically
        for every reader; evicts to stay within ``max_size``."""
        final = self._path(fill.file)
        removed: list[str] = []
        try:
            final.parent.mkdir(exist_ok=True)
            try:
                with self._changing() as db:
                    if self._invalidated(db, fill):
                        raise _Invalidated
                    key = fill.key
                    old = _one(db, "SELECT file FROM entries WHERE id = ?", (fill.id,))
                    if old:
                        removed.append(old[0])
                        db.execute("DELETE FROM entries WHERE id = ?", (fill.id,))
                    siblings = db.execute(
                        "SELECT id, file FROM entries WHERE host = ? AND target = ? AND scheme = ? ORDER BY used DESC",
                        (key.host, key.target, key.scheme),
                    ).fetchall()
                    for entry_id, file in siblings[max(0, self.config.max_variants - 1) :]:
                        removed.append(file)
                        db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                    removed.extend(self._evict_in(db, disk_size))
                    _add(db, {"evictions": len(removed) - (1 if old else 0)})  # the replaced entry is no eviction
                    os.rename(fill.temp, final)
                    now = time.time()
                    db.execute(
                        "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            fill.id,
                            key.scheme,
                            key.host,
                            key.target,
                            fill.vary,
                            fill.variant,
                            fill.file,
                            fill.written,
                            disk_size,
                            fill.stored.status,
                            fill.stored.to_json(),
                            now,
                            now,
                        ),
                    )
                    db.executemany(
                        "INSERT OR IGNORE INTO tags VALUES (?, ?)",
                        [(tag, fill.id) for tag in surrogate_keys(fill.stored.header("surrogate-key")) or ()],
                    )
            except BaseException:
                self._unlink([fill.file])  # renamed into place but not committed
                raise
        except _Invalidated:
            return False
        except (OSError, sqlite3.Error) as exc:
            kind = "full" if _is_full(exc) else "index"
            self.trouble.report(kind, "cache: cannot store %s, passing through: %s", fill.key.url, exc)
            return False
        self.trouble.ok("index")
        self._unlink(removed)
        return True

    # -- fills in flight (collapsed misses, background revalidation) -------------------

    def claim(self, key: Key, stall_s: float) -> Claim:
        """Become the one request of the machine fetching ``key`` from
        next-hop, or learn which fill already is. A row whose owner process is
        gone, or that made no progress for ``stall_s``, is taken over."""
        db = self.db
        url = key.url
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = _one(db, f"SELECT {FillRow.COLUMNS} FROM fills WHERE url = ?", (url,))
            if row is not None:
                current = FillRow(*row)
                if current.state in ACTIVE_FILLS and now - current.beat < stall_s and pid_alive(current.pid):
                    db.execute("COMMIT")
                    return Claim(self, url, None, current)
            token = secrets.token_hex(8)
            db.execute(
                "DELETE FROM fills WHERE beat < ? AND state NOT IN ('pending', 'streaming')", (now - _FILL_ROW_KEEP_S,)
            )
            db.execute(
                "INSERT OR REPLACE INTO fills (url, token, pid, state, beat) VALUES (?, ?, ?, 'pending', ?)",
                (url, token, os.getpid(), now),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return Claim(self, url, token, None)

    def fill_row(self, url: str) -> FillRow | None:
        row = _one(self.db, f"SELECT {FillRow.COLUMNS} FROM fills WHERE url = ?", (url,))
        return FillRow(*row) if row is not None else None

    # -- size ------------------------------------------------------------------------

    def _evict_in(self, db: sqlite3.Connection, incoming: int) -> list[str]:
        """Delete least recently used rows until ``incoming`` more bytes fit."""
        removed: list[str] = []
        total = _value(db, "SELECT bytes FROM totals WHERE id = 0")
        excess = total + incoming - self.config.max_size
        while excess > 0:
            rows = db.execute("SELECT id, file, disk_size FROM entries ORDER BY used LIMIT 64").fetchall()
            if not rows:
                break
            for entry_id, file, size in rows:
                db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                removed.append(file)
                excess -= size
                if excess <= 0:
                    break
        return removed

    def evict(self, incoming: int) -> None:
        with self._changing() as db:
            removed = self._evict_in(db, incoming)
            _add(db, {"evictions": len(removed)})
        self._unlink(removed)

    def sweep(self) -> None:
        for temp in (self.directory / "tmp").iterdir():
            temp.unlink(missing_ok=True)
        known = {file for (file,) in self.db.execute("SELECT file FROM entries").fetchall()}
        for sub in (self.directory / "objects").iterdir():
            if sub.is_dir():
                for path in sub.iterdir():
                    if path.name not in known:
                        path.unlink(missing_ok=True)

    # -- invalidation, purge, ban ----------------------------------------------------

    def _record(
        self, db: sqlite3.Connection, kind: str, host: str | None, target: str | None, expr: str | None
    ) -> None:
        now = time.time()
        # The same invalidation again (a retried or fanned-out message, the
        # same URL written to twice) replaces its record: a fill is checked
        # against records issued since it began, and the new one is later.
        db.execute(
            "DELETE FROM invalidations WHERE kind = ? AND host IS ? AND target IS ? AND expr IS ?",
            (kind, host, target, expr),
        )
        db.execute(
            "INSERT INTO invalidations (at, kind, host, target, expr) VALUES (?, ?, ?, ?, ?)",
            (now, kind, host, target, expr),
        )
        old = _value(db, "SELECT MAX(seq) FROM invalidations WHERE at < ?", (now - INVALIDATION_WINDOW_S,))
        if old is not None:
            db.execute("DELETE FROM invalidations WHERE seq <= ?", (old,))
            db.execute("UPDATE state SET value = MAX(value, ?) WHERE name = 'pruned_upto'", (old,))

    def invalidate(self, host: str | None, target: str, purge: bool = False) -> int:
        """Remove every variant of ``target`` (on ``host``, or on every host
        when None), in both schemes; fills in flight for it will not publish.
        ``purge``: a purge message (counted)."""
        host = host.lower() if host is not None else None
        with self._changing() as db:
            if host is None:
                rows = db.execute("SELECT id, file FROM entries WHERE target = ?", (target,)).fetchall()
            else:
                rows = db.execute(
                    "SELECT id, file FROM entries WHERE host = ? AND target = ?", (host, target)
                ).fetchall()
            db.executemany("DELETE FROM entries WHERE id = ?", [(r[0],) for r in rows])
            self._record(db, "url", host, target, None)
            _add(db, {"purges": int(purge)})
        self._unlink([r[1] for r in rows])
        return len(rows)

    def ban(self, text: str) -> int:
        """Every stored object the ban expression matches is removed; the
        ban is recorded first, so a fill in flight checks it before publishing."""
        from . import ban as ban_module

        expr = ban_module.parse(text)
        db = self.db
        with _transaction(db):
            self._record(db, "ban", None, None, str(expr))
            _add(db, {"bans": 1})
        matched: list[tuple[str, str]] = []
        for entry_id, scheme, host, target, file, meta in db.execute(
            "SELECT id, scheme, host, target, file, meta FROM entries"
        ).fetchall():
            if expr.matches(_subject(Key(scheme, host, target), Stored.from_json(meta))):
                matched.append((entry_id, file))
        for start in range(0, len(matched), 500):  # short transactions: workers keep writing
            batch = matched[start : start + 500]
            with self._changing():
                db.executemany("DELETE FROM entries WHERE id = ? AND file = ?", batch)
        self._unlink([file for _, file in matched])
        return len(matched)

    def purge_tags(self, tags: list[str]) -> int:
        """Remove every object tagged (``Surrogate-Key``) with any of ``tags``,
        in one transaction: at the commit no worker finds them any more; fills
        in flight carrying one of them will not publish."""
        db = self.db
        unique = list(dict.fromkeys(tags))
        with self._changing():
            rows: set[tuple[str, str]] = set()
            for start in range(0, len(unique), 500):
                batch = unique[start : start + 500]
                rows.update(db.execute(TAGGED_SQL.format(",".join("?" * len(batch))), batch).fetchall())
            db.executemany("DELETE FROM entries WHERE id = ? AND file = ?", sorted(rows))
            self._record(db, "tag", None, None, " ".join(unique))
            _add(db, {"purges": 1})
        self._unlink([file for _, file in rows])
        return len(rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._rows.clear()
        if self._generation is not None:
            self._generation.close()
            self._generation = None


def _subject(key: Key, stored: Stored) -> BanSubject:
    from . import ban as ban_module

    headers: dict[str, str] = {}
    for name, value in stored.headers:
        lower = name.lower()
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return ban_module.BanSubject(url=key.target, host=key.host, status=stored.status, headers=headers)


def _ban_matches(text: str, key: Key, stored: Stored) -> bool:
    from . import ban as ban_module

    return bool(ban_module.parse(text).matches(_subject(key, stored)))


class Fill:
    """A response body being written to a temp file while it streams."""

    def __init__(
        self, store: Store, key: Key, entry_id: str, vary: str, variant: str, stored: Stored, start_seq: int
    ) -> None:
        self.store = store
        self.key = key
        self.id = entry_id
        self.vary = vary
        self.variant = variant
        self.stored = stored
        self.start_seq = start_seq
        self.file = secrets.token_hex(16)
        self.temp = store.directory / "tmp" / self.file
        self.written = 0
        self._f: BinaryIO | None = None
        self._head_size = 0

    def open(self) -> bool:
        head = json.dumps(
            {"id": self.id, "url": self.key.url, "body": 0, "created": time.time()}, separators=(",", ":")
        ).encode()
        try:
            # Unbuffered: readers of a collapsed miss follow the file as it grows.
            self._f = self.temp.open("xb", buffering=0)
            _write_all(self._f, _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head) + _HEAD_ROOM))
            _write_all(self._f, head + b" " * _HEAD_ROOM)  # room for the body length, written at the end
        except OSError as exc:
            self._fail(exc)
            return False
        self._head_size = _PREAMBLE.size + len(head) + _HEAD_ROOM
        return True

    @property
    def body_offset(self) -> int:
        return self._head_size

    def _fail(self, exc: OSError) -> None:
        kind = "full" if exc.errno in _FULL else "disk"
        self.store.trouble.report(kind, "cache: cannot write %s, passing through: %s", self.temp.parent, exc)
        self.abandon()

    @property
    def active(self) -> bool:
        return self._f is not None

    def write(self, data: bytes) -> None:
        """Append body bytes; on any failure the fill is abandoned, silently
        after the first report (the response itself goes on)."""
        f = self._f
        if f is None:
            return
        if self.written + len(data) > self.store.config.max_object_size:
            self.abandon()
            return
        try:
            _write_all(f, data)
        except OSError as exc:
            self._fail(exc)
            return
        self.written += len(data)

    def finish(self) -> bool:
        """The body is complete and verified: finalise the header and publish."""
        f = self._f
        if f is None:
            return False
        head = json.dumps(
            {"id": self.id, "url": self.key.url, "body": self.written, "created": time.time(), "done": 1},
            separators=(",", ":"),
        ).encode()
        try:
            room = self._head_size - _PREAMBLE.size
            if len(head) > room:
                raise OSError(errno.EOVERFLOW, "entry header grew past its room")
            # One write at offset 0: a reader of the growing file sees the
            # header either before or after, never half of it.
            os.pwrite(f.fileno(), _PREAMBLE.pack(MAGIC, FORMAT_VERSION, room) + head.ljust(room), 0)
            f.close()
        except OSError as exc:
            self._fail(exc)
            return False
        self._f = None
        if self.store.publish(self, self._head_size + self.written):
            self.store.trouble.ok("full")
            return True
        self.temp.unlink(missing_ok=True)
        return False

    def abandon(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        self.temp.unlink(missing_ok=True)


def _write_all(f: BinaryIO, data: bytes) -> None:
    """An unbuffered file's ``write`` may take part of the data."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def finished_length(fd: int) -> int | None:
    """The body length of a temp file its fill finished (the header says
    ``done``), else None: what a reader of a collapsed miss waits for."""
    preamble = os.pread(fd, _PREAMBLE.size, 0)
    if len(preamble) != _PREAMBLE.size:
        return None
    _, _, length = _PREAMBLE.unpack(preamble)
    try:
        head = json.loads(os.pread(fd, min(length, 65536), _PREAMBLE.size))
    except ValueError:
        return None
    return int(head["body"]) if head.get("done") else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class FillRow:
    """One row of ``fills``: who fetches a URL and, once next-hop answered,
    what (the head, as a ``Stored``, and where the body grows)."""

    COLUMNS = "token, pid, state, beat, temp, body_offset, vary, variant, meta, length"

    token: str
    pid: int
    state: str
    beat: float
    temp: str | None
    body_offset: int | None
    vary: str | None
    variant: str | None
    meta: str | None
    length: int | None


class Claim:
    """The result of ``Store.claim``: ``leader`` (this request fetches, and
    must end the row with one of the methods below) or the fill in flight."""

    def __init__(self, store: Store, url: str, token: str | None, current: FillRow | None) -> None:
        self.store = store
        self.url = url
        self.token = token
        self.current = current
        self._beat = 0.0

    @property
    def leader(self) -> bool:
        return self.token is not None

    def _update(self, sql: str, args: tuple[object, ...]) -> None:
        if self.token is None:
            return
        try:
            self.store.db.execute(f"UPDATE fills SET {sql} WHERE url = ? AND token = ?", (*args, self.url, self.token))
        except sqlite3.Error as exc:
            self.store.trouble.report("index", "cache: index write failed: %s", exc)

    def streaming(self, fill: Fill, length: int | None) -> None:
        """Next-hop's answer is being stored: waiters may follow the temp file."""
        self._beat = time.time()
        self._update(
            "state = 'streaming', beat = ?, temp = ?, body_offset = ?, vary = ?, variant = ?, meta = ?, length = ?",
            (self._beat, fill.file, fill.body_offset, fill.vary, fill.variant, fill.stored.to_json(), length),
        )

    def beat(self, interval: float) -> None:
        """The fill made progress (written at most every ``interval`` seconds)."""
        now = time.time()
        if now - self._beat >= interval:
            self._beat = now
            self._update("beat = ?", (now,))

    def end(self, state: str) -> None:
        """``done``, ``refreshed`` or ``released``; once only."""
        self._update("state = ?, beat = ?", (state, time.time()))
        self.token = None


def iter_file(f: BinaryIO, length: int, block: int) -> Iterator[bytes]:
    """Up to ``length`` bytes of ``f`` in blocks (stops early at end of file)."""
    while length > 0:
        data = f.read(min(block, length))
        if not data:
            return
        length -= len(data)
        yield data
