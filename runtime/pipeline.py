"""Readings in → micro-batch → validate → predict → outbox, one transaction per micro-batch.

A reading is *accepted* once its micro-batch commits to the outbox; only then are input
acknowledgements (MQTT manual acks) sent and a file source's position advanced — in the same
transaction as the rows. Inference never waits on the network.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import InputError, ModelError
from runtime.outbox import Outbox
from runtime.predictors import Predictor
from runtime.protocol import Reading
from runtime.reconcile import RecentInputs, columns_for
from runtime.telemetry import Counters, LatencyHistogram, LiveError, RunningStats

__all__ = ["Pipeline", "Pending"]

logger = logging.getLogger(__name__)


@dataclass
class Pending:
    """Readings waiting for the next micro-batch commit."""

    ts: list[float] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)
    y_true: list[float] = field(default_factory=list)
    arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    n: int = 0
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    position: tuple[str, str] | None = None
    first_at: float = 0.0


class Pipeline:
    """Owns the running predictor (swapped by reference between micro-batches) and the intake."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        schema: tuple[str, ...] = (),
        max_rows: int = 512,
        capture_rate: float = 1.0,
        share_raw: bool = True,
        ring_capacity: int = 256,
        clock: Callable[[], float] = time.time,
        on_committed: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox = outbox
        self.schema: tuple[str, ...] = schema
        self.max_rows = max_rows
        self.capture_rate = capture_rate
        self.share_raw = share_raw
        self.ring_capacity = ring_capacity
        self.clock = clock
        self.on_committed = on_committed or (lambda n: None)
        self.rng = rng or random.Random()
        self.predictor: Predictor | None = None
        self._cols: np.ndarray | None = None
        self._impute: np.ndarray | None = None
        self.counters = Counters()
        self.latency = LatencyHistogram()
        self.live = LiveError()
        self.features: RunningStats | None = RunningStats(len(schema)) if schema else None
        self.recent: RecentInputs | None = RecentInputs(ring_capacity, len(schema)) if schema else None
        self.pending = Pending()
        self.stats_sink: Callable[[np.ndarray, np.ndarray], None] | None = None
        self.predict_listener: Callable[[np.ndarray, np.ndarray, int], None] | None = None

    # ------------------------------------------------------------------ model

    def set_schema(self, schema: tuple[str, ...]) -> None:
        if schema == self.schema:
            return
        if self.schema:
            raise InputError(f"input schema is fixed as {list(self.schema)}; got {list(schema)}")
        self.schema = schema
        self.features = RunningStats(len(schema))
        self.recent = RecentInputs(self.ring_capacity, len(schema))

    def swap(self, predictor: Predictor | None) -> None:
        """Switch models between two micro-batches: no reading is dropped or predicted twice."""
        if predictor is not None:
            if not self.schema:
                self.set_schema(tuple(predictor.manifest.features))
            self._cols = columns_for(tuple(predictor.manifest.features), self.schema)
            m = predictor.manifest
            self._impute = (
                np.asarray(m.feature_stats.mean) if m.nan_policy == "impute" and m.feature_stats is not None else None
            )
        self.predictor = predictor
        self.live.reset()

    @property
    def model_version(self) -> int:
        return self.predictor.manifest.version if self.predictor is not None else 0

    def recent_rows(self) -> np.ndarray:
        return self.recent.rows() if self.recent is not None else np.zeros((0, 0))

    # ------------------------------------------------------------------ intake

    def _row(self, r: Reading) -> list[float]:
        f = r.features
        if isinstance(f, dict):
            if not self.schema:
                self.set_schema(tuple(f))
            missing = [k for k in self.schema if k not in f]
            if missing:
                raise InputError(f"missing features {missing}")
            return [math.nan if f[k] is None else float(f[k]) for k in self.schema]  # type: ignore[arg-type]
        if not self.schema:
            raise InputError("readings with features in order need a configured schema or an active model")
        if len(f) != len(self.schema):
            raise InputError(f"{len(f)} features given, {len(self.schema)} expected ({list(self.schema)})")
        return [math.nan if v is None else float(v) for v in f]

    def submit(
        self,
        readings: Sequence[Reading],
        *,
        on_commit: Callable[[], None] | None = None,
        position: tuple[str, str] | None = None,
    ) -> int:
        """Queue validated readings; returns how many were rejected (counted, logged)."""
        p = self.pending
        rejected = 0
        now = self.clock()
        for r in readings:
            try:
                row = self._row(r)
            except InputError as exc:
                rejected += 1
                logger.debug("reading rejected: %s", exc)
                continue
            if p.n == 0:
                p.first_at = time.monotonic()
            p.ts.append(r.ts if r.ts is not None else now)
            p.rows.append(row)
            p.y_true.append(math.nan if r.y_true is None else r.y_true)
            p.n += 1
        self.counters.rejected += rejected
        self.counters.readings += len(readings)
        if on_commit is not None:
            p.on_commit.append(on_commit)
        if position is not None:
            p.position = position
        if p.n >= self.max_rows:
            self.flush()
        return rejected

    def submit_arrays(self, X: np.ndarray, y_true: np.ndarray | None = None, ts: np.ndarray | None = None) -> None:
        """The Python interface for simulators: a block of readings in schema order."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or (self.schema and X.shape[1] != len(self.schema)):
            raise InputError(f"expected an (n, {len(self.schema)}) array, got shape {X.shape}")
        n = X.shape[0]
        p = self.pending
        if p.n == 0:
            p.first_at = time.monotonic()
        t = np.full(n, self.clock()) if ts is None else np.asarray(ts, dtype=np.float64)
        y = np.full(n, math.nan) if y_true is None else np.asarray(y_true, dtype=np.float64)
        p.arrays.append((t, X, y))
        p.n += n
        self.counters.readings += n
        if p.n >= self.max_rows:
            self.flush()

    # ------------------------------------------------------------------ micro-batch

    def _gather(self, p: Pending) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts_t, parts_x, parts_y = [], [], []
        if p.rows:
            parts_t.append(np.asarray(p.ts, dtype=np.float64))
            parts_x.append(np.asarray(p.rows, dtype=np.float64).reshape(len(p.rows), len(self.schema)))
            parts_y.append(np.asarray(p.y_true, dtype=np.float64))
        for t, x, y in p.arrays:
            parts_t.append(t)
            parts_x.append(x)
            parts_y.append(y)
        if len(parts_t) == 1:
            return parts_t[0], parts_x[0], parts_y[0]
        return np.concatenate(parts_t), np.concatenate(parts_x), np.concatenate(parts_y)

    def flush(self) -> int:
        """Predict and commit everything pending in one outbox transaction; return rows accepted."""
        p = self.pending
        if p.n == 0 and p.position is None and not p.on_commit:
            return 0
        self.pending = Pending()
        accepted = 0
        if p.n:
            ts, X, y_true = self._gather(p)
            ok = np.isfinite(X).all(axis=1)
            pred = self.predictor
            if pred is not None and self._impute is not None and not ok.all():
                assert self._cols is not None
                model_x = X[:, self._cols]
                bad = ~np.isfinite(model_x)
                model_x[bad] = np.broadcast_to(self._impute, model_x.shape)[bad]
                X[:, self._cols] = model_x
                ok = np.isfinite(X[:, self._cols]).all(axis=1)
            if not ok.all():
                nbad = int((~ok).sum())
                self.counters.rejected += nbad
                logger.debug("%d readings rejected: non-finite feature values", nbad)
                ts, X, y_true = ts[ok], X[ok], y_true[ok]
            n = X.shape[0]
            t0 = time.perf_counter()
            y_pred = np.full(n, math.nan)
            if n and pred is not None:
                assert self._cols is not None
                try:
                    y_pred = pred.predict(X[:, self._cols])
                except ModelError as exc:
                    # One bad row (finite inputs whose output overflows) must not sink the whole
                    # micro-batch nor the task that flushed it: predict row by row, reject the bad.
                    good, y_pred = _predict_rows(pred, X[:, self._cols])
                    nbad = int((~good).sum())
                    self.counters.rejected += nbad
                    logger.warning("%d readings rejected: %s", nbad, exc)
                    ts, X, y_true, y_pred = ts[good], X[good], y_true[good], y_pred[good]
                    n = X.shape[0]
                self.counters.predictions += n
            if n:
                version = self.model_version
                capture = self._capture_mask(n)
                self.outbox.append_results(
                    ts=ts,
                    model_version=np.full(n, version, dtype=np.int64),
                    y_pred=y_pred,
                    x=X,
                    x_mask=capture,
                    y_true=y_true,
                    source_position=p.position,
                )
                self.latency.record(time.perf_counter() - t0 + (time.monotonic() - p.first_at), n)
                accepted = n
                self._observe(X, y_pred, y_true, version)
        if not accepted and p.position is not None:  # nothing stored (or all rejected): still move on
            self.outbox.set_meta(*p.position)
        for cb in p.on_commit:
            try:
                cb()
            except Exception:  # an input ack failing must not lose the committed batch
                logger.exception("input acknowledgement failed")
        if accepted:
            self.on_committed(accepted)
        return accepted

    def _capture_mask(self, n: int) -> np.ndarray | None:
        if not self.share_raw or self.capture_rate <= 0.0:
            return np.zeros(n, dtype=bool)
        if self.capture_rate >= 1.0:
            return None  # all rows
        return np.frombuffer(self.rng.randbytes(n), dtype=np.uint8) < int(self.capture_rate * 256)

    def _observe(self, X: np.ndarray, y_pred: np.ndarray, y_true: np.ndarray, version: int) -> None:
        if self.features is not None:
            self.features.update(X)
        if self.recent is not None:
            self.recent.add(X)
        labelled = np.isfinite(y_true)
        if version and labelled.any():
            self.live.update(y_pred[labelled], y_true[labelled])
        if self.stats_sink is not None and labelled.any():
            self.stats_sink(X[labelled], y_true[labelled])
        if self.predict_listener is not None:
            self.predict_listener(X, y_pred, version)

    def pending_age(self) -> float:
        return time.monotonic() - self.pending.first_at if self.pending.n else 0.0

    def describe(self) -> dict[str, Any]:
        return {"schema": list(self.schema), "pending": self.pending.n, "model_version": self.model_version}


def _predict_rows(pred: Predictor, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predict one row at a time: (rows that predicted, predictions with NaN where a row failed)."""
    good = np.ones(X.shape[0], dtype=bool)
    y = np.full(X.shape[0], math.nan)
    for i in range(X.shape[0]):
        try:
            y[i] = pred.predict(X[i : i + 1])[0]
        except ModelError:
            good[i] = False
    return good, y
