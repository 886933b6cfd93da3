"""The store's contract, run against SQLite (tmp_path) and PostgreSQL (a schema per test)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pg import pg_url  # noqa: F401  (fixture)

from cloud.errors import ConflictError, NotFoundError, SchemaError, StoreError
from cloud.store import ROLLOUT_TERMINAL_STATES, RowKey, Store, Window, open_store
from cloud.store.watermarks import StreamState
from cloud.training import SuffStats
from runtime.errors import ConfigError
from runtime.protocol import (
    DesiredState,
    ModelManifest,
    ModelRef,
    ReportedState,
    ResultBatch,
    Status,
    Telemetry,
    TrainingInfo,
    UpdateStatus,
)

FEATS = ("x1", "x2")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cloud.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


def dev() -> str:
    return f"d-{uuid.uuid4().hex[:8]}"


def batch(
    device: str,
    first: int,
    n: int,
    *,
    floor: int = -1,
    features: tuple[str, ...] | None = FEATS,
    x: np.ndarray | None = None,
    labelled: bool = True,
    ts0: float = 1000.0,
    seed: int = 0,
) -> ResultBatch:
    rng = np.random.default_rng(seed + first)
    X = rng.normal(size=(n, 2)) if x is None else x
    y = 3 * X[:, 0] - 2 * X[:, 1] + 5 + rng.normal(0, 0.1, n)
    return ResultBatch(
        device=device,
        model="m",
        seq_first=first,
        seq_last=first + n - 1,
        floor=floor,
        ts=[ts0 + first + i for i in range(n)],
        model_version=[1] * n,
        y_pred=(y + 0.5).tolist(),
        x=X.tolist(),
        features=features,
        y_true=y.tolist() if labelled else None,
    )


def telemetry(device: str, seq: int, ts: float, live_mae: float = 0.5, depth: int = 3) -> Telemetry:
    return Telemetry(
        device=device,
        seq=seq,
        ts=ts,
        uptime_s=10,
        readings=5,
        predictions=5,
        rejected=0,
        outbox_depth=depth,
        outbox_bytes=100,
        outbox_dropped={"results": 2, "telemetry": 1},
        live_mae=live_mae,
        live_n=4,
    )


# --------------------------------------------------------------------------- exactly once


def test_batch_delivered_twice_is_stored_once(store: Store) -> None:
    d = dev()
    b = batch(d, 0, 50)
    r1 = store.ingest([b])
    assert (r1.rows_stored, r1.batches_new, r1.duplicates) == (50, 1, 0)
    assert r1[d] == {"results": 49}
    r2 = store.ingest([b, b])  # redelivered, twice, after the ack was lost
    assert (r2.rows_stored, r2.batches_duplicate, r2.duplicates) == (0, 2, 100)
    assert r2[d] == {"results": 49}  # re-acknowledged
    r3 = store.ingest([batch(d, 50, 10), batch(d, 50, 10)])  # a duplicate within one call
    assert (r3.rows_stored, r3.batches_new, r3.batches_duplicate) == (10, 1, 1)
    counts = store.counts()[d]
    assert (counts.rows, counts.distinct_seqs, counts.duplicates) == (60, 60, 0)


def test_out_of_order_batches_and_watermark(store: Store, store_url: str) -> None:
    d = dev()
    assert store.ingest([batch(d, 20, 10)])[d] == {"results": -1}
    assert store.ingest([batch(d, 0, 10)])[d] == {"results": 9}
    assert store.ingest([batch(d, 40, 5)])[d] == {"results": 9}
    store.close()
    with open_store(store_url) as again:  # the stored ranges above the watermark persist
        assert again.watermarks(d) == {"results": 9}
        assert again.ingest([batch(d, 10, 10)])[d] == {"results": 29}
        assert again.ingest([batch(d, 30, 10)])[d] == {"results": 44}
        assert again.counts()[d].rows == 45
        assert again.counts()[d].duplicates == 0


def test_rebatched_resend_stores_only_new_rows(store: Store) -> None:
    d = dev()
    store.ingest([batch(d, 0, 10), batch(d, 20, 10)])
    r = store.ingest([batch(d, 5, 20)])  # overlaps both stored batches: a different key
    assert (r.rows_stored, r.batches_new, r.duplicates) == (10, 1, 10)
    assert r[d] == {"results": 29}
    r = store.ingest([batch(d, 25, 10)])  # partly at or below the watermark
    assert (r.rows_stored, r.duplicates) == (5, 5)
    rows = store.fetch_results(d, limit=100)
    assert [row.seq for row in rows] == list(range(35))


def test_floor_skips_rows_the_device_gave_up(store: Store) -> None:
    d = dev()
    # rows 0..99 were dropped by the device's outbox cap: the first batch says so with its floor
    assert store.ingest([batch(d, 100, 10, floor=99)])[d] == {"results": 109}
    # a floor that lands inside stored ranges above the watermark joins them
    store.ingest([batch(d, 130, 10)])
    assert store.watermarks(d) == {"results": 109}
    assert store.ingest([batch(d, 150, 10, floor=135)])[d] == {"results": 139}
    # and a floor just below a stored range advances over it
    assert store.ingest([batch(d, 170, 5, floor=149)])[d] == {"results": 159}
    # a late batch below the watermark stores nothing: its rows are counted as duplicates
    r = store.ingest([batch(d, 50, 10)])
    assert (r.rows_stored, r.duplicates, r[d]) == (0, 10, {"results": 159})
    assert store.counts()[d].rows == 35


def test_concurrent_ingesters_store_once(store_url: str) -> None:
    d = dev()
    batches = [batch(d, i * 20, 20) for i in range(30)]
    stores = [open_store(store_url) for _ in range(3)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def work(s: Store, order: list[ResultBatch]) -> None:
        try:
            barrier.wait(timeout=10)
            for k in range(0, len(order), 3):
                s.ingest(order[k : k + 3])
        except BaseException as exc:  # reported below
            errors.append(exc)

    rng = np.random.default_rng(0)
    threads = [
        threading.Thread(target=work, args=(s, [batches[i] for i in rng.permutation(len(batches))])) for s in stores
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    assert not errors
    with open_store(store_url) as s:
        c = s.counts()[d]
        assert (c.rows, c.duplicates) == (600, 0)
        assert s.watermarks(d) == {"results": 599}


def test_telemetry_and_stats_exactly_once_and_device_fields(store: Store) -> None:
    d = dev()
    st_msg = SuffStats.from_rows(np.ones((3, 2)), np.ones(3)).to_message(d, FEATS, seq=0, model="m")
    r = store.ingest(
        [("fleet-a", batch(d, 0, 5))],
        [telemetry(d, 0, 100.0, live_mae=0.9), telemetry(d, 2, 300.0, live_mae=0.3, depth=7)],
        [st_msg],
    )
    assert (r.telemetry_stored, r.stats_stored) == (2, 1)
    assert r[d] == {"results": 4, "telemetry": 0, "stats": 0}
    r = store.ingest([], [telemetry(d, 1, 200.0, live_mae=0.5), telemetry(d, 2, 300.0)], [st_msg])
    assert (r.telemetry_stored, r.stats_stored, r.duplicates) == (1, 0, 2)
    assert r[d] == {"telemetry": 2, "stats": 0}
    rec = store.get_device(d)
    assert rec is not None
    assert rec.fleet == "fleet-a"
    assert (rec.live_mae, rec.outbox_depth, rec.drops, rec.live_n) == (0.3, 7, 3, 4)  # newest ts wins
    assert rec.telemetry is not None and rec.telemetry["seq"] == 2
    assert [t.seq for t in store.telemetry_history(d)] == [2, 1, 0]
    assert store.stats_messages("m", devices=[d]) == [st_msg]


def test_unstorable_message_is_rejected_alone(store: Store) -> None:
    d = dev()
    bad = batch(d, 10, 2).model_copy(update={"model_version": [2**64, 1]})
    r = store.ingest([bad, batch(d, 0, 10)])
    assert [(x.stream, x.device) for x in r.rejected] == [("results", d)]
    assert r.rows_stored == 10
    assert r[d] == {"results": 9}


def test_x_round_trip_with_missing_values(store: Store) -> None:
    d = dev()
    b = ResultBatch(
        device=d,
        seq_first=0,
        seq_last=2,
        ts=[1.0, 2.0, 3.0],
        model_version=[1, 1, 1],
        y_pred=[0.5, None, 1.5],
        x=[[1.0, None], None, [0.25, -2.0]],
        y_true=[1.0, 2.0, None],
    )
    store.ingest([b])
    rows = store.fetch_results(d)
    assert [r.x for r in rows] == [(1.0, None), None, (0.25, -2.0)]
    assert [r.y_pred for r in rows] == [0.5, None, 1.5]
    assert [r.y_true for r in rows] == [1.0, 2.0, None]
    assert store.count_labelled(("a", "b")) == 0  # row 0 lacks b, row 1 lacks x, row 2 lacks y


def test_every_row_of_every_batch_size_is_stored_as_sent(store: Store) -> None:
    """Rows go in many per INSERT statement on SQLite; sizes around that count lose or shift none."""
    d = dev()
    sizes = [1, 63, 64, 65, 127, 128, 129, 500]
    sent: list[ResultBatch] = []
    first = 0
    for k, n in enumerate(sizes):
        sent.append(batch(d, first, n, labelled=k % 2 == 0, seed=k))
        first += n
    r = store.ingest(sent[:3])
    r2 = store.ingest(sent[3:])
    assert r.rows_stored + r2.rows_stored == first
    rows = store.fetch_results(d, limit=10_000)
    assert [x.seq for x in rows] == list(range(first))
    want = [
        (b.ts[i], b.model_version[i], b.y_pred[i], tuple(b.x[i]), b.y_true[i] if b.y_true else None)  # type: ignore[index, arg-type]
        for b in sent
        for i in range(b.n)
    ]
    assert [(x.ts, x.model_version, x.y_pred, x.x, x.y_true) for x in rows] == want
    counts = store.counts()[d]
    assert (counts.rows, counts.distinct_seqs) == (first, first)


# --------------------------------------------------------------------------- labelled data


def test_labelled_rows_map_features_by_name_and_split(store: Store) -> None:
    d1, d2, d3 = dev(), dev(), dev()
    rng = np.random.default_rng(5)
    X1 = rng.normal(size=(300, 2))
    X2 = rng.normal(size=(200, 3))
    X2[7, 2] = np.nan  # missing x1 in a row: not labelled for (x1, x2)
    X3 = rng.normal(size=(100, 2))
    store.ingest([batch(d1, 0, 300, x=X1)])
    b2 = batch(d2, 0, 200, x=X2[:, :2], ts0=1100.0)
    # d2 names three features in another order: (x2, extra, x1)
    b2 = b2.model_copy(
        update={
            "features": ("x2", "extra", "x1"),
            "x": [[r[1], 9.0, None if np.isnan(r[2]) else r[2]] for r in X2.tolist()],
        }
    )
    b2 = b2.model_copy(update={"x": [[row[1], 9.0, X2[i, 0] if i != 7 else None] for i, row in enumerate(X2.tolist())]})
    store.ingest([b2])
    store.ingest([batch(d3, 0, 100, x=X3, features=None, ts0=900.0)])  # unnamed: taken by width
    store.ingest([batch(dev(), 0, 50, labelled=False)])  # no labels at all
    total = store.count_labelled(FEATS)
    assert total == 300 + 199 + 100

    everything = list(store.labelled_rows(FEATS, chunk_rows=128))
    assert all(len(c) <= 128 for c in everything)
    X = np.concatenate([c.X for c in everything])
    y = np.concatenate([c.y for c in everything])
    ts = np.concatenate([c.ts for c in everything])
    assert X.shape == (total, 2)
    expected_x = np.concatenate([X1, np.delete(X2[:, :2], 7, axis=0), X3])
    order_got = np.lexsort((X[:, 1], X[:, 0]))
    order_exp = np.lexsort((expected_x[:, 1], expected_x[:, 0]))
    np.testing.assert_array_equal(X[order_got], expected_x[order_exp])

    # the newest 50 rows by (ts, device, seq) are the holdout; the rest train; together everything
    cut = store.newest_cutoff(FEATS, 50)
    assert isinstance(cut, RowKey)
    assert cut.ts == np.sort(ts)[-50]
    train = list(store.labelled_rows(FEATS, before=cut))
    hold = list(store.labelled_rows(FEATS, since=cut))
    assert sum(map(len, train)) == total - 50 and sum(map(len, hold)) == 50
    assert min(c.ts.min() for c in hold) >= max(c.ts.max() for c in train)
    assert store.newest_cutoff(FEATS, total + 1) is None

    # statistics where the data lives equal statistics of the rows
    ref = SuffStats.from_rows(X, y)
    got = store.sufficient_stats(FEATS).reshifted(ref.shift)  # the store picks its own shift
    np.testing.assert_allclose(got.xtx, ref.xtx, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got.xty, ref.xty, rtol=1e-12, atol=1e-9)
    assert got.n == total and got.yty == pytest.approx(ref.yty, rel=1e-12)
    assert got.window == (ts.min(), ts.max())
    tr = store.sufficient_stats(FEATS, before=cut)
    ho = store.sufficient_stats(FEATS, since=cut)
    np.testing.assert_allclose((tr + ho).reshifted(ref.shift).xtx, ref.xtx, rtol=1e-12, atol=1e-9)

    # windows are half-open over device timestamps
    w = Window(1000.0, 1150.0)
    n_w = int(((ts >= 1000.0) & (ts < 1150.0)).sum())
    assert store.count_labelled(FEATS, w) == n_w == store.sufficient_stats(FEATS, w).n
    # a subset of features in another order comes from every batch naming them
    sub = list(store.labelled_rows(("x2",)))
    assert sum(map(len, sub)) == 300 + 200  # x2 is present in row 7 of d2; d3 is unnamed with 2 columns
    assert store.count_labelled(("extra",)) == 200


# --------------------------------------------------------------------------- devices


def reported(device: str, version: int, ts: float, group: str = "g1", state: str = "applied") -> ReportedState:
    return ReportedState(
        device=device,
        fleet="fleet-a",
        group=group,
        active=ModelRef(name="m", version=version),
        previous=ModelRef(name="m", version=version - 1) if version > 1 else None,
        update=UpdateStatus(state=state, version=version, reason="ok", rollout_id="r1", at=ts),  # type: ignore[arg-type]
        ts=ts,
    )


def test_device_upserts(store: Store) -> None:
    a, b = dev(), dev()
    assert store.get_device(a) is None
    store.update_device_from_reported(reported(a, 2, ts=10.0), now=100.0)
    store.update_device_from_reported(reported(a, 1, ts=5.0, group="old"), now=101.0)  # stale retained copy
    store.update_device_from_status(Status(device=a, state="online"), fleet="fleet-a", now=102.0)
    store.update_device_from_telemetry(telemetry(a, 0, 50.0, live_mae=0.25), now=103.0)
    store.update_device_from_reported(reported(b, 3, ts=1.0, group="g2"), now=104.0)
    store.update_device_from_status(Status(device=b, state="offline"), now=105.0)
    ra = store.get_device(a)
    assert ra is not None
    assert (ra.fleet, ra.group, ra.model_name, ra.model_version, ra.previous_version) == ("fleet-a", "g1", "m", 2, 1)
    assert (ra.update_state, ra.update_reason, ra.rollout_id) == ("applied", "ok", "r1")
    assert (ra.online, ra.live_mae, ra.first_seen, ra.last_seen) == (True, 0.25, 100.0, 103.0)
    assert [h.ts for _, h in store.reported_history(a)] == [5.0, 10.0]  # history keeps both
    rb = store.get_device(b)
    assert rb is not None and rb.online is False and rb.group == "g2"
    assert {r.id for r in store.list_devices(fleet="fleet-a")} >= {a, b}
    assert [r.id for r in store.list_devices(group="g2")] == [b]
    desired = DesiredState(device=a, rollback=True, rollout_id="r1")
    store.set_device_desired(a, desired, now=106.0)
    ra = store.get_device(a)
    assert ra is not None and ra.desired is not None and ra.desired["rollback"] is True and ra.desired_at == 106.0
    with pytest.raises(NotFoundError):
        store.set_device_desired(dev(), desired)


# --------------------------------------------------------------------------- registry


def manifest(name: str, version: int, parent: int | None = None, mae: float = 0.5) -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        model_kind="linear",
        features=FEATS,
        weights=(3.0, -2.0),
        intercept=5.0,
        training=TrainingInfo(source="rows", parent_version=parent, n_rows=10),
        metrics={"mae": mae},
    )


def test_registry(store: Store) -> None:
    name = f"m{uuid.uuid4().hex[:6]}"
    assert store.next_model_version(name) == 1
    assert store.get_model_version(name) is None and store.get_champion(name) is None
    v1 = store.add_model_version(manifest(name, 1), source="import", created_at=1.0)
    text = manifest(name, 2, parent=1, mae=0.4).model_dump_json(by_alias=True)
    store.add_model_version(text, created_at=2.0)
    with pytest.raises(ConflictError):
        store.add_model_version(manifest(name, 2))
    assert store.next_model_version(name) == 3
    latest = store.get_model_version(name)
    assert latest is not None and latest.version == 2 and latest.parent == 1 and latest.metrics == {"mae": 0.4}
    assert latest.manifest_json == text and latest.manifest.weights == (3.0, -2.0)
    assert store.get_model_version(name, 1) == v1
    store.set_champion(name, 1)
    champ = store.get_champion(name)
    assert champ is not None and champ.version == 1 and champ.is_champion
    store.set_model_status(name, 2, "revoked")
    assert store.get_model_version(name, "latest").version == 1  # type: ignore[union-attr]
    with pytest.raises(ConflictError):
        store.set_champion(name, 2)
    with pytest.raises(NotFoundError):
        store.set_champion(name, 9)
    with pytest.raises(NotFoundError):
        store.set_model_status(name, 9, "retired")
    assert [(r.version, r.status, r.is_champion) for r in store.list_model_versions(name)] == [
        (1, "registered", True),
        (2, "revoked", False),
    ]
    assert {r.name for r in store.list_model_versions()} >= {name}


# --------------------------------------------------------------------------- rollouts


def test_rollouts(store: Store) -> None:
    r = store.create_rollout("m", 2, "group:g1", 0.25, {"bake": 60}, state="canary", stage="canary", now=10.0)
    assert r.active and r.params == {"bake": 60} and r.created_at == 10.0
    with pytest.raises(ConflictError):
        store.create_rollout("m", 2, "all", 0.1, rollout_id=r.id)
    r2 = store.update_rollout(r.id, state="baking", expect_state="canary", message="canaries report v2", now=20.0)
    assert (r2.state, r2.stage, r2.updated_at) == ("baking", "canary", 20.0)
    with pytest.raises(ConflictError):
        store.update_rollout(r.id, state="promoting", expect_state="canary")
    store.add_rollout_event(r.id, "live MAE 0.31 vs control 0.30", ts=25.0)
    other = store.create_rollout("m", 3, "all", 0.1, state="canary", now=30.0)
    assert [x.id for x in store.active_rollouts() if x.id in (r.id, other.id)] == [r.id, other.id]
    store.update_rollout(r.id, state="rolled_back", reason="canary MAE ratio 1.4 > 1.1", message="rolled back")
    assert all(x.id != r.id for x in store.active_rollouts())
    got = store.get_rollout(r.id)
    assert got is not None and got.state in ROLLOUT_TERMINAL_STATES and got.reason == "canary MAE ratio 1.4 > 1.1"
    events = store.rollout_events(r.id)
    assert [e.message for e in events][1:] == ["canaries report v2", "live MAE 0.31 vs control 0.30", "rolled back"]
    assert [e.state for e in events] == ["canary", "baking", "baking", "rolled_back"]
    assert [x.id for x in store.list_rollouts("m")][:2] == [other.id, r.id]
    assert store.get_rollout("nope") is None
    with pytest.raises(NotFoundError):
        store.update_rollout("nope", state="x")


# --------------------------------------------------------------------------- schema and URLs


def test_schema_is_idempotent_and_versioned(store_url: str) -> None:
    with open_store(store_url) as a, open_store(store_url) as b:
        d = dev()
        a.ingest([batch(d, 0, 3)])
        assert b.counts()[d].rows == 3
    with open_store(store_url) as s, s._tx(write=True) as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    with pytest.raises(SchemaError):
        open_store(store_url)


def test_urls(tmp_path) -> None:
    for bad in ("mysql://x/y", "sqlite://host/x.db", f"sqlite:///{tmp_path}/a.db?journal=off", ""):
        with pytest.raises(ConfigError):
            open_store(bad)
    with open_store(str(tmp_path / "bare.db")) as s:
        assert s.count_labelled(FEATS) == 0
    s = open_store(f"sqlite:///{tmp_path}/n.db?synchronous=normal")
    s.close()
    with pytest.raises(StoreError):
        s.list_devices()
    with pytest.raises(StoreError):
        open_store(f"sqlite:///{tmp_path}/missing/dir/x.db")


# --------------------------------------------------------------------------- watermark bookkeeping


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), min_size=1, max_size=25),
    floors=st.lists(st.integers(-1, 70), max_size=3),
)
def test_stream_state_stores_each_seq_once(spans: list[tuple[int, int]], floors: list[int]) -> None:
    state = StreamState()
    stored: set[int] = set()
    given_up = -1
    for i, (first, length) in enumerate(spans):
        if i < len(floors):
            state.apply_floor(floors[i])
            given_up = max(given_up, floors[i])
        for a, b in state.add(first, first + length):
            new = set(range(a, b + 1))
            assert not new & stored  # never twice
            stored |= new
        state = StreamState.from_json(state.watermark, state.ranges_json())  # persisted between calls
    # the watermark is the highest seq with everything up to it stored or given up
    w = given_up
    while w + 1 in stored or w + 1 <= given_up:
        w += 1
    assert state.watermark == w
    assert all(state.stored(s) for s in stored)
    assert {s for s in range(given_up + 1, 80) if state.stored(s)} == {s for s in stored if s > given_up}


def test_many_features_statistics(store: Store) -> None:
    # beyond MAX_SQL_FEATURES PostgreSQL sums in numpy over COPY chunks instead of SQL aggregates
    d = dev()
    names = tuple(f"f{i}" for i in range(45))
    rng = np.random.default_rng(11)
    X = rng.normal(size=(300, 45)) + 100.0
    y = X @ rng.normal(size=45) + rng.normal(0, 0.01, 300)
    b = ResultBatch(
        device=d,
        seq_first=0,
        seq_last=299,
        ts=[float(i) for i in range(300)],
        model_version=[1] * 300,
        y_pred=[0.0] * 300,
        x=X.tolist(),
        features=names,
        y_true=y.tolist(),
    )
    store.ingest([b])
    got = store.sufficient_stats(names[::-1])
    ref = SuffStats.from_rows(X[:, ::-1], y).reshifted(got.shift)
    assert got.n == 300
    np.testing.assert_allclose(got.xtx, ref.xtx, rtol=1e-10, atol=1e-6)
    np.testing.assert_allclose(got.xty, ref.xty, rtol=1e-10, atol=1e-6)
