"""The fleet under faults: nothing accepted is lost, nothing is stored twice, every device converges.

Twenty devices stream through a Mosquitto the test owns into the real cloud service (SQLite
store). Seventeen are :class:`Daemon` objects sharing this test's event loop (as the simulated
fleet runs them); three are real daemon processes (``python -m runtime.daemon``) that tail a
JSON-lines file the test appends to, so they can be SIGKILLed. During the run the harness kills
the broker three times (restarted on the same port), SIGKILLs the three daemon processes (and
restarts them), restarts the cloud service, and publishes a model update (v1 → v2) in the middle.

At the end, per device: the stored sequence numbers are exactly the accepted ones (0 lost,
0 duplicated), the process devices stored every line of their file once in file order, stored
model versions never go backwards, and every device reports v2 to the cloud. The figures are
printed (``pytest -s`` or the CI log).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from brokers import MosquittoBroker
from chaos.faultkit import daemon_process, report, stored_seqs, write_device_config
from helpers_cloud import cloud_settings
from helpers_device import linear_manifest, settings, until

from cloud.service import CloudService
from runtime.artifacts import load_public_key
from runtime.daemon import Daemon
from runtime.modelstore import ModelStore
from runtime.outbox import Outbox
from runtime.protocol import DesiredState

IN_PROCESS = 17
PROCESSES = 3
TICK = 0.1  # seconds between readings
ROWS_PER_TICK = 15  # per device and tick: up to 150 readings/s each (the tick stretches under load)
STREAM_SECONDS = 30.0
OUTAGE = 1.0  # seconds the broker stays dead each time
W1, W2 = (2.0, -1.0), (1.5, -0.5)


async def slowly_until(predicate: Any, timeout: float, what: str, poll: float = 0.5) -> None:
    """``until`` for predicates that query the store: poll twice a second, not a hundred times."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(poll)


