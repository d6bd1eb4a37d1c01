"""Clickstream producers: a synthetic generator with a planted truth, dataset replay, and sinks.

Every producer yields :class:`GeneratedRecord` (the bytes a website would put on the stream, with the
partition key and what kind of record it is), so the sinks (Kinesis, JSONL) and the accounting that the
demo does are the same whatever made the records.
"""

from streamrec.clickstream.records import GeneratedRecord, RecordKind, RecordTally

__all__ = ["GeneratedRecord", "RecordKind", "RecordTally"]
