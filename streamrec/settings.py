"""Process settings: one pydantic-settings model, strict, with a section per region.

Sources, highest priority first: keyword arguments, environment variables (``STREAMREC_`` prefix,
``__`` for nesting, e.g. ``STREAMREC_INGEST__BATCH_MAX_RECORDS=1000``), then a YAML file named by
``STREAMREC_CONFIG`` (or passed explicitly), then the defaults. Every model forbids unknown keys so a
typo fails at start-up naming the key, never silently later.
"""

from __future__ import annotations

import math
import os
import re
from contextvars import ContextVar
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamrec.lake import validate_lake_uri

CONFIG_ENV = "STREAMREC_CONFIG"
# STREAMREC_* variables that are not settings: read by the CLI and the dev stack, and the code version
# the Ray image carries (ray_apps.registry.code_version; a build argument of docker/ray.Dockerfile).
NON_SETTING_ENV = {"STREAMREC_CONFIG", "STREAMREC_HOME", "STREAMREC_CODE_VERSION"}
LOCAL_PII_SALT = "streamrec-local-salt"
# The settings-source hook is a classmethod with a fixed signature; the YAML path reaches it this way.
_yaml_path: ContextVar[Path | None] = ContextVar("streamrec_yaml_path", default=None)
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_CPU_RE = re.compile(r"^(\d+(\.\d+)?)(m?)$")
# Ray Data's read and write tasks ask for one CPU each: the training workers or scoring actors of a
# stage must leave at least this much of the cluster free, or the stage waits forever for its input.
RAY_DATA_TASK_CPUS = 1.0


_MEMORY_RE = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEMORY_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_quantity(value: str) -> int:
    """A Kubernetes memory quantity (``"16Gi"``, ``"512Mi"``, ``"1G"``, ``"1048576"``) in bytes."""
    match = _MEMORY_RE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a memory quantity (e.g. \"16Gi\" or \"512Mi\")")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def cpu_quantity(value: str) -> float:
    """A Kubernetes CPU quantity (``"7"``, ``"1.5"``, ``"500m"``) in CPUs."""
    match = _CPU_RE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a CPU quantity (e.g. \"7\", \"1.5\" or \"500m\")")
    number = float(match.group(1))
    return number / 1000 if match.group(3) else number


