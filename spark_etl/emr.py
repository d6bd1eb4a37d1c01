"""EMR on EKS job submission for the Spark ETL: the StartJobRun request, submit, and wait.

:func:`start_job_run_request` is pure: settings in, an ``emr-containers`` StartJobRun request out, checked
against botocore's service model before it is returned (:func:`validate_request`). :func:`submit` and
:func:`wait` are the only functions that talk to AWS; ``wait`` takes its clock and sleep as parameters so
its polling is tested without sleeping. ``streamrec etl request`` prints the request (for review, or for
``aws emr-containers start-job-run --cli-input-json file://request.json``) and ``streamrec etl submit``
sends it (streamrec/cli/etl_submit.py).

What the request runs
---------------------
``spark-submit <entry point> --job {clean,features,keys,all} --region R --date YYYY-MM-DD
[--end-date YYYY-MM-DD] --lake-uri s3://bucket/prefix --etl-json '<EtlSettings JSON>'
--spark-json '<SparkSettings.conf JSON>'`` (the contract of spark_etl/main.py), with:

- name ``streamrec-etl-<job>-<region>-<date>[-<end date>]`` and a client token derived from the same
  region/job/dates (plus an attempt number, 1 by default). Submitting the same day twice, e.g. a
  scheduler retrying after a lost response, therefore reaches the one job run already started instead of
  starting a second run that would overwrite the same partitions concurrently. To run a day again after
  a FAILED or CANCELLED run, submit with the next attempt number (``streamrec etl submit --attempt 2``).
- sizing for the R5 node group: ``emr.executor_cores``/``executor_memory`` and the driver's, an executor
  CPU request of 90% of its cores and a fixed 10% memory overhead (see :func:`spark_conf` for why),
  dynamic allocation between ``emr.min_executors`` and ``emr.max_executors`` with shuffle tracking (EKS
  has no external shuffle service), and ``emr.node_selector`` on driver and executors;
- ``emr.tolerations`` (the R5 node group's taint) on driver and executors through a pod template: Spark
  has no property for tolerations, so :func:`pod_template` is uploaded by :func:`upload_pod_template`
  to ``<lake>/emr/region=R/pod-templates/<content hash>.json`` before the run starts, and the request
  names it in ``spark.kubernetes.{driver,executor}.podTemplateFile`` (EMR on EKS reads pod templates
  from S3 with the job execution role). The name is the content's hash, so the upload is idempotent
  and a run always gets the template of the settings it was built from;
- ``settings.spark.conf`` on top, so a property set there wins over ours;
- monitoring: the persistent Spark UI, driver/executor logs to ``emr.log_uri`` (S3) and to the CloudWatch
  group ``emr.cloudwatch_log_group`` under the prefix ``streamrec-etl/<region>/<job>``.

The job execution role (``emr.execution_role_arn``) needs read access to the code (``emr.code_uri``, or
the image's ECR repository), read/write on the lake, write on ``emr.log_uri`` and
``logs:CreateLogStream``/``logs:PutLogEvents`` on the log group.

How the job code and its dependencies reach EMR
-----------------------------------------------
The EMR release must run this project's Spark and Python: streamrec needs Python >= 3.11 and is
developed against Spark 4, which EMR ships from ``emr-spark-8.0.0`` (Spark 4.0, Python 3.11-3.13). The
``emr-7.x`` releases run Spark 3.5 on Python 3.9: they work only if the jobs stay Spark 3.5 compatible
and the image adds Python 3.11.

(a) Recommended: a custom image (``emr.image`` set). ``spark_etl/Dockerfile.emr`` builds FROM the EMR on
EKS base image of the release label, installs the streamrec wheel into a virtual environment
(``/opt/streamrec/venv``, whose interpreter PySpark uses through ``PYSPARK_PYTHON``) and copies the entry
point to ``/opt/streamrec/main.py``; the request then names ``local:///opt/streamrec/main.py`` as the
entry point and sets ``spark.kubernetes.container.image`` (spark-defaults classification) so driver and
executors run the image. ``emr.code_uri`` is not used in this mode. The wheel is installed without the
``[spark]`` extra on purpose: the base image's Spark supplies PySpark matched to its JVM, and a pip
``pyspark`` next to it would only add 300 MB that must never be imported. Build and publish::

    python -m pip wheel --no-deps -w dist .
    docker build -f spark_etl/Dockerfile.emr --build-arg EMR_RELEASE=emr-spark-8.0.0 \\
        -t <account>.dkr.ecr.<region>.amazonaws.com/streamrec-spark:<git sha> .
    aws ecr get-login-password --region <region> \\
        | docker login --username AWS --password-stdin <account>.dkr.ecr.<region>.amazonaws.com
    docker push <account>.dkr.ecr.<region>.amazonaws.com/streamrec-spark:<git sha>

and set ``emr.image`` to the pushed tag (an immutable tag or ``@sha256:`` digest, so every executor of a
run gets the same code). The release label and the image's base must be the same release.

(b) Alternative: an archive on S3 (``emr.image`` empty, ``emr.code_uri`` = ``s3://bucket/prefix``). The
job runs on the stock image; its Python environment travels as a venv-pack archive that Spark unpacks
in every pod (``spark.archives=<code_uri>/pyspark_venv.tar.gz#environment`` and
``spark.pyspark.python=./environment/bin/python``), and the entry point is ``<code_uri>/main.py``.
venv-pack does not pack the interpreter: the archive's ``bin/python`` must point to a Python that
exists at the same path in the EMR image, so build it inside the base image itself::

    python -m pip wheel --no-deps -w dist .
    docker run --rm --user root -v "$PWD:/src" -w /src --entrypoint /bin/bash \\
        public.ecr.aws/emr-on-eks/spark/emr-spark-8.0.0:latest -c '
          python3.11 -m venv /tmp/pyspark_venv &&
          /tmp/pyspark_venv/bin/pip install --no-cache-dir venv-pack dist/streamrec-*.whl &&
          /tmp/pyspark_venv/bin/venv-pack -p /tmp/pyspark_venv -o dist/pyspark_venv.tar.gz'
    aws s3 cp dist/pyspark_venv.tar.gz <code_uri>/pyspark_venv.tar.gz
    aws s3 cp spark_etl/main.py <code_uri>/main.py

Upload both files together whenever the code changes (``main.py`` imports the package from the
archive). The archive is downloaded by every pod at start-up, one reason the image is recommended.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime
from functools import lru_cache
from typing import Any

from streamrec.settings import EmrSettings, Settings

JOBS = ("clean", "features", "keys", "all")
# Job run states (DescribeJobRun): PENDING, SUBMITTED, RUNNING, CANCEL_PENDING, then one of these.
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")
# Where spark_etl/Dockerfile.emr puts the entry point; local:// means "a path inside the image".
IMAGE_ENTRY_POINT = "local:///opt/streamrec/main.py"
ENTRY_POINT_NAME = "main.py"
VENV_ARCHIVE_NAME = "pyspark_venv.tar.gz"
DEFAULT_POLL_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 4 * 3600.0

_NAME_MAX = 64  # StartJobRun name: 1-64 of [.-_/#A-Za-z0-9]
_CLUSTER_ID_RE = re.compile(r"^[0-9a-z]{1,64}$")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-zA-Z0-9-]*:iam::\d{12}:role/([\x21-\x7e]+/)?[\w+=,.@-]+$")
_RELEASE_RE = re.compile(r"^emr-[.\-_/A-Za-z0-9]{1,60}$")
_LOG_GROUP_RE = re.compile(r"^[.\-_/#A-Za-z0-9]{1,512}$")
# registry[:port]/repository[:tag][@sha256:digest], at least one path separator (a registry host).
_IMAGE_RE = re.compile(
    r"^[a-z0-9][a-z0-9.\-]*(:\d+)?/[a-z0-9._\-/]+(:[\w][\w.\-]{0,127})?(@sha256:[0-9a-f]{64})?$"
)
_LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([\w.\-]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([\w.\-]{0,61}[A-Za-z0-9])?)?$")
# A token spark-submit receives unquoted in sparkSubmitParameters: no whitespace, quotes or backslashes.
_BARE_TOKEN_RE = re.compile(r"^[^\s'\"\\]+$")
_S3_URI_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")


class JobRunFailed(RuntimeError):
    """The job run ended FAILED or CANCELLED; the message carries EMR's reason."""

    def __init__(self, job_run_id: str, state: str, failure_reason: str | None, state_details: str | None):
        self.job_run_id = job_run_id
        self.state = state
        self.failure_reason = failure_reason
        self.state_details = state_details
        reason = ": ".join(p for p in (failure_reason, state_details) if p) or "no reason given"
        super().__init__(f"job run {job_run_id} {state}: {reason}")


