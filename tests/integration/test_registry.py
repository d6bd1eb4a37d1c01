"""The model registry on a file:// lake and on S3 (moto server): publish, promote, immutability, crashes.

The crash tests interrupt ``publish`` through its ``on_file_written`` hook: by an exception in-process,
and by SIGKILL in a child process (no cleanup code runs at all). Both must leave the version invisible
and let a rerun complete it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow as pa
import pytest

from ray_apps.ann import AnnIndex, build_index
from ray_apps.registry import (
    IntegrityError,
    ModelRegistry,
    ModelVersion,
    VersionExistsError,
    VersionNotFoundError,
    embeddings_matrix,
    embeddings_table,
)
from streamrec.devstack.service import ServiceHandle

REGION = "eu-west-1"
WINDOW = ("2026-11-11", "2026-11-25")
VERSION_PATTERN = r"v20261125-[0-9a-f]{12}"

RegistryFactory = Callable[[], ModelRegistry]


@dataclass(frozen=True)
class Artifacts:
    """What a training run hands the registry."""

    weights: bytes
    config: dict[str, Any]
    table: pa.Table
    index: AnnIndex

    def publish(self, registry: ModelRegistry, version: str | None = None, **overrides: Any) -> ModelVersion:
        kwargs: dict[str, Any] = {
            "user_tower": self.weights, "config": self.config, "item_embeddings": self.table,
            "index": self.index, "data_window": WINDOW,
            "metrics": {"recall_at_100": 0.31, "ndcg_at_10": 0.12},
            "gate": {"passed": True, "baseline": "popularity", "reason": "beats baseline by 40%"},
            "code_version": "git:test",
        }
        return registry.publish(version, **{**kwargs, **overrides})


def make_artifacts(seed: int = 0, items: int = 400, dim: int = 8) -> Artifacts:
    """Deterministic in ``seed`` (the SIGKILL test rebuilds them in a child process). IVF is forced so the
    manifest's recall is really measured, not 1.0 by construction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(items, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"item-{i}" for i in range(items)]
    return Artifacts(weights=rng.bytes(2048), config={"dim": dim, "history": 50, "seed": seed},
                     table=embeddings_table(ids, x), index=build_index(ids, x, kind="ivf"))


@pytest.fixture(scope="module")
def artifacts() -> Artifacts:
    return make_artifacts(0)


@pytest.fixture(scope="module")
def other_artifacts() -> Artifacts:
    return make_artifacts(1)


@pytest.fixture(params=["file", "s3"])
def make_registry(request: pytest.FixtureRequest, tmp_path: Path) -> RegistryFactory:
    """A factory of registries over one fresh lake: ``file://`` under tmp_path, or an S3 bucket on moto.
    Each call is a separate client (a separate reader or writer process, as far as the lake can tell)."""
    if request.param == "file":
        uri = f"file://{tmp_path / 'lake'}"
        return lambda: ModelRegistry(uri, REGION)
    moto: ServiceHandle = request.getfixturevalue("moto_server")
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name=REGION, aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    uri = f"s3://{bucket}/lake"
    return lambda: ModelRegistry(uri, REGION, endpoint_url=moto.url, access_key="testing",
                                 secret_key="testing")


class Crash(Exception):
    """Stands in for the process dying half-way through a publish."""


def crash_after(rel_path: str) -> Callable[[str], None]:
    def hook(written: str) -> None:
        if written == rel_path:
            raise Crash(written)
    return hook


def stored_bytes(registry: ModelRegistry, version: str, rel: str) -> bytes:
    path = f"{registry.root}/{version}/{rel}" if version else f"{registry.root}/{rel}"
    with registry.fs.open_input_stream(path) as stream:
        return stream.read()


