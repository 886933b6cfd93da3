"""ONNX inspection, and ONNX graphs that compute a linear function compiled to numpy weights.

The ONNX file is read with a small protobuf reader written on the standard library (only the
fields of ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto and ValueInfoProto that
are needed here), so a device that has no ``onnx`` package still compiles linear graphs and never
loads onnxruntime for them. Nothing in a model is executed by the reader.

Compilation walks the graph once, keeping every tensor either as a constant or as an affine
function of the input, ``X @ W + c`` (W: [d, m], folded in float64). Understood:
``ai.onnx.ml.LinearRegressor`` and ``ai.onnx.ml.Scaler``; ``MatMul``, ``Gemm`` (alpha, beta, transB),
``Add``, ``Sub``, ``Mul``, ``Div``, ``Neg`` with constants; and the shape-only ``Reshape``,
``Flatten``, ``Cast`` (to float or double), ``Identity``, ``Dropout``, ``Squeeze``, ``Unsqueeze``,
``Constant``. Anything else (trees, activations, ...) is "not linear" and runs on onnxruntime.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from runtime.errors import ArtifactError

__all__ = [
    "CompiledLinear",
    "Graph",
    "Node",
    "NotLinear",
    "OnnxInfo",
    "OnnxModel",
    "ValueInfo",
    "compile_linear",
    "inspect_onnx",
    "parse_model",
]

logger = logging.getLogger(__name__)

# TensorProto.DataType → numpy dtype (little-endian, as ONNX stores raw_data)
_TENSOR_DTYPES: dict[int, str] = {
    1: "<f4",
    2: "u1",
    3: "i1",
    4: "<u2",
    5: "<i2",
    6: "<i4",
    7: "<i8",
    9: "?",
    10: "<f2",
    11: "<f8",
    12: "<u4",
    13: "<u8",
}
_ELEM_NAMES = {
    1: "float",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "double",
}
_FLOAT_ELEMS: dict[int, Literal["float32", "float64"]] = {1: "float32", 11: "float64"}
_ML = "ai.onnx.ml"
_MAX_TENSOR_VALUES = 1 << 31
_OPS = frozenset(
    {"Constant", "Identity", "Dropout", "Cast", "Flatten", "Reshape", "Squeeze", "Unsqueeze"}
    | {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg"}
)
_ML_OPS = frozenset({"LinearRegressor", "Scaler"})


class _Malformed(ValueError):
    pass


# --------------------------------------------------------------------------- protobuf wire format

Field = tuple[int, int | memoryview]  # (wire type, value)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint too long")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: memoryview) -> dict[int, list[Field]]:
    """Split one message into ``{field number: [(wire type, value), ...]}`` (values not decoded)."""
    out: dict[int, list[Field]] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if fno == 0:
            raise _Malformed("field number 0")
        value: int | memoryview
        if wt == 0:
            value, pos = _varint(buf, pos)
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Malformed("truncated length-delimited field")
            value, pos = buf[pos : pos + n], pos + n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            if pos + n > end:
                raise _Malformed("truncated fixed-width field")
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise _Malformed(f"unsupported wire type {wt}")
        out.setdefault(fno, []).append((wt, value))
    return out


def _bytes(f: dict[int, list[Field]], no: int) -> memoryview | None:
    entries = f.get(no)
    if not entries:
        return None
    wt, v = entries[-1]  # proto semantics: the last value of a singular field wins
    if wt != 2 or not isinstance(v, memoryview):
        raise _Malformed(f"field {no} is not length-delimited")
    return v


def _str(f: dict[int, list[Field]], no: int, default: str = "") -> str:
    v = _bytes(f, no)
    if v is None:
        return default
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"field {no} is not UTF-8") from None


def _strs(f: dict[int, list[Field]], no: int) -> tuple[str, ...]:
    out = []
    for wt, v in f.get(no, ()):
        if wt != 2 or not isinstance(v, memoryview):
            raise _Malformed(f"field {no} is not a string")
        try:
            out.append(bytes(v).decode("utf-8"))
        except UnicodeDecodeError:
            raise _Malformed(f"field {no} is not UTF-8") from None
    return tuple(out)


def _ints(f: dict[int, list[Field]], no: int) -> list[int]:
    """A repeated int64 field, packed or not."""
    out: list[int] = []
    for wt, v in f.get(no, ()):
        if wt == 0 and isinstance(v, int):
            out.append(_signed(v))
        elif wt == 2 and isinstance(v, memoryview):
            pos = 0
            while pos < len(v):
                x, pos = _varint(v, pos)
                out.append(_signed(x))
        else:
            raise _Malformed(f"field {no} is not an integer")
    return out


def _int(f: dict[int, list[Field]], no: int, default: int | None = None) -> int | None:
    vals = _ints(f, no)
    return vals[-1] if vals else default


def _reals(f: dict[int, list[Field]], no: int, double: bool) -> np.ndarray:
    """A repeated float (fixed32) or double (fixed64) field, packed or not."""
    fixed_wt, dt = (1, "<f8") if double else (5, "<f4")
    parts: list[np.ndarray] = []
    for wt, v in f.get(no, ()):
        if not isinstance(v, memoryview):
            raise _Malformed(f"field {no} is not a float")
        if wt == 2 and len(v) % np.dtype(dt).itemsize:
            raise _Malformed(f"packed field {no} has a ragged length")
        if wt not in (2, fixed_wt):
            raise _Malformed(f"field {no} is not a float")
        parts.append(np.frombuffer(v, dtype=dt))
    if not parts:
        return np.empty(0, dtype=dt)
    return np.concatenate(parts).astype(dt[1:], copy=True)


# --------------------------------------------------------------------------- ONNX messages


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: name, element type (TensorProto.DataType) and shape."""

    name: str
    elem_type: int | None  # None: not a tensor, or no type given
    shape: tuple[int | str | None, ...] | None  # dims: int, symbolic name, or None (unknown)
    kind: str = "tensor"

    @property
    def type_name(self) -> str:
        if self.kind != "tensor":
            return self.kind
        return f"tensor({_ELEM_NAMES.get(self.elem_type or 0, f'type {self.elem_type}')})"


