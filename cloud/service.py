"""``edgeloop cloud serve``: ingest, trainer, rollout controller and artifact server on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud.artifact_server import ArtifactServer
from cloud.config import CloudSettings
from cloud.errors import CloudError
from cloud.fleet import RolloutController
from cloud.ingest import Ingester
from cloud.registry import Registry
from cloud.store import Store, open_store
from cloud.trainer import Trainer
from runtime.artifacts import load_private_key
from runtime.errors import EdgeloopError
from runtime.mqttclient import AsyncMqttClient, MqttMessage
from runtime.protocol import Ack, DesiredState, topic

__all__ = ["CloudService"]

logger = logging.getLogger(__name__)

_INGEST_SUFFIXES = ("results", "telemetry", "stats", "reported", "status", "cmd/result")


_GC_THRESHOLDS = (10_000, 20, 20)


def relax_gc() -> None:
    """Run the cyclic garbage collector less often in this process (it is the service's process).

    Ingest decodes about 500 small lists a message (the rows of x) and keeps them until their
    commit. With CPython's default thresholds (700, 10, 10) the collector runs on every message
    and its older generations rescan every batch still pending: a quarter of ingest's CPU, for
    objects that hold no cycles. ``benchmarks/bench_ingest.py``: about 310k → 420k rows/s into
    SQLite. Never lowers a threshold someone set higher. The setting is process-wide: a program
    that embeds :class:`CloudService` gets it too (``gc.set_threshold`` after ``start`` undoes it).
    """
    t0, t1, t2 = gc.get_threshold()
    if t0:  # 0: collection is disabled; leave it so
        gc.set_threshold(max(t0, _GC_THRESHOLDS[0]), max(t1, _GC_THRESHOLDS[1]), max(t2, _GC_THRESHOLDS[2]))


class CloudService:
    def __init__(self, settings: CloudSettings, *, store: Store | None = None) -> None:
        self.settings = settings
        if store is None and settings.store.startswith("sqlite:///"):
            Path(settings.store[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.store = store if store is not None else open_store(settings.store)
        self.registry = Registry(
            self.store, settings.artifacts_dir, load_private_key(settings.signing_key), settings.artifact_base_url
        )
        self.ingester = Ingester(self.store, settings.fleet)
        self.client = AsyncMqttClient(
            settings.broker,
            client_id=settings.client_id,
            clean_start=False,
            session_expiry=3600,
        )
        self.client.on_message = self._on_message
        self.controller = RolloutController(
            self.store, settings.fleet, self.publish_desired, offline_after=settings.offline_after
        )
        self.http: ArtifactServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.listeners: list[Callable[[str, str], None]] = []
        self.trainer = Trainer(self.store, self.registry, settings.retrain, settings.fleet, emit=self._emit)
        self.acks_sent = 0
        self._commit_lock = asyncio.Lock()
        self._writing: asyncio.Future[list[Ack]] | None = None
        self._ack_tasks: set[asyncio.Task[int]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        relax_gc()
        self.http = ArtifactServer(s.artifacts_dir, s.http_host, s.http_port)
        self.http.start()
        for suffix in _INGEST_SUFFIXES:
            t = topic(s.fleet, "+", suffix)
            if s.shared_group:
                t = f"$share/{s.shared_group}/{t}"
            self.client.subscribe(t, qos=1)
        await self.client.start()
        for coro, name in (
            (self._ingest_loop(), "ingest"),
            (self._rollout_loop(), "rollouts"),
            (self._train_loop(), "trainer"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=f"cloud:{name}"))
        logger.info("cloud service up: fleet %s, broker %s, store %s", s.fleet, s.broker, _redact(s.store))

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ack_tasks:
            await asyncio.wait(self._ack_tasks, timeout=5.0)
        await self._write_done()
        with contextlib.suppress(EdgeloopError):
            await asyncio.to_thread(self._commit_sync)
        await self.client.stop()
        if self.http is not None:
            self.http.stop()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def _emit(self, kind: str, message: str) -> None:
        for cb in self.listeners:
            cb(kind, message)

    # ------------------------------------------------------------------ ingest

    def _on_message(self, msg: MqttMessage) -> None:
        self.ingester.handle(msg.topic, msg.payload, msg.user_properties)
        if self.ingester.pending_rows >= self.settings.ingest_batch:
            self._wake.set()

    def _commit_sync(self) -> list[Any]:
        return self.ingester.commit()

    async def _write_done(self) -> None:
        """Wait for a store write a cancelled commit left running (writes must not overlap)."""
        w = self._writing
        if w is not None and not w.done():
            await asyncio.wait([w])
        if w is not None and w.done() and not w.cancelled():
            w.exception()  # retrieved: its commit() already reported it, or was cancelled

    async def _store_pending(self) -> list[Ack]:
        """Store what is pending in one transaction; return the acks to publish.

        SQLite writes inline (short, local; sqlite3 takes the GIL back for every statement, so a
        worker thread would only convoy with the decoding here; and one thread per transaction
        means no write lock is ever held across an await). PostgreSQL writes in a worker thread:
        the server does the work, the loop goes on decoding, and a slow network cannot stall it.
        """
        async with self._commit_lock:
            await self._write_done()
            if not self.ingester.pending:
                return []
            taken = self.ingester.take()
            if self.store.dialect == "sqlite":
                return self.ingester.write(taken)
            self._writing = asyncio.ensure_future(asyncio.to_thread(self.ingester.write, taken))
            return await asyncio.shield(self._writing)

    async def _send_acks(self, acks: list[Ack]) -> int:
        sends = [self.client.publish(topic(self.settings.fleet, a.device, "ack"), a.to_bytes(), qos=1) for a in acks]
        results = await asyncio.gather(*sends, return_exceptions=True)
        ok = sum(1 for r in results if not isinstance(r, BaseException))
        self.acks_sent += ok
        return ok

    async def commit(self) -> int:
        """Store what is pending (one transaction) and publish the acks; return acks sent."""
        return await self._send_acks(await self._store_pending())

    async def _ingest_loop(self) -> None:
        delay = self.settings.ingest_delay
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                acks = await self._store_pending()
            except EdgeloopError as exc:
                logger.error("ingest commit failed (devices will resend): %s", exc)
                await asyncio.sleep(1.0)
                continue
            except Exception:  # a bug must not stop ingest: nothing unacknowledged is lost
                logger.exception("ingest commit crashed (devices will resend)")
                await asyncio.sleep(1.0)
                continue
            if acks:
                # Not awaited here: the PUBACKs queue behind every message the broker is sending us,
                # so waiting for them would hold the next commit until the backlog is read.
                t = asyncio.create_task(self._send_acks(acks), name="cloud:acks")
                self._ack_tasks.add(t)
                t.add_done_callback(self._ack_tasks.discard)

    # ------------------------------------------------------------------ desired state

    async def publish_desired(self, device: str, desired: DesiredState) -> None:
        await self.client.publish(topic(self.settings.fleet, device, "desired"), desired.to_bytes(), qos=1, retain=True)

    async def _rollout_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rollout_interval)
            try:
                await self.controller.tick()
            except EdgeloopError as exc:
                logger.error("rollout controller: %s", exc)
            except Exception:
                logger.exception("rollout controller crashed; retrying")

    # ------------------------------------------------------------------ training

    async def _train_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            try:
                if any(r.model == self.settings.retrain.model for r in self.store.active_rollouts()):
                    continue  # let the running rollout finish first
                out = await asyncio.to_thread(self.trainer.poll, now)
                if out is not None:
                    logger.info("training: %s", out.reason)
            except (CloudError, EdgeloopError) as exc:
                logger.error("trainer: %s", exc)
            except Exception:
                logger.exception("trainer crashed; retrying")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
