"""Predictors: scikit-learn cross-checks (compiled numpy and onnxruntime), input checks, NaN policy, loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_models import (
    FEATURES8,
    assert_close,
    export,
    fit_quietly,
    keypair,
    linear_bundle,
    onnx_bundle,
    ort_run,
    regression_data,
)
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, Ridge, SGDRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVR

from runtime.artifacts import load_public_key, read_bundle
from runtime.errors import ArtifactError, InputError, ModelError, SignatureError
from runtime.predictors import LinearPredictor, load_bundle, load_predictor
from runtime.predictors.base import InputSpec
from runtime.protocol import FeatureStats

ESTIMATORS = {
    "LinearRegression": lambda: LinearRegression(),
    "Ridge": lambda: Ridge(alpha=1.0),
    "Lasso": lambda: Lasso(alpha=0.01, max_iter=10000),
    "ElasticNet": lambda: ElasticNet(alpha=0.01, l1_ratio=0.5, max_iter=10000),
    "SGDRegressor": lambda: SGDRegressor(max_iter=2000, tol=1e-6, random_state=0),
    "LinearSVR": lambda: LinearSVR(epsilon=0.0, C=1.0, max_iter=20000, dual="auto"),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return regression_data()


# --------------------------------------------------------------------------- scikit-learn cross-checks


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_sklearn_linear_models_compiled_and_onnxruntime(name, dtype, keys, data, tmp_path):
    X, y = data
    if name in ("SGDRegressor", "LinearSVR"):
        X = (X - X.mean(axis=0)) / X.std(axis=0)  # these need scaled inputs to converge
    est = fit_quietly(ESTIMATORS[name](), X, y)
    onnx_bytes = export(est, X, dtype)
    dt = "float32" if dtype is np.float32 else "float64"
    bundle = onnx_bundle(tmp_path / "b", keys[0], onnx_bytes, FEATURES8, dtype=dt)

    compiled = load_bundle(bundle, keys[1])
    assert compiled.backend.startswith("numpy (compiled from ")
    expected_op = "ai.onnx.ml.LinearRegressor" if dtype is np.float32 else "MatMul+Add"
    assert compiled.backend == f"numpy (compiled from {expected_op})"
    assert compiled.dtype == np.dtype(dtype)
    ort = load_bundle(bundle, keys[1], backend="onnxruntime")
    assert ort.backend == "onnxruntime"

    Xq = X.astype(dtype)
    y_c, y_o, y_sk = compiled.predict(Xq), ort.predict(Xq), est.predict(X)
    assert y_c.dtype == np.float64 and y_c.shape == (X.shape[0],)
    assert_close(y_c, y_o, 1e-5)
    assert_close(y_c, ort_run(onnx_bytes, X), 1e-5)  # onnxruntime without any edgeloop code
    assert_close(y_c, y_sk, 1e-5 if dtype is np.float64 else 5e-5)
    # one row at a time gives the batch's answers
    singles = np.array([compiled.predict(Xq[i : i + 1])[0] for i in range(20)])
    assert_close(singles, y_c[:20], 1e-6)


def test_scaler_pipeline_compiles(keys, data, tmp_path):
    X, y = data
    est = fit_quietly(make_pipeline(StandardScaler(), Ridge(alpha=0.5)), X, y)
    onnx_bytes = export(est, X, np.float32)
    bundle = onnx_bundle(tmp_path / "b", keys[0], onnx_bytes, FEATURES8)
    p = load_bundle(bundle, keys[1])
    assert p.backend == "numpy (compiled from ai.onnx.ml.Scaler+ai.onnx.ml.LinearRegressor)"
    assert_close(p.predict(X), ort_run(onnx_bytes, X), 1e-5)
    assert_close(p.predict(X), est.predict(X), 5e-5)


def test_gradient_boosting_runs_on_onnxruntime(keys, data, tmp_path):
    X, y = data
    est = fit_quietly(GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0), X, y)
    onnx_bytes = export(est, X, np.float32)
    bundle = onnx_bundle(tmp_path / "b", keys[0], onnx_bytes, FEATURES8)
    p = load_bundle(bundle, keys[1], onnx_threads=1)
    assert p.backend == "onnxruntime"
    assert_close(p.predict(X.astype(np.float32)), est.predict(X.astype(np.float32)), 1e-5)
    with pytest.raises(ModelError, match="not linear"):
        load_bundle(bundle, keys[1], backend="numpy")


# --------------------------------------------------------------------------- input checks


def _lin(weights=(1.0, 2.0, -1.0), intercept=0.5, dtype="float64", features=("a", "b", "c"), **kw):
    from runtime.protocol import ModelManifest

    m = ModelManifest(
        name="t",
        version=1,
        kind="linear",
        features=features,
        dtype=dtype,
        weights=tuple(weights),
        intercept=intercept,
        **kw,
    )
    return LinearPredictor(m)


@pytest.fixture(scope="module", params=["numpy", "onnxruntime"])
def abc_predictor(request, tmp_path_factory):
    """y = a + 2b - c + 0.5 on either backend (an ONNX MatMul+Add graph for onnxruntime)."""
    if request.param == "numpy":
        return _lin()
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["t"]), helper.make_node("Add", ["t", "B"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, [None, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, [None, 1])],
        [numpy_helper.from_array(np.array([[1.0], [2.0], [-1.0]]), "W"), numpy_helper.from_array(np.array([0.5]), "B")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    data = model.SerializeToString()
    onnx.checker.check_model(model)
    tmp = tmp_path_factory.mktemp("abc")
    key, pub = keypair(tmp)
    bundle = onnx_bundle(tmp / "b", key, data, ("a", "b", "c"), dtype="float64")
    return load_bundle(bundle, pub, backend="onnxruntime")


def test_predict_values(abc_predictor):
    y = abc_predictor.predict(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(y, [2.5, 0.5])
    assert y.dtype == np.float64
    assert abc_predictor.predict(np.empty((0, 3))).shape == (0,)
    # lists, ints and float32 are accepted and converted
    np.testing.assert_allclose(abc_predictor.predict([[1, 2, 3]]), [2.5])
    np.testing.assert_allclose(abc_predictor.predict(np.array([[1, 2, 3]], dtype=np.float32)), [2.5])


def test_wrong_width(abc_predictor):
    with pytest.raises(InputError, match=r"expected 3 features \(a, b, c\), got 2"):
        abc_predictor.predict(np.zeros((4, 2)))
    with pytest.raises(InputError, match="2-D array"):
        abc_predictor.predict(np.zeros(3))
    with pytest.raises(InputError) as ei:
        abc_predictor.predict([[1, 2, 3], [1, 2]])
    assert ei.value.row == 1


@pytest.mark.parametrize(
    ("X", "row", "column", "match"),
    [
        ([[1.0, 2.0, 3.0], [1.0, np.nan, 3.0]], 1, "b", "NaN"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [np.inf, 0.0, 0.0]], 2, "a", r"\+infinity"),
        ([[1.0, 2.0, -np.inf]], 0, "c", "-infinity"),
        ([[1.0, 2.0, 3.0], [1.0, "x", 3.0]], 1, "b", "'x' is not a number"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0, None]], 1, "c", "NaN"),
        ([[1.0, 2.0, 3.0], [True, 2.0, {}]], 1, "a", "True is not a number"),
    ],
)
def test_bad_values_name_row_and_column(abc_predictor, X, row, column, match):
    with pytest.raises(InputError, match=match) as ei:
        abc_predictor.predict(
            X if any(isinstance(v, str | dict | bool) or v is None for r in X for v in r) else np.array(X)
        )
    assert ei.value.row == row
    assert ei.value.column == column
    assert f"row {row}, column '{column}'" in str(ei.value)


def test_string_array_is_refused(abc_predictor):
    with pytest.raises(InputError, match="not a number"):
        abc_predictor.predict(np.array([["1", "2", "3"]]))
    with pytest.raises(InputError, match="booleans"):
        abc_predictor.predict(np.ones((1, 3), dtype=bool))


def test_float32_range_is_checked():
    p = _lin(dtype="float32")
    with pytest.raises(InputError, match=r"1e\+39 does not fit in the model's float32") as ei:
        p.predict(np.array([[0.0, 0.0, 0.0], [0.0, 1e39, 0.0]]))
    assert (ei.value.row, ei.value.column) == (1, "b")


def test_output_overflow_is_an_error():
    p = _lin(weights=(1e300, 1e300, 0.5))
    with pytest.raises(InputError, match="overflows") as ei:
        p.predict(np.array([[1.0, 1.0, 1.0], [1e10, 1e10, 0.0]]))
    assert ei.value.row == 1


def test_infinities_raise_input_error_without_numpy_warnings():
    """inf - inf inside the dot product makes numpy warn; the caller sees only our InputError."""
    code = (
        "import numpy as np, warnings\n"
        "from runtime.predictors import LinearPredictor\n"
        "from runtime.protocol import ModelManifest\n"
        "from runtime.errors import InputError\n"
        "m = ModelManifest(name='t', version=1, kind='linear', features=('a', 'b'), weights=(1.0, 1.0), intercept=0.0)\n"
        "p = LinearPredictor(m)\n"
        "for X in (np.array([[np.inf, -np.inf]]), np.array([[np.inf, -np.inf]] * 3), np.array([[1e308, 1e308]] * 2)):\n"
        "    try:\n"
        "        p.predict(X)\n"
        "    except InputError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0].startswith("row 0, column 'a': value is +infinity")
    assert lines[1].startswith("row 0, column 'a'")
    assert lines[2].startswith("row 0: the output overflows")


@pytest.mark.parametrize("n", [1, 5])
def test_nan_in_a_zero_weight_column_is_still_refused(n):
    p = _lin(weights=(1.0, 0.0, 2.0))
    X = np.ones((n, 3))
    X[n - 1, 1] = np.nan
    with pytest.raises(InputError) as ei:
        p.predict(X)
    assert (ei.value.row, ei.value.column) == (n - 1, "b")


def test_nan_impute_policy_uses_training_means():
    stats = FeatureStats(mean=(10.0, 20.0, 30.0), std=(1.0, 1.0, 1.0))
    p = _lin(nan_policy="impute", feature_stats=stats)
    X = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan], [1.0, 2.0, 3.0]])
    before = X.copy()
    y = p.predict(X)
    np.testing.assert_allclose(y, [1 + 40 - 3 + 0.5, 10 + 40 - 30 + 0.5, 2.5])
    np.testing.assert_array_equal(np.isnan(X), np.isnan(before))  # the caller's array is not changed
    assert p.predict(np.array([[np.nan, 0.0, 0.0]]))[0] == pytest.approx(10.5)
    with pytest.raises(InputError, match="infinity") as ei:
        p.predict(np.array([[1.0, np.inf, 3.0]]))
    assert ei.value.column == "b"


def test_nan_impute_on_onnxruntime(keys, data, tmp_path):
    X, y = data
    est = fit_quietly(GradientBoostingRegressor(n_estimators=10, random_state=0), X, y)
    onnx_bytes = export(est, X, np.float32)
    mean = X.mean(axis=0)
    stats = FeatureStats(mean=tuple(mean), std=tuple(X.std(axis=0)))
    bundle = onnx_bundle(tmp_path / "b", keys[0], onnx_bytes, FEATURES8, nan_policy="impute", stats=stats)
    p = load_bundle(bundle, keys[1])
    assert p.backend == "onnxruntime"
    row = X[:1].copy()
    row[0, 3] = np.nan
    filled = X[:1].copy()
    filled[0, 3] = mean[3]
    np.testing.assert_allclose(p.predict(row), est.predict(filled.astype(np.float32)), rtol=1e-5)


def test_input_spec_rejects_bad_construction():
    with pytest.raises(ValueError):
        InputSpec(("a",), "int64")
    with pytest.raises(ValueError):
        InputSpec(("a", "b"), "float64", "impute", [1.0])


# --------------------------------------------------------------------------- loading and verification


def test_load_bundle_accepts_key_object_path_and_pem(keys, tmp_path):
    b = linear_bundle(tmp_path / "b", keys[0], [1.0, 2.0], 3.0)
    pem = Path(keys[1]).read_bytes()
    for k in (keys[1], str(keys[1]), pem, load_public_key(keys[1])):
        p = load_bundle(b, k)
        assert p.backend == "numpy"
        assert p.n_features == 2 and p.features == ("x0", "x1")
        np.testing.assert_allclose(p.predict(np.array([[1.0, 1.0]])), [6.0])


def test_float32_linear_manifest(keys, tmp_path):
    b = linear_bundle(tmp_path / "b", keys[0], [0.1, 0.2], 0.3, dtype="float32")
    p = load_bundle(b, keys[1])
    assert p.dtype == np.float32
    X = np.random.default_rng(1).normal(size=(50, 2))
    expect = X.astype(np.float32) @ np.array([0.1, 0.2], dtype=np.float32) + 0.3
    assert_close(p.predict(X), expect, 1e-6)
    with pytest.raises(ModelError, match="no ONNX graph"):
        load_predictor(read_bundle(b), backend="onnxruntime")


def test_wrong_key_and_tampering_refused(keys, data, tmp_path):
    _, other_pub = keypair(tmp_path, "other")
    b = linear_bundle(tmp_path / "lin", keys[0], [1.0, 2.0], 3.0)
    with pytest.raises(SignatureError):
        load_bundle(b, other_pub)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["weights"][1] = 2.5
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SignatureError, match="does not verify"):
        load_bundle(b, keys[1])

    X, y = data
    onnx_bytes = export(fit_quietly(LinearRegression(), X, y), X, np.float32)
    ob = onnx_bundle(tmp_path / "onnx", keys[0], onnx_bytes, FEATURES8)
    raw = bytearray((ob / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (ob / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="sha256"):
        load_bundle(ob, keys[1])


def test_artifact_swapped_after_verification_is_refused(keys, data, tmp_path):
    X, y = data
    onnx_bytes = export(fit_quietly(LinearRegression(), X, y), X, np.float32)
    ob = onnx_bundle(tmp_path / "onnx", keys[0], onnx_bytes, FEATURES8)
    from runtime.artifacts import verify_bundle

    bundle = verify_bundle(ob, load_public_key(keys[1]))
    raw = bytearray(onnx_bytes)
    raw[-5] ^= 0x10
    (ob / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="changed since it was verified"):
        load_predictor(bundle)


def test_unloadable_graph_is_an_artifact_error(keys, tmp_path):
    b = onnx_bundle(tmp_path / "b", keys[0], b"\x08\x07garbage-not-onnx", ("a",))
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        load_bundle(b, keys[1])


def test_onnx_threads_are_configurable(keys, data, tmp_path):
    X, y = data
    onnx_bytes = export(fit_quietly(GradientBoostingRegressor(n_estimators=5), X, y), X, np.float32)
    b = onnx_bundle(tmp_path / "b", keys[0], onnx_bytes, FEATURES8)
    p = load_bundle(b, keys[1], onnx_threads=2)
    assert getattr(p, "threads", None) == 2
    with pytest.raises(ModelError, match=">= 1"):
        load_bundle(b, keys[1], onnx_threads=0)


def test_linear_path_never_imports_onnxruntime(keys, data, tmp_path):
    X, y = data
    onnx_bytes = export(fit_quietly(LinearRegression(), X, y), X, np.float32)
    ob = onnx_bundle(tmp_path / "onnx", keys[0], onnx_bytes, FEATURES8)
    lb = linear_bundle(tmp_path / "lin", keys[0], [1.0, 2.0], 3.0)
    code = (
        "import sys, numpy as np\n"
        "from runtime.predictors import load_bundle\n"
        f"p = load_bundle({str(ob)!r}, {str(keys[1])!r}); p.predict(np.zeros((2, 8)))\n"
        f"q = load_bundle({str(lb)!r}, {str(keys[1])!r}); q.predict(np.zeros((2, 2)))\n"
        "print(p.backend); print('onnxruntime' in sys.modules, 'onnx' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    backend, imported = out.stdout.strip().splitlines()
    assert backend == "numpy (compiled from ai.onnx.ml.LinearRegressor)"
    assert imported == "False False"
