"""The device daemon: wires sources, pipeline, outbox, model store and uplink on one event loop.

``python -m runtime.daemon --config device.toml`` is what ``edgeloop device run`` executes, so a
device process never imports the CLI's libraries. Signal handlers only set a flag; shutdown
stops intake, commits the last micro-batch, drains the outbox while the broker answers (up to
``drain_deadline``) and exits 0.
"""

from __future__ import annotations

import signal

_early_stops: list[int] = []


def _note_early_stop(signum: int, frame: object) -> None:
    _early_stops.append(signum)


if __name__ == "__main__":
    # ``python -m runtime.daemon`` (what systemd runs): a stop requested while the modules below
    # load (~0.2 s) ends like a later one (drain, exit 0), not in the default death by signal.
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, _note_early_stop)

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifacts import load_public_key
from runtime.config import DeviceSettings, config_hash, load_settings
from runtime.errors import EdgeloopError, ProtocolError
from runtime.modelstore import ModelStore
from runtime.outbox import Outbox
from runtime.pipeline import Pipeline
from runtime.protocol import (
    Ack,
    CommandResult,
    DesiredState,
    ReportedState,
    ResultBatch,
    SufficientStats,
    Telemetry,
    decode,
    decode_command,
)
from runtime.reconcile import Reconciler, decide
from runtime.telemetry import rss_bytes
from runtime.transports import create_uplink
from runtime.transports.base import Uplink

__all__ = ["Daemon", "main"]

logger = logging.getLogger(__name__)
RUNTIME_VERSION = "0.1.0"
STATUS_FILE = "status.json"


