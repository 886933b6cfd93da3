"""Helpers for device tests: signed models, device settings, waiting without sleeps-as-sync."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from runtime.artifacts import load_private_key, sign_manifest
from runtime.config import DeviceSettings
from runtime.protocol import DesiredState, FeatureStats, ModelManifest

FEATURES = ("a", "b")


def linear_manifest(
    key_path: Path,
    version: int,
    weights: Sequence[float] = (2.0, -1.0),
    intercept: float = 0.5,
    *,
    name: str = "m",
    features: Sequence[str] = FEATURES,
    feature_stats: FeatureStats | None = None,
) -> ModelManifest:
    m = ModelManifest(
        name=name,
        version=version,
        kind="linear",
        features=tuple(features),
        weights=tuple(weights),
        intercept=intercept,
        feature_stats=feature_stats,
    )
    return sign_manifest(m, load_private_key(key_path))


def desired(
    manifest: ModelManifest | None, device: str, *, rollback: bool = False, rollout: str | None = None
) -> bytes:
    return DesiredState(device=device, model=manifest, rollback=rollback, rollout_id=rollout).to_bytes()


def settings(
    tmp: Path,
    pub: Path,
    device: str = "dev-1",
    *,
    transport: str = "mqtt",
    url: str = "mqtt://127.0.0.1:1883",
    fleet: str = "t",
    **extra: Any,
) -> DeviceSettings:
    data: dict[str, Any] = {
        "device_id": device,
        "fleet": fleet,
        "state_dir": tmp / device,
        "public_key": pub,
        "features": list(FEATURES),
        "broker": {"transport": transport, "url": url, "resend_after": 2.0, "backoff_min": 0.1, "backoff_max": 1.0},
        "source": {"kind": "none"},
        "batch": {"max_rows": 256, "max_delay": 0.01},
        "telemetry_interval": 60.0,
        "drain_deadline": 5.0,
        "update": {"allowed_schemes": ["http", "https"]},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return DeviceSettings.model_validate(data)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
    """Run a test scenario on a fresh event loop, bounded in time."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` on the event loop until true; fail with ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)
