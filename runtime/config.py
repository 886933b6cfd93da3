"""Device configuration: a TOML file plus ``EDGELOOP_*`` environment overrides, validated once.

The only module on the device that reads ``os.environ`` (besides the Greengrass/Azure adapters,
which read the variables their platforms define). Everything else receives a frozen
:class:`DeviceSettings`.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from runtime.errors import ConfigError

__all__ = [
    "BatchSettings",
    "BrokerSettings",
    "DeviceSettings",
    "OutboxSettings",
    "ShareSettings",
    "SourceSettings",
    "UpdateSettings",
    "config_hash",
    "dump_toml",
    "load_settings",
]

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
Identifier = Annotated[str, StringConstraints(pattern=_ID)]
ENV_PREFIX = "EDGELOOP_"


class _Section(BaseModel):
    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid")


class BrokerSettings(_Section):
    """Where the uplink connects. ``transport`` picks the module in runtime/transports/."""

    transport: Literal["mqtt", "aws-iot", "greengrass", "azure-iot", "azure-edge", "memory"] = "mqtt"
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None
    protocol: Literal["3.1.1", "5"] = "5"
    session_expiry: int = Field(default=3600, ge=0, le=2**32 - 1)
    keepalive: int = Field(default=30, ge=5, le=3600)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    backoff_min: float = Field(default=0.5, gt=0, le=60)
    backoff_max: float = Field(default=30.0, gt=0, le=3600)
    #: ``cloud``: delete outbox rows on the cloud's ack (ours); ``broker``: on PUBACK (IoT Hub, IoT Core rules).
    ack: Literal["cloud", "broker"] = "cloud"
    #: Resend rows sent but not acknowledged by the cloud after this many seconds.
    resend_after: float = Field(default=30.0, gt=0, le=86400)
    #: Azure IoT Hub device connection string (transport azure-iot); never logged.
    connection_string: str | None = Field(default=None, repr=False)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts", "ssl", "tcp", "memory", "ws", "wss", "aws", "azure", "greengrass"):
            raise ValueError(f"unsupported scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
        if parts.scheme in ("mqtt", "mqtts", "ssl", "tcp") and not parts.hostname:
            raise ValueError("broker URL needs a host, e.g. mqtt://127.0.0.1:1883")
        return v

    @model_validator(mode="after")
    def _tls(self) -> BrokerSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (mutual TLS)")
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min must be <= backoff_max")
        return self


class SourceSettings(_Section):
    """Where readings come from when ``--input`` is not given."""

    kind: Literal["mqtt", "file", "stdin", "none"] = "mqtt"
    #: Local broker for the ``readings`` topic (defaults to the uplink broker).
    url: str | None = None
    path: Path | None = None
    #: Keep reading a file as it grows (like ``tail -f``).
    follow: bool = False


class BatchSettings(_Section):
    max_rows: int = Field(default=512, ge=1, le=65536)
    max_delay: float = Field(default=0.05, ge=0.0, le=60.0)


class OutboxSettings(_Section):
    max_rows: int = Field(default=1_000_000, ge=100)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    send_batch_rows: int = Field(default=2000, ge=1, le=65536)
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"


class ShareSettings(_Section):
    """What leaves the device for training: raw rows, sufficient statistics, or both."""

    mode: Literal["raw", "stats", "both", "none"] = "raw"
    capture_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    stats_interval: float = Field(default=60.0, ge=1.0)


class UpdateSettings(_Section):
    allowed_schemes: tuple[Literal["https", "http", "file"], ...] = ("https",)
    max_artifact_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    download_timeout: float = Field(default=30.0, gt=0, le=3600)
    ring_buffer: int = Field(default=256, ge=1, le=65536)
    #: Refuse a model whose predictions on recent inputs differ from the current model's by more than
    #: this many times the current predictions' spread (plus an absolute slack).
    max_output_shift: float = Field(default=100.0, gt=0)
    onnx_threads: int = Field(default=1, ge=1, le=64)
    keep_versions: int = Field(default=3, ge=2, le=100)


class DeviceSettings(_Section):
    device_id: Identifier
    fleet: Identifier = "default"
    group: Identifier | None = None
    state_dir: Path
    public_key: Path
    #: Input feature names in order (the device's input schema); default: the active model's.
    features: tuple[Annotated[str, StringConstraints(min_length=1, max_length=128)], ...] = ()
    broker: BrokerSettings = BrokerSettings()
    source: SourceSettings = SourceSettings()
    batch: BatchSettings = BatchSettings()
    outbox: OutboxSettings = OutboxSettings()
    share: ShareSettings = ShareSettings()
    update: UpdateSettings = UpdateSettings()
    telemetry_interval: float = Field(default=10.0, ge=0.1, le=86400)
    publish_predictions: bool = False
    drain_deadline: float = Field(default=20.0, ge=0.0, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _set_path(data: dict[str, Any], dotted: list[str], value: str) -> None:
    cur = data
    for part in dotted[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot override inside non-table {part!r}", ".".join(dotted))
        cur = nxt
    cur[dotted[-1]] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``EDGELOOP_BROKER__URL=…`` sets ``broker.url``; ``EDGELOOP_DEVICE_ID`` sets ``device_id``."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "EDGELOOP_CONFIG":
            continue
        dotted = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        _set_path(out, dotted, value)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        lines.append(f"  {field}: {err.get('msg')}")
    return "\n".join(lines)


def load_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DeviceSettings:
    """Read TOML, apply ``EDGELOOP_*`` env overrides then explicit ones, validate. Relative paths in
    the file are resolved against the file's folder."""
    data: dict[str, Any] = {}
    source = "settings"
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        source = str(path)
        base_dir = path.resolve().parent
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", str(path)) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", str(path)) from exc
    data = _merge(data, _env_overrides(os.environ if env is None else env))
    if overrides:
        data = _merge(data, overrides)
    try:
        settings = DeviceSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    return _resolve_paths(settings, base_dir)


def _resolve_paths(s: DeviceSettings, base: Path) -> DeviceSettings:
    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base / p)

    upd: dict[str, Any] = {}
    for name in ("state_dir", "public_key"):
        p = getattr(s, name)
        if not p.is_absolute():
            upd[name] = base / p
    b = {k: fix(getattr(s.broker, k)) for k in ("ca", "cert", "key") if getattr(s.broker, k) is not None}
    b = {k: v for k, v in b.items() if v is not None}
    if b:
        upd["broker"] = s.broker.model_copy(update=b)
    if s.source.path is not None and not s.source.path.is_absolute():
        upd["source"] = s.source.model_copy(update={"path": base / s.source.path})
    return s.model_copy(update=upd) if upd else s


def config_hash(s: DeviceSettings) -> str:
    """A short hash of the effective config (secrets excluded) for reported state."""
    data = s.model_dump_json(exclude={"broker": {"password", "connection_string"}})
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a (two-level) settings mapping as TOML; None values are left out."""
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, Mapping)]
    out = ["\n".join(top)]
    for k, v in data.items():
        if isinstance(v, Mapping):
            body = "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None)
            out.append(f"[{k}]\n{body}")
    return "\n\n".join(out) + "\n"
