"""Training throughput through Ray Train against a plain PyTorch loop of the same model, in the same run.

Set-up (not timed): a synthetic train split (``benchmarks.synthetic_features``: the ETL's example schema,
``--rows`` examples, up to 50-item histories from per-user click sequences, Zipf items over ``--items``)
written as Parquet where the ETL writes it, ``features/region=R/dt=D/examples/split=train/`` of a
temporary ``file://`` lake, four files.

Size. The default model (``TwoTowerConfig()``: a 2^18 x 64 id table, 17.1M parameters) costs about a
second per 1,024-row step on 2 cores, most of it in AdamW's dense update of the whole id table and in
backward, so the default is 20,000 rows x 3 epochs (20 steps an epoch) to stay near 10 minutes for
the baseline and two Ray layouts; ``--rows`` scales it.

Path measured: ``ray_apps.train.train(settings, region, day, warm_start=None)``, the real thing:
TorchTrainer, Ray Data ``read_parquet → random_shuffle`` streamed into the workers, DDP (gloo), a
checkpoint every epoch (~200 MB: weights and AdamW moments). Settings are the project defaults (global
batch 1,024, AdamW, lr 0.003) except the epochs and the worker layout, one of:

- ``single``: 1 worker with all C cores (``cpus_per_worker = C``). Ray Data's read and shuffle tasks need
  a CPU of their own, which a C-CPU cluster no longer has (it waits forever), so Ray is started with
  C + 1 *logical* CPUs: the worker's ``OMP_NUM_THREADS`` (and so torch's thread count, logged from inside
  the worker) is C, Ray Data gets the spare logical CPU, and all share the C physical cores. **This is
  the fair comparison and carries the ratio target**: the same C torch threads in one process as the
  baseline, the same arithmetic, so the ratio is what Ray Train and Ray Data add.
- ``local_default``: the local default, 2 workers x 0.5 CPU on a C-CPU cluster (``TrainSettings``'
  defaults, what ``make demo`` runs): two 1-thread DDP workers on the same cores, each holding the whole
  model and optimizer and updating all of it, plus a gloo all-reduce of the whole gradient every step.
- ``single_materialized`` (not by default): ``single`` with a PROTOTYPE of a proposed change to
  ``train()``: ``.random_shuffle(seed).materialize()`` (Ray Data's ``random_shuffle`` is wrapped on the
  driver for the call), so the epochs stream the shuffled blocks from the object store instead of
  re-reading and re-shuffling the split every epoch.

Figures: ``train_samples_per_s`` = the in-loop steady state, rows / seconds of the epochs after the first
(``TrainResult.epochs``: each epoch's timer runs in the worker from its first batch request to the
all-reduce of its totals, so Ray start-up, the trainer's start and checkpoints are outside it), against
the plain loop's steady state. ``train_wall_samples_per_s`` = rows x epochs / wall seconds of the whole
``train()`` call (driver scan of the split, trainer and worker start, every epoch, checkpoints, the
driver's load of the last one), against the plain loop's wall rate (model construction and every
epoch). ``ray.init`` itself is timed apart (the cluster is started before the clock starts).
Layouts other than ``single`` get the suffix ``_<layout>``.

Baseline: a plain PyTorch loop in this process, ``torch.set_num_threads(C)``: the same ``TwoTowerModel``
config and seed, the same log-Q counts, AdamW with the same hyperparameters, the same global batch, and
the same per-batch function ``ray_apps.train.train_epoch``. Each epoch it reads the same Parquet files
with pyarrow and permutes them in memory (a seeded ``take``): the work Ray Data's read + random_shuffle
does each epoch, done the plain way; read and shuffle seconds are reported. It encodes each batch in
the loop (``encode_examples``), as a notebook does; ``train()`` encodes in Ray Data's read tasks, ahead
of the workers, and once for all epochs when it holds the split in memory, so the steady-state ratio
also counts what that saves (the baseline's ``encode`` seconds say how much).

Where the time goes: every epoch, in the baseline and inside each Ray Train worker, the time spent
waiting for batches (Ray Data's iterator; ``first_batch_wait`` is the part before the first batch),
encoding (the baseline only), forward, ``optimizer.step`` and the rest (backward, incl. DDP's
all-reduce) is measured with timers around the real functions: the worker runs
``ray_apps.train.train_loop_per_worker`` itself, wrapped to time its ``train_epoch`` calls and log
``torch.get_num_threads()`` (a few perf_counter calls per step; ``--no-profile`` runs without).
Clock marks from rank 0 split ``train()``'s wall time into before the worker loop (driver scan,
trainer, workers, process group, dataset), worker set-up, epochs, between epochs (totals, checkpoint
save and report) and after the loop. A separate 2-process gloo
all-reduce of a tensor the size of the model says what DDP pays per step for the dense id table.

Repeats alternate baseline / layouts (``--repeats``, the best of each is kept). On CUDA (``--device``
cuda, or auto with a GPU): ``train.use_gpu=yes`` (bf16 autocast), global batch 8,192, ``single`` only;
the phase timers then measure host time (the epoch totals are synchronised).

    python -m benchmarks.train [--quick] [--rows N] [--epochs E] [--configs single,local_default]
                               [--device auto|cpu|cuda] [--repeats R]

Target (issue): ratio >= 0.8 (Ray Train / plain loop, same data, model and batch size).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.common import emit, ray_cluster

REGION = "us-east-1"
DAY = date(2026, 11, 25)
PROBE_ENV = "BENCH_TRAIN_PROBE_DIR"  # where the wrapped worker loop writes its timings (not a setting)
PHASES = ("data_wait", "encode", "forward", "optimizer_step", "backward_and_rest")
# first_batch_wait: the part of data_wait before the first batch; cpu_s: the process's CPU seconds
REPORTED = (*PHASES, "first_batch_wait", "cpu_s")


@dataclass(frozen=True)
class Layout:
    """A Ray Train worker layout and the logical CPUs Ray is started with."""

    name: str
    workers: int
    cpus_per_worker: float
    ray_cpus: int
    # A prototype of a proposed ray_apps/train.py change, not the code as it is: the shuffled split is
    # materialized in the object store once, before fit(), instead of being re-read and re-shuffled by
    # Ray Data in every epoch (the permutation is the same every epoch anyway).
    materialize: bool = False


def layouts(cores: int, names: Sequence[str], device: str) -> list[Layout]:
    known = {
        "single": Layout("single", 1, float(cores), cores + 1),
        "local_default": Layout("local_default", 2, 0.5, cores),
        "single_materialized": Layout("single_materialized", 1, float(cores), cores + 1, materialize=True),
    }
    out = []
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(known)}")
        if device == "cuda" and known[name].workers > 1:
            print(f"skipping config {name}: {known[name].workers} workers need as many GPUs", file=sys.stderr)
            continue
        out.append(known[name])
    return out


# --------------------------------------------------------------------------------------------------------
# Set-up: settings and the synthetic train split (not timed)
# --------------------------------------------------------------------------------------------------------

def make_settings(lake_root: Path, *, layout: Layout | None, use_gpu: str, epochs: int, batch_size: int,
                  model: dict[str, Any] | None = None, object_store_bytes: int = 512 * 1024 * 1024) -> Any:
    from streamrec.settings import RegionSettings, load_settings

    region = RegionSettings.default_for(REGION, f"file://{lake_root}")
    train: dict[str, Any] = {"use_gpu": use_gpu, "epochs": epochs, "batch_size": batch_size,
                             "gpu_batch_size": batch_size, "warm_start": False, "model": model or {},
                             "object_store_bytes": object_store_bytes}
    if layout is not None:
        train.update(workers=layout.workers, cpus_per_worker=layout.cpus_per_worker)
    return load_settings(None, regions={REGION: region.model_dump()}, train=train)


def build_split(settings: Any, rows: int, items: int, seed: int) -> dict[str, Any]:
    from benchmarks import synthetic_features as sf
    from ray_apps.train import FeaturePaths

    t0 = time.perf_counter()
    paths = FeaturePaths.for_day(settings, REGION, DAY)
    table = sf.examples_table(rows, sf.catalogue(items, seed), history_length=settings.etl.history_length,
                              seed=seed)
    # Four files (as Spark's four shuffle partitions would write at this size): Ray Data reads in parallel.
    files = sf.write_parquet(paths.fs, table, paths.train, files=4,
                             row_group_bytes=settings.etl.row_group_bytes)
    return {"rows": table.num_rows, "files": len(files), "bytes": sum(Path(f).stat().st_size for f in files),
            "items": items, "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------------
# Timers around the real per-batch code (used in the baseline and inside each Ray Train worker)
# --------------------------------------------------------------------------------------------------------

def profiled_train_epoch(original: Any, model: Any, optimizer: Any, batches: Any, *args: Any,
                         **kwargs: Any) -> tuple[Any, dict]:
    """``original`` (``ray_apps.train.train_epoch``) with timers: the batch iterator's waits, the
    model's forward (hooks), ``optimizer.step``; backward + DDP's all-reduce + the rest is the remainder.
    ``encode`` stays 0 here: in Ray Train the batches arrive encoded (Ray Data's read tasks encode them);
    the plain loop encodes inside its iterator and moves that time from ``data_wait`` itself."""
    t: dict[str, float] = {p: 0.0 for p in PHASES}

    def timed_batches() -> Iterator[Any]:
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                t["data_wait"] += time.perf_counter() - start
                return
            t["data_wait"] += time.perf_counter() - start
            t.setdefault("first_batch_wait", time.perf_counter() - start)
            yield batch

    forward_start: list[float] = []

    def pre_hook(*_: Any) -> None:
        forward_start.append(time.perf_counter())

    def post_hook(*_: Any) -> None:
        t["forward"] += time.perf_counter() - forward_start.pop()

    step = optimizer.step

    def timed_step(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return step(*a, **k)
        finally:
            t["optimizer_step"] += time.perf_counter() - start

    handles = [model.register_forward_pre_hook(pre_hook), model.register_forward_hook(post_hook)]
    optimizer.step = timed_step
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = original(model, optimizer, timed_batches(), *args, **kwargs)
    finally:
        total = time.perf_counter() - start
        t["cpu_s"] = time.process_time() - cpu_start  # this process, all its threads
        del optimizer.step  # the instance attribute; the class's step is back
        for handle in handles:
            handle.remove()
    t["backward_and_rest"] = total - sum(t[p] for p in PHASES if p != "backward_and_rest")
    t["total"] = total
    t["steps"] = result[1]
    t["rows"] = result[2]
    return result, t


def probed_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """``ray_apps.train.train_loop_per_worker`` as it is, with its ``train_epoch`` calls timed and the
    worker's thread settings recorded; the timings go to ``$BENCH_TRAIN_PROBE_DIR/rank<r>.json``."""
    import ray.train
    import torch

    import ray_apps.train as rt

    # This runs in a Ray Train worker process, where ray_apps.train is imported fresh: its functions are
    # the real ones (the driver only swapped the name train() hands to TorchTrainer).
    original_loop, original_epoch = rt.train_loop_per_worker, rt.train_epoch
    context = ray.train.get_context()
    probe: dict[str, Any] = {
        "rank": context.get_world_rank(), "world": context.get_world_size(), "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "epochs": [],
        "loop_start": time.time(),  # wall clock (time.time) marks, compared with the driver's
    }

    def timed_epoch(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        result, timings = profiled_train_epoch(original_epoch, *args, **kwargs)
        probe["epochs"].append({**{k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()},
                                "start": start, "end": time.time()})
        return result

    rt.train_epoch = timed_epoch
    try:
        return original_loop(config)
    finally:
        probe["loop_end"] = time.time()
        rt.train_epoch = original_epoch
        folder = os.environ.get(PROBE_ENV)
        if folder:
            Path(folder, f"rank{probe['rank']}.json").write_text(json.dumps(probe))


def _original_train_loop() -> Any:
    from ray_apps.train import train_loop_per_worker

    return train_loop_per_worker


_ORIGINAL_TRAIN_LOOP = _original_train_loop()


@contextlib.contextmanager
def materialized_shuffle(enabled: bool) -> Iterator[None]:
    """While active, ``Dataset.random_shuffle`` in this (driver) process returns the shuffled dataset
    materialized: what ``train()`` would do with ``.random_shuffle(seed).materialize()``."""
    import ray.data

    if not enabled:
        yield
        return
    original = ray.data.Dataset.random_shuffle

    def shuffle_and_materialize(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs).materialize()

    ray.data.Dataset.random_shuffle = shuffle_and_materialize
    try:
        yield
    finally:
        ray.data.Dataset.random_shuffle = original


@contextlib.contextmanager
def probed_workers(enabled: bool) -> Iterator[None]:
    """While active, ``ray_apps.train.train()`` hands Ray Train :func:`probed_train_loop`."""
    import ray_apps.train as rt

    if not enabled:
        yield
        return
    rt.train_loop_per_worker = probed_train_loop
    try:
        yield
    finally:
        rt.train_loop_per_worker = _ORIGINAL_TRAIN_LOOP


# --------------------------------------------------------------------------------------------------------
# Baseline: a plain PyTorch loop
# --------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    epochs: list[dict[str, Any]]  # per epoch: rows, seconds (+ phases)
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def steady(self) -> tuple[int, float]:
        """(rows, seconds) of the epochs after the first (the only epoch when there is just one)."""
        measured = self.epochs[1:] or self.epochs
        return sum(e["rows"] for e in measured), sum(e["seconds"] for e in measured)

    @property
    def steady_rate(self) -> float:
        rows, seconds = self.steady()
        return rows / seconds if seconds > 0 else 0.0

    @property
    def compute_rate(self) -> float | None:
        """Steady-state rows per second of the epochs' time minus waiting for data (the plain loop: minus
        its read and shuffle): what the same arithmetic ran at, whatever fed it."""
        measured = self.epochs[1:] or self.epochs
        if not all("data_wait" in e for e in measured):
            return None
        rows = sum(e["rows"] for e in measured)
        busy = sum(e["seconds"] - e["data_wait"] - e.get("read_s", 0.0) - e.get("shuffle_s", 0.0)
                   for e in measured)
        return rows / busy if busy > 0 else None

    @property
    def rows_per_cpu_s(self) -> float | None:
        """Steady-state rows per CPU second of the training processes (Ray: every rank's worker; Ray
        Data's tasks and the driver are not counted)."""
        measured = self.epochs[1:] or self.epochs
        if not all(e.get("cpu_s") for e in measured):
            return None
        return sum(e["rows"] for e in measured) / sum(e["cpu_s"] for e in measured)

    @property
    def wall_rate(self) -> float:
        return sum(e["rows"] for e in self.epochs) / self.wall_s if self.wall_s > 0 else 0.0


def encoded_batches(table: Any, batch: int, config: Any, counts: Any, seconds: list[float]) -> Iterator[dict]:
    """``table`` in slices of ``batch`` rows, each encoded as it is needed; appends the seconds each
    encoding took to ``seconds``."""
    from ray_apps.encoding import encode_examples

    for i in range(0, table.num_rows, batch):
        start = time.perf_counter()
        out = encode_examples(table.slice(i, batch), config, counts)
        seconds.append(time.perf_counter() - start)
        yield out


def run_plain(settings: Any, device: str, threads: int, profile: bool = True) -> Run:
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import torch

    from ray_apps.model import TwoTowerModel
    from ray_apps.train import TRAIN_COLUMNS, FeaturePaths, model_config_for, scan_train_split, train_epoch

    ts = settings.train
    use_gpu = device == "cuda"
    batch = ts.gpu_batch_size if use_gpu else ts.batch_size
    paths = FeaturePaths.for_day(settings, REGION, DAY)
    files = [info.path for info in paths.data_files(paths.train)]
    config = model_config_for(settings)
    counts = scan_train_split(paths, files, config).counts  # the same log-Q counts train() computes
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wall0 = time.perf_counter()
        model = TwoTowerModel(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=ts.learning_rate, weight_decay=ts.weight_decay)
        columns = list(TRAIN_COLUMNS) + (["user_id"] if config.user_buckets > 0 else [])
        epochs = []
        for epoch in range(ts.epochs):
            torch.manual_seed(ts.seed + epoch)
            t0 = time.perf_counter()
            table = pads.dataset(files, filesystem=paths.fs, format="parquet").to_table(columns=columns)
            t1 = time.perf_counter()
            order = np.random.default_rng(ts.seed + epoch).permutation(table.num_rows)
            table = table.take(pa.array(order)).combine_chunks()
            t2 = time.perf_counter()
            # The plain way: each batch is encoded in the training loop (Ray Train gets them encoded).
            encode_s: list[float] = []
            batches = encoded_batches(table, batch, config, counts, encode_s)
            if profile:
                (loss_sum, steps, rows), phases = profiled_train_epoch(
                    train_epoch, model, optimizer, batches, device, use_gpu=use_gpu)
                phases["encode"] = sum(encode_s)
                phases["data_wait"] -= phases["encode"]
            else:
                loss_sum, steps, rows = train_epoch(model, optimizer, batches, device, use_gpu=use_gpu)
                phases = {}
            loss = float(loss_sum) / max(steps, 1)  # a device sync on GPU
            t3 = time.perf_counter()
            epochs.append({"epoch": epoch, "rows": rows, "seconds": t3 - t0, "read_s": t1 - t0,
                           "shuffle_s": t2 - t1, "train_s": t3 - t2, "loss": loss,
                           **{k: round(v, 4) for k, v in phases.items() if k in REPORTED}})
        wall = time.perf_counter() - wall0
    finally:
        torch.set_num_threads(previous_threads)
    return Run("plain_pytorch", epochs, wall, {"torch_threads": threads, "batch_size": batch,
                                                "device": device})


# --------------------------------------------------------------------------------------------------------
# Ray Train path
# --------------------------------------------------------------------------------------------------------

def run_ray(settings: Any, layout: Layout, probe_dir: Path | None, ray_start_s: float) -> Run:
    from ray_apps.train import train

    if probe_dir is not None:
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe_dir.mkdir(parents=True)
    name = f"bench-{layout.name}-{uuid.uuid4().hex[:8]}"  # a new run each time: nothing to resume
    t0, clock0 = time.perf_counter(), time.time()
    with probed_workers(probe_dir is not None), materialized_shuffle(layout.materialize):
        result = train(settings, REGION, DAY, run_name=name, warm_start=None)
    wall, clock1 = time.perf_counter() - t0, time.time()
    probes = []
    if probe_dir is not None:
        probes = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("rank*.json"))]
    epochs = [{"epoch": e["epoch"], "rows": e["rows"], "seconds": e["seconds"], "loss": e["loss"]}
              for e in result.epochs]
    for epoch in epochs:  # rank 0's phases (every rank's are in `workers`)
        rank0 = next((p for p in probes if p["rank"] == 0), None)
        if rank0 and epoch["epoch"] < len(rank0["epochs"]):
            epoch.update({k: v for k, v in rank0["epochs"][epoch["epoch"]].items() if k in REPORTED})
            # CPU seconds of every rank's process in this epoch (the phases above are rank 0's)
            epoch["cpu_s"] = round(sum(p["epochs"][epoch["epoch"]]["cpu_s"] for p in probes
                                       if epoch["epoch"] < len(p["epochs"])), 3)
    workers = [{"rank": p["rank"], "torch_threads": p["torch_threads"], "OMP_NUM_THREADS": p["OMP_NUM_THREADS"],
                "torch_interop_threads": p["torch_interop_threads"],
                "epochs": [{k: v for k, v in e.items() if k not in ("start", "end")} for e in p["epochs"]]}
               for p in probes]
    rank0 = next((p for p in probes if p["rank"] == 0), None)
    wall_split = None
    if rank0 and rank0["epochs"] and "loop_end" in rank0:
        marks = rank0["epochs"]
        wall_split = {  # where train()'s wall seconds went, from rank 0's clock marks
            # driver scan, controller, worker actors, process group, dataset
            "before_worker_loop": rank0["loop_start"] - clock0,
            "worker_setup": marks[0]["start"] - rank0["loop_start"],  # model, DDP wrap, optimizer, shard
            "epochs_in_train_epoch": sum(e["end"] - e["start"] for e in marks),
            "between_epochs_and_after_last": sum(b["start"] - a["end"] for a, b in itertools.pairwise(marks))
                                             + rank0["loop_end"] - marks[-1]["end"],  # totals, checkpoints
            "after_worker_loop": clock1 - rank0["loop_end"],  # result, the driver's checkpoint load, teardown
        }
        wall_split = {k: round(v, 2) for k, v in wall_split.items()}
    return Run(f"ray_train_{layout.name}", epochs, wall, {
        "layout": {"workers": layout.workers, "cpus_per_worker": layout.cpus_per_worker,
                   "ray_logical_cpus": layout.ray_cpus, "materialize_prototype": layout.materialize},
        "ray_init_s": round(ray_start_s, 2), "use_gpu": result.use_gpu, "workers_probe": workers,
        "wall_split_s": wall_split,
        "samples_per_second_all_epochs": round(result.samples_per_second, 1),
        "checkpoint_bytes": _dir_bytes(Path(result.checkpoint_path)),
    })


