"""Unit tests for the benchmarks' engine figures and the GPU check's sizing and summary (fixed inputs, no MLX)."""

from __future__ import annotations

import pytest

from benchmarks.fleet_probe import engine_table, merge, summarize
from benchmarks.gpu_check import PARTS, Part, size
from benchmarks.gpu_summary import batch_table, cause_table, summary_markdown

pytestmark = pytest.mark.timeout(10)


def delta(**over: float) -> dict[str, float]:
    d = {"steps": 100.0, "decode_steps": 96.0, "generated_tokens": 720.0, "solo_steps": 6.0, "batch_steps": 90.0,
         "handoffs": 1.0, "mlx_s": 1.9, "own_s": 0.1, "requests_solo": 2.0, "requests_batch": 12.0,
         "requests_handoff": 1.0, "prompt_cache_hits": 3.0, "prompt_cache_hit_tokens": 12.0}
    d.update(over)
    return d


def test_summarize_gives_paths_the_split_per_step_and_its_share() -> None:
    e = summarize(delta(), {"worker": 3.0, "broker": 0.2, "client": None})
    assert e["paths"] == {"solo": 2, "batch": 12, "handoff": 1} and e["handoffs"] == 1
    assert e["mean_batch"] == pytest.approx(7.5)
    assert (e["mlx_ms_per_step"], e["own_ms_per_step"], e["own_pct"]) == (pytest.approx(19.0), pytest.approx(1.0),
                                                                          pytest.approx(5.0))
    assert summarize({}, {})["mean_batch"] == 0.0 and summarize({}, {})["own_pct"] == 0.0


def test_merge_adds_runs_and_recomputes_the_per_step_figures() -> None:
    a = summarize(delta(), {"worker": 3.0, "broker": 0.2, "client": 0.1})
    b = summarize(delta(steps=50.0, decode_steps=50.0, generated_tokens=400.0, mlx_s=0.9, own_s=0.1),
                  {"worker": 1.0, "broker": None, "client": 0.1}, complete=False)
    m = merge([a, b])
    assert m["steps"] == 150 and m["paths"]["batch"] == 24 and (m["cache_hits"], m["cache_hit_tokens"]) == (6, 24)
    assert m["mean_batch"] == pytest.approx(1120 / 146)
    assert m["own_ms_per_step"] == pytest.approx(0.2 / 150 * 1000)
    assert m["cpu_s"] == {"worker": 4.0, "broker": None, "client": pytest.approx(0.2)}
    assert m["complete"] is False and merge([]) == {}


def test_engine_table_marks_late_heartbeats_and_unknown_cpu() -> None:
    e = summarize(delta(), {"worker": 3.0, "broker": None, "client": 0.1}, complete=False)
    table = engine_table({"fast-path": e, "bare": {}}, {"fast-path": "fleet (default)"})
    rows = table.splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| fleet (default) (heartbeat late) | 2 | 12 | 1 | 100 | 7.50 | 3 (12) |")
    assert rows[0].endswith("| 3.0 / — / 0.1 |")


@pytest.mark.parametrize("seconds, t_req, caps, expected", [
    (200.0, 0.25, {"questions": 50, "repeats": 2}, (50, 2)),  # capped
    (30.0, 0.25, {"questions": 50, "repeats": 2}, (12, 1)),  # too few for two repeats of 16
    (5.0, 0.25, {"questions": 50, "repeats": 2}, (4, 1)),  # never below 4
    (200.0, 0.25, {"questions": 50, "repeats": 1}, (50, 1)),
])
def test_size_fits_the_cost_model_within_the_caps(seconds: float, t_req: float, caps: dict[str, int],
                                                  expected: tuple[int, int]) -> None:
    part = Part("seed", 0.4, 40, 6.6)
    assert size(part, seconds, t_req, caps) == expected


def test_every_part_has_a_share_and_the_shares_fill_the_run() -> None:
    assert sum(p.share for p in PARTS) == pytest.approx(1.0)
    assert [p.name for p in PARTS][:2] == ["seed", "seq2"]


def seed_report(fleet_ms: float, bare_ms: float, variant: str = "sequential") -> dict:
    def runs(ms: float) -> list[dict[str, float]]:
        return [{"response_mean_s": ms / 1000, "ttft_median_s": ms / 10000, "tok_per_s": 50000 / ms,
                 "ttft_mean_s": ms / 10000}]
    engine = summarize(delta(requests_solo=20.0, requests_batch=0.0, requests_handoff=0.0), {})
    return {"status": "ok", "report": {"results": {"metrics": {variant: {"bare": runs(bare_ms), "fast-path": runs(fleet_ms)}},
                                                   "engine": {variant: {"bare": [None], "fast-path": [engine]}}}}}


def test_the_summary_puts_one_cause_per_row_and_says_what_did_not_run() -> None:
    parts = {"seed": seed_report(210.0, 200.0), "seq2": {"status": "skipped", "why": "12 s left"},
             "seq2_alternating": seed_report(202.0, 200.0)}
    table = cause_table(parts)
    assert "| seed | 4 (bare, v1.4.1, default, mlx_lm.server) | back to back | client thread | 210.0 | 200.0 | +5.0% |" in table
    assert "| seq2 | 2 (bare, default) | back to back | client thread | skipped: 12 s left |" in table
    assert "| seq2_alternating | 2 (bare, default) | alternating | client thread | 202.0 | 200.0 | +1.0% |" in table
    assert "| seq2_alternating_direct | 2 (bare, default) | alternating | main thread | not run |" in table
    assert "20/0/0" in table
    assert batch_table({"seed": seed_report(250.0, 200.0, "concurrent")}).splitlines()[-1].startswith(
        "| fast-path | 200.0 | 0.800 |")
    md = summary_markdown({"model": "m", "max_tokens": 50, "calibration": {"error": "boom"}, "parts": parts})
    assert "**Calibration failed:**" in md and "boom" in md and "| seq2 | skipped: 12 s left |" in md
