"""SQL text for the warehouse: pure functions of a :class:`~operators.warehouse.tables.Table` and a dialect.

Nothing here touches a database; :mod:`operators.warehouse.load` runs what these build. Two dialects:
``postgres`` (PostgreSQL 15, the local stand-in) and ``redshift``. What differs between them:

- types (:class:`~operators.warehouse.tables.Column` holds both) and Redshift's DISTKEY/SORTKEY;
- temporary tables: PostgreSQL drops them at COMMIT (``ON COMMIT DROP``); a Redshift Data API batch
  runs in a session of its own, which ends with the batch;
- COPY: ``FROM STDIN`` (the loader streams the Parquet rows) versus ``FROM 's3://...' FORMAT AS PARQUET``;
- exploding list columns: ``ROWS FROM (jsonb_array_elements_text(...)) WITH ORDINALITY`` versus
  PartiQL's ``FROM stage AS s, s.list AS e AT pos`` over ``SUPER``;
- bind parameters: psycopg's ``%(name)s`` versus the Data API's ``:name``;
- PostgreSQL only: the MERGE source copies the target's indexes and is analyzed, and the target is
  locked against a concurrent loader (see :func:`create_load_sql`, :func:`analyze_sql`, :func:`lock_sql`).

Values never appear in the SQL text: the load's constants (run id, region, day, model version) are
bind parameters, cast to the column's type. The only literals are the COPY source and IAM role, which
come from configuration and are checked by :func:`quote_literal`. Every identifier goes through
:func:`quote_ident`.

Redshift's MERGE (checked against its documentation): the source must be a table (not a subquery or
view), the target takes no alias, both WHEN clauses are required and take no extra condition, and a
source row may match at most one target row and no target row may be matched by more than one source
row. Hence the separate ``load_<table>`` table, filled with exactly one row per key
(``ROW_NUMBER() ... = 1``) before the MERGE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from operators.warehouse.tables import DIALECTS, PIPELINE_RUNS, Dialect, Table

_PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_ROW_NUMBER = "row_number_"
_PG_PARAM = r"%\(([a-z_][a-z0-9_]*)\)s"
_RS_PARAM = r"(?<![:\w]):([a-z_][a-z0-9_]*)"

# Step names of :func:`load_statements`, in order (the loader reports row counts by step).
STEP_CREATE_STAGE = "create_stage"
STEP_COPY = "copy"
STEP_CREATE_LOAD = "create_load"
STEP_FILL_LOAD = "fill_load"
STEP_ANALYZE = "analyze"
STEP_LOCK = "lock"
STEP_DELETE_STALE = "delete_stale"
STEP_MERGE = "merge"


def _check_dialect(dialect: str) -> Dialect:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    return dialect  # type: ignore[return-value]


def quote_ident(name: str) -> str:
    """A double-quoted identifier (embedded quotes doubled); refuses empty names and NUL."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A single-quoted string literal for configuration values (S3 URIs, IAM role ARNs).

    Quotes are doubled. Backslashes and control characters are refused rather than escaped: Redshift
    and PostgreSQL disagree on what a backslash in a literal means, and no URI or ARN needs one."""
    if any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"refusing to quote {value!r}: backslash or control character")
    return "'" + value.replace("'", "''") + "'"


def placeholder(name: str, dialect: Dialect) -> str:
    """A named bind parameter: ``%(name)s`` for psycopg, ``:name`` for the Redshift Data API."""
    _check_dialect(dialect)
    if not _PARAM_NAME.match(name):
        raise ValueError(f"invalid parameter name {name!r}")
    return f"%({name})s" if dialect == "postgres" else f":{name}"


def _cols(names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(prefix + quote_ident(n) for n in names)


def _param_value(table: Table, column: str, param: str, dialect: Dialect) -> str:
    return f"CAST({placeholder(param, dialect)} AS {table.column(column).type_for(dialect)})"


# --------------------------------------------------------------------------- DDL


def create_table_sql(table: Table, dialect: Dialect) -> str:
    """``CREATE TABLE IF NOT EXISTS`` with NOT NULL, the primary key (enforced by PostgreSQL; a planner
    hint in Redshift) and, for Redshift, the distribution and sort keys."""
    _check_dialect(dialect)
    lines = [f"    {quote_ident(c.name)} {c.type_for(dialect)}{'' if c.nullable else ' NOT NULL'}"
             for c in table.columns]
    lines.append(f"    PRIMARY KEY ({_cols(table.key)})")
    sql = f"CREATE TABLE IF NOT EXISTS {quote_ident(table.name)} (\n" + ",\n".join(lines) + "\n)"
    if dialect == "redshift":
        if table.distkey:
            sql += f"\nDISTSTYLE KEY DISTKEY ({quote_ident(table.distkey)})"
        else:
            sql += "\nDISTSTYLE AUTO"
        if table.sortkey:
            sql += f"\nCOMPOUND SORTKEY ({_cols(table.sortkey)})"
    return sql


def create_index_sql(table: Table, dialect: Dialect) -> list[str]:
    """PostgreSQL only: an index on the load scope when the primary key does not start with it (the
    stale-row delete of each load filters on the scope). Redshift has no indexes: its sort key
    starts with ``dt``."""
    _check_dialect(dialect)
    if dialect != "postgres" or not table.scope or table.key[: len(table.scope)] == table.scope:
        return []
    name = quote_ident(f"{table.name}_{'_'.join(table.scope)}_idx")
    return [f"CREATE INDEX IF NOT EXISTS {name} ON {quote_ident(table.name)} ({_cols(table.scope)})"]


def create_statements(tables: Sequence[Table], dialect: Dialect) -> list[str]:
    """Everything that makes the tables exist (migrations-lite: IF NOT EXISTS, never ALTER)."""
    out: list[str] = []
    for t in tables:
        out.append(create_table_sql(t, dialect))
        out.extend(create_index_sql(t, dialect))
    return out


def columns_query_sql(dialect: Dialect) -> str:
    """The columns of a table (one bind parameter, ``table``), to check an existing table's shape."""
    return ("SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = current_schema() AND table_name = {placeholder('table', dialect)} "
            "ORDER BY ordinal_position")


