"""The EMR on EKS job submission (spark_etl/emr.py): tables of settings and the requests they must give,
and ``wait`` driven through scripted state sequences.

The builder is pure, so it is tested with settings alone; every request it returns is also checked here
against botocore's model of emr-containers. ``wait`` is tested with a fake clock and a fake
emr-containers client that replays a script of job run states. The fake client is a mock on purpose:
EMR on EKS job runs never leave RUNNING in moto (no Kubernetes behind it), so COMPLETED, FAILED and
CANCELLED can only be scripted. What moto can do (StartJobRun, DescribeJobRun, the timeout of a run that
never ends) is tested against the real moto server in tests/integration/test_emr_submit.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import pytest

from spark_etl import emr
from streamrec.settings import RegionSettings, Settings

pytestmark = pytest.mark.unit

REGION = "us-east-1"
DAY = date(2024, 5, 1)
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/streamrec-spark:1a2b3c4"
GOOD_EMR: dict[str, Any] = {
    "virtual_cluster_id": "abc123def456ghi789",
    "execution_role_arn": "arn:aws:iam::123456789012:role/streamrec-emr-job",
    "code_uri": "s3://streamrec-code/etl/",
    "log_uri": "s3://streamrec-logs/emr",
}


def make_settings(lake_uri: str = "s3://streamrec-lake/us", spark_conf: dict[str, str] | None = None,
                  **emr_fields: Any) -> Settings:
    return Settings(
        regions={REGION: RegionSettings.default_for(REGION, lake_uri)},
        emr={**GOOD_EMR, **emr_fields},
        spark={"conf": spark_conf or {}},
    )


def build(settings: Settings | None = None, **kwargs: Any) -> dict[str, Any]:
    args = {"region": REGION, "job": "clean", "day": DAY, **kwargs}
    return emr.start_job_run_request(settings or make_settings(), **args)


def submit_conf(request: dict[str, Any]) -> dict[str, str]:
    """sparkSubmitParameters as a dict; every token pair must be ``--conf key=value``."""
    tokens = request["jobDriver"]["sparkSubmitJobDriver"]["sparkSubmitParameters"].split(" ")
    assert tokens[0::2] == ["--conf"] * (len(tokens) // 2) and len(tokens) % 2 == 0, tokens
    pairs = [t.split("=", 1) for t in tokens[1::2]]
    conf = dict(pairs)
    assert len(conf) == len(pairs), "a property is set twice"
    return conf


def spark_defaults(request: dict[str, Any]) -> dict[str, str]:
    configs = request["configurationOverrides"].get("applicationConfiguration", [])
    assert [c["classification"] for c in configs] in ([], ["spark-defaults"])
    return configs[0]["properties"] if configs else {}


# --- the request's shape ---------------------------------------------------------------------------


def test_request_is_complete_and_valid_for_botocore() -> None:
    settings = make_settings()
    request = build(settings, job="features", end_day=date(2024, 5, 3))
    emr.validate_request(request)  # what the builder did too; it must hold for what it returned
    assert request["name"] == "streamrec-etl-features-us-east-1-2024-05-01-2024-05-03"
    assert request["virtualClusterId"] == GOOD_EMR["virtual_cluster_id"]
    assert request["executionRoleArn"] == GOOD_EMR["execution_role_arn"]
    assert request["releaseLabel"] == settings.emr.release_label
    driver = request["jobDriver"]["sparkSubmitJobDriver"]
    assert driver["entryPoint"] == "s3://streamrec-code/etl/main.py"  # no double slash
    assert driver["entryPointArguments"] == [
        "--job", "features", "--region", REGION, "--date", "2024-05-01", "--end-date", "2024-05-03",
        "--lake-uri", "s3://streamrec-lake/us",
        "--etl-json", settings.etl.model_dump_json(),
        "--spark-json", "{}",
    ]
    assert request["configurationOverrides"]["monitoringConfiguration"] == {
        "persistentAppUI": "ENABLED",
        "s3MonitoringConfiguration": {"logUri": "s3://streamrec-logs/emr"},
        "cloudWatchMonitoringConfiguration": {
            "logGroupName": "/streamrec/emr", "logStreamNamePrefix": "streamrec-etl/us-east-1/features"},
    }
    assert request["tags"] == {"app": "streamrec", "component": "spark-etl", "environment": "local",
                               "region": REGION, "job": "features", "date": "2024-05-01..2024-05-03"}


def test_etl_and_spark_settings_reach_the_entry_point_as_json() -> None:
    import json

    from streamrec.settings import EtlSettings

    settings = make_settings(spark_conf={"spark.sql.shuffle.partitions": "800"}).model_copy(
        update={"etl": EtlSettings(session_gap_minutes=45)})
    args = build(settings)["jobDriver"]["sparkSubmitJobDriver"]["entryPointArguments"]
    etl = EtlSettings.model_validate_json(args[args.index("--etl-json") + 1])
    assert etl.session_gap_minutes == 45 and etl == settings.etl
    assert json.loads(args[args.index("--spark-json") + 1]) == {"spark.sql.shuffle.partitions": "800"}
    assert "--end-date" not in args


def test_entry_point_accepts_the_arguments() -> None:
    """The contract, checked from both ends: spark_etl/main.py's own parser reads what we send."""
    from spark_etl.main import parse_args
    from spark_etl.runner import JOB_CHOICES

    assert set(JOB_CHOICES) == set(emr.JOBS)
    settings = make_settings(spark_conf={"spark.sql.shuffle.partitions": "400"})
    request = build(settings, job="all", end_day=date(2024, 5, 7))
    args = parse_args(request["jobDriver"]["sparkSubmitJobDriver"]["entryPointArguments"])
    assert (args.job, args.region, args.date, args.end_date) == ("all", REGION, DAY, date(2024, 5, 7))
    assert args.lake_uri == "s3://streamrec-lake/us"
    assert settings.etl.model_validate_json(args.etl_json) == settings.etl
    assert args.spark_json == '{"spark.sql.shuffle.partitions":"400"}'


