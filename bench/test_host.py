"""bench.host: its rows and their report (one round each; the timings themselves are not checked)."""
import pytest

from bench import host


def test_sampler_rows_report_reused_and_first_calls():
    rows = host.sampler_rows(1)
    cases = [row["case"] for row in rows]
    assert cases == [c for name, _, _ in host.SAMPLER_CASES for c in (name, f"{name} new sampler")]
    for row in rows:
        assert row["fused_us"] > 0 and row["reference_us"] > 0
        assert row["target"] == (None if row["case"].endswith("new sampler") else host.SAMPLER_TARGET)
    text = host.format_rows(rows).splitlines()
    assert len(text) == len(rows)
    assert all(("no target" in line) == ("new sampler" in line) for line in text)
    assert all(("meets <= 0.25" in line or "MISSES <= 0.25" in line) for line in text if "new sampler" not in line)


def test_scheduler_rows_cover_every_case():
    pytest.importorskip("diffusers")
    rows = host.scheduler_rows(1)
    assert [(tuple(r["shape"]), r["eta"]) for r in rows] == list(host.SCHEDULER_CASES)
    assert all(r["ratio"] == pytest.approx(r["fused_us"] / r["stock_us"]) for r in rows)
