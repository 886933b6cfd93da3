"""Errors raised by the device runtime.

Hierarchy::

    EdgeloopError                 base of everything we raise on purpose
     ├── ConfigError              a config file, env override or CLI argument is wrong (field, reason)
     ├── ProtocolError            an MQTT payload or topic does not validate (field, reason)
     ├── ArtifactError            a model bundle is malformed (path, reason)
     │    └── SignatureError      signature or hash does not verify
     ├── ModelError               a model cannot be loaded or run (reason)
     │    └── InputError          a reading is unusable (row, column, reason)
     ├── UpdateError              a model update was refused (version, reason)
     ├── OutboxError              the durable outbox cannot be opened or written
     └── TransportError           the uplink cannot reach or talk to the broker/cloud

Third-party exceptions are translated into these only in the adapter that calls the third
party (``raise ... from exc``); everything above the adapters sees only these.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "EdgeloopError",
    "InputError",
    "ModelError",
    "OutboxError",
    "ProtocolError",
    "SignatureError",
    "TransportError",
    "UpdateError",
]


class EdgeloopError(Exception):
    """Base class for every error edgeloop raises on purpose."""


class ConfigError(EdgeloopError):
    def __init__(self, reason: str, field: str | None = None) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class ProtocolError(EdgeloopError):
    """A payload or topic that does not follow the wire contract."""

    def __init__(self, reason: str, field: str | None = None, kind: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.kind = kind
        where = f"{kind}." if kind else ""
        super().__init__(f"{where}{field}: {reason}" if field else f"{kind or 'payload'}: {reason}")


class ArtifactError(EdgeloopError):
    def __init__(self, reason: str, path: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class SignatureError(ArtifactError):
    """The manifest's signature or the artifact's hash does not verify."""


class ModelError(EdgeloopError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class InputError(ModelError):
    def __init__(self, reason: str, row: int | None = None, column: str | int | None = None) -> None:
        self.row = row
        self.column = column
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}" if isinstance(column, str) else f"column {column}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)
        self.reason = reason


class UpdateError(EdgeloopError):
    def __init__(self, reason: str, version: int | None = None) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"version {version}: {reason}" if version is not None else reason)


class OutboxError(EdgeloopError):
    pass


class TransportError(EdgeloopError):
    pass
