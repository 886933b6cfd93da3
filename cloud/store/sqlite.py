"""SQLite backend: one file in WAL mode; labelled rows also kept as columnar blocks for training.

Reading a million rows through the ``sqlite3`` module costs about a microsecond each before any
arithmetic, and SQLite cannot take float64 values out of a blob in SQL, so the least-squares sums
cannot be SQL aggregates here. Instead every stored batch's labelled rows are written a second time,
in the same transaction, as one ``label_blocks`` row of float64/int64 blobs; training reads those in
chunks (about 1,000 fetches per million rows) and does the arithmetic in numpy.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Sequence
from itertools import chain, repeat
from typing import Any

import numpy as np

from cloud.errors import StoreError
from cloud.store.base import BatchKey, Segment, Store, StreamKey, check_features, key_mask, x_matrix
from cloud.store.records import LabelledChunk, RowKey, Window
from cloud.store.watermarks import StreamState

__all__ = ["SqliteStore"]

_Block = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # device, ts, seq, X, y


class SqliteStore(Store):
    """The default store: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

    ``synchronous`` is ``full`` by default: an acknowledged row survives a power cut, which the
    ack contract needs (the device deletes what we acknowledged). ``normal`` trades that for speed.
    """

    dialect = "sqlite"

    def __init__(self, url: str, path: str, synchronous: str = "full", max_connections: int = 4) -> None:
        if synchronous not in ("full", "normal", "extra"):
            raise ValueError("synchronous must be full, normal or extra")
        self.path = path
        self._synchronous = synchronous
        memory = path == ":memory:"
        super().__init__(url, max_connections=1 if memory else max_connections)

    # ------------------------------------------------------------------ connection hooks

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}", self.url) from exc
        return conn

    def _disconnect(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def _begin(self, conn: sqlite3.Connection, write: bool) -> None:
        # IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a read lock.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _translate(self, exc: BaseException) -> StoreError | None:
        if isinstance(exc, sqlite3.Error):
            return StoreError(f"{type(exc).__name__}: {exc}", self.url)
        return None

    def _is_broken(self, conn: sqlite3.Connection) -> bool:
        return False

    def _lock_schema(self, conn: sqlite3.Connection) -> None:
        pass  # BEGIN IMMEDIATE already excludes other writers

    # ------------------------------------------------------------------ ingest hooks

    def _lock_watermarks(
        self, conn: sqlite3.Connection, keys: list[StreamKey], now: float
    ) -> dict[StreamKey, StreamState]:
        states: dict[StreamKey, StreamState] = {}
        devices = sorted({d for d, _ in keys})
        wanted = set(keys)
        for i in range(0, len(devices), 500):
            part = devices[i : i + 500]
            rows = conn.execute(
                "SELECT device, stream, watermark, ranges FROM watermarks WHERE device IN "
                f"({', '.join('?' * len(part))})",
                part,
            )
            for d, s, w, r in rows:
                if (d, s) in wanted:
                    states[(d, s)] = StreamState.from_json(w, r)
        missing = [k for k in keys if k not in states]
        conn.executemany(
            "INSERT INTO watermarks (device, stream, watermark, ranges, updated) VALUES (?, ?, -1, '[]', ?)",
            [(d, s, now) for d, s in missing],
        )
        for k in missing:
            states[k] = StreamState()
        return states

    def _claim(
        self, conn: sqlite3.Connection, keys: list[tuple[str, str, int, int, float, str | None, int | None]]
    ) -> set[BatchKey]:
        new: set[BatchKey] = set()
        sql = (
            "INSERT INTO result_batches (device, stream, seq_first, seq_last, received, model, fset) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, stream, seq_first, seq_last) DO NOTHING"
        )
        for k in keys:
            if conn.execute(sql, k).rowcount == 1:
                new.add((k[0], k[1], k[2], k[3]))
        return new

    def _insert_results(self, conn: sqlite3.Connection, segments: list[Segment]) -> int:
        parts: list[Iterator[tuple[Any, ...]]] = []
        blocks: list[tuple[Any, ...]] = []
        total = 0
        for seg in segments:
            b = seg.batch
            xm = x_matrix(b)
            ycol = b.y_true
            for first, last in seg.spans:
                i0, i1 = first - b.seq_first, last - b.seq_first + 1
                total += i1 - i0
                xs: Any = repeat(None)
                if xm is not None:
                    X, present = xm
                    # one bytes object per row, cut in C: a view of each row as one opaque value
                    xs = np.ascontiguousarray(X[i0:i1]).view(np.dtype((np.void, X.shape[1] * 8))).ravel().tolist()
                    if not present[i0:i1].all():
                        xs = [v if p else None for v, p in zip(xs, present[i0:i1].tolist(), strict=True)]
                    if ycol is not None:
                        block = _block(b.device, seg.fset, first, b.ts[i0:i1], X[i0:i1], present[i0:i1], ycol[i0:i1])
                        if block is not None:
                            blocks.append(block)
                parts.append(
                    zip(
                        repeat(b.device),
                        range(first, last + 1),
                        b.ts[i0:i1],
                        b.model_version[i0:i1],
                        b.y_pred[i0:i1],
                        xs,
                        ycol[i0:i1] if ycol is not None else repeat(None),
                        repeat(seg.fset),
                    )
                )
        _insert_rows(conn, _RESULTS_INSERT, 8, list(chain.from_iterable(chain.from_iterable(parts))))
        if blocks:
            conn.executemany(
                "INSERT INTO label_blocks (device, fset, width, n, seq_first, ts_min, ts_max, ts, seq, x, y) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                blocks,
            )
        return total

    def _decode_x(self, value: Any) -> tuple[float | None, ...] | None:
        if value is None:
            return None
        return tuple(None if math.isnan(v) else v for v in np.frombuffer(value, dtype=np.float64).tolist())

    # ------------------------------------------------------------------ labelled data

    def _blocks(
        self, conn: sqlite3.Connection, features: tuple[str, ...], window: Window, since_ts: float | None = None
    ) -> Iterator[_Block]:
        """Labelled blocks holding ``features`` in ``window``, reduced to the rows complete in them."""
        idx_of: dict[int, np.ndarray] = {}
        for ids, idx in self._feature_maps(conn, features):
            for i in ids:
                idx_of[i] = np.asarray(idx, dtype=np.intp)
        named = [i for i in idx_of if i >= 0]
        where = [f"(fset IN ({', '.join('?' * len(named))}) OR (fset IS NULL AND width = ?))"]
        args: list[Any] = [*named, len(features)]
        lo = max((v for v in (window.start, since_ts) if v is not None), default=None)
        if lo is not None:
            where.append("ts_max >= ?")
            args.append(lo)
        if window.end is not None:
            where.append("ts_min < ?")
            args.append(window.end)
        sql = (
            "SELECT device, fset, width, n, seq_first, ts, seq, x, y FROM label_blocks WHERE "
            + " AND ".join(where)
            + " ORDER BY id"
        )
        for device, fset, width, n, seq0, tsb, seqb, xb, yb in conn.execute(sql, args):
            ts = np.frombuffer(tsb, dtype=np.float64)
            X = np.frombuffer(xb, dtype=np.float64).reshape(n, width)[:, idx_of[-1 if fset is None else fset]]
            keep = np.isfinite(X).all(axis=1)
            if window.start is not None:
                keep &= ts >= window.start
            if window.end is not None:
                keep &= ts < window.end
            # an empty seq blob means the rows are seq_first, seq_first + 1, ... (the usual case)
            seq = np.frombuffer(seqb, dtype=np.int64) if seqb else np.arange(seq0, seq0 + n, dtype=np.int64)
            y = np.frombuffer(yb, dtype=np.float64)
            if not keep.all():
                ts, seq, X, y = ts[keep], seq[keep], X[keep], y[keep]
            if len(y):
                yield device, ts, seq, X, y

    def count_labelled(self, features: Sequence[str], window: Window = Window()) -> int:
        feats = check_features(features)
        with self._tx() as conn:
            return sum(len(y) for _, _, _, _, y in self._blocks(conn, feats, window))

    def newest_cutoff(self, features: Sequence[str], n: int, window: Window = Window()) -> RowKey | None:
        feats = check_features(features)
        if n < 1:
            return None
        with self._tx() as conn:
            bound = self._lower_bound(conn, feats, n, window)
            for lo in (bound, None) if bound is not None else (None,):
                ts_l, dev_l, seq_l = [], [], []
                for device, ts, seq, _, _ in self._blocks(conn, feats, window, since_ts=lo):
                    if lo is not None:
                        keep = ts >= lo
                        ts, seq = ts[keep], seq[keep]
                    ts_l.append(ts)
                    seq_l.append(seq)
                    dev_l.append(np.full(len(ts), device, dtype=object))
                total = sum(len(t) for t in ts_l)
                if total >= n:
                    ts_a, dev_a, seq_a = np.concatenate(ts_l), np.concatenate(dev_l), np.concatenate(seq_l)
                    order = np.lexsort((seq_a, dev_a, ts_a))  # ascending by ts, then device, then seq
                    k = order[total - n]
                    return RowKey(float(ts_a[k]), str(dev_a[k]), int(seq_a[k]))
        return None

    def _lower_bound(self, conn: sqlite3.Connection, features: tuple[str, ...], n: int, window: Window) -> float | None:
        """A ts at or below the n-th newest row's, from block metadata alone (None: unknown).

        Blocks wholly inside the window, newest ts_min first: once their rows add up to n, every
        one of those rows has ts >= that ts_min. Rows with missing features make it an estimate,
        which :meth:`newest_cutoff` checks by counting (and falls back to a full scan)."""
        named = [i for ids, _ in self._feature_maps(conn, features) for i in ids if i >= 0]
        where = [f"(fset IN ({', '.join('?' * len(named))}) OR (fset IS NULL AND width = ?))"]
        args: list[Any] = [*named, len(features)]
        if window.start is not None:
            where.append("ts_min >= ?")
            args.append(window.start)
        if window.end is not None:
            where.append("ts_max < ?")
            args.append(window.end)
        seen = 0
        sql = "SELECT ts_min, n FROM label_blocks WHERE " + " AND ".join(where) + " ORDER BY ts_min DESC"
        for ts_min, count in conn.execute(sql, args):
            seen += count
            if seen >= n:
                return float(ts_min)
        return None

    def labelled_rows(
        self,
        features: Sequence[str],
        window: Window = Window(),
        *,
        before: RowKey | None = None,
        since: RowKey | None = None,
        chunk_rows: int = 100_000,
    ) -> Iterator[LabelledChunk]:
        feats = check_features(features)
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        with self._tx() as conn:
            buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            held = 0
            for device, ts, seq, X, y in self._blocks(conn, feats, window, since_ts=since.ts if since else None):
                keep = None
                if before is not None:
                    keep = key_mask(ts, device, seq, before)
                if since is not None:
                    after = ~key_mask(ts, device, seq, since)
                    keep = after if keep is None else keep & after
                if keep is not None:
                    X, y, ts = X[keep], y[keep], ts[keep]
                if not len(y):
                    continue
                buf.append((X, y, ts))
                held += len(y)
                while held >= chunk_rows:
                    chunk, buf, held = _take(buf, chunk_rows)
                    yield chunk
            if held:
                chunk, buf, held = _take(buf, held)
                yield chunk


_RESULTS_INSERT = "INSERT INTO results (device, seq, ts, model_version, y_pred, x, y_true, fset) VALUES "
# Rows per INSERT statement. One multi-row statement binds its parameters in one C loop and steps
# once, where executemany pays Python-level overhead and a step per row: 64 rows per statement
# inserts about 1.6x faster (measured with this schema), and stays far below SQLite's limit of
# 999 parameters per statement in its oldest supported versions.
_ROWS_PER_INSERT = 64


def _insert_rows(conn: sqlite3.Connection, head: str, width: int, flat: list[Any]) -> None:
    """Insert ``len(flat) // width`` rows given as one flat parameter list, many rows per statement."""
    one = "(" + ", ".join("?" * width) + ")"
    step = width * _ROWS_PER_INSERT
    full = len(flat) // step * step
    if full:
        conn.executemany(head + ", ".join([one] * _ROWS_PER_INSERT), (flat[i : i + step] for i in range(0, full, step)))
    if full < len(flat):
        conn.executemany(head + one, (flat[i : i + width] for i in range(full, len(flat), width)))


