"""bench.host: its rows and their report (one round each; the timings themselves are not checked)."""
import pytest
import torch

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
    assert all(r["device"] == "cpu" and r["target"] == host.SCHEDULER_TARGET for r in rows)


def test_gpu_rows_render_with_and_without_a_target():
    rows = [{"kind": "gpu-host", "label": "sampler/step eta0", "shape": [1, 4, 64, 64], "fused_us": 7.5,
             "target_us": host.GPU_SAMPLER_TARGET_US, "device": "GPU"},
            {"kind": "gpu-host", "label": "sampler/step eta0 new sampler", "shape": [1, 4, 64, 64], "fused_us": 30.0,
             "target_us": None, "device": "GPU"}]
    reused, new = host.format_rows(rows).splitlines()
    assert "meets <= 10 us" in reused and "no target" in new


def test_scheduler_rows_on_cuda_render_both_targets():
    row = {"kind": "scheduler-step", "shape": [1, 4, 32, 32], "eta": 1.0, "stock_us": 200.0, "fused_us": 50.0,
           "ratio": 0.25, "device": "cuda", "target": host.GPU_SCHEDULER_TARGET,
           "target_us": host.GPU_SCHEDULER_TARGET_US}
    line = host.format_rows([row])
    assert "scheduler.step 1x4x32x32 eta 1 on cuda" in line and "MISSES <= 30 us and <= 0.2x" in line
    assert "meets <= 30 us and <= 0.2x" in host.format_rows([dict(row, fused_us=25.0, ratio=0.125)])
    assert "MISSES" in host.format_rows([dict(row, fused_us=25.0, ratio=0.25)])  # fast, but not 0.2x diffusers'


def test_gpu_rows_carry_every_target_of_the_gpu_path():
    """The rows `--device cuda` reports (run here on CPU tensors: labels, targets and verdicts only)."""
    rows = host.gpu_rows(1, torch.device("cpu"))
    targets = {row["label"]: row["target_us"] for row in rows}
    assert targets == {"sampler/step eta0": 10.0, "sampler/step eta0 new sampler": None,
                       "sampler/step eta1-keyed": 10.0, "sampler/step eta1-keyed new sampler": None,
                       "sampler/step guidance": 15.0, "sampler/step guidance new sampler": None,
                       "ddim_fused.ddim_step eta0": 15.0, "ddim_fused.ddim_step eta1-keyed": 15.0}
    for row, line in zip(rows, host.format_rows(rows).splitlines()):
        assert (f"<= {row['target_us']:g} us" in line and ("meets" in line or "MISSES" in line)
                if row["target_us"] else "no target" in line), line


def test_op_rows_on_the_cpu_have_no_target():
    rows = host.op_rows(1, torch.device("cpu"), None)
    assert [r["label"] for r in rows] == ["ddim_fused.ddim_step eta0", "ddim_fused.ddim_step eta1-keyed"]
    assert all(r["kind"] == "cpu-host" and r["device"] == "CPU" and r["fused_us"] > 0 for r in rows)
    assert all("no target" in line and "on CPU" in line for line in host.format_rows(rows).splitlines())