def test_no_cloudwatch_section_without_a_log_group() -> None:
    request = build(make_settings(cloudwatch_log_group=""))
    monitoring = request["configurationOverrides"]["monitoringConfiguration"]
    assert "cloudWatchMonitoringConfiguration" not in monitoring
    assert monitoring["s3MonitoringConfiguration"] == {"logUri": "s3://streamrec-logs/emr"}


# --- deterministic name and token ------------------------------------------------------------------


def test_same_run_gives_same_name_and_token() -> None:
    first, second = build(job="keys"), build(job="keys")
    assert first == second
    assert first["clientToken"] == emr.client_token_for(REGION, "keys", DAY)


@pytest.mark.parametrize("changed", [
    {"job": "features"},
    {"day": date(2024, 5, 2)},
    {"end_day": date(2024, 5, 2)},
])
def test_a_different_run_gets_a_different_name_and_token(changed: dict[str, Any]) -> None:
    base, other = build(), build(**changed)
    assert other["name"] != base["name"]
    assert other["clientToken"] != base["clientToken"]


def test_a_different_region_gets_a_different_token() -> None:
    assert emr.client_token_for("eu-west-1", "clean", DAY) != emr.client_token_for(REGION, "clean", DAY)


def test_the_next_attempt_gets_a_new_token_and_keeps_the_name() -> None:
    first = build()
    again = build(client_token=emr.client_token_for(REGION, "clean", DAY, attempt=2))
    assert again["name"] == first["name"]
    assert again["clientToken"] != first["clientToken"]
    with pytest.raises(ValueError, match="attempt"):
        emr.client_token_for(REGION, "clean", DAY, attempt=0)


def test_an_explicit_client_token_is_used() -> None:
    assert build(client_token="my-token-1")["clientToken"] == "my-token-1"


