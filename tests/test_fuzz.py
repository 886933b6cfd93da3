"""Every input, fuzzed: decoders on both sides, the live inbound paths, and model bundles.

Hypothesis feeds hostile payloads — random bytes, wrong types, deep nesting, huge numbers and
strings, payloads over ``MAX_PAYLOAD_BYTES`` — to every decoder (device: readings, desired state,
commands, acks; cloud: result batches, telemetry, stats, reported state, status, command
results): nothing but :class:`ProtocolError` may escape. Then the same payloads go through the
live paths — the daemon's inbound handler and the cloud's ``Ingester.handle``/``commit`` — where
each must be counted as invalid while the process keeps serving. Finally model bundles: truncated
and corrupted ONNX, manifests that disagree with their artifact, absurd dimensions — only our own
errors may escape ``verify_bundle``, ``load_bundle`` and ``ModelStore.install``.

The number of cases run is counted and printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chaos.faultkit import linear_onnx, onnx_manifest, relu_onnx, report
from helpers_device import linear_manifest, settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from runtime import protocol as P
from runtime.artifacts import load_private_key, load_public_key, sign_manifest, write_bundle
from runtime.errors import EdgeloopError, ProtocolError
from runtime.sources import parse_line

CASES: Counter[str] = Counter()
FUZZ = hsettings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SMALL = hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    total = sum(CASES.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
    report(f"fuzz cases run: {total} ({detail})")


# --------------------------------------------------------------------------- valid samples to mutate

SAMPLES: dict[str, dict[str, Any]] = {
    "Reading": {"ts": 1.0, "features": {"a": 1.0, "b": 2.0}, "y_true": 0.5},
    "DesiredState": {
        "device": "dev-1",
        "rollout_id": "r1",
        "config": {"capture_rate": 0.5},
        "model": {
            "name": "m",
            "version": 2,
            "kind": "linear",
            "features": ["a", "b"],
            "weights": [1.0, 2.0],
            "intercept": 0.0,
            "signature": "c2ln",
        },
    },
    "Command": {"type": "set_capture_rate", "id": "c1", "rate": 0.5},
    "Ack": {"device": "dev-1", "watermarks": {"results": 10, "telemetry": 2}},
    "ResultBatch": {
        "device": "dev-1",
        "model": "m",
        "seq_first": 0,
        "seq_last": 2,
        "floor": -1,
        "ts": [1.0, 2.0, 3.0],
        "model_version": [1, 1, 2],
        "y_pred": [0.5, None, 1.5],
        "x": [[1.0, 2.0], None, [3.0, None]],
        "features": ["a", "b"],
        "y_true": [None, 1.0, None],
    },
    "Telemetry": {
        "device": "dev-1",
        "seq": 1,
        "floor": 0,
        "ts": 5.0,
        "uptime_s": 1.0,
        "readings": 3,
        "predictions": 3,
        "rejected": 0,
        "outbox_depth": 1,
        "outbox_bytes": 10,
        "outbox_dropped": {"results": 1},
        "features": {"n": 3, "mean": [1.0], "std": [0.5], "drift_score": 0.1},
        "live_mae": 0.2,
        "live_n": 3,
    },
    "SufficientStats": {
        "device": "dev-1",
        "seq": 0,
        "features": ["a"],
        "window_start": 0.0,
        "window_end": 1.0,
        "n": 2,
        "xtx": [[5.0, 3.0], [3.0, 2.0]],
        "xty": [4.0, 2.5],
        "yty": 9.0,
    },
    "ReportedState": {
        "device": "dev-1",
        "fleet": "f",
        "active": {"name": "m", "version": 2},
        "previous": {"name": "m", "version": 1},
        "update": {"state": "failed", "version": 3, "reason": "x", "rollout_id": "r1", "at": 5.0},
        "ts": 6.0,
    },
    "Status": {"device": "dev-1", "state": "online", "ts": 1.0},
    "CommandResult": {"id": "c1", "device": "dev-1", "ok": True, "data": {"a": [1, {"b": None}]}},
}

# decoder name → function; device side first, then cloud side
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "Reading": parse_line,
    "DesiredState": lambda p: P.decode(P.DesiredState, p),
    "Command": P.decode_command,
    "Ack": lambda p: P.decode(P.Ack, p),
    "ResultBatch": lambda p: P.decode(P.ResultBatch, p),
    "Telemetry": lambda p: P.decode(P.Telemetry, p),
    "SufficientStats": lambda p: P.decode(P.SufficientStats, p),
    "ReportedState": lambda p: P.decode(P.ReportedState, p),
    "Status": lambda p: P.decode(P.Status, p),
    "CommandResult": lambda p: P.decode(P.CommandResult, p),
}
assert set(DECODERS) == set(SAMPLES)


def test_samples_are_valid() -> None:
    """The mutations below start from payloads every decoder accepts."""
    for name, sample in SAMPLES.items():
        assert DECODERS[name](json.dumps(sample).encode()) is not None, name


# --------------------------------------------------------------------------- hostile values

HUGE_NUMBERS = [
    "1e309",
    "-1e309",
    "1e308",
    "-1e308",
    "5e-324",
    str(2**63),
    str(-(2**63) - 1),
    str(2**64),
    str(10**300),
    "1" + "0" * 4400,
    "-0",
    "0.1e-99999",
    "123456789012345678901234567890.5",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(["", "NaN", "Infinity", "../../etc/passwd", "/abs/path", "\u0000", "a/b/#/+", "x" * 5000]),
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=10), c, max_size=6),
    max_leaves=25,
)


def nested(depth: int, leaf: str = "1", kind: str = "list") -> str:
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


@st.composite
def hostile_text(draw: st.DrawFn) -> str:
    """A JSON fragment that is nasty in one of the ways the issue names."""
    kind = draw(st.sampled_from(["deep", "huge-number", "huge-string", "wrong-type", "json"]))
    if kind == "deep":
        return nested(
            draw(st.sampled_from([10, 200, 900, 990, 1100, 5000, 100_000])),
            kind=draw(st.sampled_from(["list", "dict"])),
        )
    if kind == "huge-number":
        return draw(st.sampled_from(HUGE_NUMBERS))
    if kind == "huge-string":
        n = draw(st.sampled_from([1000, 70_000, 1 << 20]))
        return json.dumps(draw(st.sampled_from(["x", "é", "\\", "\u2028"])) * n)
    if kind == "wrong-type":
        return json.dumps(draw(st.sampled_from([[], {}, "1", True, None, [1, 2], {"a": 1}, 0, -1, 1.5])))
    return json.dumps(draw(json_values))


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``obj`` (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


MARK = "\u2603MARK\u2603"


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    """A valid payload of ``name`` with one value (possibly nested) replaced by a hostile fragment,
    or a key added, or the whole payload swapped for random bytes or an oversized one."""
    how = draw(st.sampled_from(["replace", "replace", "replace", "add-key", "bytes", "oversize", "whole"]))
    if how == "bytes":
        return draw(st.binary(max_size=400))
    if how == "oversize":
        pad = P.MAX_PAYLOAD_BYTES + draw(st.integers(1, 4096))
        return json.dumps({**SAMPLES[name], "pad": "x" * pad}).encode()
    if how == "whole":
        return draw(hostile_text()).encode()
    obj = json.loads(json.dumps(SAMPLES[name]))
    if how == "add-key":
        obj[draw(st.text(min_size=1, max_size=20))] = MARK
    else:
        path = draw(st.sampled_from(paths(obj)))
        cur = obj
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = MARK
    text = json.dumps(obj)
    return text.replace(json.dumps(MARK), draw(hostile_text()), 1).encode("utf-8", "surrogatepass")


def only_protocol_errors(name: str, payload: bytes) -> bool:
    """Decode; True when accepted, False when refused with ProtocolError; anything else fails the test."""
    CASES[f"decode:{name}"] += 1
    try:
        DECODERS[name](payload)
    except ProtocolError:
        return False
    return True


@pytest.mark.parametrize("name", list(DECODERS))
@FUZZ
@given(data=st.data())
def test_decoders_raise_only_protocol_error(name: str, data: st.DataObject) -> None:
    payload = data.draw(mutated(name))
    accepted = only_protocol_errors(name, payload)
    if len(payload) > P.MAX_PAYLOAD_BYTES:
        assert not accepted, "a payload over the size limit was accepted"


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(nested(100_000).encode(), id="deep-list"),
        pytest.param(nested(100_000, kind="dict").encode(), id="deep-dict"),
        pytest.param(b'{"a":' + nested(995).encode() + b"}", id="deep-995-in-object"),
        pytest.param(b"\xef\xbb\xbf{}", id="bom"),
        pytest.param(b'{"a": 1, "a": 2}', id="duplicate-keys"),
        pytest.param(b'{"features": {"\\ud800": 1.0}}', id="lone-surrogate"),
        pytest.param(b"x" * (P.MAX_PAYLOAD_BYTES + 1), id="over-limit"),
        pytest.param(b" " * P.MAX_PAYLOAD_BYTES + b"{}", id="whitespace-over-limit"),
        pytest.param(b"", id="empty"),
        pytest.param(b"null", id="null"),
    ],
)
def test_known_hostile_payloads(name: str, payload: bytes) -> None:
    accepted = only_protocol_errors(name, payload)
    # A line of input is stripped first, so blank and padded lines are fine; the flat reading form
    # takes the last duplicate key and, like json.loads on bytes, a UTF-8 byte order mark.
    line_ok = (b"", b'{"a": 1, "a": 2}', b"\xef\xbb\xbf{}", b" " * P.MAX_PAYLOAD_BYTES + b"{}")
    assert accepted == (name == "Reading" and payload in line_ok)


# --------------------------------------------------------------------------- the device's live inbound path


def test_daemon_counts_every_invalid_inbound_message_and_keeps_serving(tmp_path: Path, fleet_keys) -> None:
    """``desired``, ``cmd`` and ``ack`` payloads through the daemon's handler (memory uplink)."""
    from runtime.daemon import Daemon
    from runtime.transports.memory import MemoryUplink

    key, pub = fleet_keys
    suffix_of = {"DesiredState": "desired", "Command": "cmd", "Ack": "ack"}

    async def go() -> None:
        s = settings(tmp_path, pub, "dev-1", transport="memory")
        up = MemoryUplink.from_settings(s)
        d = Daemon(s, uplink=up)
        m = linear_manifest(key, 5)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        seen = {"invalid": 0, "cmd-invalid": 0}

        @FUZZ
        @given(name=st.sampled_from(sorted(suffix_of)), data=st.data())
        def feed(name: str, data: st.DataObject) -> None:
            payload = data.draw(mutated(name))
            CASES["daemon:" + suffix_of[name]] += 1
            before = d.invalid_messages
            try:
                DECODERS[name](payload)
                valid = True
            except ProtocolError:
                valid = False
            up.deliver(suffix_of[name], payload)  # must not raise
            assert d.invalid_messages == before + (0 if valid else 1)
            seen["invalid"] += 0 if valid else 1
            seen["cmd-invalid"] += 1 if (name == "Command" and not valid) else 0

        feed()
        # every invalid command got an error reply (correlation id salvaged or "invalid")
        from runtime.protocol import CommandResult, decode

        await asyncio.sleep(0)
        for _ in range(200):
            if len(up.of("cmd/result")) >= seen["cmd-invalid"]:
                break
            await asyncio.sleep(0.01)
        errors = [decode(CommandResult, p) for p in up.of("cmd/result")]
        assert sum(1 for r in errors if not r.ok) >= seen["cmd-invalid"]
        # still serving: the model it had, readings in, results out
        assert d.pipeline.model_version == 5
        before = d.outbox.next_seq("results")
        d.pipeline.submit_arrays(np.ones((7, 2)))
        d.pipeline.flush()
        assert d.outbox.next_seq("results") == before + 7
        assert all(not t.done() for t in d._tasks), "a background task of the daemon died"
        await d.shutdown(0.2)
        assert seen["invalid"] > 0

    asyncio.run(asyncio.wait_for(go(), 240))


