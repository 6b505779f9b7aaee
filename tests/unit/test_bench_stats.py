"""Unit tests for the benchmarks' statistics and the seed table's formatting (fixed inputs, no MLX)."""

from __future__ import annotations

import argparse
import math

import pytest

from actors.stats import percentile
from benchmarks.common import Summary, ratio, spread, within_noise
from benchmarks.load import LoadRun, RequestSample
from benchmarks.tables import (SEED_COLUMNS, compare, comparison_table, fmt_spread, metrics_table, run_metrics,
                               verdict)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(("q", "expected"), [(0, 10.0), (50, 30.0), (95, 48.0), (99, 49.6), (100, 50.0)])
def test_percentile_of_five(q: float, expected: float) -> None:
    assert percentile([50.0, 10.0, 40.0, 20.0, 30.0], q) == pytest.approx(expected)


def test_summary_of_fixed_values() -> None:
    s = Summary.of([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean, s.median, s.min, s.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert s.p95 == pytest.approx(3.85)
    assert s.p99 == pytest.approx(3.97)
    assert s.stdev == pytest.approx(math.sqrt(5 / 3))  # sample standard deviation


def test_summary_of_one_value_has_no_spread() -> None:
    s = Summary.of([0.2])
    assert (s.mean, s.median, s.p99, s.stdev) == (0.2, 0.2, 0.2, 0.0)


def test_summary_of_nothing_raises() -> None:
    with pytest.raises(ValueError):
        Summary.of([])


@pytest.mark.parametrize(("a", "b", "expected"), [(3.0, 2.0, 1.5), (0.0, 5.0, 0.0), (1.0, 4.0, 0.25)])
def test_ratio(a: float, b: float, expected: float) -> None:
    assert ratio(a, b) == expected


def test_ratio_by_zero_is_nan() -> None:
    assert math.isnan(ratio(1.0, 0.0))


@pytest.mark.parametrize(
    ("values", "mean", "half_range_pct"),
    [
        ([100.0, 100.0, 100.0], 100.0, 0.0),
        ([98.0, 100.0, 102.0], 100.0, 2.0),
        ([90.0, 110.0], 100.0, 10.0),
        ([5.0], 5.0, 0.0),
        ([0.0, 0.0], 0.0, 0.0),  # no division by a zero mean
    ],
)
def test_spread(values: list[float], mean: float, half_range_pct: float) -> None:
    s = spread(values)
    assert s["mean"] == pytest.approx(mean)
    assert s["half_range_pct"] == pytest.approx(half_range_pct)
    assert (s["min"], s["max"]) == (min(values), max(values))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 2.0, 3.0], [2.5, 4.0, 5.0], True),  # ranges overlap
        ([1.0, 2.0], [2.0, 3.0], True),  # touching counts as overlap
        ([1.0, 2.0], [2.1, 3.0], False),
        ([5.0, 6.0], [1.0, 4.9], False),
        ([1.0, 10.0], [4.0, 5.0], True),  # one inside the other
    ],
)
def test_within_noise(a: list[float], b: list[float], expected: bool) -> None:
    assert within_noise(a, b) is expected
    assert within_noise(b, a) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([1.0, 2.0], [1.5, 3.0], "within noise"), ([1.0, 2.0], [3.0, 4.0], "beyond noise"),
     ([1.0], [1.0, 2.0], "one repeat: noise unknown")],
)
def test_verdict(a: list[float], b: list[float], expected: str) -> None:
    assert verdict(a, b) == expected


def _run(totals: list[float], ttfts: list[float], tokens: int, wall_s: float, failed: int = 0) -> LoadRun:
    ok = [RequestSample(t, r, tokens) for r, t in zip(totals, ttfts)]
    bad = [RequestSample(0.0, 0.1, 0, ok=False, error="x")] * failed
    return LoadRun(1, wall_s, ok + bad)


def test_run_metrics_on_fixed_samples() -> None:
    m = run_metrics(_run([0.1, 0.2, 0.3, 0.4], [0.01, 0.02, 0.03, 0.04], 50, 2.0, failed=1))
    assert m["requests"] == 5 and m["ok"] == 4
    assert m["success_rate"] == pytest.approx(0.8)
    assert m["tokens"] == 200
    assert m["tok_per_s"] == pytest.approx(100.0)
    assert m["total_s"] == 2.0
    assert m["response_mean_s"] == pytest.approx(0.25)
    assert m["response_median_s"] == pytest.approx(0.25)
    assert m["response_p95_s"] == pytest.approx(0.385)
    assert m["response_p99_s"] == pytest.approx(0.397)
    assert m["response_stdev_s"] == pytest.approx(math.sqrt(5 / 3) / 10)
    assert m["ttft_mean_s"] == pytest.approx(0.025)


def test_run_metrics_with_no_success_is_nan_not_an_error() -> None:
    m = run_metrics(_run([], [], 0, 1.0, failed=2))
    assert m["success_rate"] == 0.0 and m["tok_per_s"] == 0.0
    assert math.isnan(m["response_mean_s"]) and math.isnan(m["ttft_p99_s"])


@pytest.mark.parametrize(
    ("values", "scale", "digits", "expected"),
    [
        ([0.4, 0.4, 0.4], 1000.0, 1, "400.0 ±0.0%"),
        ([0.098, 0.1, 0.102], 1000.0, 1, "100.0 ±2.0%"),
        ([0.405], 1000.0, 1, "405.0"),  # one repeat: no spread to show
        ([2500.0, 2500.0], 1.0, 0, "2500 ±0.0%"),
        ([1.0, math.nan], 100.0, 1, "100.0"),  # NaN repeats are left out
        ([math.nan], 1.0, 1, "—"),
    ],
)
def test_fmt_spread(values: list[float], scale: float, digits: int, expected: str) -> None:
    assert fmt_spread(values, scale=scale, digits=digits) == expected


