"""The device's crash-safe store-and-forward queue: SQLite (WAL), per-stream sequence numbers, caps.

Contract (huey-storage style): ``append_*`` → ``claim`` → ``mark_sent`` → ``ack`` (delete), with
``release_all`` after a reconnect or restart. Rows are deleted only by the cloud's ``ack``
(watermark), by ``ack_range`` in ``ack = broker`` mode, or by the caps (oldest rows of the
lowest-priority stream first, every drop counted).

Choices written down here:

- Sequence numbers start at 0 per stream, are consecutive, and are never reused: ``next_seq`` is
  stored in the ``streams`` table, so a restart continues even when every row was deleted. A
  ``ResultBatch.floor`` of -1 therefore means "nothing acknowledged or dropped yet".
- Counters (held rows, held bytes, drops, next seq) live in the ``streams`` table and are updated
  in the same transaction as the rows, so nothing is ever counted with ``COUNT(*)``.
- "Sent" is kept in memory only: a restart means every unacknowledged row goes again anyway, so
  persisting it would only add flash writes. ``claim`` leases the rows it returns (they are not
  handed out again until ``resend_after`` has passed, ``release``/``release_all`` is called, or a
  restart); ``mark_sent`` restarts the lease clock at the PUBACK.
- Sizes are estimates: a result row counts ``RESULT_ROW_BYTES`` plus its ``x`` blob, a message
  ``MESSAGE_ROW_BYTES`` plus its payload. ``bytes_written`` is the logical bytes of rows and
  metadata committed (SQLite writes whole pages, so the flash sees somewhat more).
- When an append goes over a cap, older rows are dropped first in the order telemetry, stats,
  results; the rows being appended are dropped (oldest first) only if they alone exceed a cap.
  The append itself always succeeds.
- The file shrinks: ``auto_vacuum=INCREMENTAL`` is set at creation and ``incremental_vacuum`` runs
  after a delete once free pages exceed a quarter of the file (and 1 MiB), so a steady stream
  of appends and acks reuses pages without churning, while a drained backlog is given back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from runtime.errors import OutboxError

__all__ = [
    "DROP_ORDER",
    "MESSAGE_ROW_BYTES",
    "RESULT_ROW_BYTES",
    "STREAMS",
    "Claim",
    "MetaValue",
    "Outbox",
    "OutboxStatus",
]

logger = logging.getLogger(__name__)

STREAMS: tuple[str, ...] = ("results", "telemetry", "stats")
#: Lowest priority first: the caps drop telemetry, then stats, then results.
DROP_ORDER: tuple[str, ...] = ("telemetry", "stats", "results")
_RANK = {stream: i for i, stream in enumerate(DROP_ORDER)}
#: Estimated bytes of a result row besides its ``x`` blob (five 8-byte columns plus record overhead).
RESULT_ROW_BYTES = 48
#: Estimated bytes of a message row besides its payload.
MESSAGE_ROW_BYTES = 16
#: Free pages kept before ``incremental_vacuum`` gives them back (256 x 4 KiB = 1 MiB).
VACUUM_MIN_PAGES = 256
#: Prefix of the ``meta`` keys the outbox keeps for itself.
_INTERNAL = "outbox."
_SCHEMA_VERSION = 1

MetaValue = str | int | float | bytes | None

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    held_rows INTEGER NOT NULL,
    held_bytes INTEGER NOT NULL,
    dropped INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    model_version INTEGER,
    y_pred REAL,
    x BLOB,
    y_true REAL
);
CREATE TABLE IF NOT EXISTS telemetry (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS stats (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
"""

# Size of one stored row as SQL, per stream (the tables and these expressions are fixed strings).
_SIZE_SQL = {
    "results": f"{RESULT_ROW_BYTES} + coalesce(length(x), 0)",
    "telemetry": f"{MESSAGE_ROW_BYTES} + length(payload)",
    "stats": f"{MESSAGE_ROW_BYTES} + length(payload)",
}