def test_file_source_skips_bad_lines_and_keeps_reading(tmp_path: Path) -> None:
    """Hostile JSON lines in an input file: counted as rejected, the good lines around them stored."""
    from runtime.outbox import Outbox
    from runtime.pipeline import Pipeline
    from runtime.sources import FileSource

    lines: list[bytes] = []
    good = 0

    @SMALL
    @given(payload=mutated("Reading"))
    def collect(payload: bytes) -> None:
        nonlocal good
        if b"\n" in payload or len(payload) > 200_000:
            return
        CASES["file-source"] += 1
        lines.append(payload)
        lines.append(json.dumps({"a": float(good), "b": 1.0}).encode())
        good += 1

    collect()
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")

    async def go() -> tuple[int, int, int, int]:
        ob = Outbox(tmp_path / "o.db", max_rows=10**6, max_bytes=10**9)
        p = Pipeline(ob, schema=("a", "b"), max_rows=64)
        src = FileSource(p, f)
        await src.run()
        n = ob.next_seq("results")
        done = int(ob.get_meta(src.key) or 0)
        ob.close()
        return n, p.counters.readings, p.counters.rejected, done

    n, readings, rejected, position = asyncio.run(asyncio.wait_for(go(), 60))
    assert readings == sum(1 for x in lines if x.strip())  # every non-blank line was looked at once
    assert n + rejected == readings  # ... and either stored or counted as rejected
    assert n >= good  # every good line (and any hostile one that happens to be a valid reading)
    assert position == f.stat().st_size  # the read position reached the end of the file