def test_publish_get_promote_and_load(make_registry: RegistryFactory, artifacts: Artifacts) -> None:
    writer, reader = make_registry(), make_registry()
    assert reader.list_versions() == [] and reader.promoted() is None and reader.promotion() is None

    published = artifacts.publish(writer)
    assert published.version == writer.get(published.version).version
    assert re.fullmatch(VERSION_PATTERN, published.version)
    assert [v.version for v in reader.list_versions()] == [published.version]
    assert reader.promoted() is None  # published is not promoted

    promotion = writer.promote(published.version, {"passed": True, "by": "test"})
    assert (promotion.version, promotion.previous) == (published.version, None)
    current = reader.promoted()
    assert current is not None and current.version == published.version
    assert reader.promotion() == promotion

    # Every artefact comes back as it went in.
    assert reader.load_user_tower(current) == artifacts.weights
    assert reader.load_config(current.version) == artifacts.config
    table = reader.load_item_embeddings(current)
    assert table.equals(artifacts.table)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    ids, x = embeddings_matrix(table)
    index = reader.load_index(current)
    np.testing.assert_array_equal(index.search(x[:5], 10)[0], artifacts.index.search(x[:5], 10)[0])


def test_manifest_describes_the_version(make_registry: RegistryFactory, artifacts: Artifacts) -> None:
    registry = make_registry()
    mv = artifacts.publish(registry)
    m = mv.manifest
    assert m["schema_version"] == 1 and (m["version"], m["region"]) == (mv.version, REGION)
    assert m["data_window"] == {"start": WINDOW[0], "end": WINDOW[1]}
    assert m["metrics"]["recall_at_100"] == 0.31 and m["gate"]["passed"] is True
    assert m["code_version"] == "git:test" and mv.created_at.tzinfo is not None
    assert m["index"]["kind"] == "ivf" and m["index"]["items"] == 400 and m["index"]["params"]["nlist"] >= 1
    assert 0.9 <= mv.recall_at_100 <= 1.0 and m["index"]["recall_queries"] == 400
    assert sorted(mv.files) == ["config.json", "index/index.faiss", "index/item_ids.parquet",
                                "index/meta.json", "item_embeddings.parquet", "user_tower.pt"]
    for rel, entry in mv.files.items():  # sizes and checksums are those of the stored objects
        data = stored_bytes(registry, mv.version, rel)
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    # The manifest on storage is the one returned.
    assert json.loads(stored_bytes(registry, mv.version, "manifest.json")) == dict(m)


def test_published_versions_are_immutable(make_registry: RegistryFactory, artifacts: Artifacts,
                                          other_artifacts: Artifacts) -> None:
    registry = make_registry()
    first = artifacts.publish(registry, "nightly-2026-11-25")
    manifest_before = stored_bytes(registry, first.version, "manifest.json")

    # An identical rerun is a no-op that returns the stored version (created_at of the first publish).
    again = artifacts.publish(registry, "nightly-2026-11-25")
    assert again.manifest == first.manifest

    with pytest.raises(VersionExistsError, match=r"'nightly-2026-11-25' already exists .*user_tower\.pt"):
        artifacts.publish(registry, "nightly-2026-11-25", user_tower=b"other weights")
    with pytest.raises(VersionExistsError, match="metrics"):
        artifacts.publish(registry, "nightly-2026-11-25", metrics={"recall_at_100": 0.99})
    with pytest.raises(VersionExistsError):
        other_artifacts.publish(registry, "nightly-2026-11-25")
    assert stored_bytes(registry, first.version, "manifest.json") == manifest_before
    assert registry.load_user_tower(first.version) == artifacts.weights

    # Content-derived names: different content is a different version, never a collision.
    a, b = artifacts.publish(registry), other_artifacts.publish(registry)
    assert a.version != b.version
    assert artifacts.publish(registry).version == a.version


