"""The Kinesis consumer tier: leases, checkpoints, transform, sinks.

Modelled on the Kinesis Client Library's semantics (shard leases in DynamoDB, checkpoints after durable
writes, parent shards before children) but small enough to read in one sitting:

- :mod:`ingest.transform`  record bytes → lake row or dead letter (pure)
- :mod:`ingest.dedup`      bounded event_id window (pure)
- :mod:`ingest.buffer`     Firehose-style per-shard buffer → Arrow tables per partition (pure)
- :mod:`ingest.leases`     which leases to take, renew or steal (pure)
- :mod:`ingest.lease_table` the DynamoDB lease table (I/O)
- :mod:`ingest.sinks`      raw lake / dead-letter Parquet and Redis online features (I/O)
- :mod:`ingest.worker`     the loop that ties them together
"""
