"""Device telemetry: counters, a latency histogram, running feature statistics (Welford/Chan), live error."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from runtime.protocol import FeatureDrift, FeatureStats

__all__ = ["LatencyHistogram", "LiveError", "RunningStats", "Counters", "rss_bytes", "drift_score"]


class LatencyHistogram:
    """Log-spaced buckets from 1 µs to ~100 s; quantiles within one bucket's width (~5%)."""

    _GROWTH = 1.05
    _MIN_US = 1.0

    def __init__(self) -> None:
        self._n_buckets = int(math.log(1e8) / math.log(self._GROWTH)) + 2
        self.counts = np.zeros(self._n_buckets, dtype=np.int64)
        self.total = 0

    def _bucket(self, us: float) -> int:
        if us <= self._MIN_US:
            return 0
        return min(self._n_buckets - 1, int(math.log(us / self._MIN_US) / math.log(self._GROWTH)) + 1)

    def record(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` observations of ``seconds`` each (a micro-batch shares one latency)."""
        self.counts[self._bucket(seconds * 1e6)] += count
        self.total += count

    def quantile(self, q: float) -> float | None:
        """The q-quantile in microseconds (upper edge of its bucket), or None when empty."""
        if self.total == 0:
            return None
        rank = q * self.total
        idx = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        return self._MIN_US * self._GROWTH**idx

    def reset(self) -> None:
        self.counts[:] = 0
        self.total = 0


class RunningStats:
    """Per-feature running mean and variance, updated a batch at a time (Chan et al.'s merge)."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.mean = np.zeros(d)
        self.m2 = np.zeros(d)

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        nb = x.shape[0]
        with np.errstate(all="ignore"):  # finite readings near 1e308 overflow; drift() reports them clamped
            mb = x.mean(axis=0)
            m2b = ((x - mb) ** 2).sum(axis=0)
            if self.n == 0:
                self.n, self.mean, self.m2 = nb, mb, m2b
                return
            n = self.n + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        if self.n < 2:
            return np.zeros_like(self.mean)
        return np.sqrt(self.m2 / (self.n - 1))

    def drift(self, reference: FeatureStats | None) -> FeatureDrift:
        # The wire carries finite numbers only: overflowed statistics go out as ±max float.
        with np.errstate(all="ignore"):
            score = drift_score(self.mean, reference) if self.n else None
            return FeatureDrift(
                n=self.n,
                mean=tuple(_finite(v) for v in self.mean),
                std=tuple(_finite(v) for v in self.std),
                drift_score=None if score is None else _finite(score),
            )


def drift_score(live_mean: np.ndarray, reference: FeatureStats | None) -> float | None:
    """Largest shift of a feature's live mean, in training standard deviations."""
    if reference is None or len(reference.mean) != len(live_mean):
        return None
    ref_mean = np.asarray(reference.mean)
    ref_std = np.maximum(np.asarray(reference.std), 1e-12)
    return float(np.max(np.abs(live_mean - ref_mean) / ref_std))


@dataclass
class LiveError:
    """Mean absolute error over labelled readings since the active model was switched on."""

    n: int = 0
    abs_sum: float = 0.0

    def update(self, y_pred: np.ndarray, y_true: np.ndarray) -> None:
        ok = np.isfinite(y_true) & np.isfinite(y_pred)
        if ok.any():
            self.n += int(ok.sum())
            with np.errstate(all="ignore"):  # |1e308 - -1e308| overflows; mae reports it clamped
                self.abs_sum += float(np.abs(y_pred[ok] - y_true[ok]).sum())

    @property
    def mae(self) -> float | None:
        return _finite(self.abs_sum / self.n) if self.n else None

    def reset(self) -> None:
        self.n, self.abs_sum = 0, 0.0


def _finite(v: float) -> float:
    """``v`` with NaN as 0 and ±inf as ±max float, for payloads that refuse non-finite numbers."""
    return float(np.nan_to_num(v, nan=0.0, posinf=_FMAX, neginf=-_FMAX))


_FMAX = float(np.finfo(np.float64).max)


@dataclass
class Counters:
    readings: int = 0
    predictions: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
