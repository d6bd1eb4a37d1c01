"""Loading a region's day into its warehouse: PostgreSQL (local, tests) and Redshift (the Data API).

Entry points::

    load_day(settings, region, day, *, run_id, model_version, facts_only=False) -> WarehouseReport
    load_run_days(settings, region, days, *, run_id, model_version) -> list[WarehouseReport]
    record_run(settings, region, record: PipelineRunRecord) -> None

The executor is chosen by the scheme of ``settings.region(region).warehouse_dsn``:

- ``postgresql://...`` (or ``postgres://``): :class:`PostgresWarehouse`, psycopg 3. Each table is
  loaded in one transaction: temporary stage, ``COPY ... FROM STDIN`` fed from the Parquet files batch
  by batch, the deduplicated MERGE source, the stale-row delete, MERGE. A crash at any point rolls that
  table back; tables loaded before it stay loaded, later ones are untouched.
- ``redshift-data://<workgroup-or-cluster>/<database>?iam_role=<arn>[&type=cluster][&secret_arn=<arn>]
  [&db_user=<user>]``: :class:`RedshiftDataWarehouse`, the Redshift Data API. The same statements,
  with ``COPY ... FROM 's3://.../<table>.manifest' IAM_ROLE ... FORMAT AS PARQUET MANIFEST``, go out as
  one ``BatchExecuteStatement`` per table (one transaction; the batch's session holds the temporary
  tables) and are polled with ``DescribeStatement``. Only ``s3://`` lakes: Redshift reads the files
  itself. ``type`` is ``workgroup`` (Redshift Serverless, the default) or ``cluster``; without
  ``secret_arn`` the caller's IAM identity authenticates (``db_user`` for a provisioned cluster).

What a load reads (and refuses): a day's output only when its producer finished it, i.e. its
``_run_summary.json`` exists (``status: succeeded`` for the ETL), and only when the files hold as many
rows as the summary says; for recs only the files the scoring summary lists. Every file's schema is
checked against the table's contract first, so schema drift fails before anything is written, with the
file and the column named. See docs/warehouse.md for the tables and the idempotency argument.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.warehouse import sql
from operators.warehouse.tables import (
    CLICKSTREAM_FACT,
    DAILY_RECS,
    ITEM_DIM,
    PIPELINE_RUNS,
    USER_DIM,
    Dialect,
    Table,
)
from streamrec.lake import LakeLayout, filesystem
from streamrec.settings import Settings

SUMMARY_FILE = "_run_summary.json"  # written last by the ETL jobs and by scoring: the completion marker
MANIFEST_DIR = "_warehouse/manifests"  # under the lake root; readers of the lake skip "_" names
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
MODEL_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # ray_apps.registry.VERSION_RE
REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
PHASES = ("Pending", "Running", "Succeeded", "Failed")
GATE_REASON_MAX = 1024  # characters (4096 bytes of UTF-8 at most: the Redshift column)
JSON_MAX_BYTES = 65_535  # JSON_PARSE takes a VARCHAR


class WarehouseError(RuntimeError):
    """The warehouse load failed; the message is one line meant for an operator."""


class WarehouseInputError(WarehouseError):
    """A lake input is missing, incomplete or not what the table expects."""


class SchemaDriftError(WarehouseInputError):
    """A Parquet file's columns do not match the table's contract (the message names file and column)."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class PipelineRunRecord:
    """One PipelineRun as the warehouse records it (the ``pipeline_runs`` table).

    ``gate_promote``/``gate_reason`` are the evaluation gate's decision (None when the run did not
    train); ``metrics`` any JSON-able mapping (non-finite floats are stored as null); ``synced`` the
    counts the sync stage wrote, by target (the PipelineRun's ``status.synced``)."""

    run_id: str
    region: str
    dt: date
    phase: str
    model_version: str | None = None
    gate_promote: bool | None = None
    gate_reason: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    synced: Mapping[str, int] = field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_run_id(self.run_id)
        _check_region(self.region)
        if isinstance(self.dt, datetime) or not isinstance(self.dt, date):
            raise ValueError(f"dt must be a date, got {self.dt!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if self.model_version is not None:
            _check_model_version(self.model_version)
        for name in ("started_at", "finished_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
        if any(not isinstance(v, int) or isinstance(v, bool) for v in self.synced.values()):
            raise ValueError("synced must map target names to integer counts")

    def values(self) -> dict[str, Any]:
        """Column → value for every non-null column (JSON columns as JSON text, timestamps in UTC)."""
        reason = self.gate_reason
        if reason is not None and len(reason) > GATE_REASON_MAX:
            reason = reason[: GATE_REASON_MAX - 1] + "…"
        out: dict[str, Any] = {
            "run_id": self.run_id, "region": self.region, "dt": self.dt, "phase": self.phase,
            "model_version": self.model_version, "gate_promote": self.gate_promote,
            "gate_reason": reason or None,
            "metrics": _json_text("metrics", self.metrics), "synced": _json_text("synced", self.synced),
            "started_at": self.started_at.astimezone(UTC) if self.started_at else None,
            "finished_at": self.finished_at.astimezone(UTC) if self.finished_at else None,
            "load_run_id": self.run_id,
        }
        return {k: v for k, v in out.items() if v is not None}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_text(name: str, value: Mapping[str, Any]) -> str:
    try:
        text = json.dumps(_finite(dict(value)), sort_keys=True, allow_nan=False, default=str)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from None
    if len(text.encode()) > JSON_MAX_BYTES:
        raise ValueError(f"{name} is {len(text.encode())} bytes of JSON; at most {JSON_MAX_BYTES} fit")
    return text


@dataclass(frozen=True)
class TableLoad:
    """What loading one table did.

    ``source_rows``: rows in the lake files; ``staged``: rows COPY put in the stage; ``rows``: target
    rows of this load's slice after it (one per key: recs exploded, duplicates dropped); ``merged``:
    rows the MERGE inserted or updated; ``deleted``: rows of the slice the new input no longer has."""

    table: str
    files: int
    source_rows: int
    staged: int
    rows: int
    merged: int
    deleted: int


@dataclass(frozen=True)
class WarehouseReport:
    region: str
    dt: str
    run_id: str
    model_version: str | None
    backend: str
    tables: tuple[TableLoad, ...]
    seconds: float

    @property
    def rows(self) -> dict[str, int]:
        """Rows of this run's slice per table (what the PipelineRun reports as synced)."""
        return {t.table: t.rows for t in self.tables}

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "dt": self.dt, "run_id": self.run_id,
                "model_version": self.model_version, "backend": self.backend,
                "seconds": round(self.seconds, 3), "rows": self.rows,
                "tables": [asdict(t) for t in self.tables]}


# --------------------------------------------------------------------------- checks


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} must match {RUN_ID_RE.pattern}")
    return run_id


