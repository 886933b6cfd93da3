"""Azure IoT Hub uplink (device) and IoT Edge uplink (module) through azure-iot-device's asyncio client.

How our streams map onto IoT Hub:

=================== ==========================================================================
``results``,        device-to-cloud messages, JSON/UTF-8, custom property ``stream`` = the suffix
``telemetry``,
``stats``
``desired``         the twin's desired property ``edgeloop`` (full twin on every connect, merged
                    with the patches that follow); delivered as our ``DesiredState`` JSON
``reported``        reported property ``edgeloop``; ``status`` → reported ``edgeloop_status``
``cmd``             direct methods: method name = command type, payload = our ``Command`` JSON
``cmd/result``      the method's response (matched by command id): 200 when ok, 500 when not
=================== ==========================================================================

IoT Hub's ingest is not ours, so acknowledgement is the broker's (``broker_ack_only``). The SDK
has no timeout of its own on twin calls (``get_twin`` waits forever for an answer), so every SDK
call goes through :class:`SdkBridge` with one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from runtime import protocol
from runtime.config import DeviceSettings
from runtime.errors import ConfigError, ProtocolError, TransportError
from runtime.transports._bridge import SdkBridge
from runtime.transports.base import Uplink

__all__ = [
    "DESIRED_KEY",
    "REPORTED_KEY",
    "STATUS_KEY",
    "AzureIotUplink",
    "merge_patch",
    "parse_connection_string",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "the azure-iot transport needs azure-iot-device: pip install 'edgeloop[azure]'"
#: The twin property that holds our DesiredState / ReportedState / Status.
DESIRED_KEY = "edgeloop"
REPORTED_KEY = "edgeloop"
STATUS_KEY = "edgeloop_status"
D2C_STREAMS = (protocol.RESULTS, protocol.TELEMETRY, protocol.STATS)
#: IoT Hub's limit for one device-to-cloud message.
MAX_MESSAGE_BYTES = 256 * 1024
#: IoT Hub waits at most this long for a direct method's response; older requests are forgotten.
METHOD_TTL = 300.0
_CONNECT_TIMEOUT = 30.0
_CALL_TIMEOUT = 15.0
_CORR_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def _sdk() -> Any:
    try:
        import azure.iot.device.aio as aio
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TransportError(INSTALL_HINT) from exc
    return aio


def _translate(exc: BaseException, what: str) -> TransportError:
    # azure.iot.device.exceptions.* (CredentialError, ConnectionFailedError, NoConnectionError,
    # OperationTimeout, ClientError ...) chain the pipeline's cause; show both.
    cause = exc.__cause__
    detail = f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    return TransportError(f"azure-iot: {what} failed: {detail}")


def parse_connection_string(cs: str) -> dict[str, str]:
    """``HostName=…;DeviceId=…;SharedAccessKey=…`` → dict; ConfigError naming what is missing."""
    parts: dict[str, str] = {}
    for item in cs.strip().strip(";").split(";"):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError("not a valid IoT Hub connection string (key=value;…)", "broker.connection_string")
        parts[key.strip()] = value.strip()
    for need in ("HostName", "DeviceId"):
        if need not in parts:
            raise ConfigError(f"connection string has no {need}", "broker.connection_string")
    if "SharedAccessKey" not in parts and parts.get("x509", "").lower() != "true":
        raise ConfigError("connection string has neither SharedAccessKey nor x509=true", "broker.connection_string")
    return parts


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch — how IoT Hub applies a twin patch (``null`` removes a key)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_meta(doc: Any) -> Any:
    """Drop the twin's own ``$version`` / ``$metadata`` keys (our payloads have no ``$`` keys)."""
    if isinstance(doc, dict):
        return {k: _strip_meta(v) for k, v in doc.items() if not k.startswith("$")}
    if isinstance(doc, list):
        return [_strip_meta(v) for v in doc]
    return doc


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise TransportError(f"azure-iot: {what} payload is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TransportError(f"azure-iot: {what} payload must be a JSON object")
    return doc


class AzureIotUplink(Uplink):
    """IoT Hub device (``azure-iot``) or IoT Edge module (``azure-edge``) uplink."""

    name = "azure-iot"
    broker_ack_only = True

    def __init__(self, settings: DeviceSettings, *, edge: bool = False) -> None:
        super().__init__()
        b = settings.broker
        self.name = "azure-edge" if edge else "azure-iot"
        self._edge = edge
        self._device = settings.device_id
        self._cs = b.connection_string
        self._ca = b.ca
        self._x509 = (b.cert, b.key) if b.cert is not None and b.key is not None else None
        self._host: str | None = None
        self._keepalive = b.keepalive
        self._retry_interval = max(1, min(int(b.backoff_max), 10))
        self._backoff = (b.backoff_min, b.backoff_max)
        self._module = False
        if not edge:
            if self._cs:
                parts = parse_connection_string(self._cs)
                self._module = "ModuleId" in parts
                if parts["DeviceId"] != settings.device_id:
                    raise ConfigError(
                        f"device_id {settings.device_id!r} is not the connection string's DeviceId "
                        f"{parts['DeviceId']!r} (on IoT Hub the device identity is the device id)",
                        "device_id",
                    )
            elif self._x509 is not None:
                self._host = urlsplit(b.url).hostname
                if not self._host or urlsplit(b.url).scheme not in ("azure", "mqtts"):
                    raise ConfigError(
                        "x509 auth needs the hub in broker.url, e.g. azure://myhub.azure-devices.net", "broker.url"
                    )
            else:
                raise ConfigError(
                    "azure-iot needs broker.connection_string (or broker.cert/key and broker.url for x509)",
                    "broker.connection_string",
                )
        for field in ("ca", "cert", "key"):
            p = getattr(b, field)
            if p is not None and not p.is_file():
                raise ConfigError(f"file not found: {p}", f"broker.{field}")
        self._bridge = SdkBridge(f"{self.name}:{self._device}", _translate)
        self._client: Any = None
        self._connected = False
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._resync: asyncio.Task[None] | None = None
        self._desired_doc: dict[str, Any] | None = None
        self._desired_version = -1
        self._methods: dict[str, tuple[Any, float]] = {}
        #: The last connection failure, for logs and tests.
        self.last_error: str | None = None
        #: Seconds to wait for one twin/method call (IoT Hub answers in well under a second).
        self.call_timeout = _CALL_TIMEOUT
        self.connect_timeout = _CONNECT_TIMEOUT

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> Self:
        return cls(settings, edge=settings.broker.transport == "azure-edge")

    @property
    def connected(self) -> bool:
        return self._connected

    # ------------------------------------------------------------------ client

    def _create_client(self) -> Any:
        aio = _sdk()
        opts: dict[str, Any] = {
            "keep_alive": self._keepalive,
            "connection_retry": True,
            "connection_retry_interval": self._retry_interval,
        }
        try:
            if self._edge:
                return aio.IoTHubModuleClient.create_from_edge_environment(**opts)
            if self._ca is not None:
                opts["server_verification_cert"] = self._ca.read_text()
            if self._cs:
                cls = aio.IoTHubModuleClient if self._module else aio.IoTHubDeviceClient
                return cls.create_from_connection_string(self._cs, **opts)
            from azure.iot.device import X509

            assert self._x509 is not None
            x509 = X509(cert_file=str(self._x509[0]), key_file=str(self._x509[1]))
            return aio.IoTHubDeviceClient.create_from_x509_certificate(
                x509=x509, hostname=self._host, device_id=self._device, **opts
            )
        except (OSError, ValueError, TypeError) as exc:
            # the SDK raises OSError outside IoT Edge, ValueError on a malformed string/certificate
            raise TransportError(f"{self.name}: cannot create the client: {exc}") from exc

    async def _set_handlers(self, client: Any) -> None:
        b = self._bridge
        client.on_connection_state_change = b.threadsafe(self._on_state_change)
        client.on_background_exception = b.threadsafe(self._on_background_exception)

        def subscribe() -> None:
            # These setters block until the SDK has subscribed (MQTT SUBSCRIBE round trip).
            client.on_twin_desired_properties_patch_received = b.threadsafe(self._on_desired_patch)
            client.on_method_request_received = b.threadsafe(self._on_method)

        await b.call(subscribe, "subscribing to twin patches and direct methods", self.call_timeout)

    async def _run(self) -> None:
        """First connection, retried with capped jittered backoff; the SDK keeps it up afterwards."""
        delay = self._backoff[0]
        while not self._stopping:
            client = self._client
            try:
                await self._bridge.run(client.connect(), "connect", self.connect_timeout)
                await self._set_handlers(client)
                await self._sync()
                return
            except TransportError as exc:
                self.last_error = str(exc)
                logger.warning("%s: %s; retrying in about %.1f s", self.name, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff[1])

    async def _sync(self) -> None:
        """After every (re)connect: fetch the full twin, hand desired state over, say online, report up."""
        twin = await self._bridge.run(self._client.get_twin(), "get_twin", self.call_timeout)
        desired = twin.get("desired") if isinstance(twin, dict) else None
        if isinstance(desired, dict):
            version = desired.get("$version")
            self._desired_version = version if isinstance(version, int) else -1
            doc = desired.get(DESIRED_KEY)
            self._desired_doc = doc if isinstance(doc, dict) else None
            self._deliver_desired()
        await self._patch_reported(STATUS_KEY, self._status("online"), self.call_timeout)
        self.last_error = None
        if not self._connected:
            self._connected = True
            logger.info("%s: connected as %s", self.name, self._device)
            self._notify(True)

    def _status(self, state: Literal["online", "offline"]) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(protocol.Status(device=self._device, state=state, ts=time.time()).to_bytes())
        return doc

    async def _patch_reported(self, key: str, value: dict[str, Any], timeout: float) -> None:
        await self._bridge.run(
            self._client.patch_twin_reported_properties({key: value}), f"patching reported {key}", timeout
        )

    def _notify(self, up: bool) -> None:
        try:
            self._on_connection(up)
        except Exception:
            logger.exception("%s: connection handler failed", self.name)

    # ------------------------------------------------------------------ SDK callbacks (on the loop)

    def _on_state_change(self) -> None:
        client = self._client
        if client is None or self._stopping:
            return
        if client.connected:
            # the SDK reconnected by itself: catch up on what changed while we were away
            resync_idle = self._resync is None or self._resync.done()
            if not self._connected and self._runner is not None and self._runner.done() and resync_idle:
                self._resync = asyncio.get_running_loop().create_task(
                    self._resync_after_reconnect(), name=f"{self.name}-resync"
                )
        elif self._connected:
            self._connected = False
            logger.warning("%s: disconnected; the SDK reconnects every %d s", self.name, self._retry_interval)
            self._notify(False)

    async def _resync_after_reconnect(self) -> None:
        delay = self._backoff[0]
        while not self._stopping and not self._connected and self._client is not None and self._client.connected:
            try:
                await self._sync()
                return
            except TransportError as exc:
                self.last_error = str(exc)
                logger.warning("%s: resync after reconnect failed: %s; retrying in about %.1f s", self.name, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff[1])

    def _on_background_exception(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning("%s: background error in the SDK: %s", self.name, self.last_error)

    def _on_desired_patch(self, patch: Any) -> None:
        if not isinstance(patch, dict):
            logger.warning("%s: dropped a desired patch that is not an object", self.name)
            return
        version = patch.get("$version")
        if isinstance(version, int):
            if version <= self._desired_version:
                return  # already in the full twin we fetched
            self._desired_version = version
        if DESIRED_KEY not in patch:
            return  # a change to someone else's properties
        self._desired_doc = merge_patch(self._desired_doc, patch[DESIRED_KEY])
        if self._desired_doc is not None and not isinstance(self._desired_doc, dict):
            logger.warning("%s: desired %r is not an object; ignored", self.name, DESIRED_KEY)
            self._desired_doc = None
        self._deliver_desired()

    def _deliver_desired(self) -> None:
        if not self._desired_doc:
            logger.info("%s: the twin has no desired %r", self.name, DESIRED_KEY)
            return
        payload = json.dumps(_strip_meta(self._desired_doc), separators=(",", ":")).encode()
        try:
            self._inbound(protocol.DESIRED, payload)
        except Exception:
            logger.exception("%s: inbound handler failed on desired", self.name)

    def _on_method(self, request: Any) -> None:
        now = time.monotonic()
        for cid, (_, at) in list(self._methods.items()):
            if now - at > METHOD_TTL:
                del self._methods[cid]
        name, rid, payload = request.name, request.request_id, request.payload
        body = dict(payload) if isinstance(payload, dict) else {} if payload is None else None
        if body is None:
            self._respond_soon(request, 400, {"error": "the method payload must be a JSON object (our Command)"})
            return
        body.setdefault("type", name)
        fallback = f"m-{rid}"
        body.setdefault("id", fallback if _CORR_ID.match(fallback) else f"m-{abs(hash(rid)):x}")
        if body["type"] != name:
            self._respond_soon(request, 400, {"error": f"method {name!r} carries a {body['type']!r} command"})
            return
        raw = json.dumps(body, separators=(",", ":")).encode()
        try:
            cmd = protocol.decode_command(raw)
        except ProtocolError as exc:
            self._respond_soon(request, 400, {"error": str(exc)})
            return
        if cmd.id in self._methods:
            self._respond_soon(request, 409, {"error": f"command id {cmd.id!r} is already running"})
            return
        self._methods[cmd.id] = (request, now)
        try:
            self._inbound(protocol.CMD, raw)
        except Exception:
            logger.exception("%s: inbound handler failed on cmd", self.name)

    def _respond_soon(self, request: Any, status: int, payload: dict[str, Any]) -> None:
        async def respond() -> None:
            try:
                await self._send_method_response(request, status, payload, self.call_timeout)
            except TransportError as exc:
                logger.warning("%s: could not answer method %s: %s", self.name, request.name, exc)

        asyncio.get_running_loop().create_task(respond(), name=f"{self.name}-method-response")

    async def _send_method_response(self, request: Any, status: int, payload: Any, timeout: float) -> None:
        from azure.iot.device import MethodResponse

        response = MethodResponse.create_from_method_request(request, status, payload)
        await self._bridge.run(self._client.send_method_response(response), f"answering method {request.name}", timeout)

    # ------------------------------------------------------------------ Uplink

    async def start(self) -> None:
        if self._client is not None:
            raise TransportError(f"{self.name}: already started")
        self._bridge.bind()
        self._stopping = False
        self._client = self._create_client()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-connect")

    async def stop(self) -> None:
        client = self._client
        if client is None:
            return
        self._stopping = True
        for task in (self._runner, self._resync):
            if task is not None and not task.done():
                task.cancel()
        was = self._connected
        if was:
            try:
                await self._patch_reported(STATUS_KEY, self._status("offline"), 5.0)
            except TransportError as exc:
                logger.warning("%s: could not report offline: %s", self.name, exc)
        self._connected = False
        try:
            await self._bridge.run(client.shutdown(), "shutdown", 10.0)
        except TransportError as exc:
            logger.warning("%s: %s", self.name, exc)
        self._bridge.fail_all(f"{self.name}: transport stopped")
        self._client = None
        self._methods.clear()
        if was:
            self._notify(False)

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        if not self._connected:
            raise TransportError(f"{self.name}: not connected (last error: {self.last_error or 'none'})")
        if suffix in D2C_STREAMS:
            await self._send_d2c(suffix, payload, timeout)
        elif suffix == protocol.REPORTED:
            await self._patch_reported(REPORTED_KEY, _json_object(payload, suffix), timeout)
        elif suffix == protocol.STATUS:
            await self._patch_reported(STATUS_KEY, _json_object(payload, suffix), timeout)
        elif suffix == protocol.CMD_RESULT:
            await self._answer_command(payload, timeout)
        else:
            raise TransportError(f"{self.name}: {suffix!r} cannot be sent to IoT Hub")

    async def _send_d2c(self, suffix: str, payload: bytes, timeout: float) -> None:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise TransportError(
                f"{self.name}: a {suffix} message of {len(payload)} bytes exceeds IoT Hub's {MAX_MESSAGE_BYTES} "
                "(lower outbox.send_batch_rows)"
            )
        from azure.iot.device import Message

        message = Message(payload, content_encoding="utf-8", content_type="application/json")
        message.custom_properties["stream"] = suffix
        await self._bridge.run(self._client.send_message(message), f"sending {suffix}", timeout)

    async def _answer_command(self, payload: bytes, timeout: float) -> None:
        try:
            result = protocol.CommandResult.from_bytes(payload)
        except ProtocolError as exc:
            raise TransportError(f"{self.name}: cmd/result is not a CommandResult: {exc}") from exc
        entry = self._methods.pop(result.id, None)
        if entry is None:
            logger.warning("%s: result of command %r has no waiting direct method (timed out?)", self.name, result.id)
            return
        request, _ = entry
        body = json.loads(payload)
        await self._send_method_response(request, 200 if result.ok else 500, body, timeout)
