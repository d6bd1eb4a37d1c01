"""The local dev stack against the real servers: up, idempotence, repair, status, down, and the CLI.

Also checks the shared fixtures (tests/conftest.py) deliver what other tests rely on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from streamrec.aws import client
from streamrec.devstack import stack
from streamrec.devstack.process import DevStackError, pid_alive, wait_until
from streamrec.devstack.provision import lake_bucket_name
from streamrec.devstack.redis_server import RedisLauncher
from streamrec.devstack.stack import warehouse_database
from streamrec.devstack.service import ServiceHandle
from streamrec.devstack.state import read_state
from streamrec.settings import Settings, load_settings

pytestmark = pytest.mark.integration

REGIONS = ("us-east-1", "eu-west-1")


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stack brought up once for this module's tests (which leave it healthy); torn down at the end."""
    state_dir = tmp_path_factory.mktemp("devstack")
    stack.up(state_dir, regions=REGIONS, shard_count=2)
    try:
        yield state_dir
    finally:
        stack.down(state_dir)


def _services(state_dir: Path) -> dict[str, ServiceHandle]:
    state = read_state(state_dir)
    assert state is not None
    return state.services


def _wait_dead(pid: int) -> None:
    wait_until(lambda: not pid_alive(pid), timeout_s=15, what=f"pid {pid} to exit")


def test_up_starts_servers_and_provisions_each_region(stack_dir: Path) -> None:
    settings = load_settings(stack_dir / "streamrec.yaml")
    services = _services(stack_dir)
    assert settings.aws.endpoint_url == services["moto"].url
    assert sorted(settings.regions) == sorted(REGIONS)

    for name in REGIONS:
        region = settings.region(name)
        assert region.redis_url == f"{services['redis'].url}/0"
        # Each region's warehouse is a database of its own (regions share nothing).
        assert region.warehouse_dsn == f"{services['postgres'].url.rsplit('/', 1)[0]}/{warehouse_database(name)}"
        assert region.lake_uri == f"file://{stack_dir.resolve()}/lake/{name}"
        assert (stack_dir / "lake" / name).is_dir()

        summary = client("kinesis", name, settings.aws).describe_stream_summary(StreamName=region.stream_name)
        assert summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"
        assert summary["StreamDescriptionSummary"]["OpenShardCount"] == 2

        tables = client("dynamodb", name, settings.aws).list_tables()["TableNames"]
        assert {region.tables.leases, region.tables.recs, region.tables.features} <= set(tables)

        s3 = client("s3", name, settings.aws)
        location = s3.get_bucket_location(Bucket=lake_bucket_name(name))["LocationConstraint"]
        assert (location or "us-east-1") == name

    with redis.Redis.from_url(settings.region("us-east-1").redis_url) as r:
        assert r.ping() is True
    with psycopg.connect(settings.region("eu-west-1").warehouse_dsn) as conn:
        assert conn.execute("SELECT 1, current_database()").fetchone() == (1, "streamrec_eu_west_1")


def test_status_reports_every_service_healthy(stack_dir: Path) -> None:
    statuses = stack.status(stack_dir)
    assert [s.name for s in statuses] == ["moto", "redis", "postgres"]
    assert all(s.healthy and s.detail == "ok" for s in statuses), statuses
    assert {s.name: s.pid for s in statuses} == {n: h.pid for n, h in _services(stack_dir).items()}


def test_second_up_reuses_running_servers_and_their_data(stack_dir: Path) -> None:
    before = _services(stack_dir)
    settings = load_settings(stack_dir / "streamrec.yaml")
    table = settings.region("us-east-1").tables.recs
    ddb = client("dynamodb", "us-east-1", settings.aws)
    ddb.put_item(TableName=table, Item={"user_id": {"S": "u1"}, "model_version": {"S": "v1"}})

    state = stack.up(stack_dir, regions=REGIONS, shard_count=2)

    assert state.services == before  # same pids, ports, URLs
    # moto kept its in-memory data: it was not restarted, and provisioning did not recreate the table.
    item = ddb.get_item(TableName=table, Key={"user_id": {"S": "u1"}, "model_version": {"S": "v1"}})
    assert "Item" in item


