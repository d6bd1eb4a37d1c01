"""The warehouse tables: columns and types in both dialects, MERGE keys, lake sources, Redshift layout.

One :class:`Table` describes a target table completely; :mod:`operators.warehouse.sql` turns it into
SQL text and :mod:`operators.warehouse.load` feeds it. Every region's warehouse is its own database
(``settings.region(R).warehouse_dsn``), so table names carry no region; rows still keep a ``region``
column, and the keys include it, so a database shared by several regions (the local dev stack can be
configured that way) stays correct.

How a lake-loaded table is filled (see docs/warehouse.md):

1. ``stage_<table>``: a temporary table with exactly the Parquet files' columns, in file order (Redshift's
   COPY from Parquet maps columns by position), filled by COPY;
2. ``load_<table>``: a temporary table shaped like the target (``LIKE``), filled from the stage with the
   load's constants (region, dt, run id, model version), list columns exploded, one row per key;
3. rows of the load's slice (:attr:`Table.scope`, e.g. this region and day) that the new source no longer
   has are deleted, then ``MERGE`` updates matched keys and inserts the rest.

A column type is written once per dialect: PostgreSQL (the local stand-in) and Redshift. Lists (Parquet
``list<...>``) are ``jsonb`` in PostgreSQL and ``SUPER`` in Redshift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Dialect = Literal["postgres", "redshift"]
DIALECTS: tuple[Dialect, ...] = ("postgres", "redshift")

STAGE_PREFIX = "stage_"
LOAD_PREFIX = "load_"

# Load parameters a table can take a column from (the keys of :attr:`Table.params` values).
LOAD_PARAMS = ("run_id", "region", "dt", "model_version")

# Column kinds of the lake's Parquet files, in Spark's spelling (spark_etl.schemas.describe).
LIST_KINDS = ("array<string>", "array<float>", "array<double>")
SCALAR_KINDS = ("string", "timestamp", "double", "float", "int", "bigint", "boolean", "date")


@dataclass(frozen=True)
class Column:
    """A target column: its name, PostgreSQL type and Redshift type."""

    name: str
    pg_type: str
    redshift_type: str
    nullable: bool = True

    def type_for(self, dialect: Dialect) -> str:
        if dialect == "postgres":
            return self.pg_type
        if dialect == "redshift":
            return self.redshift_type
        raise ValueError(f"unknown SQL dialect {dialect!r} (known: {', '.join(DIALECTS)})")


@dataclass(frozen=True)
class SourceColumn:
    """A column of the lake's Parquet files: name and kind (Spark's spelling)."""

    name: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SCALAR_KINDS + LIST_KINDS:
            raise ValueError(f"source column {self.name}: unknown kind {self.kind!r}")

    @property
    def is_list(self) -> bool:
        return self.kind in LIST_KINDS


@dataclass(frozen=True)
class Explode:
    """Turn parallel list columns of one source row into one target row per position.

    ``arrays[i]``'s elements become target column ``elements[i]``; the 1-based position goes to
    ``position``. The lists of one row must have the same length (scoring writes them so)."""

    arrays: tuple[str, ...]
    elements: tuple[str, ...]
    position: str

    def __post_init__(self) -> None:
        if not self.arrays or len(self.arrays) != len(self.elements):
            raise ValueError("explode needs one element column per array column")


@dataclass(frozen=True)
class Table:
    """One warehouse table.

    - ``columns``: the target's columns, in order;
    - ``key``: the natural key (the MERGE condition; PRIMARY KEY: enforced by PostgreSQL, a planner
      hint in Redshift);
    - ``source``: where the rows come from (for documentation and errors);
    - ``source_columns``: the lake files' columns in file order (empty: not loaded from the lake);
    - ``scope``: columns that one load fixes (e.g. region and dt): the load replaces that slice, so rows
      of the slice that the new source lacks are deleted;
    - ``params``: target column → load parameter it is set from (``run_id``, ``region``, ``dt``,
      ``model_version``);
    - ``explode``: list columns unnested into one row per position (recs);
    - ``dedupe_order``: which duplicate of a key the load keeps (ORDER BY items, first kept);
    - ``distkey`` / ``sortkey``: the Redshift layout.
    """

    name: str
    description: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    source: str
    source_columns: tuple[SourceColumn, ...] = ()
    scope: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    explode: Explode | None = None
    dedupe_order: tuple[tuple[str, Literal["ASC", "DESC"]], ...] = ()
    distkey: str | None = None
    sortkey: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = self.column_names
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate column names")
        for group, cols in (("key", self.key), ("scope", self.scope), ("sortkey", self.sortkey),
                            ("dedupe_order", tuple(c for c, _ in self.dedupe_order)),
                            ("params", tuple(self.params)),
                            ("distkey", (self.distkey,) if self.distkey else ())):
            unknown = [c for c in cols if c not in names]
            if unknown:
                raise ValueError(f"{self.name}: {group} names unknown column(s) {', '.join(unknown)}")
        if not self.key:
            raise ValueError(f"{self.name}: a table needs a key")
        bad = [p for p in self.params.values() if p not in LOAD_PARAMS]
        if bad:
            raise ValueError(f"{self.name}: unknown load parameter(s) {', '.join(bad)}")
        not_null = {c.name for c in self.columns if not c.nullable}
        if missing := [c for c in self.key if c not in not_null]:
            raise ValueError(f"{self.name}: key column(s) {', '.join(missing)} must be NOT NULL")
        if self.source_columns:
            for col in self.columns:
                self.origin(col.name)  # every target column has exactly one origin
            if self.explode:
                source = {c.name for c in self.source_columns}
                if unknown := [a for a in self.explode.arrays if a not in source]:
                    raise ValueError(f"{self.name}: explode names unknown source column(s) "
                                     f"{', '.join(unknown)}")

    # -- derived views

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"{self.name} has no column {name!r}")

    @property
    def value_columns(self) -> tuple[str, ...]:
        """Columns a MERGE updates on a match (everything but the key)."""
        return tuple(c for c in self.column_names if c not in self.key)

    @property
    def stage_name(self) -> str:
        return STAGE_PREFIX + self.name

    @property
    def load_name(self) -> str:
        return LOAD_PREFIX + self.name

    @property
    def from_lake(self) -> bool:
        return bool(self.source_columns)

    @property
    def load_params(self) -> tuple[str, ...]:
        """The load parameters this table's statements reference, in :data:`LOAD_PARAMS` order."""
        used = set(self.params.values())
        return tuple(p for p in LOAD_PARAMS if p in used)

    def origin(self, column: str) -> tuple[Literal["param", "element", "position", "source"], str]:
        """Where a target column's value comes from: ``("param", name)``, ``("element", array)``,
        ``("position", "")`` or ``("source", source column)``."""
        if column in self.params:
            return "param", self.params[column]
        if self.explode is not None:
            if column in self.explode.elements:
                return "element", self.explode.arrays[self.explode.elements.index(column)]
            if column == self.explode.position:
                return "position", ""
        if any(src.name == column for src in self.source_columns):
            return "source", column
        raise ValueError(f"{self.name}.{column}: not a load parameter, an exploded value or a source column")

    def staging_columns(self) -> tuple[Column, ...]:
        """The stage's columns: the lake files' columns in file order. A list column is ``jsonb`` /
        ``SUPER``; any other takes the type of the target column of the same name."""
        out = []
        for src in self.source_columns:
            if src.is_list:
                out.append(Column(src.name, "jsonb", "SUPER"))
                continue
            try:
                target = self.column(src.name)
            except KeyError:
                raise ValueError(f"{self.name}: source column {src.name} has no target column to take "
                                 "its type from") from None
            out.append(Column(src.name, target.pg_type, target.redshift_type))
        return tuple(out)


