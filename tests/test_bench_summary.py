"""bench.summary: the README's GPU results table, from synthetic runs with known numbers."""
import pytest

from bench.summary import NOT_MEASURED, gpu_summary, graph_table, host_table


def _results(gate=True, device="cuda"):
    env = {"device": device, "device_name": "Test GPU", "torch": "2.x", "triton": "3.x",
           "commit": "abcdef0123", "date": "2026-01-02T03:04:05Z"}

    def step(case, dtype, provider, p50_s, gbs, nbytes=150_000_000, shape_id="B64-3x256x256"):
        return {"case": case, "dtype": dtype, "provider": provider, "p50_s": p50_s, "gbs": gbs,
                "bytes": nbytes, "shape_id": shape_id}

    steps = [step("eta0", "fp32", "triton", 40e-6, 3600.0), step("eta0", "fp32", "compile", 44e-6, 3300.0),
             step("eta0", "fp32", "triton", 5e-6, 40.0, nbytes=200_000, shape_id="B1-4x64x64"),
             step("eta-drawn", "fp32", "triton", 40e-6, 3600.0), step("eta-drawn", "fp32", "minimal", 120e-6, 1200.0),
             # a baseline at another shape than the fused row's largest: never its comparison
             step("eta0", "fp32", "compile", 1e-6, 9999.0, nbytes=300_000_000, shape_id="B128-3x256x256")]
    return {"environment": env, "parity": {"ok": gate}, "copy_bandwidth": {"gbs": 4000.0}, "steps": steps}


GRAPH = {"rows": [
    {"case": "tiny-eta0", "provider": "fused", "per_step_us": 16.0},
    {"case": "tiny-eta0", "provider": "fused-graph", "per_step_us": 2.0},
    {"case": "tiny-eta0", "provider": "diffusers", "per_step_us": 150.0},
    {"case": "digits", "provider": "fused-graph", "per_step_us": 400.0},
    {"case": "digits", "provider": "diffusers", "per_step_us": None, "skipped": "no diffusers"},
]}


def test_summary_rows_come_from_the_largest_shape_and_the_loops():
    text = gpu_summary(_results(), GRAPH)
    assert "| one step, fp32, eta = 0, B64-3x256x256 (150 MB moved) | 3600 GB/s, 90% of a copy " \
           "| torch.compile: 3300 GB/s | 1.10x |" in text
    assert "minimal eager (torch.randn): 1200 GB/s | 3.00x |" in text
    assert "per step | 2.0 µs (one CUDA graph) | diffusers' loop: 150.0 µs | 75.0x |" in text
    assert "Test GPU, torch 2.x, triton 3.x, commit abcdef0, 2026-01-02" in text


def test_missing_data_reads_not_measured():
    text = gpu_summary(_results(), GRAPH)
    # No bf16 step, no timed diffusers loop for digits, no Stable Diffusion data: no number.
    assert f"| one step, bf16, eta = 0 | {NOT_MEASURED} | | |" in text
    assert f"digits UNet, batch 16, per step | {NOT_MEASURED} |" in text
    assert text.count("fp16, batch") == 3 and text.count(f"| {NOT_MEASURED} | diffusers: {NOT_MEASURED} |") == 3


def _sd(config="sd15", device="cuda", check=True):
    rows = [{"row": "a", "batch": 1, "s_per_image": 0.5}, {"row": "e", "batch": 1, "s_per_image": 0.25},
            {"row": "a", "batch": 4, "s_per_image": 0.2}, {"row": "e", "batch": 4, "error": "OutOfMemoryError: ..."}]
    speedups = [{"row": "e", "batch": 1, "vs": "a", **({"speedup": 2.0} if check else {"withheld": "a row failed"})},
                {"row": "e", "batch": 1, "vs": "c", "speedup": 1.1}]
    env = {**_results()["environment"], "device": device}
    return {"environment": env, "rows": rows, "speedups": speedups,
            "settings": {"config": config, "steps": 50, "guidance": 7.5, "dtype": "float16", "batches": [1, 4]}}


