"""Durable per-subscriber FIFO of station frames for secondary backends (SQLite, WAL).

When a secondary backend is slow or down, the fan-out runtime spills the copies it owes
that subscriber here and replays them in order once the subscriber is back. One table
holds every subscriber's rows; an AUTOINCREMENT id gives the order and is never reused,
so an id the runtime holds from `peek` always names the same row.

Durability: WAL mode with ``synchronous=NORMAL`` by default. A commit is written to the WAL
file before `append` returns, so it survives the process being killed (SIGKILL, OOM, a
crash); the WAL is fsynced only at checkpoints, so the last commits before a power loss or
kernel crash may be lost. ``synchronous="FULL"`` fsyncs every commit and survives power
loss, at a cost measured in docs/duplication.md.

Bounds: at most ``max_rows_per_subscriber`` rows and ``max_bytes_per_subscriber`` bytes
per subscriber (`append` drops that subscriber's oldest rows beyond either) and rows no
older than ``max_age_s`` once `expire` has run (the runtime calls it on a timer). Every
drop is returned to the caller to be counted.

One `Outbox` owns its file: the connection holds SQLite's exclusive lock for its lifetime,
so a second process (another node on the same state directory, or the sqlite3 shell) gets
an `OutboxError` instead of sharing the queue. Methods are thread-safe and blocking; the
trio runtime calls them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Outbox", "OutboxError", "OutboxItem", "Synchronous"]

Synchronous = Literal["NORMAL", "FULL"]

# Bumped when the table layout changes; a file with another version is refused, not guessed.
_SCHEMA_VERSION = 1

_COLUMNS = ("id", "subscriber", "station", "subprotocol", "action", "payload", "created")

# AUTOINCREMENT, not a plain rowid: ids are never reused, even after the newest row is
# deleted, so an ack for an id the runtime peeked before a drop cannot hit a later row
_CREATE_TABLE = """
    CREATE TABLE IF NOT EXISTS outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        subscriber TEXT NOT NULL,
        station TEXT NOT NULL,
        subprotocol TEXT NOT NULL,
        action TEXT NOT NULL,
        payload TEXT NOT NULL,
        created REAL NOT NULL
    )
"""
_CREATE_INDEX = "CREATE INDEX IF NOT EXISTS outbox_subscriber_id ON outbox (subscriber, id)"

_INSERT = (
    "INSERT INTO outbox (subscriber, station, subprotocol, action, payload, created)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_PEEK = (
    "SELECT id, station, subprotocol, action, payload, created FROM outbox"
    " WHERE subscriber = ? AND id > ? ORDER BY id LIMIT ?"
)
_COUNT = "SELECT COUNT(*) FROM outbox WHERE subscriber = ?"
_DELETE_UP_TO = "DELETE FROM outbox WHERE subscriber = ? AND id <= ?"
# what a row counts against the byte bound: the UTF-8 bytes of its text columns (the
# database is UTF-8, so this is what they take in the file). SQLite 3.43's octet_length
# would spare the cast; the stdlib's SQLite may be older.
_SIZE = (
    "length(CAST(station AS BLOB)) + length(CAST(subprotocol AS BLOB))"
    " + length(CAST(action AS BLOB)) + length(CAST(payload AS BLOB))"
)
_BYTES = f"SELECT COALESCE(SUM({_SIZE}), 0) FROM outbox WHERE subscriber = ?"
# the queue's rows from the head with their sizes; the caller stops reading where the
# bounds are met, so the cost is the number of rows dropped
_OLDEST_SIZES = f"SELECT id, {_SIZE} FROM outbox WHERE subscriber = ? ORDER BY id"
_DELETE_UP_TO_SIZES = _DELETE_UP_TO + f" RETURNING {_SIZE}"
_LAST_ID = "SELECT MAX(id) FROM outbox WHERE subscriber = ?"
# at most `LIMIT` of a queue's oldest rows that come before an id (one statement in
# autocommit mode, so one transaction per chunk)
_EXPIRE_HEAD = (
    "DELETE FROM outbox WHERE subscriber = ? AND id <= (SELECT MAX(id) FROM"
    " (SELECT id FROM outbox WHERE subscriber = ? AND id < ? ORDER BY id LIMIT ?))"
)
_EXPIRE_HEAD_SIZES = _EXPIRE_HEAD + f" RETURNING {_SIZE}"
_EXPIRE_CHUNK = 5_000
# the id of the n-th oldest row (OFFSET n-1), i.e. the last one of the n to drop
_NTH_OLDEST = "SELECT id FROM outbox WHERE subscriber = ? ORDER BY id LIMIT 1 OFFSET ?"
# walks the (subscriber, id) index from the head and stops at the first young row
_FIRST_YOUNG = (
    "SELECT id FROM outbox WHERE subscriber = ? AND created >= ? ORDER BY id LIMIT 1"
)
# distinct subscribers by hopping along the index (one probe per subscriber) rather than
# reading every row: replay after a restart must not scan a million spilled frames
_SUBSCRIBERS = """
    WITH RECURSIVE s(name) AS (
        SELECT MIN(subscriber) FROM outbox
        UNION ALL
        SELECT (SELECT MIN(subscriber) FROM outbox WHERE subscriber > s.name)
        FROM s WHERE s.name IS NOT NULL
    )
    SELECT name FROM s WHERE name IS NOT NULL
