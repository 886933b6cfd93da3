"""Power loss on the write path: SIGKILL the daemon process at random moments, many times.

A real daemon process tails a file of labelled readings that the test keeps appending to; it
predicts, commits micro-batches to its SQLite outbox (the file position in the same
transaction), appends telemetry and sufficient statistics, sends to the broker and deletes rows on
the cloud's acks. The test SIGKILLs it at a random delay after it made progress:

- phase A, ten kills with the broker up: the send, ack and delete path is cut too;
- phase B, ten kills during a broker outage with a small row cap: the cap drops the oldest rows
  (none of them ever sent, so "dropped" and "stored" cannot overlap and the books are exact).

After every kill the outbox opens, ``PRAGMA integrity_check`` is ok and the counters match the
tables. At the end every line was accepted exactly once (row ``i`` holds line ``i``), and
stored + dropped = accepted, with nothing stored twice.

SIGKILL is a process crash, not a cut of the machine's power: the kernel still writes what the
process handed it. The outbox runs SQLite in WAL mode with ``synchronous=NORMAL`` (``FULL`` on
request), which SQLite documents as durable across application crashes.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
from brokers import MosquittoBroker
from chaos.faultkit import daemon_process, daemon_running, report, stored_seqs, write_device_config
from helpers_cloud import start_cloud
from helpers_device import linear_manifest, settings, until

from runtime.artifacts import load_public_key
from runtime.modelstore import ModelStore
from runtime.outbox import Outbox

KILLS_A = 10
KILLS_B = 10
CAP_B = 2000
CHUNK = 6000  # lines appended before each run: enough that most kills land mid-stream


def outbox_figures(db: Path) -> dict[str, tuple[int, int, int]] | None:
    """``{stream: (next_seq, held_rows, dropped)}`` read-only while the daemon runs (None when busy)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            rows = conn.execute("SELECT name, next_seq, held_rows, dropped FROM streams").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return {name: (int(n), int(h), int(d)) for name, n, h, d in rows}


def results(db: Path) -> tuple[int, int, int]:
    return (outbox_figures(db) or {}).get("results", (-1, -1, -1))