def _check_model_version(version: str) -> str:
    if not isinstance(version, str) or not MODEL_VERSION_RE.match(version):
        raise ValueError(f"model version {version!r} must match {MODEL_VERSION_RE.pattern}")
    return version


def _check_region(region: str) -> str:
    if not isinstance(region, str) or not REGION_RE.match(region):
        raise ValueError(f"{region!r} is not an AWS region name (e.g. us-east-1)")
    return region


def arrow_kind(dtype: pa.DataType) -> str:
    """A Parquet/Arrow column type in Spark's spelling (the kinds of :class:`SourceColumn`)."""
    if pa.types.is_dictionary(dtype):
        return arrow_kind(dtype.value_type)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_timestamp(dtype):
        return "timestamp"
    if pa.types.is_float64(dtype):
        return "double"
    if pa.types.is_float32(dtype):
        return "float"
    if pa.types.is_int32(dtype):
        return "int"
    if pa.types.is_int64(dtype):
        return "bigint"
    if pa.types.is_boolean(dtype):
        return "boolean"
    if pa.types.is_date32(dtype):
        return "date"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return f"array<{arrow_kind(dtype.value_type)}>"
    return str(dtype)


def schema_problems(table: Table, schema: pa.Schema, *, positional: bool) -> list[str]:
    """How a file's schema breaks the table's source contract, one readable line each.

    Missing columns and wrong types always count. ``positional`` (Redshift's COPY from Parquet maps
    columns by position) also refuses extra columns and a different column order."""
    have = {f.name: arrow_kind(f.type) for f in schema}
    problems = [f"missing column {c.name} ({c.kind})" for c in table.source_columns if c.name not in have]
    problems += [f"column {c.name} is {have[c.name]}, expected {c.kind}"
                 for c in table.source_columns if c.name in have and have[c.name] != c.kind]
    if positional and not problems:
        wanted = [c.name for c in table.source_columns]
        extra = [n for n in schema.names if n not in wanted]
        problems += [f"unexpected column {n} ({have[n]}): COPY from Parquet maps columns by position"
                     for n in extra]
        if not extra and list(schema.names) != wanted:
            problems.append(f"columns are in the order {', '.join(schema.names)}; COPY from Parquet maps "
                            f"columns by position and needs {', '.join(wanted)}")
    return problems