# --------------------------------------------------------------------------- the cloud's live ingest path

CLOUD_STREAMS = {
    "ResultBatch": "results",
    "Telemetry": "telemetry",
    "SufficientStats": "stats",
    "ReportedState": "reported",
    "Status": "status",
    "CommandResult": "cmd/result",
}


def _valid_batch(device: str, first: int, n: int) -> bytes:
    return P.ResultBatch(
        device=device, seq_first=first, seq_last=first + n - 1, ts=[1.0] * n, model_version=[1] * n, y_pred=[0.5] * n
    ).to_bytes()


def test_ingester_counts_invalid_and_keeps_storing(tmp_path: Path) -> None:
    from cloud.ingest import Ingester
    from cloud.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'cloud.db'}")
    ing = Ingester(store, "f")
    good_seq = 0

    @FUZZ
    @given(name=st.sampled_from(sorted(CLOUD_STREAMS)), data=st.data(), commit=st.booleans())
    def feed(name: str, data: st.DataObject, commit: bool) -> None:
        nonlocal good_seq
        payload = data.draw(mutated(name))
        CASES["ingest:" + CLOUD_STREAMS[name]] += 1
        try:
            msg = DECODERS[name](payload)
        except ProtocolError:
            msg = None
        before = ing.stats.invalid
        ing.handle(f"edgeloop/f/dev-1/{CLOUD_STREAMS[name]}", payload)
        if msg is None:
            assert ing.stats.invalid == before + 1
        # a valid batch from another device keeps flowing through the same ingester
        ing.handle("edgeloop/f/dev-ok/results", _valid_batch("dev-ok", good_seq, 3))
        good_seq += 3
        if commit:
            ing.commit()  # must not raise, whatever was queued

    feed()
    ing.commit()
    rows = store.fetch_results("dev-ok", since_seq=-1, limit=10**6)
    assert [r.seq for r in rows] == list(range(good_seq))
    assert ing.stats.invalid > 0


