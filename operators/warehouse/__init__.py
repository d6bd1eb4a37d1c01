"""The warehouse half of the sync stage: a region's day (clean events, item and user snapshots, recs) and
its pipeline runs, loaded idempotently into Redshift (PostgreSQL locally). See docs/warehouse.md.

- :mod:`operators.warehouse.tables`: the table definitions (columns, keys, lake sources, Redshift layout);
- :mod:`operators.warehouse.sql`: pure SQL text builders for both dialects;
- :mod:`operators.warehouse.load`: the I/O, ``load_day``, ``load_run_days`` and ``record_run``.
"""