# --------------------------------------------------------------------------- lake inputs


@dataclass(frozen=True)
class LakeFile:
    path: str  # filesystem path (no scheme)
    size: int
    rows: int
    schema: pa.Schema


@dataclass(frozen=True)
class LakeInput:
    """One table's input for one day: the files to load and how many rows they must hold."""

    table: Table
    folder: str
    files: tuple[LakeFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            data = json.loads(stream.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise WarehouseInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WarehouseInputError(f"{path} does not hold a JSON object")
    return data


def _data_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
    return sorted(info.path for info in fs.get_file_info(selector)
                  if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                  and not info.base_name.startswith(("_", ".")))


def _inspect(fs: pafs.FileSystem, path: str) -> LakeFile:
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
            schema = meta.schema.to_arrow_schema()
    except FileNotFoundError:
        raise WarehouseInputError(f"{path} is listed by its run summary but does not exist") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise WarehouseInputError(f"{path} is not a readable Parquet file: {exc}") from None
    return LakeFile(path, int(info.size), int(meta.num_rows), schema)


class LakeReader:
    """Finds and checks the lake inputs of one region's day (pure reads; nothing is written)."""

    def __init__(self, layout: LakeLayout, fs: pafs.FileSystem, region: str):
        self.layout, self.fs, self.region = layout, fs, region

    def uri(self, path: str) -> str:
        return self.layout.to_uri(path)

    def _etl_output(self, table: Table, day: date, job_folder: str, sub: str | None, output: str,
                    job: str) -> LakeInput:
        summary_path = posixpath.join(job_folder, SUMMARY_FILE)
        summary = _read_json(self.fs, summary_path)
        if summary is None:
            raise WarehouseInputError(
                f"no completed {job} output for region {self.region} on {day.isoformat()}: "
                f"{self.uri(summary_path)} does not exist (run the ETL for that day first)")
        if summary.get("status") != "succeeded":
            raise WarehouseInputError(f"{self.uri(summary_path)} says the {job} run {summary.get('status')}")
        expected = (summary.get("outputs") or {}).get(output)
        folder = posixpath.join(job_folder, sub) if sub else job_folder
        files = tuple(_inspect(self.fs, p) for p in _data_files(self.fs, folder))
        found = LakeInput(table, folder, files)
        if expected is not None and found.rows != int(expected):
            raise WarehouseInputError(
                f"{self.uri(folder)} holds {found.rows} rows in {len(files)} files but its run summary says "
                f"{expected}: the output is incomplete or was rewritten since (rerun the ETL for that day)")
        return found

    def clean(self, day: date) -> LakeInput:
        folder = self.layout.partition("clean", self.region, day)
        return self._etl_output(CLICKSTREAM_FACT, day, folder, None, "clean", "clean_events")

    def items(self, day: date) -> LakeInput:
        folder = self.layout.partition("features", self.region, day)
        return self._etl_output(ITEM_DIM, day, folder, "items", "items", "build_features")

    def users(self, day: date) -> LakeInput:
        folder = self.layout.partition("features", self.region, day)
        return self._etl_output(USER_DIM, day, folder, "users", "users", "build_features")

    def recs(self, day: date, model_version: str) -> LakeInput:
        partition = self.layout.partition("recs", self.region, day)
        folder = posixpath.join(partition, f"model_version={model_version}")
        summary_path = posixpath.join(folder, SUMMARY_FILE)
        summary = _read_json(self.fs, summary_path)
        if summary is None:
            raise WarehouseInputError(
                f"no completed recommendations of model {model_version} for region {self.region} on "
                f"{day.isoformat()}: {self.uri(summary_path)} does not exist (run scoring first)")
        listed = summary.get("files")
        if not isinstance(listed, list) or not all(isinstance(f, dict) and "path" in f for f in listed):
            raise WarehouseInputError(f"{self.uri(summary_path)} lists no files")
        files = tuple(_inspect(self.fs, posixpath.join(folder, str(f["path"]))) for f in listed)
        for f, entry in zip(files, listed, strict=True):
            if "rows" in entry and f.rows != int(entry["rows"]):
                raise WarehouseInputError(f"{self.uri(f.path)} holds {f.rows} rows, its run summary says "
                                          f"{entry['rows']}: rerun scoring")
        found = LakeInput(DAILY_RECS, folder, files)
        users = summary.get("users")
        if users is not None and found.rows != int(users):
            raise WarehouseInputError(f"{self.uri(folder)} holds {found.rows} rows, its run summary says "
                                      f"{users} users: rerun scoring")
        return found

    def day_inputs(self, day: date, model_version: str | None) -> list[LakeInput]:
        inputs = [self.clean(day), self.items(day), self.users(day)]
        if model_version is not None:
            inputs.append(self.recs(day, model_version))
        return inputs

    def check_schemas(self, inputs: Iterable[LakeInput], *, positional: bool) -> None:
        """Every file against its table's contract; the first file with problems fails the load."""
        for inp in inputs:
            for f in inp.files:
                problems = schema_problems(inp.table, f.schema, positional=positional)
                if problems:
                    raise SchemaDriftError(f"{self.uri(f.path)} does not match the {inp.table.name} "
                                           f"contract: {'; '.join(problems)}")


# --------------------------------------------------------------------------- executors


class Warehouse:
    """What both executors share: input resolution and checks, the report."""

    dialect: Dialect
    backend: str
    positional_copy = False  # whether COPY maps Parquet columns by position (Redshift) or by name

    def __init__(self, settings: Settings, region: str):
        _check_region(region)
        self.settings = settings
        self.region = region
        self.layout = LakeLayout(settings.region(region).lake_uri)
        aws = settings.aws
        self.fs = filesystem(self.layout.uri, endpoint_url=aws.endpoint_url, region=region,
                             access_key=aws.access_key_id, secret_key=aws.secret_access_key)
        self.reader = LakeReader(self.layout, self.fs, region)

    def load_day(self, day: date, *, run_id: str, model_version: str | None,
                 facts_only: bool = False) -> WarehouseReport:
        """Load the region's clean events, item and user snapshots and (when ``model_version`` is given)
        that version's recs of ``day``, each table in its own transaction, in that order. ``facts_only``:
        the clean events alone (an earlier day of a backfill, cleaned by the run but whose snapshots
        and recs are not built by it)."""
        started = time.perf_counter()
        _check_run_id(run_id)
        if model_version is not None:
            _check_model_version(model_version)
        try:
            inputs = [self.reader.clean(day)] if facts_only else self.reader.day_inputs(day, model_version)
            self.reader.check_schemas(inputs, positional=self.positional_copy)
        except (ValueError, OSError) as exc:
            raise WarehouseInputError(
                f"reading the lake for {self.region} on {day.isoformat()}: {exc}") from None
        params = {"run_id": run_id, "region": self.region, "dt": day.isoformat()}
        if model_version is not None:
            params["model_version"] = model_version
        loads = self._load(inputs, params)
        return WarehouseReport(self.region, day.isoformat(), run_id, model_version, self.backend,
                               tuple(loads), time.perf_counter() - started)

    def record_run(self, record: PipelineRunRecord) -> None:
        if record.region != self.region:
            raise ValueError(f"record is for region {record.region}, this warehouse is {self.region}'s")
        self._record(record)

    def _load(self, inputs: Sequence[LakeInput], params: Mapping[str, str]) -> list[TableLoad]:
        raise NotImplementedError

    def _record(self, record: PipelineRunRecord) -> None:
        raise NotImplementedError


def _table_params(table: Table, params: Mapping[str, str]) -> dict[str, str]:
    return {p: params[p] for p in table.load_params}


# ----------------------------------------------------------------- PostgreSQL


class PostgresWarehouse(Warehouse):
    """PostgreSQL 15 through psycopg 3 (the local stand-in for Redshift, same staging + MERGE SQL)."""

    dialect: Dialect = "postgres"
    backend = "postgres"
    batch_rows = 20_000  # Parquet rows per read while streaming a file into COPY

    def __init__(self, settings: Settings, region: str, dsn: str):
        super().__init__(settings, region)
        self.dsn = dsn

    def _connect(self) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            detail = " ".join(str(exc).split())
            raise WarehouseError(f"cannot connect to the {self.region} warehouse: {detail}") from None
        conn.execute("SET TIME ZONE 'UTC'")  # naive Parquet timestamps are UTC
        return conn

    def ensure_tables(self, conn: Any, tables: Sequence[Table]) -> None:
        """Create missing tables (IF NOT EXISTS); an existing table with other columns fails the load
        (there are no migrations: alter or drop it, see docs/warehouse.md)."""
        with conn.transaction():
            for statement in sql.create_statements(tables, self.dialect):
                conn.execute(statement)
        for t in tables:
            rows = conn.execute(sql.columns_query_sql(self.dialect), {"table": t.name}).fetchall()
            have = [r[0] for r in rows]
            if have != list(t.column_names):
                missing = [c for c in t.column_names if c not in have]
                extra = [c for c in have if c not in t.column_names]
                detail = "; ".join(p for p in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                    "columns in another order" if not missing and not extra else "") if p)
                raise WarehouseError(f"warehouse table {t.name} exists with other columns ({detail}): "
                                     "migrate or drop it (see docs/warehouse.md)")

    def _load(self, inputs: Sequence[LakeInput], params: Mapping[str, str]) -> list[TableLoad]:
        import psycopg

        loads = []
        try:
            with self._connect() as conn:
                self.ensure_tables(conn, [inp.table for inp in inputs])
                for inp in inputs:
                    loads.append(self._load_table(conn, inp, _table_params(inp.table, params)))
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split())
            raise WarehouseError(f"loading the {self.region} warehouse failed: {detail}") from None
        except (pa.ArrowException, OSError) as exc:  # a file that went bad between the check and the read
            raise WarehouseInputError(f"reading the lake for the {self.region} warehouse failed: {exc}") from None
        return loads

    def _load_table(self, conn: Any, inp: LakeInput, params: Mapping[str, str]) -> TableLoad:
        counts: dict[str, int] = {}
        steps = sql.load_statements(inp.table, self.dialect, sql.copy_from_stdin_sql(inp.table))
        with conn.transaction(), conn.cursor() as cur:
            for step, statement in steps:
                if step == sql.STEP_COPY:
                    counts[step] = self._copy(cur, inp, statement)
                    continue
                used = {n: params[n] for n in sql.referenced_params(statement, self.dialect)}
                cur.execute(statement, used or None)
                counts[step] = cur.rowcount
        return TableLoad(inp.table.name, len(inp.files), inp.rows, counts[sql.STEP_COPY],
                         counts[sql.STEP_FILL_LOAD], counts[sql.STEP_MERGE],
                         counts.get(sql.STEP_DELETE_STALE, 0))

    def _copy(self, cur: Any, inp: LakeInput, statement: str) -> int:
        """Stream the input's Parquet files into the stage; returns the rows written."""
        columns = [c.name for c in inp.table.source_columns]
        written = 0
        with cur.copy(statement) as copy:
            for f in inp.files:
                for row in self._rows(f, inp.table, columns):
                    copy.write_row(row)
                    written += 1
        return written

    def _rows(self, f: LakeFile, table: Table, columns: list[str]) -> Iterator[tuple[Any, ...]]:
        from psycopg.types.json import Jsonb

        kinds = {c.name: c for c in table.source_columns}
        with self.fs.open_input_file(f.path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=self.batch_rows, columns=columns):
                values = []
                for name in columns:
                    array = batch.column(batch.schema.get_field_index(name))
                    if pa.types.is_dictionary(array.type):
                        array = array.dictionary_decode()
                    if pa.types.is_timestamp(array.type) and array.type.unit == "ns":
                        array = array.cast(pa.timestamp("us", tz=array.type.tz), safe=False)
                    pylist = array.to_pylist()
                    if kinds[name].is_list:
                        pylist = [None if v is None else Jsonb(v) for v in pylist]
                    values.append(pylist)
                yield from zip(*values, strict=True)

    def _record(self, record: PipelineRunRecord) -> None:
        import psycopg

        values = record.values()
        values["dt"] = record.dt.isoformat()
        try:
            with self._connect() as conn:
                self.ensure_tables(conn, [PIPELINE_RUNS])
                with conn.transaction():
                    for statement in sql.record_run_statements(values, self.dialect):
                        used = {n: values[n] for n in sql.referenced_params(statement, self.dialect)}
                        conn.execute(statement, used or None)
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split())
            raise WarehouseError(f"recording run {record.run_id} in the {self.region} warehouse failed: "
                                 f"{detail}") from None