def test_up_restarts_a_killed_server_on_its_port(stack_dir: Path) -> None:
    before = _services(stack_dir)
    killed = before["redis"]
    os.kill(killed.pid, signal.SIGKILL)
    _wait_dead(killed.pid)

    statuses = {s.name: s for s in stack.status(stack_dir)}
    assert not statuses["redis"].healthy
    assert "not running" in statuses["redis"].detail
    assert statuses["moto"].healthy and statuses["postgres"].healthy

    state = stack.up(stack_dir, regions=REGIONS, shard_count=2)

    restarted = state.services["redis"]
    assert restarted.pid != killed.pid
    assert restarted.url == killed.url  # same port, so the written settings stay valid
    assert state.services["moto"] == before["moto"]
    assert state.services["postgres"] == before["postgres"]
    assert all(s.healthy for s in stack.status(stack_dir))


def test_down_stops_everything_and_is_idempotent(tmp_path: Path) -> None:
    state = stack.up(tmp_path, regions=("us-east-1",), shard_count=1)
    handles = dict(state.services)
    pg_dir = handles["postgres"].data_dir
    assert pg_dir is not None and pg_dir.is_dir()

    assert stack.down(tmp_path) == ["postgres", "redis", "moto"]

    for handle in handles.values():
        assert not pid_alive(handle.pid), handle
    assert not pg_dir.exists()
    assert not (tmp_path / "state.json").exists()
    assert not (tmp_path / "streamrec.yaml").exists()
    assert stack.status(tmp_path) == []
    assert stack.down(tmp_path) == []  # nothing running: no error


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from streamrec.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_up_status_down(tmp_path: Path) -> None:
    state_dir = str(tmp_path / "stack")
    up = _cli("dev", "up", "--state-dir", state_dir, "--region", "eu-west-1", "--shards", "1")
    assert up.returncode == 0, up.stderr
    assert "STREAMREC_CONFIG=" in up.stdout
    try:
        # The servers outlived the `up` process that started them.
        services = _services(Path(state_dir))
        assert all(pid_alive(h.pid) for h in services.values())
        assert load_settings(Path(state_dir) / "streamrec.yaml").region("eu-west-1").shard_count == 1

        status = _cli("dev", "status", "--state-dir", state_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == 3
    finally:
        down = _cli("dev", "down", "--state-dir", state_dir)
    assert down.returncode == 0, down.stderr
    assert all(not pid_alive(h.pid) for h in services.values())

    after = _cli("dev", "status", "--state-dir", state_dir)
    assert after.returncode == 1
    assert "not running" in after.stdout


def test_cli_user_mistake_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = _cli("dev", "up", "--state-dir", str(tmp_path), "--region", "us-east1")
    assert result.returncode == 2
    assert "'us-east1' is not an AWS region name" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state.json").exists()  # nothing was started


def test_fixtures_give_isolated_provisioned_settings(
    local_settings: Settings, settings_factory: Callable[..., Settings]
) -> None:
    region = local_settings.region("us-east-1")
    summary = client("kinesis", "us-east-1", local_settings.aws).describe_stream_summary(
        StreamName=region.stream_name
    )
    assert summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"
    assert region.lake_uri.startswith("file://") and Path(region.lake_uri[len("file://") :]).is_dir()

    other = settings_factory()
    assert other.region("us-east-1").stream_name != region.stream_name
    assert other.region("us-east-1").tables.recs != region.tables.recs

    with redis.Redis.from_url(region.redis_url) as r:
        assert r.dbsize() == 0  # flushed for this test
        r.set("k", "v")
    with psycopg.connect(region.warehouse_dsn) as conn:
        conn.execute("CREATE TABLE t (x int)")  # a fresh database: no clash with any other test


def test_missing_redis_server_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server on PATH
    with pytest.raises(DevStackError, match=r"apt-get install -y redis-server"):
        RedisLauncher().start(tmp_path / "redis")
