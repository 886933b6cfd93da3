"""deploy/mosquitto/: the production broker config and ACL, run for real.

The shipped ``mosquitto.conf`` is started as a private broker — rewritten only for a free loopback
port and temporary certificate paths — with the shipped ``acl`` file unchanged. Clients
authenticate with certificates from a throwaway CA (device-a, device-b, edgeloop-cloud), and paho
MQTT 5 clients prove what a device may and may not do. "Does not arrive" is proven with a
sentinel: after the forbidden message, an allowed one is sent on the same connection; once the
allowed one arrives, the forbidden one would have arrived before it.
"""

from __future__ import annotations

import queue
import re
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from helpers_cloudsdk import Broker, Pki, free_port, run_mosquitto
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from runtime.mqttcompat import close_socket
from runtime.protocol import MAX_PAYLOAD_BYTES, topic

pytestmark = pytest.mark.mosquitto

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "deploy" / "mosquitto" / "acl"
CLOUD_CN = "edgeloop-cloud"
TIMEOUT = 10.0
NOT_AUTHORIZED = 0x87

DEVICE_WRITES = {"results", "telemetry", "stats", "reported", "status", "cmd/result"}
DEVICE_READS = {"desired", "cmd", "ack"}


# --------------------------------------------------------------------------- config as written


