"""Store methods for the model registry and rollouts (rows only; signing and the state machine live elsewhere)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal

from cloud.errors import ConflictError, NotFoundError
from cloud.store.records import (
    ROLLOUT_TERMINAL_STATES,
    ModelVersionRecord,
    RolloutEvent,
    RolloutRecord,
)
from runtime.protocol import ModelManifest

__all__ = ["MODEL_STATUSES", "CatalogMixin"]

#: Registry statuses. ``registered``: usable; ``retired``: kept for lineage, not to be deployed;
#: ``revoked``: must never be deployed again (e.g. a bad model that was rolled back).
MODEL_STATUSES = ("registered", "retired", "revoked")

_MV_COLS = "name, version, manifest, created_at, status, parent, metrics, source"
_RO_COLS = "id, model, version, target, canary_fraction, params, state, stage, reason, created_at, updated_at"


class CatalogMixin:
    """Registry and rollout rows. Mixed into :class:`cloud.store.base.Store`."""

    def _tx(self, write: bool = False) -> AbstractContextManager[Any]:  # provided by Store
        raise NotImplementedError

    def _q(self, sql: str) -> str:  # provided by Store
        raise NotImplementedError

    # ------------------------------------------------------------------ model versions

    def next_model_version(self, name: str) -> int:
        """1 + the highest registered version of ``name`` (1 for a new name). Racing registrations
        of the same number are caught by :meth:`add_model_version` (ConflictError: retry)."""
        with self._tx() as conn:
            row = conn.execute(self._q("SELECT max(version) FROM model_versions WHERE name = ?"), (name,)).fetchone()
        return 1 if row[0] is None else int(row[0]) + 1

    def add_model_version(
        self,
        manifest: ModelManifest | str,
        *,
        status: str = "registered",
        source: str | None = None,
        created_at: float | None = None,
    ) -> ModelVersionRecord:
        """Register a (normally signed) manifest under its own name and version.

        ``manifest`` may be the model or its JSON; the JSON stored is exactly what is given (so a
        signature over it stays valid). Parent and metrics come from the manifest's ``training``
        and ``metrics``. Raises ConflictError when that version exists.
        """
        if status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}")
        if isinstance(manifest, str):
            text = manifest
            m = ModelManifest.model_validate_json(text)
        else:
            m, text = manifest, manifest.model_dump_json(by_alias=True)
        created = time.time() if created_at is None else created_at
        with self._tx(write=True) as conn:
            cur = conn.execute(
                self._q(
                    f"INSERT INTO model_versions ({_MV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (name, version) DO NOTHING"
                ),
                (m.name, m.version, text, created, status, m.training.parent_version, json.dumps(m.metrics), source),
            )
            if cur.rowcount == 0:
                raise ConflictError("model version", f"{m.name}:{m.version}", "already registered")
        return ModelVersionRecord(
            m.name, m.version, text, created, status, m.training.parent_version, dict(m.metrics), source
        )

    def get_model_version(
        self, name: str, version: int | Literal["latest", "champion"] | None = "latest"
    ) -> ModelVersionRecord | None:
        """One version of ``name``: a number, ``"latest"`` or None (highest registered, not revoked)
        or ``"champion"`` (the production pointer). None when there is none."""
        if version is None:
            version = "latest"
        with self._tx() as conn:
            champion = self._champion(conn, name)
            if version == "champion":
                if champion is None:
                    return None
                version = champion
            if version == "latest":
                sql = (
                    f"SELECT {_MV_COLS} FROM model_versions WHERE name = ? AND status <> 'revoked' "
                    "ORDER BY version DESC LIMIT 1"
                )
                row = conn.execute(self._q(sql), (name,)).fetchone()
            else:
                sql = f"SELECT {_MV_COLS} FROM model_versions WHERE name = ? AND version = ?"
                row = conn.execute(self._q(sql), (name, int(version))).fetchone()
        return None if row is None else _mv(row, champion)

    def list_model_versions(self, name: str | None = None) -> list[ModelVersionRecord]:
        """All versions (of ``name``, or of every model), by name then version."""
        with self._tx() as conn:
            champions = dict(conn.execute("SELECT name, champion FROM model_pointers").fetchall())
            if name is None:
                rows = conn.execute(f"SELECT {_MV_COLS} FROM model_versions ORDER BY name, version").fetchall()
            else:
                sql = f"SELECT {_MV_COLS} FROM model_versions WHERE name = ? ORDER BY version"
                rows = conn.execute(self._q(sql), (name,)).fetchall()
        return [_mv(r, champions.get(r[0])) for r in rows]

    def set_model_status(self, name: str, version: int, status: str) -> None:
        """Set a version's registry status (one of :data:`MODEL_STATUSES`)."""
        if status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}")
        with self._tx(write=True) as conn:
            cur = conn.execute(
                self._q("UPDATE model_versions SET status = ? WHERE name = ? AND version = ?"), (status, name, version)
            )
            if cur.rowcount == 0:
                raise NotFoundError("model version", f"{name}:{version}")

    def set_champion(self, name: str, version: int, *, now: float | None = None) -> None:
        """Point ``name``'s champion (the production version new training is compared with) at ``version``."""
        now = time.time() if now is None else now
        with self._tx(write=True) as conn:
            row = conn.execute(
                self._q("SELECT status FROM model_versions WHERE name = ? AND version = ?"), (name, version)
            ).fetchone()
            if row is None:
                raise NotFoundError("model version", f"{name}:{version}")
            if row[0] == "revoked":
                raise ConflictError("model version", f"{name}:{version}", "is revoked")
            conn.execute(
                self._q(
                    "INSERT INTO model_pointers (name, champion, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET champion = excluded.champion, updated_at = excluded.updated_at"
                ),
                (name, version, now),
            )

    def get_champion(self, name: str) -> ModelVersionRecord | None:
        """The champion version of ``name``, or None."""
        return self.get_model_version(name, "champion")

    def _champion(self, conn: Any, name: str) -> int | None:
        row = conn.execute(self._q("SELECT champion FROM model_pointers WHERE name = ?"), (name,)).fetchone()
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ rollouts

    def create_rollout(
        self,
        model: str,
        version: int,
        target: str,
        canary_fraction: float,
        params: Mapping[str, Any] | None = None,
        *,
        state: str = "pending",
        stage: str | None = None,
        rollout_id: str | None = None,
        now: float | None = None,
    ) -> RolloutRecord:
        """Store a new rollout (id generated unless given) and its first event."""
        if not 0.0 <= canary_fraction <= 1.0:
            raise ValueError("canary_fraction must be within [0, 1]")
        if not target or len(target) > 4096:
            raise ValueError("target must be 1..4096 characters")
        now = time.time() if now is None else now
        rid = rollout_id or uuid.uuid4().hex[:12]
        params_json = json.dumps(dict(params or {}), sort_keys=True)
        with self._tx(write=True) as conn:
            cur = conn.execute(
                self._q(
                    f"INSERT INTO rollouts ({_RO_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING"
                ),
                (rid, model, version, target, canary_fraction, params_json, state, stage, None, now, now),
            )
            if cur.rowcount == 0:
                raise ConflictError("rollout", rid, "already exists")
            self._event(conn, rid, now, f"created: {model}:{version} to {target}, canary {canary_fraction:g}", state)
        return RolloutRecord(
            rid, model, version, target, canary_fraction, json.loads(params_json), state, stage, None, now, now
        )

    def update_rollout(
        self,
        rollout_id: str,
        *,
        state: str | None = None,
        stage: str | None = None,
        reason: str | None = None,
        params: Mapping[str, Any] | None = None,
        expect_state: str | None = None,
        message: str | None = None,
        now: float | None = None,
    ) -> RolloutRecord:
        """Change a rollout's state/stage/reason/params (None leaves a field as it is).

        With ``expect_state`` the change is a compare-and-set: ConflictError when the stored state
        differs (another controller moved it). ``message`` adds an event in the same transaction.
        """
        now = time.time() if now is None else now
        with self._tx(write=True) as conn:
            row = conn.execute(self._q(f"SELECT {_RO_COLS} FROM rollouts WHERE id = ?"), (rollout_id,)).fetchone()
            if row is None:
                raise NotFoundError("rollout", rollout_id)
            current = _ro(row)
            if expect_state is not None and current.state != expect_state:
                raise ConflictError("rollout", rollout_id, f"state is {current.state!r}, expected {expect_state!r}")
            new = RolloutRecord(
                current.id,
                current.model,
                current.version,
                current.target,
                current.canary_fraction,
                dict(params) if params is not None else current.params,
                state if state is not None else current.state,
                stage if stage is not None else current.stage,
                reason if reason is not None else current.reason,
                current.created_at,
                now,
            )
            cur = conn.execute(
                self._q(
                    "UPDATE rollouts SET state = ?, stage = ?, reason = ?, params = ?, updated_at = ? "
                    "WHERE id = ? AND state = ?"
                ),
                (
                    new.state,
                    new.stage,
                    new.reason,
                    json.dumps(new.params, sort_keys=True),
                    now,
                    rollout_id,
                    current.state,
                ),
            )
            if cur.rowcount == 0:
                raise ConflictError("rollout", rollout_id, "changed concurrently")
            if message is not None:
                self._event(conn, rollout_id, now, message, new.state)
        return new

    def add_rollout_event(self, rollout_id: str, message: str, *, ts: float | None = None) -> None:
        """Append a free-text event to a rollout's history."""
        ts = time.time() if ts is None else ts
        with self._tx(write=True) as conn:
            row = conn.execute(self._q("SELECT state FROM rollouts WHERE id = ?"), (rollout_id,)).fetchone()
            if row is None:
                raise NotFoundError("rollout", rollout_id)
            self._event(conn, rollout_id, ts, message, row[0])

    def _event(self, conn: Any, rollout_id: str, ts: float, message: str, state: str | None) -> None:
        conn.execute(
            self._q("INSERT INTO rollout_events (rollout_id, ts, message, state) VALUES (?, ?, ?, ?)"),
            (rollout_id, ts, message[:4096], state),
        )

    def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        with self._tx() as conn:
            row = conn.execute(self._q(f"SELECT {_RO_COLS} FROM rollouts WHERE id = ?"), (rollout_id,)).fetchone()
        return None if row is None else _ro(row)

    def rollout_events(self, rollout_id: str) -> list[RolloutEvent]:
        """A rollout's events, oldest first."""
        with self._tx() as conn:
            rows = conn.execute(
                self._q("SELECT rollout_id, ts, message, state FROM rollout_events WHERE rollout_id = ? ORDER BY id"),
                (rollout_id,),
            ).fetchall()
        return [RolloutEvent(*r) for r in rows]

    def list_rollouts(self, model: str | None = None, limit: int = 100) -> list[RolloutRecord]:
        """Rollouts, newest first (optionally of one model)."""
        with self._tx() as conn:
            if model is None:
                sql, args = f"SELECT {_RO_COLS} FROM rollouts ORDER BY created_at DESC, id LIMIT ?", (limit,)
            else:
                sql = f"SELECT {_RO_COLS} FROM rollouts WHERE model = ? ORDER BY created_at DESC, id LIMIT ?"
                args = (model, limit)  # type: ignore[assignment]
            return [_ro(r) for r in conn.execute(self._q(sql), args).fetchall()]

    def active_rollouts(self, terminal: frozenset[str] = ROLLOUT_TERMINAL_STATES) -> list[RolloutRecord]:
        """Rollouts whose state is not in ``terminal``, oldest first."""
        states = sorted(terminal)
        marks = ", ".join("?" * len(states))
        with self._tx() as conn:
            sql = f"SELECT {_RO_COLS} FROM rollouts WHERE state NOT IN ({marks}) ORDER BY created_at, id"
            return [_ro(r) for r in conn.execute(self._q(sql), states).fetchall()]


def _mv(r: Any, champion: int | None) -> ModelVersionRecord:
    return ModelVersionRecord(
        name=r[0],
        version=int(r[1]),
        manifest_json=r[2],
        created_at=r[3],
        status=r[4],
        parent=r[5],
        metrics=json.loads(r[6]),
        source=r[7],
        is_champion=champion is not None and int(r[1]) == champion,
    )


def _ro(r: Any) -> RolloutRecord:
    return RolloutRecord(
        id=r[0],
        model=r[1],
        version=int(r[2]),
        target=r[3],
        canary_fraction=r[4],
        params=json.loads(r[5]),
        state=r[6],
        stage=r[7],
        reason=r[8],
        created_at=r[9],
        updated_at=r[10],
    )