@dataclass(frozen=True)
class Node:
    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attr_raw: tuple[memoryview, ...] = field(repr=False)

    @property
    def qualified(self) -> str:
        return self.op_type if self.domain in ("", "ai.onnx") else f"{self.domain}.{self.op_type}"

    def attrs(self) -> dict[str, Any]:
        """Decode the attributes (floats/ints/strings/tensors; graphs and others as ``_Opaque``)."""
        out: dict[str, Any] = {}
        for raw in self.attr_raw:
            name, value = _attribute(raw)
            out[name] = value
        return out


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    initializers: dict[str, memoryview]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]

    @property
    def feed_inputs(self) -> tuple[ValueInfo, ...]:
        """Inputs the caller must feed (IR < 4 also lists initializers among the inputs)."""
        return tuple(i for i in self.inputs if i.name not in self.initializers)


@dataclass(frozen=True)
class OnnxModel:
    ir_version: int
    opsets: dict[str, int]
    producer: str
    graph: Graph


@dataclass(frozen=True)
class _Opaque:
    type: int


def _value_info(buf: memoryview) -> ValueInfo:
    f = _fields(buf)
    name = _str(f, 1)
    tbuf = _bytes(f, 2)
    if tbuf is None:
        return ValueInfo(name, None, None)
    tp = _fields(tbuf)
    tensor = _bytes(tp, 1)
    if tensor is None:
        kinds = {4: "sequence", 5: "map", 7: "opaque", 8: "sparse_tensor", 9: "optional"}
        kind = next((k for no, k in kinds.items() if no in tp), "unknown")
        return ValueInfo(name, None, None, kind)
    tt = _fields(tensor)
    elem = _int(tt, 1)
    sbuf = _bytes(tt, 2)
    shape: tuple[int | str | None, ...] | None = None
    if sbuf is not None:
        dims: list[int | str | None] = []
        for wt, dim in _fields(sbuf).get(1, ()):
            if wt != 2 or not isinstance(dim, memoryview):
                raise _Malformed("bad shape dimension")
            df = _fields(dim)
            if 1 in df:
                dims.append(_int(df, 1))
            elif 2 in df:
                dims.append(_str(df, 2) or None)
            else:
                dims.append(None)
        shape = tuple(dims)
    return ValueInfo(name, elem, shape)


