"""Store ingest rows/s (SQLite, PostgreSQL) against bare executemany of the same rows, and 1M-row retrain time.

For each backend: the same result rows (x of 3 features, labelled) are stored
  * by ``Store.ingest`` — dedup keys, watermarks, device rows, feature sets; SQLite also writes the
    columnar label blocks — once in a single call (one transaction, like the baseline) and once in
    calls of ``--per-call`` batches (the ingester's commit size);
  * by the baseline: the rows prepared beforehand as tuples, then ``executemany`` into an identical
    ``results`` table in one transaction with the same driver (sqlite3 / psycopg 3, whose
    executemany pipelines); for PostgreSQL a bare binary COPY is printed too, for reference.
Then ``train_from_store`` on ``--retrain-rows`` stored labelled rows (10% newest held out).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.store import Store, open_store
from cloud.training import train_from_store
from runtime.protocol import ResultBatch

FEATS = ("x1", "x2", "x3")
PG_BASE = "postgresql://127.0.0.1:5432/test"
COLS = "device, seq, ts, model_version, y_pred, x, y_true, fset"


def make_batches(rows: int, devices: int, per_batch: int, seed: int, validate: bool = True) -> list[ResultBatch]:
    """Batches of ``per_batch`` rows, round-robin over devices, y = X·w + 5 + noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, len(FEATS)))
    y = X @ np.array([3.0, -2.0, 0.5]) + 5.0 + rng.normal(0, 0.1, rows)
    xl, yl = X.tolist(), y.tolist()
    out: list[ResultBatch] = []
    next_seq = [0] * devices
    for k, i in enumerate(range(0, rows, per_batch)):
        j = min(i + per_batch, rows)
        d = k % devices
        first = next_seq[d]
        next_seq[d] += j - i
        fields: dict[str, Any] = {
            "device": f"bench-{d}",
            "model": "m",
            "seq_first": first,
            "seq_last": first + j - i - 1,
            "ts": [1.7e9 + float(r) for r in range(i, j)],
            "model_version": [1] * (j - i),
            "y_pred": yl[i:j],
            "x": xl[i:j],
            "features": FEATS,
            "y_true": yl[i:j],
        }
        out.append(ResultBatch(**fields) if validate else ResultBatch.model_construct(floor=-1, v=1, **fields))
    return out


def tuples(batches: list[ResultBatch], x_as: Callable[[Any], Any]) -> list[tuple[Any, ...]]:
    rows = []
    for b in batches:
        xs = b.x or []
        yt = b.y_true or []
        for k in range(b.n):
            rows.append((b.device, b.seq_first + k, b.ts[k], b.model_version[k], b.y_pred[k], x_as(xs[k]), yt[k], 1))
    return rows


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ingest_all(store: Store, batches: list[ResultBatch], per_call: int) -> None:
    for i in range(0, len(batches), per_call):
        r = store.ingest(batches[i : i + per_call])
        if r.rejected or r.duplicates:
            raise RuntimeError(f"unexpected: {r}")


# --------------------------------------------------------------------------- SQLite