def test_long_names_are_shortened_within_the_api_limit_and_stay_distinct() -> None:
    region = "ap-southeasternextended-9"
    settings = Settings(regions={region: RegionSettings.default_for(region, "s3://lake/x")},
                        emr=GOOD_EMR)
    names = {emr.start_job_run_request(settings, region, "features", DAY, end)["name"]
             for end in (date(2024, 5, 30), date(2024, 5, 31))}
    assert len(names) == 2
    assert all(len(n) <= 64 for n in names)
    assert all(n.startswith("streamrec-etl-features-ap-southeasternextended-9") for n in names)


# --- sizing, dynamic allocation, node selector -----------------------------------------------------


@dataclass(frozen=True)
class SizingCase:
    emr: dict[str, Any]
    expected: dict[str, str]


SIZING = {
    "defaults (r5.2xlarge, two executors a node, the R5 node group)": SizingCase({}, {
        "spark.executor.cores": "4", "spark.executor.memory": "26g",
        "spark.driver.cores": "2", "spark.driver.memory": "8g",
        "spark.kubernetes.executor.request.cores": "3600m",
        "spark.executor.memoryOverheadFactor": "0.1", "spark.driver.memoryOverheadFactor": "0.1",
        "spark.dynamicAllocation.enabled": "true",
        "spark.dynamicAllocation.shuffleTracking.enabled": "true",
        "spark.dynamicAllocation.minExecutors": "1", "spark.dynamicAllocation.maxExecutors": "20",
        "spark.kubernetes.node.selector.streamrec.io/node-group": "r5",
    }),
    "bigger executors": SizingCase(
        {"executor_cores": 8, "executor_memory": "56g", "driver_cores": 4, "driver_memory": "16g",
         "min_executors": 0, "max_executors": 50},
        {"spark.executor.cores": "8", "spark.executor.memory": "56g", "spark.driver.cores": "4",
         "spark.driver.memory": "16g", "spark.kubernetes.executor.request.cores": "7200m",
         "spark.dynamicAllocation.minExecutors": "0", "spark.dynamicAllocation.maxExecutors": "50"}),
    "two node labels": SizingCase(
        {"node_selector": "karpenter.sh/nodepool=r5, node.kubernetes.io/instance-type=r5.4xlarge"},
        {"spark.kubernetes.node.selector.karpenter.sh/nodepool": "r5",
         "spark.kubernetes.node.selector.node.kubernetes.io/instance-type": "r5.4xlarge"}),
}


@pytest.mark.parametrize("case", SIZING.values(), ids=SIZING.keys())
def test_sizing_goes_to_spark_submit_parameters(case: SizingCase) -> None:
    conf = submit_conf(build(make_settings(**case.emr)))
    assert {k: conf.get(k) for k in case.expected} == case.expected