def _int_paths(obj: Any) -> list[tuple[Any, ...]]:
    out = []
    for path in paths(obj):
        cur = obj
        for k in path:
            cur = cur[k]
        if isinstance(cur, int) and not isinstance(cur, bool):
            out.append(path)
    return out


@pytest.mark.parametrize("name", sorted(CLOUD_STREAMS))
@pytest.mark.parametrize("value", [2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30])
def test_ingester_every_integer_at_the_storage_boundary(name: str, value: int, tmp_path: Path) -> None:
    """Each integer field of each cloud payload set to a 64-bit boundary value: stored, or counted
    as invalid — never an exception out of ``handle`` or ``commit`` (SQLite holds 64-bit integers)."""
    from cloud.ingest import Ingester
    from cloud.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'cloud.db'}")
    ing = Ingester(store, "f")
    for path in _int_paths(SAMPLES[name]):
        CASES["ingest:int-boundary"] += 1
        obj = json.loads(json.dumps(SAMPLES[name]))
        cur = obj
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
        payload = json.dumps(obj).encode()
        try:
            DECODERS[name](payload)
            valid = True
        except ProtocolError:
            valid = False
        before = ing.stats.invalid
        ing.handle(f"edgeloop/f/dev-1/{CLOUD_STREAMS[name]}", payload)
        ing.commit()  # must not raise
        assert valid or ing.stats.invalid == before + 1, path
    ing.handle("edgeloop/f/dev-ok/results", _valid_batch("dev-ok", 0, 2))
    ing.commit()
    assert [r.seq for r in store.fetch_results("dev-ok")] == [0, 1]