# --------------------------------------------------------------------------- column helpers


def _c(name: str, pg: str, rs: str, nullable: bool = True) -> Column:
    return Column(name, pg, rs, nullable)


def _text(name: str, length: int, nullable: bool = True) -> Column:
    # Redshift VARCHAR lengths are bytes: sized for the longest value the producers allow, in UTF-8.
    return Column(name, "text", f"VARCHAR({length})", nullable)


def _ts(name: str, nullable: bool = True) -> Column:
    # Redshift's COPY maps Parquet timestamps to TIMESTAMP (no zone); every timestamp here is UTC.
    return Column(name, "timestamptz", "TIMESTAMP", nullable)


def _dbl(name: str, nullable: bool = True) -> Column:
    return Column(name, "double precision", "DOUBLE PRECISION", nullable)


def _int(name: str, nullable: bool = True) -> Column:
    return Column(name, "integer", "INTEGER", nullable)


def _big(name: str, nullable: bool = True) -> Column:
    return Column(name, "bigint", "BIGINT", nullable)


def _json(name: str, nullable: bool = True) -> Column:
    return Column(name, "jsonb", "SUPER", nullable)


def _src(*pairs: tuple[str, str]) -> tuple[SourceColumn, ...]:
    return tuple(SourceColumn(name, kind) for name, kind in pairs)