def _temp_table(name: str, body: str, dialect: Dialect) -> str:
    suffix = " ON COMMIT DROP" if dialect == "postgres" else ""
    return f"CREATE TEMP TABLE {quote_ident(name)} ({body}){suffix}"


def create_staging_sql(table: Table, dialect: Dialect) -> str:
    """The stage: the lake files' columns in file order, no constraints (COPY fills it as-is)."""
    _check_dialect(dialect)
    if not table.from_lake:
        raise ValueError(f"{table.name} is not loaded from the lake")
    body = ", ".join(f"{quote_ident(c.name)} {c.type_for(dialect)}" for c in table.staging_columns())
    return _temp_table(table.stage_name, body, dialect)


def create_load_sql(table: Table, dialect: Dialect) -> str:
    """The MERGE source: shaped like the target. In PostgreSQL ``LIKE`` also copies the NOT NULL
    constraints and, with ``INCLUDING INDEXES``, the primary key: the stale-row delete's anti-join and the
    MERGE then have an index on either side, so a plan chosen on missing statistics (a target loaded
    moments ago is not analyzed yet) stays a cheap nested loop instead of a scan per row."""
    _check_dialect(dialect)
    like = f"LIKE {quote_ident(table.name)}" + (" INCLUDING INDEXES" if dialect == "postgres" else "")
    return _temp_table(table.load_name, like, dialect)


# --------------------------------------------------------------------------- COPY


def copy_from_stdin_sql(table: Table) -> str:
    """PostgreSQL: COPY into the stage from the client (text format; psycopg's ``write_row`` escapes)."""
    if not table.from_lake:
        raise ValueError(f"{table.name} is not loaded from the lake")
    names = [c.name for c in table.source_columns]
    return f"COPY {quote_ident(table.stage_name)} ({_cols(names)}) FROM STDIN"