def test_the_r5_toleration_travels_in_a_content_named_pod_template_in_the_lake() -> None:
    settings = make_settings()
    conf = submit_conf(build(settings))
    uri, body = emr.pod_template_object(settings, REGION)
    lake = settings.region(REGION).lake_uri.rstrip("/")
    assert uri.startswith(f"{lake}/emr/region={REGION}/pod-templates/") and uri.endswith(".json")
    assert conf["spark.kubernetes.driver.podTemplateFile"] == conf["spark.kubernetes.executor.podTemplateFile"] == uri
    assert json.loads(body) == {"apiVersion": "v1", "kind": "Pod", "spec": {"tolerations": [
        {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"}]}}
    # Same settings, same name (an idempotent upload); another toleration, another name.
    assert emr.pod_template_object(make_settings(), REGION) == (uri, body)
    other = make_settings(tolerations=[{"key": "dedicated", "operator": "Equal", "value": "spark",
                                        "effect": "NoSchedule"}])
    assert emr.pod_template_object(other, REGION)[0] != uri


def test_no_pod_template_without_tolerations() -> None:
    conf = submit_conf(build(make_settings(tolerations=[])))
    assert not [k for k in conf if "podTemplateFile" in k]
    assert emr.pod_template(make_settings(tolerations=[]).emr) is None


def test_no_node_selector_when_the_setting_is_empty() -> None:
    conf = submit_conf(build(make_settings(node_selector="")))
    assert not [k for k in conf if k.startswith("spark.kubernetes.node.selector.")]


def test_spark_conf_wins_and_values_with_spaces_go_to_spark_defaults() -> None:
    settings = make_settings(spark_conf={
        "spark.dynamicAllocation.maxExecutors": "5",  # overrides ours
        "spark.sql.shuffle.partitions": "400",
        "spark.driver.extraJavaOptions": "-Dfoo=1 -Dbar=2",  # cannot travel unquoted
    })
    request = build(settings)
    conf, defaults = submit_conf(request), spark_defaults(request)
    assert conf["spark.dynamicAllocation.maxExecutors"] == "5"
    assert conf["spark.sql.shuffle.partitions"] == "400"
    assert defaults == {"spark.driver.extraJavaOptions": "-Dfoo=1 -Dbar=2"}
    assert not set(conf) & set(defaults)  # one place per key: no precedence to reason about


# --- image mode and archive mode -------------------------------------------------------------------


@dataclass(frozen=True)
class ModeCase:
    emr: dict[str, Any]
    entry_point: str
    submit: dict[str, str]  # expected in sparkSubmitParameters
    defaults: dict[str, str]  # the whole spark-defaults classification
    absent: tuple[str, ...] = ()  # in neither place


MODES = {
    "archive on S3": ModeCase(
        {}, "s3://streamrec-code/etl/main.py",
        {"spark.archives": "s3://streamrec-code/etl/pyspark_venv.tar.gz#environment",
         "spark.pyspark.python": "./environment/bin/python"},
        {}, ("spark.kubernetes.container.image",)),
    "custom image": ModeCase(
        {"image": IMAGE, "code_uri": ""}, "local:///opt/streamrec/main.py",
        {}, {"spark.kubernetes.container.image": IMAGE}, ("spark.archives", "spark.pyspark.python")),
    "image wins over code_uri": ModeCase(
        {"image": IMAGE}, "local:///opt/streamrec/main.py",
        {}, {"spark.kubernetes.container.image": IMAGE}, ("spark.archives",)),
    "image by digest": ModeCase(
        {"image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/streamrec-spark@sha256:" + "a" * 64},
        "local:///opt/streamrec/main.py", {},
        {"spark.kubernetes.container.image":
         "123456789012.dkr.ecr.eu-west-1.amazonaws.com/streamrec-spark@sha256:" + "a" * 64}),
}


@pytest.mark.parametrize("case", MODES.values(), ids=MODES.keys())
def test_code_location_mode(case: ModeCase) -> None:
    request = build(make_settings(**case.emr))
    conf, defaults = submit_conf(request), spark_defaults(request)
    assert request["jobDriver"]["sparkSubmitJobDriver"]["entryPoint"] == case.entry_point
    assert {k: conf.get(k) for k in case.submit} == case.submit
    assert defaults == case.defaults
    assert not [k for k in case.absent if k in conf or k in defaults]


# --- refusals: each names its key ------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    emr: dict[str, Any] = field(default_factory=dict)
    lake_uri: str = "s3://streamrec-lake/us"
    spark_conf: dict[str, str] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, ...] = ()  # each must appear in the message


REFUSALS = {
    "no virtual cluster": Refusal(emr={"virtual_cluster_id": ""},
                                  error=("emr.virtual_cluster_id", "not set")),
    "malformed virtual cluster": Refusal(emr={"virtual_cluster_id": "My_Cluster"},
                                         error=("emr.virtual_cluster_id", "'My_Cluster'")),
    "no role": Refusal(emr={"execution_role_arn": ""}, error=("emr.execution_role_arn", "not set")),
    "user, not role": Refusal(emr={"execution_role_arn": "arn:aws:iam::123456789012:user/bob"},
                              error=("emr.execution_role_arn", "not an IAM role ARN")),
    "short account": Refusal(emr={"execution_role_arn": "arn:aws:iam::1234:role/x"},
                             error=("emr.execution_role_arn",)),
    "release label": Refusal(emr={"release_label": "7.5.0"}, error=("emr.release_label",)),
    "no code and no image": Refusal(emr={"code_uri": ""}, error=("emr.code_uri", "emr.image")),
    "code not on S3": Refusal(emr={"code_uri": "https://bucket.s3.amazonaws.com/etl"},
                              error=("emr.code_uri", "s3://")),
    "code on s3a": Refusal(emr={"code_uri": "s3a://bucket/etl"}, error=("emr.code_uri",)),
    "malformed image": Refusal(emr={"image": "streamrec spark"}, error=("emr.image",)),
    "image without registry": Refusal(emr={"image": "streamrec-spark"}, error=("emr.image",)),
    "no log uri": Refusal(emr={"log_uri": ""}, error=("emr.log_uri", "not set")),
    "log uri not on S3": Refusal(emr={"log_uri": "/var/log/emr"}, error=("emr.log_uri", "s3://")),
    "log group": Refusal(emr={"cloudwatch_log_group": "streamrec emr"}, error=("emr.cloudwatch_log_group",)),
    "node selector without =": Refusal(emr={"node_selector": "r5.2xlarge"}, error=("emr.node_selector",)),
    "node selector bad value": Refusal(emr={"node_selector": "size=r5 2xl"}, error=("emr.node_selector",)),
    "lake on local disk": Refusal(lake_uri="file:///data/lake",
                                  error=("regions.us-east-1.lake_uri", "s3://", "file:///data/lake")),
    "region not configured": Refusal(run={"region": "eu-west-1"}, error=("regions.eu-west-1", "us-east-1")),
    "spark conf key": Refusal(spark_conf={"shuffle partitions": "4"},
                              error=("spark.conf", "shuffle partitions")),
    "spark conf empty value": Refusal(spark_conf={"spark.sql.shuffle.partitions": ""},
                                      error=("spark.conf.spark.sql.shuffle.partitions",)),
    "unknown job": Refusal(run={"job": "train"}, error=("clean, features, keys, all", "'train'")),
    "range backwards": Refusal(run={"end_day": date(2024, 4, 30)}, error=("2024-04-30", "before")),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal_names_the_setting(case: Refusal) -> None:
    settings = make_settings(lake_uri=case.lake_uri, spark_conf=case.spark_conf, **case.emr)
    with pytest.raises(ValueError) as info:
        build(settings, **case.run)
    message = str(info.value)
    assert "\n" not in message  # fit for a one-line CLI error
    for part in case.error:
        assert part in message


# --- what botocore's model rejects is reported -----------------------------------------------------


def _with(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(request: dict[str, Any]) -> None:
        target = request
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


_DELETE = object()
DRIVER = ("jobDriver", "sparkSubmitJobDriver")
MODEL_REJECTS = {
    "missing cluster id": (_with(("virtualClusterId",), _DELETE), "Missing required parameter",
                           "virtualClusterId"),
    "unknown field": (_with(("retries",), 3), "Unknown parameter", "retries"),
    "empty argument": (_with((*DRIVER, "entryPointArguments"), ["--job", ""]), "valid min length: 1",
                       "entryPointArguments[1]"),
    "wrong type": (_with((*DRIVER, "entryPointArguments"), "--job clean"), "Invalid type",
                   "entryPointArguments"),
    "name too long": (_with(("name",), "n" * 65), "valid max length: 64", "name"),
    "enum": (_with(("configurationOverrides", "monitoringConfiguration", "persistentAppUI"), "ON"),
             "valid values: ENABLED, DISABLED", "persistentAppUI"),
    "too many tags": (_with(("tags",), {f"k{i}": "v" for i in range(51)}), "valid max entries: 50", "tags"),
    "blank argument": (_with((*DRIVER, "entryPointArguments"), ["--job", "   "]), "pattern",
                       "entryPointArguments[1]"),
    "role arn pattern": (_with(("executionRoleArn",), "arn:aws:iam::123456789012:group/streamrec-jobs"),
                         "pattern", "executionRoleArn"),
}


@pytest.mark.parametrize("case", MODEL_REJECTS.values(), ids=MODEL_REJECTS.keys())
def test_validate_request_reports_what_the_model_rejects(case: tuple[Any, str, str]) -> None:
    edit, *expected = case
    request = build()
    edit(request)
    with pytest.raises(ValueError) as info:
        emr.validate_request(request)
    message = str(info.value)
    assert message.startswith("invalid StartJobRun request: ") and "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize("settings, where", [
    # Each passes our own setting checks; the service model still refuses the request built from it.
    (make_settings(code_uri="s3://streamrec-code/" + "p" * 250),
     "entryPoint, length: 278, valid max length: 256"),
    (make_settings(spark_conf={"spark.driver.extraJavaOptions": "-Dx=1 " * 200}),
     "properties.spark.driver.extraJavaOptions, length: 1200"),
], ids=["entry point over 256 characters", "spark-defaults value over 1024 characters"])
def test_builder_reports_a_request_the_model_rejects(settings: Settings, where: str) -> None:
    with pytest.raises(ValueError, match="invalid StartJobRun request") as info:
        build(settings)
    assert where in str(info.value)


# --- submit ----------------------------------------------------------------------------------------


def test_submit_sends_the_request_and_returns_the_id() -> None:
    sent: list[dict[str, Any]] = []

    class Client:
        def start_job_run(self, **request: Any) -> dict[str, Any]:
            sent.append(request)
            return {"id": "0000000abcdefghijkl", "name": request["name"], "virtualClusterId": "x", "arn": "a"}

    request = build()
    assert emr.submit(Client(), request) == "0000000abcdefghijkl"
    assert sent == [request]


# --- wait --------------------------------------------------------------------------------------------


class FakeClock:
    """Time that moves only when ``sleep`` is called."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedEmr:
    """An emr-containers client whose DescribeJobRun answers the next state of a script (the last repeats)."""

    def __init__(self, states: list[str], **terminal: str) -> None:
        self.states = states
        self.terminal = terminal  # failureReason / stateDetails, reported with a terminal state
        self.calls: list[dict[str, str]] = []

    def describe_job_run(self, **kwargs: str) -> dict[str, Any]:
        self.calls.append(kwargs)
        state = self.states[min(len(self.calls), len(self.states)) - 1]
        run: dict[str, Any] = {"id": kwargs["id"], "virtualClusterId": kwargs["virtualClusterId"],
                               "state": state}
        if state in emr.TERMINAL_STATES:
            run.update(self.terminal)
        return {"jobRun": run}


@dataclass(frozen=True)
class WaitCase:
    states: list[str]
    terminal: dict[str, str] = field(default_factory=dict)
    poll: float = 30.0
    timeout: float = 3_600.0
    result: str | None = None  # the returned state, or
    error: type[Exception] | None = None  # the exception raised
    message: tuple[str, ...] = ()  # parts of the exception's message
    seen: list[str] = field(default_factory=list)  # on_state calls
    sleeps: list[float] = field(default_factory=list)


WAITS = {
    "completes": WaitCase(
        ["PENDING", "SUBMITTED", "RUNNING", "RUNNING", "RUNNING", "COMPLETED"], result="COMPLETED",
        seen=["PENDING", "SUBMITTED", "RUNNING", "COMPLETED"], sleeps=[30.0] * 5),
    "already completed": WaitCase(["COMPLETED"], result="COMPLETED", seen=["COMPLETED"], sleeps=[]),
    "fails": WaitCase(
        ["SUBMITTED", "RUNNING", "FAILED"],
        {"failureReason": "USER_ERROR", "stateDetails": "Job failed with exit code 1 (clean: 0 rows read)"},
        error=emr.JobRunFailed, seen=["SUBMITTED", "RUNNING", "FAILED"], sleeps=[30.0, 30.0],
        message=("job run run0000000000000001 FAILED", "USER_ERROR", "exit code 1 (clean: 0 rows read)")),
    "fails without a reason": WaitCase(
        ["FAILED"], error=emr.JobRunFailed, message=("FAILED: no reason given",), seen=["FAILED"]),
    "cancelled": WaitCase(
        ["RUNNING", "CANCEL_PENDING", "CANCELLED"], {"stateDetails": "JobRun CANCELLED successfully."},
        error=emr.JobRunFailed, message=("CANCELLED", "JobRun CANCELLED successfully."),
        seen=["RUNNING", "CANCEL_PENDING", "CANCELLED"], sleeps=[30.0, 30.0]),
    "times out; the last sleep ends at the deadline": WaitCase(
        ["PENDING", "RUNNING"], poll=30.0, timeout=100.0, error=emr.JobRunTimeout,
        message=("job run run0000000000000001 still RUNNING after 100 s",
                 "cancel-job-run --id run0000000000000001 --virtual-cluster-id vc123"),
        seen=["PENDING", "RUNNING"], sleeps=[30.0, 30.0, 30.0, 10.0]),
    "completes at the deadline: the last read catches it": WaitCase(
        ["RUNNING"] * 4 + ["COMPLETED"], poll=30.0, timeout=100.0, result="COMPLETED",
        seen=["RUNNING", "COMPLETED"], sleeps=[30.0, 30.0, 30.0, 10.0]),
    "no time at all: one read": WaitCase(
        ["PENDING"], timeout=0.0, error=emr.JobRunTimeout, message=("still PENDING after 0 s",),
        seen=["PENDING"]),
}


@pytest.mark.parametrize("case", WAITS.values(), ids=WAITS.keys())
def test_wait(case: WaitCase) -> None:
    client, clock = ScriptedEmr(case.states, **case.terminal), FakeClock()
    seen: list[str] = []

    def run() -> str:
        return emr.wait(client, "vc123", "run0000000000000001", poll_seconds=case.poll,
                        timeout_seconds=case.timeout, on_state=lambda state, run: seen.append(state),
                        clock=clock, sleep=clock.sleep)

    if case.error is None:
        assert run() == case.result
    else:
        with pytest.raises(case.error) as info:
            run()
        for part in case.message:
            assert part in str(info.value)
    assert seen == case.seen
    assert clock.sleeps == case.sleeps
    assert client.calls[0] == {"id": "run0000000000000001", "virtualClusterId": "vc123"}
    assert len(client.calls) == len(case.sleeps) + 1  # one read per wake-up, plus the first


def test_wait_errors_carry_the_details() -> None:
    clock = FakeClock()
    with pytest.raises(emr.JobRunFailed) as failed:
        emr.wait(ScriptedEmr(["FAILED"], failureReason="CLUSTER_UNAVAILABLE"), "vc", "r1",
                 poll_seconds=1, timeout_seconds=10, clock=clock, sleep=clock.sleep)
    assert (failed.value.state, failed.value.failure_reason, failed.value.state_details) == (
        "FAILED", "CLUSTER_UNAVAILABLE", None)
    with pytest.raises(TimeoutError) as timed_out:  # JobRunTimeout is a TimeoutError
        emr.wait(ScriptedEmr(["RUNNING"]), "vc", "r1", poll_seconds=1, timeout_seconds=2.5,
                 clock=clock, sleep=clock.sleep)
    assert isinstance(timed_out.value, emr.JobRunTimeout)
    assert (timed_out.value.last_state, timed_out.value.waited_seconds) == ("RUNNING", 2.5)


@pytest.mark.parametrize("poll, timeout", [(0, 10), (-1, 10), (1, -1)])
def test_wait_refuses_nonsense_intervals(poll: float, timeout: float) -> None:
    with pytest.raises(ValueError):
        emr.wait(ScriptedEmr(["RUNNING"]), "vc", "r1", poll_seconds=poll, timeout_seconds=timeout)
