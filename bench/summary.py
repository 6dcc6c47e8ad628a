"""The GPU result tables of the README and docs/performance.md, rendered from committed runs.

    gpu_summary(results, graph[, sd])   the README's one results table: the step at
                                        bandwidth, the captured loop against diffusers'
                                        loop, Stable Diffusion images/s
    graph_table(graph, results)         every captured-loop row of a `bench.gpu_graph` run
    host_table(rows)                    every row of a `bench.host` run (host.json)

`results` is a results.json of `python -m bench` on a GPU, `graph` a gpu_graph.json of
`python -m bench.gpu_graph` from the same machine, `sd` the JSON of the Stable Diffusion
benchmark. A row whose data is absent says "not measured"; nothing here invents a number.
"""
from __future__ import annotations

# The step rows of the summary: (case, dtype) at the largest shape of the quick matrix,
# where the traffic is far above the GPU's caches and the step is bandwidth-bound.
SUMMARY_STEPS = (("eta0", "fp32", "eta = 0"), ("eta-drawn", "fp32", "eta > 0, noise drawn in the kernel"),
                 ("eta0", "bf16", "eta = 0"))
SUMMARY_LOOPS = (("tiny-eta0", "trivial model 1x4x8x8, eta 0: the loop's own cost"),
                 ("digits", "digits UNet, batch 16"))
GRAPH_LABELS = {"tiny-eta0": "trivial model 1x4x8x8, eta 0", "tiny-eta1": "trivial model 1x4x8x8, eta 1",
                "tiny-cfg": "trivial model 1x4x8x8, guidance", "sd-latent-eta1": "trivial model 4x4x64x64, eta 1",
                "digits": "digits model, batch 16", "digits-cfg": "digits model, batch 16, guidance"}
NOT_MEASURED = "not measured"
# bench.sd's rows: (a) diffusers' StableDiffusionPipeline, (e) `ddim-fused generate --cuda-graph`.
SD_BASE, SD_FUSED, SD_BATCHES = "a", "e", (1, 4, 16)
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _environment(results: dict) -> str:
    env = results["environment"]
    dirty = " with uncommitted changes" if env.get("dirty") else ""
    return (f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
            f"commit {str(env['commit'])[:7]}{dirty}, {env['date'][:10]}")


def _step(results: dict, case: str, dtype: str, provider: str, shape_id: str | None = None) -> dict | None:
    """The timed step row of provider for (case, dtype): at shape_id, else at the largest shape."""
    rows = [r for r in results["steps"] if r["case"] == case and r["dtype"] == dtype and r["provider"] == provider
            and r.get("p50_s") and shape_id in (None, r["shape_id"])]
    return max(rows, key=lambda r: r["bytes"], default=None)


def _loops(graph: dict) -> dict:
    """{case: {provider: row}} of a gpu_graph.json, timed rows only."""
    out = {}
    for r in graph["rows"]:
        if r.get("per_step_us") is not None:
            out.setdefault(r["case"], {})[r["provider"]] = r
    return out