def test_sigkill_at_random_points_of_the_write_path(
    tmp_path: Path, fleet_keys, private_broker: MosquittoBroker, unique_id: str
) -> None:
    key, pub = fleet_keys
    fleet = f"power{unique_id}"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    lines = tmp_path / "readings.jsonl"
    lines.touch()
    written = 0

    def append(n: int) -> None:
        nonlocal written
        X = nrng.normal(size=(n, 2))
        with lines.open("a") as f:
            for a, b in X:
                f.write(json.dumps({"ts": 1.7e9 + written, "a": float(a), "b": float(b), "y_true": float(2 * a - b)}))
                f.write("\n")
                written += 1

    def config(name: str, cap: int) -> Path:
        s = settings(
            tmp_path,
            pub,
            "dev-p",
            url=private_broker.url,
            fleet=fleet,
            source={"kind": "file", "path": str(lines), "follow": True},
            outbox={"max_rows": cap},
            share={"mode": "both", "stats_interval": 1.0},
            telemetry_interval=0.3,
        )
        return write_device_config(tmp_path / name, s, log_level="WARNING")

    cfg_a, cfg_b = config("a.toml", 10**6), config("b.toml", CAP_B)
    state = tmp_path / "dev-p"
    store = ModelStore(state, load_public_key(pub))
    m = linear_manifest(key, 1)
    store.install(m)
    store.activate(m.ref)
    db = state / "outbox.db"
    log = tmp_path / "daemon.log"
    kill_points: list[tuple[str, int]] = []
    checks = 0

    def reopen(cap: int) -> tuple[int, int, int]:
        """Open the outbox as the next start will and check it: (next results seq, held, dropped)."""
        nonlocal checks
        with Outbox(db, max_rows=cap, max_bytes=256 * 1024 * 1024) as ob:
            problems = ob.integrity_check()
            assert problems == [], f"after kill {len(kill_points)}: {problems}\n{log.read_text()[-2000:]}"
            checks += 1
            return ob.next_seq("results"), ob.depth()["results"], ob.dropped()["results"]

    async def kill_at_random(cfg: Path, phase: str, cap: int) -> None:
        last = max(results(db)[0], 0)  # progress means a committed micro-batch, not just an opened file
        append(CHUNK)
        p = daemon_process(cfg, log=log)
        try:
            # once this run has committed something (it is on its write path), wait a random moment
            await until(lambda: results(db)[0] > last or p.poll() is not None, 60, f"progress ({phase})")
            assert p.poll() is None, f"the daemon exited by itself:\n{log.read_text()[-2000:]}"
            await asyncio.sleep(rng.uniform(0.0, 0.3))
        finally:
            p.send_signal(signal.SIGKILL)
            await asyncio.to_thread(p.wait, 10)
        nxt, _, _ = reopen(cap)
        kill_points.append((phase, nxt))

    async def run_until(cfg: Path, predicate: Any, what: str) -> None:
        p = daemon_process(cfg, log=log)
        try:
            # up first: a predicate true at once would otherwise stop the daemon as it starts
            await until(lambda: daemon_running(state, p) or p.poll() is not None, 60, f"daemon up ({what})")
            await until(predicate, 120, what)
        finally:
            p.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(p.wait, 30)
        assert rc == 0, log.read_text()[-2000:]

    async def go() -> dict[str, int]:
        svc = await start_cloud(tmp_path / "cloud", fleet_keys, private_broker.url, fleet)
        for _ in range(KILLS_A):
            await kill_at_random(cfg_a, "A", 10**6)
        # drain before the outage: every row acknowledged, so what the cap drops next was never sent
        await run_until(cfg_a, lambda: results(db)[:2] == (written, 0), "phase A drained")
        reopen(10**6)
        assert results(db)[2] == 0, "nothing may be dropped in phase A"

        await asyncio.to_thread(private_broker.kill)
        for _ in range(KILLS_B):
            await kill_at_random(cfg_b, "B", CAP_B)
        _, held, dropped = reopen(CAP_B)
        assert held <= CAP_B and dropped > 0, (held, dropped)
        await asyncio.to_thread(private_broker.start)
        # The last run reads what is left of the file with the broker back: with the cap raised again,
        # so no row it sends can be dropped before its ack (that would be dropped *and* stored).
        await run_until(cfg_a, lambda: results(db)[:2] == (written, 0), "phase B drained after the outage")
        accepted, _, dropped2 = reopen(10**6)
        assert dropped2 == dropped, "drops after the outage"

        seqs = stored_seqs(svc.store, "dev-p")
        rows = svc.store.fetch_results("dev-p", since_seq=-1, limit=written + 10)
        # row i holds line i: nothing read twice, nothing skipped, whatever the kills interrupted
        assert all(r.ts == 1.7e9 + r.seq for r in rows)
        dup = svc.store.counts()["dev-p"].duplicates + len(seqs) - len(set(seqs))
        await svc.stop()
        return {"accepted": accepted, "dropped": dropped, "stored": len(set(seqs)), "duplicated": dup}

    t0 = time.monotonic()
    f = asyncio.run(asyncio.wait_for(go(), 270))
    lost = f["accepted"] - f["stored"] - f["dropped"]
    report(
        f"power loss: {KILLS_A + KILLS_B} SIGKILLs at random points of the write path (seed {seed}; results "
        f"committed at each kill: {[n for _, n in kill_points]}); outbox reopened and integrity-checked {checks} "
        f"times, all ok; lines {written}, accepted {f['accepted']}, stored {f['stored']}, dropped by the cap "
        f"{f['dropped']}, lost {lost}, duplicated {f['duplicated']}; {time.monotonic() - t0:.0f} s"
    )
    assert f["accepted"] == written
    assert f["stored"] + f["dropped"] == f["accepted"] and lost == 0
    assert f["duplicated"] == 0