def conf_options(path: Path) -> dict[str, list[str]]:
    """Mosquitto config as ``{option: [value, ...]}`` (options may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.setdefault(key, []).append(value.strip())
    return out


def acl_rules(path: Path) -> list[tuple[str | None, str, str, str]]:
    """ACL lines as ``(user or None, kind, access, topic)``; kind is ``pattern`` or ``topic``."""
    rules: list[tuple[str | None, str, str, str]] = []
    user: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user":
            user = words[1]
        elif words[0] in ("pattern", "topic"):
            assert len(words) == 3, f"ACL line needs an access type and a topic: {line!r}"
            rules.append((user, words[0], words[1], words[2]))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return rules


def test_config_is_locked_down() -> None:
    opts = conf_options(CONF)
    assert opts["listener"] == ["8883"]
    assert opts["require_certificate"] == ["true"]
    assert opts["use_identity_as_username"] == ["true"]
    assert opts["allow_anonymous"] == ["false"]
    assert opts["persistence"] == ["true"]
    assert opts["acl_file"] and opts["cafile"] and opts["certfile"] and opts["keyfile"]
    assert "use_subject_as_username" not in opts
    assert "password_file" not in opts
    # Sized for the cloud's persistent session (see the comment in the file), never "unlimited" (0).
    assert int(opts["max_queued_messages"][0]) >= 100_000
    assert int(opts["max_queued_bytes"][0]) >= 256 * 1024 * 1024
    assert int(opts["max_packet_size"][0]) > MAX_PAYLOAD_BYTES
    text = CONF.read_text()
    for why in ("per client", "PUBACK", "ack"):
        assert why in text, f"the queue-limit comment should explain {why!r}"


def test_acl_is_per_identity() -> None:
    rules = acl_rules(ACL)
    body = "\n".join(line for line in ACL.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert "%c" not in body, "ACL patterns on the client id can be spoofed; use %u (the certificate CN)"
    device = [r for r in rules if r[1] == "pattern"]
    writes: set[str] = set()
    reads: set[str] = set()
    for user, _kind, access, t in device:
        assert user is None, "pattern lines must come before any user section"
        m = re.fullmatch(r"edgeloop/\+/%u/(.+)", t)
        assert m, f"device pattern {t!r} must be edgeloop/+/%u/<suffix>"
        # the topic is one our protocol builds
        assert topic("f", "d", m.group(1)) == f"edgeloop/f/d/{m.group(1)}"
        {"write": writes, "read": reads}[access].add(m.group(1))
    assert writes == DEVICE_WRITES
    assert reads == DEVICE_READS
    cloud = [r for r in rules if r[0] == CLOUD_CN]
    assert cloud == [(CLOUD_CN, "topic", "readwrite", "edgeloop/#")]
    assert {r[0] for r in rules} == {None, CLOUD_CN}


# --------------------------------------------------------------------------- the broker, for real


def production_config(port: int, pki: Pki, server: tuple[Path, Path], data: Path) -> str:
    """The shipped config with only the port, file paths and storage folder replaced."""
    replace = {
        "listener": f"{port} 127.0.0.1",
        "cafile": str(pki.ca),
        "certfile": str(server[0]),
        "keyfile": str(server[1]),
        "acl_file": str(ACL),
        "persistence_location": f"{data}/",
    }
    seen: set[str] = set()
    lines = []
    for raw in CONF.read_text().splitlines():
        key = raw.strip().partition(" ")[0]
        if key in replace and not raw.lstrip().startswith("#"):
            lines.append(f"{key} {replace[key]}")
            seen.add(key)
        else:
            lines.append(raw)
    assert seen == set(replace), f"config lost options: {set(replace) - seen}"
    return "\n".join(lines) + "\n"


@dataclass
class Client:
    """A paho MQTT 5 client on its own network thread, with its traffic in queues."""

    name: str
    mqttc: mqtt.Client
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    connected: threading.Event = field(default_factory=threading.Event)
    connect_rc: list[ReasonCode] = field(default_factory=list)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, t: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.mqttc.publish(t, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.name}: publish not sent ({info.rc})"
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, TIMEOUT), f"{self.name}: no PUBACK for {t}"
            return self.pubacks.pop(info.mid)

    def subscribe(self, t: str) -> ReasonCode:
        rc, mid = self.mqttc.subscribe(t, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, TIMEOUT), f"{self.name}: no SUBACK for {t}"
            return self.subacks.pop(mid)[0]

    def receive(self, t: str, payload: bytes) -> list[mqtt.MQTTMessage]:
        """Wait for the message ``(t, payload)``; return it and everything that came before it."""
        before: list[mqtt.MQTTMessage] = []
        while True:
            try:
                msg = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"{self.name} did not receive {t} within {TIMEOUT} s; got {[m.topic for m in before]}"
                ) from None
            before.append(msg)
            if msg.topic == t and msg.payload == payload:
                return before

    def close(self) -> None:
        self.mqttc.disconnect()
        self.mqttc.loop_stop()
        close_socket(self.mqttc)  # and paho's wake-up socket pair, which loop_stop leaves open


def connect(broker: Broker, pki: Pki, cn: str, *, client_id: str | None = None, will: str | None = None) -> Client:
    cert, key = pki.client(cn)
    mqttc = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or f"{cn}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )
    mqttc.tls_set(ca_certs=str(pki.ca), certfile=str(cert), keyfile=str(key), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        mqttc.will_set(will, b"offline", qos=1)
    c = Client(cn, mqttc)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: Properties | None) -> None:
        c.connect_rc.append(rc)
        c.connected.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        c.messages.put(msg)

    def on_publish(_c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: Properties) -> None:
        with c.cond:
            c.pubacks[mid] = rc
            c.cond.notify_all()

    def on_subscribe(_c: mqtt.Client, _u: object, mid: int, rcs: list[ReasonCode], _p: Properties) -> None:
        with c.cond:
            c.subacks[mid] = rcs
            c.cond.notify_all()

    mqttc.on_connect = on_connect
    mqttc.on_message = on_message
    mqttc.on_publish = on_publish
    mqttc.on_subscribe = on_subscribe
    mqttc.connect(broker.host, broker.port, keepalive=30)
    mqttc.loop_start()
    assert c.connected.wait(TIMEOUT), f"{cn}: no CONNACK"
    assert not c.connect_rc[0].is_failure, f"{cn}: connection refused: {c.connect_rc[0]}"
    return c


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    folder = tmp_path_factory.mktemp("mosquitto")
    data = folder / "data"
    data.mkdir()
    port = free_port()
    with run_mosquitto(folder, production_config(port, pki, pki.server(), data), port) as b:
        yield b


@pytest.fixture
def fleet() -> str:
    return f"acl-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clients(broker: Broker, pki: Pki) -> Iterator[dict[str, Client]]:
    made = {cn: connect(broker, pki, cn) for cn in ("device-a", "device-b", CLOUD_CN)}
    try:
        yield made
    finally:
        for c in made.values():
            c.close()


def test_device_publishes_its_own_topics_and_the_cloud_receives(clients: dict[str, Client], fleet: str) -> None:
    a, cloud = clients["device-a"], clients[CLOUD_CN]
    assert not cloud.subscribe(f"edgeloop/{fleet}/#").is_failure
    for suffix in sorted(DEVICE_WRITES):
        t = topic(fleet, "device-a", suffix)
        body = f"{suffix}-{uuid.uuid4().hex}".encode()
        assert not a.publish(t, body).is_failure
        cloud.receive(t, body)


def test_device_cannot_publish_as_another_device(clients: dict[str, Client], fleet: str) -> None:
    a, cloud = clients["device-a"], clients[CLOUD_CN]
    assert not cloud.subscribe(f"edgeloop/{fleet}/#").is_failure
    forbidden = [topic(fleet, "device-b", s) for s in sorted(DEVICE_WRITES)]
    # Topics the cloud writes are not the device's to write either, not even its own.
    forbidden += [topic(fleet, "device-a", s) for s in sorted(DEVICE_READS)]
    for t in forbidden:
        rc = a.publish(t, b"forged", retain=t.endswith(("reported", "status", "desired")))
        assert rc.value == NOT_AUTHORIZED, f"PUBACK for {t}: {rc} (want 0x87 not authorized)"
    sentinel = topic(fleet, "device-a", "results")
    assert not a.publish(sentinel, b"sentinel").is_failure
    before = cloud.receive(sentinel, b"sentinel")
    assert [m.topic for m in before] == [sentinel], "a forged message reached the cloud"


def test_device_cannot_read_another_devices_desired_state(clients: dict[str, Client], fleet: str) -> None:
    a, b, cloud = clients["device-a"], clients["device-b"], clients[CLOUD_CN]
    desired_a, desired_b = topic(fleet, "device-a", "desired"), topic(fleet, "device-b", "desired")
    assert not cloud.publish(desired_b, b"for-b", retain=True).is_failure
    assert not cloud.publish(desired_a, b"for-a", retain=True).is_failure

    # B's retained desired state, asked for by name and by wildcards (overlapping subscriptions
    # may deliver A's own messages more than once; that is fine).
    for t in (desired_b, f"edgeloop/{fleet}/+/desired", f"edgeloop/{fleet}/#", "#", desired_a):
        rc = a.subscribe(t)
        assert rc.value in (0, 1, NOT_AUTHORIZED), f"SUBACK for {t}: {rc}"
    # Retained messages follow each SUBACK on the same connection, so they all come before this.
    assert not cloud.publish(desired_a, b"sentinel").is_failure
    got = a.receive(desired_a, b"sentinel")
    assert any(m.payload == b"for-a" for m in got), "device-a did not get its own retained desired state"
    leaked = [m.topic for m in got if "/device-b/" in m.topic]
    assert not leaked, f"device-a read device-b's retained messages: {leaked}"

    # Live messages too: the cloud sends to B, then to A; A sees only its own.
    assert not cloud.publish(desired_b, b"live-b").is_failure
    assert not cloud.publish(topic(fleet, "device-b", "cmd"), b"cmd-b").is_failure
    assert not cloud.publish(topic(fleet, "device-b", "ack"), b"ack-b").is_failure
    assert not cloud.publish(desired_a, b"live-a").is_failure
    got = a.receive(desired_a, b"live-a")
    leaked = [m.topic for m in got if "/device-b/" in m.topic]
    assert not leaked, f"device-a received device-b's messages: {leaked}"

    # B does read its own (and the retained copy is the cloud's, not a forgery).
    b.subscribe(desired_b)
    b.receive(desired_b, b"for-b")


def test_cloud_reads_every_device(clients: dict[str, Client], fleet: str) -> None:
    a, b, cloud = clients["device-a"], clients["device-b"], clients[CLOUD_CN]
    assert cloud.subscribe(f"edgeloop/{fleet}/+/results").value in (0, 1)
    assert not a.publish(topic(fleet, "device-a", "results"), b"from-a").is_failure
    assert not b.publish(topic(fleet, "device-b", "results"), b"from-b").is_failure
    cloud.receive(topic(fleet, "device-a", "results"), b"from-a")
    cloud.receive(topic(fleet, "device-b", "results"), b"from-b")
    # Retained state of every device, on a fresh subscription.
    assert not a.publish(topic(fleet, "device-a", "reported"), b"rep-a", retain=True).is_failure
    assert not b.publish(topic(fleet, "device-b", "reported"), b"rep-b", retain=True).is_failure
    assert cloud.subscribe(f"edgeloop/{fleet}/+/reported").value in (0, 1)
    seen = {m.topic: m.payload for m in cloud.receive(topic(fleet, "device-b", "reported"), b"rep-b")}
    if topic(fleet, "device-a", "reported") not in seen:
        cloud.receive(topic(fleet, "device-a", "reported"), b"rep-a")


def test_client_id_cannot_borrow_another_identity(broker: Broker, pki: Pki, fleet: str) -> None:
    """A device that connects with another device's client id is still itself (its certificate)."""
    cloud = connect(broker, pki, CLOUD_CN)
    impostor = connect(broker, pki, "device-a", client_id="device-b")
    try:
        assert not cloud.subscribe(f"edgeloop/{fleet}/#").is_failure
        rc = impostor.publish(topic(fleet, "device-b", "results"), b"forged")
        assert rc.value == NOT_AUTHORIZED
        own = topic(fleet, "device-a", "results")
        assert not impostor.publish(own, b"sentinel").is_failure
        assert [m.topic for m in cloud.receive(own, b"sentinel")] == [own]
    finally:
        impostor.close()
        cloud.close()


