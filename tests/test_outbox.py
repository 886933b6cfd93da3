"""Contract tests for runtime/outbox.py: append, claim, mark_sent, ack, release, caps, crash safety."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from outbox_crash_worker import KEY, rows_for

from runtime.errors import OutboxError
from runtime.outbox import MESSAGE_ROW_BYTES, RESULT_ROW_BYTES, Outbox
from runtime.protocol import ResultBatch

BIG_ROWS, BIG_BYTES = 10**8, 10**11
WORKER = Path(__file__).with_name("outbox_crash_worker.py")


def big(path: Path) -> Outbox:
    """An outbox whose caps are never reached."""
    return Outbox(path, max_rows=BIG_ROWS, max_bytes=BIG_BYTES)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


@pytest.fixture
def ob(db: Path) -> Iterator[Outbox]:
    o = big(db)
    yield o
    o.close()


def add(o: Outbox, n: int, start: float = 0.0, **kw: Any) -> tuple[int, int]:
    ts = np.arange(n, dtype=np.float64) + start
    return o.append_results(ts, 1, ts * 2.0, **kw)


def accounted(o: Outbox, acked: dict[str, int]) -> None:
    """Every sequence number handed out is held, dropped or acknowledged — exactly once."""
    depth, dropped = o.depth(), o.dropped()
    for s in ("results", "telemetry", "stats"):
        assert depth[s] + dropped[s] + acked.get(s, 0) == o.next_seq(s), s
    assert o.integrity_check() == []


# ---------------------------------------------------------------------- basic contract


def test_new_file_settings(ob: Outbox, db: Path) -> None:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        con.close()
    assert ob.depth() == {"results": 0, "telemetry": 0, "stats": 0}
    assert ob.claim("results", 10, 0.0, 30.0) is None
    assert ob.integrity_check() == []


def test_append_claim_mark_sent_ack(ob: Outbox) -> None:
    assert add(ob, 10) == (0, 9)
    assert add(ob, 5, 10) == (10, 14)
    assert ob.depth()["results"] == 15
    c1 = ob.claim("results", 6, now=100.0, resend_after=30.0)
    assert c1 is not None and (c1.seq_first, c1.seq_last, c1.floor, c1.resend) == (0, 5, -1, False)
    assert c1.ts == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and c1.y_pred == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert c1.model_version == [1] * 6 and c1.x is None and c1.y_true is None
    c2 = ob.claim("results", 100, now=100.0, resend_after=30.0)
    assert c2 is not None and (c2.seq_first, c2.seq_last) == (6, 14)
    assert ob.claim("results", 100, now=100.0, resend_after=30.0) is None  # all leased
    ob.mark_sent("results", 0, 5, now=101.0)
    ob.mark_sent("results", 6, 14, now=101.0)
    assert ob.ack("results", 5) == 6
    assert ob.depth()["results"] == 9
    assert ob.last_ack_ts() is not None
    # the next batch after a resend carries the floor of what was acknowledged
    ob.release_all()
    c3 = ob.claim("results", 100, now=102.0, resend_after=30.0)
    assert c3 is not None and (c3.seq_first, c3.seq_last, c3.floor) == (6, 14, 5)
    assert ob.ack("results", 14) == 9
    assert ob.claim("results", 100, now=103.0, resend_after=30.0) is None
    accounted(ob, {"results": 15})


def test_resend_after_timeout_keeps_the_range(ob: Outbox) -> None:
    add(ob, 8)
    c = ob.claim("results", 4, now=0.0, resend_after=30.0)
    assert c is not None and (c.seq_first, c.seq_last) == (0, 3)
    ob.mark_sent("results", 0, 3, now=1.0)
    c = ob.claim("results", 4, now=2.0, resend_after=30.0)
    assert c is not None and (c.seq_first, c.seq_last, c.resend) == (4, 7, False)
    ob.mark_sent("results", 4, 7, now=20.0)
    assert ob.claim("results", 4, now=30.9, resend_after=30.0) is None  # PUBACK at 1.0 restarted the clock
    again = ob.claim("results", 4, now=31.0, resend_after=30.0)
    assert again is not None and (again.seq_first, again.seq_last, again.resend) == (0, 3, True)
    assert ob.claim("results", 4, now=31.0, resend_after=30.0) is None  # 4..7 due only at 50
    ob.ack("results", 1)  # partly acknowledged: what is left of 4..7 and 2..3 comes back
    later = ob.claim("results", 10, now=61.0, resend_after=30.0)
    assert later is not None and (later.seq_first, later.seq_last, later.floor) == (2, 3, 1)
    later = ob.claim("results", 10, now=61.0, resend_after=30.0)
    assert later is not None and (later.seq_first, later.seq_last) == (4, 7)


def test_claim_without_puback_expires_and_release_makes_due(ob: Outbox) -> None:
    add(ob, 3)
    c = ob.claim("results", 10, now=0.0, resend_after=5.0)
    assert c is not None
    assert ob.claim("results", 10, now=4.0, resend_after=5.0) is None
    ob.release("results", 0, 2)  # publish failed: due again at once
    c = ob.claim("results", 10, now=4.0, resend_after=5.0)
    assert c is not None and (c.seq_first, c.seq_last, c.resend) == (0, 2, True)
    assert ob.claim("results", 10, now=8.9, resend_after=5.0) is None
    assert ob.claim("results", 10, now=9.0, resend_after=5.0) is not None  # never acknowledged by PUBACK


def test_release_all_after_reconnect(ob: Outbox) -> None:
    add(ob, 10)
    for _ in range(2):
        c = ob.claim("results", 5, now=0.0, resend_after=300.0)
        assert c is not None
        ob.mark_sent("results", c.seq_first, c.seq_last, now=0.0)
    assert ob.claim("results", 5, now=1.0, resend_after=300.0) is None
    ob.release_all()
    c = ob.claim("results", 5, now=1.0, resend_after=300.0)
    assert c is not None and (c.seq_first, c.seq_last) == (0, 4)
    ob.mark_sent("results", 3, 3, now=1.0)  # a PUBACK inside the lease is fine
    ob.mark_sent("results", 90, 99, now=1.0)  # a late PUBACK for nothing leased is ignored


def test_restart_resends_unacknowledged_and_keeps_seq(db: Path) -> None:
    with big(db) as o:
        add(o, 10)
        c = o.claim("results", 100, now=0.0, resend_after=300.0)
        assert c is not None
        o.mark_sent("results", 0, 9, now=0.0)
        o.ack("results", 3, now=123.0)
    with big(db) as o:
        assert o.depth()["results"] == 6
        assert o.last_ack_ts() == 123.0
        c = o.claim("results", 100, now=1.0, resend_after=300.0)
        assert c is not None and (c.seq_first, c.seq_last, c.floor) == (4, 9, 3)
        assert add(o, 1) == (10, 10)


def test_seq_continues_after_reopen_even_when_empty(db: Path) -> None:
    with big(db) as o:
        add(o, 7)
        assert o.append_message("telemetry", b"t0") == 0
        assert o.append_message("telemetry", b"t1") == 1
        assert o.ack("results", 6) == 7
        assert o.ack("telemetry", 1) == 2
        assert o.depth() == {"results": 0, "telemetry": 0, "stats": 0}
    with big(db) as o:
        assert o.next_seq("results") == 7
        assert add(o, 2) == (7, 8)
        assert o.append_message("telemetry", b"t2") == 2
        assert o.append_message("stats", b"s0") == 0
        c = o.claim("results", 10, now=0.0, resend_after=1.0)
        assert c is not None and (c.seq_first, c.floor) == (7, 6)
        accounted(o, {"results": 7, "telemetry": 2})


def test_ack_idempotent_and_clamped(ob: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    add(ob, 10)
    assert ob.ack("results", 4) == 5
    assert ob.ack("results", 4) == 0
    assert ob.ack("results", 2) == 0  # an old watermark arriving late
    assert ob.ack("results", -1) == 0
    with caplog.at_level(logging.WARNING, logger="runtime.outbox"):
        assert ob.ack("results", 10**12) == 5
    assert any("clamped" in r.getMessage() for r in caplog.records)
    assert ob.ack("results", 10**12) == 0
    assert ob.depth()["results"] == 0
    assert add(ob, 3) == (10, 12)  # the clamp did not move the sequence
    assert ob.ack("telemetry", 5) == 0  # nothing handed out yet: clamped to -1
    accounted(ob, {"results": 10})


def test_ack_range_broker_mode_and_holes(ob: Outbox) -> None:
    add(ob, 10)
    a = ob.claim("results", 3, now=0.0, resend_after=60.0)
    b = ob.claim("results", 3, now=0.0, resend_after=60.0)
    assert a is not None and b is not None
    assert ob.ack_range("results", b.seq_first, b.seq_last) == 3  # PUBACKs out of order
    assert ob.ack_range("results", b.seq_first, b.seq_last) == 0
    assert ob.depth()["results"] == 7
    ob.release_all()
    first = ob.claim("results", 10, now=1.0, resend_after=60.0)
    assert first is not None and (first.seq_first, first.seq_last, first.floor) == (0, 2, -1)
    second = ob.claim("results", 10, now=1.0, resend_after=60.0)
    assert second is not None and (second.seq_first, second.seq_last) == (6, 9)  # stops at, and skips, the hole
    assert ob.ack_range("results", 0, 2) == 3
    c = ob.claim("results", 10, now=100.0, resend_after=60.0)
    assert c is not None and (c.seq_first, c.seq_last, c.floor) == (6, 9, 5)
    with pytest.raises(ValueError):
        ob.ack_range("results", 5, 4)
    accounted(ob, {"results": 6})


def test_message_streams(ob: Outbox) -> None:
    assert [ob.append_message("telemetry", p) for p in (b"a", b"bb", b"ccc")] == [0, 1, 2]
    assert ob.append_message("stats", bytearray(b"s")) == 0
    c = ob.claim("telemetry", 100, now=0.0, resend_after=10.0)
    assert c is not None and (c.seq_first, c.seq_last, c.payload, c.floor) == (0, 0, b"a", -1)
    c = ob.claim("telemetry", 100, now=0.0, resend_after=10.0)
    assert c is not None and c.payload == b"bb"
    s = ob.claim("stats", 1, now=0.0, resend_after=10.0)
    assert s is not None and s.payload == b"s"
    assert ob.ack("telemetry", 0) == 1
    assert ob.size_bytes() == 2 * MESSAGE_ROW_BYTES + 5 + MESSAGE_ROW_BYTES + 1
    with pytest.raises(ValueError):
        ob.append_message("results", b"x")
    with pytest.raises(ValueError):
        ob.append_message("logs", b"x")
    with pytest.raises(TypeError):
        ob.append_message("telemetry", "text")  # type: ignore[arg-type]


def test_result_columns_round_trip_into_a_result_batch(ob: Outbox) -> None:
    x = np.array([[1.0, 2.0], [math.nan, 4.0], [5.0, 6.0], [7.0, 8.0]])
    first, last = ob.append_results(
        [10.0, 11.0, 12.0, 13.0],
        np.array([3, 3, 4, 4]),
        np.array([0.5, math.nan, 1.5, 2.5]),
        x,
        [None, 1.0, math.nan, 3.0],
        x_mask=np.array([True, True, True, False]),
    )
    assert (first, last) == (0, 3)
    c = ob.claim("results", 10, now=0.0, resend_after=1.0)
    assert c is not None
    assert c.model_version == [3, 3, 4, 4]
    assert c.y_pred == [0.5, None, 1.5, 2.5]
    assert c.x == [[1.0, 2.0], [None, 4.0], [5.0, 6.0], None]
    assert c.y_true == [None, 1.0, None, 3.0]
    batch = ResultBatch(
        device="dev-1",
        seq_first=c.seq_first,
        seq_last=c.seq_last,
        floor=c.floor,
        ts=c.ts,
        model_version=c.model_version,
        y_pred=c.y_pred,
        x=c.x,
        features=("a", "b"),
        y_true=c.y_true,
    )
    assert batch.x is not None and batch.x[1] == [None, 4.0]
    # list rows with None, one model version for all rows
    ob.append_results([1.0, 2.0], 7, [0.0, 0.0], [[1.0, 1.0], None])
    c = ob.claim("results", 10, now=0.0, resend_after=1.0)
    assert c is not None and c.x == [[1.0, 1.0], None] and c.model_version == [7, 7]
    assert ob.size_bytes() == 6 * RESULT_ROW_BYTES + 4 * 16


def test_bad_arguments(ob: Outbox) -> None:
    with pytest.raises(ValueError, match="finite"):
        ob.append_results([math.nan], 1, [1.0])
    with pytest.raises(ValueError, match="y_pred"):
        ob.append_results([1.0, 2.0], 1, [1.0])
    with pytest.raises(ValueError, match="x has shape"):
        ob.append_results([1.0, 2.0], 1, [1.0, 2.0], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="go together"):
        ob.append_results([1.0], 1, [1.0], source_key="k")
    with pytest.raises(ValueError, match="unknown stream"):
        ob.claim("logs", 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        ob.set_meta("outbox.bytes_written", 0)
    with pytest.raises(ValueError):
        Outbox(Path("unused.db"), max_rows=0, max_bytes=10)
    assert ob.next_seq("results") == 0


def test_source_position_in_the_same_transaction(ob: Outbox) -> None:
    assert ob.get_meta("src") is None
    ob.append_results([1.0, 2.0], 1, [0.0, 0.0], source_key="src", source_position=120)
    assert ob.get_meta("src") == 120
    ob.append_results([3.0], 1, [0.0], source_position=("src", "240"))  # the (key, position) form
    assert ob.get_meta("src") == "240"
    assert ob.append_results([], 1, [], source_key="src", source_position=300) == (3, 2)  # only the position moves
    assert ob.get_meta("src") == 300
    # a failure inside the transaction takes the rows back with it
    with pytest.raises(OutboxError, match=str(ob.path)):
        ob.append_results([4.0, 5.0], 1, [0.0, 0.0], source_key="src", source_position=[1, 2])  # type: ignore[arg-type]
    assert ob.get_meta("src") == 300
    assert ob.depth()["results"] == 3 and ob.next_seq("results") == 3
    assert ob.append_results([4.0], 1, [0.0]) == (3, 3)
    ob.set_meta("src", None)
    assert ob.get_meta("src") is None
    assert ob.integrity_check() == []


def test_errors_name_the_path(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(OutboxError, match=r"junk\.db"):
        big(junk)
    o = big(tmp_path / "ok.db")
    o.close()
    o.close()
    with pytest.raises(OutboxError, match="closed"):
        add(o, 1)


# ---------------------------------------------------------------------- caps


def test_row_cap_drops_telemetry_before_results(db: Path) -> None:
    o = Outbox(db, max_rows=100, max_bytes=10**9)
    for i in range(30):
        o.append_message("telemetry", f"t{i}".encode())
    for i in range(10):
        o.append_message("stats", f"s{i}".encode())
    add(o, 60)
    assert o.dropped() == {"results": 0, "telemetry": 0, "stats": 0}
    add(o, 20)  # 120 rows: the 20 oldest telemetry go
    assert o.dropped() == {"results": 0, "telemetry": 20, "stats": 0}
    assert o.depth() == {"results": 80, "telemetry": 10, "stats": 10}
    t = o.claim("telemetry", 1, now=0.0, resend_after=1.0)
    assert t is not None and (t.seq_first, t.payload, t.floor) == (20, b"t20", 19)
    add(o, 50)  # 150: the other 10 telemetry, then all stats, then the 30 oldest results
    assert o.dropped() == {"results": 30, "telemetry": 30, "stats": 10}
    assert o.depth() == {"results": 100, "telemetry": 0, "stats": 0}
    r = o.claim("results", 1000, now=0.0, resend_after=1.0)
    assert r is not None and (r.seq_first, r.seq_last, r.floor) == (30, 129, 29)
    accounted(o, {})
    o.close()
    with Outbox(db, max_rows=100, max_bytes=10**9) as again:  # drop counts are persistent
        assert again.dropped() == {"results": 30, "telemetry": 30, "stats": 10}
        accounted(again, {})


def test_byte_cap_exact(db: Path) -> None:
    o = Outbox(db, max_rows=10**6, max_bytes=10_000)
    payload = b"p" * (200 - MESSAGE_ROW_BYTES)
    for _ in range(20):
        o.append_message("telemetry", payload)  # 20 x 200 B
    x = np.zeros((50, 2))
    add(o, 50, x=x)  # 50 x (48 + 16) = 3200 B -> 7200
    assert o.size_bytes() == 7200
    add(o, 50, x=x)  # 10400: 400 B over, two telemetry messages go
    assert o.dropped() == {"results": 0, "telemetry": 2, "stats": 0}
    assert o.size_bytes() == 10_000
    add(o, 100)  # 100 x 48 = 4800 over: the 18 telemetry (3600), then 19 results (19 x 64 = 1216)
    assert o.dropped() == {"results": 19, "telemetry": 20, "stats": 0}
    assert o.size_bytes() <= 10_000
    accounted(o, {})
    o.close()


def test_new_data_wins_but_results_outrank_telemetry(db: Path) -> None:
    o = Outbox(db, max_rows=100, max_bytes=10**9)
    assert add(o, 150) == (0, 149)  # a batch larger than the cap keeps its newest rows
    assert o.dropped()["results"] == 50 and o.depth()["results"] == 100
    # full of results: a telemetry message never pushes a result out; it is dropped itself, counted
    assert o.append_message("telemetry", b"t0") == 0
    assert o.dropped() == {"results": 50, "telemetry": 1, "stats": 0}
    assert o.append_message("stats", b"s0") == 0
    assert o.dropped() == {"results": 50, "telemetry": 1, "stats": 1}
    assert o.depth() == {"results": 100, "telemetry": 0, "stats": 0}
    assert o.claim("telemetry", 1, now=0.0, resend_after=1.0) is None
    # with room made (rows acknowledged), telemetry is held; then new results push it out first
    c = o.claim("results", 10, now=0.0, resend_after=1.0)  # the oldest kept rows, not the dropped ones
    assert c is not None and (c.seq_first, c.seq_last, c.floor) == (50, 59, 49)
    o.ack("results", c.seq_last)
    assert o.append_message("telemetry", b"t1") == 1
    assert o.append_message("stats", b"s1") == 1
    assert add(o, 9) == (150, 158)  # 90 + 2 messages + 9: one over, and telemetry goes first
    assert o.dropped() == {"results": 50, "telemetry": 2, "stats": 1}
    assert add(o, 1) == (159, 159)  # then stats
    assert o.dropped() == {"results": 50, "telemetry": 2, "stats": 2}
    assert add(o, 1) == (160, 160)  # nothing of lower rank left: the oldest result goes
    assert o.dropped() == {"results": 51, "telemetry": 2, "stats": 2}
    accounted(o, {"results": 10})
    big = Outbox(db.with_name("big.db"), max_rows=100, max_bytes=1000)
    assert big.append_message("stats", b"x" * 5000) == 0  # alone over the cap: counted as dropped
    assert big.dropped()["stats"] == 1 and big.depth()["stats"] == 0
    o.close()
    big.close()


def test_drops_cut_leases(db: Path) -> None:
    o = Outbox(db, max_rows=10, max_bytes=10**9)
    add(o, 10)
    c = o.claim("results", 6, now=0.0, resend_after=5.0)
    assert c is not None and (c.seq_first, c.seq_last) == (0, 5)
    add(o, 4)  # drops 0..3, which were leased
    resent = o.claim("results", 10, now=10.0, resend_after=5.0)
    assert resent is not None and (resent.seq_first, resent.seq_last, resent.floor) == (4, 5, 3)
    fresh = o.claim("results", 10, now=10.0, resend_after=5.0)
    assert fresh is not None and (fresh.seq_first, fresh.seq_last) == (6, 13)
    o.mark_sent("results", 0, 5, now=10.0)  # PUBACK for a partly dropped range: no error
    o.close()


def test_random_operations_keep_the_books(db: Path) -> None:
    rng = random.Random(7)
    o = Outbox(db, max_rows=300, max_bytes=40_000)
    acked: dict[str, int] = {}
    leased: set[tuple[str, int, int]] = set()
    now = 0.0
    for _ in range(400):
        now += rng.random()
        op = rng.random()
        stream = rng.choice(["results", "results", "telemetry", "stats"])
        if op < 0.35:
            n = rng.randint(0, 120)
            x = np.ones((n, rng.randint(1, 6))) if rng.random() < 0.5 else None
            o.append_results(np.arange(n, dtype=float), 1, np.zeros(n), x)
        elif op < 0.5:
            o.append_message(rng.choice(["telemetry", "stats"]), b"m" * rng.randint(0, 400))
        elif op < 0.75:
            c = o.claim(stream, rng.randint(1, 100), now, 5.0)
            if c is not None:
                assert c.floor < c.seq_first <= c.seq_last < o.next_seq(stream)
                assert len(c.ts if stream == "results" else [c.payload]) == c.n
                if rng.random() < 0.8:
                    o.mark_sent(stream, c.seq_first, c.seq_last, now)
                leased.add((stream, c.seq_first, c.seq_last))
        elif op < 0.85 and leased:
            s, a, b = rng.choice(sorted(leased))
            acked[s] = acked.get(s, 0) + o.ack_range(s, a, b)
        elif op < 0.95:
            w = rng.randint(-1, o.next_seq(stream) + 5)
            acked[stream] = acked.get(stream, 0) + o.ack(stream, w)
        else:
            o.release_all()
        d = o.depth()
        assert sum(d.values()) <= 300 and o.size_bytes() <= 40_000
        for s in d:
            assert d[s] + o.dropped()[s] + acked.get(s, 0) == o.next_seq(s)
    accounted(o, acked)
    o.close()


# ---------------------------------------------------------------------- disk


def test_file_shrinks_after_a_backlog_and_stays_bounded(db: Path) -> None:
    o = big(db)
    x = np.random.default_rng(1).random((1000, 8))
    for i in range(100):  # a backlog of 100k rows (an outage)
        add(o, 1000, i * 1000.0, x=x)
    o.checkpoint()
    peak = o.file_bytes()
    assert peak > 5_000_000
    assert o.ack("results", o.next_seq("results") - 1) == 100_000  # the uplink catches up
    o.checkpoint()
    drained = o.file_bytes()
    assert drained < peak // 4, (peak, drained)

    def cycle() -> int:  # steady state: append, send, acknowledge
        for i in range(60):
            add(o, 1000, i * 1000.0, x=x)
            c = o.claim("results", 2000, now=float(i), resend_after=30.0)
            assert c is not None
            o.mark_sent("results", c.seq_first, c.seq_last, float(i))
            o.ack("results", c.seq_first - 1)  # the cloud lags one batch behind
        o.checkpoint()
        return o.file_bytes()

    first, second = cycle(), cycle()
    assert second <= first + 256 * 1024, (first, second)  # no growth from one cycle to the next
    assert second < 4 * 1024 * 1024
    o.vacuum()
    assert o.integrity_check() == []
    o.close()


def test_bytes_written_is_persisted(db: Path) -> None:
    with big(db) as o:
        assert o.bytes_written() >= 0
        add(o, 100, x=np.zeros((100, 4)))
        written = o.bytes_written()
        assert written >= 100 * (RESULT_ROW_BYTES + 32)
    with big(db) as o:
        assert o.bytes_written() == written
        st = o.status()
        assert st.depth["results"] == 100 and st.bytes_written == written and st.file_bytes > 0


# ---------------------------------------------------------------------- crash safety


def _verify_after_kill(db: Path) -> int:
    with big(db) as o:
        assert o.integrity_check() == []
        pos = int(o.get_meta(KEY) or 0)
        assert o.next_seq("results") == pos  # every reading before the position has its row, none after
        c = None
        o.release_all()
        held: list[int] = []
        while (c := o.claim("results", 5000, now=0.0, resend_after=1.0)) is not None:
            if not held:
                assert c.floor == c.seq_first - 1
            held.extend(range(c.seq_first, c.seq_last + 1))
            ts, y_pred, x, y_true = rows_for(c.seq_first, c.n)
            assert c.ts == ts.tolist() and c.y_pred == y_pred.tolist() and c.x == x.tolist()
            expected_y_true = [None if math.isnan(v) else v for v in y_true.tolist()]
            assert c.y_true == (expected_y_true if any(v is not None for v in expected_y_true) else None)
        if held:
            assert held == list(range(held[0], pos))  # consecutive, up to the position
        assert o.depth()["results"] == len(held)
        for tele in iter(lambda: o.claim("telemetry", 1, now=0.0, resend_after=1.0), None):
            assert json.loads(tele.payload)["pos"] <= pos
        return pos


def _stderr(proc: subprocess.Popen[str]) -> str:
    return proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""


def test_sigkill_mid_append_loses_and_repeats_nothing(db: Path) -> None:
    rng = random.Random(int(os.environ.get("OUTBOX_CRASH_SEED", "20")))
    deadline = time.monotonic() + 90.0
    kills = 0
    last_pos = 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    while kills < 20 and time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(db), str(rng.randrange(2**31))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            start = proc.stdout.readline().split()
            assert start[:1] == ["start"], (start, _stderr(proc))
            assert int(start[1]) == last_pos
            for _ in range(rng.randint(1, 40)):  # the worker keeps going while we read: a random kill point
                line = proc.stdout.readline()
                assert line.startswith("committed"), (line, _stderr(proc))
            # Not synchronisation: a random delay so the kill is not tied to the moment of a print.
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        last_pos = _verify_after_kill(db)
    assert kills >= 10, "too few kills within the time bound"
    assert last_pos > 0


# ---------------------------------------------------------------------- speed (printed, not asserted)


def test_append_throughput_is_printed(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    o = big(db)
    rng = np.random.default_rng(0)
    batch, batches = 1000, 100
    x = rng.random((batch, 8))
    ts = np.arange(batch, dtype=np.float64)
    y = rng.random(batch)
    mv = np.ones(batch, dtype=np.int64)
    t0 = time.perf_counter()
    for i in range(batches):
        o.append_results(ts + i * batch, mv, y, x, y, source_key="src", source_position=i)
    with_x = batch * batches / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(batches):
        o.append_results(ts + i * batch, mv, y, source_key="src", source_position=i)
    without_x = batch * batches / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = 0
    while (c := o.claim("results", 2000, now=0.0, resend_after=60.0)) is not None:
        o.mark_sent("results", c.seq_first, c.seq_last, 0.0)
        n += o.ack("results", c.seq_last)
    drain = n / (time.perf_counter() - t0)
    assert n == 2 * batch * batches and o.depth()["results"] == 0
    o.close()
    full = Outbox(db.with_name("full.db"), max_rows=50 * batch, max_bytes=BIG_BYTES)
    for i in range(50):
        full.append_results(ts + i * batch, mv, y, x, y)
    t0 = time.perf_counter()
    for i in range(batches):
        full.append_results(ts + i * batch, mv, y, x, y)
    at_cap = batch * batches / (time.perf_counter() - t0)
    assert full.dropped()["results"] == batch * batches and full.depth()["results"] == 50 * batch
    full.close()
    with capsys.disabled():
        print(
            f"\noutbox: append {with_x:,.0f} rows/s with 8 features + y_true, {without_x:,.0f} rows/s without x "
            f"(batches of {batch}); {at_cap:,.0f} rows/s at the row cap (each append drops as many); "
            f"claim+mark_sent+ack {drain:,.0f} rows/s (batches of 2000)"
        )
