"""The daemon's logic through the in-memory uplink: data path, acks, updates, commands (no sockets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_device import desired, linear_manifest, settings, until

from runtime.daemon import Daemon
from runtime.protocol import Ack, CommandResult, ReportedState, ResultBatch, decode
from runtime.transports.memory import MemoryUplink


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def make(tmp_path: Path, fleet_keys, **extra) -> tuple[Daemon, MemoryUplink]:
    _, pub = fleet_keys
    s = settings(tmp_path, pub, transport="memory", **extra)
    up = MemoryUplink.from_settings(s)
    return Daemon(s, uplink=up), up


def batches(up: MemoryUplink) -> list[ResultBatch]:
    return [decode(ResultBatch, p) for p in up.of("results")]


def reported(up: MemoryUplink) -> ReportedState:
    return decode(ReportedState, up.of("reported")[-1])


def test_results_flow_and_are_deleted_only_on_cloud_ack(tmp_path, fleet_keys):
    key, _ = fleet_keys

    async def go():
        d, up = make(tmp_path, fleet_keys)
        d.store.install(linear_manifest(key, 1))
        d.store.activate(linear_manifest(key, 1).ref)
        await d.start()
        X = np.random.default_rng(0).normal(size=(1000, 2))
        d.pipeline.submit_arrays(X, y_true=X @ [2.0, -1.0] + 0.5)
        d.pipeline.flush()
        await until(lambda: sum(b.n for b in batches(up)) >= 1000, what="1000 results published")
        got = batches(up)
        seqs = [s for b in got for s in range(b.seq_first, b.seq_last + 1)]
        assert sorted(seqs) == list(range(1000))
        y = np.concatenate([b.y_pred for b in got])
        assert np.allclose(np.sort(y), np.sort(X @ [2.0, -1.0] + 0.5))
        assert all(set(b.model_version) == {1} for b in got)
        # PUBACK alone deletes nothing
        assert d.outbox.depth()["results"] == 1000
        up.deliver("ack", Ack(device="dev-1", watermarks={"results": 599}).to_bytes())
        assert d.outbox.depth()["results"] == 400
        up.deliver("ack", Ack(device="other", watermarks={"results": 999}).to_bytes())  # not ours
        assert d.outbox.depth()["results"] == 400
        up.deliver("ack", Ack(device="dev-1", watermarks={"results": 999}).to_bytes())
        assert d.outbox.depth()["results"] == 0
        await d.shutdown(0.5)

    run(go())


def test_unacknowledged_rows_are_resent_after_timeout_and_reconnect(tmp_path, fleet_keys):
    async def go():
        d, up = make(tmp_path, fleet_keys, broker={"resend_after": 0.3})
        await d.start()
        d.pipeline.submit_arrays(np.ones((10, 2)))
        d.pipeline.flush()
        await until(lambda: len(batches(up)) >= 1, what="first send")
        await until(lambda: len(batches(up)) >= 2, what="resend after the timeout")
        assert batches(up)[1].seq_first == 0 and batches(up)[1].seq_last == 9
        n = len(batches(up))
        up.set_link(False)
        up.set_link(True)
        await until(lambda: len(batches(up)) > n, what="resend after reconnect")
        # no model yet: results carry no prediction but are kept (training data for v1)
        assert batches(up)[0].y_pred == [None] * 10
        await d.shutdown(0.2)

    run(go())


def test_update_inline_linear_swaps_without_gaps(tmp_path, fleet_keys):
    key, _ = fleet_keys

    async def go():
        d, up = make(tmp_path, fleet_keys)
        m1, m2 = linear_manifest(key, 1), linear_manifest(key, 2, weights=(1.0, 1.0), intercept=0.0)
        d.store.install(m1)
        d.store.activate(m1.ref)
        await d.start()
        rng = np.random.default_rng(1)
        for i in range(20):
            d.pipeline.submit_arrays(rng.normal(size=(50, 2)))
            if i == 10:
                up.deliver("desired", desired(m2, "dev-1", rollout="r1"))
            await asyncio.sleep(0)
        await until(lambda: d.pipeline.model_version == 2, what="switch to v2")
        d.pipeline.submit_arrays(rng.normal(size=(5, 2)))
        d.pipeline.flush()
        await until(lambda: sum(b.n for b in batches(up)) >= 1005, what="all results")
        rows = sorted(
            (s, v)
            for b in batches(up)
            for s, v in zip(range(b.seq_first, b.seq_last + 1), b.model_version, strict=True)
        )
        assert [s for s, _ in rows] == list(range(1005))  # unbroken sequence: nothing dropped or doubled
        versions = [v for _, v in rows]
        switch = versions.index(2)
        assert set(versions[:switch]) == {1} and set(versions[switch:]) == {2}
        await until(lambda: up.of("reported") and reported(up).active is not None and reported(up).active.version == 2)
        r = reported(up)
        assert r.previous.version == 1 and r.update.state == "applied" and r.update.rollout_id == "r1"
        await d.shutdown(0.2)

    run(go())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bad-signature", "does not verify"),
        ("wrong-width", "needs features"),
        ("nan", "overflows"),
        ("downgrade", "older than the active"),
    ],
)
def test_refused_updates_keep_the_old_model(tmp_path, fleet_keys, case, reason):
    key, _ = fleet_keys
    other_key = tmp_path / "other"
    from runtime.artifacts import generate_keypair

    okey, _ = generate_keypair(other_key)

    async def go():
        d, up = make(tmp_path, fleet_keys)
        m1 = linear_manifest(key, 3)
        d.store.install(m1)
        d.store.activate(m1.ref)
        await d.start()
        d.pipeline.submit_arrays(np.ones((20, 2)))
        d.pipeline.flush()
        if case == "bad-signature":
            bad = linear_manifest(okey, 4)
        elif case == "wrong-width":
            bad = linear_manifest(key, 4, weights=(1.0, 2.0, 3.0), features=("a", "b", "zz"))
        elif case == "nan":
            bad = linear_manifest(key, 4, weights=(1e308, 1e308))
        else:
            bad = linear_manifest(key, 2)
        up.deliver("desired", desired(bad, "dev-1"))
        await until(
            lambda: bool(up.of("reported")) and reported(up).update.state == "failed", what="a failed update report"
        )
        r = reported(up)
        assert reason in (r.update.reason or ""), r.update.reason
        assert r.active.version == 3 and d.pipeline.model_version == 3
        d.pipeline.submit_arrays(np.ones((1, 2)))
        d.pipeline.flush()
        await until(lambda: any(3 in b.model_version for b in batches(up)))
        if case == "bad-signature":
            assert not d.store.has(bad.ref)  # never even lands on disk
        await d.shutdown(0.2)

    run(go())


def test_rollback_command_and_desired_rollback_need_no_download(tmp_path, fleet_keys):
    key, _ = fleet_keys

    async def go():
        d, up = make(tmp_path, fleet_keys)
        m1, m2 = linear_manifest(key, 1), linear_manifest(key, 2, weights=(1.0, 0.0))
        for m in (m1, m2):
            d.store.install(m)
        d.store.activate(m1.ref)
        d.store.activate(m2.ref)
        await d.start()
        up.deliver("cmd", json.dumps({"type": "rollback", "id": "c1"}).encode())
        await until(lambda: bool(up.of("cmd/result")), what="command result")
        res = decode(CommandResult, up.of("cmd/result")[-1])
        assert res.id == "c1" and res.ok and res.data["active"] == 1
        assert d.pipeline.model_version == 1
        # the cloud asks for v2 again, then rolls back to v1 by desired state (lower version allowed)
        up.deliver("desired", desired(m2, "dev-1"))
        await until(lambda: d.pipeline.model_version == 2)
        up.deliver("desired", desired(m1, "dev-1", rollback=True))
        await until(lambda: d.pipeline.model_version == 1)
        await until(lambda: reported(up).update.state == "rolled_back")
        # the version rolled back from is not kept as last-known-good
        await until(lambda: reported(up).active.version == 1 and reported(up).previous is None)
        await d.shutdown(0.2)

    run(go())


def test_commands_and_malformed_payloads(tmp_path, fleet_keys):
    async def go():
        d, up = make(tmp_path, fleet_keys)
        await d.start()
        up.deliver("cmd", b'{"type":"ping","id":"p1"}')
        up.deliver("cmd", b'{"type":"set_capture_rate","id":"s1","rate":0.25}')
        up.deliver("cmd", b'{"type":"self_destruct","id":"x1"}')
        up.deliver("cmd", b"\xff\xfe not json")
        up.deliver("desired", b'{"model": {"name": "../etc"}}')
        up.deliver("ack", b'{"device":"dev-1","watermarks":{"results":"lots"}}')
        up.deliver("cmd", b'{"type":"get_state","id":"g1"}')
        await until(lambda: len(up.of("cmd/result")) >= 5, what="five command results")
        res = {r.id: r for r in (decode(CommandResult, p) for p in up.of("cmd/result"))}
        assert res["p1"].ok and "pong" in res["p1"].data
        assert res["s1"].ok and d.pipeline.capture_rate == 0.25
        assert not res["x1"].ok and "self_destruct" in (res["x1"].error or "")
        assert not res["invalid"].ok
        assert res["g1"].ok and res["g1"].data["device"] == "dev-1"
        assert d.invalid_messages == 4
        await d.shutdown(0.2)

    run(go())


def test_outbox_cap_counts_drops_exactly(tmp_path, fleet_keys):
    async def go():
        d, up = make(tmp_path, fleet_keys, outbox={"max_rows": 500})
        up.set_link(False)  # a dead broker: the outbox only gets deeper
        d.pipeline.submit_arrays(np.ones((1200, 2)))
        d.pipeline.flush()
        assert d.outbox.depth()["results"] == 500
        assert d.outbox.dropped()["results"] == 700
        t = d.telemetry()
        assert t.outbox_dropped["results"] == 700 and t.outbox_depth == 500
        await d.shutdown(0.1)

    run(go())


def test_telemetry_has_drift_and_live_error(tmp_path, fleet_keys):
    from runtime.protocol import FeatureStats, Telemetry

    key, _ = fleet_keys

    async def go():
        d, _ = make(tmp_path, fleet_keys)
        m = linear_manifest(key, 1, feature_stats=FeatureStats(mean=(0.0, 0.0), std=(1.0, 1.0)))
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        X = np.random.default_rng(2).normal(loc=3.0, size=(500, 2))
        y = X @ [2.0, -1.0] + 0.5 + 1.0  # the model is off by exactly 1
        d.pipeline.submit_arrays(X, y_true=y)
        d.pipeline.flush()
        t: Telemetry = d.telemetry()
        assert t.live_mae == pytest.approx(1.0) and t.live_n == 500
        assert t.features is not None and t.features.drift_score == pytest.approx(3.0, abs=0.3)
        assert t.readings == 500 and t.predictions == 500 and t.latency_p99_us is not None
        assert t.rss_bytes > 0 and t.bytes_written > 0
        await d.shutdown(0.1)

    run(go())


def test_stats_sharing_sends_sufficient_statistics_not_rows(tmp_path, fleet_keys):
    from runtime.protocol import SufficientStats

    async def go():
        d, up = make(tmp_path, fleet_keys, share={"mode": "stats"})
        await d.start()
        X = np.random.default_rng(3).normal(size=(300, 2))
        y = X @ [3.0, -2.0] + 5
        d.pipeline.submit_arrays(X, y_true=y)
        d.pipeline.flush()
        assert d.flush_stats()
        await until(lambda: bool(up.of("stats")), what="a stats message")
        s = decode(SufficientStats, up.of("stats")[0])
        A = np.hstack([X, np.ones((300, 1))])
        assert s.n == 300 and np.allclose(s.xtx, A.T @ A) and np.allclose(s.xty, A.T @ y)
        assert all(b.x is None for b in batches(up))  # raw features never leave the device
        await d.shutdown(0.1)

    run(go())