def _dir_bytes(path: Path) -> int | None:
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------
# What DDP's all-reduce of the whole gradient costs (2 gloo processes, no Ray)
# --------------------------------------------------------------------------------------------------------

def _allreduce_worker(rank: int, world: int, port: int, numel: int, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.ones(numel)
    dist.all_reduce(x)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    seconds = (time.perf_counter() - t0) / iters
    if rank == 0:
        Path(out).write_text(json.dumps({"ms_per_allreduce": round(seconds * 1000, 1)}))
    dist.destroy_process_group()


def allreduce_probe(numel: int, world: int = 2, iters: int = 5) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "allreduce.json")
        mp.spawn(_allreduce_worker, args=(world, port, numel, iters, out), nprocs=world, join=True)
        result = json.loads(Path(out).read_text())
    return {"world": world, "floats": numel, "mbytes": round(numel * 4 / 2**20, 1), "iters": iters, **result}


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_cores() -> int:
    from ray_apps.ann import _usable_cpus

    return _usable_cpus()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def phase_summary(run: Run) -> str:
    measured = run.epochs[1:] or run.epochs
    total = sum(e["seconds"] for e in measured)
    parts = []
    for key in ("read_s", "shuffle_s", *PHASES, "first_batch_wait"):
        value = sum(e.get(key, 0.0) for e in measured)
        if value:
            label = "of which before the first batch" if key == "first_batch_wait" else key.removesuffix("_s")
            parts.append(f"{label} {value:.1f}s ({value / total:.0%})")
    return ", ".join(parts)