ID = 128  # streamrec.events.ID_PATTERN: at most 128 ASCII characters
REGION = _text("region", 32, nullable=False)
DT = Column("dt", "date", "DATE", nullable=False)
LOAD_RUN_ID = _text("load_run_id", 256, nullable=False)
RUN_PARAMS = {"region": "region", "dt": "dt", "load_run_id": "run_id"}

# --------------------------------------------------------------------------- the tables

CLICKSTREAM_FACT = Table(
    name="clickstream_fact",
    description="One row per clean event (clean_events output): distinct human events of the day, "
                "sessionized, bots removed.",
    columns=(
        _text("event_id", 64, nullable=False),
        _text("user_id", ID, nullable=False),
        _text("item_id", ID, nullable=False),
        _text("event_type", 32, nullable=False),
        _dbl("event_weight", nullable=False),
        _ts("ts", nullable=False),
        _text("category", 512),
        _dbl("price"),
        _text("device", 32),
        _text("page", 2048),
        _text("referrer", 2048),
        _text("client_region", 32, nullable=False),
        _text("client_session_id", ID, nullable=False),
        _text("session_id", 256, nullable=False),
        _int("session_position", nullable=False),
        _ts("received_at", nullable=False),
        REGION, DT, LOAD_RUN_ID,
    ),
    key=("event_id",),
    source="clean/region=R/dt=D/*.parquet (spark_etl.schemas.CLEAN)",
    source_columns=_src(
        ("event_id", "string"), ("user_id", "string"), ("item_id", "string"), ("event_type", "string"),
        ("event_weight", "double"), ("ts", "timestamp"), ("category", "string"), ("price", "double"),
        ("device", "string"), ("page", "string"), ("referrer", "string"), ("client_region", "string"),
        ("client_session_id", "string"), ("session_id", "string"), ("session_position", "int"),
        ("received_at", "timestamp"),
    ),
    scope=("region", "dt"),
    params=RUN_PARAMS,
    dedupe_order=(("received_at", "DESC"), ("ts", "DESC")),
    distkey="user_id",
    sortkey=("dt", "ts"),
)

ITEM_DIM = Table(
    name="item_dim",
    description="Daily snapshot of the item catalogue as seen in the 30 days up to dt "
                "(build_features items).",
    columns=(
        REGION, DT,
        _text("item_id", ID, nullable=False),
        _text("category", 512),
        _ts("first_seen", nullable=False),
        _ts("last_seen", nullable=False),
        _dbl("pop_1d", nullable=False),
        _dbl("pop_7d", nullable=False),
        _dbl("pop_30d", nullable=False),
        _big("events_30d", nullable=False),
        _int("popularity_rank", nullable=False),
        LOAD_RUN_ID,
    ),
    key=("region", "dt", "item_id"),
    source="features/region=R/dt=D/items/*.parquet (spark_etl.schemas.ITEMS)",
    source_columns=_src(
        ("item_id", "string"), ("category", "string"), ("first_seen", "timestamp"),
        ("last_seen", "timestamp"),
        ("pop_1d", "double"), ("pop_7d", "double"), ("pop_30d", "double"), ("events_30d", "bigint"),
        ("popularity_rank", "int"),
    ),
    scope=("region", "dt"),
    params=RUN_PARAMS,
    dedupe_order=(("last_seen", "DESC"),),
    distkey="item_id",
    sortkey=("dt", "item_id"),
)

