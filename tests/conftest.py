"""Shared test fixtures: the real local servers (same launchers as `streamrec dev up`) and settings.

Servers are session-scoped (started once, in pytest's temporary directory, stopped at the end); what a
test writes is isolated per test instead: unique stream and table names, its own PostgreSQL database,
a flushed Redis database, a lake under its own ``tmp_path``.

Tier markers (unit, integration, charts, e2e) are applied from the test's directory, so a test file
only needs a marker when it differs from its directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from streamrec.devstack.moto_server import MotoLauncher
from streamrec.devstack.postgres import PostgresLauncher, create_database
from streamrec.devstack.provision import provision_region
from streamrec.devstack.redis_server import RedisLauncher
from streamrec.devstack.service import Launcher, ServiceHandle
from streamrec.settings import RegionSettings, Settings, load_settings

TIERS = ("unit", "integration", "charts", "e2e")
# Redis database the per-test settings use; flushed before each test that asks for it.
TEST_REDIS_DB = 1

SettingsFactory = Callable[..., Settings]


def pytest_configure(config: pytest.Config) -> None:
    """Process-wide environment for every test, set before any test module is imported."""
    # Fake credentials so nothing can reach a real AWS account; moto accepts any.
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        os.environ.pop(var, None)
    # Ray 2.60 turns token auth on by default; local test clusters run without it.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # A developer's own config must not leak into tests (commands would also find a running dev stack's
    # config under ./.streamrec/dev; the session fixture below points STREAMREC_HOME elsewhere).
    os.environ.pop("STREAMREC_CONFIG", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier, taken from its directory under tests/."""
    tests_dir = Path(__file__).parent
    for item in items:
        try:
            tier = item.path.relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        if tier in TIERS and not any(item.iter_markers(name=tier)):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session", autouse=True)
def _isolated_streamrec_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty STREAMREC_HOME, so no test finds (or disturbs) a developer's running dev stack."""
    home = tmp_path_factory.mktemp("streamrec-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMREC_HOME", str(home))
        yield home


def _serve(launcher: Launcher, workdir: Path) -> Iterator[ServiceHandle]:
    handle = launcher.start(workdir)
    try:
        yield handle
    finally:
        launcher.stop(handle)
        launcher.purge(handle)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """A moto server (Kinesis, S3, DynamoDB); ``.url`` is the endpoint URL."""
    yield from _serve(MotoLauncher(), tmp_path_factory.mktemp("moto"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """A redis-server; ``.url`` is ``redis://127.0.0.1:PORT`` (append ``/DB``)."""
    yield from _serve(RedisLauncher(), tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """PostgreSQL 15 with database ``streamrec``; ``.url`` is its DSN (user ``streamrec``, trust auth)."""
    yield from _serve(PostgresLauncher(), tmp_path_factory.mktemp("postgres"))


@pytest.fixture
def redis_url(redis_server: ServiceHandle) -> str:
    """URL of a Redis database that is empty when the test starts."""
    url = f"{redis_server.url}/{TEST_REDIS_DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def warehouse_dsn(postgres_server: ServiceHandle) -> str:
    """DSN of a new, empty PostgreSQL database for this test alone."""
    return create_database(postgres_server, f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def settings_factory(
    tmp_path: Path, moto_server: ServiceHandle, redis_url: str, warehouse_dsn: str
) -> SettingsFactory:
    """Build provisioned :class:`Settings` pointing at the test servers, with names unique to the call.

    ``settings_factory(*regions, shard_count=2, ingest=None, provision=True)``: regions default to
    ``("us-east-1",)``; ``ingest`` overrides IngestSettings fields (e.g. ``{"batch_max_records": 10}``),
    ``etl`` EtlSettings fields.
    The settings are loaded from a YAML file through ``load_settings``, exactly like a process would.
    """

    def make(
        *regions: str,
        shard_count: int = 2,
        ingest: dict[str, Any] | None = None,
        etl: dict[str, Any] | None = None,
        provision: bool = True,
    ) -> Settings:
        names: Sequence[str] = regions or ("us-east-1",)
        suffix = uuid.uuid4().hex[:8]
        region_docs = {}
        for name in names:
            default = RegionSettings.default_for(name, f"file://{tmp_path / 'lake'}")
            region_docs[name] = {
                "stream_name": f"{default.stream_name}-{suffix}",
                "shard_count": shard_count,
                "lake_uri": default.lake_uri,
                "tables": {k: f"{v}-{suffix}" for k, v in default.tables.model_dump().items()},
                "redis_url": redis_url,
                "warehouse_dsn": warehouse_dsn,
            }
        document: dict[str, Any] = {
            "environment": "local",
            "aws": {
                "endpoint_url": moto_server.url,
                "access_key_id": "testing",
                "secret_access_key": "testing",
            },
            "regions": region_docs,
        }
        if ingest:
            document["ingest"] = ingest
        if etl:
            document["etl"] = etl
        path = tmp_path / f"streamrec-{suffix}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        settings = load_settings(path)
        if provision:
            for name in names:
                provision_region(settings, name)
        return settings

    return make


@pytest.fixture
def local_settings(settings_factory: SettingsFactory) -> Settings:
    """Provisioned settings for us-east-1: its own stream, tables, lake dir, Redis db and database."""
    return settings_factory()


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One in-process Spark session (local[2], the ETL's own local conf) for every Spark test.

    Starting Spark costs about 4 s, so it is shared; tests isolate themselves by lake directory.
    """
    from spark_etl.session import local_session
    from streamrec.settings import SparkSettings

    session = local_session(SparkSettings(shuffle_partitions=2), app_name="streamrec-tests")
    yield session
    session.stop()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Single-threaded torch for the test (``pytest.mark.usefixtures("one_torch_thread")``): on a busy
    2-core box two OpenMP threads can run much slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
