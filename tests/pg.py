"""PostgreSQL for tests: one throw-away schema per test in the ``test`` database at 127.0.0.1:5432.

``pg_url`` (a pytest fixture) yields a libpq URL whose ``search_path`` is a fresh schema, and drops
the schema afterwards. Without a reachable server (or without psycopg) the test is skipped with a
reason saying what to install/start — except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["PG_BASE_URL", "pg_schema", "pg_url"]

PG_BASE_URL = "postgresql://127.0.0.1:5432/test"
_REASON = "install/start PostgreSQL (127.0.0.1:5432, trust auth, database 'test') and psycopg ('edgeloop[cloud]')"


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI: {why}")
    pytest.skip(f"{_REASON}: {why}")


class pg_schema:
    """Create schema ``name`` on enter, drop it (CASCADE) on exit; ``url`` selects it."""

    def __init__(self, prefix: str = "t") -> None:
        self.name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.url = f"{PG_BASE_URL}?options=-csearch_path%3D{self.name}"

    def __enter__(self) -> pg_schema:
        try:
            import psycopg
        except ImportError as exc:
            _unavailable(f"psycopg is not installed ({exc})")
        try:
            with psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE SCHEMA "{self.name}"')
        except psycopg.OperationalError as exc:
            _unavailable(str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed")
        return self

    def __exit__(self, *exc: object) -> None:
        import psycopg

        with psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a schema of this test's own, dropped afterwards."""
    with pg_schema() as schema:
        yield schema.url