def copy_from_s3_sql(table: Table, s3_uri: str, iam_role: str, *, manifest: bool = False) -> str:
    """Redshift: COPY into the stage from Parquet on S3 (columns map by position, so the stage has the
    files' columns in file order). ``manifest``: ``s3_uri`` is a manifest naming the exact files (what
    the loader uses: a prefix would also match ``_run_summary.json``). List columns need
    ``SERIALIZETOJSON`` to land in SUPER."""
    if not table.from_lake:
        raise ValueError(f"{table.name} is not loaded from the lake")
    if not s3_uri.startswith("s3://"):
        raise ValueError(f"COPY from S3 needs an s3:// URI, got {s3_uri!r}")
    if not iam_role.startswith("arn:"):
        raise ValueError(f"IAM_ROLE must be a role ARN, got {iam_role!r}")
    sql = (f"COPY {quote_ident(table.stage_name)} FROM {quote_literal(s3_uri)} "
           f"IAM_ROLE {quote_literal(iam_role)} FORMAT AS PARQUET")
    if any(c.is_list for c in table.source_columns):
        sql += " SERIALIZETOJSON"
    if manifest:
        sql += " MANIFEST"
    return sql


# --------------------------------------------------------------------------- stage → load table


def _select_from_stage(table: Table, dialect: Dialect) -> str:
    """``SELECT <target columns> FROM stage`` with the load's constants and, for an exploded table, one
    row per list position."""
    exprs = []
    explode = table.explode
    for name in table.column_names:
        kind, ref = table.origin(name)
        col_type = table.column(name).type_for(dialect)
        if kind == "param":
            expr = _param_value(table, name, ref, dialect)
        elif kind == "source":
            expr = f"s.{quote_ident(ref)}"
        elif kind == "position":
            expr = f"CAST(e.pos AS {col_type})" if dialect == "postgres" else f"CAST(pos + 1 AS {col_type})"
        else:  # element of an exploded list
            assert explode is not None
            i = explode.arrays.index(ref)
            if dialect == "postgres":
                expr = f"CAST(e.e{i} AS {col_type})"
            elif i == 0:
                expr = f"CAST(e0 AS {col_type})"
            else:  # the other lists are read at the first one's position
                expr = f"CAST(s.{quote_ident(ref)}[pos] AS {col_type})"
        exprs.append(f"{expr} AS {quote_ident(name)}")
    source = f"{quote_ident(table.stage_name)} AS s"
    if explode is not None:
        if dialect == "postgres":
            funcs = ", ".join(f"jsonb_array_elements_text(s.{quote_ident(a)})" for a in explode.arrays)
            names = ", ".join(f"e{i}" for i in range(len(explode.arrays)))
            source += f" CROSS JOIN LATERAL ROWS FROM ({funcs}) WITH ORDINALITY AS e({names}, pos)"
        else:
            source += f", s.{quote_ident(explode.arrays[0])} AS e0 AT pos"
    return "SELECT " + ", ".join(exprs) + f" FROM {source}"


def fill_load_sql(table: Table, dialect: Dialect) -> str:
    """``INSERT INTO load_<table>``: the stage's rows as target rows, exactly one per key (the first by
    :attr:`Table.dedupe_order`), so the MERGE never matches a target row twice."""
    _check_dialect(dialect)
    names = table.column_names
    order = ", ".join(f"m.{quote_ident(c)} {d}" for c, d in table.dedupe_order) or _cols(table.key, "m.")
    ranked = (f"SELECT {_cols(names, 'm.')}, ROW_NUMBER() OVER (PARTITION BY {_cols(table.key, 'm.')} "
              f"ORDER BY {order}) AS {_ROW_NUMBER} FROM ({_select_from_stage(table, dialect)}) AS m")
    return (f"INSERT INTO {quote_ident(table.load_name)} ({_cols(names)}) "
            f"SELECT {_cols(names, 'd.')} FROM ({ranked}) AS d WHERE d.{_ROW_NUMBER} = 1")


