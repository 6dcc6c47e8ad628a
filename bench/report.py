"""The compact table, the JSON/CSV files and the target verdicts of a benchmark run."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ddim_fused.atomic import atomic_write_all

from .providers import BASELINES, CLAIM_BASELINES

RESULTS = Path(__file__).resolve().parent / "results"

CSV_FIELDS = ("kind", "case", "loop", "model", "dtype", "size", "batch", "elements", "bytes", "provider", "p20_s",
              "p50_s", "p80_s", "gbs", "pct_copy", "pct_same_copy", "above_cache") + tuple(f"speedup_vs_{b}" for b in BASELINES) + (
              "first_call_s", "parity_error", "parity_ok", "check_error", "per_step_us", "host_overhead_us",
              "skipped", "timer")

MIB_64 = 64 * 2**20
MEGA_ELEMENTS = 2**20
SMALL_ELEMENTS = 2**16


def withhold_speedups(rows) -> None:
    """Blank every speedup (a parity check failed)."""
    for r in rows:
        for base in BASELINES:
            if f"speedup_vs_{base}" in r:
                r[f"speedup_vs_{base}"] = None


def _verdict(ok, measured=True) -> str:
    if not measured:
        return "not measured"
    return "met" if ok else "missed"


def targets(result: dict) -> list[dict]:
    """Check the project's targets against this run's rows; GPU targets need a CUDA run.

    "Eager" in a target means the minimal eager expression (the same outputs with the
    fewest torch ops) and "torch.compile" its compiled form: a speedup over labml's
    formula, which does several times the work, would measure that extra work.
    """
    steps = [r for r in result["steps"] if r.get("p50_s")]
    loops = [r for r in result["loops"] if r.get("host_overhead_us") is not None and r["model"] == "trivial"]
    on_gpu = result["environment"]["device"].startswith("cuda")
    out = []
    if not result["parity"]["ok"]:
        return [{"target": "all", "verdict": "not reported", "detail": "parity failed"}]
    if not on_gpu:
        big = [r for r in steps if r["provider"] == "torch" and r["elements"] >= MEGA_ELEMENTS]
        for base, need in (("minimal", 2.0), ("compile", 1.0)):
            key = f"speedup_vs_{base}"
            sel = [r for r in big if r.get(key) is not None]
            detail = _worst(sel, key, "x")
            by_group = {}
            for r in sel:
                by_group.setdefault(f"{r['case']} {r['dtype']}", []).append(r[key])
            if by_group:
                detail += "; min per case: " + ", ".join(f"{k} {min(v):.2f}x" for k, v in by_group.items())
            out.append({"target": f"CPU: torch backend >= {need:g}x {_BASE_NAMES[base]} at >= 1M elements",
                        "verdict": _verdict(all(r[key] >= need for r in sel), bool(sel)), "detail": detail})
    fused_loops = [r for r in loops if r["provider"] == "fused"]
    ok, lines = True, []
    for f in fused_loops:
        others = {r["provider"]: r["host_overhead_us"] for r in loops
                  if r["loop"] == f["loop"] and r["provider"] in ("reference", "diffusers")}
        ok &= all(f["host_overhead_us"] < v for v in others.values())
        lines.append(f"{f['loop']}: fused {f['host_overhead_us']:.0f} us vs "
                     + ", ".join(f"{k} {v:.0f} us" for k, v in others.items()))
    out.append({"target": f"{'GPU' if on_gpu else 'CPU'}: fused sampler's host overhead per step lower than "
                          "the reference's and diffusers'", "verdict": _verdict(ok, bool(fused_loops)),
                "detail": "; ".join(lines)})
    gpu = [("GPU: fused step >= 85% of copy bandwidth for traffic >= 64 MB", _copy_target),
           ("GPU: fused step >= 85% of a copy of its own traffic for traffic >= 64 MB (the fixed cost of a call "
            "counted alike)", _same_copy_target),
           ("GPU: fused step >= 1.0x the minimal eager step at 4x64x64, batch 1-8", _eager_small_target),
           ("GPU: fused step >= 1.0x compiled minimal step at >= 64 MB and >= 3x at <= 64K elements",
            _compile_target),
           ("GPU: in-kernel noise no slower than a noise tensor", _noise_target)]
    for name, fn in gpu:
        if on_gpu:
            ok, detail, measured = fn([r for r in steps if r["provider"] == "triton"])
            out.append({"target": name, "verdict": _verdict(ok, measured), "detail": detail})
        else:
            out.append({"target": name, "verdict": "not measured", "detail": "needs a CUDA run (bench/gpu.sh)"})
    return out


_BASE_NAMES = {"labml": "labml's eager formula", "minimal": "the minimal eager step (same outputs, fewest ops)",
               "compile": "torch.compile of the minimal step", "diffusers": "diffusers' DDIMScheduler.step"}


def _worst(rows, key, unit) -> str:
    if not rows:
        return "no rows"
    r = min(rows, key=lambda r: r[key])
    return f"worst {r[key]:.2f}{unit} ({r['case']} {r['dtype']} {r['shape_id']}) over {len(rows)} rows"


def _copy_target(rows):
    big = [r for r in rows if r["bytes"] >= MIB_64]
    return all(r["pct_copy"] >= 85 for r in big), _worst(big, "pct_copy", "%"), bool(big)


def _same_copy_target(rows):
    big = [r for r in rows if r["bytes"] >= MIB_64 and r.get("pct_same_copy")]
    return all(r["pct_same_copy"] >= 85 for r in big), _worst(big, "pct_same_copy", "%"), bool(big)


def _eager_small_target(rows):
    sel = [r for r in rows if r["size"] == "4x64x64" and r["batch"] <= 8 and r.get("speedup_vs_minimal")]
    return all(r["speedup_vs_minimal"] >= 1.0 for r in sel), _worst(sel, "speedup_vs_minimal", "x"), bool(sel)


def _compile_target(rows):
    big = [r for r in rows if r["bytes"] >= MIB_64 and r.get("speedup_vs_compile")]
    small = [r for r in rows if r["elements"] <= SMALL_ELEMENTS and r.get("speedup_vs_compile")]
    ok = all(r["speedup_vs_compile"] >= 1.0 for r in big) and all(r["speedup_vs_compile"] >= 3 for r in small)
    return ok, f"large: {_worst(big, 'speedup_vs_compile', 'x')}; small: {_worst(small, 'speedup_vs_compile', 'x')}", \
        bool(big or small)


def _noise_target(rows):
    drawn = {(r["dtype"], r["shape_id"]): r for r in rows if r["case"] == "eta-drawn"}
    ratios = []
    for r in rows:
        key = (r["dtype"], r["shape_id"])
        if r["case"] == "eta-noise" and key in drawn:
            ratios.append(dict(drawn[key], ratio=r["p50_s"] / drawn[key]["p50_s"]))
    # ratio = tensor-noise time / in-kernel-noise time; >= 1 means in-kernel is no slower.
    return all(x["ratio"] >= 1.0 for x in ratios), _worst(ratios, "ratio", "x (tensor / in-kernel time)"), bool(ratios)


def table(result: dict) -> str:
    """A compact text table: one line per (case, dtype, size), then loops and targets."""
    env = result["environment"]
    steps = result["steps"]
    timed = [p for p in ("triton", "torch") + BASELINES if any(r["provider"] == p for r in steps)]
    fused = "triton" if "triton" in timed else "torch"
    on_gpu = env["device"].startswith("cuda")
    status = result.get("tests_status")
    lines = [f"test suite: {status}" + (" -- THESE RESULTS COME FROM A CODE STATE WHOSE TESTS FAILED"
                                         if "FAILED" in status else "")] if status else []
    lines += [f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | "
             f"copy {result['copy_bandwidth']['gbs']:.1f} GB/s | threads {env['torch_threads']} | "
             f"malloc tuned {env['malloc_tuned']} | commit {str(env['commit'])[:10]}",
             "p50 in us; fused = " + fused + " ([p20, p80]); GB/s and % of copy for the fused step "
             "(* = traffic below 2x the last-level cache; on a GPU such rows show - unless they move >= 64 MiB, "
             "as the targets judge them); speedup = baseline p50 / fused p50",
             f"claims are made against {' and '.join(CLAIM_BASELINES)} (the same outputs with the fewest eager ops, "
             "and that compiled); labml (the seed's eager formula, several times the work) and diffusers are context"]
    load = result.get("load_average") or {}
    if load.get("before") is not None:
        lines.append(f"1-minute load average before / after the run: {load['before']} / {load.get('after')} "
                     f"({load.get('cpus')} CPUs): timings on a busy machine are noise")
    head = f"{'case':9s} {'dt':4s} {'size':16s} {'MB':>7s} " + " ".join(f"{p:>9s}" for p in timed)
    head += f" {'[p20, p80]':>17s} {'GB/s':>7s} {'%copy':>6s} " + " ".join(f"{'x' + b[:6]:>7s}" for b in BASELINES)
    lines.append(head)
    groups = {}
    for r in steps:
        groups.setdefault((r["case"], r["dtype"], r["shape_id"]), {})[r["provider"]] = r
    for (case, dtype, sid), g in groups.items():
        f = g.get(fused)
        cells = " ".join(f"{g[p]['p50_s'] * 1e6:9.1f}" if p in g and g[p].get("p50_s") else f"{'-':>9s}" for p in timed)
        ref = next(iter(g.values()))
        line = f"{case:9s} {dtype:4s} {sid:16s} {ref['bytes'] / 1e6:7.2f} {cells}"
        if f:
            line += f" [{f['p20_s'] * 1e6:7.1f},{f['p80_s'] * 1e6:8.1f}]"
            if f["above_cache"] or not on_gpu or f["bytes"] >= MIB_64:
                star = "" if f["above_cache"] else "*"
                line += f" {f['gbs']:6.1f}{star:1s} {f['pct_copy']:5.1f}%"
            else:  # on a GPU, GB/s is quoted only for traffic well above L2
                line += f" {'-':>7s} {'-':>6s}"
            line += " " + " ".join(f"{f[k]:7.2f}" if f.get(k) else f"{'-':>7s}" for k in
                                   (f"speedup_vs_{b}" for b in BASELINES))
        lines.append(line)
    lines += _same_copy_lines(steps, fused)
    if result["compile_seconds"]:
        lines.append("torch.compile first call (compile) s: " +
                     ", ".join(f"{k} {v:.1f}" for k, v in result["compile_seconds"].items()))
    loops = result["loops"]
    if loops:
        lines.append("whole loop (50 steps): per-step p50 us / host overhead us")
        for r in loops:
            if r.get("skipped"):
                lines.append(f"  {r['loop']:14s} {r['provider']:16s} skipped: {r['skipped']}")
            else:
                over = r.get("host_overhead_us")
                check = ""
                if "check_error" in r:
                    check = f"  (vs reference {r['check_error']:.1e}{'' if r['parity_ok'] else ' FAILED'})"
                lines.append(f"  {r['loop']:14s} {r['provider']:16s} {r['per_step_us']:9.1f}"
                             + (f" / {over:9.1f}" if over is not None else "") + check)
    for note in result["omitted"]:
        lines.append(f"omitted: {note}")
    for name, reason in result["providers"]["skipped"].items():
        lines.append(f"not timed: {name}: {reason}")
    for t in result["targets"]:
        lines.append(f"target [{t['verdict']}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def _same_copy_lines(steps, fused) -> list[str]:
    """The fused step against a copy of its own traffic, for the GPU rows that have one."""
    rows = [r for r in steps if r["provider"] == fused and r.get("pct_same_copy")]
    if not rows:
        return []
    lines = ["fused step against a copy of the same traffic (same timer; a 1 GiB copy hides the fixed cost of a "
             "call, a 64 MB step does not):"]
    for r in rows:
        lines.append(f"  {r['case']:9s} {r['dtype']:4s} {r['shape_id']:16s} {r['bytes'] / 1e6:7.1f} MB: "
                     f"step {r['p50_s'] * 1e6:7.1f} us, copy {r['same_copy_s'] * 1e6:7.1f} us: "
                     f"{r['pct_same_copy']:5.1f}% of a same-size copy, {r['pct_copy']:5.1f}% of the 1 GiB copy")
    return lines


def latest_static_table(results_dir: Path = RESULTS) -> str | None:
    """The newest committed static table (`static-*/static.txt`), or None if there is none."""
    found = sorted(Path(results_dir).glob("static-*/static.txt"))
    return found[-1].read_text() if found else None


def write(result: dict, out_dir: Path) -> None:
    """results.json (everything), results.csv (one row per measurement), results.txt (the table)."""
    out_dir = Path(out_dir)
    env = result["environment"]
    tag = {k: env[k] for k in ("device_name", "torch", "triton", "commit", "date")}
    rows = io.StringIO()
    w = csv.DictWriter(rows, fieldnames=tuple(tag) + CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in result["steps"] + result["loops"]:
        w.writerow({**tag, **r})
    text = table(result) + "\n"
    static = latest_static_table()
    if static is not None:
        # What the compiled kernels are (registers, SASS per element, access widths), beside
        # what they measure; written by `python -m bench.static` from a source checkout.
        text += "\nStatic reading of the compiled kernels (newest bench/results/static-*):\n" + static
    atomic_write_all([
        (out_dir / "results.json", lambda f: f.write(json.dumps(result, indent=1, default=str).encode())),
        (out_dir / "results.txt", lambda f: f.write(text.encode())),
        (out_dir / "results.csv", lambda f: f.write(rows.getvalue().encode())),
    ])


# The `bench` data block of docs/performance.md: one size per device, chosen where the step moves
# well over the CPU's last-level cache (1M elements) or is a typical SD-1.5 latent batch.
README_SHAPE = {"cpu": "B16-4x128x128", "cuda": "B8-4x64x64"}
CASE_LABELS = {
    "eta0": "eta = 0",
    "eta0-x0": "eta = 0, also pred_x0",
    "eta-noise": "eta > 0, noise tensor",
    "eta-drawn": "eta > 0, noise drawn in the step (fused: keyed Philox; others: torch.randn)",
    "cfg": "CFG (batch-doubled model output)",
    "paint": "paint blend",
}
PROVIDER_LABELS = {"triton": "fused kernel", "torch": "torch backend", "minimal": "minimal eager",
                   "compile": "torch.compile (minimal)", "labml": "labml eager", "diffusers": "diffusers"}


def readme_section(result: dict) -> str:
    """The `bench` data block (docs/performance.md) of one run: environment, step table, loop table.

    Speedups in parentheses are baseline p50 / fused p50 (above 1: the fused step is
    faster); "withheld" where the run's parity gate failed.
    """
    env = result["environment"]
    on_gpu = env["device"].startswith("cuda")
    fused = "triton" if on_gpu else "torch"
    sid = README_SHAPE["cuda" if on_gpu else "cpu"]
    rows = [r for r in result["steps"] if r["shape_id"] == sid and r.get("p50_s")]
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["dtype"]), {})[r["provider"]] = r
    bases = [b for b in ("minimal", "compile", "labml", "diffusers") if any(b in g for g in groups.values())]
    load = result.get("load_average") or {}
    lines = [f"**{'GPU' if on_gpu else 'CPU'}**: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {str(env['commit'])[:7]}{' with uncommitted changes' if env.get('dirty') else ''}, "
             f"{env['date'][:10]}, `{result['mode']}` run, parity gate "
             f"{'passed' if result['parity']['ok'] else 'FAILED (speedups withheld)'}."]
    if result.get("tests_status"):
        lines[-1] += f" Test suite: {result['tests_status']}."
    if load.get("before") is not None:
        lines[-1] += (f" 1-minute load average {load['before']} before and {load.get('after')} after the run, "
                      f"on {load.get('cpus')} CPUs.")
    elements = next((r["elements"] for r in rows), 0)
    size = f"{elements / 2**20:.0f}M" if elements >= 2**20 else f"{elements / 2**10:.0f}K"
    head = [f"step, {sid} ({size} elements), p50", PROVIDER_LABELS[fused]]
    head += [PROVIDER_LABELS[b] for b in bases]
    lines += ["", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for (case, dtype), g in groups.items():
        if fused not in g:
            continue
        f = g[fused]
        cells = [f"{dtype}, {CASE_LABELS.get(case, case)}", f"{f['p50_s'] * 1e6:.0f} µs"]
        for b in bases:
            if b not in g:
                cells.append("-")
                continue
            speed = f.get(f"speedup_vs_{b}")
            ratio = f"{speed:.2f}x" if speed is not None else "withheld"
            cells.append(f"{g[b]['p50_s'] * 1e6:.0f} µs ({ratio})")
        lines.append("| " + " | ".join(cells) + " |")
    loops = [r for r in result["loops"] if r.get("host_overhead_us") is not None and r["model"] == "trivial"]
    if loops:
        provs = [p for p in ("fused", "fused-cudagraph", "reference", "diffusers")
                 if any(r["provider"] == p for r in loops)]
        shape = "x".join(str(d) for d in loops[0]["shape"])
        lines += ["", "| 50-step loop, trivial eps-model, latent " + shape + ": host overhead per step | "
                  + " | ".join(provs) + " |", "| --- |" + " ---: |" * len(provs)]
        for loop_id in dict.fromkeys(r["loop"] for r in loops):
            by = {r["provider"]: r for r in loops if r["loop"] == loop_id}
            lines.append("| " + " | ".join([LOOP_LABELS.get(loop_id, loop_id)] + [
                f"{by[p]['host_overhead_us']:.0f} µs" if p in by else "-" for p in provs]) + " |")
    digits = [r for r in result["loops"] if r["model"] == "digits" and r.get("per_step_us") is not None]
    if digits:
        per = {(r["loop"], r["provider"]): r["per_step_us"] / 1e3 for r in digits}
        names = {"digits": "eta = 0", "digits-cfg": "CFG"}
        lines += ["", "With the digits model (batch 16), time per step with the model's call: " + "; ".join(
            f"{names.get(loop, loop)}: " + ", ".join(f"{p} {per[loop, p]:.1f} ms"
                                                    for p in ("fused", "reference", "diffusers") if (loop, p) in per)
            for loop in dict.fromkeys(r["loop"] for r in digits)) + "."]
    if result.get("targets"):
        lines += ["", "Targets, as the run judged them (`results.txt`):"]
        lines += [f"- **{t['verdict']}**: {t['target']}" + (f" ({t['detail']})" if t.get("detail") else "")
                  for t in result["targets"]]
    return "\n".join(lines) + "\n"


LOOP_LABELS = {"eta0": "eta = 0", "cfg": "CFG", "eta-philox": "eta > 0, keyed Philox noise (default)",
               "eta-randn": "eta > 0, `noise_source=\"torch\"`", "eta0-4x64x64": "eta = 0, latent 1x4x64x64"}
