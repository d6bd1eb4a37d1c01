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
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IndexKind = Literal["auto", "exact", "ivf", "hnsw"]
KINDS: tuple[str, ...] = ("auto", "exact", "ivf", "hnsw")
# Ids to leave out of each query's results: one iterable (or None) per query, or an Arrow list<string>
# array with one list (or null) per query.
Exclusions = Sequence[Iterable[str] | None] | pa.Array | pa.ChunkedArray | None
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
# Candidates one step of the pairwise exclusion check gathers at most (bounds its memory).
_MASK_CHUNK = 1 << 20

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
        self._ids_arrow: pa.StringArray | None = None

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def info(self) -> dict[str, Any]:
        """What the manifest records about this index."""
        return {"kind": self.kind, "metric": "inner_product", "dim": self.dim, "items": len(self),
                "params": dict(self.params), "faiss_version": faiss.__version__}

    @property
    def item_ids_arrow(self) -> pa.StringArray:
        """The item ids as an Arrow string array (element ``i`` = faiss position ``i``), built on first
        use: ``item_ids_arrow.take(positions)`` turns search results into Arrow columns without Python
        strings."""
        if self._ids_arrow is None:
            self._ids_arrow = pa.array(self.item_ids.tolist(), type=pa.string())
        return self._ids_arrow

    def search(self, queries: np.ndarray, k: int,
               exclude: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items per query: ``(item_ids [B, k] object array of str, scores [B, k] float32)``.

        ``exclude[b]`` (ids, e.g. what user b already bought) never appears in row b; the index is asked
        for extra candidates so each row still gets k results. Only when the catalogue has fewer than k
        eligible items is a row padded, with id ``""`` and score ``-inf``. ``exclude`` is one iterable
        of ids (or None) per query, or an Arrow ``list<string>`` array with one list (or null) per
        query; ids not in the catalogue are ignored. See :meth:`search_positions`.
        """
        positions, scores = self.search_positions(queries, k, exclude)
        return self._ids_padded[positions], scores

    def search_positions(self, queries: np.ndarray, k: int,
                         exclude: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` as faiss positions: ``(positions [B, k] int64, -1 = padding; scores [B, k]
        float32, -inf = padding)``. Usable results come first in each row, best first.

        Exclusion is vectorised: the index is asked once for ``k`` + the longest exclusion list of the
        batch, every (row, excluded position) pair is compared with that row's candidates, rows whose
        first ``k`` candidates all stand (most rows) are copied as they are, and only the others are
        compacted (the first ``k`` remaining candidates, by a cumulative count). A row an approximate
        index left short is searched again (see below); the rest of the batch is done.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(queries, "queries", dim=self.dim)
        n = len(q)
        pairs = self._exclusion_pairs(exclude, n)
        out_pos = np.full((n, k), -1, dtype=np.int64)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        if n == 0:
            return out_pos, out_scores
        # Excluded ids per row, duplicates included (an id listed twice costs one extra candidate).
        per_row = np.bincount(pairs[0], minlength=n) if pairs is not None else None
        longest = int(per_row.max(initial=0)) if per_row is not None else 0
        pending = np.arange(n)
        # k + the longest exclusion list is always enough from an exhaustive search; an approximate one
        # may return fewer candidates than asked (an IVF probe that visits few lists, an HNSW beam
        # narrower than k + exclusions), so short rows are retried with a wider probe and beam, and in
        # the last round exhaustively. Exact search is exhaustive from the start.
        fetch = min(len(self), k + longest)
        for round_ in range(_MAX_ESCALATIONS + 1):
            final = self.kind == "exact" or round_ == _MAX_ESCALATIONS
            scores, pos = self._raw_search(q[pending], fetch, effort=2**round_, exhaustive=final)
            keep = pos >= 0
            if pairs is not None:
                keep &= ~self._excluded_mask(pos, pending, pairs, n)
            # The compaction below costs several times the copy of a row: only rows that need it get it.
            whole = keep[:, :k].all(axis=1) if pos.shape[1] >= k else np.zeros(len(pending), dtype=bool)
            if whole.any():
                out_pos[pending[whole]] = pos[whole, :k]
                out_scores[pending[whole]] = scores[whole, :k]
            part = np.flatnonzero(~whole)
            if part.size == 0:
                break
            keep, pos, scores = keep[part], pos[part], scores[part]
            rank = np.cumsum(keep, axis=1)  # rank[r, c]: usable candidates in row r up to column c
            done = (rank[:, -1] >= k) if not final else np.ones(len(part), dtype=bool)
            take = keep & (rank <= k) & done[:, None]
            rows, cols = np.nonzero(take)  # row-major: each row's columns in rank order
            dest = pending[part[rows]], rank[rows, cols] - 1
            out_pos[dest] = pos[rows, cols]
            out_scores[dest] = scores[rows, cols]
            pending = pending[part[~done]]
            if pending.size == 0:
                break
            fetch = min(len(self), fetch * 2)
        return out_pos, out_scores

    def _excluded_mask(self, pos: np.ndarray, pending: np.ndarray, pairs: tuple[np.ndarray, np.ndarray],
                       batch: int) -> np.ndarray:
        """``[len(pending), fetch]`` bool: candidate ``pos[r, c]`` is excluded for query ``pending[r]``
        (faiss's -1, "no result", matches nothing).

        Two ways, the cheaper for the batch: comparing each (row, excluded position) pair with its row's
        candidates costs ``pairs x fetch``; one sorted search of every candidate of the rows with
        exclusions among the pairs' codes costs ``rows x fetch x log2(pairs)``. Short exclusion lists
        (a few purchases a user) favour the first, long ones the second."""
        ex_rows, ex_pos = pairs
        slot = np.full(batch, -1, dtype=np.int64)
        slot[pending] = np.arange(len(pending))
        mine = slot[ex_rows]
        ok = mine >= 0  # pairs of rows searched in this round
        rows, excluded = mine[ok], ex_pos[ok]
        mask = np.zeros(pos.shape, dtype=bool)
        if rows.size == 0:
            return mask
        with_exclusions = np.unique(rows)
        if rows.size <= with_exclusions.size * max(1.0, np.log2(rows.size)):
            # In chunks of pairs, so a batch of long lists never gathers more than _MASK_CHUNK candidates.
            step = max(1, _MASK_CHUNK // pos.shape[1])
            for at in range(0, rows.size, step):
                r, e = rows[at:at + step], excluded[at:at + step]
                hit, col = np.nonzero(pos[r] == e[:, None])
                mask[r[hit], col] = True
            return mask
        # Codes row * (N + 1) + position + 1 are unique per (row, item) and never match a -1.
        stride = len(self) + 1
        codes = np.unique(rows * stride + excluded + 1)
        cand = with_exclusions[:, None] * stride + pos[with_exclusions] + 1
        at = np.minimum(np.searchsorted(codes, cand), codes.size - 1)
        mask[with_exclusions] = codes[at] == cand
        return mask

    def _exclusion_pairs(self, exclude: Exclusions, batch: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(rows, positions)`` int64: one pair per excluded id found in the catalogue (an id listed
        twice for a row gives two pairs; unknown ids none). None when nothing is excluded at all."""
        if exclude is None:
            return None
        if isinstance(exclude, (pa.Array, pa.ChunkedArray)):
            lists = exclude.combine_chunks() if isinstance(exclude, pa.ChunkedArray) else exclude
            if len(lists) != batch:
                raise ValueError(f"exclude has {len(lists)} entries for {batch} queries")
            if not pa.types.is_list(lists.type) and not pa.types.is_large_list(lists.type):
                raise TypeError(f"exclude must be an Arrow list array, got {lists.type}")
            rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
            flat = pc.list_flatten(lists).to_pylist()
        else:
            if len(exclude) != batch:
                raise ValueError(f"exclude has {len(exclude)} entries for {batch} queries")
            flat, counts = [], np.zeros(batch, dtype=np.int64)
            for b, ids in enumerate(exclude):
                if ids is not None:
                    before = len(flat)
                    flat.extend(ids)
                    counts[b] = len(flat) - before
            rows = np.repeat(np.arange(batch, dtype=np.int64), counts)
        if self._positions is None:  # built on first use: serving without exclusions never pays for it
            self._positions = {item: i for i, item in enumerate(self.item_ids.tolist())}
        lookup = self._positions
        found = np.fromiter((lookup.get(i, -1) if isinstance(i, str) else -1 for i in flat),
                            dtype=np.int64, count=len(flat))
        known = found >= 0
        return rows[known], found[known]

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
    positions, _ = index.search_positions(q, k)
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
