"""load_settings: a table of configuration files and environments, and what each must produce."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamrec.settings import (
    CONFIG_ENV,
    Settings,
    SettingsError,
    cpu_quantity,
    load_settings,
    memory_quantity,
    ray_stage_cpu_problems,
    ray_stage_memory_problems,
)

pytestmark = pytest.mark.unit

GOOD = """
environment: dev
aws:
  endpoint_url: http://127.0.0.1:5000
regions:
  us-east-1:
    stream_name: clicks-us
    shard_count: 4
    lake_uri: s3://lake-us/raw/
    tables: {leases: leases-us, recs: recs-us, features: features-us}
  eu-west-1:
    stream_name: clicks-eu
    lake_uri: file:///data/lake/eu-west-1
    tables: {leases: leases-eu, recs: recs-eu, features: features-eu}
ingest:
  pii_salt: a-secret-salt-from-a-k8s-secret
"""

REGION = """
regions:
  us-east-1:
    stream_name: clicks
    lake_uri: {lake_uri}
    {tables_key}: {{leases: l, recs: r, features: f}}
"""


def region_yaml(lake_uri: str = "file:///lake", tables_key: str = "tables", name: str = "us-east-1") -> str:
    return REGION.format(lake_uri=lake_uri, tables_key=tables_key).replace("us-east-1", name)


@dataclass(frozen=True)
class Case:
    yaml: str | None  # None: no config file at all
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Settings], None] | None = None
    # Every one of these must appear in the error message.
    error: tuple[str, ...] = ()


def _good(s: Settings) -> None:
    assert s.environment == "dev"
    assert s.aws.endpoint_url == "http://127.0.0.1:5000"
    us, eu = s.region("us-east-1"), s.region("eu-west-1")
    assert (us.stream_name, us.shard_count, us.tables.recs) == ("clicks-us", 4, "recs-us")
    assert us.lake_uri == "s3://lake-us/raw"  # trailing slash dropped
    assert eu.shard_count == 2  # the default
    assert eu.lake_uri == "file:///data/lake/eu-west-1"
    assert s.ingest.batch_max_records == 50_000


def _defaults(s: Settings) -> None:
    assert (s.environment, s.regions, s.aws.endpoint_url) == ("local", {}, None)


def _env_only(s: Settings) -> None:
    assert (s.ingest.batch_max_records, s.log_level) == (12, "DEBUG")


def _env_wins(s: Settings) -> None:
    assert s.ingest.batch_max_records == 1000  # environment beats the file...
    assert s.ingest.batch_max_seconds == 5.0  # ...which still supplies the rest of the section


CASES = {
    "good yaml": Case(GOOD, check=_good),
    "empty file means defaults": Case("", check=_defaults),
    "unknown top-level key named": Case("regoins: {}\n", error=("regoins", "Extra inputs are not permitted")),
    "unknown nested key named with its path": Case(
        region_yaml(tables_key="tabels"), error=("regions.us-east-1.tabels", "regions.us-east-1.tables")
    ),
    "lake_uri scheme": Case(
        region_yaml(lake_uri="http://lake/x"), error=("regions.us-east-1.lake_uri", "file:// or s3://")
    ),
    "region name": Case(
        region_yaml(name="useast1"), error=("regions", "'useast1' is not an AWS region name")
    ),
    "env var overrides the file": Case(
        "ingest: {batch_max_records: 7, batch_max_seconds: 5}\n",
        env={"STREAMREC_INGEST__BATCH_MAX_RECORDS": "1000"},
        check=_env_wins,
    ),
    "env var alone": Case(
        None,
        env={"STREAMREC_INGEST__BATCH_MAX_RECORDS": "12", "STREAMREC_LOG_LEVEL": "DEBUG"},
        check=_env_only,
    ),
    "bad env value named": Case(
        None, env={"STREAMREC_INGEST__BATCH_MAX_RECORDS": "0"}, error=("ingest.batch_max_records",)
    ),
    "lease renew equal to duration": Case(
        "ingest: {lease_renew_seconds: 10, lease_duration_seconds: 10}\n",
        error=("ingest", "lease_renew_seconds must be smaller than lease_duration_seconds"),
    ),
    "lease renew above duration": Case(
        "ingest: {lease_renew_seconds: 30, lease_duration_seconds: 10}\n",
        error=("lease_renew_seconds must be smaller",),
    ),
    "several wrong keys all named": Case(
        "log_level: LOUD\ningest: {get_records_limit: 20000}\n",
        error=("log_level", "ingest.get_records_limit"),
    ),
    "not a mapping": Case("- a\n- b\n", error=("must hold a mapping",)),
    "not yaml": Case("regions: [unclosed\n", error=("is not valid YAML",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_load_settings(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    path = None
    if case.yaml is not None:
        path = tmp_path / "streamrec.yaml"
        path.write_text(case.yaml)
    if case.error:
        with pytest.raises(SettingsError) as info:
            load_settings(path)
        message = str(info.value)
        for part in case.error:
            assert part in message
        assert "\n" not in message.strip()  # one line, fit for a CLI error
    else:
        assert case.check is not None
        case.check(load_settings(path))


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SettingsError, match="nope.yaml does not exist"):
        load_settings(missing)


def test_config_env_var_is_read_and_explicit_path_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env, explicit = tmp_path / "env.yaml", tmp_path / "explicit.yaml"
    from_env.write_text("log_level: WARNING\n")
    explicit.write_text("log_level: ERROR\n")
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    assert load_settings().log_level == "WARNING"
    assert load_settings(explicit).log_level == "ERROR"


@pytest.mark.parametrize("name", ["STREAMREC_HOME", "STREAMREC_CODE_VERSION"])
def test_unrelated_streamrec_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # The dev stack's state dir and the code version an image carries share the prefix but are not
    # settings: a process that has them set must still start.
    monkeypatch.setenv(name, "somewhere")
    assert load_settings().environment == "local"


def test_unconfigured_region_names_the_configured_ones(tmp_path: Path) -> None:
    path = tmp_path / "streamrec.yaml"
    path.write_text(GOOD)
    with pytest.raises(SettingsError, match=r"regions\.ap-south-1: .*configured: eu-west-1, us-east-1"):
        load_settings(path).region("ap-south-1")


@pytest.mark.parametrize(
    ("name", "named"),
    [("STREAMREC_LOGLEVEL", "STREAMREC_LOGLEVEL: no such setting"),
     ("STREAMREC_INGEST__BATCH_MAX_RECORDZ", "ingest has no setting 'batch_max_recordz'")],
)
def test_misspelt_environment_variable_fails_naming_it(
    name: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_public_pii_salt_is_refused_outside_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_ENVIRONMENT", "prod")
    with pytest.raises(SettingsError, match="ingest.pii_salt"):
        load_settings()
    monkeypatch.setenv("STREAMREC_INGEST__PII_SALT", "a-long-secret-from-a-k8s-secret")
    assert load_settings().environment == "prod"


@pytest.mark.parametrize(("quantity", "cpus"), [("7", 7.0), ("1.5", 1.5), ("500m", 0.5), (" 2 ", 2.0)])
def test_cpu_quantities_read_like_kubernetes(quantity: str, cpus: float) -> None:
    assert cpu_quantity(quantity) == cpus


@pytest.mark.parametrize(("quantity", "size"), [("16Gi", 16 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9),
                                               ("1048576", 2**20), (" 3Ki ", 3072)])
def test_memory_quantities_read_like_kubernetes(quantity: str, size: int) -> None:
    assert memory_quantity(quantity) == size


@pytest.mark.parametrize("quantity", ["16GB", "1.5Gi", "", "-1Gi", "Gi"])
def test_memory_quantities_kubernetes_would_refuse_are_refused(quantity: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        memory_quantity(quantity)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        # 14 actors x 1 CPU fill the default RayJob's 2 pods x 7 CPUs: Ray Data's reads would never start.
        ({"STREAMREC_SCORE__CONCURRENCY": "14", "STREAMREC_SCORE__CPUS_PER_ACTOR": "1"},
         r"score.concurrency x score.cpus_per_actor: 14 x 1 CPUs leave no pod of the RayJob "
         r"\(pipeline.rayjob: 2 worker pods x 7 CPUs\) with 1 CPU"),
        ({"STREAMREC_TRAIN__WORKERS": "2", "STREAMREC_TRAIN__CPUS_PER_WORKER": "7"},
         r"train.workers x train.cpus_per_worker: 2 x 7 CPUs leave no pod"),
        # 12 CPUs of 14 in all, but a 7-CPU pod holds one 4-CPU worker: the third never starts.
        ({"STREAMREC_TRAIN__WORKERS": "3", "STREAMREC_TRAIN__CPUS_PER_WORKER": "4"},
         r"train.workers x train.cpus_per_worker: 3 x 4 CPUs do not fit in the RayJob's pods: they hold 2"),
        ({"STREAMREC_SCORE__CPUS_PER_ACTOR": "8"},
         r"score.cpus_per_actor: 8 CPUs do not fit in one Ray worker pod"),
        ({"STREAMREC_TRAIN__USE_GPU": "yes"}, r"train.use_gpu: yes needs a GPU per worker"),
        ({"STREAMREC_PIPELINE__RAYJOB__WORKER_CPU": "seven"},
         r"pipeline.rayjob.worker_cpu: .*not a CPU quantity"),
        ({"STREAMREC_PIPELINE__RAYJOB__WORKER_CPU": "0"},
         r"pipeline.rayjob.worker_cpu: .*positive number of CPUs"),
        # 2 pods x 16Gi of /dev/shm: a 20 GiB split would not leave the object store room to work.
        ({"STREAMREC_TRAIN__MATERIALIZE_MAX_BYTES": str(20 * 2**30)},
         r"train.materialize_max_bytes: 21474836480 bytes is more than half the RayJob's object store "
         r"\(pipeline.rayjob: 2 worker pods x 16Gi"),
        ({"STREAMREC_PIPELINE__RAYJOB__SHM_SIZE": "16GB"},
         r"pipeline.rayjob.shm_size: .*not a memory quantity"),
        ({"STREAMREC_PIPELINE__RAYJOB__WORKER_MEMORY": "0Gi"},
         r"pipeline.rayjob.worker_memory: .*positive amount of memory"),
    ],
)
def test_ray_stages_that_cannot_run_in_their_rayjob_fail_at_start_up(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_ENVIRONMENT", "prod")
    monkeypatch.setenv("STREAMREC_INGEST__PII_SALT", "a-long-secret-from-a-k8s-secret")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_ray_stage_sizes_that_fit_their_rayjob_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_ENVIRONMENT", "prod")
    monkeypatch.setenv("STREAMREC_INGEST__PII_SALT", "a-long-secret-from-a-k8s-secret")
    monkeypatch.setenv("STREAMREC_SCORE__CONCURRENCY", "13")  # 7 + 6 actors: one pod keeps a CPU free
    monkeypatch.setenv("STREAMREC_SCORE__CPUS_PER_ACTOR", "1")
    monkeypatch.setenv("STREAMREC_PIPELINE__RAYJOB__WORKER_GPUS", "1")
    monkeypatch.setenv("STREAMREC_TRAIN__USE_GPU", "yes")
    settings = load_settings()
    rayjob = settings.pipeline.rayjob
    assert ray_stage_cpu_problems(settings) == [] == ray_stage_memory_problems(settings)
    assert rayjob.worker_replicas * cpu_quantity(rayjob.worker_cpu) == 14


def test_local_runs_are_not_held_to_the_rayjob_template(monkeypatch: pytest.MonkeyPatch) -> None:
    # Locally the Ray cluster is this machine, not pipeline.rayjob: its size is not checked against it.
    monkeypatch.setenv("STREAMREC_SCORE__CONCURRENCY", "40")
    assert load_settings().score.concurrency == 40
