"""Device daemon end to end against real Mosquitto and the real cloud ingest (SQLite store)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from brokers import MosquittoBroker
from helpers_cloud import start_cloud
from helpers_device import linear_manifest, settings, until

from runtime.config import dump_toml
from runtime.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def stored(svc, device: str) -> list[int]:
    seqs: list[int] = []
    since = -1
    while True:
        rows = svc.store.fetch_results(device, since_seq=since, limit=100000)
        if not rows:
            return seqs
        seqs.extend(r.seq for r in rows)
        since = rows[-1].seq


def test_readings_in_every_result_stored_once_and_outbox_drained(tmp_path, fleet_keys, machine_broker, unique_id):
    key, pub = fleet_keys
    fleet = f"e2e{unique_id}"

    async def go():
        svc = await start_cloud(tmp_path / "cloud", fleet_keys, machine_broker, fleet)
        s = settings(tmp_path, pub, "dev-a", url=machine_broker, fleet=fleet)
        d = Daemon(s)
        m = linear_manifest(key, 1)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        rng = np.random.default_rng(0)
        for _ in range(50):
            d.pipeline.submit_arrays(rng.normal(size=(100, 2)))
            await asyncio.sleep(0)
        d.pipeline.flush()
        await until(lambda: sum(d.outbox.depth().values()) == 0, 30, "outbox drained by cloud acks")
        seqs = stored(svc, "dev-a")
        assert seqs == list(range(5000))
        assert svc.store.counts()["dev-a"].duplicates == 0
        await until(
            lambda: (
                (svc.store.get_device("dev-a") or None) is not None and svc.store.get_device("dev-a").model_version == 1
            )
        )
        await d.shutdown(2)
        await svc.stop()

    run(go())


def test_broker_killed_twice_mid_stream_loses_nothing(tmp_path, fleet_keys, private_broker: MosquittoBroker, unique_id):
    _, pub = fleet_keys
    fleet = f"kill{unique_id}"

    async def go():
        svc = await start_cloud(tmp_path / "cloud", fleet_keys, private_broker.url, fleet)
        s = settings(tmp_path, pub, "dev-k", url=private_broker.url, fleet=fleet)
        d = Daemon(s)
        await d.start()
        await until(lambda: d.uplink.connected, what="device connected")
        rng = np.random.default_rng(1)
        for i in range(60):
            d.pipeline.submit_arrays(rng.normal(size=(50, 2)))
            if i in (20, 40):
                await asyncio.to_thread(private_broker.restart)
            await asyncio.sleep(0.01)
        d.pipeline.flush()
        accepted = d.outbox.next_seq("results")
        assert accepted == 3000
        await until(lambda: sum(d.outbox.depth().values()) == 0, 60, "everything acknowledged after two broker deaths")
        assert stored(svc, "dev-k") == list(range(3000))
        await d.shutdown(2)
        await svc.stop()

    run(go())


def _write_config(tmp: Path, pub: Path, device: str, url: str, fleet: str) -> Path:
    cfg = tmp / f"{device}.toml"
    s = settings(tmp, pub, device, url=url, fleet=fleet)
    data = json.loads(s.model_dump_json())
    data = {k: v for k, v in data.items() if v is not None}
    for sect in list(data):
        if isinstance(data[sect], dict):
            data[sect] = {k: v for k, v in data[sect].items() if v is not None}
    data["log_level"] = "WARNING"
    cfg.write_text(dump_toml(data))
    return cfg


def test_daemon_sigkilled_mid_stream_loses_and_repeats_nothing(tmp_path, fleet_keys, machine_broker, unique_id):
    _, pub = fleet_keys
    fleet = f"sigkill{unique_id}"
    cfg = _write_config(tmp_path, pub, "dev-s", machine_broker, fleet)
    n = 40000
    lines = tmp_path / "readings.jsonl"
    rng = np.random.default_rng(2)
    with lines.open("w") as f:
        for i, (a, b) in enumerate(rng.normal(size=(n, 2))):
            f.write(json.dumps({"ts": 1.7e9 + i, "a": float(a), "b": float(b)}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "runtime.daemon", "--config", str(cfg), "--input", str(lines)]

    async def go():
        svc = await start_cloud(tmp_path / "cloud", fleet_keys, machine_broker, fleet)
        kills = 0
        for _ in range(3):
            p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
            # kill it once it has stored something and while input remains
            goal = (kills + 1) * 3000
            await until(lambda p=p, goal=goal: len(stored(svc, "dev-s")) > goal or p.poll() is not None, 60, "progress")
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.stderr.close()
            kills += 1
        p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        await until(lambda: len(stored(svc, "dev-s")) >= n, 90, "all readings stored after restarts")
        p.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(p.wait, 30)
        err = p.stderr.read().decode()
        p.stderr.close()
        assert rc == 0, err
        seqs = stored(svc, "dev-s")
        assert seqs == list(range(n)), "every reading exactly once, in order"
        rows = svc.store.fetch_results("dev-s", since_seq=-1, limit=n)
        assert [r.ts for r in rows] == [1.7e9 + i for i in range(n)]  # the file's lines, none repeated
        await svc.stop()
        return kills

    assert run(go(), timeout=240) == 3


def test_sigterm_drains_and_exits_zero(tmp_path, fleet_keys, machine_broker, unique_id):
    _, pub = fleet_keys
    fleet = f"term{unique_id}"
    cfg = _write_config(tmp_path, pub, "dev-t", machine_broker, fleet)
    lines = tmp_path / "r.jsonl"
    lines.write_text("".join(json.dumps({"a": i, "b": 1}) + "\n" for i in range(2000)))

    async def go():
        svc = await start_cloud(tmp_path / "cloud", fleet_keys, machine_broker, fleet)
        p = subprocess.Popen(
            [sys.executable, "-m", "runtime.daemon", "--config", str(cfg), "--input", str(lines)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
        )
        await until(lambda: len(stored(svc, "dev-t")) > 0, 30, "first results")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(p.wait, 30)
        p.stderr.close()
        assert rc == 0 and time.monotonic() - t0 < 25
        await until(lambda: len(stored(svc, "dev-t")) == 2000, 10, "drained before exit")
        await svc.stop()

    run(go())


@pytest.mark.parametrize(
    "payload", [b"not json", b'{"model": 5}', b"{}" * 10000, b'{"device": "dev-m", "model": {"name": "x"}}']
)
def test_malformed_desired_and_commands_with_mosquitto_pub(tmp_path, fleet_keys, machine_broker, unique_id, payload):
    import shutil

    key, pub = fleet_keys
    fleet = f"mal{unique_id}"
    mpub = shutil.which("mosquitto_pub")
    from brokers import require_service

    require_service(mpub is not None, "needs mosquitto_pub (apt-get install mosquitto-clients)")
    port = machine_broker.rsplit(":", 1)[1]

    async def go():
        s = settings(tmp_path, pub, "dev-m", url=machine_broker, fleet=fleet)
        d = Daemon(s)
        m = linear_manifest(key, 1)
        d.store.install(m)
        d.store.activate(m.ref)
        await d.start()
        await until(lambda: d.uplink.connected)
        for suffix in ("desired", "cmd", "ack"):
            subprocess.run(
                [mpub, "-h", "127.0.0.1", "-p", port, "-q", "1", "-t", f"edgeloop/{fleet}/dev-m/{suffix}", "-s"],
                input=payload,
                check=True,
            )
        await until(lambda: d.invalid_messages >= 3, 10, "three invalid messages counted")
        d.pipeline.submit_arrays(np.ones((3, 2)))
        d.pipeline.flush()
        assert d.pipeline.model_version == 1 and d.outbox.next_seq("results") == 3  # still serving
        await d.shutdown(0.5)

    run(go())


def test_sigterm_while_starting_still_exits_zero(tmp_path, fleet_keys, machine_broker, unique_id):
    """systemd may stop a unit it has just started: the signal arrives before the event loop
    takes the signals over (here: while the config is read), and the exit is still a clean 0."""
    _, pub = fleet_keys
    cfg = _write_config(tmp_path, pub, "dev-s", machine_broker, f"early{unique_id}")
    code = (
        "import os, signal, sys\n"
        "import runtime.daemon as d\n"
        "real = d.load_settings\n"
        "def load(path):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(path)\n"
        "d.load_settings = load\n"
        f"sys.exit(d.main(['--config', {str(cfg)!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
