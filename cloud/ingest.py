"""Ingest: validate what the fleet sends, store it exactly once in batches, return per-device acks.

Transport-free: :meth:`Ingester.handle` takes a topic and payload, :meth:`Ingester.commit` writes
everything pending in one store transaction and returns the ``ack`` messages to publish (one per
device per commit, carrying the device's watermarks). A message that does not validate is
counted and logged with the device and the reason, never stored, and never stops ingest.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ProtocolError
from runtime.protocol import (
    Ack,
    CommandResult,
    ReportedState,
    ResultBatch,
    Status,
    SufficientStats,
    Telemetry,
    decode,
    parse_topic,
)

__all__ = ["Ingester", "IngestStats", "parse_azure_topic"]

logger = logging.getLogger(__name__)

_DECODERS: dict[str, Any] = {
    "results": ResultBatch,
    "telemetry": Telemetry,
    "stats": SufficientStats,
    "reported": ReportedState,
    "status": Status,
    "cmd/result": CommandResult,
}


def parse_azure_topic(topic: str, properties: dict[str, str] | None = None) -> tuple[str, str] | None:
    """``devices/{id}/messages/events/{props}`` → (device, stream) from the ``stream`` property."""
    parts = topic.split("/", 4)
    if len(parts) < 4 or parts[0] != "devices" or parts[2:4] != ["messages", "events"]:
        return None
    props: dict[str, str] = dict(properties or {})
    if len(parts) == 5 and parts[4]:
        from urllib.parse import parse_qsl

        props.update(parse_qsl(parts[4].rstrip("/"), keep_blank_values=True))
    stream = props.get("stream")
    if stream not in ("results", "telemetry", "stats"):
        return None
    return parts[1], stream


@dataclass
class IngestStats:
    messages: int = 0
    invalid: int = 0
    rows: int = 0
    batches: int = 0
    duplicates: int = 0
    commits: int = 0
    invalid_by_reason: Counter[str] = field(default_factory=Counter)


class Ingester:
    def __init__(self, store: Any, fleet: str) -> None:
        self.store = store
        self.fleet = fleet
        self.stats = IngestStats()
        self._results: list[ResultBatch] = []
        self._telemetry: list[Telemetry] = []
        self._suffstats: list[SufficientStats] = []
        self._reported: list[ReportedState] = []
        self._status: list[Status] = []
        self.command_results: list[CommandResult] = []
        self.pending_rows = 0

    def _invalid(self, device: str, suffix: str, reason: str) -> None:
        self.stats.invalid += 1
        self.stats.invalid_by_reason[suffix] += 1
        logger.warning("invalid %s from %s dropped: %s", suffix, device, reason)

    def handle(self, topic: str, payload: bytes, properties: dict[str, str] | None = None) -> None:
        """Validate one message and queue it for the next commit."""
        self.stats.messages += 1
        try:
            if topic.startswith("devices/"):
                parsed = parse_azure_topic(topic, properties)
                if parsed is None:
                    raise ProtocolError(f"not an edgeloop Azure topic: {topic[:120]!r}", field="topic")
                device, suffix = parsed
            else:
                fleet, device, suffix = parse_topic(topic)
                if fleet != self.fleet:
                    return
        except ProtocolError as exc:
            self._invalid("?", "topic", str(exc))
            return
        cls = _DECODERS.get(suffix)
        if cls is None:
            return  # our own outbound topics (desired, cmd, ack) echo back on a wildcard
        try:
            msg = decode(cls, payload)
        except ProtocolError as exc:
            self._invalid(device, suffix, str(exc))
            return
        if getattr(msg, "device", device) != device:
            self._invalid(device, suffix, f"payload names device {msg.device!r} on {device!r}'s topic")
            return
        if isinstance(msg, ResultBatch):
            self._results.append(msg)
            self.pending_rows += msg.n
        elif isinstance(msg, Telemetry):
            self._telemetry.append(msg)
            self.pending_rows += 1
        elif isinstance(msg, SufficientStats):
            self._suffstats.append(msg)
            self.pending_rows += 1
        elif isinstance(msg, ReportedState):
            self._reported.append(msg)
        elif isinstance(msg, Status):
            self._status.append(msg)
        elif isinstance(msg, CommandResult):
            self.command_results.append(msg)

    @property
    def pending(self) -> int:
        return len(self._results) + len(self._telemetry) + len(self._suffstats) + len(self._reported) + len(self._status)

    def commit(self) -> list[Ack]:
        """Write everything pending in one transaction; return the acks to publish (after the commit)."""
        if not self.pending:
            return []
        results, telemetry, suffstats = self._results, self._telemetry, self._suffstats
        reported, status = self._reported, self._status
        self._results, self._telemetry, self._suffstats, self._reported, self._status = [], [], [], [], []
        self.pending_rows = 0
        now = time.time()
        watermarks: dict[str, dict[str, int]] = {}
        f = self.fleet
        if results or telemetry or suffstats:
            res = self.store.ingest(
                [(f, b) for b in results], [(f, t) for t in telemetry], [(f, s) for s in suffstats], now=now
            )
            watermarks = res.watermarks
            self.stats.rows += res.rows_stored
            self.stats.duplicates += res.duplicates
            for rej in res.rejected:
                self._invalid(rej.device, rej.stream, rej.reason)
        for r in reported:
            self.store.update_device_from_reported(r, fleet=f, now=now)
        for s in status:
            self.store.update_device_from_status(s, fleet=f, now=now)
        self.stats.commits += 1
        self.stats.batches += len(results)
        return [Ack(device=dev, watermarks=wm) for dev, wm in watermarks.items() if wm]  # type: ignore[arg-type]