USER_DIM = Table(
    name="user_dim",
    description="Daily snapshot of every user active in the 30 days up to dt (build_features users).",
    columns=(
        REGION, DT,
        _text("user_id", ID, nullable=False),
        _json("last_items"),
        _json("purchased_items"),
        _big("n_view", nullable=False),
        _big("n_click", nullable=False),
        _big("n_add_to_cart", nullable=False),
        _big("n_purchase", nullable=False),
        _ts("first_seen", nullable=False),
        _ts("last_seen", nullable=False),
        _text("device", 32),
        LOAD_RUN_ID,
    ),
    key=("region", "dt", "user_id"),
    source="features/region=R/dt=D/users/*.parquet (spark_etl.schemas.USERS)",
    source_columns=_src(
        ("user_id", "string"), ("last_items", "array<string>"), ("purchased_items", "array<string>"),
        ("n_view", "bigint"), ("n_click", "bigint"), ("n_add_to_cart", "bigint"), ("n_purchase", "bigint"),
        ("first_seen", "timestamp"), ("last_seen", "timestamp"), ("device", "string"),
    ),
    scope=("region", "dt"),
    params=RUN_PARAMS,
    dedupe_order=(("last_seen", "DESC"),),
    distkey="user_id",
    sortkey=("dt", "user_id"),
)

DAILY_RECS = Table(
    name="daily_recs",
    description="The day's batch recommendations of one model version, one row per (user, rank) "
                "(ray_apps.score RECS_SCHEMA, exploded).",
    columns=(
        REGION, DT,
        _text("user_id", ID, nullable=False),
        _text("model_version", ID, nullable=False),
        _int("rank", nullable=False),
        _text("item_id", ID, nullable=False),
        Column("score", "real", "REAL"),
        _text("source", 16, nullable=False),
        _ts("generated_at", nullable=False),
        LOAD_RUN_ID,
    ),
    key=("region", "dt", "user_id", "model_version", "rank"),
    source="recs/region=R/dt=D/model_version=V/ (the files its _run_summary.json lists; "
           "ray_apps.score.RECS_SCHEMA)",
    source_columns=_src(
        ("user_id", "string"), ("item_ids", "array<string>"), ("scores", "array<float>"),
        ("source", "string"),
        ("model_version", "string"), ("generated_at", "timestamp"),
    ),
    scope=("region", "dt", "model_version"),
    params={**RUN_PARAMS, "model_version": "model_version"},
    explode=Explode(arrays=("item_ids", "scores"), elements=("item_id", "score"), position="rank"),
    dedupe_order=(("generated_at", "DESC"),),
    distkey="user_id",
    sortkey=("dt", "model_version", "user_id"),
)

PIPELINE_RUNS = Table(
    name="pipeline_runs",
    description="One row per PipelineRun: its day, phase, model version, gate decision, metrics and "
                "the counts the sync wrote (recorded by record_run, not loaded from the lake).",
    columns=(
        _text("run_id", 256, nullable=False),
        REGION, DT,
        _text("phase", 16, nullable=False),
        _text("model_version", ID),
        Column("gate_promote", "boolean", "BOOLEAN"),
        _text("gate_reason", 4096),
        _json("metrics"),
        _json("synced"),
        _ts("started_at"),
        _ts("finished_at"),
        LOAD_RUN_ID,
    ),
    key=("run_id",),
    source="PipelineRunRecord (operators.warehouse.load.record_run)",
    distkey=None,  # a few rows a day: DISTSTYLE AUTO
    sortkey=("dt",),
)

LAKE_TABLES: tuple[Table, ...] = (CLICKSTREAM_FACT, ITEM_DIM, USER_DIM, DAILY_RECS)
TABLES: tuple[Table, ...] = LAKE_TABLES + (PIPELINE_RUNS,)
TABLES_BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}


def table(name: str) -> Table:
    try:
        return TABLES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no warehouse table {name!r} (tables: {', '.join(TABLES_BY_NAME)})") from None


__all__ = [
    "CLICKSTREAM_FACT", "DAILY_RECS", "DIALECTS", "ITEM_DIM", "LAKE_TABLES", "PIPELINE_RUNS", "TABLES",
    "TABLES_BY_NAME", "USER_DIM", "Column", "Dialect", "Explode", "SourceColumn", "Table", "table",
]
