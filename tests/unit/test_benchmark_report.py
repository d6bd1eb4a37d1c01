"""benchmarks.report: parsing result lines, grouping runs, the Markdown it writes between the markers,
the plot data, and the command (with --no-plots, on a temporary document) — all from sample lines."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report as r

pytestmark = pytest.mark.unit

MACHINE = {"cpu": "AMD EPYC", "cores": 2, "mem_gib": 23.5, "python": "3.11.7", "platform": "Linux"}


def line(benchmark: str, metric: str, value: float, *, at: str = "2026-11-26T09:30:00+00:00",
         baseline_metric: str = "base", baseline_value: float | None = 100.0, ratio: float | None = None,
         quick: bool = False, unit: str = "things/s", **extra: Any) -> str:
    if ratio is None and baseline_value:
        ratio = round(value / baseline_value, 4)
    return json.dumps({"benchmark": benchmark, "metric": metric, "value": value, "unit": unit,
                       "baseline_metric": baseline_metric, "baseline_value": baseline_value, "ratio": ratio,
                       "machine": MACHINE, "params": {"quick": quick}, "at": at, **extra})


def figs(*lines: str) -> list[r.Figure]:
    figures, problems = r.parse_lines(lines)
    assert problems == []
    return figures


# --------------------------------------------------------------------------- parsing


def test_parse_line_keeps_core_fields_and_extra() -> None:
    fig = r.parse_line(line("serve", "cache_hit_p99_ms_c1", 21.5, unit="ms", valid=False, p50_ms=11.7))
    assert (fig.benchmark, fig.metric, fig.value, fig.unit) == ("serve", "cache_hit_p99_ms_c1", 21.5, "ms")
    assert fig.baseline_value == 100.0 and fig.ratio == 0.215
    assert fig.extra == {"valid": False, "p50_ms": 11.7}
    assert not fig.valid and not fig.quick


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"benchmark": "x", "metric": "m"}), "missing value, unit"),
    (json.dumps({k: "" for k in r.REQUIRED_KEYS}), "empty benchmark or metric"),
])
def test_parse_line_refuses_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        r.parse_line(text)


def test_parse_lines_skips_blank_and_reports_bad_lines_by_number() -> None:
    figures, problems = r.parse_lines([line("ingest", "a", 1.0), "", "oops", line("ingest", "b", 2.0)], "ingest.jsonl")
    assert [f.metric for f in figures] == ["a", "b"]
    assert problems == ["ingest.jsonl:3: not JSON (Expecting value)"]


def test_non_finite_and_boolean_numbers_become_none() -> None:
    fig = r.parse_line(json.dumps({"benchmark": "b", "metric": "m", "value": True, "unit": "u",
                                   "baseline_metric": None, "baseline_value": float("nan"), "ratio": None,
                                   "machine": "?", "params": []}))
    assert fig.value is None and fig.baseline_value is None and fig.baseline_metric is None
    assert fig.machine == {} and fig.params == {} and fig.at == ""


# --------------------------------------------------------------------------- runs


def test_runs_group_by_benchmark_and_time_in_pipeline_order() -> None:
    runs = r.group_runs(figs(
        line("serve", "cache_hit_rps_c1", 80, at="2026-11-26T15:00:00+00:00"),
        line("ingest", "ingest_records_per_s_per_core", 2, at="2026-11-26T10:00:00+00:00"),
        line("ingest", "ingest_records_per_s_per_core", 1, at="2026-11-26T09:00:00+00:00"),
        line("zeta", "z", 1),
        line("ingest", "other", 3, at="2026-11-26T10:00:00+00:00"),
    ))
    assert list(runs) == ["ingest", "serve", "zeta"]
    assert [run.at[11:13] for run in runs["ingest"]] == ["09", "10"]
    assert [f.metric for f in runs["ingest"][1].figures] == ["ingest_records_per_s_per_core", "other"]


def test_latest_run_prefers_a_full_run_over_a_later_quick_one() -> None:
    runs = r.group_runs(figs(
        line("etl", "etl_events_per_s_per_core", 1, at="2026-11-26T09:00:00+00:00"),
        line("etl", "etl_events_per_s_per_core", 2, at="2026-11-26T10:00:00+00:00", quick=True),
    ))["etl"]
    assert r.latest_run(runs).at.startswith("2026-11-26T09")
    only_quick = r.group_runs(figs(line("etl", "x", 1, quick=True)))["etl"]
    assert r.latest_run(only_quick).quick


def test_headline_is_the_named_figure_else_the_first() -> None:
    run = r.group_runs(figs(line("train", "train_wall_samples_per_s", 1),
                            line("train", "train_samples_per_s", 2)))["train"][0]
    assert run.headline().metric == "train_samples_per_s"
    new = r.group_runs(figs(line("brand_new", "first", 1), line("brand_new", "second", 2)))["brand_new"][0]
    assert new.headline().metric == "first"


def test_expected_benchmarks_are_modules_with_a_quick_flag(tmp_path: Path) -> None:
    (tmp_path / "ingest.py").write_text('p.add_argument("--quick")')
    (tmp_path / "common.py").write_text('"--quick"')  # helper module, not a benchmark
    (tmp_path / "notes.py").write_text("nothing")
    assert r.expected_benchmarks(tmp_path) == ["ingest"]
    assert r.missing_benchmarks(["serve", "ingest", "etl"], ["ingest"]) == ["etl", "serve"]


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "0"), (58567.2, "58,567"), (405.5, "405.5"), (345.0, "345"), (21.499, "21.5"),
    (0.34021, "0.340"), (-1234.5, "-1,234"),
])
def test_fmt_number(value: float | None, text: str) -> None:
    assert r.fmt_number(value) == text


def test_fmt_when_and_machine() -> None:
    assert r.fmt_when("2026-11-26T15:50:25+00:00") == "2026-11-26 15:50 UTC"
    assert r.fmt_when("2026-11-26T15:50:25+01:00") == "2026-11-26T15:50+01:00"
    assert r.fmt_when("yesterday") == "yesterday"
    assert r.fmt_machine(MACHINE) == "AMD EPYC, 2 cores, 23.5 GiB, Python 3.11.7"
    assert r.fmt_machine({}) == "machine not recorded"


def test_figure_note_names_dataset_target_and_invalid() -> None:
    fig = r.parse_line(line("quality", "recall@20_vs_popular", 2.1, dataset="movielens-100k", target_met=True))
    assert r.figure_note(fig) == "dataset movielens-100k; target met"
    bad = r.parse_line(line("serve", "cache_hit_rps_c8", 120, valid=False))
    assert "invalid" in r.figure_note(bad)


# --------------------------------------------------------------------------- serve cells


def serve_run(valid_c8: bool = False) -> r.Run:
    at = "2026-11-26T15:50:25+00:00"
    lines = []
    for path, rps, p99 in (("cache_hit", 82.3, 21.5), ("realtime", 33.3, 47.0)):
        for clients, ok in ((1, True), (8, valid_c8)):
            lines.append(line("serve", f"{path}_p99_ms_c{clients}", p99 * clients, at=at, unit="ms",
                              baseline_value=7.6, valid=ok, p50_ms=p99 / 2, p95_ms=p99 * 0.8,
                              baseline_p50_ms=2.2, baseline_p95_ms=4.6))
            lines.append(line("serve", f"{path}_rps_c{clients}", rps, at=at, unit="requests/s",
                              baseline_value=390.2, valid=ok))
    return r.group_runs(figs(*lines))["serve"][0]


def test_serve_points_pair_latency_and_throughput_per_path_and_clients() -> None:
    points = r.serve_points(serve_run())
    assert [(p.path, p.clients) for p in points] == [("cache_hit", 1), ("cache_hit", 8), ("realtime", 1),
                                                      ("realtime", 8)]
    first = points[0]
    assert (first.rps, first.p50_ms, first.p95_ms, first.p99_ms) == (82.3, 10.75, 17.2, 21.5)
    assert (first.baseline_rps, first.baseline_p50_ms, first.baseline_p99_ms) == (390.2, 2.2, 7.6)
    assert first.valid and not points[1].valid


def test_serve_table_marks_invalid_cells() -> None:
    rows = r.serve_table(serve_run())
    assert rows[2].startswith("| cache hit | 1 | 82.3 |") and rows[2].endswith("| yes |")
    assert rows[3].endswith("| **no** |")


# --------------------------------------------------------------------------- the section


def sample_figures() -> list[r.Figure]:
    return [*figs(
        line("ingest", "ingest_records_per_s_per_core", 51814, at="2026-11-26T09:30:33+00:00",
             baseline_metric="decode_only_records_per_s_per_core", baseline_value=138907, unit="records/s/core"),
        line("ingest", "ingest_records_per_s_per_core", 58567, at="2026-11-26T09:30:58+00:00",
             baseline_metric="decode_only_records_per_s_per_core", baseline_value=172131, unit="records/s/core"),
        line("quality", "recall@20_two_tower", 0.225, dataset="movielens-100k", unit="recall"),
        line("quality", "recall@20_popular", 0.108, dataset="movielens-100k", unit="recall"),
        line("quality", "recall@20_vs_popular", 2.095, dataset="movielens-100k", unit="ratio",
             baseline_metric="target_recall@20_vs_popular", baseline_value=1.5, target_met=True),
    ), *serve_run().figures]


def test_render_section_summarises_every_benchmark_with_machine_date_baseline_and_ratio() -> None:
    text = r.render_section(sample_figures(), expected=["ingest", "quality", "serve", "train"])
    assert text.startswith("## Recorded figures (generated)\n")
    assert "**No recorded results on this checkout** for: `train`" in text
    assert ("| ingest | 2026-11-26 09:30 UTC | AMD EPYC, 2 cores, 23.5 GiB, Python 3.11.7 | "
            "`ingest_records_per_s_per_core` | 58,567 records/s/core | 172,131 | 0.34 |") in text
    assert "`recall@20_vs_popular` (movielens-100k)" in text
    assert "### ingest" in text and "### quality" in text and "### serve" in text
    # the history of the headline figure lists both ingest runs, oldest first
    assert text.index("| 2026-11-26 09:30 UTC | full | 51,814 |") < text.index("| 2026-11-26 09:30 UTC | full | 58,567 |")
    assert "4 of its figures are flagged invalid" in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_render_section_is_deterministic_and_links_only_given_plots() -> None:
    a = r.render_section(sample_figures(), plots={"serve": "benchmarks/serve.png"})
    b = r.render_section(sample_figures(), plots={"serve": "benchmarks/serve.png"})
    assert a == b
    assert "![serve](benchmarks/serve.png)" in a and "ratios.png" not in a


def test_render_section_without_results_says_so() -> None:
    text = r.render_section([], expected=["ingest"])
    assert "No benchmark results are recorded on this checkout." in text
    assert "for: `ingest`" in text


def test_render_section_reports_skipped_lines() -> None:
    text = r.render_section(sample_figures(), problems=["etl.jsonl:3: not JSON"])
    assert "1 unreadable result line(s) were skipped: `etl.jsonl:3: not JSON`" in text


DOC = "# Benchmark report\n\nIntro.\n\n{begin}\nold generated text\n{end}\n\n## ingest\n\nHand-written.\n"


def test_replace_generated_touches_only_the_text_between_the_markers() -> None:
    doc = DOC.format(begin=r.BEGIN_MARKER, end=r.END_MARKER)
    out = r.replace_generated(doc, "## Recorded figures\n\nnew\n")
    assert out == (f"# Benchmark report\n\nIntro.\n\n{r.BEGIN_MARKER}\n## Recorded figures\n\nnew\n"
                   f"{r.END_MARKER}\n\n## ingest\n\nHand-written.\n")
    assert r.replace_generated(out, "## Recorded figures\n\nnew\n") == out  # idempotent


@pytest.mark.parametrize("doc", [
    "no markers at all",
    f"{r.BEGIN_MARKER}\n{r.BEGIN_MARKER}\n{r.END_MARKER}",
    f"{r.END_MARKER}\n{r.BEGIN_MARKER}",
])
def test_replace_generated_refuses_missing_duplicate_or_reversed_markers(doc: str) -> None:
    with pytest.raises(r.ReportError):
        r.replace_generated(doc, "x")


# --------------------------------------------------------------------------- plot data


def test_quality_bars_and_ratio_series() -> None:
    runs = r.group_runs(sample_figures())
    assert r.quality_bars(r.latest_run(runs["quality"])) == {
        "movielens-100k": {"two_tower": 0.225, "popular": 0.108}}
    series = r.ratio_series(runs)
    assert [round(p[1], 3) for p in series["ingest"]] == [0.373, 0.34]
    assert series["serve"] == [("2026-11-26T15:50:25+00:00", 0.2109, False)]


# --------------------------------------------------------------------------- the command


def test_main_writes_the_section_and_check_agrees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "ingest.jsonl").write_text("\n".join(
        line("ingest", "ingest_records_per_s_per_core", v, at=f"2026-11-26T09:3{i}:00+00:00")
        for i, v in enumerate((51814, 58567))) + "\n")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC.format(begin=r.BEGIN_MARKER, end=r.END_MARKER))
    args = ["--results", str(results), "--doc", str(doc), "--plots-dir", str(tmp_path / "plots")]

    assert r.main([*args, "--check"]) == 1  # stale
    assert r.main([*args, "--no-plots"]) == 0
    text = doc.read_text()
    assert "old generated text" not in text and "| ingest | 2026-11-26 09:31 UTC |" in text
    assert text.endswith("## ingest\n\nHand-written.\n") and text.startswith("# Benchmark report\n\nIntro.\n\n")
    assert r.main([*args, "--check"]) == 0
    assert r.main([*args, "--no-plots"]) == 0
    assert "unchanged" in capsys.readouterr().out


def test_main_fails_with_one_line_when_the_markers_are_missing(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# no markers\n")
    assert r.main(["--results", str(tmp_path), "--doc", str(doc), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expected exactly one") and err.count("\n") == 1
    assert doc.read_text() == "# no markers\n"


def test_every_line_of_one_run_carries_the_same_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report groups a run's lines by (benchmark, at): a run whose lines straddle a second boundary
    must not become two runs."""
    import benchmarks.common as common

    class Clock:
        seconds = 0

        @classmethod
        def now(cls, tz: Any = None) -> datetime:
            cls.seconds += 1  # every call a second later
            return datetime(2026, 11, 27, 6, 49, cls.seconds, tzinfo=tz)

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "datetime", Clock)
    monkeypatch.setattr(common, "_RUN_AT", None)
    lines = [common.emit("demo", f"m{i}", 1.0, "x", "b", 2.0, {}) for i in range(3)]
    assert {line["at"] for line in lines} == {"2026-11-27T06:49:01+00:00"}
    figures, _ = r.load_results(tmp_path)
    assert len(r.group_runs(figures)["demo"]) == 1


def test_the_headline_run_is_the_latest_full_run_of_the_stated_set_up() -> None:
    def run(at: str, **params: Any) -> r.Run:
        fig = r.Figure(benchmark="serve", metric="m", value=1.0, unit="x", baseline_metric="b", baseline_value=1.0,
                       ratio=1.0, machine={}, params=params, at=at, extra={})
        return r.Run("serve", at, (fig,))

    stated, variant, quick = run("1", quick=False), run("2", quick=False, variant="raw client"), run("3", quick=True)
    assert r.latest_run([stated, variant, quick]) is stated
    assert r.latest_run([variant, quick]) is variant
    assert r.latest_run([quick]) is quick
