"""``edgeloop demo``: a fleet drifts, the cloud notices, retrains, canaries, promotes — and catches a bad model.

Everything runs on one event loop: the cloud service (SQLite store, artifact server), N real
device daemons with simulated sensors, and a broker (the one that answers, else a private one).
The demo only *drives* the story (first training, the drift, the bad model); detection,
retraining, canary judgement, promotion and rollback are the product's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devices.broker import BrokerHandle, ensure_broker, free_port
from devices.sensors import make_scenario
from devices.simfleet import FleetSpec, SimFleet

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)
MODEL = "demo"


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 20
    duration: float = 180.0
    broker: str = "mqtt://127.0.0.1:1883"
    out: Path = Path("demo-out")
    headless: bool = False
    rate: float = 5.0
    seed: int = 7


@dataclass
class DemoResult:
    ok: bool
    checks: dict[str, bool]
    failed: list[str]
    summary: dict[str, Any]
    events: list[tuple[float, str]] = field(default_factory=list)


class Story:
    """The demo's event log and marks for the chart."""

    def __init__(self, t0: float, echo: Callable[[str], None] | None) -> None:
        self.t0 = t0
        self.events: list[tuple[float, str]] = []
        self.marks: list[tuple[float, str, str]] = []  # (t, kind, label)
        self.echo = echo

    def log(self, message: str, mark: str | None = None, label: str | None = None) -> None:
        t = time.time() - self.t0
        self.events.append((t, message))
        if mark:
            self.marks.append((t, mark, label or message))
        if self.echo:
            self.echo(f"[{t:6.1f}s] {message}")