@dataclass
class ProcDevice:
    """A daemon process tailing ``lines``; the test appends readings and SIGKILLs it."""

    id: str
    config: Path
    lines: Path
    log: Path
    written: int = 0
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    starts: int = 0
    ts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = daemon_process(self.config, log=self.log)
        self.starts += 1

    def append(self, rng: np.random.Generator, n: int) -> None:
        X = rng.normal(size=(n, 2))
        with self.lines.open("a") as f:
            for a, b in X:
                ts = 1.7e9 + self.written
                f.write(json.dumps({"ts": ts, "a": float(a), "b": float(b), "y_true": float(2 * a - b)}) + "\n")
                self.ts.append(ts)
                self.written += 1

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.kills += 1

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def test_fleet_of_20_under_broker_daemon_and_cloud_faults(tmp_path: Path, fleet_keys, unique_id: str) -> None:
    key, pub = fleet_keys
    fleet = f"chaos{unique_id}"
    broker = MosquittoBroker(tmp_path / "broker").start()
    csettings = cloud_settings(tmp_path / "cloud", fleet_keys, broker.url, fleet, ingest_delay=0.05)
    m1, m2 = linear_manifest(key, 1, weights=W1), linear_manifest(key, 2, weights=W2)
    faults: dict[str, int] = {"broker kills": 0, "daemon SIGKILLs": 0, "cloud restarts": 0}
    figures: dict[str, Any] = {}

    def device_settings(dev: str, **extra: Any) -> Any:
        return settings(tmp_path, pub, dev, url=broker.url, fleet=fleet, **extra)

    # the three daemon processes: config files, model v1 installed beforehand, empty input files
    procs: list[ProcDevice] = []
    for i in range(PROCESSES):
        dev = f"proc-{i}"
        lines = tmp_path / f"{dev}.jsonl"
        lines.touch()
        s = device_settings(dev, source={"kind": "file", "path": str(lines), "follow": True})
        cfg = write_device_config(tmp_path / f"{dev}.toml", s, log_level="WARNING")
        store = ModelStore(s.state_dir, load_public_key(pub))
        store.install(m1)
        store.activate(m1.ref)
        procs.append(ProcDevice(dev, cfg, lines, tmp_path / f"{dev}.log"))

    async def go() -> None:
        svc = CloudService(csettings)
        await svc.start()
        await svc.client.wait_connected()
        services = [svc]
        daemons: list[Daemon] = []
        for i in range(IN_PROCESS):
            d = Daemon(device_settings(f"dev-{i:02d}"))
            d.store.install(m1)
            d.store.activate(m1.ref)
            daemons.append(d)
        await asyncio.gather(*(d.start() for d in daemons))
        for p in procs:
            p.start()
        await until(lambda: all(d.uplink.connected for d in daemons), 30, "every in-process device connected")

        rng = np.random.default_rng(7)
        stop_feeding = asyncio.Event()

        async def feed() -> None:
            while not stop_feeding.is_set():
                for d in daemons:
                    X = rng.normal(size=(ROWS_PER_TICK, 2))
                    d.pipeline.submit_arrays(X, y_true=X @ np.asarray(W1))
                for p in procs:
                    p.append(rng, ROWS_PER_TICK)
                await asyncio.sleep(TICK)

        async def kill_broker() -> None:
            await asyncio.to_thread(broker.kill)
            await asyncio.sleep(OUTAGE)
            await asyncio.to_thread(broker.start)
            faults["broker kills"] += 1

        async def sigkill(p: ProcDevice) -> None:
            await asyncio.to_thread(p.sigkill)
            await asyncio.sleep(0.5)
            p.start()
            faults["daemon SIGKILLs"] += 1

        async def restart_cloud() -> None:
            nonlocal svc
            await svc.stop()
            svc = CloudService(csettings)  # same store file, client id (persistent session) and port
            await svc.start()
            services.append(svc)
            faults["cloud restarts"] += 1

        async def update_model() -> None:
            for dev in [d.settings.device_id for d in daemons] + [p.id for p in procs]:
                ds = DesiredState(device=dev, model=m2, rollout_id="chaos-v2", issued_at=time.time())
                await svc.publish_desired(dev, ds)
                svc.store.set_device_desired(dev, ds)
            figures["model update"] = f"v1 -> v2 published to {IN_PROCESS + PROCESSES} devices"

        schedule = [
            (4.0, kill_broker),
            (7.0, lambda: sigkill(procs[0])),
            (10.0, restart_cloud),
            (13.0, update_model),
            (16.0, kill_broker),
            (19.0, lambda: sigkill(procs[1])),
            (22.0, lambda: sigkill(procs[2])),
            (25.0, kill_broker),
        ]
        feeder = asyncio.create_task(feed(), name="chaos:feed")
        t0 = time.monotonic()
        for at, action in schedule:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            await action()
        await asyncio.sleep(max(0.0, STREAM_SECONDS - (time.monotonic() - t0)))
        stop_feeding.set()
        await feeder
        for d in daemons:
            d.pipeline.flush()
        figures["stream seconds"] = round(time.monotonic() - t0, 1)

        # Converge: in-process outboxes drained by cloud acks; process devices' files fully stored.
        accepted = {d.settings.device_id: d.outbox.next_seq("results") for d in daemons}
        t_conv = time.monotonic()

        def converged() -> bool:
            counts = svc.store.counts()
            done_in = all(sum(d.outbox.depth().values()) == 0 for d in daemons)
            done_proc = all(counts.get(p.id) is not None and counts[p.id].distinct_seqs >= p.written for p in procs)
            return done_in and done_proc

        try:
            await slowly_until(converged, 120, "every accepted reading stored and acknowledged")
        except AssertionError:
            for p in procs:
                print(f"--- {p.id} log ---\n{p.log_tail()}")
            raise
        figures["convergence seconds"] = round(time.monotonic() - t_conv, 1)

        # Every device reports v2 to the cloud (reported state, retained).
        def all_on_v2() -> bool:
            recs = [svc.store.get_device(dev) for dev in [*accepted, *(p.id for p in procs)]]
            return all(r is not None and r.model_version == 2 for r in recs)

        await slowly_until(all_on_v2, 60, "every device reporting v2")
        assert all(d.pipeline.model_version == 2 for d in daemons)

        # Stop the process devices cleanly (SIGTERM drains, exits 0) and read what they accepted.
        for p in procs:
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.proc is not None
            rc = await asyncio.to_thread(p.proc.wait, 30)
            assert rc == 0, p.log_tail()
            s = device_settings(p.id)
            ob = Outbox(s.state_dir / "outbox.db", max_rows=10**9, max_bytes=10**12)
            assert ob.integrity_check() == []
            accepted[p.id] = ob.next_seq("results")
            ob.close()
            assert accepted[p.id] == p.written, f"{p.id}: {p.written} lines written, {accepted[p.id]} accepted"

        # The books, per device.
        counts = svc.store.counts()
        lost = duplicated = checked = 0
        for dev, n in accepted.items():
            seqs = stored_seqs(svc.store, dev)
            checked += len(seqs)
            have = set(seqs)
            lost += len(set(range(n)) - have)
            duplicated += counts[dev].duplicates + (len(seqs) - len(have))
            assert have <= set(range(n)), f"{dev}: stored sequence numbers that were never accepted"
            rows = svc.store.fetch_results(dev, since_seq=-1, limit=n + 10)
            versions = [r.model_version for r in rows]
            assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2, dev
        for p in procs:
            rows = svc.store.fetch_results(p.id, since_seq=-1, limit=p.written + 10)
            assert [r.ts for r in rows] == p.ts, f"{p.id}: the file's lines, each once, in order"
        figures.update(
            devices=len(accepted),
            accepted=sum(accepted.values()),
            checked=checked,
            lost=lost,
            duplicated=duplicated,
            dedup_hits=sum(s.ingester.stats.duplicates for s in services),
            acks_sent=sum(s.acks_sent for s in services),
            restarts={p.id: p.starts for p in procs},
        )
        for d in daemons:
            await d.shutdown(1.0)
        await svc.stop()

    try:
        asyncio.run(asyncio.wait_for(go(), 280))
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        broker.stop()
    injected = sum(faults.values())
    report(
        f"chaos fleet: {figures['devices']} devices, {figures['stream seconds']} s of streaming; "
        f"faults injected {injected} ({', '.join(f'{k} {v}' for k, v in faults.items())}); {figures['model update']}; "
        f"records accepted {figures['accepted']}, checked {figures['checked']}, lost {figures['lost']}, "
        f"duplicated {figures['duplicated']}; redeliveries the store ignored {figures['dedup_hits']}; "
        f"converged in {figures['convergence seconds']} s after the stream ended"
    )
    assert faults == {"broker kills": 3, "daemon SIGKILLs": 3, "cloud restarts": 1}
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["checked"] == figures["accepted"]
