"""Per-input-file checkpoints of the DynamoDB sync, kept in the lake next to nothing else::

    sync/region=R/dt=D/recs/model_version=V/_checkpoints/<file>.json   one per scored recs file
    sync/region=R/dt=D/keys/_checkpoints/<table>__<file>.json          one per keys/ export file

A checkpoint is written after every item of its file was acknowledged by DynamoDB (BatchWriteItem with
no UnprocessedItems left), so a file with a valid checkpoint is skipped by a rerun and a file without one
is written again in full (puts of the same items are idempotent). A checkpoint is valid only for the
same input: the same ``input_id`` (a hash of the producing run's summary, so a rerun of scoring or of
the ETL invalidates every checkpoint of its output), file size and row count.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import asdict, dataclass
from datetime import date

import pyarrow.fs as pafs

from streamrec.lake import LakeLayout

CHECKPOINT_FORMAT = "streamrec-sync-checkpoint/1"
CHECKPOINTS_DIR = "_checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    """One input file that is fully in its table."""

    name: str
    size: int
    rows: int
    items: int
    input_id: str
    table: str
    written_at: str

    def matches(self, *, size: int, rows: int, input_id: str, table: str) -> bool:
        return (self.size, self.rows, self.input_id, self.table) == (size, rows, input_id, table)

    def to_json(self) -> str:
        return json.dumps({"format": CHECKPOINT_FORMAT, **asdict(self)}, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        data = json.loads(text)
        if data.pop("format", None) != CHECKPOINT_FORMAT:
            raise ValueError("not a sync checkpoint")
        return cls(**data)


def recs_folder(layout: LakeLayout, region: str, day: date, version: str) -> str:
    return posixpath.join(layout.partition("sync", region, day), "recs", f"model_version={version}",
                          CHECKPOINTS_DIR)


def keys_folder(layout: LakeLayout, region: str, day: date) -> str:
    return posixpath.join(layout.partition("sync", region, day), "keys", CHECKPOINTS_DIR)


def checkpoint_name(relative_path: str) -> str:
    """A flat file name for an input file's path relative to its dataset folder."""
    return relative_path.strip("/").replace("/", "__") + ".json"


class CheckpointStore:
    """Checkpoints of one sync target in one lake folder."""

    def __init__(self, fs: pafs.FileSystem, folder: str) -> None:
        self.fs = fs
        self.folder = folder

    def path(self, name: str) -> str:
        return posixpath.join(self.folder, checkpoint_name(name))

    def load(self, name: str) -> Checkpoint | None:
        """The checkpoint of input file ``name``; None when there is none or it is unreadable (the file
        is then written again, which is safe)."""
        try:
            with self.fs.open_input_stream(self.path(name)) as stream:
                return Checkpoint.from_json(stream.read())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        """Write atomically: a reader sees the whole checkpoint or none (a local file is renamed into
        place; an S3 object appears whole when its single PUT completes)."""
        path = self.path(checkpoint.name)
        data = checkpoint.to_json().encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(self.folder, recursive=True)
            tmp = posixpath.join(self.folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with self.fs.open_output_stream(tmp) as out:
                    out.write(data)
                self.fs.move(tmp, path)
            finally:
                if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    self.fs.delete_file(tmp)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def names(self) -> list[str]:
        selector = pafs.FileSelector(self.folder, allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.base_name.endswith(".json"))


__all__ = ["CHECKPOINTS_DIR", "Checkpoint", "CheckpointStore", "checkpoint_name", "keys_folder", "recs_folder"]
