"""The store's tables, written once for SQLite and PostgreSQL (types filled in per dialect).

Schema version 1:

- ``devices`` — one row per device: fleet, group, first/last seen, online, active and previous
  model, update state/reason, rollout id, live MAE, outbox depth/bytes, drops, last telemetry
  (JSON), last desired state (JSON).
- ``result_batches`` — the dedup keys: ``UNIQUE (device, stream, seq_first, seq_last)`` for every
  message of every stream (results batches, telemetry and stats messages: one seq each).
- ``results`` — one row per result: device, seq, ts, model_version, y_pred, x, y_true, fset
  (the feature-name set of its batch, ``feature_sets.id``; NULL when the batch named none).
  x is a BLOB of float64 (NaN for a missing value) on SQLite, ``double precision[]`` on PostgreSQL.
- ``label_blocks`` — SQLite only: the labelled rows of each stored batch once more, columnar
  (ts, x, y as float64 blobs; seq as int64 only when not consecutive), so training reads 1M rows in ~1000 fetches, not 1M.
- ``feature_sets`` — distinct tuples of feature names (JSON).
- ``telemetry``, ``stats``, ``reported`` — every message as received (JSON payload + key columns).
- ``watermarks`` — per device and stream: the watermark and the stored ranges above it (JSON).
- ``model_versions`` (name, version, manifest JSON, created, status, parent, metrics, source) and
  ``model_pointers`` (the champion version per model name).
- ``rollouts`` (id, model, version, target, canary fraction, params JSON, state, stage, reason,
  created, updated) and ``rollout_events`` (rollout id, ts, message, state).
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "ddl"]

SCHEMA_VERSION = 1

_TABLES = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    fleet TEXT,
    grp TEXT,
    first_seen {REAL} NOT NULL,
    last_seen {REAL} NOT NULL,
    online INTEGER,
    status_at {REAL},
    model_name TEXT,
    model_version {BIGINT},
    previous_name TEXT,
    previous_version {BIGINT},
    update_state TEXT,
    update_version {BIGINT},
    update_reason TEXT,
    update_at {REAL},
    rollout_id TEXT,
    reported_at {REAL},
    config_hash TEXT,
    transport TEXT,
    runtime_version TEXT,
    live_mae {REAL},
    live_n {BIGINT},
    outbox_depth {BIGINT},
    outbox_bytes {BIGINT},
    drops {BIGINT},
    telemetry_at {REAL},
    telemetry TEXT,
    desired TEXT,
    desired_at {REAL}
);
CREATE TABLE IF NOT EXISTS feature_sets (
    id {AUTOID},
    names TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS result_batches (
    device TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq_first {BIGINT} NOT NULL,
    seq_last {BIGINT} NOT NULL,
    received {REAL} NOT NULL,
    model TEXT,
    fset INTEGER,
    UNIQUE (device, stream, seq_first, seq_last)
);
CREATE TABLE IF NOT EXISTS results (
    device TEXT NOT NULL,
    seq {BIGINT} NOT NULL,
    ts {REAL} NOT NULL,
    model_version {BIGINT},
    y_pred {REAL},
    x {FLOATS},
    y_true {REAL},
    fset INTEGER
);
CREATE INDEX IF NOT EXISTS results_ts ON results (ts);
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL,
    seq {BIGINT} NOT NULL,
    ts {REAL} NOT NULL,
    received {REAL} NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device, ts);
CREATE TABLE IF NOT EXISTS stats (
    device TEXT NOT NULL,
    seq {BIGINT} NOT NULL,
    model TEXT,
    window_start {REAL} NOT NULL,
    window_end {REAL} NOT NULL,
    n {BIGINT} NOT NULL,
    received {REAL} NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reported (
    device TEXT NOT NULL,
    received {REAL} NOT NULL,
    ts {REAL} NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reported_device ON reported (device, received);
CREATE TABLE IF NOT EXISTS watermarks (
    device TEXT NOT NULL,
    stream TEXT NOT NULL,
    watermark {BIGINT} NOT NULL,
    ranges TEXT NOT NULL,
    updated {REAL} NOT NULL,
    PRIMARY KEY (device, stream)
);
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    created_at {REAL} NOT NULL,
    status TEXT NOT NULL,
    parent INTEGER,
    metrics TEXT NOT NULL,
    source TEXT,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_pointers (
    name TEXT PRIMARY KEY,
    champion INTEGER NOT NULL,
    updated_at {REAL} NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    target TEXT NOT NULL,
    canary_fraction {REAL} NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT,
    reason TEXT,
    created_at {REAL} NOT NULL,
    updated_at {REAL} NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts (state);
CREATE TABLE IF NOT EXISTS rollout_events (
    id {AUTOID},
    rollout_id TEXT NOT NULL,
    ts {REAL} NOT NULL,
    message TEXT NOT NULL,
    state TEXT
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id);
"""

_SQLITE_ONLY = """
CREATE TABLE IF NOT EXISTS label_blocks (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    fset INTEGER,
    width INTEGER NOT NULL,
    n INTEGER NOT NULL,
    seq_first INTEGER NOT NULL,
    ts_min REAL NOT NULL,
    ts_max REAL NOT NULL,
    ts BLOB NOT NULL,
    seq BLOB NOT NULL,
    x BLOB NOT NULL,
    y BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS label_blocks_ts ON label_blocks (ts_max);
"""

_TYPES = {
    "sqlite": {"REAL": "REAL", "BIGINT": "INTEGER", "FLOATS": "BLOB", "AUTOID": "INTEGER PRIMARY KEY"},
    "postgres": {
        "REAL": "DOUBLE PRECISION",
        "BIGINT": "BIGINT",
        "FLOATS": "DOUBLE PRECISION[]",
        "AUTOID": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    },
}


def ddl(dialect: str) -> list[str]:
    """The CREATE statements of ``dialect`` (``sqlite`` or ``postgres``), one per list item."""
    text = _TABLES + (_SQLITE_ONLY if dialect == "sqlite" else "")
    text = text.format(**_TYPES[dialect])
    return [s.strip() for s in text.split(";") if s.strip()]
