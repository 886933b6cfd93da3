"""MqttUplink against real Mosquitto (with mosquitto_sub / mosquitto_pub as the other side), and the
in-memory MemoryUplink / MemoryHub the daemon's unit tests run on."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import Broker, require_service
from helpers_device import run, until

from runtime.config import DeviceSettings
from runtime.errors import ConfigError, ProtocolError, TransportError
from runtime.mqttclient import AsyncMqttClient
from runtime.protocol import Status, decode
from runtime.transports.memory import MemoryHub, MemoryUplink
from runtime.transports.mqtt import MqttUplink, MqttUplinkSettings

REPO = Path(__file__).resolve().parent.parent


def clients() -> tuple[str, str]:
    sub, pub = shutil.which("mosquitto_sub"), shutil.which("mosquitto_pub")
    require_service(
        sub is not None and pub is not None, "needs mosquitto_sub/mosquitto_pub (apt-get install mosquitto-clients)"
    )
    assert sub is not None and pub is not None
    return sub, pub


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


async def mosquitto_sub(url: str, topic: str, count: int = 1) -> list[bytes]:
    """The first ``count`` messages on ``topic`` (retained ones at once), read by mosquitto_sub."""
    sub, _ = clients()
    p = await asyncio.create_subprocess_exec(
        sub, "-h", "127.0.0.1", "-p", port_of(url), "-t", topic, "-C", str(count), "-W", "20", "-q", "1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await p.communicate()
    assert p.returncode == 0, f"mosquitto_sub exited {p.returncode}"
    return out.splitlines()


async def mosquitto_pub(url: str, topic: str, payload: bytes | None, *, retain: bool = False) -> None:
    _, pub = clients()
    args = [pub, "-h", "127.0.0.1", "-p", port_of(url), "-t", topic, "-q", "1"]
    args += ["-r"] if retain else []
    args += ["-n"] if payload is None else ["-m", payload.decode()]
    p = await asyncio.create_subprocess_exec(*args)
    assert await p.wait() == 0


def uplink_settings(url: str, fleet: str, device: str = "d1", **kw: Any) -> MqttUplinkSettings:
    return MqttUplinkSettings(url=url, fleet=fleet, device=device, backoff_min=0.05, backoff_max=0.2, **kw)


# --------------------------------------------------------------------------- settings


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        MqttUplinkSettings(url="http://h", fleet="f", device="d")
    with pytest.raises(ProtocolError):
        MqttUplinkSettings(url="mqtt://h", fleet="f", device="bad/device")
    with pytest.raises(ConfigError, match="cert and key"):
        MqttUplinkSettings(url="mqtts://h", fleet="f", device="d", cert=tmp_path / "c.pem")
    assert MqttUplinkSettings(url="mqtt://h", fleet="f", device="d").tls is None
    s = MqttUplinkSettings(url="mqtts://h", fleet="f", device="d", ca=tmp_path / "ca.pem")
    assert s.tls is not None and s.tls.ca == tmp_path / "ca.pem" and not s.tls.insecure


def test_settings_from_the_device_config(tmp_path: Path) -> None:
    d = DeviceSettings.model_validate(
        {
            "device_id": "pump-7",
            "fleet": "plant",
            "state_dir": tmp_path,
            "public_key": tmp_path / "pub",
            "broker": {"url": "mqtt://10.0.0.5:1884", "protocol": "3.1.1", "keepalive": 15, "ack": "broker"},
        }
    )
    s = MqttUplinkSettings.from_device_settings(d)
    assert (s.url, s.fleet, s.device, s.protocol, s.keepalive) == (
        "mqtt://10.0.0.5:1884",
        "plant",
        "pump-7",
        "3.1.1",
        15,
    )
    assert s.broker_ack_only and s.client_id is None
    up = MqttUplink.from_settings(d)
    assert up.client.client_id == "edgeloop-plant-pump-7" and up.broker_ack_only and not up.connected
    assert set(up.client.subscriptions) == {f"edgeloop/plant/pump-7/{x}" for x in ("desired", "cmd", "ack")}


# --------------------------------------------------------------------------- end to end


def test_uplink_end_to_end_with_mosquitto_clients(machine_broker: str, unique_id: str) -> None:
    fleet = f"up{unique_id}"
    root = f"edgeloop/{fleet}"

    async def go() -> None:
        await mosquitto_pub(machine_broker, f"{root}/d1/desired", b'{"v":1}', retain=True)  # set while offline
        inbound: list[tuple[str, bytes]] = []
        changes: list[bool] = []
        up = MqttUplink(uplink_settings(machine_broker, fleet))
        up.set_handlers(lambda s, p: inbound.append((s, p)), changes.append)
        results: list[bytes] = []
        cloud = AsyncMqttClient(machine_broker, client_id=f"cloud-{unique_id}", clean_start=True, session_expiry=0)
        cloud.on_message = lambda m: results.append(m.payload)
        cloud.subscribe(f"{root}/+/results", 1)
        async with cloud:
            await up.start()
            await cloud.wait_connected(10)
            await until(lambda: up.connected, what="the uplink connects")
            await until(lambda: inbound == [("desired", b'{"v":1}')], what="retained desired state on connect")
            online = decode(Status, (await mosquitto_sub(machine_broker, f"{root}/d1/status"))[0])
            assert online.state == "online" and online.device == "d1"

            await mosquitto_pub(machine_broker, f"{root}/d2/cmd", b"not mine")
            await mosquitto_pub(machine_broker, f"{root}/d1/cmd", b'{"type":"ping","id":"1"}')
            await mosquitto_pub(machine_broker, f"{root}/d1/ack", b'{"seq":5}')
            await until(lambda: len(inbound) == 3, what="cmd and ack")
            assert inbound[1:] == [("cmd", b'{"type":"ping","id":"1"}'), ("ack", b'{"seq":5}')]

            await up.publish("results", b'{"batch":1}')  # returns on the PUBACK
            await up.publish("reported", b'{"active":3}', retain=True)
            await until(lambda: results == [b'{"batch":1}'], what="results at the cloud")
            assert await mosquitto_sub(machine_broker, f"{root}/d1/reported") == [b'{"active":3}']
            await up.stop()
        assert changes == [True, False] and not up.connected
        offline = decode(Status, (await mosquitto_sub(machine_broker, f"{root}/d1/status"))[0])
        assert offline.state == "offline"
        for t in ("desired", "status", "reported"):  # leave the shared broker as we found it
            await mosquitto_pub(machine_broker, f"{root}/d1/{t}", None, retain=True)

    run(go())


WILL_SCRIPT = r"""
import asyncio, sys
from runtime.transports.mqtt import MqttUplink, MqttUplinkSettings
async def main():
    up = MqttUplink(MqttUplinkSettings(url=sys.argv[1], fleet=sys.argv[2], device="dev-w", keepalive=5))
    up.set_handlers(lambda s, p: None, lambda c: print("up" if c else "down", flush=True))
    await up.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_status_online_then_the_offline_will_on_an_abrupt_death(machine_broker: str, unique_id: str) -> None:
    fleet = f"will{unique_id}"
    status = f"edgeloop/{fleet}/dev-w/status"

    async def go() -> None:
        seen: list[Status] = []
        watcher = AsyncMqttClient(machine_broker, client_id=f"w-{unique_id}", clean_start=True, session_expiry=0)
        watcher.on_message = lambda m: seen.append(decode(Status, m.payload)) if m.payload else None
        watcher.subscribe(status, 1)
        async with watcher:
            await watcher.wait_connected(10)
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-c", WILL_SCRIPT, machine_broker, fleet,
                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert p.stdout is not None
                assert await asyncio.wait_for(p.stdout.readline(), 20) == b"up\n"
                await until(lambda: any(s.state == "online" for s in seen), 20, "online status")
                p.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
                await p.wait()
                await until(lambda: seen[-1].state == "offline", 20, "the will")
            finally:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            retained = decode(Status, (await mosquitto_sub(machine_broker, status))[0])
            assert retained.state == "offline" and retained.device == "dev-w"  # retained for late readers
            await mosquitto_pub(machine_broker, status, None, retain=True)

    run(go(), timeout=90)


