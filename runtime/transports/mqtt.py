"""Plain MQTT uplink (Mosquitto, EMQX, any 3.1.1/5 broker): our topics under ``edgeloop/{fleet}/{device}/``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from runtime.config import DeviceSettings
from runtime.errors import TransportError
from runtime.mqttclient import AsyncMqttClient, MqttMessage
from runtime.mqttcompat import TlsFiles
from runtime.protocol import ACK, CMD, DESIRED, STATUS, Status, parse_topic, topic
from runtime.transports.base import Uplink

__all__ = ["MqttUplink"]

_INBOUND = (DESIRED, CMD, ACK)


class MqttUplink(Uplink):
    name = "mqtt"

    def __init__(self, client: AsyncMqttClient, fleet: str, device: str) -> None:
        super().__init__()
        self.client = client
        self.fleet = fleet
        self.device = device
        for suffix in _INBOUND:
            client.subscribe(topic(fleet, device, suffix), qos=1)
        client.on_message = self._on_message
        client.on_connection = self._on_client_connection
        self._status_task: asyncio.Task[Any] | None = None

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> MqttUplink:
        b = settings.broker
        tls = TlsFiles(b.ca, b.cert, b.key) if (b.ca or b.cert or b.url.startswith(("mqtts", "ssl"))) else None
        will = Status(device=settings.device_id, state="offline", ts=0.0).to_bytes()
        client = AsyncMqttClient(
            b.url,
            client_id=b.client_id or f"edgeloop-{settings.fleet}-{settings.device_id}",
            protocol=b.protocol,
            clean_start=False,
            session_expiry=b.session_expiry,
            keepalive=b.keepalive,
            tls=tls,
            username=b.username,
            password=b.password,
            backoff_min=b.backoff_min,
            backoff_max=b.backoff_max,
            will=(topic(settings.fleet, settings.device_id, STATUS), will, 1, True),
        )
        return cls(client, settings.fleet, settings.device_id)

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        if self.client.connected:
            try:
                await self.publish(STATUS, self._status("offline"), retain=True, timeout=2.0)
            except TransportError:
                pass
        await self.client.stop()

    async def publish(self, suffix: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        await self.client.publish(
            topic(self.fleet, self.device, suffix), payload, qos=1, retain=retain, timeout=timeout
        )

    def _status(self, state: str) -> bytes:
        return Status(device=self.device, state=state, ts=time.time()).to_bytes()

    def _on_client_connection(self, up: bool) -> None:
        if up:
            self._status_task = asyncio.create_task(self._announce(), name=f"{self.device}:status")
        self._on_connection(up)

    async def _announce(self) -> None:
        try:
            await self.publish(STATUS, self._status("online"), retain=True)
        except TransportError:
            pass  # the next connect announces again

    def _on_message(self, msg: MqttMessage) -> None:
        try:
            fleet, device, suffix = parse_topic(msg.topic)
        except Exception:
            return
        if fleet == self.fleet and device == self.device and suffix in _INBOUND:
            self._inbound(suffix, msg.payload)
