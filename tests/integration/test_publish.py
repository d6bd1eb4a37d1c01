"""Publishing to Kinesis on a real moto server: every record arrives exactly once, retries included."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from streamrec.aws import client
from streamrec.cli.events import app
from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.generate import generate_region
from streamrec.clickstream.publish import KinesisPublisher, PublishError, publish_generated
from streamrec.devstack.service import ServiceHandle
from streamrec.settings import AwsSettings, RegionSettings, Settings

REGION = "us-east-1"
END = datetime(2024, 5, 1, tzinfo=UTC)
CONFIG = GeneratorConfig(
    seed=11,
    regions=(REGION,),
    users_per_region=200,
    items=300,
    events_per_region=2_000,
    end=END,
    malformed_share=0.02,  # includes oversize records of 8-10 KiB
)


@pytest.fixture
def aws(moto_server: ServiceHandle) -> AwsSettings:
    return AwsSettings(endpoint_url=moto_server.url, access_key_id="testing", secret_access_key="testing")


@pytest.fixture
def make_stream(aws: AwsSettings) -> Callable[..., str]:
    """Create a stream with a name unique to the test; returns the name."""

    def make(region: str = REGION, shards: int = 3) -> str:
        kinesis = client("kinesis", region, aws)
        name = f"test-publish-{uuid.uuid4().hex[:10]}"
        kinesis.create_stream(StreamName=name, ShardCount=shards)
        kinesis.get_waiter("stream_exists").wait(StreamName=name)
        return name

    return make


@pytest.fixture
def kinesis(aws: AwsSettings) -> Any:
    return client("kinesis", REGION, aws)


def read_stream(kinesis: Any, stream: str) -> dict[str, list[bytes]]:
    """Every record's data, per shard, read from the start with GetRecords."""
    out: dict[str, list[bytes]] = {}
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        sid = shard["ShardId"]
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=sid, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        out[sid] = []
        while True:
            response = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            out[sid].extend(r["Data"] for r in response["Records"])
            iterator = response["NextShardIterator"]
            if not response["Records"]:
                break
    return out


def all_data(per_shard: dict[str, list[bytes]]) -> Counter[bytes]:
    return Counter(data for records in per_shard.values() for data in records)


class FaultInjectingKinesis:
    """Fault-injection wrapper around the real moto client.

    moto never reports partial PutRecords failures, so this wrapper makes the first ``failing_calls``
    calls fail every ``fail_every``-th record the way Kinesis does (an ErrorCode entry at that index and
    FailedRecordCount), and forwards the other records to moto, whose real answers fill the other indices.
    """

    def __init__(self, real: Any, *, fail_every: int = 7, failing_calls: int = 1) -> None:
        self.real, self.fail_every, self.failing_calls = real, fail_every, failing_calls
        self.calls = 0
        self.injected = 0

    def put_records(self, *, StreamName: str, Records: list[dict]) -> dict:
        self.calls += 1
        if self.calls > self.failing_calls:
            return self.real.put_records(StreamName=StreamName, Records=Records)
        fail = {i for i in range(len(Records)) if i % self.fail_every == 0}
        passed = [i for i in range(len(Records)) if i not in fail]
        answers = (
            self.real.put_records(StreamName=StreamName, Records=[Records[i] for i in passed])["Records"]
            if passed
            else []
        )
        merged: list[dict] = [
            {
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": f"Rate exceeded ({StreamName})",
            }
        ] * len(Records)
        for i, answer in zip(passed, answers):
            merged[i] = answer
        self.injected += len(fail)
        return {"FailedRecordCount": len(fail), "Records": merged}


def test_every_record_arrives_once_across_three_shards(kinesis: Any, make_stream: Callable[..., str]) -> None:
    stream = make_stream(shards=3)
    records = list(generate_region(CONFIG, REGION))
    progress: list[int] = []
    stats = KinesisPublisher(kinesis, stream, progress=progress.append).put(records)

    per_shard = read_stream(kinesis, stream)
    assert all_data(per_shard) == Counter(r.data for r in records)
    assert stats.records_put == sum(progress) == len(records) == 2_000
    assert stats.put_calls == 4 and stats.retried_records == 0
    assert dict(stats.per_shard) == {sid: len(data) for sid, data in per_shard.items()}
    assert len(stats.per_shard) == 3 and min(stats.per_shard.values()) > 0  # user keys spread over shards


def test_failed_records_are_retried_alone_until_they_arrive(
    kinesis: Any, make_stream: Callable[..., str]
) -> None:
    stream = make_stream(shards=3)
    records = list(generate_region(CONFIG, REGION))[:1_200]
    flaky = FaultInjectingKinesis(kinesis, fail_every=7, failing_calls=2)
    stats = KinesisPublisher(flaky, stream, backoff_base_s=0.001).put(records)

    # Exactly once: nothing lost, and no successful record sent again with the failed ones.
    assert all_data(read_stream(kinesis, stream)) == Counter(r.data for r in records)
    # Call 1 fails every 7th of 500 records (72); call 2, their retry, fails every 7th of those (11).
    assert flaky.injected == 72 + 11
    assert stats.retried_records == flaky.injected
    assert stats.put_calls == 3 + 2  # three batches, and two retries of the first
    assert stats.records_put == len(records)