def _node(buf: memoryview) -> Node:
    f = _fields(buf)
    attrs = []
    for wt, v in f.get(5, ()):
        if wt != 2 or not isinstance(v, memoryview):
            raise _Malformed("bad node attribute")
        attrs.append(v)
    return Node(
        op_type=_str(f, 4),
        domain=_str(f, 7),
        name=_str(f, 3),
        inputs=_strs(f, 1),
        outputs=_strs(f, 2),
        attr_raw=tuple(attrs),
    )


def _tensor(buf: memoryview) -> np.ndarray:
    f = _fields(buf)
    if _int(f, 14, 0) == 1:
        raise NotLinear("a tensor is stored as external data")
    dims = _ints(f, 1)
    if any(d < 0 for d in dims):
        raise _Malformed("negative tensor dimension")
    size = math.prod(dims)  # Python ints: a crafted shape cannot overflow into a small size
    if size > _MAX_TENSOR_VALUES:
        raise _Malformed(f"tensor of shape {dims[:8]} is too large")
    dtype_code = _int(f, 2, 0) or 0
    dt = _TENSOR_DTYPES.get(dtype_code)
    if dt is None:
        raise NotLinear(f"tensor of unsupported type {_ELEM_NAMES.get(dtype_code, dtype_code)}")
    raw = _bytes(f, 9)
    if raw is not None:
        if len(raw) != size * np.dtype(dt).itemsize:
            raise _Malformed("raw_data length does not match the tensor's shape")
        arr = np.frombuffer(raw, dtype=dt).copy()
    elif dtype_code == 1:
        arr = _reals(f, 4, double=False)
    elif dtype_code == 11:
        arr = _reals(f, 10, double=True)
    elif dtype_code == 7:
        arr = np.array(_ints(f, 7), dtype=np.int64)
    elif dtype_code in (12, 13):
        arr = np.array([v & 0xFFFFFFFFFFFFFFFF for v in _ints(f, 11)], dtype=np.uint64).astype(dt)
    elif dtype_code == 10:
        arr = np.array(_ints(f, 5), dtype=np.int64).astype(np.uint16).view(np.float16)
    else:
        arr = np.array(_ints(f, 5), dtype=np.int64).astype(dt)
    if arr.size != size:
        raise _Malformed(f"tensor holds {arr.size} values for shape {dims}")
    return arr.astype(np.dtype(dt).newbyteorder("="), copy=False).reshape(dims)


def _attribute(buf: memoryview) -> tuple[str, Any]:
    f = _fields(buf)
    name = _str(f, 1)
    atype = _int(f, 20, 0) or 0
    if atype == 0:  # very old files omit the type: infer it from the field present
        atype = next((t for no, t in ((2, 1), (3, 2), (4, 3), (5, 4), (7, 6), (8, 7), (9, 8)) if no in f), 0)
    if atype == 1:
        b = _bytes_fixed(f, 2, 4)
        return name, struct.unpack("<f", b)[0] if b is not None else 0.0
    if atype == 2:
        return name, _int(f, 3, 0)
    if atype == 3:
        s = _bytes(f, 4)
        return name, bytes(s) if s is not None else b""
    if atype == 4:
        t = _bytes(f, 5)
        if t is None:
            raise _Malformed(f"attribute {name} has no tensor")
        return name, _tensor(t)
    if atype == 6:
        return name, _reals(f, 7, double=False)
    if atype == 7:
        return name, _ints(f, 8)
    if atype == 8:
        return name, [bytes(v) for _, v in f.get(9, ()) if isinstance(v, memoryview)]
    return name, _Opaque(atype)


def _bytes_fixed(f: dict[int, list[Field]], no: int, size: int) -> bytes | None:
    entries = f.get(no)
    if not entries:
        return None
    _, v = entries[-1]
    if not isinstance(v, memoryview) or len(v) != size:
        raise _Malformed(f"field {no} is not a fixed{size * 8}")
    return bytes(v)