def gpu_summary(results: dict, graph: dict, sd: dict | None = None) -> str:
    """The README's results table (markdown) from one GPU run's step, loop and SD data.

    Args:
        results: a GPU results.json of `python -m bench` (its `steps` and `copy_bandwidth`).
        graph: a gpu_graph.json of `python -m bench.gpu_graph` (per-step loop times).
        sd: an sd.json of `python -m bench.sd` on a GPU with the SD 1.5 configuration, or None
            while it has not been measured.
    Returns:
        A markdown table and a one-line caption naming the device, versions, commit and date.
    """
    if not results["environment"]["device"].startswith("cuda"):
        raise ValueError("gpu_summary needs a results.json measured on a GPU (environment.device 'cuda')")
    gate = results["parity"]["ok"]
    copy = results["copy_bandwidth"]["gbs"]
    lines = ["| measured | ddim-fused | baseline | ratio |", "| --- | ---: | ---: | ---: |"]
    for case, dtype, label in SUMMARY_STEPS:
        fused = _step(results, case, dtype, "triton")
        if fused is None:
            lines.append(f"| one step, {dtype}, {label} | {NOT_MEASURED} | | |")
            continue
        base = (_step(results, case, dtype, "compile", fused["shape_id"])
                or _step(results, case, dtype, "minimal", fused["shape_id"]))
        cells = [f"one step, {dtype}, {label}, {fused['shape_id']} ({fused['bytes'] / 1e6:.0f} MB moved)",
                 f"{fused['gbs']:.0f} GB/s, {fused['gbs'] / copy:.0%} of a copy", "", ""]
        if base is not None:
            name = "torch.compile" if base["provider"] == "compile" else "minimal eager"
            if case == "eta-drawn":
                name += " (torch.randn)"
            cells[2] = f"{name}: {base['gbs']:.0f} GB/s"
            cells[3] = f"{base['p50_s'] / fused['p50_s']:.2f}x" if gate else "withheld (parity gate failed)"
        lines.append("| " + " | ".join(cells) + " |")
    loops = _loops(graph)
    for case, label in SUMMARY_LOOPS:
        row = loops.get(case, {})
        if "fused-graph" not in row or "diffusers" not in row:
            lines.append(f"| 50-step loop, {label}, per step | {NOT_MEASURED} | | |")
            continue
        ours, theirs = row["fused-graph"]["per_step_us"], row["diffusers"]["per_step_us"]
        lines.append(f"| 50-step loop, {label}, per step | {ours:.1f} µs (one CUDA graph) "
                     f"| diffusers' loop: {theirs:.1f} µs | {theirs / ours:.1f}x |")
    lines += _sd_rows(sd)
    caption = (f"{_environment(results)}; p50 times; a copy moves {copy:.0f} GB/s on this device in the same run; "
               f"ratio = baseline time / ddim-fused time (above 1: ddim-fused is faster).")
    if sd is not None:
        env = sd["environment"]
        caption += (f" Stable Diffusion rows: `python -m bench.sd` (random weights), {_environment(sd)}; "
                    "each row's images checked against diffusers' before timing.")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _sd_rows(sd: dict | None) -> list[str]:
    """Table rows: `generate --cuda-graph` (bench.sd row e) against diffusers' pipeline (row a), per batch."""
    if sd is None:
        return [f"| Stable Diffusion 1.5 architecture, 512x512, 50 steps, CFG 7.5, fp16, batch {b} | {NOT_MEASURED} "
                f"| diffusers: {NOT_MEASURED} | |" for b in SD_BATCHES]
    settings = sd["settings"]
    if settings["config"] != "sd15" or not sd["environment"]["device"].startswith("cuda"):
        raise ValueError("the Stable Diffusion rows need an sd.json of the SD 1.5 configuration measured on a GPU")
    rows = {(r["row"], r["batch"]): r for r in sd["rows"]}
    ratios = {(s["row"], s["batch"]): s for s in sd.get("speedups", []) if s["vs"] == SD_BASE}
    out = []
    for batch in sorted(set(SD_BATCHES) | set(settings["batches"])):
        label = (f"Stable Diffusion 1.5 architecture, 512x512, {settings['steps']} steps, CFG {settings['guidance']:g}, "
                 f"{DTYPES.get(settings['dtype'], settings['dtype'])}, batch {batch}, images/s")
        ours, base = rows.get((SD_FUSED, batch), {}), rows.get((SD_BASE, batch), {})
        cells = [f"{1 / ours['s_per_image']:.2f} (`generate --cuda-graph`)" if "s_per_image" in ours else NOT_MEASURED,
                 f"diffusers: {1 / base['s_per_image']:.2f}" if "s_per_image" in base else f"diffusers: {NOT_MEASURED}"]
        ratio = ratios.get((SD_FUSED, batch), {})
        cells.append(f"{ratio['speedup']:.2f}x" if "speedup" in ratio else
                     "withheld (images differ from diffusers')" if "withheld" in ratio else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def graph_table(graph: dict, results: dict) -> str:
    """Every case of a `bench.gpu_graph` run as a markdown table, p50 per step of a 50-step loop.

    Args:
        graph: a gpu_graph.json of `python -m bench.gpu_graph`.
        results: a results.json of `python -m bench` on the same machine, for the caption.
    Returns:
        A markdown table (uncaptured, captured, diffusers per step and the two ratios) and a caption.
    """
    lines = ["| case | uncaptured | captured | diffusers | captured vs diffusers | captured vs uncaptured |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for case, row in _loops(graph).items():
        cells = [f"{row[p]['per_step_us']:.1f} µs" if p in row else NOT_MEASURED
                 for p in ("fused", "fused-graph", "diffusers")]
        ratios = [f"{row[b]['per_step_us'] / row['fused-graph']['per_step_us']:.1f}x"
                  if b in row and "fused-graph" in row else "-" for b in ("diffusers", "fused")]
        lines.append(f"| {GRAPH_LABELS.get(case, case)} | " + " | ".join(cells + ratios) + " |")
    caption = f"`python -m bench.gpu_graph` on {_environment(results)}; p50 per step of a 50-step loop."
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _verdict(value: float, target, unit: str = "") -> str:
    if target is None:
        return "no target"
    return f"{'met' if value <= target else 'missed'}: {value:.2f} {'<=' if value <= target else '>'} {target:g}{unit}"


def host_table(rows: list) -> str:
    """A host.json of `python -m bench.host` as a markdown table, host (thread CPU) time per step.

    Args:
        rows: the file's rows: "sampler-step" and "scheduler-step" rows (fused against a
            baseline, with a ratio target) and "gpu-host" / "cpu-host" rows (fused alone,
            with a time target).
    Returns:
        A markdown table: what, shape, ddim-fused, baseline, ratio, target verdict.
    """
    lines = ["| host time per step | shape | ddim-fused | baseline | ratio | target |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if r["kind"] in ("gpu-host", "cpu-host"):
            lines.append(f"| {r['label']} on {r['device']} | {shape} | {r['fused_us']:.1f} µs | | | "
                         f"{_verdict(r['fused_us'], r['target_us'], ' µs')} |")
        elif r["kind"] == "scheduler-step":
            verdict = _verdict(r["ratio"], r["target"])
            if r.get("target_us") is not None and r["target"] is not None:  # the GPU's: a time and a ratio
                met = r["fused_us"] <= r["target_us"] and r["ratio"] <= r["target"]
                verdict = f"{'met' if met else 'missed'}: <= {r['target_us']:g} µs and <= {r['target']:g}x"
            lines.append(f"| `FusedDDIMScheduler.step`, eta {r['eta']:g}, on {r['device']} | {shape} | "
                         f"{r['fused_us']:.1f} µs | diffusers' step: {r['stock_us']:.1f} µs | {r['ratio']:.2f} | "
                         f"{verdict} |")
        elif r["kind"] == "sampler-step":
            lines.append(f"| sampler/step {r['case']} | {shape} | {r['fused_us']:.1f} µs | "
                         f"reference sampler: {r['reference_us']:.1f} µs | {r['ratio']:.2f} | "
                         f"{_verdict(r['ratio'], r['target'])} |")
        else:
            raise ValueError(f"unknown host row kind {r['kind']!r}")
    return "\n".join(lines) + "\n"
