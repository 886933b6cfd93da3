"""AWS IoT Core uplink: awsiotsdk's MQTT 5 client (awscrt) with mutual TLS, our topics under the thing name.

The topics are the plain-MQTT ones (``edgeloop/{fleet}/{device}/…``) with ``device`` = the thing
name (``device_id``). IoT Core's policy decides what a certificate may publish; a refused publish
comes back as a PUBACK reason code (0x87 not authorized) and is raised, never taken as success.

Against an endpoint that is not ``*.amazonaws.com`` (a Mosquitto in a test, a gateway) the SDK's
IoT Core flow control (it throttles publishes to IoT Core's per-connection limits) and its metrics
(SDK name and version written into the MQTT username) are switched off; against IoT Core the
SDK's defaults stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

from runtime import protocol
from runtime.config import DeviceSettings
from runtime.errors import ConfigError, TransportError
from runtime.transports._bridge import SdkBridge
from runtime.transports.base import Uplink

if TYPE_CHECKING:  # pragma: no cover
    import awscrt.mqtt5

__all__ = ["AwsIotUplink", "builder_options", "is_aws_endpoint"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "the aws-iot transport needs awsiotsdk: pip install 'edgeloop[aws]'"
_INBOUND = (protocol.DESIRED, protocol.CMD, protocol.ACK)
#: PUBACK reason codes that mean "accepted" (0x10: accepted, nobody subscribed).
_PUBACK_OK = frozenset({0x00, 0x10})
_SUBACK_OK = frozenset({0x00, 0x01, 0x02})
_SETUP_TIMEOUT = 10.0


def _sdk() -> tuple[Any, Any]:
    try:
        import awscrt.mqtt5 as mqtt5
        from awsiot import mqtt5_client_builder
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TransportError(INSTALL_HINT) from exc
    return mqtt5, mqtt5_client_builder


def is_aws_endpoint(host: str) -> bool:
    """True for a real IoT Core endpoint (``xxxx-ats.iot.<region>.amazonaws.com[.cn]``)."""
    host = host.lower().rstrip(".")
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def _translate(exc: BaseException, what: str) -> TransportError:
    name = getattr(exc, "name", None) or type(exc).__name__  # awscrt.exceptions.AwsCrtError has .name
    return TransportError(f"aws-iot: {what} failed: {name}: {exc}")


def builder_options(settings: DeviceSettings) -> dict[str, Any]:
    """The keyword arguments for ``mqtt5_client_builder.mtls_from_path`` that do not need the SDK.

    Kept apart so the choice between IoT Core defaults and a plain broker is visible and testable.
    """
    b = settings.broker
    parts = urlsplit(b.url)
    if parts.scheme not in ("mqtts", "ssl", "aws"):
        raise ConfigError("aws-iot needs an mqtts:// (or aws://) endpoint URL", "broker.url")
    host = parts.hostname
    if not host:
        raise ConfigError("aws-iot needs the IoT Core endpoint host in broker.url", "broker.url")
    if b.cert is None or b.key is None:
        raise ConfigError("aws-iot needs the thing's certificate and key (broker.cert, broker.key)", "broker.cert")
    for field in ("cert", "key", "ca"):
        p: Path | None = getattr(b, field)
        if p is not None and not p.is_file():
            raise ConfigError(f"file not found: {p}", f"broker.{field}")
    keepalive = b.keepalive
    opts: dict[str, Any] = {
        "endpoint": host,
        "port": parts.port or 8883,
        "cert_filepath": str(b.cert),
        "pri_key_filepath": str(b.key),
        "client_id": b.client_id or settings.device_id,
        "keep_alive_interval_sec": keepalive,
        # must stay below the keep-alive (the SDK refuses keep_alive <= ping timeout + 1 s)
        "ping_timeout_ms": min(30_000, keepalive * 500),
        "session_expiry_interval_sec": b.session_expiry,
        "min_reconnect_delay_ms": int(b.backoff_min * 1000),
        "max_reconnect_delay_ms": int(b.backoff_max * 1000),
        "ack_timeout_sec": 60,
    }
    if b.ca is not None:
        opts["ca_filepath"] = str(b.ca)
    #: Not a builder argument: _build_client turns it into the SDK's flow-control enum.
    opts["iot_core_defaults"] = is_aws_endpoint(host)
    if not opts["iot_core_defaults"]:
        opts["enable_metrics_collection"] = False
    return opts


class AwsIotUplink(Uplink):
    """Uplink over AWS IoT Core (or any MQTT 5 broker with mutual TLS) through awscrt's MQTT 5 client."""

    name = "aws-iot"

    def __init__(self, settings: DeviceSettings, options: dict[str, Any]) -> None:
        super().__init__()
        self._settings = settings
        self._options = options
        self._fleet = settings.fleet
        self._device = settings.device_id
        self.broker_ack_only = settings.broker.ack == "broker"
        self._bridge = SdkBridge(f"aws-iot:{self._device}", _translate)
        self._client: awscrt.mqtt5.Client | None = None
        self._connected = False
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._setup: asyncio.Task[None] | None = None
        #: The last connection failure (TLS, refused CONNACK, ...), for logs and tests.
        self.last_error: str | None = None
        #: Topic filters the broker refused at the last subscribe (a policy that does not match).
        self.refused_subscriptions: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> Self:
        return cls(settings, builder_options(settings))

    # ------------------------------------------------------------------ helpers

    def _topic(self, suffix: str) -> str:
        return protocol.topic(self._fleet, self._device, suffix)

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return protocol.Status(device=self._device, state=state, ts=time.time()).to_bytes()

    def _build_client(self) -> awscrt.mqtt5.Client:
        mqtt5, builder = _sdk()
        opts = dict(self._options)
        if not opts.pop("iot_core_defaults"):
            opts["extended_validation_and_flow_control_options"] = mqtt5.ExtendedValidationAndFlowControlOptions.NONE
        will = mqtt5.PublishPacket(
            topic=self._topic(protocol.STATUS),
            payload=self._status("offline"),
            qos=mqtt5.QoS.AT_LEAST_ONCE,
            retain=True,
        )
        b = self._bridge
        try:
            return builder.mtls_from_path(
                will=will,
                session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_POST_SUCCESS,
                offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
                on_publish_received=b.threadsafe(self._on_publish),
                on_lifecycle_connection_success=b.threadsafe(self._on_connected),
                on_lifecycle_connection_failure=b.threadsafe(self._on_connect_failure),
                on_lifecycle_disconnection=b.threadsafe(self._on_disconnected),
                on_lifecycle_stopped=b.threadsafe(self._on_stopped),
                **opts,
            )
        except Exception as exc:  # awscrt raises on unreadable PEM files, bad options
            raise _translate(exc, "creating the MQTT 5 client") from exc

    # ------------------------------------------------------------------ SDK callbacks (on the loop)

    def _on_publish(self, data: Any) -> None:
        packet = data.publish_packet
        try:
            fleet, device, suffix = protocol.parse_topic(packet.topic)
        except Exception as exc:
            logger.warning("aws-iot: dropped message on unexpected topic: %s", exc)
            return
        if (fleet, device) != (self._fleet, self._device) or suffix not in _INBOUND:
            logger.warning("aws-iot: dropped message on %s (not ours)", packet.topic)
            return
        payload = packet.payload
        if isinstance(payload, str):
            payload = payload.encode()
        try:
            self._inbound(suffix, bytes(payload or b""))
        except Exception:
            logger.exception("aws-iot: inbound handler failed on %s", suffix)

    def _on_connected(self, data: Any) -> None:
        logger.info("aws-iot: connected to %s:%s", self._options["endpoint"], self._options["port"])
        self.last_error = None
        if self._setup is None or self._setup.done():
            self._setup = asyncio.get_running_loop().create_task(self._after_connect(), name="aws-iot-setup")

    def _on_connect_failure(self, data: Any) -> None:
        exc = getattr(data, "exception", None)
        connack = getattr(data, "connack_packet", None)
        reason = getattr(connack, "reason_code", None) if connack is not None else None
        self.last_error = f"{getattr(exc, 'name', type(exc).__name__)}" + (f" (CONNACK {reason!r})" if reason else "")
        logger.warning("aws-iot: connection failed: %s", self.last_error)

    def _on_disconnected(self, data: Any) -> None:
        exc = getattr(data, "exception", None)
        was = self._connected
        self._connected = False
        if self._setup is not None and not self._setup.done():
            self._setup.cancel()
        if not self._stopping:
            logger.warning("aws-iot: disconnected: %s", getattr(exc, "name", exc))
        if was:
            self._notify(False)

    def _on_stopped(self, data: Any) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def _notify(self, up: bool) -> None:
        try:
            self._on_connection(up)
        except Exception:
            logger.exception("aws-iot: connection handler failed")

    async def _after_connect(self) -> None:
        """Subscribe to our inbound topics, say online, then report the link as up."""
        mqtt5, _ = _sdk()
        client = self._client
        if client is None:
            return
        filters = [self._topic(s) for s in _INBOUND if not (s == protocol.ACK and self.broker_ack_only)]
        packet = mqtt5.SubscribePacket(
            subscriptions=[mqtt5.Subscription(topic_filter=f, qos=mqtt5.QoS.AT_LEAST_ONCE) for f in filters]
        )
        try:
            suback = await self._bridge.wait(client.subscribe(packet), "subscribe", _SETUP_TIMEOUT)
            codes = [int(c) for c in (suback.reason_codes or [])]
            self.refused_subscriptions = tuple(f for f, c in zip(filters, codes, strict=False) if c not in _SUBACK_OK)
            if self.refused_subscriptions:
                # Publishing may still be allowed: stay up, but make the policy problem loud.
                logger.error(
                    "aws-iot: broker refused subscriptions %s (reason codes %s): check the thing's policy",
                    list(self.refused_subscriptions),
                    [hex(c) for c in codes],
                )
        except TransportError as exc:
            logger.warning("aws-iot: subscribing after connect failed: %s", exc)
            return
        try:
            await self._publish(protocol.STATUS, self._status("online"), retain=True, timeout=_SETUP_TIMEOUT)
        except TransportError as exc:
            logger.error("aws-iot: could not publish online status: %s", exc)
        self._connected = True
        self._notify(True)

    # ------------------------------------------------------------------ Uplink

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        if self._client is not None:
            raise TransportError("aws-iot: already started")
        self._bridge.bind()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._client = self._build_client()
        self._client.start()
        logger.info(
            "aws-iot: connecting to %s:%s as %s (IoT Core defaults: %s)",
            self._options["endpoint"],
            self._options["port"],
            self._options["client_id"],
            self._options["iot_core_defaults"],
        )

    async def stop(self) -> None:
        client = self._client
        if client is None:
            return
        mqtt5, _ = _sdk()
        self._stopping = True
        if self._setup is not None and not self._setup.done():
            self._setup.cancel()
        if self._connected:
            try:
                await self._publish(protocol.STATUS, self._status("offline"), retain=True, timeout=5.0)
            except TransportError as exc:
                logger.warning("aws-iot: could not publish offline status: %s", exc)
        was = self._connected
        self._connected = False
        client.stop(mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION))
        assert self._stopped is not None
        try:
            async with asyncio.timeout(10.0):
                await self._stopped.wait()
        except TimeoutError:
            logger.warning("aws-iot: client did not report stopped within 10 s")
        self._bridge.fail_all("aws-iot: transport stopped")
        self._client = None
        if was:
            self._notify(False)

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        if not self._connected:
            raise TransportError(f"aws-iot: not connected (last error: {self.last_error or 'none'})")
        await self._publish(suffix, payload, retain=retain, timeout=timeout)

    async def _publish(self, suffix: str, payload: bytes, *, retain: bool, timeout: float) -> None:
        mqtt5, _ = _sdk()
        client = self._client
        if client is None:
            raise TransportError("aws-iot: not started")
        topic = self._topic(suffix)
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=retain)
        result = await self._bridge.wait(client.publish(packet), f"publish {suffix}", timeout)
        puback = getattr(result, "puback", None)
        code = getattr(puback, "reason_code", None)
        if code is None:
            raise TransportError(f"aws-iot: publish on {topic} completed without a PUBACK")
        if int(code) not in _PUBACK_OK:
            name = getattr(code, "name", str(code))
            detail = getattr(puback, "reason_string", None)
            raise TransportError(
                f"aws-iot: broker refused publish on {topic}: {name} (0x{int(code):02x})"
                + (f": {detail}" if detail else "")
            )