async def run_demo(opts: DemoOptions, progress: Callable[[dict[str, Any]], None] | None = None) -> DemoResult:
    from cloud.config import CloudSettings, RetrainSettings
    from cloud.fleet import create_deployment
    from cloud.rollout import RolloutParams
    from cloud.service import CloudService
    from cloud.training import SuffStats, fit
    from runtime.artifacts import generate_keypair

    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Each run starts from scratch: a fresh store, fresh devices (their state dirs), fresh artifacts.
    for stale in ("cloud.db", "cloud.db-wal", "cloud.db-shm", "summary.json", "fleet_mae.png", "events.log"):
        (out / stale).unlink(missing_ok=True)
    for folder in ("devices", "artifacts"):
        shutil.rmtree(out / folder, ignore_errors=True)
    keys = out / "keys"
    if not (keys / "fleet.key").exists():
        generate_keypair(keys)
    broker: BrokerHandle = await ensure_broker(opts.broker)
    fleet_name = f"demo{int(time.time()) % 100000}"
    D = opts.duration
    drift_at = 0.35 * D
    bad_at = 0.72 * D
    settings = CloudSettings(
        fleet=fleet_name,
        broker=broker.url,
        store=f"sqlite:///{out / 'cloud.db'}",
        signing_key=keys / "fleet.key",
        public_key=keys / "fleet.pub",
        artifacts_dir=out / "artifacts",
        http_port=free_port(),
        client_id=f"edgeloop-demo-cloud-{fleet_name}",
        offline_after=30.0,
        retrain=RetrainSettings(
            model=MODEL,
            features=("x1", "x2", "x3"),
            mae_ratio=3.0,
            window=max(10.0, 0.07 * D),
            cooldown=15.0,
            holdout=0.2,
            margin=0.05,
            auto_deploy=True,
            canary=0.2,
            bake=max(6.0, 0.05 * D),
            max_mae_ratio=1.1,
        ),
    )
    echo = None if not opts.headless else print
    story = Story(time.time(), echo)
    cloud = CloudService(settings)
    cloud.listeners.append(lambda kind, msg: story.log(msg, "trigger" if kind == "trigger" else None, "drift detected"))
    spec = FleetSpec(
        devices=opts.devices,
        fleet=fleet_name,
        broker=broker.url,
        rate=opts.rate,
        seed=opts.seed,
        telemetry_interval=2.0,
        resend_after=10.0,
        protocol=broker.protocol,
    )
    scenario = make_scenario("drift", D)
    scenario = type(scenario)(**{**scenario.__dict__, "change_at": drift_at})
    fleet = SimFleet(out / "devices", keys / "fleet.pub", spec, scenario)
    story.log(f"broker: {broker.kind} at {broker.url}; fleet {fleet_name} of {opts.devices} devices; {D:.0f} s")
    await cloud.start()
    await fleet.start()
    story.t0 = time.time()
    fleet_t0 = story.t0
    state: dict[str, Any] = {"v1": None, "v2": None, "bad": None, "rollouts": {}}
    marks = {
        "canary": ("deploy", "canary"),
        "completed": ("promote", "promoted"),
        "rolling_back": ("rollback", "rolled back"),
    }

    def on_rollout(r: Any, m: str) -> None:
        stage = m.split(":", 1)[0]
        kind, word = marks.get(stage, (None, ""))
        story.log(f"rollout {r.id} ({r.model} v{r.version}): {m}", kind, f"v{r.version} {word}")

    cloud.controller.on_event = on_rollout
    drift_logged = False
    try:
        while time.time() - story.t0 < D:
            await asyncio.sleep(0.5)
            t = time.time() - story.t0
            if state["v1"] is None and t > min(12.0, 0.08 * D):
                o = await asyncio.to_thread(cloud.trainer.run, force_register=True)
                if o.registered:
                    state["v1"] = o.registered
                    story.log(f"trained v1 on the first labelled data ({o.result.n_train if o.result else 0} rows)")
                    # auto_deploy created its rollout; the first model goes to a larger canary
            if not drift_logged and t >= drift_at:
                drift_logged = True
                story.log("scenario: the sensors' true coefficients change (drift)", "drift", "drift")
            if state["v2"] is None and state["v1"] is not None:
                later = [h for h in cloud.trainer.history if h.registered and h.registered > state["v1"]]
                if later and later[-1].at - fleet_t0 > drift_at:
                    state["v2"] = later[-1].registered
            if state["bad"] is None and t >= bad_at and state["v2"] is not None:
                if any(r.model == MODEL for r in cloud.store.active_rollouts()):
                    continue
                # A deliberately bad model: fitted on corrupted labels (sign-flipped and shuffled).
                rows = list(cloud.store.labelled_rows(settings.retrain.features))
                X = np.concatenate([c.X for c in rows])[-2000:]
                y = np.concatenate([c.y for c in rows])[-2000:]
                rng = np.random.default_rng(1)
                w, b = fit(SuffStats.from_rows(X, -rng.permutation(y)))
                m = cloud.registry.register_linear(MODEL, settings.retrain.features, w.tolist(), b, metrics={})
                state["bad"] = m.version
                create_deployment(
                    cloud.store,
                    MODEL,
                    m.version,
                    "all",
                    RolloutParams(canary=0.2, bake=settings.retrain.bake, max_mae_ratio=1.1),
                )
                story.log(
                    f"operator deploys v{m.version}, trained on corrupted labels", "deploy", f"v{m.version} (bad)"
                )
            if progress is not None:
                progress(snapshot(cloud, fleet, story))
        story.log("time is up: stopping the fleet (each device drains its outbox)")
    finally:
        await fleet.stop(deadline=10.0)
        await asyncio.sleep(0)
        await cloud.commit()
        await cloud.stop()
        await broker.close()
    return await asyncio.to_thread(evaluate, cloud, fleet, story, state, out, fleet_t0 + drift_at, opts)


def snapshot(cloud: Any, fleet: SimFleet, story: Story) -> dict[str, Any]:
    devices = []
    for d in fleet.devices:
        dm = d.daemon
        if dm is None:
            continue
        devices.append(
            {
                "id": d.id,
                "online": dm.uplink.connected,
                "model": dm.pipeline.model_version,
                "live_mae": dm.pipeline.live.mae,
                "outbox": sum(dm.outbox.depth().values()),
                "update": dm.reconciler.status.state,
            }
        )
    rollouts = [
        {"id": r.id, "version": r.version, "state": r.state, "reason": r.reason}
        for r in cloud.store.list_rollouts(limit=5)
    ]
    return {"t": time.time() - story.t0, "devices": devices, "rollouts": rollouts, "events": story.events[-8:]}


def _mae(rows: list[Any]) -> float | None:
    errs = [abs(r.y_pred - r.y_true) for r in rows if r.y_pred is not None and r.y_true is not None]
    return float(np.mean(errs)) if errs else None


