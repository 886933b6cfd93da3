"""Simulated sensors with ground truth, and the scenarios that break them.

A sensor draws feature vectors, computes the true target ``y = x·w + b + noise`` with the
scenario's coefficients at that time, labels a share of the readings, and applies the
scenario's faults (a sudden change of coefficients, gradual drift, a stuck sensor, NaN bursts).
Network outages are part of the scenario too; the simulated device carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SCENARIOS", "Scenario", "Sensor", "make_scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str = "steady"
    #: Seconds after start when the coefficients jump to ``weights * change_factor + change_shift``.
    change_at: float | None = None
    change_factor: float = 1.0
    change_shift: tuple[float, ...] = ()
    #: Per-second relative drift of the coefficients (gradual drift).
    drift_rate: float = 0.0
    #: (start, end) seconds when feature 0 sticks at its last value.
    stuck: tuple[float, float] | None = None
    #: (start, end) seconds when a share of feature values are NaN.
    nan_burst: tuple[float, float] | None = None
    nan_share: float = 0.2
    #: (start, end) seconds when the device's network link is cut.
    outages: tuple[tuple[float, float], ...] = ()


SCENARIOS = ("steady", "drift", "sudden", "gradual", "stuck", "nan", "outage")


def make_scenario(name: str, duration: float = 180.0) -> Scenario:
    """Named scenarios, timed relative to a run of ``duration`` seconds."""
    if name == "steady":
        return Scenario("steady")
    if name in ("drift", "sudden"):
        return Scenario(name, change_at=duration * 0.3, change_factor=1.0, change_shift=(1.5, -1.0, 0.8))
    if name == "gradual":
        return Scenario(name, drift_rate=0.5 / max(duration, 1.0))
    if name == "stuck":
        return Scenario(name, stuck=(duration * 0.3, duration * 0.6))
    if name == "nan":
        return Scenario(name, nan_burst=(duration * 0.3, duration * 0.4))
    if name == "outage":
        return Scenario(name, outages=((duration * 0.3, duration * 0.5),))
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


@dataclass
class Sensor:
    """Draws readings for one device. ``t`` is seconds since the run started."""

    weights: np.ndarray
    intercept: float
    noise: float = 0.1
    label_share: float = 0.5
    scenario: Scenario = field(default_factory=Scenario)
    seed: int = 0
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.rng = np.random.default_rng(self.seed)
        d = self.weights.shape[0]
        if self.feature_mean is None:
            self.feature_mean = np.zeros(d)
        if self.feature_std is None:
            self.feature_std = np.ones(d)
        self._last = np.array(self.feature_mean, dtype=np.float64)

    @property
    def d(self) -> int:
        return int(self.weights.shape[0])

    def coefficients(self, t: float) -> tuple[np.ndarray, float]:
        s = self.scenario
        w = self.weights.copy()
        b = self.intercept
        if s.drift_rate:
            w = w * (1.0 + s.drift_rate * t)
        if s.change_at is not None and t >= s.change_at:
            shift = np.zeros(self.d)
            k = min(len(s.change_shift), self.d)
            shift[:k] = s.change_shift[:k]
            w = w * s.change_factor + shift
        return w, b

    def in_outage(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.scenario.outages)

    def sample(self, t: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` readings at time ``t``: features (n, d) and y_true (NaN where unlabelled)."""
        assert self.feature_mean is not None and self.feature_std is not None
        X = self.rng.normal(self.feature_mean, self.feature_std, size=(n, self.d))
        w, b = self.coefficients(t)
        y = X @ w + b + self.rng.normal(0.0, self.noise, size=n)
        s = self.scenario
        if s.stuck is not None and s.stuck[0] <= t < s.stuck[1]:
            X[:, 0] = self._last[0]
        else:
            self._last = X[-1].copy() if n else self._last
        if s.nan_burst is not None and s.nan_burst[0] <= t < s.nan_burst[1]:
            X[self.rng.random((n, self.d)) < s.nan_share] = np.nan
        labelled = self.rng.random(n) < self.label_share
        y_true = np.where(labelled, y, np.nan)
        return X, y_true
