"""PostgreSQL backend (psycopg 3): rows by binary COPY, least-squares sums as SQL aggregates."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from cloud.errors import MissingDependencyError, StoreError
from cloud.store.base import BatchKey, Segment, Store, StreamKey, check_features
from cloud.store.records import LabelledChunk, RowKey, Window
from cloud.store.watermarks import StreamState

__all__ = ["PostgresStore"]

#: Above this many features the d(d+1)/2 product sums no longer fit a sensible SELECT list;
#: the sums are then taken in numpy over server-side-cursor chunks instead.
MAX_SQL_FEATURES = 40
_SCHEMA_LOCK = 0x6564_6765_6C6F_6F70 & (2**63 - 1)  # "edgeloop"
_COPY_TYPES = ["text", "int8", "float8", "int8", "float8", "float8[]", "float8", "int4"]


class PostgresStore(Store):
    """``postgresql://user@host:port/db`` — any libpq URL, e.g. with ``?options=-csearch_path%3Dmy_schema``
    to keep the tables in one schema. Needs the ``cloud`` extra (psycopg 3)."""

    dialect = "postgres"

    def __init__(self, url: str, max_connections: int = 4) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise MissingDependencyError("psycopg", "cloud", "a PostgreSQL store") from exc
        self._pg = psycopg
        super().__init__(url, max_connections=max_connections)

    # ------------------------------------------------------------------ connection hooks

    def _connect(self) -> Any:
        try:
            return self._pg.connect(self.url, autocommit=False, connect_timeout=10)
        except self._pg.Error as exc:
            raise StoreError(f"cannot connect: {exc}".strip(), _redact(self.url)) from exc

    def _disconnect(self, conn: Any) -> None:
        conn.close()

    def _begin(self, conn: Any, write: bool) -> None:
        pass  # psycopg opens a transaction with the first statement

    def _commit(self, conn: Any) -> None:
        conn.commit()

    def _rollback(self, conn: Any) -> None:
        conn.rollback()

    def _translate(self, exc: BaseException) -> StoreError | None:
        if isinstance(exc, self._pg.Error):
            return StoreError(f"{type(exc).__name__}: {exc}".strip(), _redact(self.url))
        return None

    def _is_broken(self, conn: Any) -> bool:
        return bool(conn.broken or conn.closed)

    def _lock_schema(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _greatest(self, a: str, b: str) -> str:
        return f"GREATEST({a}, {b})"

    def _executemany(self, conn: Any, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with conn.cursor() as cur:
            cur.executemany(self._q(sql), rows)

    # ------------------------------------------------------------------ ingest hooks

    def _lock_watermarks(self, conn: Any, keys: list[StreamKey], now: float) -> dict[StreamKey, StreamState]:
        devices = [d for d, _ in keys]
        streams = [s for _, s in keys]
        conn.execute(
            "INSERT INTO watermarks (device, stream, watermark, ranges, updated) "
            "SELECT d, s, -1, '[]', %s FROM unnest(%s::text[], %s::text[]) AS u(d, s) ORDER BY d, s "
            "ON CONFLICT (device, stream) DO NOTHING",
            (now, devices, streams),
        )
        # Locked in key order, so two ingesters sharing devices cannot deadlock.
        rows = conn.execute(
            "SELECT w.device, w.stream, w.watermark, w.ranges FROM watermarks w "
            "JOIN unnest(%s::text[], %s::text[]) AS u(d, s) ON w.device = u.d AND w.stream = u.s "
            "ORDER BY w.device, w.stream FOR UPDATE OF w",
            (devices, streams),
        ).fetchall()
        return {(d, s): StreamState.from_json(w, r) for d, s, w, r in rows}

    def _claim(self, conn: Any, keys: list[tuple[str, str, int, int, float, str | None, int | None]]) -> set[BatchKey]:
        cols = [list(c) for c in zip(*keys, strict=True)]
        rows = conn.execute(
            "INSERT INTO result_batches (device, stream, seq_first, seq_last, received, model, fset) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[], %s::int8[], %s::float8[], %s::text[], %s::int4[]) "
            "ON CONFLICT (device, stream, seq_first, seq_last) DO NOTHING "
            "RETURNING device, stream, seq_first, seq_last",
            cols,
        ).fetchall()
        return {(d, s, int(a), int(b)) for d, s, a, b in rows}

    def _insert_results(self, conn: Any, segments: list[Segment]) -> int:
        total = 0
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY results (device, seq, ts, model_version, y_pred, x, y_true, fset) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(_COPY_TYPES)
            write = copy.write_row
            for seg in segments:
                b = seg.batch
                for first, last in seg.spans:
                    i0, i1 = first - b.seq_first, last - b.seq_first + 1
                    total += i1 - i0
                    rows = zip(
                        repeat(b.device),
                        range(first, last + 1),
                        b.ts[i0:i1],
                        b.model_version[i0:i1],
                        b.y_pred[i0:i1],
                        b.x[i0:i1] if b.x is not None else repeat(None),
                        b.y_true[i0:i1] if b.y_true is not None else repeat(None),
                        repeat(seg.fset),
                    )
                    for row in rows:
                        write(row)
        return total

    def _decode_x(self, value: Any) -> tuple[float | None, ...] | None:
        return None if value is None else tuple(value)

    # ------------------------------------------------------------------ labelled data

    def _rows_sql(
        self,
        conn: Any,
        features: tuple[str, ...],
        window: Window,
        before: RowKey | None,
        since: RowKey | None,
    ) -> tuple[str, list[Any]]:
        """``SELECT f0..f{d-1}, y, ts, device, seq`` of the labelled rows complete in ``features``."""
        maps = self._feature_maps(conn, features)
        # Which rows: batches that named all features, or unnamed ones of exactly d columns.
        conds: list[str] = []
        where_args: list[Any] = []
        for ids, _ in maps:
            named = [i for i in ids if i >= 0]
            if named:
                conds.append("fset = ANY(%s::int4[])")
                where_args.append(named)
            if -1 in ids:
                conds.append(f"(fset IS NULL AND array_length(x, 1) = {len(features)})")
        # Their columns: one subscript per feature, or a CASE when feature sets order them differently.
        col_args: list[Any] = []
        if len(maps) == 1:
            cols = [f"x[{i + 1}] AS f{j}" for j, i in enumerate(maps[0][1])]
        else:
            cols = []
            for j in range(len(features)):
                whens = []
                for ids, idx in maps:
                    named = [i for i in ids if i >= 0]
                    if named:
                        whens.append(f"WHEN fset = ANY(%s::int4[]) THEN x[{idx[j] + 1}]")
                        col_args.append(named)
                    if -1 in ids:
                        whens.append(f"WHEN fset IS NULL THEN x[{idx[j] + 1}]")
                cols.append(f"CASE {' '.join(whens)} END AS f{j}")
        where = ["y_true IS NOT NULL", "(" + " OR ".join(conds) + ")"]
        if window.start is not None:
            where.append("ts >= %s")
            where_args.append(window.start)
        if window.end is not None:
            where.append("ts < %s")
            where_args.append(window.end)
        if before is not None:
            where.append("(ts, device, seq) < (%s::float8, %s::text, %s::int8)")
            where_args += [before.ts, before.device, before.seq]
        if since is not None:
            where.append("ts >= %s AND (ts, device, seq) >= (%s::float8, %s::text, %s::int8)")
            where_args += [since.ts, since.ts, since.device, since.seq]
        inner = f"SELECT {', '.join(cols)}, y_true AS y, ts, device, seq FROM results WHERE {' AND '.join(where)}"
        complete = " AND ".join(f"f{j} IS NOT NULL" for j in range(len(features)))
        return f"SELECT * FROM ({inner}) AS r WHERE {complete}", col_args + where_args

    def count_labelled(self, features: Sequence[str], window: Window = Window()) -> int:
        feats = check_features(features)
        with self._tx() as conn:
            sql, args = self._rows_sql(conn, feats, window, None, None)
            return int(conn.execute(f"SELECT count(*) FROM ({sql}) AS c", args).fetchone()[0])

    def newest_cutoff(self, features: Sequence[str], n: int, window: Window = Window()) -> RowKey | None:
        feats = check_features(features)
        if n < 1:
            return None
        with self._tx() as conn:
            sql, args = self._rows_sql(conn, feats, window, None, None)
            _prefer_ts_index(conn)
            row = conn.execute(
                f"SELECT ts, device, seq FROM ({sql}) AS c ORDER BY ts DESC, device DESC, seq DESC LIMIT 1 OFFSET %s",
                [*args, n - 1],
            ).fetchone()
        return None if row is None else RowKey(float(row[0]), str(row[1]), int(row[2]))

    def sufficient_stats(
        self,
        features: Sequence[str],
        window: Window = Window(),
        *,
        before: RowKey | None = None,
        since: RowKey | None = None,
    ) -> Any:
        from cloud.training import SuffStats

        feats = check_features(features)
        d = len(feats)
        if d > MAX_SQL_FEATURES:
            return super().sufficient_stats(feats, window, before=before, since=since)
        pairs = [(i, j) for i in range(d) for j in range(i, d)]
        aggs = ["count(*)", "0", "0", "sum(y)", "sum(y * y)"]  # (ts range from the index, below)
        aggs += [f"sum(g{i})" for i in range(d)]
        aggs += [f"sum(g{i} * y)" for i in range(d)]
        aggs += [f"sum(g{i} * g{j})" for i, j in pairs]
        with self._tx() as conn:
            sql, args = self._rows_sql(conn, feats, window, before, since)
            # Sums of x - shift, with the shift a sample's mean, keep their digits when features sit
            # far from zero (sums of raw squares would cancel in the centring of the fit).
            means = ", ".join(f"avg(f{i})" for i in range(d))
            sample = conn.execute(f"SELECT {means} FROM (SELECT * FROM ({sql}) AS r LIMIT 1000) AS s", args).fetchone()
            shift = [0.0 if v is None else float(v) for v in sample]
            shifted = ", ".join(f"f{i} - %s AS g{i}" for i in range(d))
            row = conn.execute(
                f"SELECT {', '.join(aggs)} FROM (SELECT {shifted}, y, ts FROM ({sql}) AS r) AS s", [*shift, *args]
            ).fetchone()
            span = (0.0, 0.0)
            if row[0]:
                _prefer_ts_index(conn)  # after the full scan above: this transaction only walks the index now
                first = conn.execute(f"SELECT ts FROM ({sql}) AS r ORDER BY ts LIMIT 1", args).fetchone()
                last = conn.execute(f"SELECT ts FROM ({sql}) AS r ORDER BY ts DESC LIMIT 1", args).fetchone()
                span = (float(first[0]), float(last[0]))
        n = int(row[0])
        if n == 0:
            return SuffStats.zeros(d)
        vals = [float(v) for v in row[3:]]
        sy, syy = vals[0], vals[1]
        sx = vals[2 : 2 + d]
        sxy = vals[2 + d : 2 + 2 * d]
        xtx = np.empty((d + 1, d + 1))
        for (i, j), v in zip(pairs, vals[2 + 2 * d :], strict=True):
            xtx[i, j] = xtx[j, i] = v
        xtx[d, :d] = xtx[:d, d] = sx
        xtx[d, d] = n
        xty = np.array([*sxy, sy])
        return SuffStats(xtx=xtx, xty=xty, yty=syy, n=n, window=span, shift=np.array(shift))

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
        d = len(feats)
        with self._tx() as conn:
            sql, args = self._rows_sql(conn, feats, window, before, since)
            if since is not None:
                _prefer_ts_index(conn)
            cols = ", ".join([*(f"f{j}" for j in range(d)), "y", "ts"])
            # Binary COPY of non-null float8 columns is a fixed-size record per row, so numpy reads
            # it directly: no Python object per value (about 10x faster than fetching tuples).
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY (SELECT {cols} FROM ({sql}) AS r) TO STDOUT (FORMAT BINARY)", args) as copy,
            ):
                for a in _binary_float_records(copy, d + 2, chunk_rows):
                    yield LabelledChunk(a[:, :d], a[:, d].copy(), a[:, d + 1].copy())


def _prefer_ts_index(conn: Any) -> None:
    """Walk the ts index for the newest rows even when the table has no planner statistics yet.

    Right after a bulk load (before autovacuum's ANALYZE) the planner underestimates how many rows
    are labelled and picks a full scan plus sort for "the newest n": 0.9 s instead of 0.1 s on 1M
    rows. Only for this transaction (SET LOCAL)."""
    conn.execute("SET LOCAL enable_seqscan = off")


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def _binary_float_records(blocks: Iterable[Any], ncols: int, chunk_rows: int) -> Iterator[np.ndarray]:
    """Parse ``COPY ... TO STDOUT (FORMAT BINARY)`` of ``ncols`` non-null float8 columns into
    (m, ncols) float64 arrays of at most ``chunk_rows`` rows."""
    record = np.dtype([("count", ">i2"), *((f"c{i}", [("len", ">i4"), ("v", ">f8")]) for i in range(ncols))])
    size = record.itemsize
    buf = bytearray()
    header_done = False
    for block in blocks:
        buf += block
        if not header_done:
            if len(buf) < 19:
                continue
            if bytes(buf[:11]) != _COPY_SIGNATURE:
                raise StoreError("unexpected COPY output (not binary format)")
            ext = int.from_bytes(buf[15:19], "big")
            if len(buf) < 19 + ext:
                continue
            del buf[: 19 + ext]
            header_done = True
        while len(buf) >= chunk_rows * size:
            yield _records(buf, chunk_rows, record, ncols)
    if not header_done or buf[-2:] != b"\xff\xff":
        raise StoreError("truncated COPY output")
    del buf[-2:]
    if len(buf) % size:
        raise StoreError("unexpected COPY record layout (a NULL or a non-float8 column)")
    if buf:
        yield _records(buf, len(buf) // size, record, ncols)


def _records(buf: bytearray, m: int, record: np.dtype, ncols: int) -> np.ndarray:
    recs = np.frombuffer(bytes(buf[: m * record.itemsize]), dtype=record)
    del buf[: m * record.itemsize]
    if (recs["count"] != ncols).any() or any((recs[f"c{i}"]["len"] != 8).any() for i in range(ncols)):
        raise StoreError("unexpected COPY record layout (a NULL or a non-float8 column)")
    out = np.empty((m, ncols))
    for i in range(ncols):
        out[:, i] = recs[f"c{i}"]["v"]
    return out


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
