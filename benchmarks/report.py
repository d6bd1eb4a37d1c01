"""The benchmark report: ``benchmarks/results/*.jsonl`` → the generated part of docs/benchmarks.md and plots.

Every benchmark appends one JSON line per measured figure to ``benchmarks/results/<name>.jsonl``
(git-ignored; the keys are in :mod:`benchmarks.common`). This module turns those lines into

- a Markdown section written between two marker comments in ``docs/benchmarks.md``
  (:data:`BEGIN_MARKER` ... :data:`END_MARKER`); the hand-written analysis around it is never touched:
  per benchmark, the latest full run's figures with baseline, ratio, machine and date, and the history
  of its headline figure over every recorded run;
- PNG plots under ``docs/benchmarks/`` (matplotlib, when it is installed: ``pip install -e '.[docs]'``):
  Serve latency percentiles and throughput against concurrency, quality per model, and every
  benchmark's headline ratio per run.

Run it as ``python -m benchmarks.report`` (or ``make bench-report``)::

    python -m benchmarks.report [--results DIR] [--doc PATH] [--plots-dir DIR] [--no-plots] [--check]

``--check`` writes nothing and exits 1 when the document's generated section is not what the results
give (for a CI step that has the results). The output depends only on the results, never on the clock,
so regenerating from the same lines changes nothing.

Everything up to :func:`write_plots` is pure (lines in, text or data out) and tested in
tests/unit/test_benchmark_report.py with sample lines.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PLOTS_DIR = ROOT / "docs" / "benchmarks"

BEGIN_MARKER = "<!-- BEGIN GENERATED: figures -->"
END_MARKER = "<!-- END GENERATED: figures -->"

# Keys every figure line carries (ENGINEERING.md §4); anything else is kept as `extra`.
REQUIRED_KEYS = ("benchmark", "metric", "value", "unit", "baseline_metric", "baseline_value", "ratio",
                 "machine", "params")
_CORE_KEYS = (*REQUIRED_KEYS, "at")

# The figure that stands for a benchmark in its history table and in the ratio plot; a benchmark not
# listed here (a new one) uses the first figure of each run.
HEADLINE: dict[str, str] = {
    "ingest": "ingest_records_per_s_per_core",
    "etl": "etl_events_per_s_per_core",
    "quality": "recall@20_vs_popular",
    "train": "train_samples_per_s",
    "score": "score_users_per_s",
    "serve": "cache_hit_rps_c1",
    "sync": "sync_writer_items_per_s",
}
# Order of the sections (the pipeline's order); others follow alphabetically.
ORDER = ("ingest", "etl", "quality", "train", "score", "sync", "serve")
# Extra keys shown in a figure's note when present.
NOTE_KEYS = ("dataset",)
HISTORY_MAX_RUNS = 12
# Modules of benchmarks/ that are not benchmarks themselves.
NOT_BENCHMARKS = {"__init__", "common", "report", "synthetic_features"}

_SERVE_METRIC = re.compile(r"^(?P<path>[a-z_]+?)_(?P<kind>rps|p99_ms)_c(?P<clients>\d+)$")
SERVE_PATHS = {"cache_hit": "cache hit", "realtime": "real time"}


class ReportError(Exception):
    """The document or the results cannot be used; the message says which and why."""


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Figure:
    """One measured figure: one JSON line of a benchmark."""

    benchmark: str
    metric: str
    value: float | None
    unit: str
    baseline_metric: str | None
    baseline_value: float | None
    ratio: float | None
    machine: Mapping[str, Any]
    params: Mapping[str, Any]
    at: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return bool(self.params.get("quick"))

    @property
    def valid(self) -> bool:
        """False only when the benchmark itself flagged the figure (``valid: false``)."""
        return self.extra.get("valid", True) is not False

    @property
    def dataset(self) -> str | None:
        value = self.extra.get("dataset")
        return str(value) if value is not None else None


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def parse_line(text: str) -> Figure:
    """One JSON line → a :class:`Figure`; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 (one error type for every bad line)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not data["benchmark"] or not data["metric"]:
        raise ValueError("empty benchmark or metric")
    return Figure(
        benchmark=str(data["benchmark"]),
        metric=str(data["metric"]),
        value=_number(data["value"]),
        unit=str(data["unit"]),
        baseline_metric=str(data["baseline_metric"]) if data["baseline_metric"] is not None else None,
        baseline_value=_number(data["baseline_value"]),
        ratio=_number(data["ratio"]),
        machine=data["machine"] if isinstance(data["machine"], dict) else {},
        params=data["params"] if isinstance(data["params"], dict) else {},
        at=str(data.get("at") or ""),
        extra={k: v for k, v in data.items() if k not in _CORE_KEYS},
    )


