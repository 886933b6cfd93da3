"""Fleet scale: seconds from a deploy until the cloud sees every simulated device on the new version (100/500/1000).

For each fleet size, in fresh processes: a private mosquitto (``max_connections -1``, ``$SYS``
every second, queues raised), the cloud service as ``edgeloop cloud serve`` runs it (its own
process, SQLite store), and one process running ``SimFleet``: N real device daemons (own state
dir, outbox and MQTT connection each) on one event loop, reading at ``--rate`` per second and
sending telemetry every ``--telemetry`` seconds. Once the cloud knows every device, the
benchmark does what ``edgeloop fleet deploy`` does (``create_deployment`` into the store; one
stage: canary 1.0, bake 0) for v1 (devices had no model) and then v2 (everyone on v1). Times
are taken where things happen, from the call: each daemon receiving the desired state (its
handler), applying it (its update status), building its report, and the cloud storing that
report — the last of those is the convergence (what ``edgeloop fleet list`` then shows).
Also: the broker's message rate during the convergence (``$SYS/broker/messages/received`` and
``sent`` deltas), CPU seconds of the fleet, cloud and broker processes, how late the fleet's
shared event loop ran a 0.1 s timer, and per device: RSS added by the fleet over N, start-up
CPU over N, idle CPU share over ``--idle`` seconds. Every size is bounded (``--timeout``) and
cleans up its processes and temp folders. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_ingest import Mosquitto, free_port  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MODEL = "fleetbench"
FEATURES = ("x1", "x2", "x3")
TARGETS = {500: 10.0, 1000: 30.0}


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (each daemon holds ~6 descriptors); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | None = None) -> int:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- the fleet process


class SysCounters:
    """The broker's ``$SYS/broker/messages/{received,sent}`` counters, sampled as they arrive (every second)."""

    TOPICS = ("$SYS/broker/messages/received", "$SYS/broker/messages/sent")

    def __init__(self, url: str) -> None:
        from runtime.mqttclient import AsyncMqttClient, MqttMessage

        self.samples: dict[str, list[tuple[float, int]]] = {t: [] for t in self.TOPICS}
        self.client = AsyncMqttClient(url, client_id=f"sys-{uuid.uuid4().hex[:8]}", clean_start=True, protocol="3.1.1")

        def on_message(m: MqttMessage) -> None:
            if m.topic in self.samples:
                self.samples[m.topic].append((time.monotonic(), int(m.payload)))

        self.client.on_message = on_message
        for t in self.TOPICS:
            self.client.subscribe(t, qos=0)

    def rate(self, t0: float, t1: float) -> dict[str, float | None]:
        """Messages per second between the last sample at or before ``t0`` and the first at or after ``t1``."""
        out: dict[str, float | None] = {}
        for t, s in self.samples.items():
            before = [x for x in s if x[0] <= t0]
            after = [x for x in s if x[0] >= t1]
            key = t.rsplit("/", 1)[1]
            if not before or not after or after[0][0] <= before[-1][0]:
                out[key] = None
                continue
            a, b = before[-1], after[0]
            out[key] = (b[1] - a[1]) / (b[0] - a[0])
        return out


