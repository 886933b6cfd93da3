"""azure-iot / azure-edge transports: the real azure-iot-device SDK against Mosquitto playing IoT Hub.

azure-iot-device pins ``paho-mqtt<2``, so it lives in its own virtualenv (``.venv-azure``, built by
``make venv-azure``) and these tests run there, in a subprocess. The SDK always connects to port
8883, so that subprocess runs in a private network namespace (``unshare -n``, loopback only), where
a Mosquitto with TLS owns 127.0.0.1:8883 and ``localhost`` is the hub's host name. A small
responder (paho, subscribed to the hub's topics) answers the way IoT Hub does on the wire: twin
GET → ``$iothub/twin/res/200``, reported PATCH → ``$iothub/twin/res/204``, desired patches on
``$iothub/twin/PATCH/properties/desired``, direct methods on ``$iothub/methods/POST/{name}``.

Run from the main virtualenv, this module has one test, which launches the others there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest
from helpers_cloudsdk import Pki, require, run_async, run_mosquitto, wait_until, wait_until_async

from runtime import protocol
from runtime.config import DeviceSettings
from runtime.errors import ConfigError, TransportError
from runtime.mqttcompat import close_socket

ROOT = Path(__file__).resolve().parents[1]
NETNS_MARK = "EDGELOOP_TEST_NETNS"
HUB_PORT = 8883  # hard-coded in azure-iot-device

try:
    import azure.iot.device  # noqa: F401

    HAVE_AZURE = True
except ImportError:
    HAVE_AZURE = False


def azure_python() -> Path:
    return Path(os.environ.get("EDGELOOP_AZURE_PYTHON", ROOT / ".venv-azure" / "bin" / "python"))


if not HAVE_AZURE:

    def test_azure_transports_in_their_own_venv_and_netns() -> None:
        """Runs this module under .venv-azure inside ``unshare -n``; passes when every test there passes."""
        py = azure_python()
        require(py.exists(), f"{py} is missing: run `make venv-azure` (azure-iot-device needs its own venv)")
        require(shutil.which("unshare") is not None and shutil.which("ip") is not None, "unshare/ip are missing")
        require(os.geteuid() == 0, "a private network namespace (unshare -n) needs root here")
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
        require(probe.returncode == 0, f"unshare -n is not permitted here: {probe.stderr.strip()}")
        cmd = [
            "unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            str(py), "-m", "pytest", str(Path(__file__).relative_to(ROOT)),
            "-q", "--noconftest", "-p", "no:cacheprovider", "-o", "addopts=-ra --strict-markers", "--durations=5",
            # paho 1.6.1 (pinned by azure-iot-device) leaves its internal socketpair to Client.__del__,
            # which the garbage collector may run after the sockets' own finalisers.
            "-W", "ignore:unclosed <socket.socket:ResourceWarning",
        ]  # fmt: skip
        env = {**os.environ, NETNS_MARK: "1", "PYTHONPATH": str(ROOT / "tests")}
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
        out = proc.stdout + proc.stderr
        print(out[-6000:])
        print(f"azure suite in .venv-azure + netns: {time.monotonic() - t0:.1f} s")
        assert proc.returncode == 0, f"azure tests failed (exit {proc.returncode}):\n{out[-6000:]}"
        assert " passed" in out and " skipped" not in out and " failed" not in out

else:
    from paho.mqtt import client as paho

    from runtime.transports.azure_iot import (
        DESIRED_KEY,
        REPORTED_KEY,
        STATUS_KEY,
        AzureIotUplink,
        merge_patch,
        parse_connection_string,
    )

    # azure-iot-device builds its TLS contexts with ssl.PROTOCOL_TLSv1_2, deprecated since Python 3.10.
    pytestmark = pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")

    def _in_netns() -> None:
        if os.environ.get(NETNS_MARK) != "1":
            pytest.skip("run through the main suite (it enters a private network namespace for port 8883)")

    class IoTHub:
        """Answers IoT Hub's MQTT device API on a plain broker, like the hub (one device at a time)."""

        def __init__(self, ca: Path, cert: tuple[Path, Path] | None = None) -> None:
            self.desired: dict[str, Any] = {"$version": 1}
            self.reported: dict[str, Any] = {"$version": 1}
            self.events: list[tuple[str, dict[str, str], bytes]] = []
            self.reported_patches: list[dict[str, Any]] = []
            self.method_responses: dict[str, tuple[int, Any]] = {}
            self.answer_twin = True
            self.lock = threading.Lock()
            self._rid = 0
            self.client = paho.Client(client_id=f"hub-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv311)
            context = ssl.create_default_context(cafile=str(ca))  # (paho 1.6's tls_set() warns)
            if cert is not None:
                context.load_cert_chain(str(cert[0]), str(cert[1]))
            self.client.tls_set_context(context)
            self.client.on_message = self._on_message
            ready = threading.Event()
            self.client.on_subscribe = lambda *a: ready.set()
            self.client.connect("localhost", HUB_PORT)
            self.client.loop_start()
            self.client.subscribe(
                [
                    ("$iothub/twin/GET/#", 1),
                    ("$iothub/twin/PATCH/properties/reported/#", 1),
                    ("$iothub/methods/res/#", 1),
                    ("devices/+/messages/events/#", 1),
                    ("devices/+/modules/+/messages/events/#", 1),
                ]
            )
            assert ready.wait(10), "responder could not subscribe"

        @staticmethod
        def _query(topic: str) -> dict[str, str]:
            return dict(parse_qsl(topic.partition("?")[2]))

        def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
            topic, payload = msg.topic, bytes(msg.payload)
            with self.lock:
                if topic.startswith("$iothub/twin/GET/"):
                    if self.answer_twin:
                        rid = self._query(topic)["$rid"]
                        body = json.dumps({"desired": self.desired, "reported": self.reported})
                        client.publish(f"$iothub/twin/res/200/?$rid={rid}", body, qos=1)
                elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
                    rid = self._query(topic)["$rid"]
                    patch = json.loads(payload)
                    self.reported_patches.append(patch)
                    self.reported = merge_patch(self.reported, patch)
                    self.reported["$version"] = int(self.reported.get("$version", 1)) + 1
                    v = self.reported["$version"]
                    client.publish(f"$iothub/twin/res/204/?$rid={rid}&$version={v}", b"", qos=1)
                elif topic.startswith("$iothub/methods/res/"):
                    status = int(topic.split("/")[3])
                    rid = self._query(topic)["$rid"]
                    self.method_responses[rid] = (status, json.loads(payload) if payload else None)
                elif "/messages/events/" in topic:
                    base, _, bag = topic.partition("/messages/events/")
                    props = {unquote(k): unquote(v) for k, v in parse_qsl(bag, keep_blank_values=True)}
                    self.events.append((base, props, payload))

        def patch_desired(self, patch: dict[str, Any]) -> int:
            with self.lock:
                self.desired = merge_patch(self.desired, patch)
                version = self.desired["$version"] = int(self.desired["$version"]) + 1
            body = json.dumps({**patch, "$version": version})
            self.client.publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}", body, qos=1)
            return version

        def invoke(self, name: str, payload: Any, timeout: float = 10.0) -> tuple[int, Any]:
            with self.lock:
                self._rid += 1
                rid = f"{self._rid:x}"
            self.client.publish(f"$iothub/methods/POST/{name}/?$rid={rid}", json.dumps(payload), qos=1)
            wait_until(lambda: rid in self.method_responses, timeout, f"the response to method {name}")
            return self.method_responses[rid]

        def events_of(self, stream: str) -> list[bytes]:
            with self.lock:
                return [p for _, props, p in self.events if props.get("stream") == stream]

        def close(self) -> None:
            self.client.disconnect()
            self.client.loop_stop()
            close_socket(self.client)  # and paho's wake-up socket pair, which loop_stop leaves open

    @pytest.fixture(scope="module")
    def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
        return Pki(tmp_path_factory.mktemp("azure-pki"))

    @contextmanager
    def hub_broker(pki: Pki, folder: Path, *, client_certs: bool = False) -> Iterator[None]:
        """Mosquitto on 127.0.0.1:8883 with TLS; with ``client_certs`` it requires X.509 device certificates."""
        _in_netns()
        cert, key = pki.server()
        # IoT Hub keeps a device's MQTT session (the SDK connects with clean_session=False and does not
        # subscribe again after a reconnect), so the broker keeps sessions across a restart too.
        config = (
            f"allow_anonymous true\npersistence true\npersistence_location {folder}/\nlog_dest stdout\n"
            f"listener {HUB_PORT} 127.0.0.1\ncafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n"
        )
        if client_certs:
            config += "require_certificate true\nuse_identity_as_username true\n"
        with run_mosquitto(folder, config, HUB_PORT):
            yield

    @pytest.fixture
    def hub(pki: Pki, tmp_path: Path) -> Iterator[IoTHub]:
        with hub_broker(pki, tmp_path / "broker"):
            h = IoTHub(pki.ca)
            try:
                yield h
            finally:
                h.close()

    def _key() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    def _settings(tmp_path: Path, pki: Pki, device: str, **broker: Any) -> DeviceSettings:
        return DeviceSettings.model_validate(
            {
                "device_id": device,
                "state_dir": tmp_path / "state",
                "public_key": tmp_path / "fleet.pub",
                "broker": {
                    "transport": "azure-iot",
                    "url": "azure://localhost",
                    "connection_string": f"HostName=localhost;DeviceId={device};SharedAccessKey={_key()}",
                    "ca": pki.ca,
                    "backoff_min": 0.2,
                    "backoff_max": 2.0,
                    **broker,
                },
            }
        )

    class Recorder:
        def __init__(self, uplink: AzureIotUplink, on_cmd: Callable[[bytes], None] | None = None) -> None:
            self.inbound: list[tuple[str, bytes]] = []
            self.ups: list[bool] = []
            self.up = asyncio.Event()
            self._on_cmd = on_cmd
            uplink.set_handlers(self._inbound, self._connection)

        def _inbound(self, suffix: str, payload: bytes) -> None:
            self.inbound.append((suffix, payload))
            if suffix == "cmd" and self._on_cmd is not None:
                self._on_cmd(payload)

        def _connection(self, up: bool) -> None:
            self.ups.append(up)
            (self.up.set if up else self.up.clear)()

        def of(self, suffix: str) -> list[bytes]:
            return [p for s, p in self.inbound if s == suffix]

    # ----------------------------------------------------------------------- pure parts

    def test_connection_string_and_identity_are_checked(tmp_path: Path, pki: Pki) -> None:
        assert parse_connection_string("HostName=h;DeviceId=d;SharedAccessKey=k=")["SharedAccessKey"] == "k="
        with pytest.raises(ConfigError, match="DeviceId"):
            parse_connection_string("HostName=h;SharedAccessKey=k")
        with pytest.raises(ConfigError, match="neither SharedAccessKey"):
            parse_connection_string("HostName=h;DeviceId=d")
        with pytest.raises(ConfigError, match="not the connection string's DeviceId"):
            s = _settings(tmp_path, pki, "dev-1")
            AzureIotUplink.from_settings(s.model_copy(update={"device_id": "dev-2"}))
        with pytest.raises(ConfigError, match="connection_string"):
            AzureIotUplink.from_settings(_settings(tmp_path, pki, "dev-1", connection_string=None))

    def test_merge_patch_follows_twin_semantics() -> None:
        doc = {"model": {"name": "m", "version": 2}, "config": {"capture_rate": 0.5}}
        assert merge_patch(doc, {"config": {"capture_rate": 0.1}}) == {
            "model": {"name": "m", "version": 2},
            "config": {"capture_rate": 0.1},
        }
        assert merge_patch(doc, {"model": None}) == {"config": {"capture_rate": 0.5}}
        assert merge_patch(doc, {"model": {"weights": [1, 2]}})["model"] == {
            "name": "m",
            "version": 2,
            "weights": [1, 2],
        }

    # ----------------------------------------------------------------------- against the hub

    async def _connected(uplink: AzureIotUplink, rec: Recorder, timeout: float = 30) -> None:
        await uplink.start()
        async with asyncio.timeout(timeout):
            await rec.up.wait()

    def test_results_telemetry_and_stats_are_d2c_messages_with_a_stream_property(
        tmp_path: Path, pki: Pki, hub: IoTHub
    ) -> None:
        device = "dev-" + uuid.uuid4().hex[:6]

        async def scenario() -> None:
            uplink = AzureIotUplink.from_settings(_settings(tmp_path, pki, device))
            assert uplink.broker_ack_only
            rec = Recorder(uplink)
            with pytest.raises(TransportError, match="not connected"):
                await uplink.publish("results", b"{}")
            await _connected(uplink, rec)
            try:
                batches = [
                    protocol.ResultBatch(
                        device=device, seq_first=i, seq_last=i, ts=[1.0], model_version=[1], y_pred=[float(i)]
                    ).to_bytes()
                    for i in range(20)
                ]
                await asyncio.gather(*(uplink.publish("results", b) for b in batches))
                await uplink.publish("telemetry", b'{"t":1}')
                await uplink.publish("stats", b'{"s":1}')
                with pytest.raises(TransportError, match="cannot be sent"):
                    await uplink.publish("desired", b"{}")
                with pytest.raises(TransportError, match="exceeds IoT Hub"):
                    await uplink.publish("results", b"x" * (256 * 1024 + 1))
            finally:
                await uplink.stop()

        run_async(scenario())
        wait_until(lambda: len(hub.events_of("results")) == 20, 10, "20 result messages")
        assert sorted(hub.events_of("results")) == sorted(
            protocol.ResultBatch(
                device=device, seq_first=i, seq_last=i, ts=[1.0], model_version=[1], y_pred=[float(i)]
            ).to_bytes()
            for i in range(20)
        )
        assert hub.events_of("telemetry") == [b'{"t":1}'] and hub.events_of("stats") == [b'{"s":1}']
        base, props, _ = hub.events[0]
        assert base == f"devices/{device}"
        assert props["$.ct"] == "application/json" and props["$.ce"] == "utf-8"

    def test_desired_twin_then_patches_reach_the_handler_and_reported_goes_to_the_twin(
        tmp_path: Path, pki: Pki, hub: IoTHub
    ) -> None:
        device = "dev-" + uuid.uuid4().hex[:6]
        first = json.loads(
            protocol.DesiredState(device=device, config={"capture_rate": 0.25}, issued_at=5.0).to_bytes()
        )
        # the cloud wrote our DesiredState into the twin; IoT Hub drops nulls
        hub.desired = {DESIRED_KEY: {k: v for k, v in first.items() if v is not None}, "other": 1, "$version": 7}

        async def scenario() -> None:
            uplink = AzureIotUplink.from_settings(_settings(tmp_path, pki, device))
            rec = Recorder(uplink)
            await _connected(uplink, rec)
            try:
                assert len(rec.of("desired")) == 1  # the full twin, fetched before "up"
                got = protocol.DesiredState.from_bytes(rec.of("desired")[0])
                assert got.config == {"capture_rate": 0.25} and got.issued_at == 5.0 and got.device == device

                hub.patch_desired({"other": 2})  # not ours: nothing delivered
                hub.patch_desired({DESIRED_KEY: {"config": {"capture_rate": 0.5}, "issued_at": 6.0}})
                await wait_until_async(lambda: len(rec.of("desired")) == 2, 10, "the desired patch")
                got = protocol.DesiredState.from_bytes(rec.of("desired")[1])
                assert got.config == {"capture_rate": 0.5} and got.issued_at == 6.0 and got.device == device

                reported = protocol.ReportedState(device=device, transport="azure-iot", config_hash="abc")
                await uplink.publish("reported", reported.to_bytes())
                assert hub.reported[REPORTED_KEY]["config_hash"] == "abc"
                assert hub.reported[STATUS_KEY]["state"] == "online"
            finally:
                await uplink.stop()
            assert hub.reported[STATUS_KEY]["state"] == "offline"
            assert rec.ups == [True, False]

        run_async(scenario())

    def test_direct_method_ping_round_trip(tmp_path: Path, pki: Pki, hub: IoTHub) -> None:
        device = "dev-" + uuid.uuid4().hex[:6]
        results: dict[str, Any] = {}

        async def scenario() -> None:
            uplink = AzureIotUplink.from_settings(_settings(tmp_path, pki, device))
            loop = asyncio.get_running_loop()
            answers: list[asyncio.Task[None]] = []

            def daemon_answers(payload: bytes) -> None:  # what the daemon does with a cmd
                cmd = protocol.decode_command(payload)
                res = protocol.CommandResult(id=cmd.id, device=device, ok=cmd.type == "ping", data={"pong": True})
                answers.append(loop.create_task(uplink.publish("cmd/result", res.to_bytes())))

            rec = Recorder(uplink, on_cmd=daemon_answers)
            await _connected(uplink, rec)
            try:
                invoke = lambda name, body: loop.run_in_executor(None, hub.invoke, name, body)  # noqa: E731
                results["ping"] = await invoke("ping", {"id": "c-7"})
                results["no_id"] = await invoke("ping", {})
                results["bad"] = await invoke("set_capture_rate", {"id": "c-8", "rate": 7})
                results["mismatch"] = await invoke("flush", {"id": "c-9", "type": "ping"})
                results["not_object"] = await invoke("ping", [1, 2])
                assert [protocol.decode_command(p).id for p in rec.of("cmd")][:1] == ["c-7"]
                assert len(rec.of("cmd")) == 2  # only the two valid pings reached the daemon
                await asyncio.gather(*answers)
            finally:
                await uplink.stop()

        run_async(scenario())
        status, body = results["ping"]
        assert status == 200 and body["id"] == "c-7" and body["ok"] is True and body["data"] == {"pong": True}
        status, body = results["no_id"]
        assert status == 200 and body["id"].startswith("m-")
        for name in ("bad", "mismatch", "not_object"):
            assert results[name][0] == 400, (name, results[name])
        assert "rate" in results["bad"][1]["error"]

    def test_a_hub_that_never_answers_get_twin_does_not_hang(tmp_path: Path, pki: Pki, hub: IoTHub) -> None:
        hub.answer_twin = False
        device = "dev-" + uuid.uuid4().hex[:6]

        async def scenario() -> None:
            uplink = AzureIotUplink.from_settings(_settings(tmp_path, pki, device))
            uplink.call_timeout = 1.5
            rec = Recorder(uplink)
            await uplink.start()
            try:
                await wait_until_async(
                    lambda: "get_twin: no answer" in (uplink.last_error or ""), 15, "get_twin timeout"
                )
                assert not uplink.connected and rec.ups == []
                assert uplink._bridge.pending == 0
                hub.answer_twin = True  # the retry loop gets through once the hub answers
                async with asyncio.timeout(20):
                    await rec.up.wait()
            finally:
                await uplink.stop()

        run_async(scenario())

    def test_x509_device_certificate_instead_of_a_key(tmp_path: Path, pki: Pki) -> None:
        """Device authenticated by its certificate (hub host from broker.url): the broker requires it."""
        device = "dev-" + uuid.uuid4().hex[:6]
        cert, key = pki.client(device)
        settings = _settings(tmp_path, pki, device, connection_string=None, cert=cert, key=key)

        async def scenario(hub: IoTHub) -> None:
            uplink = AzureIotUplink.from_settings(settings)
            rec = Recorder(uplink)
            await _connected(uplink, rec)
            try:
                await uplink.publish("telemetry", b'{"x509":1}')
            finally:
                await uplink.stop()

        with hub_broker(pki, tmp_path / "broker", client_certs=True):
            hub = IoTHub(pki.ca, cert=pki.client("hub"))
            try:
                run_async(scenario(hub))
                wait_until(lambda: bool(hub.events_of("telemetry")), 10, "the x509 device's message")
                assert hub.events[0][0] == f"devices/{device}"
            finally:
                hub.close()

    def test_after_a_reconnect_the_twin_is_fetched_again(tmp_path: Path, pki: Pki) -> None:
        """The SDK reconnects by itself; we re-read the full twin, so a deploy made while offline arrives."""
        device = "dev-" + uuid.uuid4().hex[:6]
        folder = tmp_path / "broker"
        uplink = AzureIotUplink.from_settings(_settings(tmp_path, pki, device, backoff_max=1.0))
        # the device may be back before the responder has subscribed: a twin GET then goes unanswered
        uplink.call_timeout = 2.0
        rec = Recorder(uplink)

        async def scenario() -> None:
            with hub_broker(pki, folder):
                hub = IoTHub(pki.ca)
                hub.desired = {DESIRED_KEY: {"issued_at": 1.0}, "$version": 2}
                await _connected(uplink, rec)
                hub.close()
            await wait_until_async(lambda: not uplink.connected, 30, "the disconnect")
            assert rec.ups == [True, False]
            with pytest.raises(TransportError, match="not connected"):
                await uplink.publish("telemetry", b"{}")
            with hub_broker(pki, folder):
                hub = IoTHub(pki.ca)
                hub.desired = {DESIRED_KEY: {"issued_at": 2.0}, "$version": 5}  # deployed while we were away
                try:
                    async with asyncio.timeout(30):
                        await rec.up.wait()
                    assert rec.ups == [True, False, True]
                    issued = [protocol.DesiredState.from_bytes(p).issued_at for p in rec.of("desired")]
                    # (a resync retried after a timed-out call may hand the same state over twice)
                    assert issued[0] == 1.0 and issued[-1] == 2.0 and set(issued) == {1.0, 2.0}
                    await uplink.publish("telemetry", b'{"back":1}')
                    assert hub.reported[STATUS_KEY]["state"] == "online"
                finally:
                    await uplink.stop()
                    hub.close()

        run_async(scenario())

    def test_edge_module_from_the_edge_environment(
        tmp_path: Path, pki: Pki, hub: IoTHub, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """azure-edge: IoTHubModuleClient.create_from_edge_environment() with the IoT Edge dev variables
        (EdgeHubConnectionString + EdgeModuleCACertificateFile), against the same responder."""
        device, module = "edge-" + uuid.uuid4().hex[:6], "edgeloop"
        monkeypatch.setenv(
            "EdgeHubConnectionString",
            f"HostName=localhost;GatewayHostName=localhost;DeviceId={device};ModuleId={module};SharedAccessKey={_key()}",
        )
        monkeypatch.setenv("EdgeModuleCACertificateFile", str(pki.ca))
        hub.desired = {DESIRED_KEY: {"config": {"telemetry_interval": 30.0}}, "$version": 2}
        settings = _settings(tmp_path, pki, device, transport="azure-edge", connection_string=None, ca=None)

        async def scenario() -> None:
            uplink = AzureIotUplink.from_settings(settings)
            assert uplink.name == "azure-edge"
            rec = Recorder(uplink)
            await _connected(uplink, rec)
            try:
                assert protocol.DesiredState.from_bytes(rec.of("desired")[0]).config == {"telemetry_interval": 30.0}
                await uplink.publish("results", b'{"edge":1}')
            finally:
                await uplink.stop()

        run_async(scenario())
        wait_until(lambda: bool(hub.events_of("results")), 10, "the module's message")
        assert hub.events[0][0] == f"devices/{device}/modules/{module}"

    def test_edge_outside_iot_edge_fails_with_a_clear_error(
        tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("EdgeHubConnectionString", "EdgeModuleCACertificateFile", "IOTEDGE_WORKLOADURI"):
            monkeypatch.delenv(name, raising=False)
        settings = _settings(tmp_path, pki, "dev-x", transport="azure-edge", connection_string=None)

        async def scenario() -> None:
            uplink = AzureIotUplink.from_settings(settings)
            with pytest.raises(TransportError, match="IoT Edge environment not configured"):
                await uplink.start()

        run_async(scenario())
