"""Device throughput and memory, end to end, against baselines measured in the same run.

source (Python interface) → predict → outbox (SQLite) → Mosquitto → the cloud service (stores,
acknowledges) → rows deleted. Baselines: a naive paho loop publishing one QoS 1 message per
result (no durability), and a bare process that only imports the daemon's libraries.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
N_READINGS = int(os.environ.get("BENCH_READINGS", "400000"))
N_NAIVE = int(os.environ.get("BENCH_NAIVE", "40000"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n")
    p = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("mosquitto did not start")


NAIVE = r"""
import sys, time, threading
import paho.mqtt.client as mqtt
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="naive", protocol=mqtt.MQTTv311)
c.max_inflight_messages_set(0)
done = threading.Event(); acked = [0]
def on_publish(c, u, mid, rc, p):
    acked[0] += 1
    if acked[0] == n: done.set()
c.on_publish = on_publish
c.connect(host, port); c.loop_start()
payload = b'{"device":"naive","seq":%d,"y_pred":1.2345}'
t = time.perf_counter()
for i in range(n):
    c.publish("bench/naive", payload % i, qos=1)
done.wait(120)
dt = time.perf_counter() - t
c.loop_stop(); c.disconnect()
print(n / dt)
"""

BARE = (
    "import numpy, paho.mqtt.client, sqlite3, asyncio, pydantic, "
    "cryptography.hazmat.primitives.asymmetric.ed25519, time, sys; "
    "from pathlib import Path; "
    "print([int(l.split()[1])*1024 for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:')][0])"
)

DEVICE = r"""
import asyncio, json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from runtime.config import load_settings
from runtime.daemon import Daemon
from runtime.telemetry import rss_bytes

async def main():
    s = load_settings(sys.argv[1])
    n = int(sys.argv[2])
    d = Daemon(s, inflight=8)
    await d.start()
    while not d.uplink.connected:
        await asyncio.sleep(0.01)
    rng = np.random.default_rng(0)
    block = rng.normal(size=(512, 8))
    peak = rss_bytes()
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        d.pipeline.submit_arrays(block)
        sent += 512
        if sent % (512 * 8) == 0:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0)
    d.pipeline.flush()
    t_in = time.perf_counter() - t0
    while sum(d.outbox.depth().values()) > 0:
        peak = max(peak, rss_bytes())
        await asyncio.sleep(0.01)
    dt = time.perf_counter() - t0
    p99 = d.pipeline.latency.quantile(0.99)
    p50 = d.pipeline.latency.quantile(0.5)
    await d.shutdown(2)
    print(json.dumps({"n": sent, "seconds": dt, "intake_seconds": t_in, "p50_us": p50, "p99_us": p99,
                      "peak_rss": peak, "bytes_written": d.outbox.bytes_written()}))

asyncio.run(main())
"""

CLOUD = r"""
import asyncio, sys, signal
sys.path.insert(0, sys.argv[2])
from cloud.config import load_cloud_settings
from cloud.service import CloudService
async def main():
    svc = CloudService(load_cloud_settings(sys.argv[1]))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, svc.request_stop)
    await svc.run_forever()