# ----------------------------------------------------------------- Redshift (Data API)

_DSN_KEYS = {"iam_role", "type", "secret_arn", "db_user"}


@dataclass(frozen=True)
class RedshiftTarget:
    """Where Redshift Data API statements go, parsed from a ``redshift-data://`` DSN (see the module
    docstring)."""

    name: str
    database: str
    iam_role: str
    kind: str = "workgroup"
    secret_arn: str | None = None
    db_user: str | None = None

    @classmethod
    def from_dsn(cls, dsn: str) -> RedshiftTarget:
        parsed = urlparse(dsn)
        if parsed.scheme != "redshift-data":
            raise ValueError(f"not a redshift-data:// DSN: {dsn!r}")
        name, database = parsed.hostname or "", unquote(parsed.path.lstrip("/"))
        if not name or not database or "/" in database:
            raise ValueError("a Redshift DSN is redshift-data://<workgroup-or-cluster>/<database>?iam_role=<arn>"
                             f", got {dsn!r}")
        query = parse_qs(parsed.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - _DSN_KEYS)
        if unknown:
            raise ValueError(f"unknown Redshift DSN option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(_DSN_KEYS))})")
        opts = {k: v[-1] for k, v in query.items()}
        if not opts.get("iam_role"):
            raise ValueError("a Redshift DSN needs iam_role=<arn of the role COPY reads S3 with>")
        kind = opts.get("type", "workgroup")
        if kind not in ("workgroup", "cluster"):
            raise ValueError(f"Redshift DSN type must be workgroup or cluster, got {kind!r}")
        return cls(name, database, opts["iam_role"], kind, opts.get("secret_arn") or None,
                   opts.get("db_user") or None)

    def request(self) -> dict[str, str]:
        """The connection fields of every Data API request."""
        out = {"Database": self.database}
        out["WorkgroupName" if self.kind == "workgroup" else "ClusterIdentifier"] = self.name
        if self.secret_arn:
            out["SecretArn"] = self.secret_arn
        if self.db_user:
            out["DbUser"] = self.db_user
        return out