def parse_model(data: bytes | bytearray | memoryview) -> OnnxModel:
    """Parse an ONNX ModelProto; ArtifactError when it is not one."""
    try:
        mv = memoryview(data).cast("B")
        f = _fields(mv)
        gbuf = _bytes(f, 7)
        if gbuf is None:
            raise _Malformed("no graph")
        opsets: dict[str, int] = {}
        for wt, v in f.get(8, ()):
            if wt != 2 or not isinstance(v, memoryview):
                raise _Malformed("bad opset_import")
            of = _fields(v)
            opsets[_str(of, 1)] = _int(of, 2, 0) or 0
        g = _fields(gbuf)
        nodes = tuple(_node(v) for wt, v in g.get(1, ()) if wt == 2 and isinstance(v, memoryview))
        inits: dict[str, memoryview] = {}
        for wt, v in g.get(5, ()):
            if wt != 2 or not isinstance(v, memoryview):
                raise _Malformed("bad initializer")
            inits[_str(_fields(v), 8)] = v
        inputs = tuple(_value_info(v) for wt, v in g.get(11, ()) if isinstance(v, memoryview))
        outputs = tuple(_value_info(v) for wt, v in g.get(12, ()) if isinstance(v, memoryview))
        if not outputs:
            raise _Malformed("graph has no outputs")
        return OnnxModel(
            ir_version=_int(f, 1, 0) or 0,
            opsets=opsets,
            producer=_str(f, 2),
            graph=Graph(nodes, inits, inputs, outputs),
        )
    except (_Malformed, NotLinear) as exc:
        raise ArtifactError(f"not a valid ONNX model ({exc})") from None
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise ArtifactError(f"not a valid ONNX model ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- compilation


class NotLinear(Exception):
    """The graph does not (provably) compute ``X @ w + b``; the reason says which node."""


@dataclass(frozen=True)
class CompiledLinear:
    weights: np.ndarray  # [d] float64 (already rounded to dtype)
    intercept: float
    dtype: Literal["float32", "float64"]  # the dtype the graph computes in
    ops: tuple[str, ...]  # the graph's arithmetic ops, in order

    @property
    def source(self) -> str:
        return "+".join(self.ops) if self.ops else "Identity"


@dataclass
class _Affine:
    """A tensor equal to ``X @ W + c``: shape [n, m] (rank 2) or [n] (rank 1, m == 1)."""

    W: np.ndarray
    c: np.ndarray
    rank: int
    dtype: str

    @property
    def m(self) -> int:
        return int(self.W.shape[1])


_Value = _Affine | np.ndarray


def _vector(const: np.ndarray, a: _Affine, what: str) -> np.ndarray:
    """A constant that broadcasts against ``a`` along its feature axis only, as a [k] vector."""
    if const.dtype.kind not in "fiu":
        raise NotLinear(f"{what}: constant of type {const.dtype}")
    if const.ndim > a.rank:
        raise NotLinear(f"{what}: constant of shape {const.shape} changes the rank")
    if a.rank == 2 and const.ndim == 2 and const.shape[0] != 1:
        raise NotLinear(f"{what}: constant of shape {const.shape} depends on the batch size")
    v = np.asarray(const, dtype=np.float64).reshape(-1)
    if a.rank == 1 and v.size != 1:
        raise NotLinear(f"{what}: constant of shape {const.shape} against a [n] vector")
    if v.size not in (1, a.m) and a.m != 1:
        raise NotLinear(f"{what}: constant of {v.size} values against width {a.m}")
    return v


def _widen(a: _Affine, k: int) -> _Affine:
    if k == a.m:
        return a
    return _Affine(np.repeat(a.W, k, axis=1), np.repeat(a.c, k), 2, a.dtype)


def _axes(node: Node, attrs: dict[str, Any], env: dict[str, _Value]) -> list[int] | None:
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1]:
        v = env.get(node.inputs[1])
        if not isinstance(v, np.ndarray):
            raise NotLinear(f"{node.op_type}: axes are not constant")
        return [int(x) for x in v.reshape(-1)]
    return None