class Daemon:
    """One device. Many can share an event loop (the simulated fleet); none installs signal handlers."""

    def __init__(self, settings: DeviceSettings, *, uplink: Uplink | None = None, inflight: int = 4) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.public_key = load_public_key(settings.public_key)
        self.outbox = Outbox(
            self.state_dir / "outbox.db",
            max_rows=settings.outbox.max_rows,
            max_bytes=settings.outbox.max_bytes,
            synchronous=settings.outbox.synchronous,
        )
        self.store = ModelStore(self.state_dir, self.public_key, max_artifact_bytes=settings.update.max_artifact_bytes)
        self.reconciler = Reconciler(self.store, settings.update, staging_dir=self.store.root / ".staging")
        share_raw = settings.share.mode in ("raw", "both")
        self.pipeline = Pipeline(
            self.outbox,
            schema=tuple(settings.features),
            max_rows=settings.batch.max_rows,
            capture_rate=settings.share.capture_rate,
            share_raw=share_raw,
            ring_capacity=settings.update.ring_buffer,
            on_committed=self._on_committed,
        )
        self.uplink = uplink if uplink is not None else create_uplink(settings)
        self.uplink.set_handlers(self._on_inbound, self._on_connection)
        self.telemetry_interval = settings.telemetry_interval
        self.inflight = inflight
        self._data = asyncio.Event()
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._desired: DesiredState | None = None
        self._desired_event = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._sends: set[asyncio.Task[Any]] = set()
        self._sources: list[Any] = []
        self._reported_dirty = True
        self._reported_event = asyncio.Event()
        self.invalid_messages = 0
        self.last_sync: float | None = float(self.outbox.get_meta("last_sync") or 0) or None
        self._stats_acc: np.ndarray | None = None
        self._stats_n = 0
        self._stats_window_start = time.time()
        self._flush_waiters: list[asyncio.Future[None]] = []
        self.started = time.time()

    # ------------------------------------------------------------------ start-up

    async def start(self) -> None:
        """Load the active model, start the uplink and the background tasks; return at once."""
        predictor = self.reconciler.load_active()
        if predictor is not None:
            self.pipeline.swap(predictor)
            logger.info("serving %s v%s (%s)", predictor.manifest.name, predictor.manifest.version, predictor.backend)
        else:
            logger.info("no model installed yet: results are stored without predictions until one arrives")
        if self.settings.share.mode in ("stats", "both"):
            self.pipeline.stats_sink = self._accumulate_stats
        self.outbox.release_all()
        await self.uplink.start()
        name = self.settings.device_id
        for coro, label in (
            (self._sender(), "sender"),
            (self._flusher(), "flusher"),
            (self._telemetry_loop(), "telemetry"),
            (self._desired_worker(), "desired"),
            (self._reporter(), "reporter"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=f"{name}:{label}"))
        if self.settings.share.mode in ("stats", "both"):
            self._tasks.append(asyncio.create_task(self._stats_loop(), name=f"{name}:stats"))

    def add_source(self, source: Any) -> None:
        """Start a source (anything with ``async run()`` and ``stop()``) feeding this daemon's pipeline."""
        self._sources.append(source)
        self._tasks.append(asyncio.create_task(source.run(), name=f"{self.settings.device_id}:{source.name}"))

    # ------------------------------------------------------------------ stop / drain

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def shutdown(self, deadline: float | None = None) -> dict[str, int]:
        """Stop intake, commit what is pending, drain while the broker answers, then disconnect."""
        self._stopping.set()
        for s in self._sources:
            s.stop()
        self.pipeline.flush()
        budget = self.settings.drain_deadline if deadline is None else deadline
        end = time.monotonic() + budget
        self._data.set()
        while time.monotonic() < end and self.uplink.connected and self._unsynced() > 0:
            self._data.set()
            await asyncio.sleep(0.05)
        left = self._unsynced()
        if left:
            logger.warning("shutdown: %d rows stay in the outbox for the next start", left)
        else:
            logger.info("shutdown: outbox drained")
        pending = [*self._tasks, *self._sends]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        self._write_status()
        with contextlib.suppress(EdgeloopError):
            await self.uplink.stop()
        self.outbox.close()
        return {"left": left}

    def _unsynced(self) -> int:
        return sum(self.outbox.depth().values())

    # ------------------------------------------------------------------ inbound

    def _on_connection(self, up: bool) -> None:
        if up:
            self._connected.set()
            self.outbox.release_all()  # everything sent but unacknowledged goes again
            self._reported_dirty = True
            self._reported_event.set()
            self._data.set()
        else:
            self._connected.clear()

    def _on_inbound(self, suffix: str, payload: bytes) -> None:
        try:
            if suffix == "ack":
                self._on_ack(decode(Ack, payload))
            elif suffix == "desired":
                self._on_desired(decode(DesiredState, payload))
            elif suffix == "cmd":
                self._on_command(payload)
            else:
                logger.debug("ignoring inbound %s", suffix)
        except ProtocolError as exc:
            self.invalid_messages += 1
            logger.warning("invalid %s message dropped: %s", suffix, exc)

    def _on_ack(self, ack: Ack) -> None:
        if ack.device != self.settings.device_id:
            return
        for stream, wm in ack.watermarks.items():
            self.outbox.ack(stream, wm)
        self.last_sync = time.time()
        self._data.set()

    def _on_desired(self, desired: DesiredState) -> None:
        if desired.device is not None and desired.device != self.settings.device_id:
            return  # a broker that leaks retained messages (amqtt) must not steer us
        if desired.config:
            if "capture_rate" in desired.config:
                self.pipeline.capture_rate = desired.config["capture_rate"]
            if "telemetry_interval" in desired.config:
                self.telemetry_interval = desired.config["telemetry_interval"]
        self._desired = desired
        self._desired_event.set()

    def _on_command(self, payload: bytes) -> None:
        try:
            cmd = decode_command(payload)
        except ProtocolError as exc:
            self.invalid_messages += 1
            cid = _salvage_id(payload)
            logger.warning("invalid command: %s", exc)
            self._reply(CommandResult(id=cid, device=self.settings.device_id, ok=False, error=str(exc)[:1000]))
            return
        task = asyncio.create_task(self._run_command(cmd), name=f"{self.settings.device_id}:cmd:{cmd.id}")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _run_command(self, cmd: Any) -> None:
        dev = self.settings.device_id
        ok, error, data = True, None, {}
        if cmd.type == "ping":
            data = {"pong": time.time(), "model_version": self.pipeline.model_version}
        elif cmd.type == "rollback":
            outcome = await self.reconciler.rollback()
            if outcome.ok and outcome.predictor is not None:
                self.pipeline.flush()
                self.pipeline.swap(outcome.predictor)
                data = {"active": outcome.predictor.manifest.version}
            else:
                ok, error = False, outcome.status.reason
            self._mark_reported()
        elif cmd.type == "flush":
            self.pipeline.flush()
            left = await self.flush_outbox(timeout=10.0)
            ok = left == 0
            data = {"outbox_depth": left}
            error = None if ok else f"{left} rows still unacknowledged after 10 s"
        elif cmd.type == "set_capture_rate":
            self.pipeline.capture_rate = cmd.rate
            data = {"capture_rate": cmd.rate}
            self._mark_reported()
        elif cmd.type == "get_state":
            data = json.loads(self.reported_state().to_bytes())
            data["outbox"] = self.outbox.depth()
            data["dropped"] = self.outbox.dropped()
        self._reply(CommandResult(id=cmd.id, device=dev, ok=ok, error=error, data=data))

    def _reply(self, result: CommandResult) -> None:
        async def send() -> None:
            try:
                await self.uplink.publish("cmd/result", result.to_bytes())
            except EdgeloopError as exc:
                logger.warning("command result %s not delivered: %s", result.id, exc)

        t = asyncio.create_task(send())
        self._sends.add(t)
        t.add_done_callback(self._sends.discard)

    async def flush_outbox(self, timeout: float) -> int:
        """Wait until every row is acknowledged, or ``timeout``; return what is left."""
        end = time.monotonic() + timeout
        while self._unsynced() and time.monotonic() < end:
            self._data.set()
            await asyncio.sleep(0.05)
        return self._unsynced()

    # ------------------------------------------------------------------ model updates

    async def _desired_worker(self) -> None:
        while True:
            await self._desired_event.wait()
            self._desired_event.clear()
            desired = self._desired
            if desired is None:
                continue
            try:
                await self._reconcile(desired)
            except Exception:  # a bug in one update must not stop all future updates
                logger.exception("model update crashed; the current model keeps serving")
                self._mark_reported()

    async def _reconcile(self, desired: DesiredState) -> None:
        active, _ = self.store.pointers()
        d = decide(desired, self.settings.device_id, active)
        if d.action == "refuse":
            self.reconciler.refuse(desired, d.reason)
            self._mark_reported()
            return
        if d.action != "apply":
            if d.action == "noop" and desired.model is not None:
                self._mark_reported()
            return
        self._mark_reported()
        outcome = await self.reconciler.apply(
            desired, self.pipeline.predictor, self.pipeline.recent_rows(), self.pipeline.schema
        )
        if outcome.ok and outcome.predictor is not None:
            self.pipeline.flush()  # readings so far are predicted by the old model, exactly once
            self.pipeline.swap(outcome.predictor)
            m = outcome.predictor.manifest
            logger.info("now serving %s v%s (%s)", m.name, m.version, outcome.predictor.backend)
        self._mark_reported()

    def _mark_reported(self) -> None:
        self._reported_dirty = True
        self._reported_event.set()

    def reported_state(self) -> ReportedState:
        active, previous = self.store.pointers()
        return ReportedState(
            device=self.settings.device_id,
            fleet=self.settings.fleet,
            group=self.settings.group,
            active=active,
            previous=previous,
            update=self.reconciler.status,
            config_hash=config_hash(self.settings),
            capture_rate=self.pipeline.capture_rate,
            transport=self.uplink.name,
            runtime_version=RUNTIME_VERSION,
            ts=time.time(),
        )

    async def _reporter(self) -> None:
        while True:
            await self._reported_event.wait()
            self._reported_event.clear()
            if not self._reported_dirty or not self.uplink.connected:
                continue
            self._reported_dirty = False
            try:
                await self.uplink.publish("reported", self.reported_state().to_bytes(), retain=True)
            except EdgeloopError as exc:
                logger.info("reported state not delivered (%s); will retry on reconnect", exc)
                self._reported_dirty = True

    # ------------------------------------------------------------------ outbound

    def _on_committed(self, n: int) -> None:
        self._data.set()

    async def _flusher(self) -> None:
        """Commit a partial micro-batch once its oldest reading waited ``max_delay``."""
        delay = max(self.settings.batch.max_delay, 0.001)
        while True:
            age = self.pipeline.pending_age()
            if self.pipeline.pending.n and age >= delay:
                self.pipeline.flush()
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(max(delay - age, 0.001) if self.pipeline.pending.n else delay)

    async def _sender(self) -> None:
        sem = asyncio.Semaphore(self.inflight)
        resend_after = self.settings.broker.resend_after
        rows = self.settings.outbox.send_batch_rows
        while True:
            if not self.uplink.connected:
                await self._connected.wait()
                continue
            sent_any = False
            for stream in ("results", "telemetry", "stats"):
                await sem.acquire()
                claim = self.outbox.claim(stream, rows if stream == "results" else 1, time.time(), resend_after)
                if claim is None:
                    sem.release()
                    continue
                self.outbox.mark_sent(stream, claim.seq_first, claim.seq_last, time.time())
                payload = self._payload(stream, claim)
                task = asyncio.create_task(self._publish(stream, claim.seq_first, claim.seq_last, payload, sem))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
                sent_any = True
                break  # results first, always
            if not sent_any:
                self._data.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, resend_after)):
                        await self._data.wait()

    def _payload(self, stream: str, claim: Any) -> bytes:
        if stream != "results":
            # The message's sequence number and floor are the outbox's, known only now.
            msg = json.loads(claim.payload)
            msg["seq"], msg["floor"] = claim.seq_first, min(claim.floor, claim.seq_first - 1)
            return json.dumps(msg, separators=(",", ":")).encode()
        return ResultBatch(
            device=self.settings.device_id,
            model=self.pipeline.predictor.manifest.name if self.pipeline.predictor else None,
            seq_first=claim.seq_first,
            seq_last=claim.seq_last,
            floor=claim.floor,
            ts=claim.ts,
            model_version=claim.model_version,
            y_pred=claim.y_pred,
            x=claim.x,
            features=self.pipeline.schema or None if claim.x is not None else None,
            y_true=claim.y_true,
        ).to_bytes()

    async def _publish(self, stream: str, first: int, last: int, payload: bytes, sem: asyncio.Semaphore) -> None:
        try:
            await self.uplink.publish(stream, payload)
            if self.uplink.broker_ack_only or self.settings.broker.ack == "broker":
                self.outbox.ack_range(stream, first, last)
                self.last_sync = time.time()
        except EdgeloopError as exc:
            logger.info("publish of %s %d..%d failed (%s); it will be resent", stream, first, last, exc)
        finally:
            sem.release()
            self._data.set()

    # ------------------------------------------------------------------ telemetry and stats

    def telemetry(self) -> Telemetry:
        p = self.pipeline
        c = p.counters
        ref = p.predictor.manifest.feature_stats if p.predictor else None
        return Telemetry(
            device=self.settings.device_id,
            ts=time.time(),
            uptime_s=time.monotonic() - c.started_mono,
            model_version=p.model_version or None,
            readings=c.readings,
            predictions=c.predictions,
            rejected=c.rejected,
            latency_p50_us=p.latency.quantile(0.5),
            latency_p99_us=p.latency.quantile(0.99),
            outbox_depth=self._unsynced(),
            outbox_bytes=self.outbox.size_bytes(),
            outbox_dropped=self.outbox.dropped(),
            bytes_written=self.outbox.bytes_written(),
            rss_bytes=rss_bytes(),
            features=p.features.drift(ref) if p.features is not None and p.features.n else None,
            live_mae=p.live.mae,
            live_n=p.live.n,
            last_sync=self.last_sync,
        )

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.telemetry_interval)
            try:
                self.outbox.append_message("telemetry", self.telemetry().to_bytes())
                await asyncio.to_thread(self._write_status, self._status())
            except EdgeloopError as exc:
                logger.error("telemetry not stored: %s", exc)
            self._data.set()

    def _accumulate_stats(self, X: np.ndarray, y: np.ndarray) -> None:
        A = np.hstack([X, np.ones((X.shape[0], 1))])
        Z = np.hstack([A, y[:, None]])
        g = Z.T @ Z
        self._stats_acc = g if self._stats_acc is None else self._stats_acc + g
        self._stats_n += X.shape[0]

    def flush_stats(self) -> bool:
        """Queue the current window's sufficient statistics as a ``stats`` message."""
        g, n = self._stats_acc, self._stats_n
        if g is None or n == 0:
            return False
        d = g.shape[0] - 1
        now = time.time()
        msg = SufficientStats(
            device=self.settings.device_id,
            model=self.pipeline.predictor.manifest.name if self.pipeline.predictor else None,
            features=self.pipeline.schema,
            window_start=self._stats_window_start,
            window_end=now,
            n=n,
            xtx=g[:d, :d].tolist(),
            xty=g[:d, d].tolist(),
            yty=float(g[d, d]),
        )
        self.outbox.append_message("stats", msg.to_bytes())
        self._stats_acc, self._stats_n, self._stats_window_start = None, 0, now
        self._data.set()
        return True

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.share.stats_interval)
            self.flush_stats()

    def _status(self) -> bytes:
        data = {
            "pid": os.getpid(),
            "ts": time.time(),
            "started": self.started,
            "last_sync": self.last_sync,
            "readings": self.pipeline.counters.readings,
            "rejected": self.pipeline.counters.rejected,
            "update": self.reconciler.status.model_dump(),
        }
        if self.last_sync:
            self.outbox.set_meta("last_sync", str(self.last_sync))
        return json.dumps(data).encode()

    def _write_status(self, payload: bytes | None = None) -> None:
        """The status file for `edgeloop device status`: replaced atomically, not fsynced.

        It is rewritten every telemetry tick and only informative; two fsyncs each (~3 ms) took a
        third of a 1000-device fleet's event loop, and the rename over the old file still costs
        a few ms on ext4, so the telemetry loop calls this in a worker thread.
        """
        path = self.state_dir / STATUS_FILE
        tmp = path.with_name(f".{STATUS_FILE}.{threading.get_ident()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_bytes(self._status() if payload is None else payload)
            os.replace(tmp, path)


def _salvage_id(payload: bytes) -> str:
    import re

    try:
        obj = json.loads(payload)
        cid = obj.get("id") if isinstance(obj, dict) else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        cid = None
    if isinstance(cid, str) and re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", cid):
        return cid
    return "invalid"


# ---------------------------------------------------------------------- process entry point


async def run(settings: DeviceSettings, input_path: str | None) -> int:
    from runtime.sources import FileSource, StdinSource

    daemon = Daemon(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    if _early_stops:
        daemon.request_stop()
    await daemon.start()
    if input_path == "-":
        daemon.add_source(StdinSource(daemon.pipeline))
    elif input_path is not None:
        daemon.add_source(FileSource(daemon.pipeline, Path(input_path)))
    else:
        src = settings.source
        if src.kind == "file" and src.path is not None:
            daemon.add_source(FileSource(daemon.pipeline, src.path, follow=src.follow))
        elif src.kind == "stdin":
            daemon.add_source(StdinSource(daemon.pipeline))
        elif src.kind == "mqtt":
            from runtime.mqttsource import MqttSource

            daemon.add_source(MqttSource.from_settings(daemon.pipeline, settings))
    _release_memory()
    logger.info("device %s running (fleet %s, transport %s)", settings.device_id, settings.fleet, daemon.uplink.name)
    await daemon.wait_stopped()
    logger.info("stopping: draining the outbox for up to %.0f s", settings.drain_deadline)
    await daemon.shutdown()
    return 0


def _release_memory() -> None:
    """Return start-up garbage to the OS: building the wire models' validators leaves freed heap
    that glibc keeps (about 2 MB here); a device counts every megabyte."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def main(argv: list[str] | None = None) -> int:
    # A stop requested before the event loop takes the signals over (systemd stopping a unit it
    # has just started) ends the same way as a later one: drain what is there, exit 0. (Run as
    # ``python -m``, the module already did this before its imports.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_early_stop)
    ap = argparse.ArgumentParser(prog="edgeloop device run", description="Run the edgeloop device daemon.")
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--input", default=None, help="JSON-lines readings: a file path or - for stdin")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except EdgeloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return asyncio.run(run(settings, args.input))
    except EdgeloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
