"""The store interface and the SQL both backends share: transactions, exactly-once ingest, devices.

Backends (``sqlite.py``, ``postgres.py``) supply connections, the bulk row paths and the labelled
data queries; everything else is written once here in the SQL both dialects accept
(``?`` placeholders are rewritten for psycopg). Every public method is one short transaction.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from cloud.errors import NotFoundError, SchemaError, StoreError
from cloud.store.catalog import CatalogMixin
from cloud.store.pool import Pool
from cloud.store.records import (
    DeviceRecord,
    IngestResult,
    LabelledChunk,
    Rejected,
    ResultCounts,
    ResultRow,
    RowKey,
    Window,
    loads_or_none,
)
from cloud.store.schema import SCHEMA_VERSION, ddl
from cloud.store.watermarks import StreamState
from runtime.protocol import DesiredState, ReportedState, ResultBatch, Status, SufficientStats, Telemetry

if TYPE_CHECKING:
    from cloud.training import SuffStats

__all__ = ["Store"]

logger = logging.getLogger(__name__)

_I64 = 2**63
StreamKey = tuple[str, str]
BatchKey = tuple[str, str, int, int]

_DEVICE_COLS = (
    "id, fleet, grp, first_seen, last_seen, online, status_at, model_name, model_version, previous_name, "
    "previous_version, update_state, update_version, update_reason, update_at, rollout_id, reported_at, "
    "config_hash, transport, runtime_version, live_mae, live_n, outbox_depth, outbox_bytes, drops, "
    "telemetry_at, telemetry, desired, desired_at"
)


@dataclass(slots=True)
class Segment:
    """The rows of a newly stored batch to insert: ``spans`` are inclusive seq ranges within it."""

    batch: ResultBatch
    fset: int | None
    spans: list[tuple[int, int]]


def _split(item: Any) -> tuple[str | None, Any]:
    if isinstance(item, tuple):
        fleet, msg = item
        return fleet, msg
    return None, item


def _check_features(features: Sequence[str]) -> tuple[str, ...]:
    feats = tuple(features)
    if not feats or len(set(feats)) != len(feats) or not all(isinstance(f, str) and f for f in feats):
        raise ValueError("features must be a non-empty sequence of distinct names")
    return feats


class Store(CatalogMixin, ABC):
    """The cloud's storage: results exactly once, devices, telemetry, stats, registry and rollouts.

    Open one with :func:`cloud.store.open_store`. Synchronous and thread-safe: every public method
    runs one short transaction on a pooled connection, so an asyncio service calls it inline (a
    small batch) or through ``asyncio.to_thread``. Use as a context manager or call :meth:`close`.
    Times are UNIX seconds; ``now`` parameters default to ``time.time()`` and exist for tests.
    """

    dialect: ClassVar[str]

    def __init__(self, url: str, max_connections: int = 4, timeout: float = 30.0) -> None:
        self.url = url
        self._pool: Pool[Any] = Pool(self._connect, self._disconnect, max_connections, timeout)
        self._fsets: dict[tuple[str, ...], int] = {}
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    # ------------------------------------------------------------------ backend hooks

    @abstractmethod
    def _connect(self) -> Any: ...

    @abstractmethod
    def _disconnect(self, conn: Any) -> None: ...

    @abstractmethod
    def _begin(self, conn: Any, write: bool) -> None: ...

    @abstractmethod
    def _commit(self, conn: Any) -> None: ...

    @abstractmethod
    def _rollback(self, conn: Any) -> None: ...

    @abstractmethod
    def _translate(self, exc: BaseException) -> StoreError | None:
        """A StoreError for a driver exception, or None when ``exc`` is not the driver's."""

    @abstractmethod
    def _is_broken(self, conn: Any) -> bool: ...

    @abstractmethod
    def _lock_schema(self, conn: Any) -> None:
        """Serialise concurrent schema creation (several processes opening a new database)."""

    @abstractmethod
    def _lock_watermarks(self, conn: Any, keys: list[StreamKey], now: float) -> dict[StreamKey, StreamState]:
        """Load (creating if new) and lock the watermark rows of ``keys``."""

    @abstractmethod
    def _claim(self, conn: Any, keys: list[tuple[str, str, int, int, float, str | None, int | None]]) -> set[BatchKey]:
        """INSERT the dedup keys ON CONFLICT DO NOTHING; return those that were inserted."""

    @abstractmethod
    def _insert_results(self, conn: Any, segments: list[Segment]) -> int:
        """Insert the rows of ``segments``; return how many."""

    @abstractmethod
    def _decode_x(self, value: Any) -> tuple[float | None, ...] | None: ...

    def _q(self, sql: str) -> str:
        """SQL written with ``?`` placeholders in this dialect."""
        return sql

    def _greatest(self, a: str, b: str) -> str:
        return f"max({a}, {b})"

    def _executemany(self, conn: Any, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        conn.executemany(self._q(sql), rows)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close every pooled connection; later calls raise StoreError."""
        self._pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Any]:
        """One transaction on a pooled connection: commit on success, roll back on any exception."""
        conn = self._pool.acquire()
        broken = False
        try:
            self._begin(conn, write)
            yield conn
            self._commit(conn)
        except BaseException as exc:
            try:
                self._rollback(conn)
            except Exception:
                broken = True
            broken = broken or self._is_broken(conn)
            translated = self._translate(exc)
            if translated is not None:
                raise translated from exc
            raise
        finally:
            self._pool.release(conn, broken=broken)

    def _create_schema(self) -> None:
        with self._tx(write=True) as conn:
            self._lock_schema(conn)
            for stmt in ddl(self.dialect):
                conn.execute(stmt)
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                conn.execute(self._q("INSERT INTO schema_version (version) VALUES (?)"), (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise SchemaError(f"schema version {row[0]} is newer than this edgeloop ({SCHEMA_VERSION})", self.url)

    # ------------------------------------------------------------------ ingest

    def ingest(
        self,
        results: Sequence[ResultBatch | tuple[str | None, ResultBatch]] = (),
        telemetry: Sequence[Telemetry | tuple[str | None, Telemetry]] = (),
        stats: Sequence[SufficientStats | tuple[str | None, SufficientStats]] = (),
        *,
        now: float | None = None,
    ) -> IngestResult:
        """Store many messages in ONE transaction, each ``(device, stream, seq_first, seq_last)`` once.

        Each message may be given bare or as ``(fleet, message)`` (the fleet from its topic, recorded
        on the device row). A batch whose key is already stored (a redelivery) stores no rows; a new
        batch stores only the sequence numbers not stored before (a re-batched resend) and not at or
        below the watermark. A batch's ``floor`` (and a telemetry/stats message's, when the protocol
        carries one) advances the watermark over sequence numbers the device gave up. Telemetry
        also updates the device row (live MAE, outbox depth, drops); every message updates the
        device's ``last_seen`` (receive time) and, when given, its fleet.

        Messages the database could not hold (integers beyond 64 bits) are returned in
        ``rejected`` and nothing of them is stored; the rest is. After the call returns (the
        commit), publish ``result.watermarks[device]`` to each device as its ``Ack``.
        """
        now = time.time() if now is None else now
        out = IngestResult()
        batches = self._accept(results, "results", out)
        tels = self._accept(telemetry, "telemetry", out)
        sts = self._accept(stats, "stats", out)
        if not (batches or tels or sts):
            return out
        keys: set[StreamKey] = set()
        fleets: dict[str, str | None] = {}
        for stream, items in (("results", batches), ("telemetry", tels), ("stats", sts)):
            for fleet, msg in items:
                keys.add((msg.device, stream))
                if fleet is not None or msg.device not in fleets:
                    fleets[msg.device] = fleet
        names = {b.features for _, b in batches if b.features}
        pending: dict[tuple[str, ...], int] = {}
        with self._tx(write=True) as conn:
            fsets = self._fset_ids(conn, names, pending)
            states = self._lock_watermarks(conn, sorted(keys), now)
            claims: list[tuple[str, str, int, int, float, str | None, int | None]] = []
            for _, b in batches:
                claims.append((b.device, "results", b.seq_first, b.seq_last, now, b.model, fsets.get(b.features or ())))
            claims += [(t.device, "telemetry", t.seq, t.seq, now, None, None) for _, t in tels]
            claims += [(s.device, "stats", s.seq, s.seq, now, s.model, None) for _, s in sts]
            new = self._claim(conn, claims)

            segments: list[Segment] = []
            for _, b in batches:
                st = states[(b.device, "results")]
                st.apply_floor(b.floor)
                key = (b.device, "results", b.seq_first, b.seq_last)
                if key not in new:
                    out.batches_duplicate += 1
                    out.duplicates += b.n
                    continue
                new.discard(key)  # a second copy within this call is a duplicate too
                out.batches_new += 1
                spans = st.add(b.seq_first, b.seq_last)
                stored = sum(last - first + 1 for first, last in spans)
                out.duplicates += b.n - stored
                if spans:
                    segments.append(Segment(b, fsets.get(b.features or ()), spans))
            out.rows_stored = self._insert_results(conn, segments) if segments else 0

            stored_tels = [t for _, t in tels if self._single(states[(t.device, "telemetry")], t, new, out)]
            tel_rows = [(t.device, t.seq, t.ts, now, t.model_dump_json()) for t in stored_tels]
            if tel_rows:
                self._executemany(
                    conn, "INSERT INTO telemetry (device, seq, ts, received, payload) VALUES (?, ?, ?, ?, ?)", tel_rows
                )
            out.telemetry_stored = len(tel_rows)
            stat_rows = [
                (s.device, s.seq, s.model, s.window_start, s.window_end, s.n, now, s.model_dump_json())
                for _, s in sts
                if self._single(states[(s.device, "stats")], s, new, out)
            ]
            if stat_rows:
                self._executemany(
                    conn,
                    "INSERT INTO stats (device, seq, model, window_start, window_end, n, received, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    stat_rows,
                )
            out.stats_stored = len(stat_rows)

            changed = [(d, s, st.watermark, st.ranges_json(), now) for (d, s), st in states.items() if st.changed]
            if changed:
                self._executemany(
                    conn,
                    "UPDATE watermarks SET watermark = ?, ranges = ?, updated = ? WHERE device = ? AND stream = ?",
                    [(w, r, u, d, s) for d, s, w, r, u in changed],
                )
            for device, fleet in sorted(fleets.items()):
                self._touch_device(conn, device, fleet, now)
            latest: dict[str, Telemetry] = {}
            for t in stored_tels:
                if t.device not in latest or t.ts >= latest[t.device].ts:
                    latest[t.device] = t
            for t in latest.values():
                self._apply_telemetry(conn, t)
        self._fsets.update(pending)
        for (device, stream), st in states.items():
            out.watermarks.setdefault(device, {})[stream] = st.watermark
        return out

    def _single(self, st: StreamState, msg: Telemetry | SufficientStats, new: set[BatchKey], out: IngestResult) -> bool:
        """Bookkeeping of a one-seq message (telemetry, stats): True when it is to be stored."""
        stream = "telemetry" if isinstance(msg, Telemetry) else "stats"
        st.apply_floor(int(getattr(msg, "floor", -1)))
        key = (msg.device, stream, msg.seq, msg.seq)
        if key not in new:
            out.duplicates += 1
            return False
        new.discard(key)
        if not st.add(msg.seq, msg.seq):
            out.duplicates += 1
            return False
        return True

    def _accept(self, items: Sequence[Any], stream: str, out: IngestResult) -> list[tuple[str | None, Any]]:
        """Split off the fleet and drop what the database cannot hold, recording why."""
        kept = []
        for item in items:
            fleet, msg = _split(item)
            reason = _unstorable(msg)
            if reason is None:
                kept.append((fleet, msg))
            else:
                logger.warning("not storing %s from %s: %s", stream, msg.device, reason)
                out.rejected.append(Rejected(stream, msg.device, reason))
        return kept

    def _fset_ids(
        self, conn: Any, names: set[tuple[str, ...]], pending: dict[tuple[str, ...], int]
    ) -> dict[tuple[str, ...], int]:
        """Ids of feature-name sets, creating missing ones (cached only after the commit)."""
        found = {n: self._fsets[n] for n in names if n in self._fsets}
        for n in sorted(names - found.keys()):
            text = json.dumps(list(n))
            conn.execute(self._q("INSERT INTO feature_sets (names) VALUES (?) ON CONFLICT (names) DO NOTHING"), (text,))
            row = conn.execute(self._q("SELECT id FROM feature_sets WHERE names = ?"), (text,)).fetchone()
            found[n] = pending[n] = int(row[0])
        return found

    def _feature_sets(self, conn: Any) -> dict[int, tuple[str, ...]]:
        return {int(i): tuple(json.loads(n)) for i, n in conn.execute("SELECT id, names FROM feature_sets")}

    def _feature_maps(self, conn: Any, features: tuple[str, ...]) -> list[tuple[list[int], tuple[int, ...]]]:
        """``(fset ids, column indexes)`` groups holding all ``features``; fset -1 stands for unnamed
        batches of exactly ``len(features)`` columns, taken in order."""
        groups: dict[tuple[int, ...], list[int]] = {tuple(range(len(features))): [-1]}
        for fid, names in self._feature_sets(conn).items():
            if set(features) <= set(names):
                groups.setdefault(tuple(names.index(f) for f in features), []).append(fid)
        return [(ids, idx) for idx, ids in groups.items()]

    # ------------------------------------------------------------------ devices

    def _touch_device(self, conn: Any, device: str, fleet: str | None, now: float) -> None:
        conn.execute(
            self._q(
                "INSERT INTO devices (id, fleet, first_seen, last_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET fleet = COALESCE(excluded.fleet, devices.fleet), "
                f"last_seen = {self._greatest('devices.last_seen', 'excluded.last_seen')}"
            ),
            (device, fleet, now, now),
        )

    def _apply_telemetry(self, conn: Any, t: Telemetry) -> None:
        drops = sum(t.outbox_dropped.values())
        conn.execute(
            self._q(
                "UPDATE devices SET live_mae = ?, live_n = ?, outbox_depth = ?, outbox_bytes = ?, drops = ?, "
                "telemetry_at = ?, telemetry = ? WHERE id = ? AND (telemetry_at IS NULL OR telemetry_at <= ?)"
            ),
            (t.live_mae, t.live_n, t.outbox_depth, t.outbox_bytes, drops, t.ts, t.model_dump_json(), t.device, t.ts),
        )

    def update_device_from_reported(
        self, reported: ReportedState, *, fleet: str | None = None, now: float | None = None
    ) -> None:
        """Record a ``ReportedState`` (kept in history) and apply it to the device row unless an
        already applied one carries a later device timestamp (retained messages can be stale)."""
        self.update_devices_from_reported([(reported, fleet)], now=now)

    def update_devices_from_reported(
        self, items: Sequence[tuple[ReportedState, str | None]], *, now: float | None = None
    ) -> None:
        """:meth:`update_device_from_reported` for many ``(reported, fleet)`` in one transaction."""
        now = time.time() if now is None else now
        if not items:
            return
        with self._tx(write=True) as conn:
            for reported, fleet in items:
                self._apply_reported(conn, reported, fleet, now)

    def _apply_reported(self, conn: Any, reported: ReportedState, fleet: str | None, now: float) -> None:
        r, u = reported, reported.update
        conn.execute(
            self._q("INSERT INTO reported (device, received, ts, payload) VALUES (?, ?, ?, ?)"),
            (r.device, now, r.ts, r.model_dump_json()),
        )
        self._touch_device(conn, r.device, fleet or r.fleet, now)
        conn.execute(
            self._q(
                "UPDATE devices SET grp = ?, model_name = ?, model_version = ?, previous_name = ?, "
                "previous_version = ?, update_state = ?, update_version = ?, update_reason = ?, update_at = ?, "
                "rollout_id = ?, config_hash = ?, transport = ?, runtime_version = ?, reported_at = ? "
                "WHERE id = ? AND (reported_at IS NULL OR reported_at <= ?)"
            ),
            (
                r.group,
                r.active.name if r.active else None,
                r.active.version if r.active else None,
                r.previous.name if r.previous else None,
                r.previous.version if r.previous else None,
                u.state,
                u.version,
                u.reason,
                u.at,
                u.rollout_id,
                r.config_hash,
                r.transport,
                r.runtime_version,
                r.ts,
                r.device,
                r.ts,
            ),
        )

    def update_device_from_status(self, status: Status, *, fleet: str | None = None, now: float | None = None) -> None:
        """Apply an online/offline ``Status``. Applied in arrival order: a will message's timestamp
        is its connect time, so device timestamps cannot order status messages."""
        self.update_devices_from_status([(status, fleet)], now=now)

    def update_devices_from_status(
        self, items: Sequence[tuple[Status, str | None]], *, now: float | None = None
    ) -> None:
        """:meth:`update_device_from_status` for many ``(status, fleet)`` in one transaction, in order."""
        now = time.time() if now is None else now
        if not items:
            return
        with self._tx(write=True) as conn:
            for status, fleet in items:
                self._touch_device(conn, status.device, fleet, now)
                conn.execute(
                    self._q("UPDATE devices SET online = ?, status_at = ? WHERE id = ?"),
                    (1 if status.state == "online" else 0, now, status.device),
                )

    def update_device_from_telemetry(
        self, telemetry: Telemetry, *, fleet: str | None = None, now: float | None = None
    ) -> None:
        """Apply telemetry to the device row only (no telemetry history, no watermark; :meth:`ingest`
        does all three). Older telemetry than the applied one (by device ts) is ignored."""
        if _unstorable(telemetry):
            raise ValueError(f"telemetry of {telemetry.device}: {_unstorable(telemetry)}")
        now = time.time() if now is None else now
        with self._tx(write=True) as conn:
            self._touch_device(conn, telemetry.device, fleet, now)
            self._apply_telemetry(conn, telemetry)

    def set_device_desired(self, device: str, desired: DesiredState | None, *, now: float | None = None) -> None:
        """Record the desired state last published for ``device`` (None clears it)."""
        now = time.time() if now is None else now
        payload = desired.model_dump_json(by_alias=True) if desired is not None else None
        with self._tx(write=True) as conn:
            cur = conn.execute(
                self._q("UPDATE devices SET desired = ?, desired_at = ? WHERE id = ?"), (payload, now, device)
            )
            if cur.rowcount == 0:
                raise NotFoundError("device", device)

    def set_devices_desired(
        self, items: Sequence[tuple[str, DesiredState | None]], *, now: float | None = None
    ) -> None:
        """:meth:`set_device_desired` for many devices in one transaction (devices not stored are skipped)."""
        now = time.time() if now is None else now
        rows = [(d.model_dump_json(by_alias=True) if d is not None else None, now, dev) for dev, d in items]
        if not rows:
            return
        with self._tx(write=True) as conn:
            self._executemany(conn, "UPDATE devices SET desired = ?, desired_at = ? WHERE id = ?", rows)

    def get_device(self, device: str) -> DeviceRecord | None:
        """The device's record, or None when it never sent anything."""
        with self._tx() as conn:
            row = conn.execute(self._q(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?"), (device,)).fetchone()
        return None if row is None else _device(row)

    def list_devices(self, fleet: str | None = None, group: str | None = None) -> list[DeviceRecord]:
        """Devices ordered by id, optionally only those of ``fleet`` and/or ``group``."""
        where, args = [], []
        if fleet is not None:
            where.append("fleet = ?")
            args.append(fleet)
        if group is not None:
            where.append("grp = ?")
            args.append(group)
        sql = (
            f"SELECT {_DEVICE_COLS} FROM devices" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        )
        with self._tx() as conn:
            return [_device(r) for r in conn.execute(self._q(sql), args).fetchall()]

    # ------------------------------------------------------------------ reads

    def watermarks(self, device: str) -> dict[str, int]:
        """The device's current watermark per stream (streams it never sent are absent)."""
        with self._tx() as conn:
            rows = conn.execute(self._q("SELECT stream, watermark FROM watermarks WHERE device = ?"), (device,))
            return {s: int(w) for s, w in rows.fetchall()}

    def counts(self) -> dict[str, ResultCounts]:
        """Stored result rows per device and their distinct sequence numbers (duplicates = difference)."""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device, count(*), count(DISTINCT seq) FROM results GROUP BY device ORDER BY device"
            ).fetchall()
        return {d: ResultCounts(int(n), int(k)) for d, n, k in rows}

    def fetch_results(self, device: str, since_seq: int = -1, limit: int = 1000) -> list[ResultRow]:
        """Up to ``limit`` stored results of ``device`` with seq > ``since_seq``, by seq."""
        with self._tx() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT device, seq, ts, model_version, y_pred, x, y_true FROM results "
                    "WHERE device = ? AND seq > ? ORDER BY seq LIMIT ?"
                ),
                (device, since_seq, limit),
            ).fetchall()
        return [ResultRow(r[0], int(r[1]), r[2], r[3], r[4], self._decode_x(r[5]), r[6]) for r in rows]

    def telemetry_history(self, device: str, limit: int = 100) -> list[Telemetry]:
        """The device's newest ``limit`` telemetry messages, newest first."""
        with self._tx() as conn:
            rows = conn.execute(
                self._q("SELECT payload FROM telemetry WHERE device = ? ORDER BY ts DESC, seq DESC LIMIT ?"),
                (device, limit),
            ).fetchall()
        return [Telemetry.model_validate_json(p) for (p,) in rows]

    def reported_history(self, device: str, limit: int = 100) -> list[tuple[float, ReportedState]]:
        """``(received, state)`` of the device's newest ``limit`` reported states, newest first."""
        with self._tx() as conn:
            rows = conn.execute(
                self._q("SELECT received, payload FROM reported WHERE device = ? ORDER BY received DESC LIMIT ?"),
                (device, limit),
            ).fetchall()
        return [(r, ReportedState.model_validate_json(p)) for r, p in rows]

    def stats_messages(
        self, model: str | None = None, window: Window = Window(), devices: Sequence[str] | None = None
    ) -> list[SufficientStats]:
        """Stored ``SufficientStats`` messages whose own window lies within ``window``, optionally only
        those naming ``model`` and/or from ``devices``; ordered by window end."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if window.start is not None:
            where.append("window_start >= ?")
            args.append(window.start)
        if window.end is not None:
            where.append("window_end <= ?")
            args.append(window.end)
        if devices is not None:
            if not devices:
                return []
            where.append("device IN (" + ", ".join("?" * len(devices)) + ")")
            args += list(devices)
        sql = "SELECT payload FROM stats WHERE " + " AND ".join(where) + " ORDER BY window_end, device, seq"
        with self._tx() as conn:
            rows = conn.execute(self._q(sql), args).fetchall()
        return [SufficientStats.model_validate_json(p) for (p,) in rows]

    # ------------------------------------------------------------------ labelled data (training)

    @abstractmethod
    def count_labelled(self, features: Sequence[str], window: Window = Window()) -> int:
        """How many stored rows in ``window`` have a label and every one of ``features``."""

    @abstractmethod
    def newest_cutoff(self, features: Sequence[str], n: int, window: Window = Window()) -> RowKey | None:
        """The key of the ``n``-th newest labelled row in ``window``, by ``(ts, device, seq)``.

        Rows with key >= it are the ``n`` newest (the holdout); rows below it the rest. None when
        ``n`` < 1 or fewer than ``n`` rows exist.
        """

    @abstractmethod
    def labelled_rows(
        self,
        features: Sequence[str],
        window: Window = Window(),
        *,
        before: RowKey | None = None,
        since: RowKey | None = None,
        chunk_rows: int = 100_000,
    ) -> Iterator[LabelledChunk]:
        """Labelled rows with all ``features`` (columns in that order), in chunks of at most
        ``chunk_rows``, never all at once. ``before``/``since`` keep rows with key < / >= a
        :class:`RowKey`. Rows come from batches that named their features (matched by name, any
        order, extra columns ignored) or, when a batch named none, whose width equals
        ``len(features)`` (taken in order). The iterator holds a connection: consume it promptly."""

    def sufficient_stats(
        self,
        features: Sequence[str],
        window: Window = Window(),
        *,
        before: RowKey | None = None,
        since: RowKey | None = None,
    ) -> SuffStats:
        """Least-squares sufficient statistics of the rows :meth:`labelled_rows` would give,
        computed where the data lives (backends override with SQL aggregates)."""
        from cloud.training import SuffStats

        total = SuffStats.zeros(len(_check_features(features)))
        for chunk in self.labelled_rows(features, window, before=before, since=since):
            total = total + SuffStats.from_rows(chunk.X, chunk.y, ts=chunk.ts)
        return total


def _unstorable(msg: ResultBatch | Telemetry | SufficientStats) -> str | None:
    """Why the database could not hold ``msg`` (integers beyond 64 bits), or None."""
    if isinstance(msg, ResultBatch):
        mv = msg.model_version
        if mv and (min(mv) < -_I64 or max(mv) >= _I64):
            return "model_version beyond 64 bits"
    elif isinstance(msg, Telemetry):
        values = [msg.outbox_depth, msg.outbox_bytes, msg.live_n, sum(msg.outbox_dropped.values())]
        if max(values) >= _I64:
            return "counter beyond 64 bits"
    elif msg.n >= _I64:
        return "n beyond 64 bits"
    return None


def _device(r: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        id=r[0],
        fleet=r[1],
        group=r[2],
        first_seen=r[3],
        last_seen=r[4],
        online=None if r[5] is None else bool(r[5]),
        status_at=r[6],
        model_name=r[7],
        model_version=r[8],
        previous_name=r[9],
        previous_version=r[10],
        update_state=r[11],
        update_version=r[12],
        update_reason=r[13],
        update_at=r[14],
        rollout_id=r[15],
        reported_at=r[16],
        config_hash=r[17],
        transport=r[18],
        runtime_version=r[19],
        live_mae=r[20],
        live_n=r[21],
        outbox_depth=r[22],
        outbox_bytes=r[23],
        drops=r[24],
        telemetry_at=r[25],
        telemetry=loads_or_none(r[26]),
        desired=loads_or_none(r[27]),
        desired_at=r[28],
    )


def x_matrix(batch: ResultBatch) -> tuple[np.ndarray, np.ndarray] | None:
    """The batch's x as float64 (n, d) with NaN for missing values, and a mask of rows that have x;
    None when the batch carries no x values at all."""
    xs = batch.x
    if xs is None:
        return None
    width = next((len(r) for r in xs if r is not None), 0)
    if width == 0:
        return None
    n = len(xs)
    missing_rows = xs.count(None)
    if not missing_rows:
        try:  # the common case, complete rows: packed in C, several times faster than np.array
            buf = struct.pack(f"{n * width}d", *chain.from_iterable(cast(list[list[float]], xs)))
            return np.frombuffer(buf, dtype=np.float64).reshape(n, width), np.ones(n, dtype=bool)
        except (struct.error, TypeError):
            pass  # a missing value (None) in some row
    present = np.fromiter((r is not None for r in xs), dtype=bool, count=n)
    nan_row = [None] * width
    rows = [r if r is not None else nan_row for r in xs] if missing_rows else xs
    return np.array(rows, dtype=np.float64), present


def key_mask(ts: np.ndarray, device: str, seq: np.ndarray, key: RowKey) -> np.ndarray:
    """Rows of one device whose ``(ts, device, seq)`` is below ``key``."""
    below = ts < key.ts
    tie = ts == key.ts
    if device < key.device:
        return below | tie
    if device > key.device:
        return below
    return below | (tie & (seq < key.seq))


check_features = _check_features