def test_records_that_keep_failing_raise_a_clear_error(kinesis: Any, make_stream: Callable[..., str]) -> None:
    stream = make_stream(shards=1)
    records = list(generate_region(CONFIG, REGION))[:20]
    always = FaultInjectingKinesis(kinesis, fail_every=10, failing_calls=10**9)
    publisher = KinesisPublisher(always, stream, max_attempts=3, backoff_base_s=0.001)
    with pytest.raises(
        PublishError, match=r"1 records still failing .* after 3 PutRecords attempts .*ProvisionedThroughput"
    ):
        publisher.put(records)
    assert always.calls == 3


def test_rate_limit_paces_calls_without_losing_records(kinesis: Any, make_stream: Callable[..., str]) -> None:
    stream = make_stream(shards=1)
    records = list(generate_region(CONFIG, REGION))[:1_000]
    now = [0.0]  # a virtual clock that the publisher's waits advance, so the test takes no real time

    def sleep(seconds: float) -> None:
        now[0] += seconds

    stats = KinesisPublisher(kinesis, stream, rate_per_s=100, sleep=sleep, clock=lambda: now[0]).put(records)
    assert stats.put_calls == 10  # small calls at a low rate: 100 records each
    assert now[0] == pytest.approx((1_000 - 100) / 100)  # a burst of one second's worth, then 100/s
    assert all_data(read_stream(kinesis, stream)) == Counter(r.data for r in records)


def _settings(aws: AwsSettings, streams: dict[str, str], tmp_path: Path) -> Settings:
    regions = {
        region: RegionSettings.default_for(region, f"file://{tmp_path}/lake").model_copy(
            update={"stream_name": name}
        )
        for region, name in streams.items()
    }
    return Settings(aws=aws, regions=regions)


def test_publish_generated_accounts_for_every_record_per_region(
    aws: AwsSettings, make_stream: Callable[..., str], tmp_path: Path
) -> None:
    config = CONFIG.model_copy(update={"regions": ("us-east-1", "eu-west-1"), "events_per_region": 1_000})
    streams = {region: make_stream(region, shards=2) for region in config.regions}
    summaries = publish_generated(_settings(aws, streams, tmp_path), config)

    assert set(summaries) == set(config.regions)
    for region, summary in summaries.items():
        assert summary.by_kind == config.counts_per_region()
        assert summary.stats.records_put == summary.tally.total == 1_000
        assert summary.target == streams[region]
        arrived = all_data(read_stream(client("kinesis", region, aws), streams[region]))
        assert arrived == Counter(r.data for r in generate_region(config, region))


def write_config(tmp_path: Path, aws: AwsSettings, stream: str) -> Path:
    """A settings file for REGION whose stream is ``stream`` (the CLI reads it with --config)."""
    config_path = tmp_path / "streamrec.yaml"
    region = RegionSettings.default_for(REGION, f"file://{tmp_path}/lake").model_dump()
    config_path.write_text(yaml.safe_dump({
        "aws": aws.model_dump(exclude_none=True),
        "regions": {REGION: {**region, "stream_name": stream}},
    }))
    return config_path


def test_cli_generate_and_replay_to_kinesis(
    aws: AwsSettings, kinesis: Any, make_stream: Callable[..., str], tmp_path: Path
) -> None:
    stream = make_stream(shards=2)
    config_path = write_config(tmp_path, aws, stream)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "generate",
            "-r",
            REGION,
            "-n",
            "300",
            "--users",
            "40",
            "--items",
            "80",
            "--end",
            "2024-05-01T00:00:00Z",
            "--config",
            str(config_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "records per shard" in result.output

    movielens = tmp_path / "u.data"
    movielens.write_text("1\t10\t5\t881250949\n2\t20\t1\t881250950\n")
    result = runner.invoke(
        app, ["replay", str(movielens), "-f", "movielens", "-r", REGION, "--config", str(config_path)]
    )
    assert result.exit_code == 0, result.output

    expected = GeneratorConfig(
        regions=(REGION,), users_per_region=40, items=80, events_per_region=300, end=END
    )
    arrived = all_data(read_stream(kinesis, stream))
    assert sum(arrived.values()) == 302
    assert Counter(r.data for r in generate_region(expected, REGION)) <= arrived


def test_cli_names_a_missing_stream_in_one_line(aws: AwsSettings, tmp_path: Path) -> None:
    from streamrec.cli.common import UserError

    config_path = write_config(tmp_path, aws, "no-such-stream")
    result = CliRunner().invoke(app, ["generate", "-r", REGION, "-n", "50", "--config", str(config_path)])
    assert isinstance(result.exception, UserError)
    assert "no-such-stream" in str(result.exception) or "ResourceNotFound" in str(result.exception)
    result = CliRunner().invoke(
        app, ["generate", "-r", "eu-west-1", "-n", "50", "--config", str(config_path)]
    )
    assert isinstance(result.exception, UserError) and "regions.eu-west-1" in str(result.exception)