def test_uplink_survives_a_broker_restart(make_broker: Callable[..., Broker], unique_id: str) -> None:
    fleet = f"rs{unique_id}"
    broker = make_broker(persistence=False)  # nothing retained survives: "online" must be said again

    async def go() -> None:
        changes: list[bool] = []
        up = MqttUplink(uplink_settings(broker.url, fleet))
        up.set_handlers(lambda s, p: None, changes.append)
        await up.start()
        await until(lambda: up.connected, what="connect")
        await asyncio.to_thread(broker.kill)
        await until(lambda: not up.connected, what="the drop")
        with pytest.raises(TransportError):
            await up.publish("results", b"{}")
        await asyncio.to_thread(broker.start)
        await until(lambda: up.connected, 20, "reconnect")
        await up.publish("results", b"{}")
        statuses = [decode(Status, x).state for x in await mosquitto_sub(broker.url, f"edgeloop/{fleet}/d1/status")]
        await up.stop()
        assert changes == [True, False, True, False] and statuses == ["online"]  # announced again after the restart

    run(go(), timeout=60)


# --------------------------------------------------------------------------- memory


def test_memory_uplink_records_delivers_and_simulates_faults() -> None:
    async def go() -> None:
        hub = MemoryHub()
        up = hub.uplink("d1")
        inbound: list[tuple[str, bytes]] = []
        changes: list[bool] = []
        up.set_handlers(lambda s, p: inbound.append((s, p)), changes.append)
        hub.deliver("d1", "desired", b"v1", retain=True)  # before the device is up: kept
        assert inbound == []
        await up.start()
        assert up.connected and changes == [True] and inbound == [("desired", b"v1")]
        await up.publish("results", b"r1")
        await up.publish("reported", b"s1", retain=True)
        assert up.of("results") == [b"r1"] and hub.of("reported", "d1") == [b"s1"]
        assert hub.retained[("d1", "reported")] == b"s1"
        assert decode(Status, up.of("status")[0]).state == "online"

        hub.deliver("d1", "cmd", b"c1")
        up.deliver("ack", b"a1")
        assert inbound[1:] == [("cmd", b"c1"), ("ack", b"a1")]

        up.refuse = "Quota exceeded"
        with pytest.raises(TransportError, match="Quota exceeded"):
            await up.publish("results", b"r2")
        up.refuse = None
        hub.stall_publish = True
        with pytest.raises(TransportError, match="no acknowledgement"):
            await up.publish("results", b"r3", timeout=0.01)
        hub.stall_publish = False

        hub.set_accepting(False)  # the broker goes away and refuses reconnects
        assert not up.connected and changes == [True, False]
        assert decode(Status, up.of("status")[-1]).state == "offline"  # the will
        with pytest.raises(TransportError, match="down"):
            await up.publish("results", b"r4")
        hub.deliver("d1", "cmd", b"lost")  # not connected: a non-retained message is gone
        hub.set_accepting(True)
        assert up.connected and changes == [True, False, True]
        assert inbound[-1] == ("desired", b"v1")  # retained state again on reconnect
        assert ("cmd", b"lost") not in inbound
        await up.stop()
        assert not up.connected and up.of("results") == [b"r1"]
        assert [decode(Status, x).state for x in up.of("status")] == ["online", "offline", "online", "offline"]

    run(go())


def test_memory_hub_keeps_devices_apart_and_refuses_when_closed() -> None:
    async def go() -> None:
        hub = MemoryHub(accepting=False)
        a, b = hub.uplink("a"), hub.uplink("b")
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        a.set_handlers(lambda s, p: got["a"].append(p), lambda up: None)
        b.set_handlers(lambda s, p: got["b"].append(p), lambda up: None)
        await a.start()
        await b.start()
        assert not a.connected and not b.connected
        with pytest.raises(TransportError, match="refuses"):
            a.set_link(True)
        hub.set_accepting(True)
        hub.deliver("a", "cmd", b"for a")
        await b.publish("results", b"from b")
        assert got == {"a": [b"for a"], "b": []}
        assert hub.of("results") == [b"from b"] and a.of("results") == []

    run(go())


def test_memory_uplink_from_device_settings(tmp_path: Path) -> None:
    d = DeviceSettings.model_validate(
        {
            "device_id": "m1",
            "state_dir": tmp_path,
            "public_key": tmp_path / "pub",
            "broker": {"transport": "memory", "ack": "broker"},
        }
    )
    up = MemoryUplink.from_settings(d)
    assert up.device == "m1" and up.broker_ack_only and up.name == "memory"