def test_crash_mid_publish_leaves_the_version_invisible_and_a_rerun_completes_it(
        make_registry: RegistryFactory, artifacts: Artifacts, other_artifacts: Artifacts) -> None:
    writer, reader = make_registry(), make_registry()
    live = other_artifacts.publish(writer)
    writer.promote(live.version, {"passed": True})

    with pytest.raises(Crash):
        artifacts.publish(writer, on_file_written=crash_after("index/index.faiss"))
    [half] = reader.incomplete_versions()
    assert [v.version for v in reader.list_versions()] == [live.version]
    with pytest.raises(VersionNotFoundError, match="not published"):
        reader.get(half)
    with pytest.raises(VersionNotFoundError):  # the pointer can never name it
        writer.promote(half, {"passed": True})
    promoted = reader.promoted()
    assert promoted is not None and promoted.version == live.version

    # The rerun (same content, so the same content-derived name) finishes the folder the crash left.
    written: list[str] = []
    done = artifacts.publish(writer, on_file_written=written.append)
    assert done.version == half and written[-1] == "manifest.json"
    assert reader.incomplete_versions() == []
    assert sorted(v.version for v in reader.list_versions()) == sorted([live.version, half])
    assert reader.load_item_embeddings(half).equals(artifacts.table)


def test_crash_after_every_file_but_the_manifest_is_still_invisible(make_registry: RegistryFactory,
                                                                    artifacts: Artifacts) -> None:
    registry = make_registry()
    with pytest.raises(Crash):  # every data file is in place; only the manifest is missing
        artifacts.publish(registry, "v-almost", on_file_written=crash_after("index/meta.json"))
    assert registry.list_versions() == [] and registry.incomplete_versions() == ["v-almost"]
    with pytest.raises(VersionNotFoundError):
        registry.load_index("v-almost")


def _publish_and_die(lake_uri: str, kill_after: str) -> None:
    """Child process body for the SIGKILL test: publish, and die without any cleanup after one file."""
    registry = ModelRegistry(lake_uri, REGION)

    def die(written: str) -> None:
        if written == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    make_artifacts(0).publish(registry, on_file_written=die)


def test_sigkill_mid_publish_then_rerun(tmp_path: Path, artifacts: Artifacts) -> None:
    uri = f"file://{tmp_path / 'lake'}"
    here = Path(__file__).parent
    code = f"import test_registry as t; t._publish_and_die({uri!r}, 'item_embeddings.parquet')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", code], cwd=here.parent.parent, env=env, capture_output=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]

    registry = ModelRegistry(uri, REGION)
    [half] = registry.incomplete_versions()
    assert registry.list_versions() == [] and registry.promoted() is None
    assert artifacts.publish(registry).version == half  # same content in both processes -> same name
    assert [v.version for v in registry.list_versions()] == [half]


def test_promotion_records_previous_and_is_idempotent(make_registry: RegistryFactory, artifacts: Artifacts,
                                                      other_artifacts: Artifacts) -> None:
    registry = make_registry()
    v1, v2 = artifacts.publish(registry), other_artifacts.publish(registry)
    first = registry.promote(v1.version, {"passed": True})
    second = registry.promote(v2.version, {"passed": True, "ndcg_gain": 0.02})
    assert (second.version, second.previous, second.decision["ndcg_gain"]) == (v2.version, v1.version, 0.02)
    assert registry.promote(v2.version, {"passed": True}) == second  # a retried promotion changes nothing
    rollback = registry.promote(v1.version, {"rollback": True})
    assert (rollback.previous, registry.promotion()) == (v2.version, rollback)
    assert first.promoted_at <= second.promoted_at <= rollback.promoted_at


def test_readers_never_see_a_pointer_to_an_incomplete_version(make_registry: RegistryFactory,
                                                              artifacts: Artifacts,
                                                              other_artifacts: Artifacts) -> None:
    """A reader polls the pointer while the writer switches it back and forth and tries to promote an
    unfinished version; every read must resolve to one of the two complete versions."""
    writer = make_registry()
    versions = {artifacts.publish(writer).version, other_artifacts.publish(writer).version}
    with pytest.raises(Crash):
        make_artifacts(2).publish(writer, on_file_written=crash_after("item_embeddings.parquet"))
    [half] = writer.incomplete_versions()
    order = sorted(versions)
    writer.promote(order[0], {"passed": True})

    reader = make_registry()
    seen: list[str] = []
    errors: list[BaseException] = []
    first_read, stop = threading.Event(), threading.Event()

    def poll() -> None:
        try:
            while not stop.is_set() or len(seen) < 2:
                current = reader.promoted()
                assert current is not None
                seen.append(current.version)
                first_read.set()
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)
            first_read.set()

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        first_read.wait(timeout=30)
        for i in range(10):
            writer.promote(order[(i + 1) % 2], {"passed": True, "round": i})
            with pytest.raises(VersionNotFoundError):
                writer.promote(half, {"passed": True})
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert seen and set(seen) <= versions


