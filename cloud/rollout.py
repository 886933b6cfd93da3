"""Staged rollouts: the lifecycle table and a pure ``step(now, fleet)`` that returns decisions.

A rollout sends a model version to a canary share of its target devices, waits until they
report it, lets it bake, and compares the canaries' live MAE and health against the control
devices (still on the previous version). It then promotes to every target device, or rolls
back by itself (desired state returned to the previous version, marked rollback) and records
why. The service carries decisions out (publishing desired state, storing events); nothing
else changes a rollout's state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "DeviceView",
    "Rollout",
    "RolloutParams",
    "RolloutState",
    "SetDesired",
    "choose_canaries",
    "parse_target",
    "start",
    "step",
]


class RolloutState(StrEnum):
    PENDING = "pending"  # created by the operator; the controller has not started it yet
    CANARY = "canary"  # canaries told; waiting for them to report the version
    BAKING = "baking"  # canaries run it; gathering live error
    PROMOTING = "promoting"  # everyone told; waiting for them to report
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"


R = RolloutState
TERMINAL = frozenset({R.COMPLETED, R.ROLLED_BACK, R.ABORTED, R.SUPERSEDED})
TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    R.PENDING: frozenset({R.CANARY, R.PROMOTING, R.ABORTED, R.SUPERSEDED}),
    R.CANARY: frozenset({R.BAKING, R.ROLLING_BACK, R.ABORTED, R.SUPERSEDED}),
    R.BAKING: frozenset({R.PROMOTING, R.ROLLING_BACK, R.ABORTED, R.SUPERSEDED}),
    R.PROMOTING: frozenset({R.COMPLETED, R.ROLLING_BACK, R.ABORTED, R.SUPERSEDED}),
    R.ROLLING_BACK: frozenset({R.ROLLED_BACK, R.ABORTED, R.SUPERSEDED}),
    R.COMPLETED: frozenset(),
    R.ROLLED_BACK: frozenset(),
    R.ABORTED: frozenset(),
    R.SUPERSEDED: frozenset(),
}


@dataclass(frozen=True)
class RolloutParams:
    canary: float = 0.1
    bake: float = 120.0
    max_mae_ratio: float = 1.1
    max_failures: int = 0
    report_timeout: float = 120.0
    promote_timeout: float = 600.0
    min_labelled: int = 20


@dataclass(frozen=True)
class DeviceView:
    """What the cloud knows of a device, from its reported state and telemetry."""

    id: str
    group: str | None = None
    online: bool = False
    active_version: int | None = None
    active_name: str | None = None
    update_state: str | None = None
    update_version: int | None = None
    update_reason: str | None = None
    update_rollout: str | None = None
    live_mae: float | None = None
    live_n: int = 0
    model_version_at_telemetry: int | None = None


@dataclass(frozen=True)
class SetDesired:
    """Decision: publish desired state ``version`` of the rollout's model to ``devices``."""

    devices: tuple[str, ...]
    version: int | None  # None: the device had no model before; clear its desired model
    rollback: bool = False


@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    version: int
    target: str
    devices: tuple[str, ...]
    canaries: tuple[str, ...]
    previous: dict[str, int | None]  # device -> version it ran before (for rollback)
    params: RolloutParams
    state: RolloutState = R.PENDING
    rollback: bool = False
    created: float = 0.0
    updated: float = 0.0
    stage_started: float = 0.0
    reason: str | None = None
    events: tuple[tuple[float, str], ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)

    def move(self, new: RolloutState, now: float, message: str, **metrics: Any) -> Rollout:
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"illegal rollout transition {self.state} -> {new}")
        return replace(
            self,
            state=new,
            updated=now,
            stage_started=now,
            reason=message if new in (R.ROLLING_BACK, R.ABORTED, R.SUPERSEDED) else self.reason,
            events=(*self.events, (now, f"{new.value}: {message}")),
            metrics={**self.metrics, **metrics},
        )

    @property
    def controls(self) -> tuple[str, ...]:
        c = set(self.canaries)
        return tuple(d for d in self.devices if d not in c)


