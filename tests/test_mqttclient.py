"""The asyncio MQTT client and the plain-MQTT uplink against real Mosquitto: TLS, mTLS, will, refusals."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cloudsdk import Pki, free_port, run_mosquitto, tls_listener
from helpers_device import settings, until

from runtime.errors import ConfigError, TransportError
from runtime.mqttclient import AsyncMqttClient, Backoff, parse_broker_url
from runtime.mqttcompat import TlsFiles
from runtime.protocol import Status, decode
from runtime.transports.mqtt import MqttUplink

REPO = Path(__file__).resolve().parent.parent


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_backoff_is_jittered_capped_and_resets():
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    waits = [b.next() for _ in range(8)]
    assert 0.25 <= waits[0] <= 0.5
    assert all(w <= 4.0 for w in waits) and max(waits) > 2.0
    assert len({round(w, 6) for w in waits}) == len(waits)  # jitter: no two alike
    b.reset()
    assert b.next() <= 0.5


def test_broker_urls():
    assert parse_broker_url("mqtt://h") == ("h", 1883, False)
    assert parse_broker_url("mqtts://h") == ("h", 8883, True)
    assert parse_broker_url("mqtt://h:1999") == ("h", 1999, False)
    for bad in ("http://h", "mqtt://", "mqtt://h:port"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_publish_while_disconnected_raises_and_reconnect_resubscribes(private_broker, unique_id):
    async def go():
        got: list[bytes] = []
        c = AsyncMqttClient(private_broker.url, client_id=f"c-{unique_id}", backoff_min=0.05, backoff_max=0.2)
        c.on_message = lambda m: got.append(m.payload)
        c.subscribe(f"t/{unique_id}", 1)
        await c.start()
        await until(lambda: c.connected, what="connect")
        await c.publish(f"t/{unique_id}", b"one", qos=1)
        await until(lambda: got == [b"one"])
        await asyncio.to_thread(private_broker.kill)
        await until(lambda: not c.connected, what="disconnect noticed")
        with pytest.raises(TransportError, match="not connected"):
            await c.publish(f"t/{unique_id}", b"lost", qos=1)
        await asyncio.to_thread(private_broker.start)
        await until(lambda: c.connected, 20, "reconnect with backoff")
        await c.publish(f"t/{unique_id}", b"two", qos=1)
        await until(lambda: got[-1:] == [b"two"], what="resubscribed after reconnect")
        await c.stop()

    run(go())


def test_mutual_tls_and_refused_client(tmp_path, unique_id):
    pki = Pki.create(tmp_path / "pki")
    scert, skey = pki.server()
    ccert, ckey = pki.client("dev-tls")
    port = free_port()
    with run_mosquitto(tmp_path / "b", tls_listener(port, pki.ca_cert, scert, skey) + "allow_anonymous true\n", port):

        async def go():
            ok = AsyncMqttClient(
                f"mqtts://localhost:{port}", client_id="tls-ok", tls=TlsFiles(pki.ca_cert, ccert, ckey)
            )
            await ok.start()
            await until(lambda: ok.connected, 20, "mutual TLS connect")
            await ok.publish("x/y", b"hi", qos=1)
            await ok.stop()
            # no client certificate: the broker refuses; the client keeps retrying, never connects
            nocert = AsyncMqttClient(
                f"mqtts://localhost:{port}", client_id="tls-no", tls=TlsFiles(pki.ca_cert), backoff_max=0.5
            )
            await nocert.start()
            await until(lambda: nocert.last_error is not None, 20, "a TLS failure recorded")
            assert not nocert.connected
            await nocert.stop()

        run(go())


WILL_SCRIPT = r"""
import asyncio, sys
from runtime.config import DeviceSettings
from runtime.transports.mqtt import MqttUplink
async def main():
    s = DeviceSettings.model_validate({"device_id": "dev-w", "fleet": sys.argv[2], "state_dir": "/tmp", "public_key": "/dev/null",
        "broker": {"url": sys.argv[1]}})
    up = MqttUplink.from_settings(s)
    up.set_handlers(lambda s, p: None, lambda c: print("up" if c else "down", flush=True))
    await up.start()
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_status_online_then_offline_will_on_abrupt_death(tmp_path, machine_broker, unique_id):
    fleet = f"will{unique_id}"

    async def go():
        seen: list[Status] = []
        watcher = AsyncMqttClient(machine_broker, client_id=f"w-{unique_id}")
        watcher.on_message = lambda m: seen.append(decode(Status, m.payload))
        watcher.subscribe(f"edgeloop/{fleet}/dev-w/status", 1)
        await watcher.start()
        await until(lambda: watcher.connected)
        p = subprocess.Popen(
            [sys.executable, "-c", WILL_SCRIPT, machine_broker, fleet],
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
        )
        try:
            await until(lambda: any(s.state == "online" for s in seen), 20, "online status")
            p.send_signal(signal.SIGKILL)
            p.wait()
            await until(lambda: seen[-1].state == "offline", 60, "the broker publishes the will")
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
        await watcher.stop()

    run(go(), timeout=90)


def test_uplink_maps_only_its_own_topics(tmp_path, fleet_keys, machine_broker, unique_id):
    _, pub = fleet_keys
    fleet = f"map{unique_id}"

    async def go():
        up = MqttUplink.from_settings(settings(tmp_path, pub, "dev-1", url=machine_broker, fleet=fleet))
        inbound: list[tuple[str, bytes]] = []
        up.set_handlers(lambda s, p: inbound.append((s, p)), lambda c: None)
        await up.start()
        await until(lambda: up.connected)
        other = AsyncMqttClient(machine_broker, client_id=f"o-{unique_id}")
        await other.start()
        await until(lambda: other.connected)
        await other.publish(f"edgeloop/{fleet}/dev-2/desired", b"not mine", qos=1)
        await other.publish(f"edgeloop/{fleet}/dev-1/cmd", b"mine", qos=1)
        await until(lambda: inbound == [("cmd", b"mine")], what="only dev-1's cmd")
        await other.stop()
        await up.stop()

    run(go())