@dataclass(frozen=True, slots=True)
class Claim:
    """Rows ``seq_first..seq_last`` of one stream, leased for sending.

    ``floor``: every sequence number <= floor was acknowledged or dropped (``ResultBatch.floor``).
    Result claims fill the columns (``x``/``y_true`` are None when no row has one; missing
    values are None); message claims fill ``payload``.
    """

    stream: str
    seq_first: int
    seq_last: int
    floor: int
    resend: bool = False
    ts: list[float] = field(default_factory=list)
    model_version: list[int | None] = field(default_factory=list)
    y_pred: list[float | None] = field(default_factory=list)
    x: list[list[float | None] | None] | None = None
    y_true: list[float | None] | None = None
    payload: bytes = b""

    @property
    def n(self) -> int:
        return self.seq_last - self.seq_first + 1


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """A snapshot for telemetry and ``edgeloop device status``."""

    depth: dict[str, int]
    held_bytes: int
    dropped: dict[str, int]
    next_seq: dict[str, int]
    bytes_written: int
    last_ack_ts: float | None
    file_bytes: int


@dataclass(slots=True)
class _Counters:
    next_seq: int
    held_rows: int
    held_bytes: int
    dropped: int


@dataclass(slots=True)
class _TailChunk:
    first: int
    ts: list[float]
    mv: list[Any]
    y_pred: list[float | None]
    x: list[bytes | None]
    y_true: list[float | None]


TAIL_ROWS = 65536


@dataclass(slots=True)
class _Lease:
    first: int
    last: int
    since: float  # claim time, then PUBACK time; -inf once released
    sent: bool


@dataclass(slots=True)
class _Sending:
    cursor: int = 0  # every held row >= cursor is unsent and not leased
    leases: list[_Lease] = field(default_factory=list)  # sorted by first, all below cursor


