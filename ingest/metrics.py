"""Prometheus metrics of the consumer (names: streamrec_ingest_<what>_<unit>)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS_IN = Counter("streamrec_ingest_records_in_total", "Records read from Kinesis", ["region"])
RECORDS_OUT = Counter("streamrec_ingest_records_out_total", "Rows written to the raw lake", ["region"])
DEAD_LETTERED = Counter("streamrec_ingest_records_dead_lettered_total", "Records sent to the dead-letter store",
                        ["region", "reason"])
DUPLICATES = Counter("streamrec_ingest_records_duplicate_total", "Records dropped as duplicate event ids", ["region"])
BATCH_LATENCY = Histogram("streamrec_ingest_batch_latency_seconds", "Time to write one batch and checkpoint it",
                          ["region"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
MILLIS_BEHIND = Gauge("streamrec_ingest_millis_behind_latest", "MillisBehindLatest of the last GetRecords",
                      ["region", "shard"])
LEASES_HELD = Gauge("streamrec_ingest_leases_held", "Shard leases held by this worker", ["region"])
FEATURES_SKIPPED = Counter("streamrec_ingest_feature_batches_skipped_total",
                           "Batches written to the lake and checkpointed without their Redis features "
                           "(Redis unreachable for ingest.redis_retry_seconds)", ["region"])