def evaluate(
    cloud: Any, fleet: SimFleet, story: Story, state: dict[str, Any], out: Path, drift_wall: float, opts: DemoOptions
) -> DemoResult:
    store = cloud.store
    rollouts = store.list_rollouts(MODEL, limit=100)
    v1, v2, bad = state["v1"], state["v2"], state["bad"]
    all_rows = []
    for d in fleet.devices:
        since = -1
        while True:
            chunk = store.fetch_results(d.id, since_seq=since, limit=50000)
            if not chunk:
                break
            all_rows.extend(chunk)
            since = chunk[-1].seq
    promoted = {r.version: r for r in rollouts if r.state == "completed"}
    rolled_back = {r.version: r for r in rollouts if r.state == "rolled_back"}
    v2_done = promoted.get(v2) if v2 else None
    before = [r for r in all_rows if r.model_version == v1 and r.ts < drift_wall]
    after = [r for r in all_rows if v2 and r.model_version == v2 and v2_done and r.ts > v2_done.updated_at]
    mae_before, mae_after = _mae(before), _mae(after)
    accepted = fleet.accepted()
    dropped = fleet.dropped()
    counts = store.counts()
    lost = duplicated = 0
    for dev, n in accepted.items():
        c = counts.get(dev)
        stored = c.distinct_seqs if c else 0
        duplicated += c.duplicates if c else 0
        lost += max(0, n - dropped.get(dev, 0) - stored)
    triggers = [m for _, m in story.events if m.startswith("retraining")]
    checks = {
        "drift detected (a retraining trigger fired after the drift)": bool(triggers),
        "a better model registered after the drift": v2 is not None,
        "the better model promoted to the fleet": v2_done is not None,
        "MAE after recovery <= 1.2 x MAE before the drift": (
            mae_before is not None and mae_after is not None and mae_after <= 1.2 * mae_before
        ),
        "the bad model rolled back by the canary gate": bad is not None and bad in rolled_back,
        "results stored = readings accepted (none lost, none twice)": lost == 0 and duplicated == 0,
    }
    failed = [k for k, ok in checks.items() if not ok]
    summary = {
        "devices": opts.devices,
        "duration_s": opts.duration,
        "v1": v1,
        "v2": v2,
        "bad_version": bad,
        "mae_before_drift": mae_before,
        "mae_after_recovery": mae_after,
        "readings_accepted": sum(accepted.values()),
        "results_stored": sum(c.distinct_seqs for c in counts.values()),
        "dropped": sum(dropped.values()),
        "lost": lost,
        "duplicated": duplicated,
        "rollouts": [
            {"id": r.id, "version": r.version, "state": r.state, "reason": r.reason, "params": r.params.get("metrics")}
            for r in rollouts
        ],
        "checks": checks,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "events.log").write_text("\n".join(f"{t:7.1f}s  {m}" for t, m in story.events) + "\n")
    try:
        chart(all_rows, story, out / "fleet_mae.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no chart (pip install 'edgeloop[cloud]')")
    return DemoResult(not failed, checks, failed, summary, story.events)


def chart(rows: list[Any], story: Story, path: Path, bucket: float = 3.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = np.array(
        [(r.ts - story.t0, abs(r.y_pred - r.y_true)) for r in rows if r.y_pred is not None and r.y_true is not None]
    )
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    if pts.size:
        edges = np.arange(0, pts[:, 0].max() + bucket, bucket)
        idx = np.digitize(pts[:, 0], edges)
        xs, ys = [], []
        for i in range(1, len(edges) + 1):
            sel = pts[idx == i, 1]
            if sel.size:
                xs.append(edges[i - 1] + bucket / 2)
                ys.append(float(np.mean(sel)))
        ax.plot(xs, ys, color="#1f4e79", lw=2, label="fleet MAE (labelled readings, 3 s buckets)")
        ax.set_yscale("log")
    colors = {
        "deploy": "#2e7d32",
        "promote": "#1565c0",
        "rollback": "#c62828",
        "drift": "#ef6c00",
        "trigger": "#6a1b9a",
    }
    seen: set[str] = set()
    hi = ax.get_ylim()[1]
    for i, (t, kind, label) in enumerate(story.marks):
        ax.axvline(t, color=colors.get(kind, "grey"), ls="--", lw=1.2, label=kind if kind not in seen else None)
        seen.add(kind)
        y = hi / (1.6 ** (i % 3))  # stagger labels so neighbours do not overlap
        ax.text(t, y, f" {label}", rotation=90, va="top", ha="left", fontsize=8, color=colors.get(kind, "grey"))
    ax.set_xlabel("seconds since the fleet started")
    ax.set_ylabel("mean absolute error")
    ax.set_title("edgeloop demo: drift → retrain → canary → promote; bad model → automatic rollback")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