def mqtt_connect_over_tls(broker: Broker, ctx: ssl.SSLContext) -> bytes:
    """Send a bare MQTT 3.1.1 CONNECT over TLS and return what the broker answers (b"" when it hangs up)."""
    client_id = b"probe"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(body)]) + body
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(packet)
                return s.recv(4)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def tls_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def test_connection_without_a_fleet_certificate_is_refused(broker: Broker, tmp_path: Path, pki: Pki) -> None:
    connack_ok = b"\x20\x02\x00\x00"
    # Control: a fleet certificate gets a CONNACK "accepted".
    assert mqtt_connect_over_tls(broker, tls_context(pki, *pki.client("device-a"))) == connack_ok
    # No client certificate at all (require_certificate true): no CONNACK.
    assert mqtt_connect_over_tls(broker, tls_context(pki)) == b""
    # A certificate from another CA, even with the cloud's CN: no CONNACK.
    rogue = Pki(tmp_path / "rogue")
    assert mqtt_connect_over_tls(broker, tls_context(pki, *rogue.client(CLOUD_CN))) == b""


def drop(c: Client) -> None:
    """Close the client's socket without DISCONNECT, as a power cut would."""
    sock = c.mqttc.socket()
    assert sock is not None
    sock.close()


def test_will_message_cannot_speak_for_another_device(broker: Broker, pki: Pki, fleet: str) -> None:
    """The broker publishes a client's will for it; a will on another device's status is dropped."""
    from helpers_cloudsdk import wait_until

    cloud = connect(broker, pki, CLOUD_CN)
    try:
        assert not cloud.subscribe(f"edgeloop/{fleet}/#").is_failure
        forged_id, own_id = f"forged-{uuid.uuid4().hex[:6]}", f"own-{uuid.uuid4().hex[:6]}"
        forged = connect(broker, pki, "device-a", client_id=forged_id, will=topic(fleet, "device-b", "status"))
        own = connect(broker, pki, "device-a", client_id=own_id, will=topic(fleet, "device-a", "status"))
        for c in (forged, own):
            c.mqttc.loop_stop()  # from here on the sockets are ours to break
        drop(forged)  # an unclean drop: the broker sends the will
        wait_until(lambda: f"Client {forged_id} closed its connection" in broker.log_text(), TIMEOUT, "the drop")
        drop(own)
        got = cloud.receive(topic(fleet, "device-a", "status"), b"offline")
        assert [m.topic for m in got] == [topic(fleet, "device-a", "status")], "a forged will reached the cloud"
        for c in (forged, own):
            close_socket(c.mqttc)
    finally:
        cloud.close()