"""

# SQLite primary result codes used to explain a failure (sqlite3.Error.sqlite_errorcode
# carries extended codes; the low byte is the primary one)
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


def _utf8_len(text: str) -> int:
    # isascii is O(1) on CPython's compact strings; most OCPP text is ASCII
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class OutboxError(Exception):
    """The outbox file cannot be opened, read or written; the message names the file.

    ``corrupt`` is true when SQLite reports the file damaged or not a database: the caller
    may move it aside and start an empty outbox (losing what it held) or stop the node.
    """

    def __init__(self, message: str, path: Path, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.corrupt = corrupt


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One copied station frame waiting for a subscriber.

    ``payload`` is the JSON text of the CALL's payload exactly as the station sent it, so a
    replay carries the original content; ``created`` is when the node received the frame
    (epoch seconds) and is what the age bound measures.
    """

    station: str
    subprotocol: str
    action: str
    payload: str
    created: float


class Outbox:
    """A durable FIFO per subscriber in one SQLite file (created with its directory).

    ``path`` is the database file, e.g. ``state_dir / "outbox.sqlite3"``. A row counts
    against ``max_bytes_per_subscriber`` with the UTF-8 bytes of its payload, station,
    subprotocol and action. ``synchronous`` chooses what a commit survives: "NORMAL"
    (default) a process crash, "FULL" also a power loss (an fsync per commit).
    ``busy_timeout_s`` is how long opening waits for another process that holds the file
    before failing.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_rows_per_subscriber: int = 1_000_000,
        max_bytes_per_subscriber: int = 1 << 30,
        max_age_s: float = 7 * 86400,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_s: float = 2.0,
    ) -> None:
        if max_rows_per_subscriber < 1:
            raise ValueError("max_rows_per_subscriber must be at least 1")
        if max_bytes_per_subscriber < 1:
            raise ValueError("max_bytes_per_subscriber must be at least 1")
        if not max_age_s > 0:
            raise ValueError("max_age_s must be positive")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self._path = Path(path)
        self._max_rows = max_rows_per_subscriber
        self._max_bytes = max_bytes_per_subscriber
        self._max_age_s = float(max_age_s)
        self._lock = threading.Lock()
        # rows per subscriber, filled on first use by one COUNT and then kept by our own
        # writes: exact because the exclusive lock makes this the file's only writer, and
        # it spares a COUNT over up to max_rows rows on every append
        self._counts: dict[str, int] = {}
        # bytes per subscriber (see _SIZE), kept the same way; filled by the first append
        # that finds the file larger than the byte bound (one pass over the queue's rows):
        # until then no queue can be over it and nobody pays for counting bytes
        self._bytes: dict[str, int] = {}
        self._conn: sqlite3.Connection | None = self._open(synchronous, busy_timeout_s)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def max_rows_per_subscriber(self) -> int:
        """The count bound enforced by `append`."""
        return self._max_rows

    @property
    def max_bytes_per_subscriber(self) -> int:
        """The byte bound enforced by `append`."""
        return self._max_bytes

    @property
    def max_age_s(self) -> float:
        """The age bound enforced by `expire`."""
        return self._max_age_s

    # -- opening ---------------------------------------------------------------------------

    def _open(self, synchronous: Synchronous, busy_timeout_s: float) -> sqlite3.Connection:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(
                f"outbox {self._path}: cannot create directory {self._path.parent}: {exc}",
                self._path,
            ) from exc
        if self._path.exists() and not self._path.is_file():
            raise OutboxError(f"outbox {self._path}: not a regular file", self._path)
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: no implicit transactions; every write below says
            # BEGIN/COMMIT itself so one append is exactly one commit
            conn = sqlite3.connect(
                self._path,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            # before WAL is entered, so the WAL index lives in heap memory (no -shm file)
            # and the lock taken below is kept until close
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise OutboxError(
                    f"outbox {self._path}: cannot enable WAL mode (got {mode!r})", self._path
                )
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            # the WAL is reset after each checkpoint; this truncates it back instead of
            # leaving it at the size of the largest burst
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock now, so a rival fails here
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, _SCHEMA_VERSION):
                raise OutboxError(
                    f"outbox {self._path}: schema version {version} is not supported "
                    f"(this node writes version {_SCHEMA_VERSION})",
                    self._path,
                )
            conn.execute(_CREATE_TABLE)
            # checked before the index, whose creation would fail on a foreign table
            columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(outbox)"))
            if columns != _COLUMNS:
                raise OutboxError(
                    f"outbox {self._path}: table 'outbox' has columns {columns}, "
                    f"expected {_COLUMNS}",
                    self._path,
                )
            conn.execute(_CREATE_INDEX)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise self._error("open", exc) from exc
        except OutboxError:
            if conn is not None:
                conn.close()
            raise
        return conn

    # -- errors ----------------------------------------------------------------------------

    def _error(self, what: str, exc: sqlite3.Error) -> OutboxError:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        corrupt = primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
        if corrupt:
            hint = "the file is damaged or not an outbox database; move it aside to start empty"
        elif primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            hint = ("another process or Outbox holds it: a second node on the same "
                    "state_dir, or two subscribers mapped to one file?")
        elif primary == _SQLITE_FULL:
            hint = "the disk is full"
        elif primary in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
            hint = "check that the file and its directory exist and are writable"
        elif primary == _SQLITE_IOERR:
            hint = "I/O error on the file"
        else:
            hint = ""
        text = f"outbox {self._path}: cannot {what}: {exc}"
        return OutboxError(f"{text} ({hint})" if hint else text, self._path, corrupt=corrupt)

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self._path}: closed", self._path)
        return self._conn

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # the original error is the one worth reporting
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _count(self, conn: sqlite3.Connection, subscriber: str) -> int:
        cached = self._counts.get(subscriber)
        if cached is None:
            cached = int(conn.execute(_COUNT, (subscriber,)).fetchone()[0])
            self._counts[subscriber] = cached
        return cached

    def _size(self, conn: sqlite3.Connection, subscriber: str, added: int) -> int | None:
        """The queue's bytes with ``added`` more, or None while the whole file is smaller
        than the byte bound (the rows' text is in the file, so no queue can be over it)."""
        cached = self._bytes.get(subscriber)
        if cached is None:
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            if pages * page_size + added <= self._max_bytes:
                return None
            cached = int(conn.execute(_BYTES, (subscriber,)).fetchone()[0])
            self._bytes[subscriber] = cached
        return cached + added

    def _forget(self, subscriber: str, rows: int, size: int | None) -> None:
        """Rows left the queue (ack, expiry): keep the cached totals exact."""
        if subscriber in self._counts:
            self._counts[subscriber] -= rows
        if size is not None and subscriber in self._bytes:
            self._bytes[subscriber] -= size

    # -- queue operations ------------------------------------------------------------------

    def append(self, subscriber: str, items: Sequence[OutboxItem]) -> int:
        """Append ``items`` to ``subscriber``'s queue in one transaction (one commit).

        The items are durable (per ``synchronous``) when this returns. If the queue then
        holds more than ``max_rows_per_subscriber`` rows or ``max_bytes_per_subscriber``
        bytes, its oldest rows are deleted in the same transaction until it holds neither
        (a batch larger than the bounds keeps its own newest rows that fit); returns how
        many were dropped (0 normally). Raises ValueError, before writing anything, for an
        item whose text cannot be stored as UTF-8 (a lone surrogate).
        """
        if not items:
            return 0
        added = 0
        for n, i in enumerate(items):
            try:
                added += _utf8_len(i.station) + _utf8_len(i.subprotocol) + _utf8_len(
                    i.action) + _utf8_len(i.payload)
            except UnicodeEncodeError as exc:
                raise ValueError(f"outbox {self._path}: item {n} for {subscriber!r} is not "
                                 f"valid UTF-8 text: {exc}") from None
        rows = [
            (subscriber, i.station, i.subprotocol, i.action, i.payload, i.created)
            for i in items
        ]
        with self._lock:
            conn = self._live()
            try:
                total = self._count(conn, subscriber) + len(rows)
                size = self._size(conn, subscriber, added)
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, rows)
                dropped = freed = 0
                over = total > self._max_rows or (size is not None and size > self._max_bytes)
                if over:
                    dropped, freed = self._drop_oldest(
                        conn, subscriber, total - self._max_rows,
                        None if size is None else size - self._max_bytes)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise self._error(f"append to {subscriber!r}", exc) from exc
            except BaseException:
                # not SQLite's doing (a KeyboardInterrupt, a bug): no transaction may be
                # left open for the next append to trip over
                self._rollback(conn)
                raise
            # only after the commit: a failed append leaves the cache as the file is
            if over and not dropped:
                # the cache was off: recount next time
                self._counts.pop(subscriber, None)
                self._bytes.pop(subscriber, None)
            else:
                self._counts[subscriber] = total - dropped
                if size is not None:
                    self._bytes[subscriber] = size - freed
            return dropped

    @staticmethod
    def _drop_oldest(
        conn: sqlite3.Connection, subscriber: str, rows: int, size: int | None
    ) -> tuple[int, int]:
        """Delete the fewest oldest rows that take at least ``rows`` rows and ``size``
        bytes (None: bytes are not counted) off the queue; returns (rows, bytes) deleted."""
        if size is None:
            row = conn.execute(_NTH_OLDEST, (subscriber, rows - 1)).fetchone()
            if row is None:
                # fewer than n rows, so the count was wrong (cannot happen while this is
                # the only writer): drop nothing rather than guess, least of all the new rows
                return 0, 0
            return int(conn.execute(_DELETE_UP_TO, (subscriber, row[0])).rowcount), 0
        n = freed = 0
        last: int | None = None
        cursor = conn.execute(_OLDEST_SIZES, (subscriber,))
        try:
            for row_id, row_size in cursor:
                n, freed, last = n + 1, freed + int(row_size), int(row_id)
                if n >= rows and freed >= size:
                    break
            else:
                # the queue ran out first, so the cached totals were wrong (cannot happen
                # while this is the only writer): drop nothing rather than guess, least of
                # all the new rows
                return 0, 0
        finally:
            cursor.close()
        deleted = conn.execute(_DELETE_UP_TO_SIZES, (subscriber, last)).fetchall()
        return len(deleted), sum(int(r[0]) for r in deleted)

    def peek(
        self, subscriber: str, limit: int, *, after_id: int = 0
    ) -> list[tuple[int, OutboxItem]]:
        """Up to ``limit`` of ``subscriber``'s rows, oldest first, as ``(id, item)``.

        Nothing is removed: `ack` the ids once the subscriber has them. ``after_id`` skips
        rows up to that id, to read the next batch while the previous one is in flight.
        """
        if limit <= 0:
            return []
        with self._lock:
            conn = self._live()
            try:
                rows = conn.execute(_PEEK, (subscriber, after_id, limit)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(f"read {subscriber!r}", exc) from exc
        return [(r[0], OutboxItem(r[1], r[2], r[3], r[4], r[5])) for r in rows]

    def ack(self, subscriber: str, up_to_id: int) -> int:
        """Delete ``subscriber``'s rows with id <= ``up_to_id`` (delivered); returns how many."""
        with self._lock:
            conn = self._live()
            try:
                # a single statement in autocommit mode is its own transaction
                if subscriber in self._bytes:
                    sizes = conn.execute(_DELETE_UP_TO_SIZES, (subscriber, up_to_id)).fetchall()
                    deleted, size = len(sizes), sum(int(r[0]) for r in sizes)
                else:
                    deleted = conn.execute(_DELETE_UP_TO, (subscriber, up_to_id)).rowcount
                    size = None
            except sqlite3.Error as exc:
                raise self._error(f"ack {subscriber!r}", exc) from exc
            self._forget(subscriber, deleted, size)
            return deleted

    def count(self, subscriber: str) -> int:
        """How many rows ``subscriber`` has waiting."""
        with self._lock:
            conn = self._live()
            try:
                return self._count(conn, subscriber)
            except sqlite3.Error as exc:
                raise self._error(f"count {subscriber!r}", exc) from exc

    def subscribers(self) -> list[str]:
        """Subscribers with rows waiting, sorted: what to replay after a restart."""
        with self._lock:
            conn = self._live()
            try:
                return [str(r[0]) for r in conn.execute(_SUBSCRIBERS)]
            except sqlite3.Error as exc:
                raise self._error("list subscribers", exc) from exc

    def expire(self, now: float) -> dict[str, int]:
        """Delete rows created more than ``max_age_s`` before ``now``; drops per subscriber.

        Each queue loses its head up to the first row still young: rows are appended in
        arrival order, so that is every expired row, and a queue never gets a hole in its
        order. A row stamped out of order (wall clock stepped back) leaves with the younger
        row ahead of it, at most the size of the step late. Subscribers that lost nothing
        are not in the result. Deletes commit in chunks of a few thousand rows with the lock
        released in between, so expiring a million-row backlog does not stall appends for
        seconds (the deletes already committed stay if a later chunk fails).
        """
        cutoff = now - self._max_age_s
        dropped: dict[str, int] = {}
        with self._lock:
            conn = self._live()
            try:
                # per queue, the id its expired head ends before: the first young row, or
                # one past the newest row when all are old. Fixed now, because rows that
                # other threads append between chunks get higher ids and must stay.
                limits: list[tuple[str, int]] = []
                for (subscriber,) in conn.execute(_SUBSCRIBERS).fetchall():
                    young = conn.execute(_FIRST_YOUNG, (subscriber, cutoff)).fetchone()
                    if young is None:
                        young = conn.execute(_LAST_ID, (subscriber,)).fetchone()
                        limits.append((str(subscriber), int(young[0]) + 1))
                    else:
                        limits.append((str(subscriber), int(young[0])))
            except sqlite3.Error as exc:
                raise self._error("expire", exc) from exc
        for subscriber, before_id in limits:
            while True:
                n = self._expire_chunk(subscriber, before_id)
                if n:
                    dropped[subscriber] = dropped.get(subscriber, 0) + n
                if n < _EXPIRE_CHUNK:
                    break
        return dropped

    def _expire_chunk(self, subscriber: str, before_id: int) -> int:
        with self._lock:
            conn = self._live()
            args = (subscriber, subscriber, before_id, _EXPIRE_CHUNK)
            try:
                if subscriber in self._bytes:
                    sizes = conn.execute(_EXPIRE_HEAD_SIZES, args).fetchall()
                    n, size = len(sizes), sum(int(r[0]) for r in sizes)
                else:
                    n, size = conn.execute(_EXPIRE_HEAD, args).rowcount, None
            except sqlite3.Error as exc:
                raise self._error(f"expire {subscriber!r}", exc) from exc
            self._forget(subscriber, n, size)
            return n

    def close(self) -> None:
        """Checkpoint the WAL into the file and release it; later calls raise OutboxError.

        Safe to call more than once.
        """
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise self._error("close", exc) from exc

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