class _Compiler:
    def __init__(self, model: OnnxModel, n_features: int) -> None:
        self.model = model
        self.graph = model.graph
        self.d = n_features
        self.ops: list[str] = []
        self.compute: str | None = None

    def const(self, name: str) -> np.ndarray:
        raw = self.graph.initializers[name]
        try:
            return _tensor(raw)
        except _Malformed as exc:
            raise ArtifactError(f"not a valid ONNX model (initializer {name!r}: {exc})") from None

    def run(self) -> CompiledLinear:
        g = self.graph
        feeds = g.feed_inputs
        if len(feeds) != 1 or len(g.outputs) != 1:
            raise NotLinear("the graph does not have exactly one input and one output")
        x = feeds[0]
        dtype = _FLOAT_ELEMS.get(x.elem_type or 0)
        if dtype is None:
            raise NotLinear(f"input is {x.type_name}")
        env: dict[str, _Value] = {x.name: _Affine(np.eye(self.d), np.zeros(self.d), 2, dtype)}
        for node in g.nodes:
            for out, value in zip(node.outputs, self.step(node, env), strict=False):
                if out:
                    env[out] = value
        y = env.get(g.outputs[0].name)
        if y is None and g.outputs[0].name in g.initializers:
            raise NotLinear("the output is a constant")
        if not isinstance(y, _Affine):
            raise NotLinear("the output does not depend on the input")
        if y.m != 1:
            raise NotLinear(f"the output has {y.m} columns, not one per row")
        final = self.compute or y.dtype
        w = y.W[:, 0].astype(final).astype(np.float64)
        return CompiledLinear(w, float(y.c[0]), final, tuple(self.ops))  # type: ignore[arg-type]

    def value(self, env: dict[str, _Value], name: str) -> _Value:
        if name in env:
            return env[name]
        if name in self.graph.initializers:
            env[name] = self.const(name)
            return env[name]
        raise NotLinear(f"tensor {name!r} is not defined before use")

    def mixing(self, a: _Affine, op: str) -> None:
        self.ops.append(op)
        if self.compute is None:
            self.compute = a.dtype

    def step(self, node: Node, env: dict[str, _Value]) -> list[_Value]:
        op, dom = node.op_type, node.domain
        # decide on the op before decoding attributes: a tree ensemble's are large
        if op not in (_ML_OPS if dom == _ML else _OPS if dom in ("", "ai.onnx") else ()):
            raise NotLinear(f"op {node.qualified} is not linear")
        attrs = node.attrs() if node.attr_raw else {}
        if any(isinstance(v, _Opaque) for v in attrs.values()):
            raise NotLinear(f"{node.qualified} has a subgraph or unsupported attribute")
        args = [self.value(env, i) if i else None for i in node.inputs]
        if dom == _ML:
            return self.ml(node, attrs, args)
        if op == "Constant":
            return [self.constant(attrs)]
        a = args[0] if args else None
        if not isinstance(a, _Affine) and op not in ("Add", "Sub", "Mul"):
            if all(isinstance(v, np.ndarray) or v is None for v in args):
                raise NotLinear(f"{op} on constants only (constant folding is not supported)")
            raise NotLinear(f"{op}: first operand is not the input's affine image")
        if op in ("Identity", "Dropout"):
            assert isinstance(a, _Affine)
            return [a]
        if op == "Cast":
            assert isinstance(a, _Affine)
            to = _FLOAT_ELEMS.get(int(attrs.get("to", 0)))
            if to is None:
                raise NotLinear(f"Cast to {_ELEM_NAMES.get(int(attrs.get('to', 0)), attrs.get('to'))}")
            return [_Affine(a.W, a.c, a.rank, to)]
        if op == "Flatten":
            assert isinstance(a, _Affine)
            axis = int(attrs.get("axis", 1))
            if axis < 0:
                axis += a.rank
            if axis != 1:
                raise NotLinear(f"Flatten with axis {attrs.get('axis')} mixes rows")
            return [_Affine(a.W, a.c, 2, a.dtype)]
        if op == "Reshape":
            assert isinstance(a, _Affine)
            return [self.reshape(a, args, attrs)]
        if op == "Squeeze":
            assert isinstance(a, _Affine)
            axes = _axes(node, attrs, env)
            if a.rank == 2 and a.m == 1 and axes is not None and sorted(x % 2 for x in axes) == [1]:
                return [_Affine(a.W, a.c, 1, a.dtype)]
            raise NotLinear(f"Squeeze with axes {axes} on rank {a.rank}")
        if op == "Unsqueeze":
            assert isinstance(a, _Affine)
            axes = _axes(node, attrs, env)
            if a.rank == 1 and axes is not None and sorted(x % 2 for x in axes) == [1]:
                return [_Affine(a.W, a.c, 2, a.dtype)]
            raise NotLinear(f"Unsqueeze with axes {axes} on rank {a.rank}")
        if op == "MatMul":
            assert isinstance(a, _Affine)
            return [self.matmul(a, args[1] if len(args) > 1 else None)]
        if op == "Gemm":
            assert isinstance(a, _Affine)
            return [self.gemm(a, args, attrs)]
        if op in ("Add", "Sub"):
            return [self.add(args, negate=op == "Sub")]
        if op in ("Mul", "Div"):
            return [self.scale(args, op)]
        if op == "Neg":
            assert isinstance(a, _Affine)
            self.ops.append("Neg")
            return [_Affine(-a.W, -a.c, a.rank, a.dtype)]
        raise NotLinear(f"op {node.qualified} is not linear")

    @staticmethod
    def constant(attrs: dict[str, Any]) -> np.ndarray:
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                v = attrs[key]
                dt = np.int64 if key.startswith("value_int") else None
                return np.asarray(v, dtype=dt) if dt else np.asarray(v)
        raise NotLinear("Constant of an unsupported kind")

    def reshape(self, a: _Affine, args: list[_Value | None], attrs: dict[str, Any]) -> _Affine:
        shape = args[1] if len(args) > 1 else None
        if not isinstance(shape, np.ndarray):
            raise NotLinear("Reshape to a shape that is not constant")
        s = [int(v) for v in shape.reshape(-1)]
        allowzero = int(attrs.get("allowzero", 0))
        batch = (-1,) if allowzero else (-1, 0)
        if len(s) == 1 and s[0] == -1 and a.m == 1:
            return _Affine(a.W, a.c, 1, a.dtype)
        if len(s) == 2 and s[0] in batch and (s[1] == a.m or (s[0] == 0 and s[1] == -1)):
            return _Affine(a.W, a.c, 2, a.dtype)
        raise NotLinear(f"Reshape to {s} from width {a.m} does not keep one row per reading")

    def matmul(self, a: _Affine, b: _Value | None) -> _Affine:
        if not isinstance(b, np.ndarray) or b.dtype.kind != "f":
            raise NotLinear("MatMul with a second operand that is not a float constant")
        if a.rank != 2:
            raise NotLinear("MatMul of a [n] vector mixes rows")
        B = b.astype(np.float64)
        if B.ndim == 1 and B.shape[0] == a.m:
            self.mixing(a, "MatMul")
            return _Affine((a.W @ B)[:, None], np.atleast_1d(a.c @ B), 1, a.dtype)
        if B.ndim == 2 and B.shape[0] == a.m:
            self.mixing(a, "MatMul")
            return _Affine(a.W @ B, a.c @ B, 2, a.dtype)
        raise NotLinear(f"MatMul of width {a.m} with a constant of shape {B.shape}")

    def gemm(self, a: _Affine, args: list[_Value | None], attrs: dict[str, Any]) -> _Affine:
        if int(attrs.get("transA", 0)):
            raise NotLinear("Gemm with transA mixes rows")
        if a.rank != 2:
            raise NotLinear("Gemm needs a 2-D input")
        b = args[1] if len(args) > 1 else None
        if not isinstance(b, np.ndarray) or b.ndim != 2 or b.dtype.kind != "f":
            raise NotLinear("Gemm with B that is not a 2-D float constant")
        B = b.astype(np.float64)
        if int(attrs.get("transB", 0)):
            B = B.T
        if B.shape[0] != a.m:
            raise NotLinear(f"Gemm of width {a.m} with B of shape {B.shape}")
        alpha = float(attrs.get("alpha", 1.0))
        beta = float(attrs.get("beta", 1.0))
        self.mixing(a, "Gemm")
        out = _Affine(alpha * (a.W @ B), alpha * (a.c @ B), 2, a.dtype)
        c = args[2] if len(args) > 2 else None
        if c is None:
            return out
        if not isinstance(c, np.ndarray):
            raise NotLinear("Gemm with C that is not constant")
        v = _vector(c, out, "Gemm C")
        if v.size not in (1, out.m):
            raise NotLinear(f"Gemm C of {v.size} values for width {out.m}")
        return _Affine(out.W, out.c + beta * v, 2, a.dtype)

    def add(self, args: list[_Value | None], negate: bool) -> _Affine:
        if len(args) != 2 or args[0] is None or args[1] is None:
            raise NotLinear("Add/Sub needs two operands")
        p, q = args
        op = "Sub" if negate else "Add"
        if isinstance(p, _Affine) and isinstance(q, _Affine):
            if p.rank != q.rank or (p.m != q.m and 1 not in (p.m, q.m)):
                raise NotLinear(f"{op} of affine tensors of different shapes")
            k = max(p.m, q.m)
            p, q = _widen(p, k), _widen(q, k)
            s = -1.0 if negate else 1.0
            self.ops.append(op)
            return _Affine(p.W + s * q.W, p.c + s * q.c, p.rank, p.dtype)
        if isinstance(p, _Affine) and isinstance(q, np.ndarray):
            v = _vector(q, p, op)
            p = _widen(p, max(p.m, v.size))
            self.ops.append(op)
            return _Affine(p.W, p.c - v if negate else p.c + v, p.rank, p.dtype)
        if isinstance(p, np.ndarray) and isinstance(q, _Affine):
            v = _vector(p, q, op)
            q = _widen(q, max(q.m, v.size))
            self.ops.append(op)
            if negate:
                return _Affine(-q.W, v - q.c, q.rank, q.dtype)
            return _Affine(q.W, q.c + v, q.rank, q.dtype)
        raise NotLinear(f"{op} on constants only (constant folding is not supported)")

    def scale(self, args: list[_Value | None], op: str) -> _Affine:
        if len(args) != 2:
            raise NotLinear(f"{op} needs two operands")
        p, q = args
        if isinstance(p, np.ndarray) and isinstance(q, _Affine) and op == "Mul":
            p, q = q, p
        if not isinstance(p, _Affine) or not isinstance(q, np.ndarray):
            raise NotLinear(f"{op} of two inputs-dependent tensors (or constants only) is not linear")
        v = _vector(q, p, op)
        if op == "Div":
            if np.any(v == 0):
                raise NotLinear("Div by zero")
            v = 1.0 / v
        p = _widen(p, max(p.m, v.size))
        self.ops.append(op)
        return _Affine(p.W * v, p.c * v, p.rank, p.dtype)

    def ml(self, node: Node, attrs: dict[str, Any], args: list[_Value | None]) -> list[_Value]:
        a = args[0] if args else None
        if not isinstance(a, _Affine) or a.rank != 2:
            raise NotLinear(f"{node.qualified} on something other than the [n, d] input")
        if node.op_type == "LinearRegressor":
            if attrs.get("post_transform", b"NONE") not in (b"NONE", b""):
                raise NotLinear(f"LinearRegressor with post_transform {attrs['post_transform']!r}")
            targets = int(attrs.get("targets", 1))
            coef = np.asarray(attrs.get("coefficients", []), dtype=np.float64)
            if targets < 1 or coef.size != targets * a.m:
                raise NotLinear(f"LinearRegressor has {coef.size} coefficients for {targets} x {a.m}")
            icpt = np.asarray(attrs.get("intercepts", np.zeros(targets)), dtype=np.float64)
            if icpt.size not in (0, targets):
                raise NotLinear("LinearRegressor intercepts do not match targets")
            C = coef.reshape(targets, a.m).T
            # onnxruntime computes this op in float (its output type is always float)
            self.mixing(_Affine(a.W, a.c, 2, "float32"), f"{_ML}.LinearRegressor")
            c = a.c @ C + (icpt if icpt.size else 0.0)
            return [_Affine(a.W @ C, c, 2, "float32")]
        if node.op_type == "Scaler":
            offset = np.asarray(attrs.get("offset", [0.0]), dtype=np.float64)
            scale = np.asarray(attrs.get("scale", [1.0]), dtype=np.float64)
            for what, v in (("offset", offset), ("scale", scale)):
                if v.size not in (1, a.m):
                    raise NotLinear(f"Scaler {what} of {v.size} values for width {a.m}")
            self.mixing(_Affine(a.W, a.c, 2, "float32"), f"{_ML}.Scaler")
            return [_Affine(a.W * scale, (a.c - offset) * scale, 2, "float32")]
        raise NotLinear(f"op {node.qualified} is not linear")


