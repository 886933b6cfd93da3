"""aws-iot transport: awsiotsdk's MQTT 5 client against a private Mosquitto with mutual TLS and ACLs.

The broker stands in for IoT Core: TLS with ``require_certificate``, the certificate's common name
as the identity (like a thing's certificate), and an ACL that lets a device use only
``edgeloop/+/<its name>/#`` (like an IoT Core policy on ``${iot:Connection.Thing.ThingName}``).
Mosquitto answers an ACL-denied MQTT 5 QoS 1 publish with PUBACK 0x87 (not authorized), the same
reason code IoT Core sends for a policy denial.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers_cloudsdk import (
    Pki,
    free_port,
    run_async,
    run_mosquitto,
    tls_listener,
    wait_until,
    wait_until_async,
)

from runtime import protocol
from runtime.config import DeviceSettings
from runtime.errors import ConfigError, TransportError
from runtime.mqttcompat import close_socket

pytest.importorskip("awscrt", reason="awsiotsdk is not installed: pip install 'edgeloop[aws]'")
paho = pytest.importorskip("paho.mqtt.client")

from runtime.transports.aws_iot import AwsIotUplink, builder_options, is_aws_endpoint  # noqa: E402

pytestmark = pytest.mark.mosquitto
FLEET = "f" + uuid.uuid4().hex[:8]


@dataclass
class AwsBroker:
    port: int
    pki: Pki
    folder: Path
    log: Path
    certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def cert(self, cn: str) -> tuple[Path, Path]:
        if cn not in self.certs:
            self.certs[cn] = self.pki.client(cn)
        return self.certs[cn]


def _broker_config(folder: Path, pki: Pki, port: int) -> str:
    server_cert, server_key = folder / "server.pem", folder / "server.key"
    if not server_cert.exists():
        cert, key = pki.server()
        server_cert.write_bytes(cert.read_bytes())
        server_key.write_bytes(key.read_bytes())
        server_key.chmod(0o600)
    acl = folder / "acl"
    acl.write_text(
        textwrap.dedent(
            """\
            # a device: only its own topics (the identity is the certificate's CN)
            pattern readwrite edgeloop/+/%u/#
            # the cloud: everything
            user cloud
            topic readwrite edgeloop/#
            """
        )
    )
    return (
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        "persistence false\n"
        f"acl_file {acl}\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type debug\n"
        + tls_listener(port, pki.ca, server_cert, server_key)
    )


@pytest.fixture(scope="module")
def aws_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsBroker]:
    folder = tmp_path_factory.mktemp("aws-broker")
    pki = Pki(folder / "pki")
    port = free_port()
    with run_mosquitto(folder, _broker_config(folder, pki, port), port) as broker:
        yield AwsBroker(port=port, pki=pki, folder=folder, log=broker.log)


class Cloud:
    """A plain paho MQTT 5 client with the cloud's certificate: subscribes and publishes like the ingest."""

    def __init__(self, broker: AwsBroker) -> None:
        cert, key = broker.cert("cloud")
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        self.client.tls_set(ca_certs=str(broker.pki.ca), certfile=str(cert), keyfile=str(key))
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))  # type: ignore[attr-defined]

    def subscribe(self, topic_filter: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self.subscribed.wait(10), "cloud subscription not acknowledged"

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_socket(self.client)  # and paho's wake-up socket pair, which loop_stop leaves open


@pytest.fixture
def cloud(aws_broker: AwsBroker) -> Iterator[Cloud]:
    c = Cloud(aws_broker)
    yield c
    c.close()


def _settings(
    tmp_path: Path, broker: AwsBroker, device: str, cert_cn: str | None = None, **broker_kw: object
) -> DeviceSettings:
    cert, key = broker.cert(cert_cn or device)
    return DeviceSettings.model_validate(
        {
            "device_id": device,
            "fleet": FLEET,
            "state_dir": tmp_path / "state",
            "public_key": tmp_path / "fleet.pub",
            "broker": {
                "transport": "aws-iot",
                "url": f"mqtts://127.0.0.1:{broker.port}",
                "ca": broker.pki.ca,
                "cert": cert,
                "key": key,
                "keepalive": 10,
                "backoff_min": 0.2,
                "backoff_max": 2.0,
                **broker_kw,
            },
        }
    )


class Recorder:
    """Inbound messages and connection changes as the daemon would see them (on the loop)."""

    def __init__(self, uplink: AwsIotUplink) -> None:
        self.inbound: list[tuple[str, bytes]] = []
        self.ups: list[bool] = []
        self.up = asyncio.Event()
        uplink.set_handlers(self._on_inbound, self._on_connection)

    def _on_inbound(self, suffix: str, payload: bytes) -> None:
        self.inbound.append((suffix, payload))

    def _on_connection(self, up: bool) -> None:
        self.ups.append(up)
        if up:
            self.up.set()
        else:
            self.up.clear()

    def of(self, suffix: str) -> list[bytes]:
        return [p for s, p in self.inbound if s == suffix]


@asynccontextmanager
async def connected(tmp_path: Path, broker: AwsBroker) -> AsyncIterator[tuple[AwsIotUplink, Recorder, str]]:
    name = "dev-" + uuid.uuid4().hex[:8]
    uplink = AwsIotUplink.from_settings(_settings(tmp_path, broker, name))
    rec = Recorder(uplink)
    await uplink.start()
    try:
        async with asyncio.timeout(20):
            await rec.up.wait()
        yield uplink, rec, name
    finally:
        await uplink.stop()


def _batch(device: str, seq: int) -> bytes:
    return protocol.ResultBatch(
        device=device, seq_first=seq, seq_last=seq, ts=[time.time()], model_version=[1], y_pred=[seq * 0.5]
    ).to_bytes()


# --------------------------------------------------------------------------- options (no broker)


def test_plain_broker_turns_flow_control_and_metrics_off(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_text("x")
    key.write_text("x")
    base = {"device_id": "thing-1", "state_dir": tmp_path, "public_key": tmp_path / "k"}

    def opts(url: str) -> dict[str, object]:
        s = DeviceSettings.model_validate(
            {**base, "broker": {"transport": "aws-iot", "url": url, "cert": cert, "key": key}}
        )
        return builder_options(s)

    plain = opts("mqtts://127.0.0.1:18883")
    assert plain["iot_core_defaults"] is False and plain["enable_metrics_collection"] is False
    assert plain["port"] == 18883 and plain["client_id"] == "thing-1"
    assert int(plain["ping_timeout_ms"]) < int(plain["keep_alive_interval_sec"]) * 1000  # type: ignore[call-overload]
    iot = opts("mqtts://a1b2c3-ats.iot.eu-west-1.amazonaws.com")
    assert iot["iot_core_defaults"] is True and "enable_metrics_collection" not in iot
    assert iot["port"] == 8883
    assert is_aws_endpoint("x-ats.iot.cn-north-1.amazonaws.com.cn") and not is_aws_endpoint("amazonaws.com.evil.org")


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    base = {"device_id": "thing-1", "state_dir": tmp_path, "public_key": tmp_path / "k"}
    with pytest.raises(ConfigError, match="certificate"):
        builder_options(DeviceSettings.model_validate({**base, "broker": {"transport": "aws-iot", "url": "mqtts://h"}}))
    with pytest.raises(ConfigError, match="mqtts"):
        builder_options(DeviceSettings.model_validate({**base, "broker": {"url": "mqtt://h"}}))
    missing = {"cert": tmp_path / "nope.pem", "key": tmp_path / "nope.key"}
    with pytest.raises(ConfigError, match="file not found"):
        builder_options(DeviceSettings.model_validate({**base, "broker": {"url": "mqtts://h", **missing}}))


# --------------------------------------------------------------------------- against Mosquitto + TLS


def test_results_flow_with_online_then_offline_status(tmp_path: Path, aws_broker: AwsBroker, cloud: Cloud) -> None:
    async def scenario() -> None:
        name = "dev-" + uuid.uuid4().hex[:8]
        cloud.subscribe(f"edgeloop/{FLEET}/{name}/#")
        uplink = AwsIotUplink.from_settings(_settings(tmp_path, aws_broker, name))
        rec = Recorder(uplink)
        with pytest.raises(TransportError, match="not connected"):
            await uplink.publish("results", _batch(name, 0))
        await uplink.start()
        async with asyncio.timeout(20):
            await rec.up.wait()
        assert uplink.connected and uplink.refused_subscriptions == ()

        sent = [_batch(name, i) for i in range(50)]
        await asyncio.gather(*(uplink.publish("results", p) for p in sent))
        await uplink.publish("telemetry", b'{"probe": 1}')
        results, telemetry = f"edgeloop/{FLEET}/{name}/results", f"edgeloop/{FLEET}/{name}/telemetry"
        # both: the broker forwards to the cloud 20 in flight at a time, so the telemetry published
        # last may still be on its way when the 50th result has arrived
        await wait_until_async(
            lambda: len(cloud.on(results)) >= 50 and bool(cloud.on(telemetry)), 10, "50 result batches and telemetry"
        )
        assert sorted(cloud.on(results)) == sorted(sent)
        assert cloud.on(telemetry) == [b'{"probe": 1}']

        status = f"edgeloop/{FLEET}/{name}/status"
        assert protocol.Status.from_bytes(cloud.on(status)[0]).state == "online"
        await uplink.stop()
        assert rec.ups == [True, False] and not uplink.connected
        await wait_until_async(lambda: len(cloud.on(status)) >= 2, 10, "offline status")
        assert protocol.Status.from_bytes(cloud.on(status)[-1]).state == "offline"
        # retained: a late subscriber sees offline
        late = Cloud(aws_broker)
        try:
            late.subscribe(status)
            await wait_until_async(lambda: bool(late.on(status)), 10, "retained status")
            assert protocol.Status.from_bytes(late.on(status)[0]).state == "offline"
        finally:
            late.close()

    run_async(scenario())


def test_retained_desired_and_commands_reach_the_inbound_handler(
    tmp_path: Path, aws_broker: AwsBroker, cloud: Cloud
) -> None:
    async def scenario() -> None:
        name = "dev-" + uuid.uuid4().hex[:8]
        desired = protocol.DesiredState(device=name, config={"capture_rate": 0.25}, issued_at=1.0).to_bytes()
        cloud.publish(f"edgeloop/{FLEET}/{name}/desired", desired, retain=True)  # while the device is away

        uplink = AwsIotUplink.from_settings(_settings(tmp_path, aws_broker, name))
        rec = Recorder(uplink)
        await uplink.start()
        try:
            async with asyncio.timeout(20):
                await rec.up.wait()
            await wait_until_async(lambda: bool(rec.of("desired")), 10, "retained desired state")
            assert protocol.DesiredState.from_bytes(rec.of("desired")[0]).config == {"capture_rate": 0.25}

            cmd = protocol.PingCommand(id="c-1", type="ping").to_bytes()
            cloud.publish(f"edgeloop/{FLEET}/{name}/cmd", cmd)
            ack = protocol.Ack(device=name, watermarks={"results": 41}).to_bytes()
            cloud.publish(f"edgeloop/{FLEET}/{name}/ack", ack)
            await wait_until_async(lambda: bool(rec.of("cmd")) and bool(rec.of("ack")), 10, "cmd and ack")
            assert rec.of("cmd") == [cmd] and rec.of("ack") == [ack]

            cloud.subscribe(f"edgeloop/{FLEET}/{name}/cmd/result")
            result = protocol.CommandResult(id="c-1", device=name, ok=True).to_bytes()
            await uplink.publish("cmd/result", result)
            await wait_until_async(lambda: bool(cloud.on(f"edgeloop/{FLEET}/{name}/cmd/result")), 10, "cmd result")
        finally:
            await uplink.stop()
            cloud.publish(f"edgeloop/{FLEET}/{name}/desired", b"", retain=True)  # clear the retained message

    run_async(scenario())


def test_publish_on_another_devices_topic_is_refused(tmp_path: Path, aws_broker: AwsBroker, cloud: Cloud) -> None:
    """A device configured as ``victim`` but holding ``intruder``'s certificate: the broker's ACL
    refuses its subscriptions (SUBACK 0x87) and every publish (PUBACK 0x87) — raised, not taken as sent."""

    async def scenario() -> None:
        victim = "dev-" + uuid.uuid4().hex[:8]
        intruder = "dev-" + uuid.uuid4().hex[:8]
        cloud.subscribe(f"edgeloop/{FLEET}/{victim}/#")
        uplink = AwsIotUplink.from_settings(_settings(tmp_path, aws_broker, victim, cert_cn=intruder))
        rec = Recorder(uplink)
        await uplink.start()
        try:
            async with asyncio.timeout(20):
                await rec.up.wait()
            # IoT Core refuses an unauthorised subscription in the SUBACK (recorded in
            # refused_subscriptions); Mosquitto 2.0 grants it and filters delivery by its read ACL.
            mine = {f"edgeloop/{FLEET}/{victim}/{s}" for s in ("desired", "cmd", "ack")}
            assert set(uplink.refused_subscriptions) <= mine
            with pytest.raises(TransportError, match=r"refused publish .*NOT_AUTHORIZED \(0x87\)"):
                await uplink.publish("results", _batch(victim, 0))
            assert uplink.connected  # a refusal is not a disconnect
        finally:
            await uplink.stop()
        # the cloud never saw anything on the victim's topics (the online/offline status was refused too)
        assert cloud.on(f"edgeloop/{FLEET}/{victim}/results") == []
        assert cloud.on(f"edgeloop/{FLEET}/{victim}/status") == []

    run_async(scenario())


def test_plain_broker_is_not_throttled(tmp_path: Path, aws_broker: AwsBroker) -> None:
    """With the SDK's IoT Core flow control on, publishes are paced to IoT Core's limits; off for Mosquitto."""

    async def scenario() -> None:
        async with connected(tmp_path, aws_broker) as (uplink, _, name):
            n = 600
            payloads = [_batch(name, i) for i in range(n)]
            t0 = time.perf_counter()
            await asyncio.gather(*(uplink.publish("results", p, timeout=30) for p in payloads))
            rate = n / (time.perf_counter() - t0)
        print(f"aws-iot: {n} QoS 1 publishes at {rate:.0f} msg/s (flow control off)")
        assert rate > 150, f"only {rate:.0f} msg/s: is client-side flow control still on?"

    run_async(scenario())


def test_reconnects_after_a_broker_restart_and_resubscribes(tmp_path: Path, aws_broker: AwsBroker) -> None:
    """The SDK reconnects with backoff by itself; we resubscribe, so desired state published meanwhile arrives."""
    folder = tmp_path / "broker"
    folder.mkdir()
    port = free_port()
    broker = AwsBroker(
        port=port, pki=aws_broker.pki, folder=folder, log=folder / "mosquitto.log", certs=aws_broker.certs
    )
    config = _broker_config(folder, broker.pki, port)
    name = "dev-" + uuid.uuid4().hex[:8]
    uplink = AwsIotUplink.from_settings(_settings(tmp_path, broker, name))
    rec = Recorder(uplink)

    async def until_up() -> None:
        async with asyncio.timeout(30):
            await rec.up.wait()

    async def scenario() -> None:
        with run_mosquitto(folder, config, port):
            await uplink.start()
            await until_up()
            await uplink.publish("results", _batch(name, 0))
        # broker gone
        await wait_until_async(lambda: not uplink.connected, 15, "the disconnect")
        assert rec.ups == [True, False]
        with pytest.raises(TransportError, match="not connected"):
            await uplink.publish("results", _batch(name, 1))
        with run_mosquitto(folder, config, port):
            cloud = Cloud(broker)
            try:
                desired = protocol.DesiredState(device=name, issued_at=2.0).to_bytes()
                cloud.publish(f"edgeloop/{FLEET}/{name}/desired", desired, retain=True)
                await until_up()
                assert rec.ups == [True, False, True]
                await wait_until_async(lambda: bool(rec.of("desired")), 10, "desired after the reconnect")
                assert rec.of("desired") == [desired]
                cloud.subscribe(f"edgeloop/{FLEET}/{name}/results")
                await uplink.publish("results", _batch(name, 1))
                await wait_until_async(lambda: bool(cloud.on(f"edgeloop/{FLEET}/{name}/results")), 10, "results")
            finally:
                await uplink.stop()
                cloud.close()

    run_async(scenario())


def test_tls_failure_with_an_unknown_ca_is_reported(tmp_path: Path, aws_broker: AwsBroker) -> None:
    """A certificate from another CA: the handshake fails (slowly, in awscrt); the link never comes up."""

    async def scenario() -> None:
        rogue = Pki(tmp_path / "rogue", name="rogue CA")
        cert, key = rogue.client("dev-rogue")
        s = _settings(tmp_path, aws_broker, "dev-rogue")
        s = s.model_copy(update={"broker": s.broker.model_copy(update={"cert": cert, "key": key})})
        uplink = AwsIotUplink.from_settings(s)
        rec = Recorder(uplink)
        await uplink.start()
        try:
            await wait_until_async(lambda: uplink.last_error is not None, 45, "a connection failure")
            assert not uplink.connected and rec.ups == []
            with pytest.raises(TransportError, match="not connected"):
                await uplink.publish("results", _batch("dev-rogue", 0))
        finally:
            await uplink.stop()

    run_async(scenario())


def test_will_publishes_offline_when_the_device_dies(tmp_path: Path, aws_broker: AwsBroker, cloud: Cloud) -> None:
    """Kill -9 a process running the transport: the broker publishes the will (retained ``offline``)."""
    name = "dev-" + uuid.uuid4().hex[:8]
    status = f"edgeloop/{FLEET}/{name}/status"
    cloud.subscribe(status)
    settings = _settings(tmp_path, aws_broker, name)
    script = textwrap.dedent(
        """\
        import asyncio, sys
        from runtime.config import DeviceSettings
        from runtime.transports.aws_iot import AwsIotUplink

        async def main():
            s = DeviceSettings.model_validate_json(sys.stdin.read())
            up = AwsIotUplink.from_settings(s)
            ready = asyncio.Event()
            up.set_handlers(lambda s, p: None, lambda ok: ok and ready.set())
            await up.start()
            await ready.wait()
            print("up", flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(settings.model_dump_json())
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "up"
        wait_until(lambda: len(cloud.on(status)) >= 1, 10, "online status")
        proc.kill()
        proc.wait(10)
        wait_until(lambda: len(cloud.on(status)) >= 2, 15, "the will (offline status)")
        assert [json.loads(p)["state"] for p in cloud.on(status)] == ["online", "offline"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
