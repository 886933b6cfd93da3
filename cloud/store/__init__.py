"""The cloud's store: ``open_store(url)`` gives a :class:`Store` on SQLite (default) or PostgreSQL.

API at a glance (all synchronous; each call is one short transaction; see :class:`Store`)::

    store = open_store("sqlite:///cloud.db")            # or "postgresql://host/db"
    # ingest (exactly once) and acks
    r = store.ingest(results=[...], telemetry=[...], stats=[...])   # -> IngestResult
    r["dev-1"]                                          # {"results": 41, "telemetry": 7}: ack it
    r.rows_stored, r.duplicates, r.rejected
    store.watermarks("dev-1")
    # devices
    store.update_device_from_reported(reported, fleet=f)  # ReportedState
    store.update_device_from_status(status, fleet=f)    # Status (online/offline)
    store.update_device_from_telemetry(telemetry)       # device row only
    store.set_device_desired("dev-1", desired)          # DesiredState last published
    store.get_device("dev-1"); store.list_devices(fleet=None, group=None)
    # labelled data, computed where it lives
    store.count_labelled(features, window)
    store.newest_cutoff(features, n, window)            # RowKey splitting off the n newest rows
    store.sufficient_stats(features, window, before=key)   # cloud.training.SuffStats
    store.labelled_rows(features, window, since=key)    # Iterator[LabelledChunk]
    store.stats_messages(model, window)                 # devices' SufficientStats
    # registry
    store.next_model_version(name); store.add_model_version(manifest)
    store.get_model_version(name, 3 | "latest" | "champion"); store.list_model_versions(name)
    store.set_model_status(name, v, "retired"); store.set_champion(name, v); store.get_champion(name)
    # rollouts
    store.create_rollout(model, version, target, canary_fraction, params)
    store.update_rollout(id, state=..., stage=..., reason=..., expect_state=..., message=...)
    store.add_rollout_event(id, message); store.get_rollout(id); store.rollout_events(id)
    store.list_rollouts(model); store.active_rollouts()
    # tests and demo
    store.counts(); store.fetch_results(device); store.telemetry_history(device); store.reported_history(device)
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from cloud.store.base import Store
from cloud.store.catalog import MODEL_STATUSES
from cloud.store.records import (
    ROLLOUT_TERMINAL_STATES,
    DeviceRecord,
    IngestResult,
    LabelledChunk,
    ModelVersionRecord,
    Rejected,
    ResultCounts,
    ResultRow,
    RolloutEvent,
    RolloutRecord,
    RowKey,
    Window,
)
from runtime.errors import ConfigError

__all__ = [
    "MODEL_STATUSES",
    "ROLLOUT_TERMINAL_STATES",
    "DeviceRecord",
    "IngestResult",
    "LabelledChunk",
    "ModelVersionRecord",
    "Rejected",
    "ResultCounts",
    "ResultRow",
    "RolloutEvent",
    "RolloutRecord",
    "RowKey",
    "Store",
    "Window",
    "open_store",
]

DEFAULT_URL = "sqlite:///edgeloop-cloud.db"


def open_store(url: str = DEFAULT_URL, max_connections: int = 4) -> Store:
    """Open (creating tables if needed) the store at ``url``.

    - ``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` (SQLAlchemy's convention), a bare
      path, or ``sqlite:///:memory:``; option ``?synchronous=normal`` trades power-cut safety
      of acknowledged rows for speed (default ``full``).
    - ``postgresql://…`` / ``postgres://…``: any libpq URL (psycopg 3, the ``cloud`` extra).

    Raises ConfigError for a URL it does not understand, MissingDependencyError without psycopg,
    StoreError when the database cannot be opened.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError("must be a non-empty URL", field="store")
    if "://" not in url:
        from cloud.store.sqlite import SqliteStore

        return SqliteStore(f"sqlite:///{url}", url, max_connections=max_connections)
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        from cloud.store.sqlite import SqliteStore

        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigError(f"{url!r}: use sqlite:///relative.db or sqlite:////absolute.db", field="store")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigError(f"{url!r} names no database file", field="store")
        opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(opts) - {"synchronous"}
        if unknown:
            raise ConfigError(f"unknown sqlite option(s) {sorted(unknown)}", field="store")
        sync = opts.get("synchronous", "full").lower()
        if sync not in ("full", "normal", "extra"):
            raise ConfigError("synchronous must be full, normal or extra", field="store")
        return SqliteStore(url, path, synchronous=sync, max_connections=max_connections)
    if scheme in ("postgresql", "postgres"):
        from cloud.store.postgres import PostgresStore

        return PostgresStore(url, max_connections=max_connections)
    raise ConfigError(f"unsupported store URL scheme {scheme!r} (sqlite:// or postgresql://)", field="store")