def _take(
    buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int
) -> tuple[LabelledChunk, list[tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
    X = np.concatenate([p[0] for p in buf])
    y = np.concatenate([p[1] for p in buf])
    ts = np.concatenate([p[2] for p in buf])
    rest = [(X[k:], y[k:], ts[k:])] if len(y) > k else []
    return LabelledChunk(X[:k], y[:k], ts[:k]), rest, len(y) - k


def _block(
    device: str,
    fset: int | None,
    first: int,
    ts: list[float],
    X: np.ndarray,
    present: np.ndarray,
    ycol: list[float | None],
) -> tuple[Any, ...] | None:
    """A ``label_blocks`` row of the labelled rows (x present, y_true present) of one span."""
    y = np.array(ycol, dtype=np.float64)  # None -> nan
    lab = present & ~np.isnan(y)
    if not lab.any():
        return None
    if lab.all():  # every row labelled: no copies, and the seqs need not be stored
        tsa, seq, Xl, yl = np.asarray(ts, dtype=np.float64), b"", X, y
    else:
        tsa = np.asarray(ts, dtype=np.float64)[lab]
        seq = np.arange(first, first + len(y), dtype=np.int64)[lab].tobytes()
        Xl, yl = X[lab], y[lab]
    return (
        device,
        fset,
        X.shape[1],
        int(lab.sum()),
        first,
        float(tsa.min()),
        float(tsa.max()),
        tsa.tobytes(),
        seq,
        np.ascontiguousarray(Xl).tobytes(),
        yl.tobytes(),
    )