async def wait_until(cond: Any, timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await cond():
            return True
        await asyncio.sleep(every)
    return bool(await cond())


async def fleet_main(a: argparse.Namespace) -> dict[str, Any]:
    """Runs in the fleet process: start N daemons, deploy v1 then v2, time the convergences."""
    from cloud.registry import Registry
    from cloud.store import open_store
    from devices.sensors import Scenario
    from devices.simfleet import FleetSpec, SimFleet
    from runtime.artifacts import load_private_key

    n = a.devices
    root = Path(a.root)
    out: dict[str, Any] = {"devices": n}
    sysc = SysCounters(a.broker)
    await sysc.client.start()
    store = open_store(a.store)
    registry = Registry(store, root / "artifacts", load_private_key(Path(a.key)), "http://127.0.0.1:1")
    spec = FleetSpec(
        devices=n,
        fleet=a.fleet,
        broker=a.broker,
        rate=a.rate,
        tick=a.tick,
        telemetry_interval=a.telemetry,
        label_share=0.5,
        share="raw",
        groups=(),
        prefix="d",
        resend_after=30.0,
    )
    # the benchmark's own store reads get a thread of their own: the daemons' to_thread work
    # (bundle installs, pointer fsyncs) queues in the default executor
    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-poll")
    loop = asyncio.get_running_loop()
    if a.threads:
        # N devices share one process, so their blocking disk work (bundle installs, fsynced
        # pointer switches: asyncio.to_thread) shares its default executor; size it for the fleet.
        loop.set_default_executor(ThreadPoolExecutor(int(a.threads), thread_name_prefix="fleet"))
    rss0, cpu0, t0 = rss_bytes(), self_cpu(), time.monotonic()
    fleet = SimFleet(root / "devices", Path(a.pub), spec, Scenario("steady"))
    try:
        await fleet.start()

        async def all_connected() -> bool:
            return all(d.daemon is not None and d.daemon.uplink.connected for d in fleet.devices)

        if not await wait_until(all_connected, a.step_timeout, 0.1):
            raise RuntimeError(
                f"only {sum(1 for d in fleet.devices if d.daemon and d.daemon.uplink.connected)}/{n} connected"
            )
        out["startup_s"] = time.monotonic() - t0

        async def cloud_knows() -> bool:
            return len(await loop.run_in_executor(pool, store.list_devices, a.fleet)) >= n

        if not await wait_until(cloud_knows, a.step_timeout, 0.2):
            raise RuntimeError("the cloud did not learn of every device")
        out["cloud_knows_s"] = time.monotonic() - t0
        out["startup_cpu_s"] = self_cpu() - cpu0

        # idle: the fleet reading, sending results and telemetry, no deploy
        c0, w0 = self_cpu(), time.monotonic()
        await asyncio.sleep(a.idle)
        out["idle_cpu_share"] = (self_cpu() - c0) / (time.monotonic() - w0)
        out["rss_bytes"] = rss_bytes()
        out["rss_fleet_bytes"] = rss_bytes() - rss0

        out["deploys"] = []
        for k in range(a.deploys):
            # v1 reaches devices with no model; later versions replace the one running
            m = registry.register_linear(MODEL, FEATURES, (3.0, -2.0, 0.5 + 0.01 * k), 5.0, metrics={"mae": 0.3})
            if k:
                await asyncio.sleep(a.settle)  # let the previous deploy's aftermath (reports, acks) pass
            prof = os.environ.get("BENCH_FLEET_PROFILE")  # a path: cProfile the convergences into it
            if prof:
                import cProfile

                with cProfile.Profile() as pr:
                    out["deploys"].append(await converge(a, fleet, store, sysc, m.version, pool))
                pr.dump_stats(f"{prof}.{n}.v{m.version}")
            else:
                out["deploys"].append(await converge(a, fleet, store, sysc, m.version, pool))
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(60):
                await fleet.stop(deadline=5.0)
        await sysc.client.stop()
        pool.shutdown()
        store.close()
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def converge(
    a: argparse.Namespace, fleet: Any, store: Any, sysc: SysCounters, version: int, pool: ThreadPoolExecutor
) -> dict[str, Any]:
    """Deploy ``version`` to all and time it; stage times are exact (recorded where they happen)."""
    from cloud.fleet import create_deployment
    from cloud.rollout import RolloutParams

    loop = asyncio.get_running_loop()
    n = len(fleet.devices)
    # When each daemon received the desired state: its handler, wrapped per instance for this window.
    received: dict[str, float] = {}
    for d in fleet.devices:
        daemon = d.daemon

        def on_desired(desired: Any, _orig: Any = daemon._on_desired, _id: str = d.id) -> None:
            if desired.model is not None and desired.model.version == version and _id not in received:
                received[_id] = time.time()
            _orig(desired)

        daemon._on_desired = on_desired
    lags: list[float] = []

    async def probe() -> None:  # how late the shared event loop runs a 0.1 s timer
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.1)
            lags.append(time.monotonic() - t - 0.1)

    prober = asyncio.create_task(probe())
    cpu = {"fleet": self_cpu(), "cloud": proc_cpu(a.cloud_pid), "broker": proc_cpu(a.broker_pid)}
    t0, w0 = time.monotonic(), time.time()
    rec = await loop.run_in_executor(
        pool,
        lambda: create_deployment(store, MODEL, version, "all", RolloutParams(canary=1.0, bake=0.0, min_labelled=1)),
    )

    async def done() -> bool:
        if not all(d.daemon.pipeline.model_version == version for d in fleet.devices):
            return False
        recs = await loop.run_in_executor(pool, store.list_devices, a.fleet)
        return sum(1 for r in recs if r.model_name == MODEL and r.model_version == version) == n

    await wait_until(done, a.converge_timeout, 0.25)
    t_end = time.monotonic()
    cpu_s = {
        "fleet": self_cpu() - cpu["fleet"],
        "cloud": proc_cpu(a.cloud_pid) - cpu["cloud"],
        "broker": proc_cpu(a.broker_pid) - cpu["broker"],
    }
    prober.cancel()
    for d in fleet.devices:
        with contextlib.suppress(AttributeError):
            del d.daemon._on_desired
    applied = [
        st.at - w0
        for d in fleet.devices
        if (st := d.daemon.reconciler.status).state == "applied" and st.version == version and st.at is not None
    ]

    def reports() -> tuple[list[float], list[float]]:
        """Per device, its first reported state on ``version``: built (device clock), stored (the cloud's)."""
        built, stored = [], []
        for d in fleet.devices:
            on = [
                (rcv, st)
                for rcv, st in store.reported_history(d.id, 20)
                if st.ts >= w0 and st.active is not None and st.active.version == version
            ]
            if on:
                rcv, st = min(on, key=lambda x: x[1].ts)
                built.append(st.ts - w0)
                stored.append(rcv - w0)
        return built, stored

    built, stored = await loop.run_in_executor(pool, reports)
    got = [t - w0 for t in received.values()]
    res: dict[str, Any] = {"version": version, "rollout": rec.id, "devices": n}
    res["serving"] = sum(1 for d in fleet.devices if d.daemon.pipeline.model_version == version)
    for key, xs in (("received", got), ("applied", applied), ("reported", built), ("stored", stored)):
        res[f"{key}_s"] = {"first": pct(xs, 0), "p50": pct(xs, 0.5), "last": pct(xs, 1), "n": len(xs)}
    # converged: the cloud's store holds every device's report of the new version (what
    # `edgeloop fleet list` and the rollout controller see); devices: every daemon switched
    res["devices_s"] = pct(applied, 1) if len(applied) == n else None
    res["converge_s"] = pct(stored, 1) if len(stored) == n and res["serving"] == n else None
    res["cpu_s"] = cpu_s
    res["window_s"] = t_end - t0
    res["loop_lag_s"] = {"p50": pct(lags, 0.5), "max": pct(lags, 1)}
    t1 = t0 + (res["converge_s"] or res["window_s"])
    await wait_until(lambda: _has_after(sysc, t1), 3.0, 0.1)  # $SYS arrives once a second
    res["broker_msgs_per_s"] = sysc.rate(t0, t1)
    row = await loop.run_in_executor(pool, store.get_rollout, rec.id)
    res["rollout_state"] = row.state if row is not None else None
    return res


