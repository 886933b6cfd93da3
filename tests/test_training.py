"""Least squares from sufficient statistics, evaluation against the champion, training from a real store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from pg import pg_url  # noqa: F401  (fixture)

from cloud.errors import NotEnoughDataError, TrainingError
from cloud.store import Store, Window, open_store
from cloud.training import (
    Metrics,
    SuffStats,
    compare,
    evaluate,
    fit,
    stats_metrics,
    train_from_stats,
    train_from_store,
)
from runtime.protocol import ModelManifest, ResultBatch

FEATS = ("x1", "x2")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path}/cloud.db" if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    s = open_store(url)
    yield s
    s.close()


def lstsq(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    A = np.column_stack([X, np.ones(len(X))])
    beta = np.linalg.lstsq(A, y, rcond=None)[0]
    return beta[:-1], float(beta[-1])


def data(n: int, seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    return X, 3 * X[:, 0] - 2 * X[:, 1] + 5 + rng.normal(0, noise, n)


def ingest_rows(store: Store, device: str, X: np.ndarray, y: np.ndarray, ts0: float = 0.0, per: int = 1000) -> None:
    batches = []
    for i in range(0, len(y), per):
        j = min(i + per, len(y))
        batches.append(
            ResultBatch(
                device=device,
                seq_first=i,
                seq_last=j - 1,
                ts=(ts0 + np.arange(i, j, dtype=np.float64)).tolist(),
                model_version=[1] * (j - i),
                y_pred=[0.0] * (j - i),
                x=X[i:j].tolist(),
                features=FEATS,
                y_true=y[i:j].tolist(),
            )
        )
    store.ingest(batches)


# --------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("d", [1, 2, 5, 12])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_fit_equals_numpy_lstsq(d: int, offset: float) -> None:
    rng = np.random.default_rng(d)
    X = rng.normal(size=(500, d)) * rng.uniform(0.1, 10, size=d) + offset  # uneven scales, far from zero
    y = X @ rng.normal(size=d) + 2.5 + rng.normal(0, 0.3, 500)
    w, b = fit(SuffStats.from_rows(X, y))
    w_ref, b_ref = lstsq(X, y)
    np.testing.assert_allclose(w, w_ref, rtol=1e-11, atol=1e-12)
    assert b == pytest.approx(b_ref, rel=1e-11, abs=1e-9)
    # the same from chunks summed in different frames (as the stores do)
    chunked = SuffStats.from_rows(X[:123], y[:123]) + SuffStats.from_rows(X[123:], y[123:])
    np.testing.assert_allclose(fit(chunked)[0], w_ref, rtol=1e-11, atol=1e-12)


def test_ridge_does_not_penalise_the_intercept() -> None:
    from sklearn.linear_model import Ridge

    X, y = data(300, seed=3)
    X = X + 50.0
    for alpha in (0.1, 10.0, 1000.0):
        w, b = fit(SuffStats.from_rows(X, y), ridge=alpha)
        ref = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(X, y)
        np.testing.assert_allclose(w, ref.coef_, rtol=1e-8)
        assert b == pytest.approx(ref.intercept_, rel=1e-8)
    with pytest.raises(ValueError):
        fit(SuffStats.from_rows(X, y), ridge=-1.0)


def test_fit_degenerate_cases() -> None:
    X, y = data(2)
    with pytest.raises(NotEnoughDataError):
        fit(SuffStats.from_rows(X, y))  # 2 rows, 3 unknowns
    w, _ = fit(SuffStats.from_rows(X, y), ridge=1.0)  # ridge makes it solvable
    assert np.isfinite(w).all()
    # a duplicated column: rank-deficient, solved by minimum norm like lstsq on the centred data
    X3, y3 = data(100, seed=4)
    Xd = np.column_stack([X3, X3[:, 0]])
    w, b = fit(SuffStats.from_rows(Xd, y3))
    assert w[0] + w[2] == pytest.approx(3.0, abs=0.05) and w[0] == pytest.approx(w[2])
    pred = Xd @ w + b
    assert np.abs(pred - y3).mean() < 0.2


def test_suffstats_add_and_messages() -> None:
    X, y = data(90, seed=5)
    parts = [SuffStats.from_rows(X[i : i + 30], y[i : i + 30], ts=np.arange(i, i + 30.0)) for i in range(0, 90, 30)]
    total = parts[0] + parts[1] + parts[2]  # three frames (each part's own mean), re-expressed exactly
    whole = SuffStats.from_rows(X, y)
    np.testing.assert_allclose(total.reshifted(whole.shift).xtx, whole.xtx, rtol=1e-12, atol=1e-9)
    raw = SuffStats.from_rows(X, y, shift=np.zeros(2))
    np.testing.assert_allclose(whole.reshifted(None).xtx, raw.xtx, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(fit(total)[0], lstsq(X, y)[0], rtol=1e-10)
    assert total.n == 90 and total.window == (0.0, 89.0)
    msg = total.to_message("dev-1", FEATS, seq=4, model="m")
    back = SuffStats.from_message(msg)
    assert back.shift is None  # the wire carries raw sums
    np.testing.assert_allclose(back.xtx, total.reshifted(None).xtx, rtol=1e-12, atol=1e-9)
    # reordered and reduced to the features a model asks for
    swapped = SuffStats.from_message(msg, ("x2", "x1"))
    np.testing.assert_allclose(fit(swapped)[0][::-1], fit(total)[0], rtol=1e-10)
    only = SuffStats.from_message(msg, ("x2",))
    np.testing.assert_allclose(fit(only)[0], lstsq(X[:, [1]], y)[0], rtol=1e-9)
    with pytest.raises(TrainingError):
        SuffStats.from_message(msg, ("x3",))
    bad = msg.model_copy(update={"n": 91})  # xtx[d][d] says 90
    with pytest.raises(TrainingError):
        SuffStats.from_message(bad)
    mean, std = whole.feature_mean_std()
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, X.std(axis=0, ddof=1), rtol=1e-8)


def test_metrics_and_compare() -> None:
    X, y = data(200, seed=6)
    w, b = fit(SuffStats.from_rows(X, y))
    m = evaluate(w, b, X, y)
    err = y - (X @ w + b)
    assert m.mae == pytest.approx(np.abs(err).mean())
    assert m.rmse == pytest.approx(np.sqrt((err**2).mean()))
    assert m.r2 == pytest.approx(1 - (err**2).sum() / ((y - y.mean()) ** 2).sum())
    closed = stats_metrics(SuffStats.from_rows(X, y), w, b)
    assert closed.mae is None and closed.rmse == pytest.approx(m.rmse, rel=1e-8) and closed.r2 == pytest.approx(m.r2)
    assert evaluate(w, b, X, np.full(200, 1.0)).r2 is None  # constant labels: R² undefined

    good, bad = Metrics(0.10, 0.2, 0.9, 50), Metrics(0.20, 0.3, 0.8, 50)
    assert compare(good, None, 0.05).accept
    assert compare(good, bad, 0.05).accept and compare(good, bad, 0.05).improvement == pytest.approx(0.5)
    assert not compare(bad, good, 0.0).accept
    assert not compare(Metrics(0.099, 0.2, 0.9, 50), good, 0.05).accept  # 1% better, 5% needed
    assert compare(Metrics(None, 0.1, 0.9, 5), Metrics(None, 0.2, 0.9, 5), 0.1, metric="rmse").accept
    assert not compare(None, good, 0.0).accept


# --------------------------------------------------------------------------- from a store


def test_recovers_coefficients_and_matches_lstsq_from_store(store: Store) -> None:
    X, y = data(6000, seed=7)
    ingest_rows(store, f"d-{uuid.uuid4().hex[:6]}", X[:3000], y[:3000], ts0=0.0)
    ingest_rows(store, f"d-{uuid.uuid4().hex[:6]}", X[3000:], y[3000:], ts0=0.5)
    res = train_from_store(store, "m", FEATS, holdout_rows=600)
    assert res.n_train == 5400 and res.n_holdout == 600
    np.testing.assert_allclose(res.weights, [3.0, -2.0], atol=0.05)
    assert res.intercept == pytest.approx(5.0, abs=0.05)
    # the fit equals lstsq on exactly the training rows: all but the newest 600 by ts
    ts = np.concatenate([np.arange(3000.0), np.arange(3000.0) + 0.5])
    order = np.argsort(ts, kind="stable")
    train_idx = order[:-600]
    w_ref, b_ref = lstsq(X[train_idx], y[train_idx])
    np.testing.assert_allclose(res.weights, w_ref, rtol=1e-9)
    assert res.intercept == pytest.approx(b_ref, rel=1e-9)
    hold_idx = order[-600:]
    ref = evaluate(w_ref, b_ref, X[hold_idx], y[hold_idx])
    assert res.holdout is not None and res.holdout.mae == pytest.approx(ref.mae, rel=1e-9)
    assert res.window == (0.0, float(ts[train_idx].max()))
    assert res.decision.accept and res.champion is None
    m = res.manifest(1, created_at=1.0)
    assert isinstance(m, ModelManifest) and m.training.n_rows == 5400 and m.metrics["mae"] == res.holdout.mae
    assert m.feature_stats is not None
    np.testing.assert_allclose(m.feature_stats.mean, X[train_idx].mean(axis=0), rtol=1e-9)
    # a window restricts the rows
    part = train_from_store(store, "m", FEATS, Window(0.0, 1000.0), holdout_fraction=0.1)
    assert part.n_train + part.n_holdout == 2000


def test_candidate_is_compared_with_champion_on_the_same_rows(store: Store) -> None:
    X, y = data(3000, seed=8)
    ingest_rows(store, f"d-{uuid.uuid4().hex[:6]}", X, y)
    name = f"m{uuid.uuid4().hex[:6]}"
    w_bad, b_bad = fit(SuffStats.from_rows(X, -y))  # trained on corrupted labels
    first = train_from_store(store, name, FEATS, holdout_rows=500)
    store.add_model_version(first.manifest(1).model_copy(update={"weights": tuple(w_bad), "intercept": b_bad}))
    store.set_champion(name, 1)
    res = train_from_store(store, name, FEATS, holdout_rows=500, margin=0.1)
    assert res.champion_version == 1 and res.champion is not None and res.holdout is not None
    assert res.champion.n == res.holdout.n == 500
    assert res.decision.accept and res.champion.mae > 5 * res.holdout.mae
    store.add_model_version(res.manifest(2))
    store.set_champion(name, 2)
    again = train_from_store(store, name, FEATS, holdout_rows=500, margin=0.01)
    assert not again.decision.accept  # the same data cannot beat itself by 1%
    assert again.champion is not None and again.champion.mae == pytest.approx(again.holdout.mae)  # type: ignore[union-attr]
    assert again.manifest(3).training.parent_version == 2
    with pytest.raises(NotEnoughDataError):
        train_from_store(store, "m", ("nope",))


def test_stats_only_training_equals_raw_training(store: Store) -> None:
    X, y = data(4000, seed=9)
    devices = [f"d-{uuid.uuid4().hex[:6]}" for _ in range(4)]
    messages = []
    for k, d in enumerate(devices):  # each device sums its own rows; the rows never leave it
        rows = slice(k * 1000, (k + 1) * 1000)
        names = FEATS[::-1] if k % 2 else FEATS  # half of them list the features the other way round
        cols = [FEATS.index(f) for f in names]
        s = SuffStats.from_rows(X[rows][:, cols], y[rows], ts=np.arange(k * 1000.0, (k + 1) * 1000.0))
        messages.append(s.to_message(d, names, model="stats-m"))
    store.ingest(stats=messages)
    res = train_from_stats(store, "stats-m", FEATS, stats_model="stats-m", holdout_fraction=0.0)
    w_ref, b_ref = lstsq(X, y)
    np.testing.assert_allclose(res.weights, w_ref, rtol=1e-9)
    assert res.intercept == pytest.approx(b_ref, rel=1e-9)
    assert res.n_train == 4000 and res.source == "stats"
    # with the same rows stored raw, training from rows gives the same coefficients
    for k, d in enumerate(devices):
        ingest_rows(store, d, X[k * 1000 : (k + 1) * 1000], y[k * 1000 : (k + 1) * 1000], ts0=k * 1000.0)
    raw = train_from_store(store, "raw-m", FEATS, holdout_rows=0)
    np.testing.assert_allclose(raw.weights, res.weights, rtol=1e-9)
    assert raw.intercept == pytest.approx(res.intercept, rel=1e-9)
    # with a holdout, the newest device's statistics are held out and used for the comparison
    held = train_from_stats(store, "stats-m", FEATS, stats_model="stats-m", holdout_fraction=0.3)
    assert (held.n_train, held.n_holdout) == (3000, 1000)
    assert held.holdout is not None and held.holdout.mae is None and held.holdout.rmse < 0.12


def test_onnx_champion_needs_a_predictor(store: Store) -> None:
    from runtime.protocol import ArtifactRef

    X, y = data(1000, seed=10)
    ingest_rows(store, f"d-{uuid.uuid4().hex[:6]}", X, y)
    name = f"m{uuid.uuid4().hex[:6]}"
    onnx = ModelManifest(
        name=name,
        version=1,
        model_kind="onnx",
        features=FEATS,
        artifact=ArtifactRef(size=10, sha256="0" * 64),
    )
    store.add_model_version(onnx)
    store.set_champion(name, 1)
    res = train_from_store(store, name, FEATS, holdout_rows=100)
    assert not res.decision.accept and "onnx" in res.decision.reason and res.champion is None

    seen: list[int] = []

    def predict(manifest: ModelManifest, Xc: np.ndarray) -> np.ndarray:  # a champion that predicts the mean
        assert manifest.version == 1 and Xc.shape[1] == 2
        seen.append(len(Xc))
        return np.full(len(Xc), float(y.mean()))

    res = train_from_store(store, name, FEATS, holdout_rows=100, champion_predict=predict, margin=0.5)
    assert sum(seen) == 100 and res.champion is not None and res.champion.n == 100
    assert res.decision.accept and res.decision.improvement is not None and res.decision.improvement > 0.9
