"""Cloud service configuration: ``cloud.toml`` read once into frozen pydantic settings."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from runtime.errors import ConfigError

__all__ = ["CloudSettings", "RetrainSettings", "load_cloud_settings"]

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetrainSettings(_Section):
    """When the trainer runs by itself (any trigger fires a run; 0 disables a trigger)."""

    enabled: bool = True
    model: Identifier = "model"
    features: tuple[str, ...] = ()
    target: str = "y"
    after_rows: int = Field(default=0, ge=0)
    mae_ratio: float = Field(default=1.5, ge=0)
    drift_score: float = Field(default=0.0, ge=0)
    every: float = Field(default=0.0, ge=0, description="seconds between scheduled runs")
    min_rows: int = Field(default=200, ge=10)
    window: float = Field(default=0.0, ge=0, description="train on rows newer than this many seconds (0 = all)")
    holdout: float = Field(default=0.2, gt=0, lt=1)
    ridge: float = Field(default=0.0, ge=0)
    margin: float = Field(default=0.02, ge=0, description="relative MAE improvement needed to register")
    source: Literal["rows", "stats"] = "rows"
    cooldown: float = Field(default=30.0, ge=0)
    auto_deploy: bool = False
    canary: float = Field(default=0.1, gt=0, le=1)
    bake: float = Field(default=60.0, ge=0)
    max_mae_ratio: float = Field(default=1.1, gt=0)


class CloudSettings(_Section):
    fleet: Identifier = "default"
    broker: str = "mqtt://127.0.0.1:1883"
    store: str = "sqlite:///cloud.db"
    signing_key: Path = Path("fleet.key")
    public_key: Path = Path("fleet.pub")
    artifacts_dir: Path = Path("artifacts")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8780, ge=0, le=65535)
    #: URL devices use to download artifacts (default: http://{http_host}:{http_port}).
    public_url: str | None = None
    client_id: str = "edgeloop-cloud"
    #: Subscribe with ``$share/{group}/…`` so several ingesters split the load.
    shared_group: str | None = None
    ingest_batch: int = Field(default=200, ge=1)
    ingest_delay: float = Field(default=0.05, ge=0)
    offline_after: float = Field(default=60.0, gt=0)
    rollout_interval: float = Field(default=1.0, gt=0)
    retrain: RetrainSettings = RetrainSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def artifact_base_url(self) -> str:
        return self.public_url or f"http://{self.http_host}:{self.http_port}"


def load_cloud_settings(path: Path, overrides: dict[str, Any] | None = None) -> CloudSettings:
    """Read ``cloud.toml``; relative paths and ``sqlite:///relative`` resolve against its folder."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    data.update(overrides or {})
    try:
        s = CloudSettings.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid configuration in {path}:"]
        for err in exc.errors(include_url=False):
            lines.append(f"  {'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}")
        raise ConfigError("\n".join(lines)) from None
    base = path.resolve().parent
    upd: dict[str, Any] = {}
    for name in ("signing_key", "public_key", "artifacts_dir"):
        p = getattr(s, name)
        if not p.is_absolute():
            upd[name] = base / p
    if s.store.startswith("sqlite:///") and not s.store.startswith("sqlite:////"):
        rel = s.store[len("sqlite:///") :]
        upd["store"] = f"sqlite:///{base / rel}"
    return s.model_copy(update=upd)