def parse_target(target: str) -> tuple[Literal["all", "group", "devices"], tuple[str, ...]]:
    """``all`` | ``group:G`` | ``devices:a,b`` → (kind, values); ValueError with the reason otherwise."""
    if target == "all":
        return "all", ()
    kind, _, rest = target.partition(":")
    values = tuple(v.strip() for v in rest.split(",") if v.strip())
    if kind == "group" and len(values) == 1:
        return "group", values
    if kind == "devices" and values:
        return "devices", values
    raise ValueError(f"target must be all, group:NAME or devices:a,b — got {target!r}")


def choose_canaries(devices: list[DeviceView], fraction: float, rng: random.Random) -> tuple[str, ...]:
    """At least one device, online ones first, chosen at random among equals."""
    if not devices:
        return ()
    if fraction >= 1.0:
        return tuple(d.id for d in devices)
    k = max(1, math.ceil(fraction * len(devices)))
    online = [d.id for d in devices if d.online]
    offline = [d.id for d in devices if not d.online]
    rng.shuffle(online)
    rng.shuffle(offline)
    return tuple((online + offline)[:k])


def start(r: Rollout, now: float, targets: list[DeviceView], rng: random.Random) -> tuple[Rollout, list[SetDesired]]:
    """Begin a pending rollout on ``targets``: record who ran what, tell the canaries.

    A rollback rollout (``fleet rollback``) skips the canary stage: every target is told at once."""
    devices = tuple(v.id for v in targets)
    previous = {v.id: (v.active_version if v.active_name in (None, r.model) else None) for v in targets}
    if not devices:
        return r.move(R.ABORTED, now, "no device matches the target"), []
    if r.rollback:
        r2 = replace(r, devices=devices, canaries=devices, previous=previous)
        return r2.move(R.PROMOTING, now, f"rolling {len(devices)} device(s) back to v{r.version}"), [
            SetDesired(devices, r.version, rollback=True)
        ]
    canaries = choose_canaries(targets, r.params.canary, rng)
    r2 = replace(r, devices=devices, canaries=canaries, previous=previous)
    msg = f"{len(canaries)} canary device(s) of {len(devices)} told to run v{r.version}"
    return r2.move(R.CANARY, now, msg), [SetDesired(canaries, r.version)]


def _mae(views: list[DeviceView], version: int | None, min_n: int) -> tuple[float | None, int]:
    """Pooled live MAE of devices running ``version`` with enough labelled readings."""
    total, n = 0.0, 0
    for v in views:
        if v.live_mae is None or v.live_n < min_n or v.active_version != version:
            continue
        if v.model_version_at_telemetry is not None and v.model_version_at_telemetry != version:
            continue  # telemetry from before the switch
        total += v.live_mae * v.live_n
        n += v.live_n
    return (total / n if n else None), n


def _failed(views: list[DeviceView], r: Rollout) -> list[DeviceView]:
    return [
        v for v in views if v.update_state == "failed" and v.update_version == r.version and v.update_rollout == r.id
    ]


