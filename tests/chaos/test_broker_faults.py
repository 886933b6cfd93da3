"""Broker faults that a PUBACK hides, and an outage longer than the outbox can hold.

1. A broker that drops: ``max_queued_messages 5`` and the cloud's ingester stalled (its process
   SIGSTOPped), so Mosquitto acknowledges the devices' messages and then throws them away. With
   cloud acknowledgements (``ack = cloud``, the default) nothing is lost; a device configured
   ``ack = broker`` in the same run loses rows — the proof that the broker really dropped
   acknowledged messages.
2. A long outage overrunning the outbox cap: the oldest rows go first, every drop is counted, and
   stored + dropped = accepted, exactly; the cloud learns the drop count from telemetry.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from brokers import MosquittoBroker, require_service
from chaos.faultkit import REPO, report, stored_seqs
from helpers_cloud import cloud_settings, start_cloud
from helpers_device import linear_manifest, settings, until

from cloud.store import open_store
from runtime.config import dump_toml
from runtime.daemon import Daemon


def broker_dropped(broker: MosquittoBroker) -> int:
    """``$SYS/broker/publish/messages/dropped``: messages the broker threw away (retained, every sys_interval)."""
    mosquitto_sub = shutil.which("mosquitto_sub")
    require_service(mosquitto_sub is not None, "needs mosquitto_sub (apt-get install mosquitto-clients)")
    assert mosquitto_sub is not None
    topic = "$SYS/broker/publish/messages/dropped"
    out = subprocess.run(
        [mosquitto_sub, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-C", "1", "-W", "10"],
        capture_output=True,
        check=True,
        timeout=20,
    )
    return int(out.stdout.decode().strip())


def test_broker_drops_acknowledged_messages_cloud_acks_lose_nothing(tmp_path: Path, fleet_keys, unique_id: str) -> None:
    key, pub = fleet_keys
    fleet = f"drop{unique_id}"
    broker = MosquittoBroker(
        tmp_path / "broker", extra="max_queued_messages 5\nmax_inflight_messages 5\nsys_interval 1"
    ).start()
    cs = cloud_settings(tmp_path / "cloud", fleet_keys, broker.url, fleet, ingest_delay=0.05, log_level="WARNING")
    cfg = tmp_path / "cloud.toml"
    data = json.loads(cs.model_dump_json())
    data["retrain"] = {k: v for k, v in data["retrain"].items() if v is not None}
    cfg.write_text(dump_toml(data))
    log = tmp_path / "cloud.log"
    with log.open("ab") as err:
        cloud = subprocess.Popen(
            [sys.executable, "-m", "edgeloop", "cloud", "serve", "--config", str(cfg)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    store = None
    stall = 4.0
    (tmp_path / "cloud").mkdir()
    figures: dict[str, object] = {}

    async def go() -> None:
        nonlocal store
        devs = {"cloud-ack-0": "cloud", "cloud-ack-1": "cloud", "broker-ack": "broker"}
        daemons = {}
        for dev, ack in devs.items():
            d = Daemon(settings(tmp_path, pub, dev, url=broker.url, fleet=fleet, broker={"ack": ack}))
            m = linear_manifest(key, 1)
            d.store.install(m)
            d.store.activate(m.ref)
            daemons[dev] = d
        await asyncio.gather(*(d.start() for d in daemons.values()))
        await until(lambda: all(d.uplink.connected for d in daemons.values()), 20, "devices connected")
        store = open_store(cs.store)
        await until(lambda: (store.get_device("cloud-ack-0") or None) is not None, 30, "the cloud service up")
        rng = np.random.default_rng(3)

        async def stream(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for d in daemons.values():
                    d.pipeline.submit_arrays(rng.normal(size=(20, 2)))
                await asyncio.sleep(0.05)

        await stream(1.0)
        cloud.send_signal(signal.SIGSTOP)  # the ingester stalls: it reads nothing, acknowledges nothing
        try:
            await stream(stall)
        finally:
            cloud.send_signal(signal.SIGCONT)
        await stream(1.0)
        for d in daemons.values():
            d.pipeline.flush()
        accepted = {dev: d.outbox.next_seq("results") for dev, d in daemons.items()}

        def converged() -> bool:
            c = store.counts()
            return all(
                c.get(dev) is not None and c[dev].distinct_seqs == accepted[dev] for dev in devs if devs[dev] == "cloud"
            ) and all(sum(d.outbox.depth().values()) == 0 for d in daemons.values())

        await until(converged, 90, "every accepted row of the cloud-ack devices stored")
        figures["broker dropped"] = await asyncio.to_thread(broker_dropped, broker)
        lost = {dev: len(set(range(n)) - set(stored_seqs(store, dev))) for dev, n in accepted.items()}
        dup = {dev: c.duplicates for dev, c in store.counts().items() if dev in devs}
        figures.update(accepted=accepted, lost=lost, duplicated=dup)
        for d in daemons.values():
            await d.shutdown(0.5)

    try:
        asyncio.run(asyncio.wait_for(go(), 150))
    finally:
        cloud.send_signal(signal.SIGCONT)
        cloud.terminate()
        try:
            cloud.wait(timeout=20)
        except subprocess.TimeoutExpired:
            cloud.kill()
            cloud.wait()
        broker.stop()
        if store is not None:
            store.close()
    drops = figures["broker dropped"]
    lost, dup, accepted = figures["lost"], figures["duplicated"], figures["accepted"]
    report(
        f"dropping broker: cloud stalled {stall:g} s with max_queued_messages 5; the broker dropped {drops} "
        f"acknowledged messages ($SYS); accepted {accepted}; lost {lost}; duplicated {dup}"
    )
    assert isinstance(drops, int) and drops > 0, "the broker never dropped anything: the fault was not injected"
    assert lost["cloud-ack-0"] == 0 and lost["cloud-ack-1"] == 0  # type: ignore[index]
    assert lost["broker-ack"] > 0, "ack = broker should have lost what the broker dropped after its PUBACK"  # type: ignore[index]
    assert all(v == 0 for v in dup.values())  # type: ignore[union-attr]


def test_long_outage_overruns_the_outbox_cap_with_exact_drop_counts(
    tmp_path: Path, fleet_keys, private_broker: MosquittoBroker, unique_id: str
) -> None:
    key, pub = fleet_keys
    fleet = f"cap{unique_id}"
    cap, before, during = 1000, 500, 3000

    async def go() -> dict[str, int]:
        svc = await start_cloud(tmp_path / "cloud", fleet_keys, private_broker.url, fleet)
        s = settings(tmp_path, pub, "dev-cap", url=private_broker.url, fleet=fleet, outbox={"max_rows": cap})
        d = Daemon(s)
        m = linear_manifest(key, 1)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        await until(lambda: d.uplink.connected, 20, "connected")
        rng = np.random.default_rng(5)
        d.pipeline.submit_arrays(rng.normal(size=(before, 2)))
        d.pipeline.flush()
        await until(lambda: sum(d.outbox.depth().values()) == 0, 30, "the first rows acknowledged")

        await asyncio.to_thread(private_broker.kill)  # a long outage: the broker stays dead
        await until(lambda: not d.uplink.connected, 20, "the device noticing the outage")
        for _ in range(during // 100):
            d.pipeline.submit_arrays(rng.normal(size=(100, 2)))
            d.pipeline.flush()  # inference never waits on the network: the outbox only gets deeper
            assert d.outbox.depth()["results"] <= cap
        accepted = d.outbox.next_seq("results")
        dropped = d.outbox.dropped()["results"]
        held = d.outbox.depth()["results"]
        assert (accepted, held, dropped) == (before + during, cap, during - cap)
        # Telemetry taken during the outage meets a full outbox. Results outrank telemetry: the
        # outbox drops the new message rather than a result (counted like every drop).
        d.outbox.append_message("telemetry", d.telemetry().to_bytes())
        assert d.outbox.dropped() == {"results": dropped, "telemetry": 1, "stats": 0}

        await asyncio.to_thread(private_broker.start)
        await until(lambda: sum(d.outbox.depth().values()) == 0, 60, "the backlog drained after the outage")
        d.outbox.append_message("telemetry", d.telemetry().to_bytes())  # the next telemetry: exact counts
        seqs = stored_seqs(svc.store, "dev-cap")
        missing = sorted(set(range(accepted)) - set(seqs))
        gaps = [s for s in missing if not before <= s < before + dropped]
        assert not gaps, (
            f"rows neither stored nor dropped: {gaps[:20]} (dropped range {before}..{before + dropped - 1})"
        )
        assert len(seqs) + dropped == accepted and len(seqs) == len(set(seqs))
        assert missing == list(range(before, before + dropped)), "the oldest unacknowledged rows went first"
        await until(
            lambda: (svc.store.get_device("dev-cap").drops or 0) == dropped + 1, 10, "drops reported to the cloud"
        )
        await d.shutdown(0.5)
        await svc.stop()
        return {"accepted": accepted, "stored": len(seqs), "dropped": dropped}

    f = asyncio.run(asyncio.wait_for(go(), 120))
    report(
        f"outbox overrun: cap {cap} rows; accepted {f['accepted']}, stored {f['stored']}, dropped {f['dropped']} "
        f"(stored + dropped = {f['stored'] + f['dropped']}); lost beyond the counted drops 0"
    )
