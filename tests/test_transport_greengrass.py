"""greengrass transport: fails fast without a nucleus; maps our streams onto the SDK's own IPC request types.

No Greengrass nucleus runs here. Three stand-ins: the mapping is checked on the request objects
the SDK's client sends (``PublishToIoTCoreRequest`` / ``SubscribeToIoTCoreRequest``, down to their
wire payload); start-up is checked against the ways a nucleus can be missing (no variables, no
socket, a socket that accepts and never answers); and the transport runs through the SDK's real
IPC client against :class:`FakeNucleus`, which speaks the nucleus's event-stream RPC on a Unix socket.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_cloudsdk import FakeNucleus, run_async, wait_until_async

from runtime import protocol
from runtime.config import DeviceSettings
from runtime.errors import ProtocolError, TransportError

pytest.importorskip("awsiot", reason="awsiotsdk is not installed: pip install 'edgeloop[aws]'")
from awsiot.greengrasscoreipc import model

from runtime.transports.greengrass import (
    CONNECT_TIMEOUT,
    ENV_SOCKET,
    ENV_TOKEN,
    GreengrassUplink,
    inbound,
    publish_request,
    subscribe_requests,
)

FLEET = "plant-7"
THING = "core-" + uuid.uuid4().hex[:6]


def _settings(tmp_path: Path, **broker: object) -> DeviceSettings:
    return DeviceSettings.model_validate(
        {
            "device_id": THING,
            "fleet": FLEET,
            "state_dir": tmp_path / "state",
            "public_key": tmp_path / "fleet.pub",
            "broker": {"transport": "greengrass", "url": "greengrass://nucleus", **broker},
        }
    )


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(
    ("suffix", "retain"),
    [
        ("results", False),
        ("telemetry", False),
        ("stats", False),
        ("reported", True),
        ("status", True),
        ("cmd/result", False),
    ],
)
def test_outbound_streams_become_publish_to_iot_core_requests(suffix: str, retain: bool) -> None:
    payload = b'{"v":1,"device":"x"}'
    req = publish_request(FLEET, THING, suffix, payload, retain=retain)
    assert isinstance(req, model.PublishToIoTCoreRequest)
    assert req.topic_name == f"edgeloop/{FLEET}/{THING}/{suffix}"
    assert req.qos == model.QOS.AT_LEAST_ONCE
    assert req.payload == payload and req.retain is retain
    # what goes over the IPC socket: the SDK's own serialisation, payload base64
    wire = req._to_payload()
    assert wire["topicName"] == req.topic_name and wire["qos"] == "1"
    assert base64.b64decode(wire["payload"]) == payload and wire["retain"] is retain
    assert json.loads(json.dumps(wire)) == wire
    back = model.PublishToIoTCoreRequest._from_payload(wire)
    assert (back.topic_name, back.qos, back.payload, back.retain) == (req.topic_name, "1", payload, retain)


def test_inbound_streams_cannot_be_published() -> None:
    for suffix in ("desired", "cmd", "ack"):
        with pytest.raises(ProtocolError, match="inbound"):
            publish_request(FLEET, THING, suffix, b"{}")
    with pytest.raises(ProtocolError, match="unknown topic suffix"):
        publish_request(FLEET, THING, "secrets", b"{}")


def test_subscriptions_cover_desired_cmd_and_ack() -> None:
    reqs = subscribe_requests(FLEET, THING)
    assert all(isinstance(r, model.SubscribeToIoTCoreRequest) for r in reqs)
    assert [(r.topic_name, r.qos) for r in reqs] == [
        (f"edgeloop/{FLEET}/{THING}/{s}", model.QOS.AT_LEAST_ONCE) for s in ("desired", "cmd", "ack")
    ]
    assert reqs[0]._to_payload() == {"topicName": f"edgeloop/{FLEET}/{THING}/desired", "qos": "1"}
    no_ack = subscribe_requests(FLEET, THING, with_ack=False)
    assert [r.topic_name.rsplit("/", 1)[1] for r in no_ack] == ["desired", "cmd"]


def test_iot_core_messages_map_back_to_our_streams() -> None:
    desired = protocol.DesiredState(device=THING, config={"capture_rate": 0.5}).to_bytes()

    def event(topic: str, payload: bytes) -> model.IoTCoreMessage:
        # as the SDK builds it from the nucleus's stream message
        wire = {"message": {"topicName": topic, "payload": base64.b64encode(payload).decode()}}
        return model.IoTCoreMessage._from_payload(wire)

    assert inbound(FLEET, THING, event(f"edgeloop/{FLEET}/{THING}/desired", desired)) == ("desired", desired)
    assert inbound(FLEET, THING, event(f"edgeloop/{FLEET}/{THING}/cmd", b"{}")) == ("cmd", b"{}")
    for topic in (f"edgeloop/{FLEET}/other/desired", f"edgeloop/{FLEET}/{THING}/results", "$aws/things/x/shadow"):
        with pytest.raises(ProtocolError):
            inbound(FLEET, THING, event(topic, b"{}"))
    with pytest.raises(ProtocolError):
        inbound(FLEET, THING, model.IoTCoreMessage())


# --------------------------------------------------------------------------- without a nucleus


def _start_fails(uplink: GreengrassUplink, match: str, within: float) -> float:
    async def scenario() -> float:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=match):
            await uplink.start()
        elapsed = time.monotonic() - t0
        assert not uplink.connected
        assert uplink._bridge.pending == 0  # nothing left waiting
        with pytest.raises(TransportError, match="not connected"):
            await uplink.publish("results", b"{}")
        await uplink.stop()
        return elapsed

    elapsed = run_async(scenario(), timeout=30)
    assert elapsed < within, f"start-up took {elapsed:.2f} s"
    return elapsed


def test_start_without_nucleus_variables_fails_at_once(tmp_path: Path) -> None:
    uplink = GreengrassUplink(_settings(tmp_path), env={})
    _start_fails(uplink, f"no Greengrass nucleus: {ENV_SOCKET} and {ENV_TOKEN} not set", within=0.5)
    uplink = GreengrassUplink(_settings(tmp_path), env={ENV_SOCKET: str(tmp_path / "ipc.socket")})
    _start_fails(uplink, f"{ENV_TOKEN} not set", within=0.5)


def test_start_with_no_socket_fails_at_once(tmp_path: Path) -> None:
    env = {ENV_SOCKET: str(tmp_path / "ipc.socket"), ENV_TOKEN: "token"}
    _start_fails(GreengrassUplink(_settings(tmp_path), env=env), "does not exist", within=0.5)


@pytest.fixture
def silent_nucleus(tmp_path: Path) -> Iterator[tuple[Path, list[socket.socket]]]:
    """A Unix socket that accepts IPC connections and never says a word."""
    path = tmp_path / "ipc.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    t = threading.Thread(target=accept, name="silent-nucleus", daemon=True)
    t.start()
    try:
        yield path, accepted
    finally:
        stop.set()
        t.join(5)
        for c in accepted:
            c.close()
        server.close()


def test_a_nucleus_that_never_answers_times_out_quickly(
    tmp_path: Path, silent_nucleus: tuple[Path, list[socket.socket]]
) -> None:
    path, accepted = silent_nucleus
    env = {ENV_SOCKET: str(path), ENV_TOKEN: "token"}
    elapsed = _start_fails(GreengrassUplink(_settings(tmp_path), env=env), "no answer within 3 s", within=5.0)
    assert accepted, "the transport never reached the socket"
    assert elapsed >= CONNECT_TIMEOUT * 0.9
    print(f"greengrass: silent nucleus detected after {elapsed:.2f} s")


def test_a_socket_that_hangs_up_fails_quickly(tmp_path: Path) -> None:
    path = tmp_path / "ipc.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        env = {ENV_SOCKET: str(path), ENV_TOKEN: "token"}
        _start_fails(GreengrassUplink(_settings(tmp_path), env=env), "connecting to the nucleus", within=5.0)
    finally:
        t.join(5)
        server.close()


# --------------------------------------------------------------------------- through the SDK's real IPC client


@pytest.fixture
def nucleus(tmp_path: Path) -> Iterator[FakeNucleus]:
    n = FakeNucleus(tmp_path / "ipc.socket", token="svcuid-" + uuid.uuid4().hex[:8])
    yield n
    n.close()


class Recorder:
    def __init__(self, uplink: GreengrassUplink) -> None:
        self.inbound: list[tuple[str, bytes]] = []
        self.ups: list[bool] = []
        uplink.set_handlers(lambda s, p: self.inbound.append((s, p)), self.ups.append)


def _uplink(tmp_path: Path, nucleus: FakeNucleus, token: str | None = None) -> GreengrassUplink:
    env = {ENV_SOCKET: str(nucleus.path), ENV_TOKEN: token or nucleus.token, "AWS_IOT_THING_NAME": THING}
    return GreengrassUplink(_settings(tmp_path, backoff_min=0.1, backoff_max=0.5), env=env)


def test_streams_flow_through_the_nucleus(tmp_path: Path, nucleus: FakeNucleus) -> None:
    """The SDK's real IPC client against a nucleus stand-in: subscribe, publish, receive, say online/offline."""
    topic = f"edgeloop/{FLEET}/{THING}"
    batch = protocol.ResultBatch(device=THING, seq_first=0, seq_last=0, ts=[1.0], model_version=[1], y_pred=[2.0])
    desired = protocol.DesiredState(device=THING, issued_at=3.0).to_bytes()

    async def scenario() -> None:
        uplink = _uplink(tmp_path, nucleus)
        rec = Recorder(uplink)
        await uplink.start()
        try:
            assert uplink.connected and rec.ups == [True]
            assert sorted(nucleus.subscriptions) == sorted(f"{topic}/{s}" for s in ("desired", "cmd", "ack"))
            await uplink.publish("results", batch.to_bytes())
            assert nucleus.payloads(f"{topic}/results") == [batch.to_bytes()]
            assert nucleus.deliver(f"{topic}/desired", desired) == 1
            await wait_until_async(lambda: bool(rec.inbound), 5, "the desired state")
            assert rec.inbound == [("desired", desired)]
        finally:
            await uplink.stop()
        assert rec.ups == [True, False]

    run_async(scenario(), timeout=30)
    status = [json.loads(p)["state"] for p in nucleus.payloads(f"{topic}/status")]
    assert status == ["online", "offline"]
    sent = next(p for p in nucleus.published if p["topicName"].endswith("/results"))
    assert sent["qos"] == "1" and sent.get("retain") is False
    assert all(p.get("retain") is True for p in nucleus.published if p["topicName"].endswith("/status"))


