"""bench.report's GPU table and the quick GPU plan: % of copy for every dtype from 64 MiB up.

Plain tests (no benchmark fixture): run with `pytest bench/test_report.py`.
"""
import copy
import json
from pathlib import Path

from bench import report
from bench.cases import CASES, DTYPES, min_bytes
from bench.matrix import plan

H200 = Path(__file__).resolve().parent / "results" / "gpu-2026-12-04-h200" / "bench-quick" / "results.json"


def test_the_quick_gpu_plan_judges_every_dtype_from_64_mib_up():
    groups = plan("cuda", quick=True).groups
    for dtype in ("fp32", "fp16", "bf16"):
        sizes = [min_bytes(CASES["eta0"], s, DTYPES[dtype])
                 for c, d, shapes in groups if c == "eta0" and d == dtype for s in shapes]
        assert any(n >= report.MIB_64 for n in sizes), dtype
        # Half precision reaches the traffic of fp32's largest shape too.
        assert max(sizes) >= 150e6, dtype


def test_gpu_rows_from_64_mib_show_their_share_of_copy_and_of_a_same_size_copy():
    result = json.loads(H200.read_text())
    row = next(r for r in result["steps"] if r["provider"] == "triton" and r["dtype"] == "bf16"
               and r["shape_id"] == "B64-3x256x256")
    assert report.MIB_64 <= row["bytes"] and not row["above_cache"]  # under 2x L2, judged by the targets
    line = next(ln for ln in report.table(result).splitlines() if ln.startswith("eta0      bf16 B64-3x256x256"))
    assert f"{row['pct_copy']:5.1f}%" in line
    # A run that also timed a copy of the row's own traffic lists the step against it.
    timed = copy.deepcopy(result)
    for r in timed["steps"]:
        if r["dtype"] == "bf16" and r["shape_id"] == "B64-3x256x256":
            r.update(same_copy_s=20e-6, pct_same_copy=100 * r["gbs"] / (r["bytes"] / 20e-6 / 1e9))
    listed = [ln for ln in report.table(timed).splitlines() if "of a same-size copy" in ln]
    assert len(listed) == 1 and "bf16" in listed[0] and f"{100 * 20e-6 / row['p50_s']:5.1f}%" in listed[0]


def test_the_same_size_copy_target_judges_only_rows_that_timed_one():
    result = json.loads(H200.read_text())
    name = "GPU: fused step >= 85% of a copy of its own traffic"
    verdict = next(t for t in report.targets(result) if t["target"].startswith(name))
    assert verdict["verdict"] == "not measured"  # this run timed no same-size copies
    for r in result["steps"]:
        if r["bytes"] >= report.MIB_64:
            r["pct_same_copy"] = 90.0 if r["dtype"] == "fp32" else 80.0
    verdict = next(t for t in report.targets(result) if t["target"].startswith(name))
    assert verdict["verdict"] == "missed" and "80.00% (eta0 bf16 B64-3x256x256)" in verdict["detail"]