def test_stable_diffusion_rows_when_measured():
    text = gpu_summary(_results(), GRAPH, _sd())
    assert "fp16, batch 1, images/s | 4.00 (`generate --cuda-graph`) | diffusers: 2.00 | 2.00x |" in text
    # A row that failed to run shows no number; its baseline still does.
    assert f"fp16, batch 4, images/s | {NOT_MEASURED} | diffusers: 5.00 |  |" in text
    assert f"fp16, batch 16, images/s | {NOT_MEASURED} | diffusers: {NOT_MEASURED} |" in text  # not in this run
    assert "withheld (images differ from diffusers')" in gpu_summary(_results(), GRAPH, _sd(check=False))


@pytest.mark.parametrize("sd", [_sd(config="tiny"), _sd(device="cpu")], ids=["tiny-config", "cpu-run"])
def test_stable_diffusion_rows_refuse_other_runs(sd):
    with pytest.raises(ValueError, match="SD 1.5 configuration measured on a GPU"):
        gpu_summary(_results(), GRAPH, sd)


def test_a_failed_parity_gate_withholds_the_ratios():
    text = gpu_summary(_results(gate=False), GRAPH)
    assert "withheld (parity gate failed)" in text and "1.10x" not in text


def test_a_cpu_run_is_refused():
    with pytest.raises(ValueError, match="measured on a GPU"):
        gpu_summary(_results(device="cpu"), GRAPH)


def test_graph_table_lists_every_timed_case():
    text = graph_table(GRAPH, _results())
    assert "| trivial model 1x4x8x8, eta 0 | 16.0 µs | 2.0 µs | 150.0 µs | 75.0x | 8.0x |" in text
    assert f"| digits model, batch 16 | {NOT_MEASURED} | 400.0 µs | {NOT_MEASURED} | - | - |" in text


def test_host_table_judges_each_row_by_its_own_target():
    rows = [{"kind": "gpu-host", "label": "sampler/step eta0", "shape": [1, 4, 64, 64], "fused_us": 12.0,
             "target_us": 10.0, "device": "Test GPU"},
            {"kind": "cpu-host", "label": "ddim_fused.ddim_step eta0", "shape": [1, 4, 64, 64], "fused_us": 50.0,
             "target_us": None, "device": "CPU"},
            {"kind": "scheduler-step", "shape": [1, 4, 32, 32], "eta": 1.0, "stock_us": 200.0, "fused_us": 40.0,
             "ratio": 0.2, "device": "cuda", "target": 0.25},
            {"kind": "sampler-step", "case": "guidance", "shape": [1, 4, 8, 8], "fused_us": 30.0,
             "reference_us": 100.0, "ratio": 0.3, "target": 0.25}]
    text = host_table(rows)
    assert "| sampler/step eta0 on Test GPU | 1x4x64x64 | 12.0 µs | | | missed: 12.00 > 10 µs |" in text
    assert "| ddim_fused.ddim_step eta0 on CPU | 1x4x64x64 | 50.0 µs | | | no target |" in text
    assert "| 40.0 µs | diffusers' step: 200.0 µs | 0.20 | met: 0.20 <= 0.25 |" in text
    assert "| 30.0 µs | reference sampler: 100.0 µs | 0.30 | missed: 0.30 > 0.25 |" in text
    gpu_scheduler = dict(rows[2], target=0.2, target_us=30.0, fused_us=25.0)
    assert "| 0.20 | met: <= 30 µs and <= 0.2x |" in host_table([gpu_scheduler])
    assert "missed: <= 30 µs and <= 0.2x" in host_table([dict(gpu_scheduler, fused_us=31.0)])
    with pytest.raises(ValueError, match="unknown host row kind"):
        host_table([{"kind": "other", "shape": [1]}])