class SettingsError(ValueError):
    """A configuration value is wrong; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsSettings(_Strict):
    # -- None means "the real AWS endpoint" (or AWS_ENDPOINT_URL, which botocore reads itself).
    endpoint_url: str | None = None
    # -- Static credentials are for the local stack only; in a pod, Pod Identity/IRSA provides them.
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = Field(10, ge=1, le=50)


class TableNames(_Strict):
    leases: str
    recs: str
    features: str


class RegionSettings(_Strict):
    """Everything that differs between regions. Nothing in one region refers to another."""

    stream_name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.-]+$")
    shard_count: int = Field(2, ge=1, le=10_000)
    # -- Root of this region's data lake: file:///abs/path (local) or s3://bucket/prefix.
    lake_uri: str
    tables: TableNames
    redis_url: str = "redis://127.0.0.1:6379/0"
    # -- Redshift in production; PostgreSQL locally (same SQL subset).
    warehouse_dsn: str = "postgresql://streamrec@127.0.0.1:5432/streamrec"

    @field_validator("lake_uri")
    @classmethod
    def _lake_uri(cls, v: str) -> str:
        return validate_lake_uri(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @classmethod
    def default_for(cls, region: str, lake_root: str) -> "RegionSettings":
        """Deterministic resource names for a region (what the dev stack and the chart create)."""
        return cls(
            stream_name=f"streamrec-clicks-{region}",
            lake_uri=f"{lake_root.rstrip('/')}/{region}" if lake_root.startswith("file://") else lake_root,
            tables=TableNames(
                leases=f"streamrec-ingest-leases-{region}",
                recs=f"streamrec-recs-{region}",
                features=f"streamrec-features-{region}",
            ),
        )


class IngestSettings(_Strict):
    """Kinesis consumer tuning. Defaults suit a pod reading about ten shards."""

    # -- Firehose-style buffering: flush a shard's buffer at whichever limit comes first.
    batch_max_records: int = Field(50_000, ge=1)
    batch_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    batch_max_seconds: float = Field(60.0, gt=0)
    # -- Records per GetRecords call (Kinesis maximum 10,000).
    get_records_limit: int = Field(10_000, ge=1, le=10_000)
    # -- Idle wait per shard between empty GetRecords calls (Kinesis allows 5 reads/s/shard).
    idle_poll_seconds: float = Field(1.0, ge=0.01)
    # -- A lease whose counter has not moved for this long (local clock) is expired and may be taken.
    lease_duration_seconds: float = Field(10.0, gt=0)
    lease_renew_seconds: float = Field(3.0, gt=0)
    # -- event_id dedup window per shard lease (ids, about 150 bytes each); the Spark ETL dedups
    # exactly across files and days.
    dedup_window: int = Field(100_000, ge=0)
    # -- Events with client time further ahead of the server receive time than this are dead-lettered.
    max_future_skew_seconds: int = Field(300, ge=0)
    max_record_bytes: int = Field(8 * 1024, ge=256, le=1024 * 1024)
    # -- Redis online features: last N interactions per user, popularity buckets per hour.
    user_recent_n: int = Field(50, ge=1, le=1000)
    user_recent_ttl_seconds: int = Field(30 * 24 * 3600, ge=60)
    popularity_bucket_ttl_seconds: int = Field(48 * 3600, ge=3600)
    # -- How long a flush retries the Redis features (jittered backoff) before it writes the batch's
    # lake files and checkpoint without them: the lake is the record and Kinesis keeps records only for
    # its retention, so Redis down must not stop it. Capped below the lease time (the lease must not
    # lapse while a flush waits).
    redis_retry_seconds: float = Field(5.0, ge=0, le=600)
    # -- Salt for hashing personal fields (IP, user agent); set it from a secret in production.
    pii_salt: str = Field(LOCAL_PII_SALT, min_length=16)
    metrics_port: int = Field(0, ge=0, le=65535)

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> "IngestSettings":
        if self.lease_renew_seconds >= self.lease_duration_seconds:
            raise ValueError("lease_renew_seconds must be smaller than lease_duration_seconds")
        return self


class EtlSettings(_Strict):
    """The Spark ETL's data rules (spark_etl/). Spark itself is tuned in ``spark``."""

    # -- Raw partitions are by receive hour; the run for day D also reads this many hours of D+1 so
    # events that arrived late still land on their event day. Schedule the daily run after this window.
    late_arrival_hours: int = Field(6, ge=0, le=31 * 24)
    # -- A new session starts after this much inactivity (sessions do not cross midnight UTC).
    session_gap_minutes: int = Field(30, ge=1, le=24 * 60)
    # -- Bot rule: a session with at least bot_min_session_events events at a sustained rate above
    # bot_max_events_per_minute, or a user with more than bot_max_user_events_per_day events in a day,
    # is removed (humans manage a few events per minute).
    bot_min_session_events: int = Field(20, ge=2)
    bot_max_events_per_minute: float = Field(30.0, gt=0)
    bot_max_user_events_per_day: int = Field(5_000, ge=1)
    # -- Items kept in a user's history (user table last-N and each training example's history).
    history_length: int = Field(50, ge=1, le=1_000)
    # -- Purchased items kept per user, for scoring's "exclude what they bought" rule.
    purchased_items_max: int = Field(200, ge=0, le=10_000)
    # -- Training examples come from this many days before the cutoff day; the cutoff day is evaluation.
    train_days: int = Field(14, ge=1, le=365)
    # -- Size of the per-region popularity list exported for the online store.
    popular_top_k: int = Field(100, ge=1, le=1_000)
    # -- Data-quality gate: fail when the output has fewer rows than (1 - share) x the previous day's.
    max_row_drop_share: float = Field(0.5, ge=0, le=1)
    # -- Output Parquet: rows per file and row-group bytes (Ray Data reads one row group per block).
    max_rows_per_file: int = Field(1_000_000, ge=1_000)
    row_group_bytes: int = Field(16 * 1024 * 1024, ge=1024 * 1024)


