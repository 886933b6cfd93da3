"""Plain MQTT uplink (Mosquitto, EMQX, any 3.1.1/5 broker): our topics under ``edgeloop/{fleet}/{device}/``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.errors import ConfigError, ProtocolError, TransportError
from runtime.mqttclient import AsyncMqttClient, MqttMessage, parse_broker_url
from runtime.mqttcompat import MqttProtocol, TlsFiles, Will
from runtime.protocol import ACK, CMD, DESIRED, STATUS, Status, parse_topic, topic
from runtime.transports.base import Uplink

if TYPE_CHECKING:
    from runtime.config import DeviceSettings

__all__ = ["MqttUplink", "MqttUplinkSettings"]

logger = logging.getLogger(__name__)

_INBOUND = (DESIRED, CMD, ACK)


@dataclass(frozen=True)
class MqttUplinkSettings:
    """What the plain-MQTT uplink needs; the daemon's config builds it (see :meth:`from_device_settings`)."""

    url: str
    fleet: str
    device: str
    client_id: str | None = None  # default: edgeloop-{fleet}-{device}
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    protocol: MqttProtocol = "5"
    session_expiry: int = 3600
    keepalive: int = 30
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    #: Rows are deleted on PUBACK (``ack = broker``), not on the cloud's ``ack`` message.
    broker_ack_only: bool = False

    def __post_init__(self) -> None:
        parse_broker_url(self.url)  # ConfigError for a URL we cannot use
        topic(self.fleet, self.device, STATUS)  # ProtocolError for ids unsafe in a topic
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key go together (mutual TLS)", "broker.cert")

    @property
    def tls(self) -> TlsFiles | None:
        if self.url.startswith(("mqtts:", "ssl:")) or self.ca or self.cert:
            return TlsFiles(self.ca, self.cert, self.key)
        return None

    @classmethod
    def from_device_settings(cls, settings: DeviceSettings) -> MqttUplinkSettings:
        b = settings.broker
        return cls(
            url=b.url,
            fleet=settings.fleet,
            device=settings.device_id,
            client_id=b.client_id,
            ca=b.ca,
            cert=b.cert,
            key=b.key,
            username=b.username,
            password=b.password,
            protocol=b.protocol,
            session_expiry=b.session_expiry,
            keepalive=b.keepalive,
            backoff_min=b.backoff_min,
            backoff_max=b.backoff_max,
            broker_ack_only=b.ack == "broker",
        )


class MqttUplink(Uplink):
    """Subscribes to its own ``desired``, ``cmd`` and ``ack``; announces ``status`` online (retained)
    on every connect, with a retained ``offline`` last will for an abrupt death."""

    name = "mqtt"

    def __init__(self, settings: MqttUplinkSettings, *, client: AsyncMqttClient | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.fleet = settings.fleet
        self.device = settings.device
        self.broker_ack_only = settings.broker_ack_only
        self.client = client if client is not None else self._make_client(settings)
        for suffix in _INBOUND:
            self.client.subscribe(topic(self.fleet, self.device, suffix), qos=1)
        self.client.on_message = self._on_message
        self.client.on_connection = self._on_client_connection
        self._announce_task: asyncio.Task[Any] | None = None

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> MqttUplink:
        return cls(MqttUplinkSettings.from_device_settings(settings))

    @staticmethod
    def _make_client(s: MqttUplinkSettings) -> AsyncMqttClient:
        offline = Status(device=s.device, state="offline", ts=0.0).to_bytes()
        return AsyncMqttClient(
            s.url,
            client_id=s.client_id or f"edgeloop-{s.fleet}-{s.device}",
            protocol=s.protocol,
            clean_start=False,
            session_expiry=s.session_expiry,
            keepalive=s.keepalive,
            tls=s.tls,
            username=s.username,
            password=s.password,
            backoff_min=s.backoff_min,
            backoff_max=s.backoff_max,
            will=Will(topic(s.fleet, s.device, STATUS), offline, qos=1, retain=True),
        )

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        """Say ``offline`` (a clean disconnect fires no will), then disconnect."""
        if self._announce_task is not None:
            self._announce_task.cancel()
            await asyncio.gather(self._announce_task, return_exceptions=True)
        if self.client.connected:
            try:
                await self.publish(STATUS, self._status("offline"), retain=True, timeout=2.0)
            except TransportError as exc:
                logger.info("%s: could not publish offline status: %s", self.device, exc)
        await self.client.close()

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        await self.client.publish(
            topic(self.fleet, self.device, suffix), payload, qos=1, retain=retain, timeout=timeout
        )

    def _status(self, state: str) -> bytes:
        return Status(device=self.device, state=state, ts=time.time()).to_bytes()

    def _on_client_connection(self, up: bool) -> None:
        if up:
            self._announce_task = asyncio.create_task(self._announce(), name=f"mqtt-uplink:{self.device}:status")
        self._on_connection(up)

    async def _announce(self) -> None:
        try:
            await self.publish(STATUS, self._status("online"), retain=True)
        except TransportError as exc:
            logger.info("%s: online status not published (%s); the next connect announces again", self.device, exc)

    def _on_message(self, msg: MqttMessage) -> None:
        try:
            fleet, device, suffix = parse_topic(msg.topic)
        except ProtocolError as exc:
            logger.warning("%s: message on a foreign topic dropped: %s", self.device, exc)
            return
        if fleet == self.fleet and device == self.device and suffix in _INBOUND:
            self._inbound(suffix, msg.payload)
        else:
            logger.warning("%s: message on %s dropped (not subscribed to it)", self.device, msg.topic)
