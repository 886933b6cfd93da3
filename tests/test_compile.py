"""The stdlib ONNX reader (checked against the onnx package), the linear-graph compiler (checked
against onnxruntime to 1e-5), and ONNX inspection errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_models import assert_close, export, fit_quietly, ort_run, regression_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from runtime.errors import ArtifactError
from runtime.predictors.compile import NotLinear, compile_linear, inspect_onnx, parse_model

D = 4
RNG = np.random.default_rng(7)
W4 = RNG.normal(size=(D, 1))
B1 = np.array([0.75])
X4 = RNG.normal(size=(64, D)) * 3


def graph(nodes, inits, *, elem=TensorProto.FLOAT, in_shape=(None, D), out_shape=(None, 1), opset=13, extra_outputs=()):
    np_dt = np.float32 if elem == TensorProto.FLOAT else np.float64
    tensors = [
        numpy_helper.from_array(np.asarray(v, dtype=np_dt if np.asarray(v).dtype.kind == "f" else None), k)
        for k, v in inits.items()
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", elem, list(in_shape))],
        [helper.make_tensor_value_info("Y", elem, list(out_shape) if out_shape is not None else None), *extra_outputs],
        tensors,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    return model.SerializeToString()


def check_compiles(data: bytes, source: str, d: int = D, X: np.ndarray = X4) -> None:
    info = inspect_onnx(data, d)
    assert info.compiled is not None, info.not_linear
    assert info.compiled.source == source
    c = info.compiled
    dt = np.float32 if c.dtype == "float32" else np.float64
    y = (X.astype(dt) @ c.weights.astype(dt)).astype(np.float64) + c.intercept
    assert_close(y, ort_run(data, X), 1e-5)


def check_not_linear(data: bytes, reason: str, d: int = D) -> None:
    info = inspect_onnx(data, d)
    assert info.compiled is None
    assert info.backend == "onnxruntime"
    assert reason in (info.not_linear or ""), info.not_linear
    ort_run(data, X4[:, :d])  # onnxruntime still runs it


# --------------------------------------------------------------------------- hand-built linear graphs


@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.DOUBLE], ids=["float", "double"])
def test_matmul_add(elem):
    data = graph(
        [helper.make_node("MatMul", ["X", "W"], ["t"]), helper.make_node("Add", ["t", "B"], ["Y"])],
        {"W": W4, "B": B1},
        elem=elem,
    )
    check_compiles(data, "MatMul+Add")
    assert inspect_onnx(data, D).compiled.dtype == ("float32" if elem == TensorProto.FLOAT else "float64")


def test_add_constant_first_and_1d_weights():
    data = graph(
        [
            helper.make_node("MatMul", ["X", "w"], ["t"]),  # [n, 4] @ [4] → [n]
            helper.make_node("Add", ["B", "t"], ["u"]),
            helper.make_node("Unsqueeze", ["u", "axes"], ["Y"]),
        ],
        {"w": W4[:, 0], "B": np.float32(2.0), "axes": np.array([1], dtype=np.int64)},
    )
    check_compiles(data, "MatMul+Add")


@pytest.mark.parametrize(
    ("alpha", "beta", "trans_b", "c_shape"),
    [(1.0, 1.0, 0, (1,)), (0.5, 2.0, 1, (1,)), (2.0, 0.25, 1, (1, 1)), (1.5, 1.0, 0, ()), (1.0, 1.0, 1, None)],
)
def test_gemm(alpha, beta, trans_b, c_shape):
    B = W4.T if trans_b else W4
    inputs = ["X", "B"] + (["C"] if c_shape is not None else [])
    inits = {"B": B}
    if c_shape is not None:
        inits["C"] = np.full(c_shape, 0.3)
    node = helper.make_node("Gemm", inputs, ["Y"], alpha=alpha, beta=beta, transB=trans_b)
    check_compiles(graph([node], inits, opset=13), "Gemm")


def test_two_layer_linear_network_with_shape_ops():
    """Gemm → Gemm (no activation) through Identity, Cast, Flatten, Reshape and Squeeze/Unsqueeze."""
    W1 = RNG.normal(size=(D, 6))
    W2 = RNG.normal(size=(6, 1))
    nodes = [
        helper.make_node("Identity", ["X"], ["x0"]),
        helper.make_node("Cast", ["x0"], ["x1"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x1"], ["x2"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["x2", "W1", "C1"], ["h"]),
        helper.make_node("Flatten", ["h"], ["h2"], axis=1),
        helper.make_node("Reshape", ["h2", "shape"], ["h3"]),
        helper.make_node("Gemm", ["h3", "W2", "C2"], ["o"], alpha=0.5),
        helper.make_node("Squeeze", ["o", "sq"], ["o1"]),
        helper.make_node("Unsqueeze", ["o1", "sq"], ["Y"]),
    ]
    inits = {
        "W1": W1,
        "C1": RNG.normal(size=6),
        "W2": W2,
        "C2": np.array([0.1]),
        "shape": np.array([-1, 6], dtype=np.int64),
        "sq": np.array([1], dtype=np.int64),
    }
    check_compiles(graph(nodes, inits), "Gemm+Gemm")


def test_elementwise_with_constants_and_constant_node():
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W4.astype(np.float32))),
        helper.make_node("Sub", ["X", "mu"], ["a"]),
        helper.make_node("Div", ["a", "sd"], ["b"]),
        helper.make_node("Mul", ["k", "b"], ["c"]),
        helper.make_node("MatMul", ["c", "W"], ["d"]),
        helper.make_node("Neg", ["d"], ["e"]),
        helper.make_node("Sub", ["one", "e"], ["Y"]),
    ]
    inits = {
        "mu": RNG.normal(size=D),
        "sd": RNG.uniform(0.5, 2, size=(1, D)),
        "k": np.float32(3.0),
        "one": np.float32(1.0),
    }
    check_compiles(graph(nodes, inits), "Sub+Div+Mul+MatMul+Neg+Sub")


def test_opset11_squeeze_with_axes_attribute_and_reshape_to_vector():
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["t"]),
        helper.make_node("Squeeze", ["t"], ["s"], axes=[1]),
        helper.make_node("Unsqueeze", ["s"], ["u"], axes=[-1]),
        helper.make_node("Reshape", ["u", "shape"], ["Y"]),
    ]
    data = graph(nodes, {"W": W4, "shape": np.array([-1], dtype=np.int64)}, opset=11, out_shape=(None,))
    check_compiles(data, "MatMul")


def test_linear_regressor_with_unpacked_and_packed_attributes():
    node = helper.make_node(
        "LinearRegressor", ["X"], ["Y"], domain="ai.onnx.ml", coefficients=W4[:, 0].tolist(), intercepts=[1.5]
    )
    check_compiles(graph([node], {}), "ai.onnx.ml.LinearRegressor")


def test_sklearn_scaler_pipeline_double():
    X, y = regression_data(d=D)
    est = fit_quietly(make_pipeline(StandardScaler(), LinearRegression()), X, y)
    data = export(est, X, np.float64)
    info = inspect_onnx(data, D)
    assert info.compiled is not None, info.not_linear
    check_compiles(data, info.compiled.source, X=X)


# --------------------------------------------------------------------------- not linear → onnxruntime


def test_relu_is_not_linear():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["t"]), helper.make_node("Relu", ["t"], ["Y"])]
    check_not_linear(graph(nodes, {"W": W4}), "op Relu is not linear")


def test_product_of_two_input_terms_is_not_linear():
    nodes = [helper.make_node("Mul", ["X", "X"], ["sq"]), helper.make_node("MatMul", ["sq", "W"], ["Y"])]
    check_not_linear(graph(nodes, {"W": W4}), "Mul")


def test_reshape_that_mixes_rows_is_not_linear():
    nodes = [helper.make_node("Reshape", ["X", "s"], ["r"]), helper.make_node("ReduceSum", ["r"], ["Y"], keepdims=1)]
    data = graph(nodes, {"s": np.array([1, -1], dtype=np.int64)}, out_shape=(1, 1))
    info = inspect_onnx(data, D)
    assert info.compiled is None and "Reshape" in (info.not_linear or "")


def test_constant_times_input_is_not_compiled():
    nodes = [helper.make_node("MatMul", ["Wt", "X"], ["Y"])]
    data = graph(nodes, {"Wt": np.ones((1, 3))}, in_shape=(3, None), out_shape=(1, None))
    with pytest.raises(ArtifactError, match="fixed batch size"):
        inspect_onnx(data, D)
    with pytest.raises(NotLinear):
        compile_linear(parse_model(data), 3)


@pytest.mark.parametrize("factory", ["forest", "mlp"])
def test_sklearn_nonlinear_models_are_not_compiled(factory):
    X, y = regression_data(n=120, d=D)
    est = (
        RandomForestRegressor(n_estimators=5, max_depth=3, random_state=0)
        if factory == "forest"
        else make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(5,), max_iter=50, random_state=0))
    )
    data = export(fit_quietly(est, X, y), X, np.float32)
    info = inspect_onnx(data, D)
    assert info.compiled is None
    assert "is not linear" in (info.not_linear or "")


# --------------------------------------------------------------------------- inspection errors


def test_inspect_refuses_models_edgeloop_cannot_feed():
    ok = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
    with pytest.raises(ArtifactError, match="4 wide but 3 features"):
        inspect_onnx(graph(ok, {"W": W4}), 3)
    with pytest.raises(ArtifactError, match=r"tensor\(int64\)"):
        inspect_onnx(graph([helper.make_node("Cast", ["X"], ["Y"], to=1)], {}, elem=TensorProto.INT64), D)
    with pytest.raises(ArtifactError, match="shape"):
        inspect_onnx(graph(ok, {"W": W4}, in_shape=(None, 2, D)), D)
    two_in = helper.make_graph(
        [helper.make_node("Add", ["X", "Z"], ["Y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, D]) for n in ("X", "Z")],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, D])],
    )
    with pytest.raises(ArtifactError, match="2 inputs"):
        inspect_onnx(helper.make_model(two_in).SerializeToString(), D)
    extra = [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None, 1])]
    data = graph([*ok, helper.make_node("Identity", ["Y"], ["Z"])], {"W": W4}, extra_outputs=extra)
    with pytest.raises(ArtifactError, match="2 outputs"):
        inspect_onnx(data, D)
    with pytest.raises(ArtifactError, match="one value per row"):
        inspect_onnx(graph([helper.make_node("Identity", ["X"], ["Y"])], {}, out_shape=(None, D)), D)


def test_inspect_refuses_classifier_output():
    g = helper.make_graph(
        [helper.make_node("ArgMax", ["X"], ["Y"], axis=1)],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, D])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, [None, 1])],
    )
    with pytest.raises(ArtifactError, match="classifier"):
        inspect_onnx(helper.make_model(g).SerializeToString(), D)


def test_inspect_refuses_external_data():
    t = numpy_helper.from_array(W4.astype(np.float32), "W")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, D])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
        [t],
    )
    with pytest.raises(ArtifactError, match="external data"):
        inspect_onnx(helper.make_model(g).SerializeToString(), D)


@pytest.mark.parametrize("blob", [b"", b"\xff\xff\xff", b"hello world", b"\x3a\x05abc", b"\x08\x96\x01"])
def test_garbage_is_an_artifact_error(blob):
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        inspect_onnx(blob, D)


# --------------------------------------------------------------------------- the reader against onnx


def _models() -> list[bytes]:
    X, y = regression_data(n=80, d=D)
    return [
        export(fit_quietly(LinearRegression(), X, y), X, np.float32),
        export(fit_quietly(LinearRegression(), X, y), X, np.float64),
        export(fit_quietly(RandomForestRegressor(n_estimators=3, max_depth=3, random_state=0), X, y), X, np.float32),
        graph([helper.make_node("Gemm", ["X", "B"], ["Y"], alpha=0.5, transB=1)], {"B": W4.T}),
    ]


@pytest.mark.parametrize("index", range(4))
def test_reader_agrees_with_onnx_package(index):
    import onnx

    data = _models()[index]
    ref = onnx.load_from_string(data)
    m = parse_model(data)
    assert m.ir_version == ref.ir_version
    assert m.opsets == {o.domain: o.version for o in ref.opset_import}
    assert [n.op_type for n in m.graph.nodes] == [n.op_type for n in ref.graph.node]
    assert [n.domain for n in m.graph.nodes] == [n.domain for n in ref.graph.node]
    assert [list(n.inputs) for n in m.graph.nodes] == [list(n.input) for n in ref.graph.node]
    assert [list(n.outputs) for n in m.graph.nodes] == [list(n.output) for n in ref.graph.node]
    for node, rnode in zip(m.graph.nodes, ref.graph.node, strict=True):
        attrs = node.attrs()
        for a in rnode.attribute:
            want = helper.get_attribute_value(a)
            got = attrs[a.name]
            if isinstance(want, bytes) or (isinstance(want, list) and want and isinstance(want[0], bytes)):
                assert got == want
            else:
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    from runtime.predictors.compile import _tensor

    for init in ref.graph.initializer:
        np.testing.assert_array_equal(_tensor(m.graph.initializers[init.name]), numpy_helper.to_array(init))
    for mine, theirs in ((m.graph.inputs, ref.graph.input), (m.graph.outputs, ref.graph.output)):
        for vi, rvi in zip(mine, theirs, strict=True):
            assert vi.name == rvi.name
            assert vi.elem_type == rvi.type.tensor_type.elem_type
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in rvi.type.tensor_type.shape.dim
            ]
            assert list(vi.shape or ()) == dims


def test_tensor_encodings_float_data_int64_data_and_negative_dims():
    import onnx

    t1 = helper.make_tensor("a", TensorProto.FLOAT, [2, 2], [1.0, -2.5, 3.0, 4.0], raw=False)
    t2 = helper.make_tensor("b", TensorProto.INT64, [2], [-1, 7], raw=False)
    t3 = helper.make_tensor("c", TensorProto.DOUBLE, [3], [0.1, 0.2, 0.3], raw=False)
    t4 = helper.make_tensor("d", TensorProto.FLOAT16, [2], np.array([1.5, -2.0], dtype=np.float16), raw=False)
    g = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 1])],
        [t1, t2, t3, t4],
    )
    data = helper.make_model(g).SerializeToString()
    m = parse_model(data)
    from runtime.predictors.compile import _tensor

    for t in (t1, t2, t3, t4):
        np.testing.assert_array_equal(_tensor(m.graph.initializers[t.name]), numpy_helper.to_array(t))
    assert m.graph.inputs[0].shape == ("batch", 1)
    onnx.checker.check_model(onnx.load_from_string(data))
    assert inspect_onnx(data, 1).compiled is not None  # identity of one feature is y = x


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_reader_raises_only_artifact_error_on_random_bytes(blob):
    try:
        info = inspect_onnx(blob, D)
    except ArtifactError:
        return
    assert info.dtype in ("float32", "float64")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_reader_raises_only_artifact_error_on_corrupted_models(data):
    blob = bytearray(_CORPUS[data.draw(st.integers(0, len(_CORPUS) - 1))])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    try:
        inspect_onnx(bytes(blob[:cut]), D)
    except ArtifactError:
        pass


_CORPUS = [
    graph(
        [helper.make_node("MatMul", ["X", "W"], ["t"]), helper.make_node("Add", ["t", "B"], ["Y"])], {"W": W4, "B": B1}
    ),
    graph([helper.make_node("LinearRegressor", ["X"], ["Y"], domain="ai.onnx.ml", coefficients=[1.0] * D)], {}),
]


def test_tensor_shape_that_does_not_match_its_data_is_refused():
    for dims in ([2**40, 2**40], [3, 2]):
        t = helper.make_tensor("W", TensorProto.FLOAT, [1, 1], [1.0], raw=False)
        del t.dims[:]
        t.dims.extend(dims)
        g = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])],
            "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, D])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
            [t],
        )
        with pytest.raises(ArtifactError, match="initializer 'W'"):
            inspect_onnx(helper.make_model(g).SerializeToString(), D)
