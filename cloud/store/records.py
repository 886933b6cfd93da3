"""Plain records the store returns: devices, model versions, rollouts, ingest outcomes, row queries."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from runtime.protocol import ModelManifest

__all__ = [
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
    "Window",
]

#: Rollout states after which a rollout is no longer active (see :meth:`Store.active_rollouts`).
ROLLOUT_TERMINAL_STATES: frozenset[str] = frozenset({"completed", "rolled_back", "aborted", "superseded", "failed"})


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time window ``start <= ts < end`` over device timestamps; ``None`` is unbounded."""

    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"window end {self.end} must be after its start {self.start}")

    @classmethod
    def last(cls, seconds: float, now: float) -> Window:
        """The window of the last ``seconds`` before ``now``."""
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        return cls(start=now - seconds, end=None)


class RowKey(NamedTuple):
    """Total order of result rows: ``(ts, device, seq)``. Used to split train from holdout rows."""

    ts: float
    device: str
    seq: int


@dataclass(frozen=True, slots=True)
class LabelledChunk:
    """Up to ``chunk_rows`` labelled rows: ``X`` (m, d) in the requested feature order, ``y`` and ``ts`` (m,)."""

    X: np.ndarray
    y: np.ndarray
    ts: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message :meth:`Store.ingest` refused before storing anything of it."""

    stream: str
    device: str
    reason: str


@dataclass(slots=True)
class IngestResult(Mapping[str, dict[str, int]]):
    """What one :meth:`Store.ingest` call stored; as a mapping, ``device -> {stream: watermark}``.

    ``watermarks`` has an entry for every (device, stream) seen in the call — including those of
    duplicate messages, whose earlier ack the device evidently missed — so the caller publishes one
    ``Ack(device, result[device])`` per device after the call returns (i.e. after the commit).
    ``duplicates`` counts rows (and telemetry/stats messages) received but not stored again.
    """

    watermarks: dict[str, dict[str, int]] = field(default_factory=dict)
    rows_stored: int = 0
    batches_new: int = 0
    batches_duplicate: int = 0
    telemetry_stored: int = 0
    stats_stored: int = 0
    duplicates: int = 0
    rejected: list[Rejected] = field(default_factory=list)

    def __getitem__(self, device: str) -> dict[str, int]:
        return self.watermarks[device]

    def __iter__(self) -> Iterator[str]:
        return iter(self.watermarks)

    def __len__(self) -> int:
        return len(self.watermarks)


@dataclass(frozen=True, slots=True)
class ResultCounts:
    """Stored result rows of one device: ``rows``, ``distinct_seqs``; ``duplicates`` is their difference."""

    rows: int
    distinct_seqs: int

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_seqs


@dataclass(frozen=True, slots=True)
class ResultRow:
    device: str
    seq: int
    ts: float
    model_version: int | None
    y_pred: float | None
    x: tuple[float | None, ...] | None
    y_true: float | None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device as the cloud knows it from what it sent (reported state, status, telemetry, data).

    ``online`` is None until a status message arrived. ``drops`` sums the outbox's dropped rows over
    all streams (per-stream counts are in ``telemetry["outbox_dropped"]``). ``desired`` is the last
    desired state the cloud recorded for the device (see :meth:`Store.set_device_desired`).
    """

    id: str
    fleet: str | None
    group: str | None
    first_seen: float
    last_seen: float
    online: bool | None = None
    status_at: float | None = None
    model_name: str | None = None
    model_version: int | None = None
    previous_name: str | None = None
    previous_version: int | None = None
    update_state: str | None = None
    update_version: int | None = None
    update_reason: str | None = None
    update_at: float | None = None
    rollout_id: str | None = None
    reported_at: float | None = None
    config_hash: str | None = None
    transport: str | None = None
    runtime_version: str | None = None
    live_mae: float | None = None
    live_n: int | None = None
    outbox_depth: int | None = None
    outbox_bytes: int | None = None
    drops: int | None = None
    telemetry_at: float | None = None
    telemetry: dict[str, Any] | None = None
    desired: dict[str, Any] | None = None
    desired_at: float | None = None


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    """A registered model version. ``manifest_json`` is the signed manifest exactly as registered."""

    name: str
    version: int
    manifest_json: str
    created_at: float
    status: str
    parent: int | None
    metrics: dict[str, float]
    source: str | None
    is_champion: bool = False

    @property
    def manifest(self) -> ModelManifest:
        return ModelManifest.model_validate_json(self.manifest_json)


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    rollout_id: str
    ts: float
    message: str
    state: str | None = None


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """A rollout row. ``state`` and ``stage`` values belong to the rollout state machine
    (``cloud/rollout.py``); the store only knows :data:`ROLLOUT_TERMINAL_STATES`."""

    id: str
    model: str
    version: int
    target: str
    canary_fraction: float
    params: dict[str, Any]
    state: str
    stage: str | None
    reason: str | None
    created_at: float
    updated_at: float

    @property
    def active(self) -> bool:
        return self.state not in ROLLOUT_TERMINAL_STATES


def loads_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)
