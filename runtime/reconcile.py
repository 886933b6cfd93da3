"""Desired vs reported state: the model update lifecycle on a device.

The lifecycle is the table :data:`TRANSITIONS`; :class:`Reconciler` is the only code that moves
along it. :func:`decide` is pure: it looks at a desired state and what the device has and returns
what to do. :meth:`Reconciler.apply` carries an "apply" out: fetch → check size and sha256 →
verify signature → load a fresh predictor → validate on recent inputs → switch atomically.
Any failure leaves the old model serving and records the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np

from runtime.config import UpdateSettings
from runtime.errors import EdgeloopError, UpdateError
from runtime.fetch import download
from runtime.modelstore import ModelStore
from runtime.predictors import Predictor, load_predictor
from runtime.protocol import DesiredState, ModelManifest, ModelRef, UpdateStatus

__all__ = ["TRANSITIONS", "Decision", "Reconciler", "RecentInputs", "UpdateState", "decide", "validate_candidate"]

logger = logging.getLogger(__name__)


class UpdateState(StrEnum):
    IDLE = "idle"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    APPLIED = "applied"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


S = UpdateState
#: Every allowed move of the update lifecycle; anything else is a bug.
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    S.IDLE: frozenset({S.FETCHING, S.VERIFYING, S.ROLLED_BACK, S.FAILED}),
    S.FETCHING: frozenset({S.VERIFYING, S.FAILED}),
    S.VERIFYING: frozenset({S.VALIDATING, S.FAILED}),
    S.VALIDATING: frozenset({S.APPLIED, S.ROLLED_BACK, S.FAILED}),
    S.APPLIED: frozenset({S.FETCHING, S.VERIFYING, S.ROLLED_BACK, S.FAILED}),
    S.FAILED: frozenset({S.FETCHING, S.VERIFYING, S.ROLLED_BACK}),
    S.ROLLED_BACK: frozenset({S.FETCHING, S.VERIFYING, S.ROLLED_BACK, S.FAILED}),
}
#: What reported state shows for each internal state.
_REPORTED: dict[UpdateState, Literal["idle", "applying", "applied", "failed", "rolled_back"]] = {
    S.IDLE: "idle",
    S.FETCHING: "applying",
    S.VERIFYING: "applying",
    S.VALIDATING: "applying",
    S.APPLIED: "applied",
    S.FAILED: "failed",
    S.ROLLED_BACK: "rolled_back",
}


@dataclass(frozen=True)
class Decision:
    action: Literal["apply", "noop", "ignore", "refuse"]
    reason: str


def decide(desired: DesiredState, device_id: str, active: ModelRef | None) -> Decision:
    """What to do with a desired state, given the active model. Pure."""
    if desired.device is not None and desired.device != device_id:
        return Decision("ignore", f"desired state is addressed to {desired.device}")
    m = desired.model
    if m is None:
        return Decision("noop", "no model in desired state")
    if active is not None and m.ref == active:
        return Decision("noop", f"{m.name} v{m.version} is already active")
    if active is not None and m.name == active.name and m.version < active.version and not desired.rollback:
        return Decision(
            "refuse", f"v{m.version} is older than the active v{active.version} and the desired state is not a rollback"
        )
    return Decision("apply", "rollback" if desired.rollback else "update")


class RecentInputs:
    """A ring buffer of the last N input rows (in the device's input schema), for validation."""

    def __init__(self, capacity: int, width: int) -> None:
        self.buf = np.zeros((capacity, width))
        self.n = 0
        self.pos = 0

    def add(self, X: np.ndarray) -> None:
        cap = self.buf.shape[0]
        if X.shape[0] >= cap:
            self.buf[:] = X[-cap:]
            self.n, self.pos = cap, 0
            return
        end = self.pos + X.shape[0]
        if end <= cap:
            self.buf[self.pos : end] = X
        else:
            k = cap - self.pos
            self.buf[self.pos :] = X[:k]
            self.buf[: end - cap] = X[k:]
        self.pos = end % cap
        self.n = min(cap, self.n + X.shape[0])

    def rows(self) -> np.ndarray:
        return self.buf[: self.n] if self.n < self.buf.shape[0] else self.buf


def columns_for(model_features: tuple[str, ...], schema: tuple[str, ...]) -> np.ndarray:
    """Indices of a model's features in the device's input schema; UpdateError when one is missing."""
    missing = [f for f in model_features if f not in schema]
    if missing:
        raise UpdateError(f"model needs features {missing} that the device's inputs ({list(schema)}) do not have")
    return np.array([schema.index(f) for f in model_features], dtype=np.intp)


def validate_candidate(
    candidate: Predictor,
    current: Predictor | None,
    recent: np.ndarray,
    schema: tuple[str, ...],
    max_output_shift: float,
) -> None:
    """Refuse a candidate whose width does not fit, whose outputs on recent inputs are not finite, or
    that predicts wildly outside what the current model predicts on the same rows."""
    manifest = candidate.manifest
    version = manifest.version
    cols = columns_for(manifest.features, schema) if schema else None
    if recent.shape[0] == 0 or cols is None:
        if manifest.feature_stats is None:
            return
        probe = np.asarray([manifest.feature_stats.mean])
    else:
        probe = recent[:, cols]
    try:
        with np.errstate(all="ignore"):  # overflow is judged below, as non-finite output
            y_new = candidate.predict(probe)
    except EdgeloopError as exc:
        raise UpdateError(f"candidate failed on recent inputs: {exc}", version) from None
    if y_new.shape != (probe.shape[0],):
        raise UpdateError(f"candidate returned shape {y_new.shape} for {probe.shape[0]} rows", version)
    if not np.isfinite(y_new).all():
        bad = int((~np.isfinite(y_new)).sum())
        raise UpdateError(f"candidate produced {bad} non-finite outputs on {probe.shape[0]} recent inputs", version)
    if current is None or recent.shape[0] == 0:
        return
    try:
        with np.errstate(all="ignore"):
            y_cur = current.predict(recent[:, columns_for(current.manifest.features, schema)])
    except EdgeloopError:
        return  # the current model cannot judge: finiteness was the check
    ok = np.isfinite(y_cur)
    if not ok.any():
        return
    scale = float(np.std(y_cur[ok]) + np.mean(np.abs(y_cur[ok])) + 1.0)
    shift = float(np.max(np.abs(y_new[ok] - y_cur[ok])))
    if shift > max_output_shift * scale:
        raise UpdateError(
            f"candidate's outputs differ from the current model's by up to {shift:.3g} "
            f"(limit {max_output_shift:g} x {scale:.3g}) on recent inputs",
            version,
        )


@dataclass
class Outcome:
    ok: bool
    predictor: Predictor | None
    status: UpdateStatus


class Reconciler:
    """Carries out model updates and rollbacks; owns the update state."""

    def __init__(
        self,
        store: ModelStore,
        settings: UpdateSettings,
        *,
        staging_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.staging_dir = staging_dir
        self.clock = clock
        self.state = UpdateState.IDLE
        self.status = UpdateStatus()
        self._lock = asyncio.Lock()

    def _move(self, new: UpdateState, version: int | None, reason: str | None, rollout_id: str | None) -> None:
        if new not in TRANSITIONS[self.state] and new != self.state:
            raise AssertionError(f"illegal update transition {self.state} -> {new}")
        self.state = new
        self.status = UpdateStatus(
            state=_REPORTED[new], version=version, reason=reason, rollout_id=rollout_id, at=self.clock()
        )
        log = logger.warning if new == UpdateState.FAILED else logger.info
        log("model update %s: v%s%s", new.value, version, f" ({reason})" if reason else "")

    def load_active(self) -> Predictor | None:
        """Load the active model at start-up; fall back to previous when it no longer verifies."""
        active, previous = self.store.pointers()
        for ref in (active, previous):
            if ref is None:
                continue
            try:
                p = load_predictor(self.store.bundle(ref), onnx_threads=self.settings.onnx_threads)
            except EdgeloopError as exc:
                logger.error("installed model %s v%s does not load: %s", ref.name, ref.version, exc)
                continue
            if ref != active:
                self.store.activate(ref)
            return p
        return None

    async def _fetch(self, m: ModelManifest) -> Path | bytes | None:
        art = m.artifact
        if art is None:
            return None
        if art.url is None:
            raise UpdateError("onnx model has no artifact URL to download from", m.version)
        path = await asyncio.wait_for(
            asyncio.to_thread(
                download,
                art.url,
                self.staging_dir,
                expected_size=art.size,
                expected_sha256=art.sha256,
                max_bytes=self.settings.max_artifact_bytes,
                allowed_schemes=tuple(self.settings.allowed_schemes),
                timeout=self.settings.download_timeout,
            ),
            timeout=self.settings.download_timeout * 2,
        )
        return path

    async def apply(
        self,
        desired: DesiredState,
        current: Predictor | None,
        recent: np.ndarray,
        schema: tuple[str, ...],
    ) -> Outcome:
        """Install, load and validate the desired model; switch the on-disk pointer when it passes.

        The caller swaps its running predictor to ``Outcome.predictor`` (by reference)."""
        m = desired.model
        assert m is not None
        rid = desired.rollout_id
        async with self._lock:
            try:
                if self.store.has(m.ref):
                    self._move(UpdateState.VERIFYING, m.version, None, rid)
                    bundle = self.store.bundle(m.ref)
                    if bundle.manifest.signature != m.signature:
                        raise UpdateError("installed bundle differs from the desired manifest", m.version)
                else:
                    self._move(UpdateState.FETCHING, m.version, None, rid)
                    try:
                        artifact = await self._fetch(m)
                    except TimeoutError:
                        raise UpdateError("download timed out", m.version) from None
                    self._move(UpdateState.VERIFYING, m.version, None, rid)
                    bundle = await asyncio.to_thread(self.store.install, m, artifact)
                candidate = load_predictor(bundle, onnx_threads=self.settings.onnx_threads)
                self._move(UpdateState.VALIDATING, m.version, None, rid)
                validate_candidate(candidate, current, recent, schema, self.settings.max_output_shift)
                # off the loop: two fsyncs (~5 ms) per device serialised a fleet sharing the loop
                await asyncio.to_thread(self.store.activate, m.ref, rollback=desired.rollback)
                self._move(
                    UpdateState.ROLLED_BACK if desired.rollback else UpdateState.APPLIED,
                    m.version,
                    "rollback requested by the cloud" if desired.rollback else None,
                    rid,
                )
                try:
                    self.store.gc(self.settings.keep_versions)
                except OSError as exc:  # housekeeping only
                    logger.warning("model gc failed: %s", exc)
                return Outcome(True, candidate, self.status)
            except EdgeloopError as exc:
                reason = getattr(exc, "reason", str(exc))
                self._move(UpdateState.FAILED, m.version, str(reason), rid)
                return Outcome(False, None, self.status)

    def refuse(self, desired: DesiredState, reason: str) -> None:
        """Record a desired state refused before any work (a downgrade without the rollback flag)."""
        version = desired.model.version if desired.model else None
        self._move(UpdateState.FAILED, version, reason, desired.rollout_id)

    async def rollback(self) -> Outcome:
        """Return to the previous (last-known-good) version without a download."""
        async with self._lock:
            try:
                ref = self.store.rollback()
                try:
                    p = load_predictor(self.store.bundle(ref), onnx_threads=self.settings.onnx_threads)
                except EdgeloopError:
                    self.store.rollback()  # swap the pointers back: the current model keeps serving
                    raise
            except EdgeloopError as exc:
                reason = getattr(exc, "reason", str(exc))
                self.status = UpdateStatus(state="failed", reason=f"rollback: {reason}", at=self.clock())
                return Outcome(False, None, self.status)
            self._move(UpdateState.ROLLED_BACK, ref.version, "local rollback", None)
            return Outcome(True, p, self.status)