class JobRunTimeout(TimeoutError):
    """The job run did not reach a terminal state in time; it is still running on EMR."""

    def __init__(self, job_run_id: str, virtual_cluster_id: str, last_state: str, waited_seconds: float):
        self.job_run_id = job_run_id
        self.virtual_cluster_id = virtual_cluster_id
        self.last_state = last_state
        self.waited_seconds = waited_seconds
        super().__init__(
            f"job run {job_run_id} still {last_state} after {waited_seconds:.0f} s; it keeps running on EMR "
            f"(stop it with: aws emr-containers cancel-job-run --id {job_run_id} "
            f"--virtual-cluster-id {virtual_cluster_id})"
        )


# --- the request ---------------------------------------------------------------------------------


def job_run_name(region: str, job: str, day: date, end_day: date | None = None) -> str:
    """``streamrec-etl-<job>-<region>-<date>[-<end date>]``, shortened with a hash past 64 characters."""
    name = f"streamrec-etl-{job}-{region}-{_iso(day)}" + (f"-{_iso(end_day)}" if end_day else "")
    if len(name) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:_NAME_MAX - 9]}-{digest}"


def client_token_for(region: str, job: str, day: date, end_day: date | None = None, attempt: int = 1) -> str:
    """The idempotency token of one attempt at one region/job/date range (see the module docstring)."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, got {attempt}")
    key = f"streamrec-etl|{region}|{job}|{_iso(day)}|{_iso(end_day) if end_day else ''}|{attempt}"
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def spark_conf(settings: Settings) -> dict[str, str]:
    """Spark properties of the EMR run: sizing, dynamic allocation, code location, then settings.spark.conf.

    Properties from ``settings.spark.conf`` win, so an operator can override any of ours without code.
    """
    emr = settings.emr
    conf = {
        "spark.executor.cores": str(emr.executor_cores),
        "spark.executor.memory": emr.executor_memory,
        "spark.driver.cores": str(emr.driver_cores),
        "spark.driver.memory": emr.driver_memory,
        # The pod requests 90% of the executor's cores: an r5.2xlarge offers about 7.9 allocatable CPUs,
        # so two 4.0-CPU requests never fit one node, while two of 3.6 leave about 0.7 for daemonsets.
        "spark.kubernetes.executor.request.cores": f"{emr.executor_cores * 900}m",
        # Spark on Kubernetes gives a PySpark job 40% memory overhead unless told otherwise, which would
        # leave one 26g executor per 64 GiB node; the ETL is DataFrame code, so 10% is enough.
        "spark.executor.memoryOverheadFactor": "0.1",
        "spark.driver.memoryOverheadFactor": "0.1",
        "spark.dynamicAllocation.enabled": "true",
        # EKS has no external shuffle service: executors holding shuffle data are kept until it is unused.
        "spark.dynamicAllocation.shuffleTracking.enabled": "true",
        "spark.dynamicAllocation.minExecutors": str(emr.min_executors),
        "spark.dynamicAllocation.maxExecutors": str(emr.max_executors),
        **_node_selector_conf(emr.node_selector),
    }
    if emr.image:
        conf["spark.kubernetes.container.image"] = emr.image
    else:
        conf["spark.archives"] = f"{emr.code_uri.rstrip('/')}/{VENV_ARCHIVE_NAME}#environment"
        conf["spark.pyspark.python"] = "./environment/bin/python"
    for key, value in settings.spark.conf.items():
        if not _BARE_TOKEN_RE.match(key) or not key.startswith("spark."):
            raise ValueError(f"spark.conf: {key!r} is not a Spark property name (spark.something, no spaces)")
        if value == "":
            raise ValueError(f"spark.conf.{key}: empty value (remove the key to use the default)")
        conf[key] = value
    return conf


def pod_template(emr: EmrSettings) -> dict[str, Any] | None:
    """The pod template of driver and executors (the tolerations of ``emr.tolerations``); None when
    there is nothing Spark properties cannot say."""
    if not emr.tolerations:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "spec": {"tolerations": [dict(t) for t in emr.tolerations]}}


def pod_template_object(settings: Settings, region: str) -> tuple[str, bytes] | None:
    """(s3 URI, body) of the region's pod template: JSON (which Spark's YAML reader reads), named by
    its content hash under ``<lake>/emr/region=R/pod-templates/``; None without a template."""
    template = pod_template(settings.emr)
    if template is None:
        return None
    body = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(body).hexdigest()[:16]
    lake_uri = settings.region(region).lake_uri.rstrip("/")
    return f"{lake_uri}/emr/region={region}/pod-templates/{digest}.json", body


def upload_pod_template(s3_client: Any, settings: Settings, region: str) -> str | None:
    """Put the region's pod template (see :func:`pod_template_object`) and return its URI; a rerun puts
    the same bytes under the same key. ``s3_client``: a boto3 S3 client."""
    found = pod_template_object(settings, region)
    if found is None:
        return None
    uri, body = found
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    return uri


def start_job_run_request(
    settings: Settings,
    region: str,
    job: str,
    day: date,
    end_day: date | None = None,
    *,
    client_token: str | None = None,
) -> dict[str, Any]:
    """The StartJobRun request for ``job`` over ``day`` (to ``end_day``) in ``region``, validated.

    Raises ValueError naming the setting (``emr.virtual_cluster_id``, ``regions.<r>.lake_uri``, ...) when a
    required value is empty or malformed, or botocore's report when the service model rejects the request.
    """
    day, end_day = _check_run(job, day, end_day)
    emr = settings.emr
    _check_emr(emr)
    lake_uri = settings.region(region).lake_uri  # SettingsError (a ValueError) names an unknown region
    if not lake_uri.startswith("s3://"):
        raise ValueError(f"regions.{region}.lake_uri: EMR reads and writes the lake on S3, so it must be "
                         f"s3://bucket/prefix, got {lake_uri!r}")
    template = pod_template_object(settings, region)
    # Pod templates first, so settings.spark.conf (inside spark_conf) can still replace them.
    conf = ({"spark.kubernetes.driver.podTemplateFile": template[0],
             "spark.kubernetes.executor.podTemplateFile": template[0]} if template else {})
    conf.update(spark_conf(settings))
    # A value with spaces cannot travel unquoted in sparkSubmitParameters; the spark-defaults
    # classification takes any string. Each key goes to exactly one place, so precedence never matters.
    defaults = {k: v for k, v in conf.items()
                if k == "spark.kubernetes.container.image" or not _BARE_TOKEN_RE.match(v)}
    submit_params = " ".join(f"--conf {k}={v}" for k, v in conf.items() if k not in defaults)
    request: dict[str, Any] = {
        "name": job_run_name(region, job, day, end_day),
        "virtualClusterId": emr.virtual_cluster_id,
        "clientToken": client_token or client_token_for(region, job, day, end_day),
        "executionRoleArn": emr.execution_role_arn,
        "releaseLabel": emr.release_label,
        "jobDriver": {
            "sparkSubmitJobDriver": {
                "entryPoint": _entry_point(emr),
                "entryPointArguments": entry_point_arguments(settings, region, job, day, end_day),
                "sparkSubmitParameters": submit_params,
            }
        },
        "configurationOverrides": {
            "monitoringConfiguration": _monitoring(emr, region, job),
        },
        "tags": {
            "app": "streamrec",
            "component": "spark-etl",
            "environment": settings.environment,
            "region": region,
            "job": job,
            "date": _iso(day) + (f"..{_iso(end_day)}" if end_day else ""),
        },
    }
    if defaults:
        request["configurationOverrides"]["applicationConfiguration"] = [
            {"classification": "spark-defaults", "properties": defaults}
        ]
    validate_request(request)
    return request


def entry_point_arguments(
    settings: Settings, region: str, job: str, day: date, end_day: date | None = None
) -> list[str]:
    """The arguments of spark_etl/main.py (its fixed command-line contract)."""
    args = ["--job", job, "--region", region, "--date", _iso(day)]
    if end_day is not None:
        args += ["--end-date", _iso(end_day)]
    args += [
        "--lake-uri", settings.region(region).lake_uri,
        "--etl-json", settings.etl.model_dump_json(),
        "--spark-json", json.dumps(settings.spark.conf, sort_keys=True, separators=(",", ":")),
    ]
    return args


def _entry_point(emr: EmrSettings) -> str:
    return IMAGE_ENTRY_POINT if emr.image else f"{emr.code_uri.rstrip('/')}/{ENTRY_POINT_NAME}"


def _monitoring(emr: EmrSettings, region: str, job: str) -> dict[str, Any]:
    monitoring: dict[str, Any] = {
        # The Spark UI stays browsable from the EMR console after the pods are gone.
        "persistentAppUI": "ENABLED",
        "s3MonitoringConfiguration": {"logUri": emr.log_uri},
    }
    if emr.cloudwatch_log_group:
        monitoring["cloudWatchMonitoringConfiguration"] = {
            "logGroupName": emr.cloudwatch_log_group,
            "logStreamNamePrefix": f"streamrec-etl/{region}/{job}",
        }
    return monitoring


def _node_selector_conf(selector: str) -> dict[str, str]:
    """``key=value[,key=value]`` (emr.node_selector) as Spark's per-pod node selector properties."""
    conf = {}
    for part in filter(None, (p.strip() for p in selector.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not _LABEL_KEY_RE.match(key) or not _LABEL_VALUE_RE.match(value):
            raise ValueError(f"emr.node_selector: {part!r} is not a Kubernetes label selector key=value "
                             "(e.g. node.kubernetes.io/instance-type=r5.2xlarge)")
        conf[f"spark.kubernetes.node.selector.{key}"] = value
    return conf


def _check_run(job: str, day: date, end_day: date | None) -> tuple[date, date | None]:
    if job not in JOBS:
        raise ValueError(f"job must be one of {', '.join(JOBS)}, got {job!r}")
    day = _as_date(day)
    end_day = _as_date(end_day) if end_day is not None else None
    if end_day is not None and end_day < day:
        raise ValueError(f"end date {end_day} is before the start date {day}")
    return day, end_day


def _check_emr(emr: EmrSettings) -> None:
    """The settings StartJobRun needs, each failure naming its key."""
    if not emr.virtual_cluster_id:
        raise ValueError("emr.virtual_cluster_id: not set (the id of the region's EMR on EKS virtual "
                         "cluster: aws emr-containers list-virtual-clusters)")
    if not _CLUSTER_ID_RE.match(emr.virtual_cluster_id):
        raise ValueError(f"emr.virtual_cluster_id: {emr.virtual_cluster_id!r} is not a virtual cluster id "
                         "(lower-case letters and digits)")
    if not emr.execution_role_arn:
        raise ValueError("emr.execution_role_arn: not set (the IAM role the job's pods run as)")
    if not _ROLE_ARN_RE.match(emr.execution_role_arn):
        raise ValueError(f"emr.execution_role_arn: {emr.execution_role_arn!r} is not an IAM role ARN "
                         "(arn:aws:iam::123456789012:role/name)")
    if not _RELEASE_RE.match(emr.release_label):
        raise ValueError(f"emr.release_label: {emr.release_label!r} is not an EMR release label "
                         "(e.g. emr-spark-8.0.0-latest)")
    if emr.image and not _IMAGE_RE.match(emr.image):
        raise ValueError(f"emr.image: {emr.image!r} is not a container image reference "
                         "(registry/repository:tag, "
                         "e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/streamrec-spark:1a2b3c)")
    if not emr.image and not emr.code_uri:
        raise ValueError("emr.code_uri: not set, and neither is emr.image: one of them must say where "
                         "the job code is (see spark_etl/emr.py)")
    if emr.code_uri and not _S3_URI_RE.match(emr.code_uri):
        raise ValueError(f"emr.code_uri: must be s3://bucket/prefix, got {emr.code_uri!r}")
    if not emr.log_uri:
        raise ValueError("emr.log_uri: not set (s3://bucket/prefix for driver and executor logs, which "
                         "outlive the pods)")
    if not _S3_URI_RE.match(emr.log_uri):
        raise ValueError(f"emr.log_uri: must be s3://bucket/prefix, got {emr.log_uri!r}")
    if emr.cloudwatch_log_group and not _LOG_GROUP_RE.match(emr.cloudwatch_log_group):
        raise ValueError(f"emr.cloudwatch_log_group: {emr.cloudwatch_log_group!r} is not a log group name "
                         "(letters, digits and . - _ / #)")


def _as_date(day: date | datetime) -> date:
    return day.date() if isinstance(day, datetime) else day


def _iso(day: date | None) -> str:
    return _as_date(day).isoformat() if day is not None else ""


# --- validation against the service model -------------------------------------------------------


@lru_cache(maxsize=1)
def _input_shape() -> Any:
    import botocore.session

    model = botocore.session.get_session().get_service_model("emr-containers")
    return model.operation_model("StartJobRun").input_shape


def validate_request(request: Mapping[str, Any]) -> None:
    """Check a StartJobRun request against botocore's model of emr-containers; ValueError with the report.

    botocore's own validator checks required members, types and minimum lengths; maximum lengths, list
    and map sizes, enums and patterns are left to the service, so they are checked here too, so that a
    request that would be refused fails before it is sent.
    """
    from botocore.validate import ParamValidator

    shape = _input_shape()
    report = ParamValidator().validate(dict(request), shape)
    if report.has_errors():
        # One line per problem in the report; errors here are one line.
        raise ValueError("invalid StartJobRun request: " + "; ".join(report.generate_report().splitlines()))
    problems = list(_constraint_errors(request, shape, ""))
    if problems:
        raise ValueError("invalid StartJobRun request: " + "; ".join(problems))


def _constraint_errors(value: Any, shape: Any, path: str) -> Iterator[str]:
    meta = shape.metadata
    where = path or "request"
    if shape.type_name == "string":
        if "max" in meta and len(value) > meta["max"]:
            yield (f"Invalid length for parameter {where}, length: {len(value)}, "
                   f"valid max length: {meta['max']}")
        if shape.enum and value not in shape.enum:
            yield (f"Invalid value for parameter {where}, value: {value!r}, "
                   f"valid values: {', '.join(shape.enum)}")
        pattern = _pattern(meta.get("pattern"))
        # Smithy patterns are not implicitly anchored; the anchored ones (ARNs) say so with ^...$.
        if pattern is not None and not pattern.search(value):
            yield f"Invalid value for parameter {where}, value does not match the pattern {meta['pattern']}"
    elif shape.type_name == "list":
        if "max" in meta and len(value) > meta["max"]:
            yield f"Invalid length for parameter {where}, items: {len(value)}, valid max items: {meta['max']}"
        for i, item in enumerate(value):
            yield from _constraint_errors(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map":
        if "max" in meta and len(value) > meta["max"]:
            yield (f"Invalid length for parameter {where}, entries: {len(value)}, "
                   f"valid max entries: {meta['max']}")
        for key, item in value.items():
            yield from _constraint_errors(key, shape.key, f"{path}.{key}(key)")
            yield from _constraint_errors(item, shape.value, f"{path}.{key}")
    elif shape.type_name == "structure":
        for key, item in value.items():
            if key in shape.members:
                yield from _constraint_errors(item, shape.members[key], f"{path}.{key}" if path else key)


@lru_cache(maxsize=64)
def _pattern(text: str | None) -> re.Pattern[str] | None:
    if not text:
        return None
    try:
        return re.compile(text)
    except re.error:  # a Java-only construct: leave that check to the service
        return None


# --- submit and wait -----------------------------------------------------------------------------


def submit(client: Any, request: Mapping[str, Any]) -> str:
    """Start the job run and return its id; ``client`` is an emr-containers client (streamrec.aws.client)."""
    return client.start_job_run(**request)["id"]


def wait(
    client: Any,
    virtual_cluster_id: str,
    job_run_id: str,
    *,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    on_state: Callable[[str, Mapping[str, Any]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll DescribeJobRun until the run is terminal; returns ``"COMPLETED"``.

    ``on_state(state, job_run)`` is called once per state change (the first state included). A FAILED or
    CANCELLED run raises :class:`JobRunFailed` with EMR's failureReason and stateDetails; no terminal state
    within ``timeout_seconds`` raises :class:`JobRunTimeout` (the run itself is left running). The state
    is read one last time at the deadline, so a run finishing during the final interval is not missed.
    """
    if poll_seconds <= 0:
        raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
    if timeout_seconds < 0:
        raise ValueError(f"timeout_seconds must not be negative, got {timeout_seconds}")
    start = clock()
    deadline = start + timeout_seconds
    last_state: str | None = None
    while True:
        job_run = client.describe_job_run(id=job_run_id, virtualClusterId=virtual_cluster_id)["jobRun"]
        state = job_run["state"]
        if state != last_state and on_state is not None:
            on_state(state, job_run)
        last_state = state
        if state == "COMPLETED":
            return state
        if state in TERMINAL_STATES:
            raise JobRunFailed(job_run_id, state, job_run.get("failureReason"), job_run.get("stateDetails"))
        remaining = deadline - clock()
        if remaining <= 0:
            raise JobRunTimeout(job_run_id, virtual_cluster_id, state, clock() - start)
        sleep(min(poll_seconds, remaining))