def _metrics(mean_s: float, tok_per_s: float) -> dict[str, float]:
    m = {key: mean_s for key, *_ in SEED_COLUMNS}
    m.update(tok_per_s=tok_per_s, total_s=10.0, success_rate=1.0, tokens=2500.0)
    return m


RESULTS = {
    "bare": [_metrics(0.400, 125.0), _metrics(0.410, 122.0), _metrics(0.390, 128.0)],
    "fleet": [_metrics(0.402, 124.0), _metrics(0.412, 121.0), _metrics(0.396, 126.0)],
    "server": [_metrics(0.500, 100.0), _metrics(0.510, 98.0), _metrics(0.490, 102.0)],
}
LABELS = {"bare": "bare engine", "fleet": "fleet", "server": "mlx_lm.server"}


def test_seed_table_rows_show_mean_and_spread() -> None:
    lines = metrics_table(RESULTS, LABELS).splitlines()
    assert lines[0] == ("| configuration | mean ms | median ms | p95 ms | p99 ms | stddev ms | TTFT mean ms | tok/s "
                        "| total s | success % | tokens |")
    assert len(lines) == 2 + len(RESULTS)
    assert lines[2] == ("| bare engine | 400.0 ±2.5% | 400.0 ±2.5% | 400.0 ±2.5% | 400.0 ±2.5% | 400.0 ±2.5% "
                        "| 400.0 ±2.5% | 125.0 ±2.4% | 10.00 ±0.0% | 100.0 ±0.0% | 2500 ±0.0% |")


def test_compare_ratio_change_and_verdict() -> None:
    near = compare(RESULTS["fleet"], RESULTS["bare"], "response_mean_s")
    assert near["ratio"] == pytest.approx(0.403333 / 0.4, rel=1e-4)
    assert near["change_pct"] == pytest.approx(0.8333, rel=1e-3)
    assert near["verdict"] == "within noise"
    far = compare(RESULTS["server"], RESULTS["bare"], "tok_per_s")
    assert far["ratio"] == pytest.approx(0.8)
    assert far["verdict"] == "beyond noise"


def test_comparison_table_labels_noise_and_direction() -> None:
    table = comparison_table(RESULTS, LABELS, "bare")
    fleet_row = next(line for line in table.splitlines() if line.startswith("| fleet |"))
    server_row = next(line for line in table.splitlines() if line.startswith("| mlx_lm.server |"))
    assert "+0.8% (within noise)" in fleet_row
    assert "+25.0% (beyond noise, worse)" in server_row  # slower response
    assert "-20.0% (beyond noise, worse)" in server_row  # fewer tok/s
    assert "| bare engine |" not in table  # the baseline is not compared with itself
    assert comparison_table(RESULTS, LABELS, "missing") == "(no missing in this run)"


def test_soak_kills_measure_the_stall_each_stream_saw_across_a_kill() -> None:
    from benchmarks.soak_kills import kills_markdown, stall_across, stalls_by_kill

    streams = [[100.0, 100.1, 100.2, 101.5, 101.6],  # a chunk at 100.2, the next 1.3 s later: across the kill at 101.0
               [100.5, 102.0],  # started before the kill, nothing until 102.0
               [101.2, 101.3],  # started after it
               [99.0, 99.5]]  # ended before it
    assert stall_across(101.0, streams[0]) == pytest.approx(1.3) and stall_across(101.0, streams[3]) is None
    assert stall_across(100.2, streams[0]) == pytest.approx(1.3)  # an event at the kill itself counts as before
    (row, empty) = stalls_by_kill([101.0, 200.0], streams, t0_s=90.0)
    assert row["at_s"] == 11.0 and row["streams"] == 2 and row["stall_max_s"] == pytest.approx(1.5)
    assert row["stall_p50_s"] == pytest.approx(1.4) and row["stall_p99_s"] == pytest.approx(1.498)
    assert empty == {"at_s": 110.0, "streams": 0}
    assert kills_markdown([empty])[-1] == "| 110.0 | 0 | - | - | - |"


def test_ab_tables_give_b_against_a() -> None:
    from benchmarks.ab import markdown

    a, b = Summary.of([0.100, 0.100]), Summary.of([0.110, 0.110])
    seq = {metric: {"bare": a, "served": b, "paired_diff": Summary.of([0.010, 0.010]),
                    "diff_ms": {k: 10.0 for k in ("mean", "median", "p95", "p99")},
                    "ratio": {k: 1.1 for k in ("mean", "median", "p95", "p99")}} for metric in ("ttft", "total")}
    seq |= {"tokens_per_request": 50.0, "token_mismatches": 0}
    side = {"tok_per_s": spread([100.0, 100.0]), "ttft_p50_s": spread([0.2, 0.2]), "ttft_p99_s": spread([0.3, 0.3])}
    fast = {**side, "tok_per_s": spread([120.0, 130.0])}
    args = argparse.Namespace(a_label="old", b_label="new", requests=2, max_tokens=50, repeats=2)
    md = markdown({"sequential": seq, "concurrent": {"8": {"a": side, "b": fast}}}, args)
    assert "new costs +0.200 ms against old" in md  # 10 ms over 50 tokens
    assert "| 8 | 100.0 ±0.0% | 125.0 ±4.0% | 1.250 | no | 200.00 / 300.00 | 200.00 / 300.00 |" in md
    close = {**side, "tok_per_s": spread([95.0, 101.0])}
    md = markdown({"sequential": seq, "concurrent": {"8": {"a": side, "b": close}}}, args)
    assert "| 0.980 | yes (within noise) |" in md