def parse_lines(lines: Iterable[str], source: str = "<lines>") -> tuple[list[Figure], list[str]]:
    """Figures of every well-formed line, and one problem message per line that is not (skipped)."""
    figures: list[Figure] = []
    problems: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            figures.append(parse_line(line))
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
    return figures, problems


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """The figures one invocation of a benchmark emitted (same benchmark, same ``at``)."""

    benchmark: str
    at: str
    figures: tuple[Figure, ...]

    @property
    def quick(self) -> bool:
        return any(f.quick for f in self.figures)

    @property
    def variant(self) -> str | None:
        """What a run changed from the benchmark's stated set-up (``params.variant``), e.g. another load
        generator: reported, never the headline run."""
        return next((str(f.params["variant"]) for f in self.figures if f.params.get("variant")), None)

    @property
    def machine(self) -> Mapping[str, Any]:
        return self.figures[0].machine

    def headline(self) -> Figure:
        name = HEADLINE.get(self.benchmark)
        for fig in self.figures:
            if fig.metric == name:
                return fig
        return self.figures[0]


def group_runs(figures: Iterable[Figure]) -> dict[str, list[Run]]:
    """Runs by benchmark, oldest first; figures keep their order within a run."""
    grouped: dict[tuple[str, str], list[Figure]] = {}
    for fig in figures:
        grouped.setdefault((fig.benchmark, fig.at), []).append(fig)
    runs: dict[str, list[Run]] = {}
    for (bench, at), figs in grouped.items():
        runs.setdefault(bench, []).append(Run(bench, at, tuple(figs)))
    for bench_runs in runs.values():
        bench_runs.sort(key=lambda r: r.at)
    return dict(sorted(runs.items(), key=lambda kv: _order_key(kv[0])))


def _order_key(benchmark: str) -> tuple[int, str]:
    return (ORDER.index(benchmark) if benchmark in ORDER else len(ORDER), benchmark)


def latest_run(runs: Sequence[Run]) -> Run:
    """The latest full run of the stated set-up, or failing that the latest full run, or the latest
    quick run when there is no full one."""
    full = [r for r in runs if not r.quick]
    stated = [r for r in full if r.variant is None]
    return (stated or full or list(runs))[-1]


def missing_benchmarks(expected: Iterable[str], recorded: Iterable[str]) -> list[str]:
    return sorted(set(expected) - set(recorded), key=_order_key)


def expected_benchmarks(directory: Path) -> list[str]:
    """The benchmark modules of ``directory``: every ``*.py`` with a ``--quick`` flag."""
    names = []
    for path in sorted(directory.glob("*.py")):
        if path.stem in NOT_BENCHMARKS:
            continue
        if "--quick" in path.read_text(encoding="utf-8", errors="replace"):
            names.append(path.stem)
    return names


# --------------------------------------------------------------------------- formatting


def fmt_number(value: float | None) -> str:
    """Readable, with thousands separators: 58567.2 → 58,567; 0.3402 → 0.340; 12.5 → 12.5."""
    if value is None:
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude == 0:
        return "0"
    return f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_when(at: str) -> str:
    """``2026-11-26T15:50:25+00:00`` → ``2026-11-26 15:50 UTC`` (unparsable text is shown as it is)."""
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        return at or "unknown time"
    offset = when.utcoffset()
    if offset is not None and offset.total_seconds() == 0:
        return when.strftime("%Y-%m-%d %H:%M UTC")
    return when.isoformat(timespec="minutes")


def fmt_machine(machine: Mapping[str, Any]) -> str:
    parts = []
    if machine.get("cpu"):
        parts.append(str(machine["cpu"]))
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    if machine.get("mem_gib"):
        parts.append(f"{machine['mem_gib']} GiB")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    return ", ".join(parts) or "machine not recorded"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def figure_note(fig: Figure) -> str:
    notes = [f"{k} {fig.extra[k]}" for k in NOTE_KEYS if fig.extra.get(k) is not None]
    if "target_met" in fig.extra:
        notes.append("target met" if fig.extra["target_met"] else "target not met")
    if not fig.valid:
        notes.append("**invalid** (flagged by the benchmark)")
    return "; ".join(notes)