def analyze_sql(table: Table, dialect: Dialect) -> list[str]:
    """PostgreSQL: statistics for the freshly filled MERGE source. Autovacuum never sees temporary
    tables, and without statistics the planner guesses a few rows and may pick a nested-loop anti-join
    for the stale-row delete (minutes instead of milliseconds at 100k rows). Redshift plans hash joins
    here anyway and analyzes on its own."""
    _check_dialect(dialect)
    return [f"ANALYZE {quote_ident(table.load_name)}"] if dialect == "postgres" else []


def lock_sql(table: Table, dialect: Dialect) -> list[str]:
    """PostgreSQL: serialize loads of one table (SHARE ROW EXCLUSIVE conflicts with itself and with
    writers, not with readers). Redshift needs none: its serializable isolation aborts one of two
    conflicting loads, and its LOCK would block readers too."""
    _check_dialect(dialect)
    if dialect != "postgres":
        return []
    return [f"LOCK TABLE {quote_ident(table.name)} IN SHARE ROW EXCLUSIVE MODE"]


def delete_stale_sql(table: Table, staging: str, dialect: Dialect) -> str:
    """Delete the target rows of this load's slice (:attr:`Table.scope`) that ``staging`` no longer has,
    so a rerun on changed input leaves exactly the new rows (MERGE alone never deletes)."""
    _check_dialect(dialect)
    if not table.scope:
        raise ValueError(f"{table.name} has no load scope: nothing to delete")
    target = quote_ident(table.name)
    conds = []
    for c in table.scope:
        kind, ref = table.origin(c)
        if kind != "param":
            raise ValueError(f"{table.name}: scope column {c} must come from a load parameter")
        conds.append(f"{target}.{quote_ident(c)} = {_param_value(table, c, ref, dialect)}")
    match = " AND ".join(f"s.{quote_ident(k)} = {target}.{quote_ident(k)}" for k in table.key)
    return (f"DELETE FROM {target} WHERE {' AND '.join(conds)} "
            f"AND NOT EXISTS (SELECT 1 FROM {quote_ident(staging)} AS s WHERE {match})")


def merge_sql(table: Table, staging: str, dialect: Dialect) -> str:
    """``MERGE INTO <table> USING <staging> AS s ON <key> WHEN MATCHED THEN UPDATE ... WHEN NOT MATCHED
    THEN INSERT ...``: in the form both PostgreSQL 15 and Redshift accept (no target alias, both clauses,
    no extra conditions)."""
    _check_dialect(dialect)
    target = quote_ident(table.name)
    on = " AND ".join(f"{target}.{quote_ident(k)} = s.{quote_ident(k)}" for k in table.key)
    sets = ", ".join(f"{quote_ident(c)} = s.{quote_ident(c)}" for c in table.value_columns)
    return (f"MERGE INTO {target} USING {quote_ident(staging)} AS s ON {on} "
            f"WHEN MATCHED THEN UPDATE SET {sets} "
            f"WHEN NOT MATCHED THEN INSERT ({_cols(table.column_names)}) "
            f"VALUES ({_cols(table.column_names, 's.')})")


def load_statements(table: Table, dialect: Dialect, copy_sql: str) -> list[tuple[str, str]]:
    """One lake table's load, as ``(step, sql)`` pairs to run in ONE transaction: stage, COPY (given:
    :func:`copy_from_stdin_sql` or :func:`copy_from_s3_sql`), the deduplicated MERGE source, the
    stale-row delete and the MERGE. Temporary tables disappear at the end (see the module docstring)."""
    _check_dialect(dialect)
    steps = [
        (STEP_CREATE_STAGE, create_staging_sql(table, dialect)),
        (STEP_COPY, copy_sql),
        (STEP_CREATE_LOAD, create_load_sql(table, dialect)),
        (STEP_FILL_LOAD, fill_load_sql(table, dialect)),
    ]
    steps += [(STEP_ANALYZE, sql) for sql in analyze_sql(table, dialect)]
    steps += [(STEP_LOCK, sql) for sql in lock_sql(table, dialect)]
    if table.scope:
        steps.append((STEP_DELETE_STALE, delete_stale_sql(table, table.load_name, dialect)))
    steps.append((STEP_MERGE, merge_sql(table, table.load_name, dialect)))
    return steps