def compile_linear(model: OnnxModel, n_features: int) -> CompiledLinear:
    """Fold a linear graph into ``(w, b)``; raise :class:`NotLinear` with the reason otherwise."""
    try:
        return _Compiler(model, n_features).run()
    except _Malformed as exc:
        raise ArtifactError(f"not a valid ONNX model ({exc})") from None
    except (ValueError, TypeError, IndexError, OverflowError) as exc:  # shapes or values no valid model has
        raise ArtifactError(f"not a valid ONNX model ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class OnnxInfo:
    """What ``model build`` and the loader need to know about an ONNX file."""

    dtype: Literal["float32", "float64"]
    input_name: str
    output_name: str
    input_shape: tuple[int | str | None, ...] | None
    output_shape: tuple[int | str | None, ...] | None
    opsets: dict[str, int]
    ops: tuple[str, ...]
    compiled: CompiledLinear | None
    not_linear: str | None  # why it is not compiled, when it is not

    @property
    def backend(self) -> str:
        return f"numpy (compiled from {self.compiled.source})" if self.compiled else "onnxruntime"


def _dim(v: int | str | None) -> str:
    return "?" if v is None else str(v)


def inspect_onnx(data: bytes | OnnxModel, n_features: int) -> OnnxInfo:
    """Check that a model takes one float ``[n, n_features]`` input and gives one value per row.

    Raises ArtifactError with a clear reason otherwise; compiles the graph when it is linear."""
    model = data if isinstance(data, OnnxModel) else parse_model(data)
    g = model.graph
    feeds = g.feed_inputs
    if len(feeds) != 1:
        names = ", ".join(repr(i.name) for i in feeds) or "none"
        raise ArtifactError(f"the model has {len(feeds)} inputs ({names}); edgeloop feeds one [n, d] float tensor")
    x = feeds[0]
    dtype = _FLOAT_ELEMS.get(x.elem_type or 0)
    if dtype is None:
        raise ArtifactError(f"input {x.name!r} is {x.type_name}; it must be tensor(float) or tensor(double)")
    if x.shape is not None:
        if len(x.shape) != 2:
            shape = "[" + ", ".join(_dim(v) for v in x.shape) + "]"
            raise ArtifactError(f"input {x.name!r} has shape {shape}; it must be [n, {n_features}]")
        batch, width = x.shape
        if isinstance(width, int) and width != n_features:
            raise ArtifactError(f"input {x.name!r} is {width} wide but {n_features} features were given")
        if isinstance(batch, int) and batch > 0:
            raise ArtifactError(
                f"input {x.name!r} has a fixed batch size of {batch}; export it with a dynamic first axis "
                "(e.g. torch.onnx.export(..., dynamic_axes={...}) or skl2onnx's [None, d])"
            )
    if len(g.outputs) != 1:
        names = ", ".join(repr(o.name) for o in g.outputs)
        raise ArtifactError(f"the model has {len(g.outputs)} outputs ({names}); a regressor has one")
    y = g.outputs[0]
    if y.kind != "tensor" or (y.elem_type is not None and y.elem_type not in _FLOAT_ELEMS):
        raise ArtifactError(
            f"output {y.name!r} is {y.type_name}; a regressor outputs float values (is it a classifier?)"
        )
    if y.shape is not None:
        shape = "[" + ", ".join(_dim(v) for v in y.shape) + "]"
        if len(y.shape) not in (1, 2) or (
            len(y.shape) == 2 and y.shape[1] not in (1, None) and not isinstance(y.shape[1], str)
        ):
            raise ArtifactError(
                f"output {y.name!r} has shape {shape}; a regressor gives one value per row ([n] or [n, 1])"
            )
    for name, raw in g.initializers.items():
        try:
            external = _int(_fields(raw), 14, 0) == 1
        except _Malformed as exc:
            raise ArtifactError(f"not a valid ONNX model (initializer {name!r}: {exc})") from None
        if external:
            raise ArtifactError(
                f"tensor {name!r} is stored as external data; save the model with every tensor inside the file"
            )
    compiled: CompiledLinear | None = None
    reason: str | None = None
    try:
        compiled = compile_linear(model, n_features)
    except NotLinear as exc:
        reason = str(exc)
        logger.debug("not compiled to numpy: %s", reason)
    return OnnxInfo(
        dtype=dtype,
        input_name=x.name,
        output_name=y.name,
        input_shape=x.shape,
        output_shape=y.shape,
        opsets=dict(model.opsets),
        ops=tuple(n.qualified for n in g.nodes),
        compiled=compiled,
        not_linear=reason,
    )