# --------------------------------------------------------------------------- Markdown


def figures_table(run: Run) -> list[str]:
    rows = ["| figure | value | unit | baseline | baseline value | ratio | note |",
            "| --- | ---: | --- | --- | ---: | ---: | --- |"]
    for fig in run.figures:
        rows.append("| " + " | ".join(_cell(c) for c in (
            f"`{fig.metric}`", fmt_number(fig.value), fig.unit,
            f"`{fig.baseline_metric}`" if fig.baseline_metric else "–",
            fmt_number(fig.baseline_value), fmt_ratio(fig.ratio), figure_note(fig))) + " |")
    return rows


def history_table(runs: Sequence[Run], max_runs: int = HISTORY_MAX_RUNS) -> list[str]:
    shown = list(runs)[-max_runs:]
    head = shown[-1].headline()
    rows = [f"| run | mode | `{head.metric}` | baseline | ratio | note |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    for run in shown:
        fig = run.headline()
        name = f"`{fig.metric}`: " if fig.metric != head.metric else ""
        rows.append("| " + " | ".join(_cell(c) for c in (
            fmt_when(run.at), "quick" if run.quick else "full", name + fmt_number(fig.value),
            fmt_number(fig.baseline_value), fmt_ratio(fig.ratio), figure_note(fig))) + " |")
    if len(runs) > len(shown):
        rows.append("")
        rows.append(f"({len(runs) - len(shown)} earlier runs not shown.)")
    return rows


@dataclass(frozen=True)
class ServePoint:
    """One (path, clients) cell of a serve run: throughput and latency, with the baseline's."""

    path: str
    clients: int
    rps: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    baseline_rps: float | None = None
    baseline_p50_ms: float | None = None
    baseline_p95_ms: float | None = None
    baseline_p99_ms: float | None = None
    valid: bool = True


def serve_points(run: Run) -> list[ServePoint]:
    """A serve run's figures as (path, clients) cells, ordered by path then clients."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for fig in run.figures:
        m = _SERVE_METRIC.match(fig.metric)
        if not m:
            continue
        cell = cells.setdefault((m["path"], int(m["clients"])), {"valid": True})
        cell["valid"] = cell["valid"] and fig.valid
        if m["kind"] == "rps":
            cell.update(rps=fig.value, baseline_rps=fig.baseline_value)
        else:
            cell.update(p99_ms=fig.value, baseline_p99_ms=fig.baseline_value,
                        p50_ms=_number(fig.extra.get("p50_ms")), p95_ms=_number(fig.extra.get("p95_ms")),
                        baseline_p50_ms=_number(fig.extra.get("baseline_p50_ms")),
                        baseline_p95_ms=_number(fig.extra.get("baseline_p95_ms")))
    return [ServePoint(path, clients, **values) for (path, clients), values in sorted(cells.items())]


def serve_table(run: Run) -> list[str]:
    points = serve_points(run)
    if not points:
        return []
    rows = ["| path | clients | RPS | p50 ms | p95 ms | p99 ms | baseline RPS | baseline p50 / p95 / p99 ms | valid |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for p in points:
        base = " / ".join(fmt_number(v) for v in (p.baseline_p50_ms, p.baseline_p95_ms, p.baseline_p99_ms))
        rows.append("| " + " | ".join((
            SERVE_PATHS.get(p.path, p.path), str(p.clients), fmt_number(p.rps), fmt_number(p.p50_ms),
            fmt_number(p.p95_ms), fmt_number(p.p99_ms), fmt_number(p.baseline_rps), base,
            "yes" if p.valid else "**no**")) + " |")
    return rows


def benchmark_section(name: str, runs: Sequence[Run], plots: Mapping[str, str]) -> list[str]:
    latest = latest_run(runs)
    full = sum(1 for r in runs if not r.quick)
    kind = "full" if not latest.quick else "quick (no full run recorded)"
    out = [f"### {name}", ""]
    out.append(f"Latest {kind} run: **{fmt_when(latest.at)}** on {fmt_machine(latest.machine)}. "
               f"Recorded: {len(runs)} run{'s' if len(runs) != 1 else ''} ({full} full, "
               f"{len(runs) - full} quick), `benchmarks/results/{name}.jsonl`.")
    invalid = [f.metric for f in latest.figures if not f.valid]
    if invalid:
        out.append(f"{len(invalid)} of its figures are flagged invalid by the benchmark (their answers did "
                   "not come from the path the figure names); they are listed, not to be quoted.")
    out.append("")
    if name == "serve" and serve_points(latest):
        out.append("Per path and number of closed-loop clients (the baseline is the plain FastAPI + Redis GET "
                   "app measured in the same run):")
        out.append("")
        out.extend(serve_table(latest))
        out.append("")
    out.append("Figures of that run:")
    out.append("")
    out.extend(figures_table(latest))
    out.append("")
    if plots.get(name):
        out.append(f"![{name}]({plots[name]})")
        out.append("")
    if len(runs) > 1:
        out.append("Headline figure over the recorded runs:")
        out.append("")
        out.extend(history_table(runs))
        out.append("")
    return out


def render_section(figures: Sequence[Figure], *, expected: Sequence[str] = (), problems: Sequence[str] = (),
                   plots: Mapping[str, str] | None = None) -> str:
    """The Markdown that goes between the markers (without the markers)."""
    plots = dict(plots or {})
    runs = group_runs(figures)
    out = ["## Recorded figures (generated)", ""]
    out.append("Generated by `make bench-report` (`python -m benchmarks.report`) from "
               "`benchmarks/results/*.jsonl`, which is git-ignored: the tables below are the figures "
               "recorded on the checkout that generated them. Do not edit between the markers; the "
               "analysis in the other sections is written by hand.")
    out.append("")
    if runs:
        latest = max(r.at for rs in runs.values() for r in rs)
        total_runs = sum(len(rs) for rs in runs.values())
        out.append(f"{len(figures)} figures from {total_runs} runs of {len(runs)} benchmarks; the latest "
                   f"was recorded {fmt_when(latest)}. A ratio is value / baseline value, both measured "
                   "in the same run; \"quick\" runs (`--quick`) are smoke runs whose figures are not the "
                   "targets'.")
    else:
        out.append("No benchmark results are recorded on this checkout.")
    out.append("")
    missing = missing_benchmarks(expected, runs)
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        out.append(f"**No recorded results on this checkout** for: {names} (run `python -m "
                   "benchmarks.<name>`, then regenerate).")
        out.append("")
    elif expected:
        out.append("Every benchmark in `benchmarks/` has recorded results.")
        out.append("")
    if problems:
        out.append(f"{len(problems)} unreadable result line(s) were skipped: " +
                   "; ".join(f"`{p}`" for p in problems[:5]) + ("; ..." if len(problems) > 5 else ""))
        out.append("")
    if runs:
        out.append("| benchmark | latest full run | machine | headline figure | value | baseline | ratio |")
        out.append("| --- | --- | --- | --- | ---: | ---: | ---: |")
        for name, rs in runs.items():
            run = latest_run(rs)
            fig = run.headline()
            when = fmt_when(run.at) + (" (quick)" if run.quick else "")
            out.append("| " + " | ".join(_cell(c) for c in (
                name, when, fmt_machine(run.machine), f"`{fig.metric}`" + (f" ({fig.dataset})" if fig.dataset else ""),
                f"{fmt_number(fig.value)} {fig.unit}", fmt_number(fig.baseline_value), fmt_ratio(fig.ratio))) + " |")
        out.append("")
        if plots.get("_ratios"):
            out.append(f"![ratio to baseline per run]({plots['_ratios']})")
            out.append("")
    for name, rs in runs.items():
        out.extend(benchmark_section(name, rs, plots))
    return "\n".join(out).rstrip() + "\n"


def replace_generated(document: str, section: str) -> str:
    """``document`` with everything between the markers replaced by ``section``; the rest untouched."""
    begins, ends = document.count(BEGIN_MARKER), document.count(END_MARKER)
    if begins != 1 or ends != 1:
        raise ReportError(f"expected exactly one {BEGIN_MARKER} and one {END_MARKER}, found {begins} and {ends}")
    start = document.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = document.index(END_MARKER)
    if end < start:
        raise ReportError(f"{END_MARKER} comes before {BEGIN_MARKER}")
    return document[:start] + "\n" + section.rstrip("\n") + "\n" + document[end:]


# --------------------------------------------------------------------------- plot data (pure)


def ratio_series(runs_by_benchmark: Mapping[str, Sequence[Run]]) -> dict[str, list[tuple[str, float, bool]]]:
    """Per benchmark, (run time, headline ratio, quick) for every run whose headline has a ratio."""
    out: dict[str, list[tuple[str, float, bool]]] = {}
    for name, runs in runs_by_benchmark.items():
        points = [(r.at, r.headline().ratio, r.quick) for r in runs if r.headline().ratio is not None]
        if points:
            out[name] = points  # type: ignore[assignment]
    return out


def quality_bars(run: Run) -> dict[str, dict[str, float]]:
    """{dataset: {model: recall@20}} from a quality run's ``recall@20_<model>`` figures."""
    out: dict[str, dict[str, float]] = {}
    for fig in run.figures:
        m = re.match(r"^recall@20_(?!vs_)(.+)$", fig.metric)
        if m and fig.value is not None:
            out.setdefault(fig.dataset or "data", {})[m.group(1)] = fig.value
    return out


# --------------------------------------------------------------------------- I/O


def load_results(directory: Path) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.jsonl")):
        figs, probs = parse_lines(path.read_text(encoding="utf-8").splitlines(), path.name)
        figures.extend(figs)
        problems.extend(probs)
    return figures, problems


def write_plots(runs: Mapping[str, Sequence[Run]], out_dir: Path) -> list[str]:
    """Draw the plots (matplotlib, Agg) into ``out_dir``; the file names written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"Software": None}
    made: list[str] = []

    def save(fig: Any, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110, metadata=meta)
        plt.close(fig)
        return name

    if "serve" in runs:
        points = serve_points(latest_run(runs["serve"]))
        if points:
            made.append(_plot_serve(plt, points, save, latest_run(runs["serve"])))
    if "quality" in runs:
        bars = quality_bars(latest_run(runs["quality"]))
        if bars:
            made.append(_plot_quality(plt, bars, save))
    series = ratio_series(runs)
    if series:
        made.append(_plot_ratios(plt, series, save))
    return made or ["(nothing to plot)"]


def _plot_serve(plt: Any, points: Sequence[ServePoint], save: Any, run: Run) -> str:
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"cache_hit": "tab:blue", "realtime": "tab:orange", "baseline": "tab:green"}
    paths = sorted({p.path for p in points})
    for path in paths:
        cells = [p for p in points if p.path == path]
        xs = [p.clients for p in cells]
        for pct, style in (("p50_ms", ":"), ("p95_ms", "--"), ("p99_ms", "-")):
            ys = [getattr(p, pct) for p in cells]
            lat.plot(xs, ys, style, color=colours.get(path, None), alpha=0.9)
            for p, y in zip(cells, ys):
                if y is not None:
                    lat.plot([p.clients], [y], "o", color=colours.get(path), mfc="white" if not p.valid else None)
        thr.plot(xs, [p.rps for p in cells], "-", color=colours.get(path), label=SERVE_PATHS.get(path, path))
        for p in cells:
            thr.plot([p.clients], [p.rps], "o", color=colours.get(path), mfc="white" if not p.valid else None)
    base = [p for p in points if p.path == paths[0]]
    bx = [p.clients for p in base]
    for pct, style in (("baseline_p50_ms", ":"), ("baseline_p95_ms", "--"), ("baseline_p99_ms", "-")):
        lat.plot(bx, [getattr(p, pct) for p in base], style, color=colours["baseline"])
    thr.plot(bx, [p.baseline_rps for p in base], "-o", color=colours["baseline"], label="plain FastAPI + Redis GET")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours.get(p, "k"), label=SERVE_PATHS.get(p, p)) for p in paths]
    handles += [Line2D([], [], color=colours["baseline"], label="baseline"),
                Line2D([], [], color="grey", linestyle=":", label="p50"),
                Line2D([], [], color="grey", linestyle="--", label="p95"),
                Line2D([], [], color="grey", linestyle="-", label="p99"),
                Line2D([], [], color="grey", marker="o", mfc="white", linestyle="", label="invalid point")]
    lat.legend(handles=handles, fontsize=8, loc="upper left")
    for ax in (lat, thr):
        ax.set_xscale("log", base=2)
        ax.set_xticks(bx, [str(x) for x in bx])
        ax.set_xlabel("closed-loop clients")
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    lat.set_ylabel("latency, ms (log scale)")
    lat.set_title("latency percentiles")
    thr.set_ylabel("requests/s")
    thr.set_title("throughput")
    thr.legend(fontsize=8)
    fig.suptitle(f"serve, {fmt_when(run.at)}, {fmt_machine(run.machine)}", fontsize=9)
    return save(fig, "serve.png")


MODEL_ORDER = ("two_tower", "als", "popular", "planted")


def _plot_quality(plt: Any, bars: Mapping[str, Mapping[str, float]], save: Any) -> str:
    datasets = list(bars)
    models = sorted({m for d in bars.values() for m in d},
                    key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(models))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    for j, dataset in enumerate(datasets):
        present = [m for m in models if m in bars[dataset]]
        offset = j - width * (len(present) - 1) / 2
        for i, model in enumerate(present):
            rects = ax.bar([offset + i * width], [bars[dataset][model]], width, color=colours[model],
                           label=model if j == 0 or model not in bars[datasets[0]] else None)
            ax.bar_label(rects, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("Recall@20")
    ax.set_title("quality: Recall@20 per model (latest full run)")
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    ax.legend([seen[m] for m in models if m in seen], [m for m in models if m in seen], fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, "quality.png")


def _plot_ratios(plt: Any, series: Mapping[str, Sequence[tuple[str, float, bool]]], save: Any) -> str:
    from matplotlib.ticker import MaxNLocator

    names = list(series)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = series[name]
        for quick, marker in ((False, "o"), (True, "x")):
            sel = [(i, r) for i, (_, r, q) in enumerate(pts) if q == quick]
            if sel:
                ax.plot([i for i, _ in sel], [r for _, r in sel], marker, linestyle="",
                        label="quick" if quick else "full")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{name}: {HEADLINE.get(name, 'first figure')}", fontsize=8)
        ax.set_xlabel("run (oldest → newest)", fontsize=7)
        ax.set_ylabel("ratio to baseline", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save(fig, "ratios.png")


PLOT_FILES = {"serve": "serve.png", "quality": "quality.png", "_ratios": "ratios.png"}


def plot_links(plots_dir: Path, rel_prefix: str) -> dict[str, str]:
    """{section: relative path} of the plots that exist in ``plots_dir`` (drawn now or earlier)."""
    return {key: f"{rel_prefix}/{name}" for key, name in PLOT_FILES.items() if (plots_dir / name).is_file()}


def generate(results: Path, doc: Path, plots_dir: Path, *, draw: bool = True) -> tuple[str, str]:
    """(current document text, regenerated document text); draws the plots first when ``draw``."""
    figures, problems = load_results(results)
    runs = group_runs(figures)
    try:
        rel_prefix = plots_dir.resolve().relative_to(doc.parent.resolve()).as_posix()
    except ValueError:
        rel_prefix = plots_dir.resolve().as_posix()
    if draw and runs and not write_plots(runs, plots_dir):
        raise ReportError("matplotlib is not installed: pip install -e '.[docs]' (or pass --no-plots)")
    section = render_section(figures, expected=expected_benchmarks(Path(__file__).resolve().parent),
                             problems=problems, plots=plot_links(plots_dir, rel_prefix) if runs else {})
    current = doc.read_text(encoding="utf-8")
    return current, replace_generated(current, section)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of <benchmark>.jsonl files")
    parser.add_argument("--doc", type=Path, default=DOC, help="Markdown file with the generated-section markers")
    parser.add_argument("--plots-dir", type=Path, default=PLOTS_DIR, help="where the PNG plots go")
    parser.add_argument("--no-plots", action="store_true",
                        help="do not draw plots (no matplotlib needed; plots already in --plots-dir stay linked)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the document's generated section is out of date")
    args = parser.parse_args(argv)
    try:
        current, updated = generate(args.results, args.doc, args.plots_dir,
                                    draw=not (args.no_plots or args.check))
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if current != updated:
            print(f"{args.doc} is out of date: run python -m benchmarks.report", file=sys.stderr)
            return 1
        print(f"{args.doc} is up to date")
        return 0
    if current != updated:
        args.doc.write_text(updated, encoding="utf-8")
        print(f"wrote the generated section of {args.doc}")
    else:
        print(f"{args.doc}: generated section unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
