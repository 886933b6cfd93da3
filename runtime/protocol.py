"""The wire contract: every MQTT payload as a frozen pydantic model, topic names, PROTOCOL_VERSION.

Pure data, no I/O. Payloads are UTF-8 JSON. Decode with :func:`decode` (or the model's
``from_bytes``), which raises :class:`runtime.errors.ProtocolError` naming the first bad field;
nothing else escapes a decoder.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from runtime.errors import ProtocolError

__all__ = [
    "ACK",
    "CMD",
    "CMD_RESULT",
    "DESIRED",
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "READINGS",
    "REPORTED",
    "RESULTS",
    "STATS",
    "STATUS",
    "TELEMETRY",
    "Ack",
    "ArtifactRef",
    "Command",
    "CommandResult",
    "DesiredState",
    "FeatureDrift",
    "FeatureStats",
    "FlushCommand",
    "GetStateCommand",
    "ModelManifest",
    "ModelRef",
    "PingCommand",
    "Reading",
    "ReportedState",
    "ResultBatch",
    "RollbackCommand",
    "SetCaptureRateCommand",
    "Status",
    "SufficientStats",
    "Telemetry",
    "TrainingInfo",
    "UpdateStatus",
    "Wire",
    "decode",
    "decode_command",
    "encode",
    "parse_topic",
    "topic",
]

PROTOCOL_VERSION: Literal[1] = 1
#: Largest payload any decoder accepts; larger ones are rejected before JSON parsing.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_FEATURES = 1024
MAX_BATCH_ROWS = 65536

# Topic suffixes under edgeloop/{fleet}/{device}/
RESULTS = "results"
TELEMETRY = "telemetry"
STATS = "stats"
ACK = "ack"
REPORTED = "reported"
DESIRED = "desired"
CMD = "cmd"
CMD_RESULT = "cmd/result"
STATUS = "status"
READINGS = "readings"  # local input topic on the device's own broker
SUFFIXES = frozenset({RESULTS, TELEMETRY, STATS, ACK, REPORTED, DESIRED, CMD, CMD_RESULT, STATUS, READINGS})
TOPIC_ROOT = "edgeloop"

_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
Identifier = Annotated[str, StringConstraints(pattern=_ID_RE)]
"""Device, fleet, group and model names: safe in a topic level and as a file name."""
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SeqNo = Annotated[int, Field(ge=0, lt=2**63)]
Version = Annotated[int, Field(ge=1, lt=2**31)]
Stream = Literal["results", "telemetry", "stats"]


def _finite(v: float, what: str = "value") -> float:
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite")
    return v


class Wire(BaseModel):
    """Base of every payload: frozen, strict about unknown fields, carries the protocol version."""

    model_config = ConfigDict(
        regex_engine="python-re", frozen=True, extra="forbid", allow_inf_nan=False, protected_namespaces=()
    )
    kind: ClassVar[str] = "payload"

    v: Literal[1] = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return encode(self)

    @classmethod
    def from_bytes(cls, payload: bytes | str) -> Self:
        return decode(cls, payload)


# --------------------------------------------------------------------------- models


class FeatureStats(BaseModel):
    """Training feature statistics: the reference for drift."""

    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid", allow_inf_nan=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _same_length(self) -> Self:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s < 0 for s in self.std):
            raise ValueError("std must be >= 0")
        return self


class TrainingInfo(BaseModel):
    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid", allow_inf_nan=False)
    source: Literal["rows", "stats", "import", "manual"] = "manual"
    window_start: float | None = None
    window_end: float | None = None
    n_rows: int = Field(default=0, ge=0)
    parent_version: int | None = None
    ridge: float = Field(default=0.0, ge=0)


class ArtifactRef(BaseModel):
    """An artifact stored beside the manifest (``filename``) and optionally served at ``url``."""

    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid")
    filename: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")] = "model.onnx"
    url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    size: int = Field(ge=1, le=2**40)
    sha256: Sha256


class ModelManifest(Wire):
    """A model version. The ed25519 ``signature`` covers :func:`runtime.artifacts.canonical_bytes`."""

    kind: ClassVar[str] = "ModelManifest"

    name: Identifier
    version: Version
    model_kind: Literal["linear", "onnx"] = Field(alias="kind")
    features: tuple[FeatureName, ...] = Field(min_length=1, max_length=MAX_FEATURES)
    dtype: Literal["float32", "float64"] = "float64"
    target: FeatureName = "y"
    created_at: float = 0.0
    nan_policy: Literal["reject", "impute"] = "reject"
    training: TrainingInfo = TrainingInfo()
    metrics: dict[Annotated[str, StringConstraints(max_length=64)], float] = Field(default_factory=dict, max_length=64)
    feature_stats: FeatureStats | None = None
    weights: tuple[float, ...] | None = None
    intercept: float | None = None
    artifact: ArtifactRef | None = None
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    signature: Annotated[str, StringConstraints(max_length=256)] | None = None

    model_config = ConfigDict(
        regex_engine="python-re",
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        populate_by_name=True,
        protected_namespaces=(),
    )

    @field_validator("features")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("feature names must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        d = len(self.features)
        if self.model_kind == "linear":
            if self.weights is None or self.intercept is None:
                raise ValueError("a linear model needs weights and intercept")
            if len(self.weights) != d:
                raise ValueError(f"weights has {len(self.weights)} entries for {d} features")
        else:
            if self.artifact is None:
                raise ValueError("an onnx model needs an artifact")
        if self.feature_stats is not None and len(self.feature_stats.mean) != d:
            raise ValueError(f"feature_stats has {len(self.feature_stats.mean)} entries for {d} features")
        if self.nan_policy == "impute" and self.feature_stats is None:
            raise ValueError("nan_policy 'impute' needs feature_stats (the training means)")
        return self

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)


class ModelRef(BaseModel):
    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid")
    name: Identifier
    version: Version


class Reading(Wire):
    """One sensor reading on the local ``readings`` topic or a JSON line."""

    kind: ClassVar[str] = "Reading"
    ts: float | None = None
    features: dict[FeatureName, float | None] | list[float | None] = Field(max_length=MAX_FEATURES)
    y_true: float | None = None


class ResultBatch(Wire):
    """Consecutive results ``seq_first..seq_last`` of one device, columnar.

    ``floor``: every sequence number <= floor is already acknowledged or was dropped by the
    device's outbox cap, so the cloud's watermark may advance past it.
    """

    kind: ClassVar[str] = "ResultBatch"
    device: Identifier
    model: Identifier | None = None
    seq_first: SeqNo
    seq_last: SeqNo
    floor: int = Field(default=-1, ge=-1, lt=2**63)
    ts: list[float]
    model_version: list[int]
    y_pred: list[float | None]
    x: list[list[float | None] | None] | None = None
    features: tuple[FeatureName, ...] | None = None
    y_true: list[float | None] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> Self:
        n = self.seq_last - self.seq_first + 1
        if n < 1:
            raise ValueError("seq_last must be >= seq_first")
        if n > MAX_BATCH_ROWS:
            raise ValueError(f"batch of {n} rows exceeds {MAX_BATCH_ROWS}")
        if self.floor >= self.seq_first:
            raise ValueError("floor must be below seq_first")
        for name in ("ts", "model_version", "y_pred", "x", "y_true"):
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"{name} has {len(col)} entries for {n} sequence numbers")
        if self.x is not None:
            widths = {len(r) for r in self.x if r is not None}
            if len(widths) > 1:
                raise ValueError("x rows differ in width")
            if self.features is not None and widths and widths != {len(self.features)}:
                raise ValueError("x width does not match features")
        return self

    @property
    def n(self) -> int:
        return self.seq_last - self.seq_first + 1


class FeatureDrift(BaseModel):
    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid", allow_inf_nan=False)
    n: int = Field(ge=0)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    drift_score: float | None = None


class Telemetry(Wire):
    kind: ClassVar[str] = "Telemetry"
    device: Identifier
    #: The outbox sequence number of this message and, as in ResultBatch, the floor below it.
    seq: SeqNo = 0
    floor: int = Field(default=-1, ge=-1, lt=2**63)
    ts: float
    uptime_s: float = Field(ge=0)
    model_version: int | None = None
    readings: int = Field(ge=0)
    predictions: int = Field(ge=0)
    rejected: int = Field(ge=0)
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    outbox_depth: int = Field(ge=0)
    outbox_bytes: int = Field(ge=0)
    outbox_dropped: dict[Stream, Annotated[int, Field(ge=0, lt=2**63)]] = Field(default_factory=dict)
    bytes_written: int = Field(default=0, ge=0)
    rss_bytes: int = Field(default=0, ge=0)
    features: FeatureDrift | None = None
    live_mae: float | None = None
    live_n: int = Field(default=0, ge=0)
    last_sync: float | None = None


class SufficientStats(Wire):
    """Sufficient statistics of labelled rows for least squares.

    ``xtx`` and ``xty`` are over the augmented design ``[x_1 .. x_d, 1]``, so ``xtx[d][d] == n``
    and the last row holds the feature sums.
    """

    kind: ClassVar[str] = "SufficientStats"
    device: Identifier
    seq: SeqNo = 0
    floor: int = Field(default=-1, ge=-1, lt=2**63)
    model: Identifier | None = None
    features: tuple[FeatureName, ...] = Field(min_length=1, max_length=MAX_FEATURES)
    window_start: float
    window_end: float
    n: int = Field(ge=0)
    xtx: list[list[float]]
    xty: list[float]
    yty: float

    @model_validator(mode="after")
    def _shapes(self) -> Self:
        d = len(self.features) + 1
        if len(self.xtx) != d or any(len(r) != d for r in self.xtx):
            raise ValueError(f"xtx must be {d}x{d}")
        if len(self.xty) != d:
            raise ValueError(f"xty must have {d} entries")
        return self


class Ack(Wire):
    """Cloud → device: every sequence number <= the watermark of a stream is stored."""

    kind: ClassVar[str] = "Ack"
    device: Identifier
    watermarks: dict[Stream, int] = Field(min_length=1)

    @field_validator("watermarks")
    @classmethod
    def _range(cls, v: dict[str, int]) -> dict[str, int]:
        for k, w in v.items():
            if not -1 <= w < 2**63:
                raise ValueError(f"watermark of {k} out of range")
        return v


class DesiredState(Wire):
    """Cloud → device, retained: the model the device should run and a config patch."""

    kind: ClassVar[str] = "DesiredState"
    device: Identifier | None = None
    model: ModelManifest | None = None
    rollback: bool = False
    rollout_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    config: dict[Literal["capture_rate", "telemetry_interval"], float] = Field(default_factory=dict)
    issued_at: float = 0.0

    @field_validator("config")
    @classmethod
    def _config_values(cls, v: dict[str, float]) -> dict[str, float]:
        if "capture_rate" in v and not 0.0 <= v["capture_rate"] <= 1.0:
            raise ValueError("capture_rate must be within [0, 1]")
        if "telemetry_interval" in v and not 0.1 <= v["telemetry_interval"] <= 86400:
            raise ValueError("telemetry_interval must be within [0.1, 86400] seconds")
        return v


class UpdateStatus(BaseModel):
    model_config = ConfigDict(regex_engine="python-re", frozen=True, extra="forbid")
    state: Literal["idle", "applying", "applied", "failed", "rolled_back"] = "idle"
    version: Version | None = None
    reason: Annotated[str, StringConstraints(max_length=1024)] | None = None
    rollout_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    at: float | None = None


class ReportedState(Wire):
    kind: ClassVar[str] = "ReportedState"
    device: Identifier
    fleet: Identifier | None = None
    group: Identifier | None = None
    active: ModelRef | None = None
    previous: ModelRef | None = None
    update: UpdateStatus = UpdateStatus()
    config_hash: Annotated[str, StringConstraints(max_length=64)] | None = None
    capture_rate: float | None = None
    transport: Annotated[str, StringConstraints(max_length=32)] | None = None
    runtime_version: Annotated[str, StringConstraints(max_length=32)] | None = None
    ts: float = 0.0


_CorrId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class _CommandBase(Wire):
    id: _CorrId
    reply_to: Annotated[str, StringConstraints(max_length=256)] | None = None


class PingCommand(_CommandBase):
    type: Literal["ping"]


class RollbackCommand(_CommandBase):
    type: Literal["rollback"]


class FlushCommand(_CommandBase):
    type: Literal["flush"]


class SetCaptureRateCommand(_CommandBase):
    type: Literal["set_capture_rate"]
    rate: float = Field(ge=0.0, le=1.0)


class GetStateCommand(_CommandBase):
    type: Literal["get_state"]


Command = Annotated[
    PingCommand | RollbackCommand | FlushCommand | SetCaptureRateCommand | GetStateCommand,
    Field(discriminator="type"),
]
_command_adapter: TypeAdapter[Any] = TypeAdapter(Command)


class CommandResult(Wire):
    kind: ClassVar[str] = "CommandResult"
    id: _CorrId
    device: Identifier
    ok: bool
    error: Annotated[str, StringConstraints(max_length=1024)] | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Status(Wire):
    kind: ClassVar[str] = "Status"
    device: Identifier
    state: Literal["online", "offline"]
    ts: float = 0.0


# --------------------------------------------------------------------------- codec

M = TypeVar("M", bound=BaseModel)


def encode(model: BaseModel) -> bytes:
    """Compact UTF-8 JSON of a payload (aliases used, so ``ModelManifest.kind`` is ``kind``)."""
    return model.model_dump_json(by_alias=True, exclude_none=False).encode()


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or None
    return (field or "", str(err.get("msg", "invalid")))


def _load_json(payload: bytes | str, kind: str) -> Any:
    if isinstance(payload, str):
        payload = payload.encode("utf-8", errors="surrogatepass")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError("payload must be bytes", kind=kind)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}", kind=kind)
    try:
        text = bytes(payload).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not valid UTF-8 JSON ({str(exc)[:120]})", kind=kind) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode(cls: type[M], payload: bytes | str) -> M:
    """Parse and validate a payload; raise :class:`ProtocolError` naming the first bad field."""
    kind = getattr(cls, "kind", cls.__name__)
    data = _load_json(payload, kind)
    if not isinstance(data, dict):
        raise ProtocolError("must be a JSON object", kind=kind)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        field, msg = _first_error(exc)
        raise ProtocolError(msg, field=field or None, kind=kind) from None
    except (RecursionError, ValueError, TypeError) as exc:  # pragma: no cover - defensive
        raise ProtocolError(str(exc)[:200], kind=kind) from None


def decode_command(
    payload: bytes | str,
) -> PingCommand | RollbackCommand | FlushCommand | SetCaptureRateCommand | GetStateCommand:
    data = _load_json(payload, "Command")
    if not isinstance(data, dict):
        raise ProtocolError("must be a JSON object", kind="Command")
    try:
        result: PingCommand | RollbackCommand | FlushCommand | SetCaptureRateCommand | GetStateCommand = (
            _command_adapter.validate_python(data)
        )
        return result
    except ValidationError as exc:
        field, msg = _first_error(exc)
        raise ProtocolError(msg, field=field or None, kind="Command") from None
    except (RecursionError, ValueError, TypeError) as exc:  # pragma: no cover - defensive
        raise ProtocolError(str(exc)[:200], kind="Command") from None


# --------------------------------------------------------------------------- topics

_ID = re.compile(_ID_RE)


def topic(fleet: str, device: str, suffix: str) -> str:
    """``edgeloop/{fleet}/{device}/{suffix}``; ``device`` may be ``+`` for a subscription."""
    if suffix not in SUFFIXES:
        raise ProtocolError(f"unknown topic suffix {suffix!r}", field="topic")
    for what, value in (("fleet", fleet), ("device", device)):
        if value != "+" and not _ID.match(value):
            raise ProtocolError(f"{value!r} is not a valid identifier", field=what)
    return f"{TOPIC_ROOT}/{fleet}/{device}/{suffix}"


def parse_topic(t: str) -> tuple[str, str, str]:
    """Split a topic into ``(fleet, device, suffix)``; raise ProtocolError when it is not ours."""
    parts = t.split("/", 3)
    if len(parts) != 4 or parts[0] != TOPIC_ROOT:
        raise ProtocolError(f"not an edgeloop topic: {t[:200]!r}", field="topic")
    _, fleet, device, suffix = parts
    if not _ID.match(fleet) or not _ID.match(device) or suffix not in SUFFIXES:
        raise ProtocolError(f"malformed edgeloop topic: {t[:200]!r}", field="topic")
    return fleet, device, suffix
