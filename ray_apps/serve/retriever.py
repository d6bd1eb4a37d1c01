"""The model side of serving: the promoted version's two-tower model and ANN index, swapped atomically.

:class:`Retriever` is plain Python (the Serve deployment in :mod:`ray_apps.serve.app` wraps it, the
tests use it directly). A version is loaded completely (weights, item embeddings, index, all
checksum-verified by the registry) BEFORE it replaces the active one in a single reference assignment,
so a request sees either the old version or the new one, never a mix: requests in flight keep the
:class:`LoadedVersion` they started with, and the old one is freed when the last of them finishes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ray_apps.ann import AnnIndex
from ray_apps.encoding import encode_users
from ray_apps.model import TwoTowerModel, as_tensors
from ray_apps.registry import ModelRegistry, embeddings_matrix
from ray_apps.serve.chain import RealtimeQuery

logger = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """No model version is promoted (or none could be loaded) yet."""


@dataclass(frozen=True)
class LoadedVersion:
    version: str
    model: TwoTowerModel
    index: AnnIndex
    positions: dict[str, int]
    embeddings: np.ndarray


def load_version(registry: ModelRegistry, version: str) -> LoadedVersion:
    """Everything one version needs to answer, on CPU (serving replicas are CPU pods)."""
    from ray_apps.score import load_scoring_model

    model, index = load_scoring_model(registry, version, device="cpu")
    ids, vectors = embeddings_matrix(registry.load_item_embeddings(version))
    positions = {item: i for i, item in enumerate(ids.tolist())}
    return LoadedVersion(version, model, index, positions, np.ascontiguousarray(vectors, dtype=np.float32))


class Retriever:
    def __init__(self, registry: ModelRegistry, region: str) -> None:
        self.registry = registry
        self.region = region
        self._active: LoadedVersion | None = None
        self._load_lock = threading.Lock()  # one load at a time; readers never take it

    @property
    def version(self) -> str | None:
        active = self._active
        return None if active is None else active.version

    def refresh(self) -> bool:
        """Load and activate the promoted version if it is not the active one; True when it swapped.
        Registry errors propagate (the caller logs them and keeps serving the active version)."""
        promoted = self.registry.promoted()
        if promoted is None or promoted.version == self.version:
            return False
        return self.activate(promoted.version)

    def activate(self, version: str) -> bool:
        with self._load_lock:
            if version == self.version:
                return False
            loaded = load_version(self.registry, version)  # may take seconds; the old one keeps serving
            self._warm_up(loaded)
            previous = self.version
            self._active = loaded  # the swap: one reference assignment
        logger.info("model version %s active (was %s)", version, previous)
        return True

    def _warm_up(self, loaded: LoadedVersion) -> None:
        """Run the real-time path on the new version before it serves: PyTorch's first forward pass
        (allocator, thread pool, kernel selection) and the index's first search take far longer than the
        real-time step's budget (serve.realtime_timeout_ms), so without this the first clicks after a
        start or a swap would fall back to popularity."""
        history = list(itertools.islice(loaded.positions, 1))  # any one item (not a list of them all)
        for _ in range(3):
            _recommend(loaded, self.region, [RealtimeQuery(history, 10, history, None)])

    def _current(self) -> LoadedVersion:
        active = self._active
        if active is None:
            raise NoModelError("no model version is loaded yet")
        return active

    def recommend(self, history: Sequence[str], k: int, exclude: Sequence[str] = (),
                  hour: int | None = None) -> tuple[list[str], list[float], str]:
        """Top ``k`` items for a user known only by their recent items (oldest first): the user tower
        on that history, then the ANN index, leaving out ``exclude``."""
        return self.recommend_many([RealtimeQuery(list(history), k, list(exclude), hour)])[0]

    def recommend_many(self, queries: Sequence[RealtimeQuery]) -> list[tuple[list[str], list[float], str]]:
        """:meth:`recommend` for several users at once, all on the same version: one user-tower pass
        and one index search for the batch (what Serve's request batching hands the deployment)."""
        return _recommend(self._current(), self.region, queries)

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float], str]:
        """The ``k`` items nearest to ``item_id`` in the item-embedding space (itself left out).
        KeyError when the active version does not know the item."""
        active = self._current()
        row = active.positions.get(item_id)
        if row is None:
            raise KeyError(item_id)
        ids, scores = active.index.search(active.embeddings[row: row + 1], k, exclude=[[item_id]])
        return _row(ids[0], scores[0], active.version)


def _recommend(loaded: LoadedVersion, region: str,
               queries: Sequence[RealtimeQuery]) -> list[tuple[list[str], list[float], str]]:
    """The real-time path on ``loaded``: the user tower on every query's history (one pass), one index
    search with the largest ``k`` asked, each row cut to its own ``k``."""
    import torch

    encoded = encode_users([q.history for q in queries], region, None, [q.hour for q in queries], None,
                           config=loaded.model.config)
    with torch.inference_mode():
        vectors = loaded.model.user_embeddings(as_tensors(encoded, "cpu")).float().numpy()
    ids, scores = loaded.index.search(vectors, max(q.k for q in queries), exclude=[q.exclude for q in queries])
    return [_row(ids[i, :q.k], scores[i, :q.k], loaded.version) for i, q in enumerate(queries)]


def _row(ids: np.ndarray, scores: np.ndarray, version: str) -> tuple[list[str], list[float], str]:
    """One query's result as plain lists, without the padding of a catalogue shorter than k."""
    keep = ids != ""
    return ids[keep].tolist(), scores[keep].astype(float).tolist(), version
