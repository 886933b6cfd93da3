"""Start the real cloud service in-process for end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brokers import free_port

from cloud.config import CloudSettings, RetrainSettings
from cloud.service import CloudService


def cloud_settings(
    tmp: Path, keys: tuple[Path, Path], broker: str, fleet: str, store: str | None = None, **extra: Any
) -> CloudSettings:
    key, pub = keys
    data: dict[str, Any] = {
        "fleet": fleet,
        "broker": broker,
        "store": store or f"sqlite:///{tmp / 'cloud.db'}",
        "signing_key": key,
        "public_key": pub,
        "artifacts_dir": tmp / "artifacts",
        "http_port": free_port(),
        "client_id": f"cloud-{fleet}",
        "ingest_delay": 0.02,
        "rollout_interval": 0.2,
        "retrain": RetrainSettings(enabled=False, model="m", features=("a", "b")),
    }
    data.update(extra)
    return CloudSettings.model_validate(data)


async def start_cloud(tmp: Path, keys: tuple[Path, Path], broker: str, fleet: str, **extra: Any) -> CloudService:
    svc = CloudService(cloud_settings(tmp, keys, broker, fleet, **extra))
    await svc.start()
    await svc.client.wait_connected()
    return svc
