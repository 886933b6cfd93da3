"""Least squares from sufficient statistics: fit, evaluate on the newest held-out rows, compare, decide.

Pure numpy; the only I/O is through the :class:`cloud.store.Store` API. Statistics summed from
devices' ``stats`` messages, from SQL aggregates or from chunked numpy give the same fit, because a
fit needs only ``XᵀX``, ``Xᵀy``, ``yᵀy`` and ``n`` of the augmented design ``[x, 1]``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cloud.errors import NotEnoughDataError, TrainingError
from runtime.protocol import FeatureStats, ModelManifest, SufficientStats, TrainingInfo

if TYPE_CHECKING:
    from cloud.store import Store, Window

__all__ = [
    "Decision",
    "Metrics",
    "MetricsAccumulator",
    "Predict",
    "SuffStats",
    "TrainResult",
    "compare",
    "evaluate",
    "fit",
    "stats_metrics",
    "train_from_stats",
    "train_from_store",
]

logger = logging.getLogger(__name__)

Predict = Callable[[ModelManifest, np.ndarray], np.ndarray]
"""Predictions of a (non-linear) champion on rows in its feature order; for ONNX champions."""


# --------------------------------------------------------------------------- sufficient statistics


@dataclass(frozen=True)
class SuffStats:
    """Sufficient statistics of labelled rows over the augmented design ``A = [x - shift, 1]``.

    ``xtx = AᵀA`` (d+1, d+1) — so ``xtx[d, d] == n`` and its last row holds the (shifted) feature
    sums; ``xty = Aᵀy`` (d+1,); ``yty = yᵀy``; ``window`` the (min, max) timestamp of the rows.
    With ``shift`` None (zero) this is exactly :class:`runtime.protocol.SufficientStats`. A shift
    near the features' mean keeps the sums small, so centring in :func:`fit` loses no digits when
    features sit far from zero; :meth:`from_rows` shifts by the rows' mean, and sums in different
    frames are re-expressed exactly before they are added.
    """

    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    n: int
    window: tuple[float, float] | None = None
    shift: np.ndarray | None = None

    def __post_init__(self) -> None:
        k = self.xtx.shape[0]
        if k < 2 or self.xtx.shape != (k, k) or self.xty.shape != (k,):
            raise ValueError(f"xtx must be (d+1, d+1) and xty (d+1,), got {self.xtx.shape} and {self.xty.shape}")
        if self.shift is not None and self.shift.shape != (k - 1,):
            raise ValueError(f"shift must be ({k - 1},), got {self.shift.shape}")

    @property
    def d(self) -> int:
        return int(self.xtx.shape[0]) - 1

    @property
    def origin(self) -> np.ndarray:
        """The shift as an array (zeros when there is none)."""
        return np.zeros(self.d) if self.shift is None else self.shift

    @classmethod
    def zeros(cls, d: int) -> SuffStats:
        return cls(np.zeros((d + 1, d + 1)), np.zeros(d + 1), 0.0, 0)

    @classmethod
    def from_rows(
        cls, X: np.ndarray, y: np.ndarray, ts: np.ndarray | None = None, shift: np.ndarray | None = None
    ) -> SuffStats:
        """Statistics of the rows ``X`` (n, d) and ``y`` (n,) (all finite), shifted by ``shift``
        (default: the rows' column means)."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (n, d) and y (n,), got {X.shape} and {y.shape}")
        n, d = X.shape
        if shift is None:
            shift = X.mean(axis=0) if n else np.zeros(d)
        A = np.empty((n, d + 1))
        A[:, :d] = X - shift
        A[:, d] = 1.0
        window = (float(ts.min()), float(ts.max())) if ts is not None and len(ts) else None
        return cls(A.T @ A, A.T @ y, float(y @ y), n, window, np.asarray(shift, dtype=np.float64))

    @classmethod
    def from_message(cls, msg: SufficientStats, features: Sequence[str] | None = None) -> SuffStats:
        """A device's ``stats`` message, reduced/reordered to ``features`` (default: its own order).

        Raises TrainingError when the message lacks a feature or is internally inconsistent
        (``xtx[d][d] != n``, asymmetric ``xtx``, negative squares) — such a message is not usable.
        """
        own = list(msg.features)
        xtx = np.asarray(msg.xtx, dtype=np.float64)
        xty = np.asarray(msg.xty, dtype=np.float64)
        d0 = len(own)
        scale = max(1.0, float(np.abs(xtx).max(initial=0.0)))
        if (
            abs(xtx[d0, d0] - msg.n) > 1e-9 * max(1, msg.n)
            or not np.allclose(xtx, xtx.T, rtol=1e-9, atol=1e-12 * scale)
            or (np.diag(xtx) < -1e-12 * scale).any()
            or msg.yty < 0
        ):
            raise TrainingError(f"stats message {msg.device}#{msg.seq} is inconsistent")
        stats = cls(xtx, xty, float(msg.yty), int(msg.n), (msg.window_start, msg.window_end))
        if features is None:
            return stats
        missing = [f for f in features if f not in own]
        if missing:
            raise TrainingError(f"stats message {msg.device}#{msg.seq} lacks features {missing}")
        return stats.select([own.index(f) for f in features])

    def reshifted(self, shift: np.ndarray | None) -> SuffStats:
        """The same statistics over ``[x - shift, 1]`` (exact algebra on the sums)."""
        new = np.zeros(self.d) if shift is None else np.asarray(shift, dtype=np.float64)
        delta = self.origin - new  # x - new = (x - old) + delta
        if not delta.any():
            return SuffStats(self.xtx, self.xty, self.yty, self.n, self.window, shift)
        d, n = self.d, self.n
        s = self.xtx[d, :d]
        xtx = self.xtx.copy()
        xtx[:d, :d] += np.outer(delta, s) + np.outer(s, delta) + n * np.outer(delta, delta)
        xtx[d, :d] = xtx[:d, d] = s + n * delta
        xty = self.xty.copy()
        xty[:d] += delta * self.xty[d]
        return SuffStats(xtx, xty, self.yty, n, self.window, shift)

    def to_message(
        self, device: str, features: Sequence[str], *, seq: int = 0, model: str | None = None
    ) -> SufficientStats:
        """The wire message of these statistics (unshifted: what a device sends when it shares stats only)."""
        if len(features) != self.d:
            raise ValueError(f"{len(features)} feature names for {self.d} features")
        raw = self.reshifted(None)
        start, end = self.window if self.window is not None else (0.0, 0.0)
        return SufficientStats(
            device=device,
            seq=seq,
            model=model,
            features=tuple(features),
            window_start=start,
            window_end=end,
            n=raw.n,
            xtx=raw.xtx.tolist(),
            xty=raw.xty.tolist(),
            yty=raw.yty,
        )

    def __add__(self, other: SuffStats) -> SuffStats:
        if other.d != self.d:
            raise ValueError(f"cannot add statistics of {self.d} and {other.d} features")
        if self.n == 0 and self.window is None:
            return other
        if other.n == 0 and other.window is None:
            return self
        o = other if np.array_equal(other.origin, self.origin) else other.reshifted(self.shift)
        windows = [w for w in (self.window, other.window) if w is not None]
        window = (min(w[0] for w in windows), max(w[1] for w in windows)) if windows else None
        return SuffStats(self.xtx + o.xtx, self.xty + o.xty, self.yty + o.yty, self.n + o.n, window, self.shift)

    def select(self, columns: Sequence[int]) -> SuffStats:
        """The statistics of a subset or reordering of the features (by index)."""
        idx = [*columns, self.d]
        shift = None if self.shift is None else self.shift[list(columns)]
        return SuffStats(self.xtx[np.ix_(idx, idx)], self.xty[idx], self.yty, self.n, self.window, shift)

    def feature_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and sample standard deviation (the manifest's ``feature_stats``)."""
        d, n = self.d, self.n
        if n == 0:
            return np.zeros(d), np.zeros(d)
        mz = self.xtx[d, :d] / n
        ss = np.diag(self.xtx)[:d] - self.xtx[d, :d] * mz
        std = np.sqrt(np.clip(ss, 0.0, None) / max(n - 1, 1))
        return self.origin + mz, std


# --------------------------------------------------------------------------- fit


def fit(stats: SuffStats, ridge: float = 0.0) -> tuple[np.ndarray, float]:
    """Ordinary least squares (``ridge=0``) or ridge regression; the intercept is not penalised.

    Solved on the centred normal equations, which the augmented sums give without another pass
    (``Σ(x-x̄)(x-x̄)ᵀ = XᵀX - n x̄x̄ᵀ``), scaled to unit diagonal; ``solve`` when well conditioned,
    ``lstsq`` (minimum norm) otherwise. Centring removes the intercept's coupling, which is what
    makes the raw ``[x, 1]`` normal equations ill-conditioned when features sit far from zero.
    """
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError("ridge must be a finite number >= 0")
    d, n = stats.d, stats.n
    needed = d + 1 if ridge == 0 else 1
    if n < needed:
        raise NotEnoughDataError(n, needed)
    sx = stats.xtx[d, :d]  # sums of x - shift: little cancels below when the shift is near the mean
    mx = sx / n
    my = stats.xty[d] / n
    C = stats.xtx[:d, :d] - np.outer(sx, mx)
    C = (C + C.T) / 2.0
    c = stats.xty[:d] - sx * my
    if ridge:
        C = C + ridge * np.eye(d)
    diag = np.clip(np.diag(C), 0.0, None)
    scale = np.sqrt(diag)
    scale[scale <= 1e-12 * max(float(scale.max(initial=0.0)), 1e-300)] = 1.0  # constant features
    A = C / np.outer(scale, scale)
    r = c / scale
    z: np.ndarray | None = None
    if np.isfinite(A).all() and np.linalg.cond(A) < 1e10:
        try:
            z = np.linalg.solve(A, r)
        except np.linalg.LinAlgError:
            z = None
    if z is None:
        z = np.linalg.lstsq(A, r, rcond=None)[0]
    w = z / scale
    b = float(my - (mx + stats.origin) @ w)
    if not (np.isfinite(w).all() and math.isfinite(b)):
        raise TrainingError("the fit is not finite (degenerate data)")
    return w, b


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metrics:
    """Error of a model on some rows. ``mae`` is None when only statistics were available;
    ``r2`` is None when the labels are constant."""

    mae: float | None
    rmse: float
    r2: float | None
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}rmse": self.rmse, f"{prefix}n": float(self.n)}
        if self.mae is not None:
            out[f"{prefix}mae"] = self.mae
        if self.r2 is not None:
            out[f"{prefix}r2"] = self.r2
        return {k: v for k, v in out.items() if math.isfinite(v)}


class MetricsAccumulator:
    """MAE, RMSE and R² over rows given a chunk at a time."""

    def __init__(self) -> None:
        self.n = 0
        self.abs = 0.0
        self.sq = 0.0
        self.sy = 0.0
        self.syy = 0.0

    def add(self, y: np.ndarray, pred: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        err = y - np.asarray(pred, dtype=np.float64)
        self.n += int(y.shape[0])
        self.abs += float(np.abs(err).sum())
        self.sq += float(err @ err)
        self.sy += float(y.sum())
        self.syy += float(y @ y)

    def result(self) -> Metrics:
        if self.n == 0:
            raise NotEnoughDataError(0, 1, what="rows to evaluate on")
        sst = self.syy - self.sy * self.sy / self.n
        r2 = 1.0 - self.sq / sst if sst > 1e-12 * max(self.syy, 1e-300) else None
        return Metrics(self.abs / self.n, math.sqrt(self.sq / self.n), r2, self.n)


def evaluate(weights: np.ndarray, intercept: float, X: np.ndarray, y: np.ndarray) -> Metrics:
    """MAE, RMSE, R² and n of the linear model on rows ``X``, ``y``."""
    acc = MetricsAccumulator()
    acc.add(y, np.asarray(X, dtype=np.float64) @ np.asarray(weights, dtype=np.float64) + intercept)
    return acc.result()


def stats_metrics(stats: SuffStats, weights: np.ndarray, intercept: float) -> Metrics:
    """RMSE and R² of a linear model on the rows behind ``stats``, in closed form (no MAE)."""
    if stats.n == 0:
        raise NotEnoughDataError(0, 1, what="rows to evaluate on")
    w = np.asarray(weights, dtype=np.float64)
    beta = np.append(w, intercept + stats.origin @ w)  # the same model over [x - shift, 1]
    sse = max(stats.yty - 2.0 * beta @ stats.xty + beta @ stats.xtx @ beta, 0.0)
    sy = stats.xty[stats.d]
    sst = stats.yty - sy * sy / stats.n
    r2 = 1.0 - sse / sst if sst > 1e-12 * max(stats.yty, 1e-300) else None
    return Metrics(None, math.sqrt(sse / stats.n), r2, stats.n)


@dataclass(frozen=True)
class Decision:
    """Whether to register the candidate: better than the champion by ``margin`` (relative) in ``metric``."""

    accept: bool
    reason: str
    metric: str
    candidate: float | None
    champion: float | None
    improvement: float | None


def compare(candidate: Metrics | None, champion: Metrics | None, margin: float, metric: str = "mae") -> Decision:
    """Accept when ``(champion - candidate) / champion >= margin`` in ``metric`` (``mae`` or ``rmse``),
    both measured on the same rows; accept without a champion; reject without candidate metrics."""
    if metric not in ("mae", "rmse"):
        raise ValueError("metric must be mae or rmse")
    if not 0.0 <= margin < 1.0:
        raise ValueError("margin must be within [0, 1)")
    cand = getattr(candidate, metric) if candidate is not None else None
    if champion is None:
        return Decision(True, "no champion to beat", metric, cand, None, None)
    champ = getattr(champion, metric)
    if cand is None or champ is None:
        return Decision(False, f"no held-out {metric} to compare with the champion", metric, cand, champ, None)
    if champ <= 0.0:
        return Decision(False, f"the champion's {metric} is already 0", metric, cand, champ, None)
    improvement = (champ - cand) / champ
    if improvement >= margin:
        reason = f"{metric} {cand:.6g} vs champion {champ:.6g}: {improvement:.1%} better (margin {margin:.1%})"
        return Decision(True, reason, metric, cand, champ, improvement)
    reason = f"{metric} {cand:.6g} vs champion {champ:.6g}: {improvement:.1%} better, margin {margin:.1%} not met"
    return Decision(False, reason, metric, cand, champ, improvement)


# --------------------------------------------------------------------------- training runs


@dataclass(frozen=True)
class TrainResult:
    """A candidate model and how it compares with the champion on the same newest held-out data."""

    model: str
    features: tuple[str, ...]
    weights: np.ndarray
    intercept: float
    ridge: float
    source: str  # "rows" or "stats"
    n_train: int
    n_holdout: int
    window: tuple[float, float] | None  # (min, max) ts of the training rows
    train: Metrics
    holdout: Metrics | None
    champion: Metrics | None
    champion_version: int | None
    feature_mean: np.ndarray
    feature_std: np.ndarray
    decision: Decision
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """The manifest's metrics: held-out ``mae``/``rmse``/``r2`` (when any), ``train_*``, counts."""
        out = self.train.as_dict("train_")
        if self.holdout is not None:
            out.update(self.holdout.as_dict())
        out["n_train"] = float(self.n_train)
        out["n_holdout"] = float(self.n_holdout)
        return out

    def manifest(self, version: int, *, created_at: float | None = None) -> ModelManifest:
        """An unsigned linear manifest of the candidate (the registry signs and stores it)."""
        start, end = self.window if self.window is not None else (None, None)
        return ModelManifest(
            name=self.model,
            version=version,
            model_kind="linear",
            features=self.features,
            created_at=time.time() if created_at is None else created_at,
            training=TrainingInfo(
                source="rows" if self.source == "rows" else "stats",
                window_start=start,
                window_end=end,
                n_rows=self.n_train,
                parent_version=self.champion_version,
                ridge=self.ridge,
            ),
            metrics=self.metrics,
            feature_stats=FeatureStats(mean=tuple(self.feature_mean.tolist()), std=tuple(self.feature_std.tolist())),
            weights=tuple(float(w) for w in self.weights),
            intercept=float(self.intercept),
        )


def _linear_predict(manifest: ModelManifest, X: np.ndarray) -> np.ndarray:
    assert manifest.weights is not None and manifest.intercept is not None
    return X @ np.asarray(manifest.weights, dtype=np.float64) + manifest.intercept


def train_from_store(
    store: Store,
    model: str,
    features: Sequence[str],
    window: Window | None = None,
    *,
    holdout_fraction: float = 0.1,
    holdout_rows: int | None = None,
    ridge: float = 0.0,
    margin: float = 0.0,
    champion_predict: Predict | None = None,
) -> TrainResult:
    """Fit ``model`` on the stored labelled rows in ``window``, holding out the newest ones.

    The newest ``holdout_rows`` (default ``holdout_fraction`` of the rows) by ``(ts, device, seq)``
    are held out; the fit uses the statistics of the rest, computed by the store where the data
    lives. Candidate and current champion are evaluated on the same held-out rows (those that
    also carry every feature the champion uses); ``decision`` says whether the candidate beats
    the champion's MAE by ``margin``. A linear champion is evaluated here; any other needs
    ``champion_predict``, else the candidate is not accepted over it.
    """
    from cloud.store import Window

    started = time.perf_counter()
    window = window or Window()
    feats = tuple(features)
    d = len(feats)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be within [0, 1)")
    total = store.count_labelled(feats, window)
    n_hold = holdout_rows if holdout_rows is not None else round(total * holdout_fraction)
    if n_hold < 0:
        raise ValueError("holdout_rows must be >= 0")
    needed = (d + 1 if ridge == 0 else 1) + n_hold
    if total < needed:
        raise NotEnoughDataError(total, needed, model=model)
    cutoff = store.newest_cutoff(feats, n_hold, window) if n_hold else None
    stats = store.sufficient_stats(feats, window, before=cutoff)
    if stats.n < needed - n_hold:  # rows arrived or vanished between the calls
        raise NotEnoughDataError(stats.n, needed - n_hold, model=model)
    w, b = fit(stats, ridge)
    train = stats_metrics(stats, w, b)
    mean, std = stats.feature_mean_std()

    notes: list[str] = []
    champ_rec = store.get_champion(model)
    champ = champ_rec.manifest if champ_rec is not None else None
    predict: Predict | None = None
    if champ is not None:
        if champ.model_kind == "linear":
            predict = _linear_predict
        elif champion_predict is not None:
            predict = champion_predict
        else:
            notes.append(f"champion {champ.version} is {champ.model_kind}; no predictor given to evaluate it")
    holdout = champion = None
    n_holdout = 0
    if cutoff is not None:
        extra = tuple(f for f in champ.features if f not in feats) if champ is not None and predict else ()
        cols = feats + extra
        champ_idx = [cols.index(f) for f in champ.features] if champ is not None and predict else []
        acc_c, acc_p = MetricsAccumulator(), MetricsAccumulator()
        for chunk in store.labelled_rows(cols, window, since=cutoff):
            acc_c.add(chunk.y, chunk.X[:, :d] @ w + b)
            if predict is not None and champ is not None:
                acc_p.add(chunk.y, predict(champ, chunk.X[:, champ_idx]))
        n_holdout = acc_c.n
        if n_holdout:
            holdout = acc_c.result()
            if acc_p.n:
                champion = acc_p.result()
        if extra:
            notes.append(f"held-out rows restricted to those with the champion's features {list(extra)}")
    if champ is not None and predict is None:
        decision = Decision(False, notes[-1], "mae", holdout.mae if holdout else None, None, None)
    else:
        decision = compare(holdout, champion if champ is not None else None, margin)
    result = TrainResult(
        model=model,
        features=feats,
        weights=w,
        intercept=b,
        ridge=ridge,
        source="rows",
        n_train=stats.n,
        n_holdout=n_holdout,
        window=stats.window,
        train=train,
        holdout=holdout,
        champion=champion,
        champion_version=champ.version if champ is not None else None,
        feature_mean=mean,
        feature_std=std,
        decision=decision,
        seconds=time.perf_counter() - started,
        notes=notes,
    )
    logger.info(
        "trained %s on %d rows (%d held out) in %.2f s: %s",
        model,
        result.n_train,
        result.n_holdout,
        result.seconds,
        decision.reason,
    )
    return result


def train_from_stats(
    store: Store,
    model: str,
    features: Sequence[str],
    window: Window | None = None,
    *,
    stats_model: str | None = None,
    holdout_fraction: float = 0.2,
    ridge: float = 0.0,
    margin: float = 0.0,
) -> TrainResult:
    """Fit ``model`` from the devices' ``stats`` messages only (their raw rows never left them).

    Messages (optionally only those naming ``stats_model``) are summed after reordering to
    ``features``; unusable ones are skipped with a note. The newest messages (by window end)
    holding about ``holdout_fraction`` of the rows are held out; candidate and a linear champion
    are compared by RMSE on them (statistics give no MAE).
    """
    from cloud.store import Window

    started = time.perf_counter()
    feats = tuple(features)
    d = len(feats)
    notes: list[str] = []
    usable: list[SuffStats] = []
    for msg in store.stats_messages(stats_model, window or Window()):
        try:
            usable.append(SuffStats.from_message(msg, feats))
        except TrainingError as exc:
            notes.append(str(exc))
    total = sum(s.n for s in usable)
    hold = SuffStats.zeros(d)
    train = SuffStats.zeros(d)
    # The newest messages go to the holdout while it stays within its share; the oldest never does.
    filling = len(usable) > 1
    for i, s in enumerate(reversed(usable)):
        if filling and i < len(usable) - 1 and hold.n + s.n <= holdout_fraction * total:
            hold = hold + s
        else:
            filling = False
            train = train + s
    needed = d + 1 if ridge == 0 else 1
    if train.n < needed:
        raise NotEnoughDataError(train.n, needed, model=model, what="rows in stats messages")
    w, b = fit(train, ridge)
    mean, std = train.feature_mean_std()
    holdout = stats_metrics(hold, w, b) if hold.n else None
    champ_rec = store.get_champion(model)
    champ = champ_rec.manifest if champ_rec is not None else None
    champion = None
    if champ is not None and hold.n:
        if champ.model_kind == "linear" and set(champ.features) <= set(feats):
            sub = hold.select([feats.index(f) for f in champ.features])
            assert champ.weights is not None and champ.intercept is not None
            champion = stats_metrics(sub, np.asarray(champ.weights), champ.intercept)
        else:
            notes.append(f"champion {champ.version} cannot be evaluated on these statistics")
    if champ is not None and champion is None:
        reason = notes[-1] if notes else "no held-out statistics to compare with the champion"
        decision = Decision(False, reason, "rmse", holdout.rmse if holdout else None, None, None)
    else:
        decision = compare(holdout, champion, margin, metric="rmse")
    return TrainResult(
        model=model,
        features=feats,
        weights=w,
        intercept=b,
        ridge=ridge,
        source="stats",
        n_train=train.n,
        n_holdout=hold.n,
        window=train.window,
        train=stats_metrics(train, w, b),
        holdout=holdout,
        champion=champion,
        champion_version=champ.version if champ is not None else None,
        feature_mean=mean,
        feature_std=std,
        decision=decision,
        seconds=time.perf_counter() - started,
        notes=notes,
    )