class SparkSettings(_Strict):
    """Spark session settings, in one place (spark_etl/session.py turns them into Spark conf).

    ``master`` is used by local runs only; on EMR on EKS the job submission decides.
    """

    master: str = "local[2]"
    driver_memory: str = Field("2g", pattern=r"^[0-9]+[kmgt]$")
    shuffle_partitions: int = Field(4, ge=1, le=100_000)
    # -- Extra Spark properties, e.g. {"spark.sql.adaptive.enabled": "true"}; they win over the defaults.
    conf: dict[str, str] = Field(default_factory=dict)


class EmrSettings(_Strict):
    """EMR on EKS job submission (``streamrec etl submit``); empty until a region is deployed."""

    virtual_cluster_id: str = ""
    execution_role_arn: str = ""
    # -- Spark 4 and Python 3.11+, which streamrec needs (emr-7.x ships Spark 3.5 on Python 3.9).
    release_label: str = "emr-spark-8.0.0-latest"
    # -- Where the packaged job code lives (see spark_etl/emr.py for how it gets there).
    code_uri: str = ""
    # -- Optional custom image with streamrec installed; when empty the code_uri archive is used.
    image: str = ""
    log_uri: str = ""
    cloudwatch_log_group: str = "/streamrec/emr"
    # -- R5 executors: r5.2xlarge has 8 vCPU / 64 GiB; 4 cores and 26g (+10% overhead) pack two per node.
    executor_cores: int = Field(4, ge=1, le=64)
    executor_memory: str = Field("26g", pattern=r"^[0-9]+[kmgt]$")
    driver_cores: int = Field(2, ge=1, le=64)
    driver_memory: str = Field("8g", pattern=r"^[0-9]+[kmgt]$")
    min_executors: int = Field(1, ge=0)
    max_executors: int = Field(20, ge=1)
    # -- Driver and executors run on the R5 node group: its label and the toleration of its taint (the
    # same as pipeline.rayjob's; k8s/ sets both). Spark has a property for node selectors but none for
    # tolerations, so those travel in a pod template uploaded next to the lake (spark_etl/emr.py).
    node_selector: str = "streamrec.io/node-group=r5"
    tolerations: tuple[dict[str, str], ...] = (
        {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"},)

    @model_validator(mode="after")
    def _executor_bounds(self) -> "EmrSettings":
        if self.min_executors > self.max_executors:
            raise ValueError("min_executors must not exceed max_executors")
        return self


class TrainSettings(_Strict):
    """Two-tower training with Ray Train (ray_apps/train.py). Local defaults suit 2 cores."""

    # -- Data-parallel workers and CPUs per worker: Ray Data ingest needs spare CPUs, so 2 workers x 0.5
    # CPU on a 2-core box (2 x 1 CPU hangs there); in the chart's RayJob (2 pods x 7 CPUs) 2 x 6. Outside
    # local the settings refuse a size that does not fit pipeline.rayjob (ray_stage_cpu_problems).
    workers: int = Field(2, ge=1, le=512)
    cpus_per_worker: float = Field(0.5, gt=0, le=96)
    # -- "auto" uses one GPU per worker when the Ray cluster has GPUs (NCCL, bf16 autocast), else CPU (gloo).
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    epochs: int = Field(3, ge=1, le=1_000)
    # -- Global batch (split across workers); larger on GPU: in-batch negatives improve with size.
    batch_size: int = Field(1024, ge=8, le=1_048_576)
    gpu_batch_size: int = Field(8192, ge=8, le=1_048_576)
    learning_rate: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    # -- Start from the promoted model's weights when its config matches (continuous daily training).
    warm_start: bool = True
    # -- Overrides of the model config (ray_apps.model.TwoTowerConfig fields), e.g. {"pooling": "attention"}.
    model: dict[str, Any] = Field(default_factory=dict)
    # -- Ray's object store for a local ray.init() (bytes); 0 lets Ray decide.
    object_store_bytes: int = Field(512 * 1024 * 1024, ge=0)
    # -- The encoded, shuffled train split is held in Ray's object store (read, encoded and shuffled once,
    # not every epoch) when it takes at most this many bytes there: rows x the encoded row size (464 bytes
    # with 50-item histories, about 12x its Parquet size); 0 never. Keep it well below the object store.
    materialize_max_bytes: int = Field(256 * 1024 * 1024, ge=0)


class GateSettings(_Strict):
    """Promotion gate (ray_apps/evaluate.py): the decision and its numbers go into the manifest."""

    # -- The metric the gate compares, e.g. recall@20 or ndcg@20 (K in 10, 20, 50, 100).
    metric: str = Field("recall@20", pattern=r"^(recall|ndcg|mrr)@(10|20|50|100)$")
    # -- Must beat the most-popular baseline by this relative margin (0.1 = 10% better).
    min_lift_over_popular: float = Field(0.1, ge=0, le=100)
    # -- May be at most this much (relative) worse than the promoted model on the same holdout.
    max_regression: float = Field(0.02, ge=0, le=1)
    # -- Evaluation users are sampled down to this many (full-catalogue ranking of every one of them).
    max_eval_users: int = Field(50_000, ge=100)


class ScoreSettings(_Strict):
    """Batch scoring with Ray Data (ray_apps/score.py)."""

    top_k: int = Field(100, ge=1, le=1_000)
    # -- Users with fewer history items than this are cold: they get the regional popularity list.
    min_history: int = Field(1, ge=0, le=1_000)
    # -- Leave out items the user already purchased (from the users table).
    exclude_purchased: bool = True
    batch_size: int = Field(4096, ge=16, le=1_048_576)
    # -- Exact inner-product search up to this many items, FAISS IVF above (see ray_apps.ann).
    exact_max_items: int = Field(50_000, ge=1)
    # -- Ray Data concurrency of the scoring stage (actors, each holding the model and the index).
    concurrency: int = Field(2, ge=1, le=1_024)
    cpus_per_actor: float = Field(0.5, gt=0, le=96)


class ServeScaling(_Strict):
    """One Ray Serve deployment's replicas (Serve autoscaling) and resources."""

    min_replicas: int = Field(1, ge=0, le=1_000)
    max_replicas: int = Field(2, ge=1, le=1_000)
    # -- Serve adds replicas when a replica has more requests than this in flight on average.
    target_ongoing_requests: float = Field(8, gt=0, le=10_000)
    # -- Requests a replica accepts at once; more queue at the caller (back-pressure, not errors).
    max_ongoing_requests: int = Field(64, ge=1, le=100_000)
    num_cpus: float = Field(0.25, ge=0, le=96)

    @model_validator(mode="after")
    def _bounds(self) -> "ServeScaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class RetrieverScaling(ServeScaling):
    """The retriever's replicas hold a model and an index: heavier, fewer requests in flight each."""

    target_ongoing_requests: float = Field(4, gt=0, le=10_000)
    num_cpus: float = Field(0.5, ge=0, le=96)


class ServeSettings(_Strict):
    """Online inference with Ray Serve (ray_apps/serve/)."""

    # -- Where `streamrec serve run` listens (0.0.0.0 in a pod).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65_535)
    # -- What answers on that port: "haproxy" (Serve's throughput-optimized mode: an HAProxy per node and
    # HTTP served by the Ingress replicas themselves) or "proxy" (Serve's Python proxy actor). Applied to a
    # local Ray cluster when streamrec starts it; in Kubernetes the chart's serving.httpFront sets it.
    http_front: Literal["haproxy", "proxy"] = "haproxy"
    # -- Whole-request budget; each step gets what is left of it, capped by its own timeout below.
    deadline_ms: float = Field(50, gt=0, le=60_000)
    cache_timeout_ms: float = Field(10, gt=0, le=60_000)
    batch_timeout_ms: float = Field(20, gt=0, le=60_000)
    realtime_timeout_ms: float = Field(35, gt=0, le=60_000)
    # -- Answers cached in Redis under recs:{region}:{model_version}:{user_id} for this long.
    cache_ttl_s: int = Field(3_600, ge=1, le=7 * 86_400)
    # -- A cached answer older than this is still served, and recomputed in the background.
    cache_refresh_after_s: int = Field(300, ge=0, le=7 * 86_400)
    # -- Consecutive failures of a dependency (Redis, DynamoDB, the retriever) that open its circuit,
    # and how long it stays open before one trial request.
    breaker_failures: int = Field(5, ge=1, le=1_000)
    breaker_reset_s: float = Field(5, gt=0, le=3_600)
    # -- Real-time requests a Retriever replica answers together (one user-tower pass and one index
    # search; Serve request batching), and how long the first waits for others (0 = never waits).
    realtime_batch_size: int = Field(16, ge=1, le=1_024)
    realtime_batch_wait_ms: float = Field(1.0, ge=0, le=1_000)
    # -- Recent clicks (from the consumer's Redis last-N) fed to the user tower on the real-time path.
    recent_items: int = Field(50, ge=1, le=1_000)
    # -- Regional popularity list kept in memory (the last resort) and how often it is reloaded.
    popular_size: int = Field(200, ge=1, le=10_000)
    popular_refresh_s: float = Field(60, gt=0, le=86_400)
    # -- How often the retriever checks the registry's promoted pointer (model hot swap).
    registry_poll_s: float = Field(10, gt=0, le=86_400)
    # -- API keys accepted in the X-API-Key header; empty = no authentication (the local default). In a
    # cluster they come from a Secret, e.g. STREAMREC_SERVE__API_KEYS='["key1","key2"]'.
    api_keys: tuple[SecretStr, ...] = ()
    ingress: ServeScaling = ServeScaling()
    retriever: RetrieverScaling = RetrieverScaling()


class SyncSettings(_Strict):
    """The sync step (operators/sync/): batch outputs → DynamoDB online store and the warehouse."""

    # -- Overall DynamoDB write rate (items/s) per region, sized to the table's capacity (on-demand
    # tables: stay under the account's per-table throughput limit); 0 = unlimited.
    dynamodb_items_per_s: float = Field(2_000, ge=0)
    # -- Seconds of dynamodb_items_per_s the limiter lets through at once (its bucket size; at least
    # one 25-item batch).
    dynamodb_burst_s: float = Field(1.0, gt=0, le=300)
    # -- Parallel BatchWriteItem callers (each sends 25 items per call, the DynamoDB limit).
    dynamodb_workers: int = Field(4, ge=1, le=256)
    # -- Rows read from an input Parquet file at a time (bounds the sync's memory: a recs row with 100
    # items is a few KB as a DynamoDB item).
    read_batch_rows: int = Field(2_000, ge=25, le=1_000_000)
    # -- Jittered exponential backoff for UnprocessedItems and throttling: base, cap, and how many
    # rounds without progress before the sync fails (the run then retries the stage).
    backoff_base_s: float = Field(0.05, gt=0, le=60)
    backoff_max_s: float = Field(5.0, gt=0, le=600)
    max_stalled_rounds: int = Field(12, ge=1, le=1_000)
    # -- A model version's recs items expire this many days after they were generated (DynamoDB TTL on
    # the expires_at attribute), so superseded versions clean themselves up.
    recs_ttl_days: int = Field(7, ge=1, le=365)
    # -- Most active users whose answers are written to the Redis cache under the new version's keys
    # before the promoted pointer flips (so the first requests after promotion are cache hits).
    prewarm_users: int = Field(1_000, ge=0, le=10_000_000)


class RayJobTemplate(_Strict):
    """What the controller puts into the KubeRay RayJobs it creates for training and scoring."""

    image: str = "streamrec/ray:0.1.0"
    service_account: str = "streamrec-ray"
    # -- The streamrec.yaml ConfigMap mounted into every Ray pod at /etc/streamrec.
    config_map: str = "streamrec-config"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    # -- Workers run on the memory-optimised R5 node group (labels and taint set in k8s/).
    worker_replicas: int = Field(2, ge=1, le=1_000)
    worker_cpu: str = "7"
    worker_memory: str = "56Gi"
    worker_gpus: int = Field(0, ge=0, le=8)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"streamrec.io/node-group": "r5"})
    tolerations: tuple[dict[str, str], ...] = (
        {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"},)
    # -- Size of the memory-backed /dev/shm (Ray's object store lives there).
    shm_size: str = "16Gi"
    # -- A finished RayJob's cluster is deleted this long after it ends (the RayJob object stays).
    ttl_seconds_after_finished: int = Field(600, ge=0)
    active_deadline_seconds: int = Field(6 * 3_600, ge=60)
    # -- Extra environment of every RayJob container, as Kubernetes env entries: the Secret-backed
    # settings (STREAMREC_INGEST__PII_SALT, the warehouse DSN) a stage needs to load its settings. The
    # chart fills it with what every other streamrec pod gets.
    env: tuple[dict[str, Any], ...] = ()

    @field_validator("head_cpu", "worker_cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        if cpu_quantity(v) <= 0:
            raise ValueError(f"{v!r}: a Ray pod needs a positive number of CPUs")
        return v

    @field_validator("head_memory", "worker_memory", "shm_size")
    @classmethod
    def _memory(cls, v: str) -> str:
        if memory_quantity(v) <= 0:
            raise ValueError(f"{v!r}: must be a positive amount of memory")
        return v


class PipelineSettings(_Strict):
    """The daily PipelineRun (operators/): stage backends, retries, and the child templates."""

    # -- Namespace where the controller creates RayJobs and SparkApplications.
    namespace: str = "streamrec"
    # -- The ETL runs as an EMR on EKS job run (emr) or a Spark operator SparkApplication.
    etl_backend: Literal["emr", "spark-operator"] = "emr"
    # -- Attempts per stage (the first run included) before the PipelineRun fails, and the first retry
    # delay (doubled per attempt).
    max_attempts: int = Field(3, ge=1, le=100)
    retry_delay_s: float = Field(60, ge=0, le=86_400)
    # -- How often a running child (EMR job run, RayJob, SparkApplication) is polled.
    poll_interval_s: float = Field(30, gt=0, le=3_600)
    rayjob: RayJobTemplate = RayJobTemplate()
    spark_image: str = "streamrec/spark:0.1.0"
    spark_service_account: str = "streamrec-spark"


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by STREAMREC_CONFIG (or given explicitly); absent file = no values."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = yaml.safe_load(self.path.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {self.path} does not exist") from None
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())  # PyYAML's message spans lines; errors are one line
            raise SettingsError(f"config file {self.path} is not valid YAML: {detail}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise SettingsError(f"config file {self.path} must hold a mapping at the top level")
        return data


class Settings(BaseSettings):
    """The settings of one streamrec process."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    environment: Literal["local", "dev", "staging", "prod"] = "local"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    aws: AwsSettings = AwsSettings()
    regions: dict[str, RegionSettings] = Field(default_factory=dict)
    ingest: IngestSettings = IngestSettings()
    etl: EtlSettings = EtlSettings()
    spark: SparkSettings = SparkSettings()
    emr: EmrSettings = EmrSettings()
    train: TrainSettings = TrainSettings()
    gate: GateSettings = GateSettings()
    score: ScoreSettings = ScoreSettings()
    serve: ServeSettings = ServeSettings()
    sync: SyncSettings = SyncSettings()
    pipeline: PipelineSettings = PipelineSettings()

    @field_validator("regions")
    @classmethod
    def _region_names(cls, v: dict[str, RegionSettings]) -> dict[str, RegionSettings]:
        for name in v:
            if not _REGION_RE.match(name):
                raise ValueError(f"{name!r} is not an AWS region name (e.g. us-east-1)")
        return v

    @model_validator(mode="after")
    def _secret_salt_outside_local(self) -> "Settings":
        if self.environment != "local" and self.ingest.pii_salt == LOCAL_PII_SALT:
            raise ValueError("ingest.pii_salt: set a secret salt outside the local environment "
                             "(the public default would make hashed IP addresses reversible)")
        return self

    @model_validator(mode="after")
    def _ray_stages_fit_their_rayjob(self) -> "Settings":
        if self.environment != "local":  # locally the cluster is this machine, sized by the defaults
            problems = ray_stage_cpu_problems(self) + ray_stage_memory_problems(self)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def region(self, name: str) -> RegionSettings:
        try:
            return self.regions[name]
        except KeyError:
            known = ", ".join(sorted(self.regions)) or "none"
            raise SettingsError(f"regions.{name}: region is not configured (configured: {known})") from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls, _yaml_path.get())


def ray_stage_cpu_problems(settings: Settings) -> list[str]:
    """Why the training workers or scoring actors would not run in the RayJob cluster the controller
    creates (``pipeline.rayjob``); empty when they fit. Ray places each worker or actor whole on one
    pod, and a stage also needs :data:`RAY_DATA_TASK_CPUS` free on some pod for Ray Data's read and write
    tasks: short of either, Ray waits forever rather than failing, so the settings refuse it."""
    rayjob = settings.pipeline.rayjob
    pods, pod = rayjob.worker_replicas, cpu_quantity(rayjob.worker_cpu)
    where = f"pipeline.rayjob: {pods} worker pods x {rayjob.worker_cpu} CPUs"
    stages = (
        ("train.workers", settings.train.workers, "train.cpus_per_worker", settings.train.cpus_per_worker),
        ("score.concurrency", settings.score.concurrency, "score.cpus_per_actor",
         settings.score.cpus_per_actor),
    )
    problems = []
    for count_key, count, each_key, each in stages:
        asked = f"{count_key} x {each_key}: {count} x {each:g} CPUs"
        per_pod = math.floor(pod / each + 1e-9)
        if per_pod == 0:
            problems.append(f"{each_key}: {each:g} CPUs do not fit in one Ray worker pod ({where})")
        elif count > pods * per_pod:
            problems.append(f"{asked} do not fit in the RayJob's pods: they hold {pods * per_pod} ({where})")
        elif max(_free_cpus(pods, pod, per_pod, count, each)) < RAY_DATA_TASK_CPUS - 1e-9:
            problems.append(f"{asked} leave no pod of the RayJob ({where}) with {RAY_DATA_TASK_CPUS:g} CPU "
                            "for Ray Data's read and write tasks")
    gpus = pods * rayjob.worker_gpus
    if settings.train.use_gpu == "yes" and gpus < settings.train.workers:
        problems.append(f"train.use_gpu: yes needs a GPU per worker ({settings.train.workers}), the RayJob "
                        f"has {gpus} (pipeline.rayjob.worker_gpus)")
    return problems


def ray_stage_memory_problems(settings: Settings) -> list[str]:
    """Why training's materialized split would not fit the RayJob's object store; empty when it does.
    The store lives in each worker pod's ``/dev/shm`` (``pipeline.rayjob.shm_size``); a split that
    takes more than half of it in total would spill to disk every epoch or fail the run."""
    rayjob = settings.pipeline.rayjob
    store = rayjob.worker_replicas * memory_quantity(rayjob.shm_size)
    if settings.train.materialize_max_bytes > store // 2:
        return [f"train.materialize_max_bytes: {settings.train.materialize_max_bytes} bytes is more than "
                f"half the RayJob's object store (pipeline.rayjob: {rayjob.worker_replicas} worker pods x "
                f"{rayjob.shm_size} of /dev/shm = {store} bytes)"]
    return []


def _free_cpus(pods: int, pod: float, per_pod: int, count: int, each: float) -> list[float]:
    """Each pod's CPUs left when ``count`` units of ``each`` CPUs are packed ``per_pod`` to a pod (the
    packing that leaves the most on one pod)."""
    full, rest = divmod(count, per_pod)
    free = [pod - per_pod * each] * full + ([pod - rest * each] if rest else [])
    return free + [pod] * (pods - len(free))


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        key = ".".join(str(p) for p in err["loc"])
        parts.append(f"{key}: {msg}" if key else msg)
    return "; ".join(parts)


def _check_env_names(environ: Mapping[str, str]) -> None:
    """pydantic-settings ignores STREAMREC_* variables that match no field; a misspelt one must fail."""
    for name in environ:
        if not name.startswith("STREAMREC_") or name in NON_SETTING_ENV:
            continue
        parts = name[len("STREAMREC_"):].lower().split("__")
        field = Settings.model_fields.get(parts[0])
        if field is None:
            raise SettingsError(f"{name}: no such setting (top-level settings: {', '.join(Settings.model_fields)})")
        model = field.annotation
        if len(parts) > 1 and isinstance(model, type) and issubclass(model, BaseModel):
            if parts[1] not in model.model_fields:
                raise SettingsError(f"{name}: {parts[0]} has no setting {parts[1]!r} "
                                    f"(known: {', '.join(model.model_fields)})")


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings, failing with one message that names every wrong key.

    ``config`` wins over ``STREAMREC_CONFIG``; with neither, only the environment and defaults apply.
    """
    path = Path(config) if config else (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    _check_env_names(os.environ)
    token = _yaml_path.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        where = f" (config {path})" if path else ""
        raise SettingsError(f"invalid settings{where}: {_describe(exc)}") from None
    finally:
        _yaml_path.reset(token)