@FUZZ
@given(
    topic=st.one_of(
        st.text(max_size=120),
        st.sampled_from(
            [
                "edgeloop/f/../results",
                "edgeloop/f/dev/results/extra",
                "edgeloop/f/+/results",
                "edgeloop/f/#",
                "devices/x",
                "devices/x/messages/events/stream=results",
                "devices/x/messages/events/%ZZ",
                "edgeloop/f/" + "d" * 70 + "/results",
            ]
        ),
    )
)
def test_ingester_topics(topic: str) -> None:
    from cloud.ingest import Ingester

    CASES["ingest:topic"] += 1

    class NoStore:
        def ingest(self, *a: Any, **k: Any) -> Any:
            raise AssertionError("nothing valid was sent")

    ing = Ingester(NoStore(), "f")
    ing.handle(topic, b"{}")  # must not raise
    assert ing.stats.invalid + ing.pending <= 1


# --------------------------------------------------------------------------- model bundles


@pytest.fixture(scope="module")
def onnx_models() -> dict[str, bytes]:
    return {"linear": linear_onnx([2.0, -1.0], 0.5), "relu": relu_onnx([2.0, -1.0], 0.5)}


def _load(bundle_dir: Path, pub: Path) -> None:
    """Verify and load a bundle and predict a few rows: only EdgeloopError may come out."""
    from runtime.predictors import load_bundle

    try:
        p = load_bundle(bundle_dir, pub, max_artifact_bytes=1 << 20)
    except EdgeloopError:
        return
    try:
        with np.errstate(all="ignore"):
            p.predict(np.ones((3, len(p.manifest.features))))
    except EdgeloopError:
        pass


