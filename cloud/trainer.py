"""The trainer: when to retrain (triggers), and a run — fit, evaluate against the champion, register."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cloud.config import RetrainSettings
from cloud.errors import NotEnoughDataError
from cloud.fleet import create_deployment
from cloud.registry import Registry
from cloud.rollout import RolloutParams
from cloud.store import Store, Window
from cloud.training import TrainResult, train_from_stats, train_from_store

__all__ = ["TrainOutcome", "Trainer"]

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    result: TrainResult | None
    registered: int | None
    reason: str
    at: float = field(default_factory=time.time)


class Trainer:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        settings: RetrainSettings,
        fleet: str | None = None,
        *,
        emit: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.fleet = fleet
        self.emit = emit or (lambda kind, msg: None)
        self.history: list[TrainOutcome] = []
        self._last = 0.0
        self._rows_at_last = 0
        self._armed: tuple[float, str] | None = None

    def poll(self, now: float) -> TrainOutcome | None:
        """Run the trainer when a trigger says so.

        A trigger that says the world changed (live error, drift) arms the trainer instead of
        training at once: it then collects ``window`` seconds of fresh labelled rows and trains on
        rows since the trigger only, so the new model never learns from the old world."""
        rt = self.settings
        if self._armed is not None:
            since, armed_why = self._armed
            if now - since < (rt.window or rt.cooldown):
                return None
            self._armed = None
            self.emit("train", f"training on rows since the trigger ({now - since:.0f} s of fresh data): {armed_why}")
            return self.run(now=now, window=Window(start=since))
        why = self.should_train(now)
        if why is None:
            return None
        self.emit("trigger", f"retraining: {why}")
        logger.info("retraining %s: %s", rt.model, why)
        if why.startswith(("fleet live MAE", "drift score")):
            self._armed = (now, why)
            self._last = now
            return None
        return self.run(now=now)

    def run(
        self, *, force_register: bool = False, now: float | None = None, window: Window | None = None
    ) -> TrainOutcome:
        """Train now; register the candidate when it beats the champion by the margin (or when forced)."""
        rt = self.settings
        now = time.time() if now is None else now
        self._last = now
        if not rt.features:
            return TrainOutcome(None, None, "no features configured for retraining (retrain.features)")
        self._rows_at_last = self.store.count_labelled(rt.features)
        if window is None:
            window = Window.last(rt.window, now) if rt.window else None
        try:
            if rt.source == "stats":
                res = train_from_stats(self.store, rt.model, rt.features, window, ridge=rt.ridge, margin=rt.margin)
            else:
                res = train_from_store(
                    self.store,
                    rt.model,
                    rt.features,
                    window,
                    holdout_fraction=rt.holdout,
                    ridge=rt.ridge,
                    margin=rt.margin,
                )
        except NotEnoughDataError as exc:
            return TrainOutcome(None, None, str(exc))
        registered = None
        if res.decision.accept or force_register:
            draft = res.manifest(1)
            m = self.registry.register_linear(
                rt.model,
                res.features,
                res.weights.tolist(),
                res.intercept,
                metrics=res.metrics,
                training=draft.training,
                feature_stats=draft.feature_stats,
                target=rt.target,
            )
            registered = m.version
            if rt.auto_deploy:
                params = RolloutParams(canary=rt.canary, bake=rt.bake, max_mae_ratio=rt.max_mae_ratio)
                create_deployment(self.store, rt.model, m.version, "all", params)
        out = TrainOutcome(res, registered, res.decision.reason)
        self.history.append(out)
        self.emit(
            "train",
            f"trained {rt.model} on {res.n_train} rows: {res.decision.reason}"
            + (f"; registered v{registered}" if registered else ""),
        )
        return out

    def should_train(self, now: float) -> str | None:
        """The trigger that fires now, if any: schedule, new labelled rows, live MAE, drift."""
        rt = self.settings
        if not rt.enabled or not rt.features or now - self._last < rt.cooldown:
            return None
        if rt.every and now - self._last >= rt.every:
            return "schedule"
        if rt.after_rows:
            n = self.store.count_labelled(rt.features)
            if n - self._rows_at_last >= rt.after_rows:
                return f"{n - self._rows_at_last} new labelled rows"
        champ = self.store.get_champion(rt.model)
        if champ is None or not (rt.mae_ratio or rt.drift_score):
            return None
        train_mae = champ.metrics.get("mae") or champ.metrics.get("train_mae")
        maes: list[float] = []
        drifts: list[float] = []
        for d in self.store.list_devices(fleet=self.fleet):
            if d.model_version == champ.version and d.live_mae is not None and (d.live_n or 0) >= 20:
                maes.append(d.live_mae)
            feats = (d.telemetry or {}).get("features") or {}
            if feats.get("drift_score") is not None:
                drifts.append(float(feats["drift_score"]))
        if rt.mae_ratio and train_mae and maes:
            live = sorted(maes)[len(maes) // 2]
            if live > rt.mae_ratio * train_mae:
                return f"fleet live MAE {live:.3g} > {rt.mae_ratio:g} x training MAE {train_mae:.3g}"
        if rt.drift_score and drifts:
            med = sorted(drifts)[len(drifts) // 2]
            if med > rt.drift_score:
                return f"drift score {med:.2f} > {rt.drift_score:g}"
        return None
