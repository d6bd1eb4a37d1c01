"""Nearest-neighbour search over item embeddings (inner product on L2-normalised vectors = cosine).

Small catalogues are searched exactly (``faiss.IndexFlatIP``); above ``exact_max_items`` an approximate
FAISS index is built: IVF-Flat by default (k-means lists, deterministic for a given seed), or HNSW on
request. Both keep the full vectors, so the scores they return are exact inner products; only the
candidate set is approximate, and :func:`measure_recall` says how approximate (the registry records it).

An index is saved as three files in one folder, written through a ``pyarrow.fs`` filesystem so the same
code serves ``file://`` and ``s3://``::

    index.faiss       faiss.serialize_index bytes (vectors and lists / graph)
    item_ids.parquet  item_id (string), row i = faiss position i
    meta.json         kind, metric, dim, items, resolved params, faiss version

No torch here: the index only ever sees numpy arrays.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IndexKind = Literal["auto", "exact", "ivf", "hnsw"]
KINDS: tuple[str, ...] = ("auto", "exact", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.parquet"
META_FILE = "meta.json"
INDEX_FILES: tuple[str, ...] = (INDEX_FILE, IDS_FILE, META_FILE)
FORMAT_VERSION = 1
RECALL_K = 100
# Embeddings must be unit vectors; this much drift (float32 rounding, fp16 round trips) is tolerated.
_NORM_TOLERANCE = 1e-3
# faiss warns (and trains badly) with fewer than 39 training points per IVF list.
_MIN_POINTS_PER_LIST = 39
# Over-fetch rounds before the remaining rows of a batch fall back to an exhaustive search.
_MAX_ESCALATIONS = 4

# Exact scores held at once by measure_recall (float32 count).
_SCORE_BLOCK = 16 * 1024 * 1024

_threads_configured = False


@dataclass(frozen=True)
class AnnParams:
    """Build and search knobs. ``None`` means "derive from the catalogue size" (see :func:`build_index`)."""

    # -- IVF: number of k-means lists; default 4*sqrt(N), capped so every list trains on >= 39 points.
    nlist: int | None = None
    # -- IVF: lists scanned per query; default max(32, nlist/32). Higher = better recall, slower search.
    nprobe: int | None = None
    # -- HNSW: graph degree, construction and search beam widths (efSearch is raised to k when smaller).
    hnsw_m: int = 32
    ef_construction: int = 100
    ef_search: int = 256
    # -- k-means seed, so an IVF rebuild from the same embeddings gives the same index bytes.
    seed: int = 0


def configure_threads(threads: int | None = None) -> int:
    """Set faiss's OpenMP thread count and return it.

    Default: ``OMP_NUM_THREADS`` when set (Ray sets it from a task's ``num_cpus``), else the CPUs this
    process may use (affinity and the cgroup quota of a pod, not the node's core count: oversubscribed
    OpenMP threads spin and slow everything on the node down).
    """
    global _threads_configured
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else _usable_cpus()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    faiss.omp_set_num_threads(threads)
    _threads_configured = True
    return threads


def _usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2 quota, e.g. "200000 100000" = 2 CPUs; "max ..." = unlimited
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _ensure_threads() -> None:
    """Configure threads once per process, unless the caller already chose with configure_threads."""
    if not _threads_configured:
        configure_threads()


class AnnIndex:
    """A searchable index over item embeddings; row ``i`` of the faiss index is ``item_ids[i]``."""

    def __init__(self, kind: str, item_ids: np.ndarray, index: faiss.Index,
                 params: Mapping[str, Any]) -> None:
        if kind not in ("exact", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind {kind!r}")
        if index.ntotal != len(item_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(item_ids)} item ids were given")
        self.kind = kind
        self.item_ids = item_ids
        self.params = dict(params)
        self._index = index
        # Position -1 (faiss's "no result") indexes this trailing "" - the padding id.
        self._ids_padded = np.append(item_ids.astype(object), "")
        self._positions: dict[str, int] | None = None

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def info(self) -> dict[str, Any]:
        """What the manifest records about this index."""
        return {"kind": self.kind, "metric": "inner_product", "dim": self.dim, "items": len(self),
                "params": dict(self.params), "faiss_version": faiss.__version__}

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[Iterable[str] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items per query: ``(item_ids [B, k] object array of str, scores [B, k] float32)``.

        ``exclude[b]`` (ids, e.g. what user b already bought) never appears in row b; the index is asked
        for extra candidates so each row still gets k results. Only when the catalogue has fewer than k
        eligible items is a row padded, with id ``""`` and score ``-inf``.
        """
        positions, scores = self._search_positions(queries, k, exclude)
        return self._ids_padded[positions], scores

    def _search_positions(self, queries: np.ndarray, k: int,
                          exclude: Sequence[Iterable[str] | None] | None) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(queries, "queries", dim=self.dim)
        excluded = self._excluded_positions(exclude, len(q))
        out_pos = np.full((len(q), k), -1, dtype=np.int64)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        longest = max((e.size for e in excluded), default=0) if excluded is not None else 0
        pending = np.arange(len(q))
        # k + the longest exclusion list is always enough from an exhaustive search; an approximate one
        # may return fewer candidates than asked (an IVF probe that visits few lists, an HNSW beam
        # narrower than k + exclusions), so short rows are retried with a wider probe and beam, and in
        # the last round exhaustively. Exact search is exhaustive from the start.
        fetch = min(len(self), k + longest)
        for round_ in range(_MAX_ESCALATIONS + 1):
            final = self.kind == "exact" or round_ == _MAX_ESCALATIONS
            scores, pos = self._raw_search(q[pending], fetch, effort=2**round_, exhaustive=final)
            done = np.zeros(len(pending), dtype=bool)
            if excluded is None and pos.shape[1] >= k:  # the common case, vectorised
                done = (pos[:, :k] >= 0).all(axis=1)
                out_pos[pending[done]] = pos[done, :k]
                out_scores[pending[done]] = scores[done, :k]
            for row in np.flatnonzero(~done):
                b = pending[row]
                got = self._usable(pos[row], None if excluded is None else excluded[b])[:k]
                if got.size == k or final:  # a final short row is padded (catalogue too small)
                    out_pos[b, : got.size] = pos[row, got]
                    out_scores[b, : got.size] = scores[row, got]
                    done[row] = True
            pending = pending[~done]
            if pending.size == 0:
                break
            fetch = min(len(self), fetch * 2)
        return out_pos, out_scores

    @staticmethod
    def _usable(pos: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
        """Column indexes of the usable results in one row: real positions, not excluded, in rank order."""
        keep = pos >= 0
        if excluded is not None and excluded.size:
            keep &= ~np.isin(pos, excluded)
        return np.flatnonzero(keep)

    def _raw_search(self, q: np.ndarray, fetch: int, *, effort: int,
                    exhaustive: bool) -> tuple[np.ndarray, np.ndarray]:
        """faiss search with per-call parameters (the shared index is never mutated, so concurrent
        searches from Serve threads are safe)."""
        _ensure_threads()
        if self.kind == "ivf":
            nlist = int(self.params["nlist"])
            nprobe = nlist if exhaustive else min(nlist, int(self.params["nprobe"]) * effort)
            return self._index.search(q, fetch, params=faiss.SearchParametersIVF(nprobe=nprobe))
        if self.kind == "hnsw":
            if exhaustive:  # the graph's flat storage holds every vector: an exact last resort
                return faiss.downcast_index(self._index.storage).search(q, fetch)
            ef = max(int(self.params["ef_search"]) * effort, fetch)
            return self._index.search(q, fetch, params=faiss.SearchParametersHNSW(efSearch=ef))
        return self._index.search(q, fetch)

    def _excluded_positions(self, exclude: Sequence[Iterable[str] | None] | None,
                            batch: int) -> list[np.ndarray] | None:
        if exclude is None:
            return None
        if len(exclude) != batch:
            raise ValueError(f"exclude has {len(exclude)} entries for {batch} queries")
        if self._positions is None:  # built on first use: serving without exclusions never pays for it
            self._positions = {item: i for i, item in enumerate(self.item_ids.tolist())}
        lookup = self._positions
        out = []
        for ids in exclude:
            found = [] if ids is None else [lookup[i] for i in ids if i in lookup]  # unknown ids: ignored
            out.append(np.asarray(found, dtype=np.int64))
        return out

    def to_files(self) -> dict[str, bytes]:
        """The index as ``{file name: bytes}`` (see the module docstring); deterministic for equal input."""
        ids = pa.table({"item_id": pa.array(self.item_ids.tolist(), type=pa.string())})
        buf = io.BytesIO()
        pq.write_table(ids, buf, compression="snappy")
        meta = {"format": FORMAT_VERSION, **self.info()}
        return {
            INDEX_FILE: faiss.serialize_index(self._index).tobytes(),
            IDS_FILE: buf.getvalue(),
            META_FILE: (json.dumps(meta, sort_keys=True, indent=2) + "\n").encode(),
        }

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> AnnIndex:
        missing = [name for name in INDEX_FILES if name not in files]
        if missing:
            raise ValueError(f"index files missing: {', '.join(missing)}")
        meta = json.loads(files[META_FILE])
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported index format {meta.get('format')!r} (expected {FORMAT_VERSION})")
        index = faiss.deserialize_index(np.frombuffer(files[INDEX_FILE], dtype=np.uint8).copy())
        ids = pq.read_table(pa.BufferReader(files[IDS_FILE])).column("item_id").to_numpy(zero_copy_only=False)
        if index.ntotal != meta["items"] or index.d != meta["dim"]:
            raise ValueError("index.faiss does not match meta.json (items or dim differ)")
        return cls(meta["kind"], ids.astype(object), index, meta["params"])

    def save(self, fs: pafs.FileSystem, path: str) -> None:
        """Write the index files into folder ``path`` (each file whole: write-then-rename locally, one
        upload on S3)."""
        for name, data in self.to_files().items():
            write_bytes_atomic(fs, posixpath.join(path, name), data)

    @classmethod
    def load(cls, fs: pafs.FileSystem, path: str) -> AnnIndex:
        files = {}
        for name in INDEX_FILES:
            with fs.open_input_stream(posixpath.join(path, name)) as stream:
                files[name] = stream.read()
        return cls.from_files(files)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see no file or the whole file (the same rule as
    :func:`streamrec.lake.write_parquet_atomic`): a hidden temporary file then a rename locally; on S3
    an object only becomes visible when its upload completes, so it is written in place."""
    if isinstance(fs, pafs.LocalFileSystem):
        directory = posixpath.dirname(path)
        fs.create_dir(directory, recursive=True)
        tmp = posixpath.join(directory, f".{posixpath.basename(path)}.{os.urandom(8).hex()}.tmp")
        try:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, path)
        except BaseException:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
            raise
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def resolve_kind(kind: IndexKind | str, items: int, exact_max_items: int) -> str:
    """``auto`` is exact search up to ``exact_max_items`` items, IVF above."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "auto":
        return "exact" if items <= exact_max_items else "ivf"
    return kind


def build_index(item_ids: Sequence[str] | np.ndarray, embeddings: np.ndarray, *,
                exact_max_items: int = 50_000, kind: IndexKind = "auto",
                params: AnnParams | None = None) -> AnnIndex:
    """Index ``embeddings`` (float32 [N, D], rows L2-normalised, row i belongs to ``item_ids[i]``)."""
    ids = _as_ids(item_ids)
    x = _as_matrix(embeddings, "embeddings")
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} item ids but {len(x)} embedding rows")
    if len(x) == 0:
        raise ValueError("cannot index an empty catalogue")
    norms = np.linalg.norm(x, axis=1)
    if np.any(np.abs(norms - 1.0) > _NORM_TOLERANCE):
        bad = int(np.argmax(np.abs(norms - 1.0)))
        raise ValueError(f"embeddings must be L2-normalised; row {bad} ({ids[bad]!r}) "
                         f"has norm {norms[bad]:.4f}")
    p = params or AnnParams()
    _ensure_threads()
    chosen = resolve_kind(kind, len(x), exact_max_items)
    if chosen == "exact":
        index: faiss.Index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return AnnIndex("exact", ids, index, {})
    if chosen == "ivf":
        return _build_ivf(ids, x, p)
    return _build_hnsw(ids, x, p)


def _build_ivf(ids: np.ndarray, x: np.ndarray, p: AnnParams) -> AnnIndex:
    n, dim = x.shape
    nlist = p.nlist or max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))
    nlist = min(nlist, n)
    nprobe = min(nlist, p.nprobe or max(32, math.ceil(nlist / 32)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = p.seed  # k-means init and its training subsample
    index.train(x)
    index.add(x)
    index.nprobe = nprobe  # the default for anyone using the raw faiss index; our searches pass it per call
    return AnnIndex("ivf", ids, index, {"nlist": nlist, "nprobe": nprobe, "seed": p.seed})


def _build_hnsw(ids: np.ndarray, x: np.ndarray, p: AnnParams) -> AnnIndex:
    index = faiss.IndexHNSWFlat(x.shape[1], p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = p.ef_construction
    index.hnsw.efSearch = p.ef_search
    # Levels come from faiss's fixed-seed generator; the parallel insertion can still order link updates
    # differently between runs, so HNSW builds are reproducible in quality (recall), not always in bytes.
    index.add(x)
    return AnnIndex("hnsw", ids, index,
                    {"hnsw_m": p.hnsw_m, "ef_construction": p.ef_construction, "ef_search": p.ef_search})


def recall_queries(embeddings: np.ndarray, n: int = 1_000, *, noise: float = 0.1,
                   seed: int = 0) -> np.ndarray:
    """Queries for :func:`measure_recall` at build time, when no user vectors are at hand: random items
    moved by a random offset of length ~``noise``, re-normalised (so a query is near, not on, an item)."""
    x = _as_matrix(embeddings, "embeddings")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=min(n, len(x)), replace=False)
    q = x[rows] + rng.normal(scale=noise / math.sqrt(x.shape[1]), size=(len(rows), x.shape[1]))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32)


def measure_recall(index: AnnIndex, embeddings: np.ndarray, queries: np.ndarray, k: int = RECALL_K) -> float:
    """Recall@k of ``index`` against exact inner-product search over ``embeddings`` (aligned with
    ``index.item_ids``).

    A returned item counts as a hit when its true score reaches the exact k-th best score, so ties at the
    cut-off (duplicate vectors) are not counted as misses.
    """
    x = _as_matrix(embeddings, "embeddings", dim=index.dim)
    q = _as_matrix(queries, "queries", dim=index.dim)
    if len(x) != len(index):
        raise ValueError(f"{len(x)} embeddings for an index of {len(index)} items")
    k = min(k, len(x))
    positions, _ = index._search_positions(q, k, None)
    hits = 0
    rows = max(1, min(256, _SCORE_BLOCK // len(x)))  # bounded memory: ~64 MB of exact scores at a time
    for start in range(0, len(q), rows):
        block = q[start:start + rows]
        exact = block @ x.T
        kth = -np.partition(-exact, k - 1, axis=1)[:, k - 1]
        pos = positions[start:start + rows]
        true = np.take_along_axis(exact, np.maximum(pos, 0), axis=1)
        hits += int(np.sum((pos >= 0) & (true >= kth[:, None] - 1e-5)))
    return hits / (len(q) * k)


def _as_matrix(values: np.ndarray, name: str, *, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(values, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the index has {dim}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def _as_ids(item_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    ids = np.asarray(list(item_ids), dtype=object)
    if not all(isinstance(i, str) and i for i in ids):
        raise ValueError("item ids must be non-empty strings")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("item ids must be unique")
    return ids