def step(
    r: Rollout, now: float, fleet: dict[str, DeviceView], baseline_mae: float | None = None
) -> tuple[Rollout, list[SetDesired]]:
    """Advance a rollout given the fleet's current view; return it and what to publish."""
    if r.state in TERMINAL or r.state == R.PENDING:
        return r, []
    p = r.params
    canaries = [fleet.get(d, DeviceView(d)) for d in r.canaries]
    controls = [fleet.get(d, DeviceView(d)) for d in r.controls]
    elapsed = now - r.stage_started

    if r.state in (R.CANARY, R.BAKING, R.PROMOTING):
        failed = _failed(canaries + (controls if r.state == R.PROMOTING else []), r)
        if len(failed) > p.max_failures:
            why = "; ".join(f"{v.id}: {v.update_reason}" for v in failed[:3])
            return _roll_back(r, now, f"{len(failed)} device(s) failed to apply v{r.version} ({why})")

    if r.state == R.CANARY:
        reported = [v for v in canaries if v.active_version == r.version and v.active_name == r.model]
        if len(reported) == len(canaries):
            return r.move(R.BAKING, now, f"{len(canaries)} canary device(s) run v{r.version}; baking {p.bake:g} s"), []
        if elapsed > p.report_timeout:
            missing = [v.id for v in canaries if v.active_version != r.version]
            return _roll_back(
                r, now, f"canaries {missing[:5]} did not report v{r.version} within {p.report_timeout:g} s"
            )
        return r, []

    if r.state == R.BAKING:
        offline = [v.id for v in canaries if not v.online]
        if offline:
            return _roll_back(r, now, f"canary device(s) {offline[:5]} went offline during the bake")
        if elapsed < p.bake:
            return r, []
        canary_mae, cn = _mae(canaries, r.version, p.min_labelled)
        prev_versions = {r.previous.get(d) for d in r.controls}
        control_mae, kn = (None, 0)
        if controls and len(prev_versions) == 1:
            control_mae, kn = _mae(controls, next(iter(prev_versions)), p.min_labelled)
        reference = control_mae if control_mae is not None else baseline_mae
        if canary_mae is None:
            if elapsed < p.bake + p.report_timeout:
                return r, []  # wait for labelled readings, but not forever
            return _roll_back(r, now, f"no live error from the canaries after {elapsed:.0f} s")
        metrics = {"canary_mae": canary_mae, "canary_n": cn, "control_mae": control_mae, "control_n": kn}
        if reference is not None and canary_mae > p.max_mae_ratio * reference:
            return _roll_back(
                r,
                now,
                f"canary live MAE {canary_mae:.4g} > {p.max_mae_ratio:g} x "
                f"{'control' if control_mae is not None else 'baseline'} {reference:.4g}",
                **metrics,
            )
        rest = r.controls
        msg = f"canary MAE {canary_mae:.4g}" + (f" vs control {reference:.4g}" if reference is not None else "")
        r2 = r.move(R.PROMOTING, now, f"{msg}: promoting to {len(rest)} more device(s)", **metrics)
        return r2, [SetDesired(rest, r.version)] if rest else []

    if r.state == R.PROMOTING:
        targets = [fleet.get(d, DeviceView(d)) for d in r.devices]
        done = [v for v in targets if v.active_version == r.version]
        online_missing = [v.id for v in targets if v.online and v.active_version != r.version]
        if len(done) == len(targets):
            return r.move(R.COMPLETED, now, f"all {len(targets)} device(s) run v{r.version}"), []
        if not online_missing and elapsed > p.report_timeout:
            n_offline = len(targets) - len(done)
            return r.move(
                R.COMPLETED, now, f"{len(done)} device(s) run v{r.version}; {n_offline} offline converge on reconnect"
            ), []
        if elapsed > p.promote_timeout:
            return r.move(R.COMPLETED, now, f"{len(done)}/{len(targets)} reported v{r.version} within the timeout"), []
        return r, []

    if r.state == R.ROLLING_BACK:
        told = set(r.canaries) | (set(r.devices) if r.metrics.get("promoted") else set())
        views = [fleet.get(d, DeviceView(d)) for d in told]
        back = [v for v in views if v.active_version != r.version]
        if len(back) == len(views) or elapsed > p.report_timeout:
            return r.move(R.ROLLED_BACK, now, f"{len(back)}/{len(views)} device(s) back on the previous version"), []
        return r, []
    return r, []


def _roll_back(r: Rollout, now: float, why: str, **metrics: Any) -> tuple[Rollout, list[SetDesired]]:
    promoted = r.state == R.PROMOTING
    told = r.devices if promoted else r.canaries
    r2 = r.move(R.ROLLING_BACK, now, why, promoted=promoted, **metrics)
    by_prev: dict[int | None, list[str]] = {}
    for d in told:
        by_prev.setdefault(r.previous.get(d), []).append(d)
    return r2, [SetDesired(tuple(devs), v, rollback=True) for v, devs in by_prev.items()]


def abort(r: Rollout, now: float, why: str = "aborted by operator") -> tuple[Rollout, list[SetDesired]]:
    """Stop a rollout where it is; devices already told keep the new version (use rollback to undo)."""
    if r.state in TERMINAL:
        return r, []
    return r.move(R.ABORTED, now, why), []


def supersede(r: Rollout, now: float, by: str) -> Rollout:
    if r.state in TERMINAL:
        return r
    return r.move(R.SUPERSEDED, now, f"superseded by rollout {by}")