async def _has_after(sysc: SysCounters, t: float) -> bool:
    return all(any(x[0] >= t for x in s) for s in sysc.samples.values())


def fleet_child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    for name in ("root", "broker", "store", "key", "pub", "fleet"):
        ap.add_argument(f"--{name}", required=True)
    for name in ("devices", "cloud-pid", "broker-pid", "threads", "deploys"):
        ap.add_argument(f"--{name}", type=int, required=True)
    for name in ("rate", "tick", "telemetry", "idle", "step-timeout", "converge-timeout", "settle"):
        ap.add_argument(f"--{name}", type=float, required=True)
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="fleet %(levelname)s %(name)s: %(message)s")
    res = asyncio.run(fleet_main(a))
    print(json.dumps(res))


# --------------------------------------------------------------------------- orchestration


def run_size(n: int, args: argparse.Namespace, mq: Mosquitto, tmp: Path, keys: tuple[Path, Path]) -> dict[str, Any]:
    from runtime.config import dump_toml

    fleet = f"fb{n}-{uuid.uuid4().hex[:6]}"
    root = tmp / fleet
    root.mkdir()
    store = f"sqlite:///{root / 'cloud.db'}"
    cfg: dict[str, Any] = {
        "fleet": fleet,
        "broker": mq.url,
        "store": store,
        "signing_key": str(keys[0]),
        "public_key": str(keys[1]),
        "artifacts_dir": str(root / "artifacts"),
        "http_port": free_port(),
        "client_id": f"cloud-{fleet}",
        "log_level": "WARNING",
        "offline_after": 300.0,
        "retrain": {"enabled": False},
    }
    if args.rollout_interval:
        cfg["rollout_interval"] = args.rollout_interval
    (root / "cloud.toml").write_text(dump_toml(cfg))
    procs: list[subprocess.Popen[bytes]] = []
    end = time.monotonic() + args.timeout
    with open(root / "cloud.log", "wb") as cloud_log, open(root / "fleet.log", "wb") as fleet_log:
        try:
            cloud = subprocess.Popen(
                [sys.executable, "-m", "edgeloop", "cloud", "serve", "--config", str(root / "cloud.toml")],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=cloud_log,
            )
            procs.append(cloud)
            opts = {
                "root": root, "broker": mq.url, "store": store, "key": keys[0], "pub": keys[1], "fleet": fleet,
                "devices": n, "cloud-pid": cloud.pid, "broker-pid": mq.proc.pid, "rate": args.rate,
                "tick": args.tick, "telemetry": args.telemetry, "idle": args.idle,
                "step-timeout": args.step_timeout, "converge-timeout": args.converge_timeout, "threads": args.threads, "deploys": args.deploys, "settle": args.settle,
            }  # fmt: skip
            child = subprocess.Popen(
                [sys.executable, __file__, "--child", *(x for k, v in opts.items() for x in (f"--{k}", str(v)))],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=fleet_log,
            )
            procs.append(child)
            try:
                stdout, _ = child.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{n} devices: no result within --timeout {args.timeout:g} s") from None
            if child.returncode != 0:
                log = (root / "fleet.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{n} devices: the fleet process failed ({child.returncode}):\n{log}")
            res: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
            res["cloud_rss_bytes"] = rss_bytes(cloud.pid) if cloud.poll() is None else None
            return res
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        fleet_child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500,1000", help="comma-separated fleet sizes")
    ap.add_argument("--rate", type=float, default=0.2, help="readings per second per device")
    ap.add_argument("--tick", type=float, default=1.0, help="seconds between sensor ticks")
    ap.add_argument("--telemetry", type=float, default=10.0, help="telemetry interval per device (s)")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle fleet measured before deploying")
    ap.add_argument(
        "--threads", type=int, default=32, help="the fleet process's default executor (0: asyncio's, min(32, cpus + 4))"
    )
    ap.add_argument("--deploys", type=int, default=3, help="versions deployed one after the other (v1 to no model)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between one convergence and the next deploy")
    ap.add_argument("--rollout-interval", type=float, default=0.0, help="the cloud's rollout_interval (0: its default)")
    ap.add_argument("--step-timeout", type=float, default=300.0, help="bound on start-up steps (s)")
    ap.add_argument("--converge-timeout", type=float, default=120.0, help="bound on one convergence (s)")
    ap.add_argument("--timeout", type=float, default=900.0, help="bound on one fleet size, end to end (s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folders (logs)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    nofile = raise_nofile()
    from runtime.artifacts import generate_keypair

    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgeloop-bench-fleet-"))
    try:
        keys = generate_keypair(tmp / "keys")
        extra = "max_connections -1\nsys_interval 1\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
        for n in sizes:
            with contextlib.closing(Mosquitto(tmp / f"broker{n}", extra)) as mq:  # a fresh broker per size
                results.append(run_size(n, args, mq, tmp, keys))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    mb = 1024 * 1024
    print(
        f"simulated fleet on one event loop, {args.rate:g} readings/s and telemetry every {args.telemetry:g} s per "
        f"device; deploy = create_deployment (canary 1.0, bake 0); RLIMIT_NOFILE {nofile}"
    )
    print(
        "seconds from create_deployment to: the desired state received by the first / last device, applied by "
        "the last, the last device's report of it built, and stored by the cloud (= converged)"
    )
    print(
        f"{'devices':>7} {'deploy':>6} {'recv 1st':>8} {'recv last':>9} {'applied':>8} {'reported':>8} "
        f"{'STORED':>7} {'target':>13} {'loop lag max':>12} {'broker in/out msg/s':>20} {'CPU s fleet/cloud/broker':>25}"
    )
    figures: dict[str, Any] = {
        "rate": args.rate,
        "telemetry_interval": args.telemetry,
        "executor_threads": args.threads,
        "sizes": {},
    }
    for r in results:
        n = r["devices"]
        for c in r["deploys"]:
            label = f"v{c['version']}"
            rate = c["broker_msgs_per_s"]
            target = TARGETS.get(n)
            conv = c["converge_s"]
            ok = "" if target is None else ("met" if conv is not None and conv <= target else "MISSED")
            cpu = c["cpu_s"]
            print(
                f"{n:>7} {label:>6} {fmt(c['received_s']['first'], '.2f'):>8} {fmt(c['received_s']['last'], '.2f'):>9} "
                f"{fmt(c['applied_s']['last'], '.2f'):>8} {fmt(c['reported_s']['last'], '.2f'):>8} "
                f"{fmt(conv, '.2f'):>7} {f'<= {target:g}s {ok}' if target else '':>13} "
                f"{fmt(c['loop_lag_s']['max'], '.2f'):>12} "
                f"{fmt(rate['received'], ',.0f'):>9} / {fmt(rate['sent'], ',.0f'):<9} "
                f"{cpu['fleet']:>8.1f} / {cpu['cloud']:.1f} / {cpu['broker']:.1f}"
            )
    print(
        f"{'devices':>7} {'start-up':>9} {'CPU ms/dev':>11} {'idle CPU %/dev':>15} {'RSS/dev':>9} {'fleet RSS':>10} {'cloud RSS':>10}"
    )
    summary: list[str] = []
    for r in results:
        n = r["devices"]
        print(
            f"{n:>7} {r['startup_s']:>8.1f}s {r['startup_cpu_s'] / n * 1000:>11.1f} {r['idle_cpu_share'] / n * 100:>15.3f} "
            f"{r['rss_fleet_bytes'] / n / 1024:>7.0f}KB {r['rss_bytes'] / mb:>8.0f}MB "
            f"{fmt(r['cloud_rss_bytes'] and r['cloud_rss_bytes'] / mb, '.0f'):>8}MB"
        )
        f: dict[str, Any] = {
            "startup_s": round(r["startup_s"], 2),
            "startup_cpu_ms_per_device": round(r["startup_cpu_s"] / n * 1000, 2),
            "idle_cpu_pct_per_device": round(r["idle_cpu_share"] / n * 100, 4),
            "rss_kb_per_device": round(r["rss_fleet_bytes"] / n / 1024, 1),
            "fleet_rss_mb": round(r["rss_bytes"] / mb, 1),
        }
        for c in r["deploys"]:
            label = f"v{c['version']}"
            conv = c["converge_s"]
            f[label] = {
                "converge_s": conv and round(conv, 3),
                "devices_s": c["devices_s"] and round(c["devices_s"], 3),
                **{
                    k: {q: v and round(v, 3) for q, v in c[f"{k}_s"].items()}
                    for k in ("received", "applied", "reported", "stored")
                },
                "serving": c["serving"],
                "loop_lag_max_s": c["loop_lag_s"]["max"] and round(c["loop_lag_s"]["max"], 3),
                "broker_received_per_s": c["broker_msgs_per_s"]["received"]
                and round(c["broker_msgs_per_s"]["received"]),
                "broker_sent_per_s": c["broker_msgs_per_s"]["sent"] and round(c["broker_msgs_per_s"]["sent"]),
                "cpu_s": {k: round(v, 2) for k, v in c["cpu_s"].items()},
                "window_s": round(c["window_s"], 2),
                "fleet_cpu_ms_per_device": round(c["cpu_s"]["fleet"] / n * 1000, 2),
                "rollout_state": c["rollout_state"],
            }
            if n in TARGETS:
                f[label]["target_s"] = TARGETS[n]
                f[label]["target_met"] = conv is not None and conv <= TARGETS[n]
        convs = [c["converge_s"] for c in r["deploys"]]
        done = [x for x in convs if x is not None]
        f["converge_s"] = {
            "all_converged": len(done) == len(convs),
            "best": round(min(done), 3) if done else None,
            "median": round(statistics.median(done), 3) if done else None,
            "worst": round(max(done), 3) if len(done) == len(convs) and done else None,
        }
        if n in TARGETS:
            f["target_s"] = TARGETS[n]
            f["target_met"] = f["converge_s"]["worst"] is not None and f["converge_s"]["worst"] <= TARGETS[n]
        figures["sizes"][str(n)] = f
        summary.append(
            f"{n:>7} devices: converged in {fmt(f['converge_s']['best'], '.1f')} / {fmt(f['converge_s']['median'], '.1f')}"
            f" / {fmt(f['converge_s']['worst'], '.1f')} s (best / median / worst of {len(convs)} deploys)"
            + (f"; target <= {TARGETS[n]:g} s: {'met' if f['target_met'] else 'MISSED'}" if n in TARGETS else "")
        )
    for line in summary:
        print(line)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