class Outbox:
    """SQLite store-and-forward queue. Synchronous; every call is one short transaction."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_rows: int,
        max_bytes: int,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
    ) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be positive")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._counters: dict[str, _Counters] = {}
        self._sending = {s: _Sending() for s in STREAMS}
        self._bytes_written = 0
        self._last_ack_ts: float | None = None
        self._meta_dirty = False
        self._deleted: list[tuple[str, int, int]] = []  # ranges to forget once the transaction commits
        # The newest committed result rows, kept in memory so a claim of fresh rows need not read
        # back what was just written (the common case: the uplink keeps up). Correctness never
        # depends on it: any delete clears it, and a miss falls back to SQL.
        self._tail: deque[_TailChunk] = deque()
        self._tail_rows = 0
        self._warned_drop: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open: {exc}") from exc
        self._db = db
        try:
            self._setup(db, synchronous, busy_timeout)
        except sqlite3.Error as exc:
            db.close()
            self._db = None
            raise OutboxError(f"{self.path}: cannot open: {exc}") from exc
        except BaseException:
            db.close()
            self._db = None
            raise
        logger.debug("outbox %s open: %s", self.path, self._counters)

    def _setup(self, db: sqlite3.Connection, synchronous: str, busy_timeout: float) -> None:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        # auto_vacuum takes effect only before the first table exists; an older file is converted once.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.OperationalError("WAL journal mode unavailable")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA journal_size_limit=8388608")  # keep the -wal file from staying large
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.executemany(
                "INSERT OR IGNORE INTO streams VALUES (?, 0, 0, 0, 0)",
                [(s,) for s in STREAMS],
            )
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                (_INTERNAL + "schema", _SCHEMA_VERSION),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            logger.info("outbox %s: converting to auto_vacuum=INCREMENTAL (one-off VACUUM)", self.path)
            db.execute("VACUUM")
        schema = self._meta_raw(db, "schema")
        if schema != _SCHEMA_VERSION:
            raise OutboxError(f"{self.path}: schema version {schema!r}, expected {_SCHEMA_VERSION}")
        for name, nxt, rows, nbytes, dropped in db.execute("SELECT * FROM streams"):
            if name in STREAMS:
                self._counters[name] = _Counters(nxt, rows, nbytes, dropped)
        self._bytes_written = int(self._meta_raw(db, "bytes_written") or 0)
        last = self._meta_raw(db, "last_ack_ts")
        self._last_ack_ts = float(last) if last is not None else None

    @staticmethod
    def _meta_raw(db: sqlite3.Connection, key: str) -> Any:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_INTERNAL + key,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"{self.path}: outbox is closed")
        return self._db

    def _error(self, what: str, exc: sqlite3.Error) -> OutboxError:
        return OutboxError(f"{self.path}: {what}: {exc}")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """The one write transaction: BEGIN IMMEDIATE … counters … COMMIT, or roll back everything."""
        db = self._conn()
        saved = ({k: dataclasses.replace(v) for k, v in self._counters.items()}, self._bytes_written)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc
        try:
            yield db
            changed = [
                (c.next_seq, c.held_rows, c.held_bytes, c.dropped, name)
                for name, c in self._counters.items()
                if c != saved[0][name]
            ]
            if changed:
                db.executemany(
                    "UPDATE streams SET next_seq = ?, held_rows = ?, held_bytes = ?, dropped = ? WHERE name = ?",
                    changed,
                )
                self._bytes_written += 32 * len(changed)
            if self._meta_dirty and self._last_ack_ts is not None:
                self._put_meta(db, _INTERNAL + "last_ack_ts", self._last_ack_ts)
            self._bytes_written += 24
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                (_INTERNAL + "bytes_written", self._bytes_written),
            )
            db.execute("COMMIT")
        except BaseException as exc:
            self._counters, self._bytes_written = saved
            self._deleted.clear()
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as rb_exc:
                logger.warning("outbox %s: rollback failed: %s", self.path, rb_exc)
            if isinstance(exc, sqlite3.Error):
                raise self._error(what, exc) from exc
            raise
        self._meta_dirty = False
        for stream, lo, hi in self._deleted:
            self._forget(stream, lo, hi)
            if stream == "results":
                self._tail.clear()
                self._tail_rows = 0
        self._deleted.clear()

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        try:
            yield db
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc

    def _put_meta(self, db: sqlite3.Connection, key: str, value: MetaValue) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self._bytes_written += len(key) + (len(value) if isinstance(value, str | bytes) else 8)

    @staticmethod
    def _stream(stream: str) -> str:
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r} (one of {', '.join(STREAMS)})")
        return stream

    # ------------------------------------------------------------------ appending

    def append_results(
        self,
        ts: Sequence[float] | np.ndarray,
        model_version: Sequence[int | None] | np.ndarray | int | None,
        y_pred: Sequence[float | None] | np.ndarray,
        x: np.ndarray | Sequence[Sequence[float] | None] | None = None,
        y_true: Sequence[float | None] | np.ndarray | None = None,
        *,
        x_mask: np.ndarray | Sequence[bool] | None = None,
        source_key: str | None = None,
        source_position: MetaValue | tuple[str, MetaValue] = None,
    ) -> tuple[int, int]:
        """Append result rows in one transaction; return ``(seq_first, seq_last)``.

        Columns are numpy arrays or lists of equal length; ``model_version`` may be one int for
        all rows; ``x`` is an ``(n, d)`` array or a list of rows (None for no features);
        ``x_mask`` keeps ``x`` only for the rows where it is true (capture sampling); NaN or None
        in ``y_pred``/``y_true`` is stored as NULL. ``source_key``/``source_position`` (or
        ``source_position=(key, position)``) store the input's read position in the same
        transaction. Zero rows with a position just moves the position: ``(next, next - 1)``.
        """
        ts_a = np.asarray(ts, dtype=np.float64)
        if ts_a.ndim != 1:
            raise ValueError("ts must be one-dimensional")
        n = ts_a.shape[0]
        if not np.isfinite(ts_a).all():
            raise ValueError("ts must be finite")
        if model_version is None or isinstance(model_version, int | np.integer):
            mv: list[Any] = [None if model_version is None else int(model_version)] * n
        elif isinstance(model_version, np.ndarray):
            mv = model_version.astype(np.int64).reshape(-1).tolist()
        else:
            mv = [None if v is None else int(v) for v in model_version]
        y_pred_l = self._floats(y_pred, n, "y_pred")
        y_true_l: list[float | None] = [None] * n if y_true is None else self._floats(y_true, n, "y_true")
        xb = self._x_blobs(x, n, x_mask)
        if len(mv) != n:
            raise ValueError(f"model_version has {len(mv)} entries for {n} rows")
        if isinstance(source_position, tuple):
            if source_key is not None:
                raise ValueError("give source_key or a (key, position) pair, not both")
            source_key, source_position = source_position
        if (source_key is None) != (source_position is None):
            raise ValueError("source_key and source_position go together")
        c = self._counters["results"]
        first = c.next_seq
        nbytes = n * RESULT_ROW_BYTES + sum(len(b) for b in xb if b is not None)
        kept = first  # the first row of this batch the caps left in place
        with self._write("append results") as db:
            if n:
                db.executemany(
                    "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)",
                    zip(range(first, first + n), ts_a.tolist(), mv, y_pred_l, xb, y_true_l, strict=True),
                )
                c.next_seq += n
                c.held_rows += n
                c.held_bytes += nbytes
                self._bytes_written += nbytes
                self._enforce_caps(db, {"results": first})
                # a batch larger than the cap lost its own oldest rows: remember only the rest
                kept = max([first] + [hi + 1 for s, _, hi in self._deleted if s == "results"])
            if source_key is not None:
                self._put_meta(db, self._user_key(source_key), source_position)
        if kept < first + n:
            k = kept - first
            yp, yt = _none_for_nan(y_pred_l[k:]), _none_for_nan(y_true_l[k:])
            self._remember(_TailChunk(kept, ts_a[k:].tolist(), mv[k:], yp, xb[k:], yt))
        return first, first + n - 1

    def _remember(self, chunk: _TailChunk) -> None:
        if self._tail and self._tail[-1].first + len(self._tail[-1].ts) != chunk.first:
            self._tail.clear()
            self._tail_rows = 0
        self._tail.append(chunk)
        self._tail_rows += len(chunk.ts)
        while self._tail_rows - len(self._tail[0].ts) >= TAIL_ROWS:
            self._tail_rows -= len(self._tail.popleft().ts)

    def _from_tail(self, lo: int, limit: int) -> tuple[list[Any], ...] | None:
        """Columns of rows ``lo..`` (at most ``limit``) from memory, or None when not all there."""
        if not self._tail or lo < self._tail[0].first:
            return None
        cols: tuple[list[Any], ...] = ([], [], [], [], [])
        got = 0
        for ch in self._tail:
            end = ch.first + len(ch.ts)
            if end <= lo + got:
                continue
            a = lo + got - ch.first
            b = min(len(ch.ts), a + limit - got)
            srcs: tuple[Sequence[Any], ...] = (ch.ts, ch.mv, ch.y_pred, ch.x, ch.y_true)
            for col, src in zip(cols, srcs, strict=True):
                col.extend(src[a:b])
            got += b - a
            if got >= limit:
                break
        return cols if got else None

    @staticmethod
    def _floats(col: Sequence[float | None] | np.ndarray, n: int, name: str) -> list[float | None]:
        a = np.asarray(col if isinstance(col, np.ndarray) else [math.nan if v is None else v for v in col], np.float64)
        if a.shape != (n,):
            raise ValueError(f"{name} has shape {a.shape}, expected ({n},)")
        return a.tolist()  # NaN binds as NULL in SQLite

    @staticmethod
    def _x_blobs(
        x: np.ndarray | Sequence[Sequence[float] | None] | None, n: int, mask: np.ndarray | Sequence[bool] | None
    ) -> list[bytes | None]:
        if x is None:
            return [None] * n
        if isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x, dtype=np.float64)
            if a.ndim != 2 or a.shape[0] != n:
                raise ValueError(f"x has shape {a.shape}, expected ({n}, d)")
            raw = a.tobytes()
            w = a.shape[1] * 8
            blobs: list[bytes | None] = [raw[i * w : (i + 1) * w] for i in range(n)]
        else:
            if len(x) != n:
                raise ValueError(f"x has {len(x)} rows for {n} rows")
            blobs = [None if r is None else np.asarray(r, dtype=np.float64).reshape(-1).tobytes() for r in x]
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != (n,):
                raise ValueError(f"x_mask has shape {m.shape}, expected ({n},)")
            blobs = [b if keep else None for b, keep in zip(blobs, m.tolist(), strict=True)]
        return blobs

    def append_message(self, stream: str, payload: bytes | bytearray | memoryview) -> int:
        """Append one message to ``telemetry`` or ``stats``; return its sequence number."""
        if self._stream(stream) == "results":
            raise ValueError("results are appended with append_results")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        data = bytes(payload)
        c = self._counters[stream]
        seq = c.next_seq
        nbytes = MESSAGE_ROW_BYTES + len(data)
        with self._write(f"append {stream}") as db:
            db.execute(f"INSERT INTO {stream} VALUES (?, ?)", (seq, data))
            c.next_seq += 1
            c.held_rows += 1
            c.held_bytes += nbytes
            self._bytes_written += nbytes
            self._enforce_caps(db, {stream: seq})
        return seq

    # ------------------------------------------------------------------ caps

    def _over(self) -> tuple[int, int]:
        rows = sum(c.held_rows for c in self._counters.values())
        nbytes = sum(c.held_bytes for c in self._counters.values())
        return rows - self.max_rows, nbytes - self.max_bytes

    def _enforce_caps(self, db: sqlite3.Connection, appended: dict[str, int]) -> None:
        """Get back under the caps after an append of ``appended`` (stream -> its first new seq).

        Rows go oldest first, lowest-priority stream first, and never from a stream that outranks
        every stream appended to: telemetry or stats taken during a long outage never push out a
        result; when nothing of lower or equal rank is left to drop, the new message itself is
        dropped (and counted). The first pass spares the rows just appended (new data wins within
        a stream); the second drops them only if they alone exceed a cap.
        """
        top = max(_RANK[s] for s in appended)
        for spare in (True, False):
            for stream in DROP_ORDER:
                if _RANK[stream] > top:
                    break
                over_rows, over_bytes = self._over()
                if over_rows <= 0 and over_bytes <= 0:
                    return
                below = appended.get(stream) if spare else None
                self._drop_oldest(db, stream, over_rows, over_bytes, below)

    def _drop_oldest(
        self, db: sqlite3.Connection, stream: str, need_rows: int, need_bytes: int, below: int | None
    ) -> None:
        c = self._counters[stream]
        if c.held_rows == 0:
            return
        avg = max(1, c.held_bytes // c.held_rows)
        rows = nbytes = 0
        last = -1
        bound = "" if below is None else f" AND seq < {int(below)}"
        if need_bytes <= 0:  # only the row cap: find the cut and the sizes in SQL, no rows to Python
            cut = (
                db.execute(
                    f"SELECT seq FROM {stream} WHERE seq >= 0{bound} ORDER BY seq LIMIT 1 OFFSET ?", (need_rows - 1,)
                ).fetchone()
                or db.execute(f"SELECT max(seq) FROM {stream} WHERE seq >= 0{bound}").fetchone()
            )
            if cut[0] is not None:
                last = cut[0]
                rows, nbytes = db.execute(
                    f"SELECT count(*), coalesce(sum({_SIZE_SQL[stream]}), 0) FROM {stream} WHERE seq <= ?", (last,)
                ).fetchone()
        while rows < need_rows or nbytes < need_bytes:
            limit = max(need_rows - rows, (need_bytes - nbytes) // avg + 1, 16)
            chunk = db.execute(
                f"SELECT seq, {_SIZE_SQL[stream]} FROM {stream} WHERE seq > ?{bound} ORDER BY seq LIMIT ?",
                (last, limit),
            ).fetchall()
            if not chunk:
                break
            for seq, size in chunk:
                rows += 1
                nbytes += size
                last = seq
                if rows >= need_rows and nbytes >= need_bytes:
                    break
        if rows == 0:
            return
        deleted = db.execute(f"DELETE FROM {stream} WHERE seq <= ?", (last,)).rowcount
        if deleted != rows:  # cannot happen unless the file was edited underneath us
            raise sqlite3.IntegrityError(f"{stream}: dropped {deleted} rows, expected {rows}")
        c.held_rows -= rows
        c.held_bytes -= nbytes
        c.dropped += rows
        self._deleted.append((stream, 0, last))
        log = logger.debug if stream in self._warned_drop else logger.warning
        self._warned_drop.add(stream)
        log("outbox full: dropped %d oldest %s rows (up to seq %d; %d dropped in all)", rows, stream, last, c.dropped)
        self._maybe_vacuum(db)

    # ------------------------------------------------------------------ sending

    def claim(self, stream: str, max_rows: int, now: float, resend_after: float) -> Claim | None:
        """Lease the oldest sendable rows: unsent, or leased longer than ``resend_after`` seconds ago.

        Returns a contiguous ascending range of up to ``max_rows`` results (one message for
        ``telemetry``/``stats``), or None when nothing is due.
        """
        self._stream(stream)
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if stream != "results":
            max_rows = 1
        sending = self._sending[stream]
        due = now - resend_after
        for i, lease in enumerate(sending.leases):
            if lease.since <= due:
                claim = self._fetch(stream, lease.first, min(lease.last, lease.first + max_rows - 1), True)
                if claim is None:  # rows went away underneath the lease
                    del sending.leases[i]
                    return self.claim(stream, max_rows, now, resend_after)
                rest = _Lease(claim.seq_last + 1, lease.last, lease.since, lease.sent)
                sending.leases[i : i + 1] = [_Lease(claim.seq_first, claim.seq_last, now, False)] + (
                    [rest] if rest.first <= rest.last else []
                )
                return claim
        claim = self._fetch(stream, sending.cursor, None, False, max_rows)
        if claim is None:
            return None
        sending.leases.append(_Lease(claim.seq_first, claim.seq_last, now, False))
        sending.cursor = claim.seq_last + 1
        return claim

    def _fetch(self, stream: str, lo: int, hi: int | None, resend: bool, limit: int = 0) -> Claim | None:
        if stream == "results" and hi is None and not resend:
            cached = self._from_tail(lo, limit)
            if cached is not None:
                ts, mv, yp, xs, yt = cached
                with self._read(f"claim {stream}") as db:
                    low = db.execute("SELECT min(seq) FROM results").fetchone()[0]
                return Claim(
                    stream,
                    lo,
                    lo + len(ts) - 1,
                    (low if low is not None else lo) - 1,
                    resend,
                    ts=ts,
                    model_version=mv,
                    y_pred=yp,
                    x=_decode_x(xs),
                    y_true=yt if any(v is not None for v in yt) else None,
                )
        with self._read(f"claim {stream}") as db:
            cols = "seq, ts, model_version, y_pred, x, y_true" if stream == "results" else "seq, payload"
            if hi is None:
                rows = db.execute(
                    f"SELECT {cols} FROM {stream} WHERE seq >= ? ORDER BY seq LIMIT ?", (lo, limit)
                ).fetchall()
            else:
                rows = db.execute(
                    f"SELECT {cols} FROM {stream} WHERE seq BETWEEN ? AND ? ORDER BY seq", (lo, hi)
                ).fetchall()
            if not rows:
                return None
            low = db.execute(f"SELECT min(seq) FROM {stream}").fetchone()[0]
        first = rows[0][0]
        if rows[-1][0] - first != len(rows) - 1:  # a hole (ack_range): stop before it
            k = next(i for i, r in enumerate(rows) if r[0] != first + i)
            rows = rows[:k]
        last = first + len(rows) - 1
        if stream != "results":
            return Claim(stream, first, last, low - 1, resend, payload=rows[0][1])
        _, ts, mv, yp, xs, yt = (list(col) for col in zip(*rows, strict=True))
        return Claim(
            stream,
            first,
            last,
            low - 1,
            resend,
            ts=ts,
            model_version=mv,
            y_pred=yp,
            x=_decode_x(xs),
            y_true=yt if any(v is not None for v in yt) else None,
        )

    def mark_sent(self, stream: str, seq_first: int, seq_last: int, now: float) -> None:
        """The broker took rows ``seq_first..seq_last`` (PUBACK): restart their resend clock."""
        for lease in self._sending[self._stream(stream)].leases:
            if lease.first <= seq_first and seq_last <= lease.last:
                lease.since = now
                lease.sent = True
                return
        logger.debug("mark_sent %s %d..%d: not leased (released meanwhile); ignored", stream, seq_first, seq_last)

    def release(self, stream: str, seq_first: int, seq_last: int) -> None:
        """Publishing ``seq_first..seq_last`` failed: make those rows due again at once."""
        for lease in self._sending[self._stream(stream)].leases:
            if lease.first <= seq_last and seq_first <= lease.last:
                lease.since = -math.inf

    def release_all(self) -> None:
        """On (re)connect: every leased or sent-but-unacknowledged row is sent again."""
        for sending in self._sending.values():
            sending.leases.clear()
            sending.cursor = 0

    def _forget(self, stream: str, lo: int, hi: int) -> None:
        """Rows ``lo..hi`` are deleted: cut them out of the leases."""
        kept: list[_Lease] = []
        for lease in self._sending[stream].leases:
            if lease.last < lo or lease.first > hi:
                kept.append(lease)
                continue
            if lease.first < lo:
                kept.append(_Lease(lease.first, lo - 1, lease.since, lease.sent))
            if lease.last > hi:
                kept.append(_Lease(hi + 1, lease.last, lease.since, lease.sent))
        self._sending[stream].leases = kept

    # ------------------------------------------------------------------ deleting

    def ack(self, stream: str, watermark: int, *, now: float | None = None) -> int:
        """The cloud stored every row <= ``watermark``: delete them; return how many went.

        Idempotent. A watermark above the last sequence number handed out is clamped (and logged).
        """
        c = self._counters[self._stream(stream)]
        self._last_ack_ts = time.time() if now is None else now
        self._meta_dirty = True
        if watermark > c.next_seq - 1:
            logger.warning(
                "ack for %s up to %d, but the last seq handed out is %d; clamped", stream, watermark, c.next_seq - 1
            )
            watermark = c.next_seq - 1
        if watermark < 0 or c.held_rows == 0:
            return 0
        return self._delete(stream, 0, watermark, "ack")

    def ack_range(self, stream: str, seq_first: int, seq_last: int, *, now: float | None = None) -> int:
        """``ack = broker`` mode: delete rows ``seq_first..seq_last`` on PUBACK; return how many went."""
        self._stream(stream)
        if seq_first > seq_last:
            raise ValueError("seq_first must be <= seq_last")
        self._last_ack_ts = time.time() if now is None else now
        self._meta_dirty = True
        return self._delete(stream, seq_first, seq_last, "ack_range")

    def _delete(self, stream: str, lo: int, hi: int, what: str) -> int:
        c = self._counters[stream]
        with self._write(f"{what} {stream}") as db:
            rows, nbytes = db.execute(
                f"SELECT count(*), coalesce(sum({_SIZE_SQL[stream]}), 0) FROM {stream} WHERE seq BETWEEN ? AND ?",
                (lo, hi),
            ).fetchone()
            if rows:
                db.execute(f"DELETE FROM {stream} WHERE seq BETWEEN ? AND ?", (lo, hi))
                c.held_rows -= rows
                c.held_bytes -= nbytes
                self._deleted.append((stream, lo, hi))
                self._maybe_vacuum(db)
        return int(rows)

    def _maybe_vacuum(self, db: sqlite3.Connection) -> None:
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= VACUUM_MIN_PAGES and free * 4 >= db.execute("PRAGMA page_count").fetchone()[0]:
            _incremental_vacuum(db, free)
            logger.debug("outbox %s: gave back %d free pages", self.path, free)

    def vacuum(self) -> int:
        """Give every free page back to the file system now; return how many pages."""
        with self._write("vacuum") as db:
            free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
            _incremental_vacuum(db, free)
        return free

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it (the file shrinks only then)."""
        with self._read("checkpoint") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    # ------------------------------------------------------------------ metadata

    @staticmethod
    def _user_key(key: str) -> str:
        if not isinstance(key, str) or not key or key.startswith(_INTERNAL):
            raise ValueError(f"meta key must be a non-empty string not starting with {_INTERNAL!r}: {key!r}")
        return key

    def get_meta(self, key: str) -> MetaValue:
        """The value stored under ``key`` (as stored: str, int, float or bytes), or None."""
        with self._read("get_meta") as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (self._user_key(key),)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: MetaValue) -> None:
        """Store ``value`` under ``key`` (None deletes it) in its own transaction."""
        key = self._user_key(key)
        with self._write("set_meta") as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._put_meta(db, key, value)

    # ------------------------------------------------------------------ figures

    def depth(self) -> dict[str, int]:
        """Rows held per stream (sent or not, not yet acknowledged)."""
        return {s: c.held_rows for s, c in self._counters.items()}

    def dropped(self) -> dict[str, int]:
        """Rows dropped by the caps per stream, since the file was created."""
        return {s: c.dropped for s, c in self._counters.items()}

    def next_seq(self, stream: str) -> int:
        return self._counters[self._stream(stream)].next_seq

    def size_bytes(self) -> int:
        """Estimated bytes of the rows held (what the byte cap is checked against)."""
        return sum(c.held_bytes for c in self._counters.values())

    def bytes_written(self) -> int:
        """Logical bytes committed by this outbox's writes since the file was created."""
        return self._bytes_written

    def last_ack_ts(self) -> float | None:
        """When the last acknowledgement (cloud ack or broker ack) arrived, or None."""
        return self._last_ack_ts

    def file_bytes(self) -> int:
        """Bytes on disk: the database file and its WAL."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def status(self) -> OutboxStatus:
        return OutboxStatus(
            depth=self.depth(),
            held_bytes=self.size_bytes(),
            dropped=self.dropped(),
            next_seq={s: c.next_seq for s, c in self._counters.items()},
            bytes_written=self._bytes_written,
            last_ack_ts=self._last_ack_ts,
            file_bytes=self.file_bytes(),
        )

    def integrity_check(self) -> list[str]:
        """Problems found by ``PRAGMA integrity_check`` and by recounting every stream; [] when sound."""
        problems: list[str] = []
        with self._read("integrity_check") as db:
            found = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
            if found != ["ok"]:
                problems.extend(found)
            for s, c in self._counters.items():
                rows, nbytes, top = db.execute(
                    f"SELECT count(*), coalesce(sum({_SIZE_SQL[s]}), 0), max(seq) FROM {s}"
                ).fetchone()
                if (rows, nbytes) != (c.held_rows, c.held_bytes):
                    problems.append(f"{s}: counters say {c.held_rows} rows/{c.held_bytes} B, table has {rows}/{nbytes}")
                if top is not None and top >= c.next_seq:
                    problems.append(f"{s}: seq {top} >= next_seq {c.next_seq}")
        return problems

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the database (SQLite checkpoints the WAL on the last close). Idempotent."""
        if self._db is None:
            return
        db, self._db = self._db, None
        try:
            if self._meta_dirty and self._last_ack_ts is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_INTERNAL + "last_ack_ts", self._last_ack_ts))
            db.close()
        except sqlite3.Error as exc:
            raise self._error("close", exc) from exc

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _none_for_nan(values: list[float | None]) -> list[float | None]:
    """What SQLite would give back: NULL (None) where NaN was bound."""
    if any(v != v for v in values if v is not None):
        return [None if v is None or v != v else v for v in values]
    return values


def _incremental_vacuum(db: sqlite3.Connection, pages: int) -> None:
    # Python's sqlite3 steps a statement without result columns once, and each step of
    # incremental_vacuum frees one page (executescript would free all, but it commits first).
    for _ in range(pages):
        db.execute("PRAGMA incremental_vacuum")


def _decode_x(blobs: list[bytes | None]) -> list[list[float | None] | None] | None:
    """float64 blobs → rows of floats, NaN as None; None when no row has features."""
    present = [b for b in blobs if b is not None]
    if not present:
        return None
    width = len(present[0])
    if len(present) == len(blobs) and all(len(b) == width for b in present):
        a = np.frombuffer(b"".join(present), dtype=np.float64).reshape(len(blobs), width // 8)
        rows: list[Any] = a.tolist()
        if np.isnan(a).any():
            rows = [[None if math.isnan(v) else v for v in r] for r in rows]
        return rows
    out: list[list[float | None] | None] = []
    for b in blobs:
        if b is None:
            out.append(None)
        else:
            out.append([None if math.isnan(v) else v for v in np.frombuffer(b, dtype=np.float64).tolist()])
    return out
