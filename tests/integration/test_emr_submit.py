"""EMR on EKS submission against the moto server: StartJobRun/DescribeJobRun round trips, the
``etl request``/``etl submit`` command functions, and the wait timeout.

moto's emr-containers stores job runs but never runs them: a run stays RUNNING for ever. So this file
checks what EMR receives and that waiting gives up cleanly; the terminal states (COMPLETED, FAILED,
CANCELLED) are covered with a scripted client in tests/unit/test_emr.py.

The command functions are registered by the ``etl`` sub-app elsewhere; here they sit in a small
``typer.Typer()`` configured like the real ``streamrec`` app, so these tests depend on this module only.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from spark_etl import emr
from streamrec.aws import client
from streamrec.cli import etl_submit
from streamrec.devstack.service import ServiceHandle
from streamrec.settings import AwsSettings, Settings, load_settings

pytestmark = pytest.mark.integration
REGION = "us-east-1"
DAY = date(2024, 5, 1)
ROLE = "arn:aws:iam::123456789012:role/streamrec-emr-job"


@dataclass(frozen=True)
class EmrEnv:
    settings: Settings
    config: Path
    virtual_cluster_id: str
    client: Any  # emr-containers client on moto


@pytest.fixture
def make_emr_env(tmp_path: Path, moto_server: ServiceHandle) -> Callable[..., EmrEnv]:
    """A virtual cluster on moto and a settings file pointing at it: ``make_emr_env(**emr_overrides)``."""
    aws = {"endpoint_url": moto_server.url, "access_key_id": "testing", "secret_access_key": "testing"}

    def make(**emr_overrides: Any) -> EmrEnv:
        suffix = uuid.uuid4().hex[:8]
        emr_client = client("emr-containers", REGION, AwsSettings(**aws))
        # moto allows one virtual cluster per namespace: each test gets its own.
        cluster = emr_client.create_virtual_cluster(
            name=f"streamrec-{suffix}",
            containerProvider={"type": "EKS", "id": "streamrec-eks",
                               "info": {"eksInfo": {"namespace": f"spark-{suffix}"}}},
        )
        document = {
            "aws": aws,
            "regions": {REGION: {
                "stream_name": f"clicks-{suffix}",
                "lake_uri": f"s3://lake-{suffix}/lake",
                "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}",
                           "features": f"features-{suffix}"},
            }},
            "emr": {
                "virtual_cluster_id": cluster["id"],
                "execution_role_arn": ROLE,
                "code_uri": f"s3://code-{suffix}/streamrec",
                "log_uri": f"s3://logs-{suffix}/emr",
                # moto knows only the emr-N.N.N labels, not the emr-spark-8 line our default names.
                "release_label": "emr-7.5.0-latest",
                **emr_overrides,
            },
        }
        path = tmp_path / f"streamrec-{suffix}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        client("s3", REGION, AwsSettings(**aws)).create_bucket(Bucket=f"lake-{suffix}")
        return EmrEnv(load_settings(path), path, cluster["id"], emr_client)

    return make


def cli() -> typer.Typer:
    """The two command functions in an app configured like ``streamrec`` (no pretty tracebacks)."""
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
    app.command("request")(etl_submit.request)
    app.command("submit")(etl_submit.submit)
    return app


def job_runs(env: EmrEnv) -> list[dict[str, Any]]:
    return env.client.list_job_runs(virtualClusterId=env.virtual_cluster_id)["jobRuns"]


# --- the module against moto ------------------------------------------------------------------------


def test_submitted_request_reaches_emr_as_built(make_emr_env: Callable[..., EmrEnv]) -> None:
    env = make_emr_env()
    request = emr.start_job_run_request(env.settings, REGION, "features", DAY, date(2024, 5, 2))
    job_run_id = emr.submit(env.client, request)

    stored = env.client.describe_job_run(id=job_run_id, virtualClusterId=env.virtual_cluster_id)["jobRun"]
    assert stored["name"] == "streamrec-etl-features-us-east-1-2024-05-01-2024-05-02"
    assert stored["state"] == "RUNNING"
    assert stored["clientToken"] == emr.client_token_for(REGION, "features", DAY, date(2024, 5, 2))
    assert (stored["executionRoleArn"], stored["releaseLabel"]) == (ROLE, env.settings.emr.release_label)
    assert stored["jobDriver"] == request["jobDriver"]
    args = stored["jobDriver"]["sparkSubmitJobDriver"]["entryPointArguments"]
    assert args[:8] == ["--job", "features", "--region", REGION, "--date", "2024-05-01",
                        "--end-date", "2024-05-02"]
    assert args[args.index("--lake-uri") + 1] == env.settings.region(REGION).lake_uri
    assert stored["configurationOverrides"] == request["configurationOverrides"]
    assert stored["tags"] == request["tags"]


def test_wait_gives_up_on_a_run_that_never_ends(make_emr_env: Callable[..., EmrEnv]) -> None:
    env = make_emr_env()
    job_run_id = emr.submit(env.client, emr.start_job_run_request(env.settings, REGION, "clean", DAY))
    seen: list[str] = []
    with pytest.raises(emr.JobRunTimeout) as info:
        emr.wait(env.client, env.virtual_cluster_id, job_run_id, poll_seconds=0.05, timeout_seconds=0.3,
                 on_state=lambda state, run: seen.append(state))
    assert seen == ["RUNNING"]
    message = str(info.value)
    assert f"job run {job_run_id} still RUNNING after" in message
    assert f"--id {job_run_id} --virtual-cluster-id {env.virtual_cluster_id}" in message


# --- the command functions --------------------------------------------------------------------------


def test_submit_no_wait_starts_one_job_run(make_emr_env: Callable[..., EmrEnv]) -> None:
    env = make_emr_env()
    result = CliRunner().invoke(cli(), ["submit", "--region", REGION, "--date", "2024-05-01",
                                        "--job", "keys", "--no-wait", "--config", str(env.config)])
    assert result.exit_code == 0, result.output
    [run] = job_runs(env)
    assert run["name"] == "streamrec-etl-keys-us-east-1-2024-05-01"
    assert f"submitted {run['name']}: job run {run['id']} on virtual cluster {env.virtual_cluster_id}" \
        in result.stdout
    # The pod template the run names (the R5 toleration) was put on S3 before the run started.
    uri, body = emr.pod_template_object(env.settings, REGION)
    stored = env.client.describe_job_run(id=run["id"], virtualClusterId=env.virtual_cluster_id)["jobRun"]
    assert f"spark.kubernetes.executor.podTemplateFile={uri}" in \
        stored["jobDriver"]["sparkSubmitJobDriver"]["sparkSubmitParameters"]
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3 = client("s3", REGION, env.settings.aws)
    template = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert template["spec"]["tolerations"] == [
        {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"}]


def test_submit_wait_exits_1_on_timeout_with_one_line(make_emr_env: Callable[..., EmrEnv]) -> None:
    env = make_emr_env()
    result = CliRunner().invoke(cli(), [
        "submit", "-r", REGION, "-d", "2024-05-01", "--poll-seconds", "0.05", "--timeout-seconds", "0.3",
        "--config", str(env.config)])
    assert result.exit_code == 1, result.output
    [run] = job_runs(env)
    assert f"{run['id']}  RUNNING" in result.stdout  # the state change was printed
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: job run " + run["id"] + " still RUNNING after")
    assert "Traceback" not in result.output


def test_request_prints_the_request_as_json(make_emr_env: Callable[..., EmrEnv]) -> None:
    env = make_emr_env(image="123456789012.dkr.ecr.us-east-1.amazonaws.com/streamrec-spark:abc123")
    result = CliRunner().invoke(cli(), ["request", "--region", REGION, "--date", "2024-05-01",
                                        "--end-date", "2024-05-07", "--attempt", "2",
                                        "--config", str(env.config)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    token = emr.client_token_for(REGION, "all", DAY, date(2024, 5, 7), attempt=2)
    assert printed == emr.start_job_run_request(env.settings, REGION, "all", DAY, date(2024, 5, 7),
                                                client_token=token)
    assert printed["jobDriver"]["sparkSubmitJobDriver"]["entryPoint"] == emr.IMAGE_ENTRY_POINT
    assert job_runs(env) == []  # printed, not sent


@dataclass(frozen=True)
class CliError:
    emr: dict[str, Any]
    args: list[str]
    message: tuple[str, ...]


CLI_ERRORS = {
    "no virtual cluster id": CliError({"virtual_cluster_id": ""}, [],
                                      ("error: emr.virtual_cluster_id: not set",)),
    "virtual cluster that does not exist": CliError(
        {"virtual_cluster_id": "nosuchcluster0000000000001"}, [],
        ("error: StartJobRun refused: ResourceNotFoundException:", "nosuchcluster0000000000001")),
    "region not configured": CliError({}, ["--region", "eu-west-1"], ("error: regions.eu-west-1:",)),
    "bad date": CliError({}, ["--date", "2024-05-32"], ("error: --date '2024-05-32' is not a date",)),
    "range backwards": CliError({}, ["--end-date", "2024-04-01"], ("before the start date",)),
}


@pytest.mark.parametrize("case", CLI_ERRORS.values(), ids=CLI_ERRORS.keys())
def test_user_mistakes_are_one_line_exit_2(case: CliError, make_emr_env: Callable[..., EmrEnv],
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Through ``streamrec.cli.main``, the wrapper that turns a UserError into one line and exit code 2."""
    import streamrec.cli
    from streamrec.cli.common import err_console

    env = make_emr_env(**case.emr)
    args = {"--region": REGION, "--date": "2024-05-01"}
    args.update(dict(zip(case.args[0::2], case.args[1::2])))
    monkeypatch.setattr(streamrec.cli, "app", cli())
    monkeypatch.setattr(sys, "argv", ["streamrec", "submit", "--no-wait", "--config", str(env.config),
                                      *[x for kv in args.items() for x in kv]])
    monkeypatch.setattr(err_console, "_width", 1000)  # rich wraps at 80 columns when not on a terminal
    with pytest.raises(SystemExit) as exited:
        streamrec.cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for part in case.message:
        assert part in err
    assert job_runs(env) == []