def bench_sqlite(batches: list[ResultBatch], per_call: int, tmp: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds per path, one entry per repetition (fresh databases each time, paths interleaved)."""
    rows = tuples(batches, lambda x: np.asarray(x, dtype=np.float64).tobytes())
    out: dict[str, list[float]] = {"baseline_s": [], "ingest_one_tx_s": [], "ingest_calls_s": [], "redelivery_s": []}
    for rep in range(repeat):
        # baseline: same table (created by the store), same pragmas, rows prepared, one transaction
        path = f"{tmp}/baseline{rep}.db"
        open_store(f"sqlite:///{path}").close()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")

        def baseline(conn: sqlite3.Connection = conn) -> None:
            conn.execute("BEGIN")
            conn.executemany(f"INSERT INTO results ({COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")

        out["baseline_s"].append(timed(baseline))
        conn.close()
        with open_store(f"sqlite:///{tmp}/one{rep}.db") as s:
            out["ingest_one_tx_s"].append(timed(partial(ingest_all, s, batches, len(batches))))
            assert s.counts()["bench-0"].duplicates == 0
        with open_store(f"sqlite:///{tmp}/calls{rep}.db") as s:
            out["ingest_calls_s"].append(timed(partial(ingest_all, s, batches, per_call)))
            out["redelivery_s"].append(timed(partial(s.ingest, batches[:per_call])))  # all duplicates
    return out


# --------------------------------------------------------------------------- PostgreSQL


@contextmanager
def pg_schema() -> Iterator[str]:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE, autocommit=True, connect_timeout=3) as c:
        c.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(PG_BASE, autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def bench_postgres(batches: list[ResultBatch], per_call: int, repeat: int) -> dict[str, list[float]]:
    import psycopg

    rows = tuples(batches, list)
    out: dict[str, list[float]] = {
        "baseline_s": [],
        "copy_s": [],
        "ingest_one_tx_s": [],
        "ingest_calls_s": [],
        "redelivery_s": [],
    }
    for _ in range(repeat):
        with pg_schema() as url:
            open_store(url).close()
            with psycopg.connect(url) as conn:

                def baseline(conn: Any = conn) -> None:
                    with conn.cursor() as cur:
                        cur.executemany(f"INSERT INTO results ({COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", rows)
                    conn.commit()

                out["baseline_s"].append(timed(baseline))
                conn.execute("TRUNCATE results")
                conn.commit()

                def copy(conn: Any = conn) -> None:
                    with conn.cursor() as cur, cur.copy(f"COPY results ({COLS}) FROM STDIN (FORMAT BINARY)") as cp:
                        cp.set_types(["text", "int8", "float8", "int8", "float8", "float8[]", "float8", "int4"])
                        for r in rows:
                            cp.write_row(r)
                    conn.commit()

                out["copy_s"].append(timed(copy))
        with pg_schema() as url, open_store(url) as s:
            out["ingest_one_tx_s"].append(timed(partial(ingest_all, s, batches, len(batches))))
            assert s.counts()["bench-0"].duplicates == 0
        with pg_schema() as url, open_store(url) as s:
            out["ingest_calls_s"].append(timed(partial(ingest_all, s, batches, per_call)))
            out["redelivery_s"].append(timed(partial(s.ingest, batches[:per_call])))
    return out


# --------------------------------------------------------------------------- retrain


def bench_retrain(url: str, batches: list[ResultBatch], repeat: int) -> dict[str, Any]:
    """Load the rows once, then time the statistics alone and a full train_from_store, ``repeat`` times."""
    with open_store(url) as s:
        t_load = timed(lambda: ingest_all(s, batches, 50))
        n = s.count_labelled(FEATS)
        stats_s, train_s = [], []
        res = None
        for _ in range(repeat):
            stats_s.append(timed(lambda: s.sufficient_stats(FEATS)))
            t = time.perf_counter()
            res = train_from_store(s, "bench", FEATS, holdout_fraction=0.1)
            train_s.append(time.perf_counter() - t)
        assert res is not None
        err = float(np.abs(res.weights - [3.0, -2.0, 0.5]).max())
    return {
        "rows": n,
        "n_train": res.n_train,
        "n_holdout": res.n_holdout,
        "load_s": t_load,
        "stats_s": stats_s,
        "train_s": train_s,
        "coef_err": err,
    }


def summarize(name: str, runs: dict[str, list[float]], rows: int, per_call: int) -> dict[str, float]:
    """Print one backend's table (best and median of the repetitions); return its figures."""
    paths = [
        ("baseline executemany (1 tx)", "baseline_s"),
        ("bare COPY (reference)", "copy_s"),
        ("Store.ingest, 1 call (1 tx)", "ingest_one_tx_s"),
        (f"Store.ingest, {per_call} batches/call", "ingest_calls_s"),
    ]
    best_base = rows / min(runs["baseline_s"])
    med_base = rows / statistics.median(runs["baseline_s"])
    fig: dict[str, float] = {}
    for label, key in paths:
        if key not in runs:
            continue
        best, med = rows / min(runs[key]), rows / statistics.median(runs[key])
        short = key.removesuffix("_s")
        fig[f"{short}_rows_per_s"] = round(best)
        fig[f"{short}_ratio"] = round(best / best_base, 3)
        fig[f"{short}_ratio_median"] = round(med / med_base, 3)
        print(f"{name:<9} {label:<32} {best:>10,.0f} {med:>10,.0f} {best / best_base:>7.2f}x {med / med_base:>7.2f}x")
    fig["redelivery_s"] = round(min(runs["redelivery_s"]), 4)
    print(f"{name:<9} {'redelivery of one call (all dup)':<32} {min(runs['redelivery_s']) * 1000:>8.1f} ms")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--batch", type=int, default=500, help="rows per ResultBatch")
    ap.add_argument("--per-call", type=int, default=20, help="batches per ingest call (one commit)")
    ap.add_argument("--retrain-rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; best and median are reported")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()

    pg = not args.no_postgres
    if pg:
        try:
            import psycopg

            psycopg.connect(PG_BASE, connect_timeout=3).close()
        except Exception as exc:
            if os.environ.get("CI") == "true":
                raise
            print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
            pg = False
    batches = make_batches(args.rows, args.devices, args.batch, seed=1)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["sqlite"] = bench_sqlite(batches, args.per_call, Path(tmp), args.repeat)
        if pg:
            runs["postgres"] = bench_postgres(batches, args.per_call, args.repeat)
        big = make_batches(args.retrain_rows, args.devices, 1000, seed=2, validate=False)
        runs["retrain_sqlite"] = bench_retrain(f"sqlite:///{tmp}/retrain.db", big, args.repeat)
        if pg:
            with pg_schema() as url:
                runs["retrain_postgres"] = bench_retrain(url, big, args.repeat)

    figures: dict[str, Any] = {"rows": args.rows, "batch_rows": args.batch, "per_call": args.per_call}
    print(f"{args.rows:,} result rows (x of {len(FEATS)} features, labelled) in batches of {args.batch}; rows/s")
    print(f"{'backend':<9} {'path':<32} {'best':>10} {'median':>10} {'ratio':>8} {'median':>8}")
    for name in ("sqlite", "postgres"):
        if name in runs:
            figures[name] = summarize(name, runs[name], args.rows, args.per_call)
    print(f"retrain: train_from_store (10% newest held out), best/median of {args.repeat}")
    for name in ("retrain_sqlite", "retrain_postgres"):
        r = runs.get(name)
        if not r:
            continue
        figures[name] = {
            "rows": r["rows"],
            "train_s": round(min(r["train_s"]), 3),
            "train_s_median": round(statistics.median(r["train_s"]), 3),
            "stats_s": round(min(r["stats_s"]), 3),
            "load_s": round(r["load_s"], 2),
            "coef_err": round(r["coef_err"], 5),
        }
        f = figures[name]
        print(
            f"{name:<17} {r['rows']:>9,} rows: {f['train_s']:.2f} s / {f['train_s_median']:.2f} s "
            f"(sufficient_stats alone {f['stats_s']:.2f} s; loading them took {f['load_s']:.1f} s), "
            f"max coefficient error {f['coef_err']:.4f}"
        )
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