def test_a_wrong_token_is_refused_quickly(tmp_path: Path, nucleus: FakeNucleus) -> None:
    _start_fails(_uplink(tmp_path, nucleus, token="not-the-svcuid"), "connecting to the nucleus", within=5.0)
    assert nucleus.connects == 0


def test_a_publish_the_nucleus_refuses_raises(tmp_path: Path, nucleus: FakeNucleus) -> None:
    nucleus.denied.add(f"edgeloop/{FLEET}/{THING}/telemetry")

    async def scenario() -> None:
        uplink = _uplink(tmp_path, nucleus)
        await uplink.start()
        try:
            with pytest.raises(TransportError, match="UnauthorizedError: not authorized to publish"):
                await uplink.publish("telemetry", b"{}")
            assert uplink.connected
            await uplink.publish("results", b"{}")  # other topics still go
        finally:
            await uplink.stop()

    run_async(scenario(), timeout=30)


def test_reconnects_when_the_nucleus_hangs_up(tmp_path: Path, nucleus: FakeNucleus) -> None:
    async def scenario() -> None:
        uplink = _uplink(tmp_path, nucleus)
        rec = Recorder(uplink)
        await uplink.start()
        try:
            nucleus.hang_up()
            await wait_until_async(lambda: rec.ups[-1:] == [False], 5, "the disconnect")
            with pytest.raises(TransportError, match="not connected"):
                await uplink.publish("results", b"{}")
            await wait_until_async(lambda: rec.ups == [True, False, True], 10, "the reconnect")
            assert nucleus.connects == 2
            await uplink.publish("results", b'{"again":1}')
            assert nucleus.payloads(f"edgeloop/{FLEET}/{THING}/results") == [b'{"again":1}']
        finally:
            await uplink.stop()

    run_async(scenario(), timeout=30)
