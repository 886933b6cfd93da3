"""The wire contract: JSON round-trips of every payload, topics, and decoders that let only
ProtocolError escape whatever bytes or JSON they are fed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from runtime import protocol as P
from runtime.errors import ProtocolError

MANIFEST_LINEAR = P.ModelManifest.model_validate(
    {
        "name": "temp-model",
        "version": 7,
        "kind": "linear",
        "features": ("t", "h", "p"),
        "dtype": "float32",
        "target": "y",
        "created_at": 1700000000.5,
        "nan_policy": "impute",
        "training": {"source": "stats", "window_start": 1.0, "window_end": 2.0, "n_rows": 50, "parent_version": 6},
        "metrics": {"mae": 0.25, "rmse": 0.5},
        "feature_stats": {"mean": (1.0, 2.0, 3.0), "std": (0.1, 0.2, 0.3)},
        "weights": (0.1, -2.5, 1e-300),
        "intercept": 3.25,
        "key_id": "0123456789abcdef",
        "signature": "c2ln",
    }
)
MANIFEST_ONNX = P.ModelManifest.model_validate(
    {
        "name": "gbr",
        "version": 1,
        "kind": "onnx",
        "features": ("a",),
        "artifact": {
            "filename": "model.onnx",
            "url": "http://127.0.0.1:8080/a/model.onnx",
            "size": 10,
            "sha256": "ab" * 32,
        },
    }
)

SAMPLES: dict[str, list[BaseModel]] = {
    "ModelManifest": [MANIFEST_LINEAR, MANIFEST_ONNX],
    "Reading": [
        P.Reading(ts=1.5, features={"t": 1.0, "h": None}, y_true=2.0),
        P.Reading(features=[1.0, None, 3.0]),
    ],
    "ResultBatch": [
        P.ResultBatch(
            device="dev-1",
            model="temp-model",
            seq_first=10,
            seq_last=12,
            floor=9,
            ts=[1.0, 2.0, 3.0],
            model_version=[7, 7, 8],
            y_pred=[0.5, None, 1.5],
            x=[[1.0, 2.0], None, [3.0, None]],
            features=("a", "b"),
            y_true=[None, 1.0, None],
        )
    ],
    "Telemetry": [
        P.Telemetry(
            device="dev-1",
            seq=3,
            ts=100.0,
            uptime_s=5.0,
            model_version=7,
            readings=10,
            predictions=9,
            rejected=1,
            latency_p50_us=12.5,
            latency_p99_us=80.0,
            outbox_depth=4,
            outbox_bytes=400,
            outbox_dropped={"telemetry": 2},
            rss_bytes=50_000_000,
            features=P.FeatureDrift(n=9, mean=(1.0,), std=(0.5,), drift_score=0.1),
            live_mae=0.3,
            live_n=4,
            last_sync=99.0,
        )
    ],
    "SufficientStats": [
        P.SufficientStats(
            device="dev-1",
            features=("a",),
            window_start=0.0,
            window_end=1.0,
            n=2,
            xtx=[[5.0, 3.0], [3.0, 2.0]],
            xty=[4.0, 2.5],
            yty=9.0,
        )
    ],
    "Ack": [P.Ack(device="dev-1", watermarks={"results": 12, "telemetry": -1})],
    "DesiredState": [
        P.DesiredState(model=MANIFEST_LINEAR, rollout_id="r1", config={"capture_rate": 0.5}, issued_at=3.0),
        P.DesiredState(device="dev-2", rollback=True),
    ],
    "ReportedState": [
        P.ReportedState(
            device="dev-1",
            fleet="f",
            group="g",
            active=P.ModelRef(name="m", version=2),
            previous=P.ModelRef(name="m", version=1),
            update=P.UpdateStatus(state="failed", version=3, reason="hash mismatch", rollout_id="r1", at=5.0),
            config_hash="abc",
            capture_rate=0.1,
            transport="mqtt",
            runtime_version="0.1.0",
            ts=6.0,
        )
    ],
    "PingCommand": [P.PingCommand(id="c-1", type="ping", reply_to="x/y")],
    "RollbackCommand": [P.RollbackCommand(id="c-2", type="rollback")],
    "FlushCommand": [P.FlushCommand(id="c-3", type="flush")],
    "SetCaptureRateCommand": [P.SetCaptureRateCommand(id="c-4", type="set_capture_rate", rate=0.25)],
    "GetStateCommand": [P.GetStateCommand(id="c-5", type="get_state")],
    "CommandResult": [P.CommandResult(id="c-1", device="dev-1", ok=False, error="nope", data={"a": [1, {"b": None}]})],
    "Status": [P.Status(device="dev-1", state="offline", ts=7.0)],
}


def wire_classes() -> list[type[P.Wire]]:
    out: list[type[P.Wire]] = []
    todo = [P.Wire]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__ == P.__name__ and not sub.__name__.startswith("_"):
                out.append(sub)
    return sorted(out, key=lambda c: c.__name__)


WIRE = wire_classes()
COMMANDS = [P.PingCommand, P.RollbackCommand, P.FlushCommand, P.SetCaptureRateCommand, P.GetStateCommand]


def test_every_payload_class_has_a_sample():
    assert {c.__name__ for c in WIRE} == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_json_round_trip(name):
    cls = getattr(P, name)
    for sample in SAMPLES[name]:
        data = P.encode(sample)
        assert isinstance(data, bytes)
        back = P.decode(cls, data)
        assert back == sample
        assert cls.from_bytes(sample.to_bytes()) == sample
        assert P.decode(cls, data.decode()) == sample  # str works as well as bytes
        assert json.loads(data)["v"] == P.PROTOCOL_VERSION
        if name in {c.__name__ for c in COMMANDS}:
            assert P.decode_command(data) == sample


def test_manifest_uses_kind_on_the_wire():
    data = json.loads(P.encode(MANIFEST_LINEAR))
    assert data["kind"] == "linear" and "model_kind" not in data


@pytest.mark.parametrize(
    ("cls", "payload", "field"),
    [
        (
            P.Telemetry,
            {
                "device": "d",
                "ts": 1,
                "uptime_s": 0,
                "readings": -1,
                "predictions": 0,
                "rejected": 0,
                "outbox_depth": 0,
                "outbox_bytes": 0,
            },
            "readings",
        ),
        (P.Ack, {"device": "bad device", "watermarks": {"results": 1}}, "device"),
        (P.Ack, {"device": "d", "watermarks": {"results": 1}, "surprise": 1}, "surprise"),
        (
            P.ResultBatch,
            {"device": "d", "seq_first": 1, "seq_last": 2, "ts": [1.0], "model_version": [1, 1], "y_pred": [1.0, 2.0]},
            None,
        ),
        (
            P.ModelManifest,
            {"name": "m", "version": 1, "kind": "linear", "features": ["a", "a"], "weights": [1, 2], "intercept": 0},
            "features",
        ),
        (P.ModelManifest, {"name": "m", "version": 0, "kind": "onnx", "features": ["a"]}, "version"),
        (P.DesiredState, {"config": {"capture_rate": 2.0}}, "config"),
        (P.Status, {"device": "d", "state": "asleep"}, "state"),
        (P.Status, {"device": "d", "state": "online", "v": 2}, "v"),
    ],
)
def test_invalid_payload_names_the_field(cls, payload, field):
    with pytest.raises(ProtocolError) as ei:
        P.decode(cls, json.dumps(payload))
    assert ei.value.kind == cls.kind
    if field is not None:
        assert ei.value.field is not None and ei.value.field.split(".")[0] == field


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe", b"[1, 2]", b"null", b'"x"', b'{"device": "d", "state": "online", "ts": NaN}', b"{" * 5000],
)
def test_malformed_payloads(payload):
    with pytest.raises(ProtocolError):
        P.decode(P.Status, payload)
    with pytest.raises(ProtocolError):
        P.decode_command(payload)


def test_oversized_payload_is_refused_before_parsing():
    big = b'{"device": "d", "state": "online", "pad": "' + b"x" * P.MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(ProtocolError, match="exceeds"):
        P.decode(P.Status, big)


def test_decode_command_dispatches_on_type():
    cmd = P.decode_command(b'{"id": "a1", "type": "set_capture_rate", "rate": 0.5}')
    assert isinstance(cmd, P.SetCaptureRateCommand) and cmd.rate == 0.5
    with pytest.raises(ProtocolError) as ei:
        P.decode_command(b'{"id": "a1", "type": "reboot"}')
    assert ei.value.kind == "Command"
    with pytest.raises(ProtocolError):
        P.decode_command(b'{"id": "a1", "type": "set_capture_rate", "rate": 1.5}')


# --------------------------------------------------------------------------- topics


@pytest.mark.parametrize("suffix", sorted(P.SUFFIXES))
def test_topic_round_trip(suffix):
    t = P.topic("fleet-1", "dev_2.a", suffix)
    assert t == f"edgeloop/fleet-1/dev_2.a/{suffix}"
    assert P.parse_topic(t) == ("fleet-1", "dev_2.a", suffix)


def test_topic_wildcard_and_errors():
    assert P.topic("f", "+", P.RESULTS) == "edgeloop/f/+/results"
    for fleet, device, suffix in [
        ("f", "d", "nope"),
        ("f/x", "d", P.ACK),
        ("f", "#", P.ACK),
        ("", "d", P.ACK),
        ("f", "-d", P.ACK),
    ]:
        with pytest.raises(ProtocolError):
            P.topic(fleet, device, suffix)
    for t in [
        "other/f/d/results",
        "edgeloop/f/d",
        "edgeloop/f/d/nope",
        "edgeloop/f/+/results",
        "edgeloop/f/d/cmd/other",
        "",
    ]:
        with pytest.raises(ProtocolError):
            P.parse_topic(t)


@given(st.text(max_size=80))
def test_parse_topic_raises_only_protocol_error(t):
    try:
        fleet, device, suffix = P.parse_topic(t)
    except ProtocolError:
        return
    assert P.topic(fleet, device, suffix) == t


# --------------------------------------------------------------------------- fuzzing the decoders

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)


def _only_protocol_error(fn: Any, payload: Any) -> None:
    try:
        fn(payload)
    except ProtocolError:
        pass


DECODERS = [(c.__name__, (lambda p, c=c: P.decode(c, p))) for c in WIRE] + [("decode_command", P.decode_command)]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("name", "decoder"), DECODERS, ids=[n for n, _ in DECODERS])
@FUZZ
@given(payload=st.binary(max_size=300))
def test_random_bytes(name, decoder, payload):
    _only_protocol_error(decoder, payload)


@pytest.mark.parametrize(("name", "decoder"), DECODERS, ids=[n for n, _ in DECODERS])
@FUZZ
@given(value=json_values)
def test_random_json(name, decoder, value):
    _only_protocol_error(decoder, json.dumps(value).encode())


@pytest.mark.parametrize("name", sorted(SAMPLES))
@FUZZ
@given(data=st.data())
def test_valid_payload_with_a_field_replaced(name, data):
    """Start from a valid payload and replace one field (possibly nested) with random JSON."""
    cls = getattr(P, name)
    sample = data.draw(st.sampled_from(SAMPLES[name]))
    obj = json.loads(P.encode(sample))
    target = obj
    while True:
        keys = sorted(target) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            break
        k = data.draw(st.sampled_from(keys))
        child = target[k]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            target = child
            continue
        target[k] = data.draw(json_values)
        break
    payload = json.dumps(obj).encode()
    _only_protocol_error(lambda p: P.decode(cls, p), payload)
    if name in {c.__name__ for c in COMMANDS}:
        _only_protocol_error(P.decode_command, payload)