# --------------------------------------------------------------------------- pipeline runs


def insert_run_sql(present: Iterable[str], dialect: Dialect) -> str:
    """``INSERT INTO load_pipeline_runs VALUES (...)``: one bind parameter per column named in
    ``present`` (the record's non-null values; the Data API has no NULL parameter), NULL for the rest.
    JSON columns are parsed server-side (``jsonb`` cast / ``JSON_PARSE`` into SUPER)."""
    _check_dialect(dialect)
    table = PIPELINE_RUNS
    given = set(present)
    unknown = given - set(table.column_names)
    if unknown:
        raise ValueError(f"pipeline_runs has no column(s) {', '.join(sorted(unknown))}")
    values = []
    for col in table.columns:
        if col.name not in given:
            if not col.nullable:
                raise ValueError(f"pipeline_runs.{col.name} is required")
            values.append("NULL")
        elif col.redshift_type == "SUPER" and dialect == "redshift":
            values.append(f"JSON_PARSE({placeholder(col.name, dialect)})")
        else:
            values.append(_param_value(table, col.name, col.name, dialect))
    return (f"INSERT INTO {quote_ident(table.load_name)} ({_cols(table.column_names)}) "
            f"VALUES ({', '.join(values)})")


def record_run_statements(present: Iterable[str], dialect: Dialect) -> list[str]:
    """Upsert one pipeline run, in one transaction: the load table, its one row, the MERGE on run_id."""
    return [create_load_sql(PIPELINE_RUNS, dialect), insert_run_sql(present, dialect),
            merge_sql(PIPELINE_RUNS, PIPELINE_RUNS.load_name, dialect)]


def bind_literals(sql: str, params: Mapping[str, str], dialect: Dialect) -> str:
    """``sql`` with its bind parameters replaced by quoted literals (:func:`quote_literal`).

    For the Redshift lake loads: a Data API batch's parameters apply to every statement of the batch,
    COPY among them, whose IAM role ARN is full of ``:word``. The values are the load's identifiers
    (region, ISO day, run id, model version), which the loader has checked against strict patterns."""
    _check_dialect(dialect)
    missing = [n for n in referenced_params(sql, dialect) if n not in params]
    if missing:
        raise ValueError(f"no value for parameter(s) {', '.join(missing)}")
    pattern = _PG_PARAM if dialect == "postgres" else _RS_PARAM
    return re.sub(pattern, lambda m: quote_literal(params[m.group(1)]), sql)


def referenced_params(sql: str, dialect: Dialect) -> list[str]:
    """Names of the bind parameters a statement uses (in order of first use)."""
    _check_dialect(dialect)
    pattern = _PG_PARAM if dialect == "postgres" else _RS_PARAM
    seen: list[str] = []
    for name in re.findall(pattern, sql):
        if name not in seen:
            seen.append(name)
    return seen


__all__ = [
    "STEP_ANALYZE",
    "STEP_COPY",
    "STEP_CREATE_LOAD",
    "STEP_CREATE_STAGE",
    "STEP_DELETE_STALE",
    "STEP_FILL_LOAD",
    "STEP_LOCK",
    "STEP_MERGE",
    "analyze_sql",
    "bind_literals",
    "columns_query_sql",
    "copy_from_s3_sql",
    "copy_from_stdin_sql",
    "create_index_sql",
    "create_load_sql",
    "create_staging_sql",
    "create_statements",
    "create_table_sql",
    "delete_stale_sql",
    "fill_load_sql",
    "insert_run_sql",
    "load_statements",
    "lock_sql",
    "merge_sql",
    "placeholder",
    "quote_ident",
    "quote_literal",
    "record_run_statements",
    "referenced_params",
]
