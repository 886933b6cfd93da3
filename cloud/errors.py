"""Errors raised by the cloud side (store, training, registry, rollouts).

Hierarchy::

    runtime.errors.EdgeloopError
     └── CloudError                   base of everything the cloud raises on purpose
          ├── MissingDependencyError  an optional package is not installed (package, extra)
          ├── StoreError              the store cannot be opened, read or written (reason, url)
          │    ├── SchemaError        the database schema is newer than this code, or damaged
          │    ├── NotFoundError      a row that must exist does not (what, key)
          │    └── ConflictError      a unique row already exists, or a compare-and-set lost (what, key)
          ├── TrainingError           a model cannot be trained or evaluated (model, reason)
          │    └── NotEnoughDataError too few labelled rows for the fit (model, n, needed)
          ├── RegistryError           a model version cannot be registered, signed or served (model, version)
          └── RolloutError            a rollout cannot be created or advanced (rollout_id, reason)

Configuration mistakes (a bad store URL, an unknown option) raise ``runtime.errors.ConfigError``.
Database driver exceptions (``sqlite3.Error``, ``psycopg.Error``) are translated into
:class:`StoreError` in the store adapters only (``raise StoreError(...) from exc``).
"""

from __future__ import annotations

from runtime.errors import EdgeloopError

__all__ = [
    "CloudError",
    "ConflictError",
    "MissingDependencyError",
    "NotEnoughDataError",
    "NotFoundError",
    "RegistryError",
    "RolloutError",
    "SchemaError",
    "StoreError",
    "TrainingError",
]


class CloudError(EdgeloopError):
    """Base class of the cloud side's errors."""


class MissingDependencyError(CloudError):
    """An optional dependency is missing; the message says which extra installs it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{purpose} needs {package}: pip install 'edgeloop[{extra}]'")


class StoreError(CloudError):
    """The store cannot be opened, read or written."""

    def __init__(self, reason: str, url: str | None = None) -> None:
        self.reason = reason
        self.url = url
        super().__init__(f"store {url}: {reason}" if url else f"store: {reason}")


class SchemaError(StoreError):
    """The schema is newer than this code understands, or is damaged."""


class NotFoundError(StoreError):
    """A row that must exist (a model version, a rollout) does not."""

    def __init__(self, what: str, key: object) -> None:
        self.what = what
        self.key = key
        super().__init__(f"{what} {key!r} not found")


class ConflictError(StoreError):
    """A row already exists, or a compare-and-set update found another state."""

    def __init__(self, what: str, key: object, reason: str) -> None:
        self.what = what
        self.key = key
        super().__init__(f"{what} {key!r}: {reason}")


class TrainingError(CloudError):
    """A model cannot be trained or evaluated."""

    def __init__(self, reason: str, model: str | None = None) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model}: {reason}" if model else reason)


class NotEnoughDataError(TrainingError):
    """Too few labelled rows (or statistics) for a fit."""

    def __init__(self, n: int, needed: int, model: str | None = None, what: str = "labelled rows") -> None:
        self.n = n
        self.needed = needed
        super().__init__(f"{n} {what}, at least {needed} needed", model=model)


class RegistryError(CloudError):
    """A model version cannot be registered, signed, imported or served."""

    def __init__(self, reason: str, model: str | None = None, version: int | None = None) -> None:
        self.model = model
        self.version = version
        self.reason = reason
        where = f"{model}:{version}" if model and version is not None else model
        super().__init__(f"{where}: {reason}" if where else reason)


class RolloutError(CloudError):
    """A rollout cannot be created, advanced, aborted or rolled back."""

    def __init__(self, reason: str, rollout_id: str | None = None) -> None:
        self.rollout_id = rollout_id
        self.reason = reason
        super().__init__(f"rollout {rollout_id}: {reason}" if rollout_id else reason)