class RedshiftDataWarehouse(Warehouse):
    """Redshift through the Data API: one BatchExecuteStatement (one transaction) per table."""

    dialect: Dialect = "redshift"
    backend = "redshift"
    positional_copy = True
    poll_first_s = 0.5
    poll_max_s = 5.0
    timeout_s = 3_600.0

    def __init__(self, settings: Settings, region: str, target: RedshiftTarget, client: Any | None = None, *,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(settings, region)
        if self.layout.scheme != "s3":
            raise WarehouseError(f"region {region}'s warehouse is Redshift, which COPYs from S3, but its "
                                 f"lake is {self.layout.uri}: use an s3:// lake (or a postgresql:// "
                                 "warehouse)")
        self.target = target
        if client is None:
            from streamrec.aws import client as aws_client

            client = aws_client("redshift-data", region, settings.aws)
        self.client = client
        self.sleep = sleep

    # -- the Data API

    def run_batch(self, statements: Sequence[str], *, name: str,
                  parameters: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Run ``statements`` as one transaction and wait; returns the sub-statements' descriptions."""
        request: dict[str, Any] = {**self.target.request(), "Sqls": list(statements), "StatementName": name}
        if parameters:
            request["Parameters"] = [{"name": k, "value": v} for k, v in parameters.items()]
        statement_id = self._call("batch_execute_statement", name, **request)["Id"]
        waited, delay = 0.0, self.poll_first_s
        while True:
            desc = self._call("describe_statement", name, Id=statement_id)
            status = desc.get("Status")
            if status == "FINISHED":
                return list(desc.get("SubStatements") or [])
            if status in ("FAILED", "ABORTED"):
                failed = [s for s in desc.get("SubStatements") or []
                          if s.get("Status") in ("FAILED", "ABORTED")]
                where = ""
                if failed:
                    text = " ".join(str(failed[0].get("QueryString", "")).split())
                    where = f" at: {text[:200]}"
                error = " ".join(str(desc.get("Error") or status).split())
                raise WarehouseError(
                    f"Redshift statement {name} ({statement_id}) {status.lower()}: {error}{where}")
            if waited >= self.timeout_s:
                raise WarehouseError(f"Redshift statement {name} ({statement_id}) still {status} after "
                                     f"{waited:.0f} s; it may still complete (cancel it with "
                                     f"`aws redshift-data cancel-statement --id {statement_id}`)")
            self.sleep(delay)
            waited += delay
            delay = min(delay * 2, self.poll_max_s)

    def _call(self, operation: str, name: str, **request: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(getattr(self.client, operation)(**request))
        except (BotoCoreError, ClientError) as exc:
            detail = " ".join(str(exc).split())
            raise WarehouseError(f"Redshift Data API {operation} for {name} failed: {detail}") from None

    # -- loads

    def manifest_path(self, inp: LakeInput, params: Mapping[str, str]) -> str:
        return posixpath.join(self.layout.base, MANIFEST_DIR, f"region={params['region']}",
                              f"dt={params['dt']}", params["run_id"], f"{inp.table.name}.manifest")

    def write_manifest(self, inp: LakeInput, params: Mapping[str, str]) -> str:
        """A COPY manifest naming exactly the input's files (Parquet needs each file's length); returns
        its s3:// URI. Rewritten by a rerun of the same run."""
        entries = [{"url": self.layout.to_uri(f.path), "mandatory": True, "meta": {"content_length": f.size}}
                   for f in inp.files]
        path = self.manifest_path(inp, params)
        with self.fs.open_output_stream(path) as out:
            out.write(json.dumps({"entries": entries}, indent=1).encode())
        return self.layout.to_uri(path)

    def table_statements(self, inp: LakeInput, params: Mapping[str, str],
                         manifest_uri: str) -> list[tuple[str, str]]:
        """The batch for one table: the builders' statements with the load's values inlined (see
        :func:`operators.warehouse.sql.bind_literals`)."""
        copy = sql.copy_from_s3_sql(inp.table, manifest_uri, self.target.iam_role, manifest=True)
        steps = sql.load_statements(inp.table, self.dialect, copy)
        return [(step, statement if step == sql.STEP_COPY
                 else sql.bind_literals(statement, params, self.dialect)) for step, statement in steps]

    def _load(self, inputs: Sequence[LakeInput], params: Mapping[str, str]) -> list[TableLoad]:
        self.run_batch(sql.create_statements([inp.table for inp in inputs], self.dialect),
                       name=f"streamrec-warehouse-tables-{params['run_id']}")
        loads = []
        for inp in inputs:
            table_params = _table_params(inp.table, params)
            if not inp.files:
                raise WarehouseInputError(f"{self.layout.to_uri(inp.folder)} holds no Parquet files: "
                                          "Redshift cannot COPY an empty manifest")
            manifest = self.write_manifest(inp, params)
            steps = self.table_statements(inp, table_params, manifest)
            subs = self.run_batch([s for _, s in steps],
                                  name=f"streamrec-warehouse-{inp.table.name}-{params['run_id']}")
            counts = {step: int(subs[i].get("ResultRows", -1)) if i < len(subs) else -1
                      for i, (step, _) in enumerate(steps)}
            loads.append(TableLoad(inp.table.name, len(inp.files), inp.rows, counts[sql.STEP_COPY],
                                   counts[sql.STEP_FILL_LOAD], counts[sql.STEP_MERGE],
                                   max(counts.get(sql.STEP_DELETE_STALE, 0), 0)))
        return loads

    def _record(self, record: PipelineRunRecord) -> None:
        values = record.values()
        params: dict[str, str] = {}
        for name, value in values.items():
            if isinstance(value, bool):
                params[name] = "true" if value else "false"
            elif isinstance(value, datetime):
                params[name] = value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
            elif isinstance(value, date):
                params[name] = value.isoformat()
            else:
                params[name] = str(value)
        statements = sql.create_statements([PIPELINE_RUNS], self.dialect) + sql.record_run_statements(
            params, self.dialect)
        self.run_batch(statements, name=f"streamrec-warehouse-run-{record.run_id}", parameters=params)


# --------------------------------------------------------------------------- entry points


def open_warehouse(settings: Settings, region: str, *, redshift_client: Any | None = None) -> Warehouse:
    """The executor for the region's ``warehouse_dsn`` (by scheme; see the module docstring)."""
    dsn = settings.region(region).warehouse_dsn
    scheme = urlparse(dsn).scheme
    if scheme in ("postgresql", "postgres"):
        return PostgresWarehouse(settings, region, dsn)
    if scheme == "redshift-data":
        try:
            target = RedshiftTarget.from_dsn(dsn)
        except ValueError as exc:
            raise WarehouseError(f"regions.{region}.warehouse_dsn: {exc}") from None
        return RedshiftDataWarehouse(settings, region, target, redshift_client)
    raise WarehouseError(f"regions.{region}.warehouse_dsn: unsupported scheme {scheme or '(none)'!r} "
                         "(postgresql:// or redshift-data://)")


def load_day(settings: Settings, region: str, day: date, *, run_id: str,
             model_version: str | None, facts_only: bool = False) -> WarehouseReport:
    """Load ``region``'s ``day`` into its warehouse (clean events, item and user snapshots, and the recs of
    ``model_version`` when given; only the clean events with ``facts_only``); idempotent per run: a
    rerun leaves the same rows."""
    try:
        return open_warehouse(settings, region).load_day(day, run_id=run_id, model_version=model_version,
                                                         facts_only=facts_only)
    except ValueError as exc:
        raise WarehouseError(str(exc)) from None


def load_run_days(settings: Settings, region: str, days: Sequence[date], *, run_id: str,
                  model_version: str | None) -> list[WarehouseReport]:
    """A run's loads over one opened warehouse: the clean events of each earlier day of ``days`` (a
    backfill's ETL cleaned them all), then everything of the last day, the run's own."""
    try:
        warehouse = open_warehouse(settings, region)
        *earlier, last = days
        reports = [warehouse.load_day(day, run_id=run_id, model_version=None, facts_only=True) for day in earlier]
        reports.append(warehouse.load_day(last, run_id=run_id, model_version=model_version))
        return reports
    except ValueError as exc:
        raise WarehouseError(str(exc)) from None


def record_run(settings: Settings, region: str, record: PipelineRunRecord) -> None:
    """Upsert one pipeline run into ``pipeline_runs`` (MERGE on run_id: recording it again updates it)."""
    open_warehouse(settings, region).record_run(record)


__all__ = [
    "LakeInput", "LakeReader", "PipelineRunRecord", "PostgresWarehouse", "RedshiftDataWarehouse",
    "RedshiftTarget", "SchemaDriftError", "TableLoad", "Warehouse", "WarehouseError", "WarehouseInputError",
    "WarehouseReport", "arrow_kind", "load_day", "load_run_days", "open_warehouse", "record_run",
    "schema_problems",
]
