"""Readings from the local MQTT topic ``edgeloop/{fleet}/{device}/readings``.

With paho 2.x each message is acknowledged to the broker only after the micro-batch holding its
result commits to the outbox (``manual_ack``): a crash before the commit makes the broker
redeliver it (at-least-once into the outbox). Under paho 1.6.1, which has no manual acks, the
broker considers a reading delivered when it arrives: at-most-once from this source.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from runtime.config import DeviceSettings
from runtime.errors import ProtocolError
from runtime.mqttclient import AsyncMqttClient, MqttMessage
from runtime.mqttcompat import TlsFiles
from runtime.pipeline import Pipeline
from runtime.protocol import READINGS, topic
from runtime.sources import parse_line

__all__ = ["MqttSource"]

logger = logging.getLogger(__name__)


class MqttSource:
    name = "mqtt-readings"

    def __init__(self, pipeline: Pipeline, client: AsyncMqttClient, topic_name: str) -> None:
        self.pipeline = pipeline
        self.client = client
        self.topic = topic_name
        self.bad = 0
        self.max_unacked = 16
        client.subscribe(topic_name, qos=1)
        client.on_message = self._on_message
        self._stop = asyncio.Event()

    @classmethod
    def from_settings(cls, pipeline: Pipeline, settings: DeviceSettings) -> MqttSource:
        b = settings.broker
        url = settings.source.url or b.url
        same = settings.source.url is None
        client = AsyncMqttClient(
            url,
            client_id=f"edgeloop-{settings.fleet}-{settings.device_id}-readings",
            protocol=b.protocol,
            clean_start=False,
            session_expiry=b.session_expiry,
            tls=TlsFiles(b.ca, b.cert, b.key) if same and (b.ca or b.cert) else None,
            username=b.username if same else None,
            password=b.password if same else None,
            manual_ack=True,
            max_inflight=0,
        )
        return cls(pipeline, client, topic(settings.fleet, settings.device_id, READINGS))

    def _on_message(self, msg: MqttMessage) -> None:
        ack: Callable[[], None] = msg.ack
        try:
            r = parse_line(msg.payload)
        except ProtocolError as exc:
            self.bad += 1
            self.pipeline.counters.readings += 1
            self.pipeline.counters.rejected += 1
            logger.warning("readings topic: bad reading dropped: %s", exc)
            ack()  # a bad message will never get better: do not have it redelivered forever
            return
        if r is None:
            ack()
            return
        self.pipeline.submit([r], on_commit=ack)
        # The broker stops sending after ``max_inflight_messages`` (Mosquitto: 20) unacknowledged
        # messages, so commit before that many wait, rather than waiting for ``max_delay``.
        if len(self.pipeline.pending.on_commit) >= self.max_unacked:
            self.pipeline.flush()

    async def run(self) -> None:
        await self.client.start()
        await self._stop.wait()
        self.pipeline.flush()  # commit, then ack, what arrived
        await self.client.stop()

    def stop(self) -> None:
        self._stop.set()