def benchmark(*, work: Path, rows: int, items: int, epochs: int, batch_size: int | None, configs: Sequence[str],
              device: str, repeats: int, seed: int, model: dict[str, Any] | None, profile: bool,
              probe_allreduce: bool, quick: bool, baseline_threads: int | None = None) -> list[dict[str, Any]]:
    """Build the split, run baseline and Ray Train configs (alternating, ``repeats`` times), emit the
    figures; returns the emitted lines."""
    from ray_apps.model import TwoTowerModel
    from ray_apps.train import model_config_for
    from streamrec.settings import TrainSettings

    device = resolve_device(device)
    cores = usable_cores()
    use_gpu = {"cpu": "no", "cuda": "yes"}[device]
    defaults = TrainSettings()
    batch_size = batch_size or (defaults.gpu_batch_size if device == "cuda" else defaults.batch_size)
    lake = work / "lake"
    base_settings = make_settings(lake, layout=None, use_gpu=use_gpu, epochs=epochs, batch_size=batch_size,
                                  model=model)
    split = build_split(base_settings, rows, items, seed)
    print(f"train split: {split}", file=sys.stderr)
    config = model_config_for(base_settings)
    params_count = sum(p.numel() for p in TwoTowerModel(config).parameters())
    chosen = layouts(cores, configs, device)

    allreduce = None
    if probe_allreduce and any(layout.workers > 1 for layout in chosen):
        allreduce = allreduce_probe(params_count)
        print(f"gloo all-reduce of the whole gradient ({allreduce['mbytes']} MB, 2 processes): "
              f"{allreduce['ms_per_allreduce']} ms", file=sys.stderr)

    plain_runs: list[Run] = []
    ray_runs: dict[str, list[Run]] = {layout.name: [] for layout in chosen}
    for r in range(repeats):
        plain = run_plain(base_settings, device, baseline_threads or cores, profile)
        plain_runs.append(plain)
        print(f"repeat {r + 1}: plain PyTorch {plain.steady_rate:,.0f} samples/s steady "
              f"({plain.wall_rate:,.0f} wall, compute-only {_round(plain.compute_rate)}); {phase_summary(plain)}",
              file=sys.stderr)
        for layout in chosen:
            settings = make_settings(lake, layout=layout, use_gpu=use_gpu, epochs=epochs, batch_size=batch_size,
                                     model=model)
            probe_dir = (work / f"probe-{layout.name}") if profile else None
            if probe_dir is not None:
                os.environ[PROBE_ENV] = str(probe_dir)  # inherited by Ray's workers
            with ray_cluster(settings, layout.ray_cpus, prefix="srbt-") as ray_start:
                run = run_ray(settings, layout, probe_dir, ray_start)
            ray_runs[layout.name].append(run)
            threads = sorted({(w["rank"], w["torch_threads"]) for w in run.extra["workers_probe"]})
            print(f"repeat {r + 1}: Ray Train {layout.name} ({layout.workers} x {layout.cpus_per_worker:g} CPU "
                  f"of {layout.ray_cpus} logical): {run.steady_rate:,.0f} samples/s steady, "
                  f"{run.wall_rate:,.0f} wall ({run.wall_s:.1f} s, ray.init {ray_start:.1f} s); "
                  f"torch threads per rank {threads}; compute-only {_round(run.compute_rate)} samples/s; "
                  f"rank 0 steady epochs: {phase_summary(run)}; "
                  f"train() wall split (s): {run.extra['wall_split_s']}", file=sys.stderr)

    best_plain = max(plain_runs, key=lambda x: x.steady_rate)
    params = {"rows": split["rows"], "items": items, "files": split["files"], "epochs": epochs,
              "global_batch": batch_size, "device": device, "cores": cores, "repeats": repeats, "quick": quick,
              "model_parameters": params_count, "model": json.loads(config.to_json()),
              "optimizer": "AdamW", "learning_rate": base_settings.train.learning_rate,
              "steady_state": "epochs after the first"}
    baseline_extra = {"baseline_wall_samples_per_s": round(max(p.wall_rate for p in plain_runs), 1),
                      "baseline_epochs": best_plain.epochs, "baseline_torch_threads": baseline_threads or cores,
                      "baseline_pipeline": "per epoch: pyarrow read of the same files + in-memory permutation "
                                           "(take) + ray_apps.train.train_epoch"}
    lines = []
    for layout in chosen:
        runs = ray_runs[layout.name]
        best = max(runs, key=lambda x: x.steady_rate)
        best_wall = max(runs, key=lambda x: x.wall_rate)
        suffix = "" if layout.name == "single" else f"_{layout.name}"
        layout_params = {**params, "config": layout.name, "workers": layout.workers,
                         "cpus_per_worker": layout.cpus_per_worker, "ray_logical_cpus": layout.ray_cpus,
                         "materialize_prototype": layout.materialize,
                         "per_worker_batch": max(2, batch_size // layout.workers)}
        compute = {"ray_compute_samples_per_s": _round(best.compute_rate),
                   "baseline_compute_samples_per_s": _round(best_plain.compute_rate),
                   "ray_samples_per_cpu_s": _round(best.rows_per_cpu_s),
                   "baseline_samples_per_cpu_s": _round(best_plain.rows_per_cpu_s)}
        extra = {"fair_comparison": layout.name in ("single", "single_materialized"), "ray_epochs": best.epochs,
                 **compute,
                 "ray_train_wall_s": round(best.wall_s, 2), "ray_init_s": best.extra["ray_init_s"],
                 "wall_split_s": best.extra["wall_split_s"],
                 "workers_probe": best.extra["workers_probe"],
                 "checkpoint_bytes": best.extra["checkpoint_bytes"],
                 "allreduce_probe": allreduce if layout.workers > 1 else None, **baseline_extra}
        lines.append(emit("train", f"train_samples_per_s{suffix}", best.steady_rate, "samples/s",
                          "plain_pytorch_samples_per_s", best_plain.steady_rate, layout_params,
                          measure="in-loop steady state (epochs after the first), Ray start-up and checkpoints "
                                  "excluded", **extra))
        lines.append(emit("train", f"train_wall_samples_per_s{suffix}", best_wall.wall_rate, "samples/s",
                          "plain_pytorch_wall_samples_per_s", baseline_extra["baseline_wall_samples_per_s"],
                          layout_params,
                          measure="rows x epochs / wall seconds of train() (driver scan, trainer and worker "
                                  "start-up, every epoch, checkpoints); ray.init excluded",
                          ray_train_wall_s=round(best_wall.wall_s, 2), ray_init_s=best_wall.extra["ray_init_s"],
                          wall_split_s=best_wall.extra["wall_split_s"],
                          fair_comparison=layout.name in ("single", "single_materialized"),
                          baseline_measure="the plain loop's wall: model and optimizer construction, every "
                                           "epoch incl. the first (read + shuffle + train)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,048 rows, 2 epochs, single config only")
    parser.add_argument("--rows", type=int, default=None, help="train examples (default 20,000; quick 2,048)")
    parser.add_argument("--items", type=int, default=50_000, help="catalogue size (Zipf popularity)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 3; quick 2)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch (default TrainSettings.batch_size, 1,024; "
                             "on CUDA gpu_batch_size, 8,192)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated Ray layouts: single, local_default (default both; quick: "
                             "single), single_materialized (a prototype: the shuffled split materialized once)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda: train.use_gpu=yes, bf16 autocast, single worker; cpu: use_gpu=no")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; the best of each is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-json", default=None,
                        help='TwoTowerConfig overrides (train.model), e.g. \'{"id_buckets": 65536}\'')
    parser.add_argument("--baseline-threads", type=int, default=None,
                        help="torch threads of the plain loop (default: the usable cores)")
    parser.add_argument("--no-profile", action="store_true",
                        help="no phase timers (baseline and workers run the unwrapped functions)")
    parser.add_argument("--no-allreduce-probe", action="store_true", help="skip the gloo all-reduce probe")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="work here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    rows = args.rows or (2_048 if args.quick else 20_000)
    epochs = args.epochs or (2 if args.quick else 3)
    configs = (args.configs or ("single" if args.quick else "single,local_default")).split(",")
    os.environ.pop("STREAMREC_CONFIG", None)  # the benchmark's settings are its own
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="streamrec-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        benchmark(work=work, rows=rows, items=args.items, epochs=epochs, batch_size=args.batch_size,
                  configs=configs, device=args.device, repeats=args.repeats, seed=args.seed,
                  model=json.loads(args.model_json) if args.model_json else None, profile=not args.no_profile,
                  probe_allreduce=not args.no_allreduce_probe and not args.quick, quick=args.quick,
                  baseline_threads=args.baseline_threads)
    finally:
        os.environ.pop(PROBE_ENV, None)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
