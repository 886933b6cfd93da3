"""The fleet view and rollout bookkeeping shared by ``edgeloop fleet`` and the cloud service.

The CLI writes intentions into the store (a pending rollout, an abort); the service's rollout
controller (:class:`RolloutController`) is the only thing that publishes desired state and moves
rollouts along, so a CLI needs no broker connection to deploy and a restarted service resumes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from cloud.errors import ConflictError, RegistryError, RolloutError
from cloud.rollout import (
    TERMINAL,
    DeviceView,
    Rollout,
    RolloutParams,
    RolloutState,
    SetDesired,
    parse_target,
    start,
    step,
    supersede,
)
from cloud.store import DeviceRecord, RolloutRecord, Store
from runtime.protocol import DesiredState, ModelManifest

__all__ = ["RolloutController", "abort_rollout", "create_deployment", "device_view", "rollback_target", "views"]

logger = logging.getLogger(__name__)


def device_view(rec: DeviceRecord, offline_after: float | None = None, now: float | None = None) -> DeviceView:
    online = bool(rec.online)
    if offline_after is not None and online and (now or time.time()) - rec.last_seen > offline_after:
        online = False
    tele = rec.telemetry or {}
    return DeviceView(
        id=rec.id,
        group=rec.group,
        online=online,
        active_version=rec.model_version,
        active_name=rec.model_name,
        update_state=rec.update_state,
        update_version=rec.update_version,
        update_reason=rec.update_reason,
        update_rollout=rec.rollout_id,
        live_mae=rec.live_mae,
        live_n=rec.live_n or 0,
        model_version_at_telemetry=tele.get("model_version"),
    )


def views(store: Store, fleet: str | None, offline_after: float | None = None) -> dict[str, DeviceView]:
    now = time.time()
    return {r.id: device_view(r, offline_after, now) for r in store.list_devices(fleet=fleet)}


def matches(target: str, v: DeviceView) -> bool:
    kind, values = parse_target(target)
    if kind == "all":
        return True
    if kind == "group":
        return v.group == values[0]
    return v.id in values


def _params(p: RolloutParams, rollout: Rollout | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": asdict(p)}
    if rollout is not None:
        out.update(
            devices=list(rollout.devices),
            canaries=list(rollout.canaries),
            previous=rollout.previous,
            stage_started=rollout.stage_started,
            metrics=rollout.metrics,
            rollback=rollout.rollback,
        )
    return out


def from_record(rec: RolloutRecord) -> Rollout:
    p = rec.params
    settings = RolloutParams(**p.get("settings", {}))
    return Rollout(
        id=rec.id,
        model=rec.model,
        version=rec.version,
        target=rec.target,
        devices=tuple(p.get("devices", ())),
        canaries=tuple(p.get("canaries", ())),
        previous={k: v for k, v in p.get("previous", {}).items()},
        params=settings,
        state=RolloutState(rec.state),
        created=rec.created_at,
        updated=rec.updated_at,
        stage_started=float(p.get("stage_started", rec.created_at)),
        reason=rec.reason,
        metrics=dict(p.get("metrics", {})),
        rollback=bool(p.get("rollback", False)),
    )


def create_deployment(
    store: Store,
    model: str,
    version: int | None,
    target: str,
    params: RolloutParams,
    *,
    rollback: bool = False,
) -> RolloutRecord:
    """Record a pending rollout (validated: model version exists, target parses)."""
    parse_target(target)
    rec = store.get_model_version(model, version if version is not None else "latest")
    if rec is None:
        raise RegistryError(f"no model {model}{f' v{version}' if version else ''} in the registry", model, version)
    if rec.status == "revoked":
        raise RegistryError(f"{model} v{rec.version} is revoked", model, rec.version)
    p = _params(params)
    p["rollback"] = rollback
    return store.create_rollout(model, rec.version, target, params.canary, p, state=RolloutState.PENDING.value)


def rollback_target(store: Store, model: str, fleet: str | None) -> int:
    """The version to return to without ``--to``: what most devices ran before the last completed rollout."""
    for rec in store.list_rollouts(model):
        if rec.state == RolloutState.COMPLETED.value and not rec.params.get("rollback"):
            prev = [v for v in rec.params.get("previous", {}).values() if v is not None]
            if prev:
                return max(set(prev), key=prev.count)
    raise RolloutError(f"no completed rollout of {model} with a previous version to return to; use --to VERSION")


def abort_rollout(store: Store, rollout_id: str, why: str = "aborted by operator") -> RolloutRecord:
    rec = store.get_rollout(rollout_id)
    if rec is None:
        raise RolloutError(f"no rollout {rollout_id}", rollout_id)
    if RolloutState(rec.state) in TERMINAL:
        raise RolloutError(f"rollout {rollout_id} already ended ({rec.state})", rollout_id)
    try:
        return store.update_rollout(
            rollout_id, state=RolloutState.ABORTED.value, reason=why, expect_state=rec.state, message=f"aborted: {why}"
        )
    except ConflictError:
        return abort_rollout(store, rollout_id, why)


Publisher = Callable[[str, DesiredState], Awaitable[None]]


class RolloutController:
    """Moves every active rollout one step per tick and publishes the desired states it decides."""

    def __init__(
        self, store: Store, fleet: str, publish: Publisher, *, offline_after: float = 60.0, seed: int | None = None
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.publish = publish
        self.offline_after = offline_after
        self.rng = random.Random(seed)
        self.on_event: Callable[[Rollout, str], None] | None = None

    async def _apply(self, r: Rollout, decisions: list[SetDesired]) -> None:
        for d in decisions:
            manifest: ModelManifest | None = None
            if d.version is not None:
                rec = self.store.get_model_version(r.model, d.version)
                if rec is None:
                    logger.error("rollout %s: %s v%s vanished from the registry", r.id, r.model, d.version)
                    continue
                manifest = rec.manifest
            now = time.time()
            pairs = [
                (dev, DesiredState(device=dev, model=manifest, rollback=d.rollback, rollout_id=r.id, issued_at=now))
                for dev in d.devices
            ]
            # All at once: the PUBACKs pipeline (one round trip per device serialised 1000 devices
            # into seconds), and the record is one transaction, not one fsync per device.
            results = await asyncio.gather(*(self.publish(dev, x) for dev, x in pairs), return_exceptions=True)
            sent: list[tuple[str, DesiredState | None]] = []
            failed: list[str] = []
            for (dev, x), res in zip(pairs, results, strict=True):
                if isinstance(res, BaseException):
                    if not isinstance(res, Exception):
                        raise res
                    failed.append(f"{dev}: {res}")
                else:
                    sent.append((dev, x))
            self.store.set_devices_desired(sent)
            if failed:
                logger.error(
                    "rollout %s: desired state not published to %d device(s) (e.g. %s); the stage's timeout decides",
                    r.id, len(failed), failed[0],
                )  # fmt: skip

    def _save(self, before: Rollout, after: Rollout) -> None:
        new_events = after.events[len(before.events) :]
        msg = "; ".join(m for _, m in new_events) if new_events else None
        self.store.update_rollout(
            after.id,
            state=after.state.value,
            stage=after.state.value,
            reason=after.reason,
            params=_params(after.params, after),
            expect_state=before.state.value,
            message=msg,
        )
        if self.on_event is not None:
            for _, m in new_events:
                self.on_event(after, m)
        if after.state == RolloutState.COMPLETED and not after.rollback:
            self.store.set_champion(after.model, after.version)
        if after.state == RolloutState.ROLLED_BACK:
            self.store.set_model_status(after.model, after.version, "retired")

    async def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        active = self.store.active_rollouts()
        if not active:
            return
        fleet = views(self.store, self.fleet, self.offline_after)
        for rec in active:
            try:
                r = from_record(rec)
            except (ValueError, TypeError) as exc:
                logger.error("rollout %s unreadable (%s); aborting it", rec.id, exc)
                abort_rollout(self.store, rec.id, f"unreadable: {exc}")
                continue
            if r.state == RolloutState.PENDING:
                # A new deployment supersedes running ones on the same target (and model).
                for other in active:
                    if other.id != r.id and other.target == r.target and other.model == r.model:
                        o = from_record(other)
                        if o.state not in TERMINAL and o.created <= r.created:
                            so = supersede(o, now, r.id)
                            self._save(o, so)
                targets = [v for v in fleet.values() if matches(r.target, v)]
                r2, decisions = start(r, now, targets, self.rng)
            else:
                baseline = None
                champ = self.store.get_champion(r.model)
                if champ is not None:
                    baseline = champ.metrics.get("mae")
                r2, decisions = step(r, now, fleet, baseline)
            if r2 is r:
                continue
            try:
                self._save(r, r2)
            except ConflictError:
                continue  # aborted or superseded meanwhile: re-read next tick
            await self._apply(r2, decisions)