@pytest.mark.parametrize("which", ["linear", "relu"])
@SMALL
@given(data=st.data())
def test_corrupted_onnx_signed_honestly_raises_only_our_errors(
    which: str, data: st.DataObject, onnx_models: dict[str, bytes], fleet_keys, tmp_path_factory
) -> None:
    """The manifest's hash matches the corrupted bytes, so the parser and onnxruntime see them."""
    key, pub = fleet_keys
    raw = bytearray(onnx_models[which])
    how = data.draw(st.sampled_from(["truncate", "flip", "splice", "zero-run"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(1, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif how == "splice":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i : i + data.draw(st.integers(1, 32))] = b"\0" * 8
    CASES[f"bundle:{which}:{how}"] += 1
    if not raw:
        return
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(out, onnx_manifest(key, 1, bytes(raw)), bytes(raw))
    _load(out, pub)


def _tensor_proto_with_dims(dims: list[int]) -> bytes:
    """A Gemm graph whose weight initializer claims ``dims`` but holds two floats."""
    from onnx import TensorProto, helper

    w = TensorProto(name="W", data_type=TensorProto.FLOAT, raw_data=b"\0" * 8)
    w.dims.extend(dims)  # built by hand: onnx.helper refuses the lie
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "absurd",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
        initializer=[w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return bytes(m.SerializeToString())


def _input_width(width: int | str) -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "wide",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return bytes(m.SerializeToString())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _tensor_proto_with_dims([2**40, 2**40]), id="initializer-2^80-values"),
        pytest.param(lambda: _tensor_proto_with_dims([-1, 2]), id="negative-dim"),
        pytest.param(lambda: _tensor_proto_with_dims([2, 1, 1, 1, 1, 1, 1, 1, 1]), id="rank-9"),
        pytest.param(lambda: _tensor_proto_with_dims([3, 1]), id="raw-data-too-short"),
        pytest.param(lambda: _input_width(10**9), id="input-10^9-wide"),
        pytest.param(lambda: _input_width(2**62), id="input-2^62-wide"),
        pytest.param(lambda: b"\x08" + b"\xff" * 20, id="varint-overflow"),
        pytest.param(lambda: b"\x3a\xff\xff\xff\xff\x0f", id="graph-length-4GiB"),
    ],
)
def test_absurd_dimensions_are_refused(make: Callable[[], bytes], fleet_keys, tmp_path: Path) -> None:
    key, pub = fleet_keys
    data = make()
    CASES["bundle:absurd"] += 1
    write_bundle(tmp_path, onnx_manifest(key, 1, data), data)
    from runtime.predictors import load_bundle

    with pytest.raises(EdgeloopError):
        load_bundle(tmp_path, pub, max_artifact_bytes=1 << 20)


def test_absurd_manifest_dimensions_are_refused_by_the_decoder() -> None:
    base = SAMPLES["DesiredState"]["model"]
    for bad in (
        {"features": [f"f{i}" for i in range(P.MAX_FEATURES + 1)], "weights": [0.0] * (P.MAX_FEATURES + 1)},
        {"features": ["a", "b"], "weights": [1.0]},
        {"version": 2**31},
        {"version": 0},
        {"artifact": {"size": 2**41, "sha256": "0" * 64}, "kind": "onnx"},
        {"feature_stats": {"mean": [0.0] * 3, "std": [1.0] * 3}},
    ):
        CASES["manifest:absurd"] += 1
        with pytest.raises(ProtocolError):
            P.decode(P.ModelManifest, json.dumps({**base, **bad}).encode())


@pytest.mark.parametrize(
    "lie",
    ["size-small", "size-large", "sha256", "features-3", "features-1", "dtype", "filename", "linear-with-artifact"],
)
def test_manifest_that_disagrees_with_its_artifact(
    lie: str, onnx_models: dict[str, bytes], fleet_keys, tmp_path: Path
) -> None:
    """Signed manifests that lie about their artifact: install raises our errors, nothing is installed,
    except where the lie is harmless (dtype: the graph's wins)."""
    from runtime.modelstore import ModelStore

    key, pub = fleet_keys
    data = onnx_models["linear"]
    store = ModelStore(tmp_path / "state", load_public_key(pub), max_artifact_bytes=1 << 20)
    kw: dict[str, Any] = {}
    if lie == "size-small":
        kw["size"] = len(data) - 1
    elif lie == "size-large":
        kw["size"] = len(data) + 1
    elif lie == "sha256":
        kw["sha256"] = hashlib.sha256(b"other").hexdigest()
    elif lie == "features-3":
        kw["features"] = ("a", "b", "c")
    elif lie == "features-1":
        kw["features"] = ("a",)
    elif lie == "dtype":
        kw["dtype"] = "float64"
    elif lie == "filename":
        kw["filename"] = "other.onnx"
    CASES["bundle:disagree"] += 1
    from runtime.predictors import load_predictor

    if lie == "linear-with-artifact":
        # Signed weights plus an artifact: the artifact must still verify, and the weights are what run.
        m = onnx_manifest(None, 1, data)
        lin = sign_manifest(
            m.model_copy(update={"model_kind": "linear", "weights": (1.0, 1.0), "intercept": 0.0}),
            load_private_key(key),
        )
        with pytest.raises(EdgeloopError):
            store.install(lin, None)
        p = load_predictor(store.install(lin, data))
        assert p.predict(np.array([[1.0, 2.0]])).tolist() == [3.0]
        return
    m = onnx_manifest(key, 1, data, **kw)

    if lie in ("dtype", "filename"):
        b = store.install(m, data)  # harmless: the graph's dtype is used; the file is named by the manifest
        load_predictor(b)
        return
    with pytest.raises(EdgeloopError):
        b = store.install(m, data)
        load_predictor(b)
    if lie in ("size-small", "size-large", "sha256"):
        assert not store.has(m.ref)


@SMALL
@given(text=st.one_of(st.binary(max_size=300), mutated("DesiredState")))
def test_manifest_file_on_disk_fuzzed(text: bytes, fleet_keys, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A bundle folder whose manifest.json is garbage (or a mutated manifest): verify_bundle raises ArtifactError."""
    from runtime.artifacts import MANIFEST, verify_bundle

    _, pub = fleet_keys
    CASES["bundle:manifest-file"] += 1
    out = tmp_path_factory.mktemp("mf")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            text = json.dumps(obj["model"]).encode()
    except (ValueError, RecursionError):
        pass
    (out / MANIFEST).write_bytes(text)
    with pytest.raises(EdgeloopError):
        verify_bundle(out, load_public_key(pub))


def test_signed_manifest_with_hostile_numbers_loads_or_is_refused(fleet_keys, tmp_path: Path) -> None:
    """Extreme but valid weights signed by the fleet key: the model loads, predicts inf/NaN, and the
    update's validation refuses it rather than serving it."""
    from runtime.modelstore import ModelStore
    from runtime.predictors import load_predictor
    from runtime.reconcile import validate_candidate

    key, pub = fleet_keys
    store = ModelStore(tmp_path / "s", load_public_key(pub))
    for i, w in enumerate([(1e308, 1e308), (5e-324, -5e-324), (-1e308, 1e308)]):
        CASES["bundle:extreme-weights"] += 1
        m = sign_manifest(
            P.ModelManifest.model_validate(
                {
                    "name": "x",
                    "version": i + 1,
                    "kind": "linear",
                    "features": ["a", "b"],
                    "weights": list(w),
                    "intercept": 1e308,
                }
            ),
            load_private_key(key),
        )
        p = load_predictor(store.install(m))
        try:
            validate_candidate(p, None, np.full((4, 2), 10.0), ("a", "b"), 100.0)
        except EdgeloopError as exc:
            assert "non-finite" in str(exc) or "overflow" in str(exc)


def test_hostile_numbers_in_readings_reject_only_their_row(tmp_path: Path, fleet_keys) -> None:
    """Finite readings whose prediction overflows, and labels near ±1e308: the bad row is rejected,
    the rest of its micro-batch is stored, and telemetry (finite numbers only on the wire) still goes."""
    from runtime.daemon import Daemon
    from runtime.protocol import Telemetry, decode
    from runtime.transports.memory import MemoryUplink

    key, pub = fleet_keys

    async def go() -> None:
        s = settings(tmp_path, pub, "dev-1", transport="memory", telemetry_interval=0.1)
        up = MemoryUplink.from_settings(s)
        d = Daemon(s, uplink=up)
        m = linear_manifest(key, 1)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        X = np.array([[1.0, 1.0], [1e308, -1e308], [2.0, 2.0], [1e200, 3.0]])
        y = np.array([1e308, 0.0, -1e308, 1.0])
        CASES["daemon:hostile-readings"] += 1
        d.pipeline.submit_arrays(X, y_true=y)  # the flusher commits it: a bad row must not kill it
        for _ in range(500):
            if d.outbox.next_seq("results") == 3:
                break
            await asyncio.sleep(0.01)
        assert d.outbox.next_seq("results") == 3 and d.pipeline.counters.rejected == 1
        t = decode(Telemetry, d.telemetry().to_bytes())  # overflowed statistics go out clamped, not as inf
        assert t.live_mae is not None and t.features is not None
        for _ in range(500):
            if up.of("telemetry"):
                break
            await asyncio.sleep(0.01)
        assert up.of("telemetry"), "the telemetry loop died"
        d.pipeline.submit_arrays(np.ones((5, 2)))
        for _ in range(500):
            if d.outbox.next_seq("results") == 8:
                break
            await asyncio.sleep(0.01)
        assert d.outbox.next_seq("results") == 8, "the flusher died"
        assert all(not t.done() for t in d._tasks)
        await d.shutdown(0.2)

    asyncio.run(asyncio.wait_for(go(), 60))