def test_a_torn_pointer_read_is_read_again(tmp_path: Path, artifacts: Artifacts,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow reads S3 objects as HEAD then ranged GET, so a pointer switch in between returns the new
    pointer cut to, or NUL-padded to, the old size. The reader must not take that for a pointer."""
    registry = ModelRegistry(f"file://{tmp_path / 'lake'}", REGION)
    mv = artifacts.publish(registry)
    record = registry.promote(mv.version, {"passed": True})
    pointer = stored_bytes(registry, "", "promoted.json")
    torn = iter([pointer[:-7], pointer[:-3] + b"\0" * 9])
    real_read = registry._read
    monkeypatch.setattr(registry, "_read", lambda path: next(torn, None) or real_read(path))
    assert registry.promotion() == record


def test_local_writes_leave_no_temporary_files(tmp_path: Path, artifacts: Artifacts) -> None:
    registry = ModelRegistry(f"file://{tmp_path / 'lake'}", REGION)
    mv = artifacts.publish(registry)
    registry.promote(mv.version, {"passed": True})
    names = [p.name for p in (tmp_path / "lake").rglob("*")]
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    assert (tmp_path / "lake" / "models" / f"region={REGION}" / "promoted.json").is_file()


def test_s3_objects_are_whole_and_named_by_the_layout(moto_server: ServiceHandle,
                                                      artifacts: Artifacts) -> None:
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    registry = ModelRegistry(f"s3://{bucket}/lake", REGION, endpoint_url=moto_server.url,
                             access_key="testing", secret_key="testing")
    mv = artifacts.publish(registry)
    registry.promote(mv.version, {"passed": True})
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    prefix = f"lake/models/region={REGION}"
    assert keys == sorted([f"{prefix}/promoted.json", f"{prefix}/{mv.version}/manifest.json"]
                          + [f"{prefix}/{mv.version}/{rel}" for rel in mv.files])


def test_tampered_files_are_detected_on_load(tmp_path: Path, artifacts: Artifacts) -> None:
    registry = ModelRegistry(f"file://{tmp_path / 'lake'}", REGION)
    mv = artifacts.publish(registry)
    (tmp_path / "lake" / "models" / f"region={REGION}" / mv.version / "user_tower.pt").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="checksum"):
        registry.load_user_tower(mv.version)
    (tmp_path / "lake" / "models" / f"region={REGION}" / mv.version / "index" / "index.faiss").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        registry.load_index(mv)


def test_publish_validates_its_inputs(tmp_path: Path, artifacts: Artifacts) -> None:
    registry = ModelRegistry(f"file://{tmp_path / 'lake'}", REGION)
    with pytest.raises(ValueError, match="invalid model version name"):
        artifacts.publish(registry, "../escape")
    with pytest.raises(ValueError, match="data window starts after it ends"):
        artifacts.publish(registry, data_window=("2026-11-26", "2026-11-25"))
    with pytest.raises(ValueError, match="does not match the item embeddings"):
        artifacts.publish(registry, item_embeddings=artifacts.table.slice(0, 10))
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        artifacts.publish(registry, metrics={"loss": float("nan")})
    # list<float32> embeddings are accepted and stored as fixed-size lists.
    ids, x = embeddings_matrix(artifacts.table)
    as_lists = pa.table({"item_id": ids.tolist(), "embedding": pa.array(x.tolist(), pa.list_(pa.float32()))})
    mv = artifacts.publish(registry, item_embeddings=as_lists)
    assert mv.version == artifacts.publish(registry).version  # same stored bytes, same version
    assert registry.list_versions() == [mv] and registry.incomplete_versions() == []
