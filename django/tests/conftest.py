"""A real PostgreSQL for every test, and the relay's own schema in the test database.

One throwaway cluster per run (tests/pgcluster.py), or the server at
TEST_DATABASE_URL (a superuser URL; wal_level=logical for the end-to-end test),
as in the Rust suite. pytest-django then creates the test database and runs the
app's migrations; `outbox-relay migrate` adds the ledger, so the unmanaged
Delivery model reads the relay's real table, not a copy of its DDL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from . import relay
from .pgcluster import Cluster


@pytest.fixture(scope="session")
def pg_server() -> Iterator[tuple[str, int]]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        parts = urlsplit(external)
        yield parts.hostname or "127.0.0.1", parts.port or 5432
        return
    cluster = Cluster()
    try:
        yield "127.0.0.1", cluster.port
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    pg_server: tuple[str, int], django_db_modify_db_settings_parallel_suffix: None
) -> None:
    host, port = pg_server
    db = settings.DATABASES["default"]
    db["HOST"], db["PORT"] = host, str(port)
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        parts = urlsplit(external)
        db["USER"] = parts.username or "postgres"
        db["PASSWORD"] = parts.password or ""


@pytest.fixture(scope="session")
def relay_bin() -> Path:
    return relay.relay_binary()


def database_url() -> str:
    """URL of the test database Django is using right now."""
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture(scope="session")
def django_db_setup(
    django_db_setup: None,
    django_db_blocker: pytest.FixtureRequest,
    relay_bin: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config = tmp_path_factory.mktemp("relay") / "relay.toml"
    config.write_text(relay.to_toml(relay.minimal_config(database_url(), "migrate_only")))
    relay.run(relay_bin, config, "migrate")


@pytest.fixture
def relay_config(tmp_path: Path) -> Path:
    """A relay.toml for the test database (log provider, no slot created)."""
    path = tmp_path / "relay.toml"
    path.write_text(relay.to_toml(relay.minimal_config(database_url(), "tests")))
    return path