asyncio.run(main())
"""


def main() -> None:
    from runtime.artifacts import generate_keypair, load_private_key, sign_manifest, write_bundle
    from runtime.config import dump_toml
    from runtime.protocol import ModelManifest

    tmp = Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))
    broker, url = start_broker(tmp)
    host, port = "127.0.0.1", url.rsplit(":", 1)[1]
    procs: list[subprocess.Popen[bytes]] = [broker]
    try:
        key, pub = generate_keypair(tmp / "keys")
        feats = [f"f{i}" for i in range(8)]
        m = sign_manifest(
            ModelManifest(
                name="bench", version=1, kind="linear", features=tuple(feats), weights=(0.5,) * 8, intercept=1.0
            ),
            load_private_key(key),
        )
        write_bundle(tmp / "bundle", m)
        fleet = "bench"
        cfg = tmp / "device.toml"
        cfg.write_text(
            dump_toml(
                {
                    "device_id": "bench-dev",
                    "fleet": fleet,
                    "state_dir": str(tmp / "state"),
                    "public_key": str(pub),
                    "features": feats,
                    "log_level": "WARNING",
                    "telemetry_interval": 5.0,
                    "broker": {"url": url, "resend_after": 30.0},
                    "source": {"kind": "none"},
                    "batch": {"max_rows": 4096, "max_delay": 0.02},
                    "outbox": {"send_batch_rows": 4096, "max_rows": 5_000_000, "max_bytes": 2 * 1024**3},
                    "share": {"mode": "none"},
                }
            )
        )
        subprocess.run(
            [sys.executable, "-m", "edgeloop", "device", "install-model", str(tmp / "bundle"), "--config", str(cfg)],
            env=ENV,
            check=True,
            capture_output=True,
        )
        ccfg = tmp / "cloud.toml"
        ccfg.write_text(
            dump_toml(
                {
                    "fleet": fleet,
                    "broker": url,
                    "store": f"sqlite:///{tmp / 'cloud.db'}",
                    "signing_key": str(key),
                    "public_key": str(pub),
                    "artifacts_dir": str(tmp / "artifacts"),
                    "http_port": free_port(),
                    "log_level": "WARNING",
                    "ingest_batch": 8192,
                    "retrain": {"enabled": False},
                }
            )
        )
        cloud = subprocess.Popen([sys.executable, "-c", CLOUD, str(ccfg), str(REPO)], env=ENV)
        procs.append(cloud)
        time.sleep(1.5)  # let the service subscribe (its subscription is persistent from here on)

        # 1. naive baseline: one QoS 1 message per result, no durability
        naive = float(
            subprocess.run(
                [sys.executable, "-c", NAIVE, host, port, str(N_NAIVE)],
                env=ENV,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )

        # 2. bare process memory
        bare = int(subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True, check=True).stdout)

        # 3. idle daemon memory (real process, the command systemd runs, linear model loaded)
        idle_proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.daemon", "--config", str(cfg)], env=ENV, stderr=subprocess.PIPE
        )
        procs.append(idle_proc)
        time.sleep(3.0)
        idle = rss_of(idle_proc.pid)
        loaded = Path(f"/proc/{idle_proc.pid}/maps").read_text()
        ort_loaded = "onnxruntime" in loaded
        typer_loaded = "typer" in loaded or "rich" in loaded
        idle_proc.send_signal(signal.SIGTERM)
        idle_proc.wait(30)

        # 4. end to end under load
        out = subprocess.run(
            [sys.executable, "-c", DEVICE, str(cfg), str(N_READINGS), str(REPO)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            print(out.stderr)
            raise SystemExit(1)
        dev = json.loads(out.stdout.strip().splitlines()[-1])
        rate = dev["n"] / dev["seconds"]
        cloud.send_signal(signal.SIGTERM)
        cloud.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    mb = 1024 * 1024
    rows = [
        ("end-to-end readings/s (source→…→acked→deleted)", f"{rate:,.0f}", ">= 100,000"),
        ("naive paho, one QoS 1 msg per result, msgs/s", f"{naive:,.0f}", "baseline"),
        ("ratio end-to-end / naive", f"{rate / naive:.1f}x", ">= 5x"),
        ("p50 / p99 reading→outbox latency", f"{dev['p50_us'] / 1000:.1f} / {dev['p99_us'] / 1000:.1f} ms", ""),
        ("idle RSS, daemon with a linear model", f"{idle / mb:.1f} MB", "<= 60 MB"),
        ("bare process importing the daemon's libraries", f"{bare / mb:.1f} MB", "baseline"),
        ("idle RSS above bare", f"{(idle - bare) / mb:.1f} MB", "<= 10 MB"),
        ("peak RSS under load", f"{dev['peak_rss'] / mb:.1f} MB", ""),
        ("onnxruntime / typer+rich loaded in the daemon", f"{ort_loaded} / {typer_loaded}", "False / False"),
        ("outbox bytes written per reading", f"{dev['bytes_written'] / dev['n']:.0f} B", ""),
    ]
    w = max(len(r[0]) for r in rows)
    for name, val, target in rows:
        print(f"{name:<{w}}  {val:>18}  {target}")
    print(
        json.dumps(
            {
                "readings_per_s": round(rate),
                "naive_msgs_per_s": round(naive),
                "ratio_vs_naive": round(rate / naive, 2),
                "p50_latency_ms": round(dev["p50_us"] / 1000, 2),
                "p99_latency_ms": round(dev["p99_us"] / 1000, 2),
                "idle_rss_mb": round(idle / mb, 1),
                "bare_rss_mb": round(bare / mb, 1),
                "idle_above_bare_mb": round((idle - bare) / mb, 1),
                "peak_rss_mb": round(dev["peak_rss"] / mb, 1),
                "onnxruntime_loaded": ort_loaded,
                "cli_libs_loaded": typer_loaded,
                "readings": dev["n"],
            }
        )
    )


if __name__ == "__main__":
    main()
