"""The compact table, the JSON/CSV files and the target verdicts of a benchmark run."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .providers import BASELINES

CSV_FIELDS = ("kind", "case", "loop", "model", "dtype", "size", "batch", "elements", "bytes", "provider", "p20_s",
              "p50_s", "p80_s", "gbs", "pct_copy", "above_cache", "speedup_vs_eager", "speedup_vs_compile",
              "speedup_vs_diffusers", "first_call_s", "parity_error", "parity_ok", "per_step_us",
              "host_overhead_us", "skipped", "timer")

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
    """Check the issue's targets against this run's rows; GPU targets need a CUDA run."""
    steps = [r for r in result["steps"] if r.get("p50_s")]
    loops = [r for r in result["loops"] if r.get("host_overhead_us") is not None and r["model"] == "trivial"]
    on_gpu = result["environment"]["device"].startswith("cuda")
    out = []
    if not result["parity"]["ok"]:
        return [{"target": "all", "verdict": "not reported", "detail": "parity failed"}]
    if not on_gpu:
        big = [r for r in steps if r["provider"] == "torch" and r["elements"] >= MEGA_ELEMENTS
               and r.get("speedup_vs_eager") is not None]
        detail = _worst(big, "speedup_vs_eager", "x")
        by_group = {}
        for r in big:
            by_group.setdefault(f"{r['case']} {r['dtype']}", []).append(r["speedup_vs_eager"])
        detail += "; min per case: " + ", ".join(f"{k} {min(v):.2f}x" for k, v in by_group.items())
        out.append({"target": "CPU: torch backend >= 2x eager reference step at >= 1M elements",
                    "verdict": _verdict(all(r["speedup_vs_eager"] >= 2 for r in big), bool(big)), "detail": detail})
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
           ("GPU: fused step >= 5x eager reference at 4x64x64, batch 1-8", _eager_small_target),
           ("GPU: fused step >= 1.0x torch.compile at >= 64 MB and >= 3x at <= 64K elements", _compile_target),
           ("GPU: in-kernel noise no slower than a noise tensor", _noise_target)]
    for name, fn in gpu:
        if on_gpu:
            ok, detail, measured = fn([r for r in steps if r["provider"] == "triton"])
            out.append({"target": name, "verdict": _verdict(ok, measured), "detail": detail})
        else:
            out.append({"target": name, "verdict": "not measured", "detail": "needs a CUDA run (bench/gpu.sh)"})
    return out


def _worst(rows, key, unit) -> str:
    if not rows:
        return "no rows"
    r = min(rows, key=lambda r: r[key])
    return f"worst {r[key]:.2f}{unit} ({r['case']} {r['dtype']} {r['shape_id']}) over {len(rows)} rows"


def _copy_target(rows):
    big = [r for r in rows if r["bytes"] >= MIB_64]
    return all(r["pct_copy"] >= 85 for r in big), _worst(big, "pct_copy", "%"), bool(big)


def _eager_small_target(rows):
    sel = [r for r in rows if r["size"] == "4x64x64" and r["batch"] <= 8 and r.get("speedup_vs_eager")]
    return all(r["speedup_vs_eager"] >= 5 for r in sel), _worst(sel, "speedup_vs_eager", "x"), bool(sel)


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
    timed = [p for p in ("triton", "torch", "eager", "compile", "diffusers") if any(r["provider"] == p for r in steps)]
    fused = "triton" if "triton" in timed else "torch"
    on_gpu = env["device"].startswith("cuda")
    lines = [f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | "
             f"copy {result['copy_bandwidth']['gbs']:.1f} GB/s | threads {env['torch_threads']} | "
             f"malloc tuned {env['malloc_tuned']} | commit {str(env['commit'])[:10]}",
             "p50 in us; fused = " + fused + " ([p20, p80]); GB/s and % of copy for the fused step "
             "(CPU: * = traffic below 2x the last-level cache; GPU: - there); speedup = baseline p50 / fused p50"]
    head = f"{'case':9s} {'dt':4s} {'size':16s} {'MB':>7s} " + " ".join(f"{p:>9s}" for p in timed)
    head += f" {'[p20, p80]':>17s} {'GB/s':>7s} {'%copy':>6s} " + " ".join(f"{'x' + b[:5]:>7s}" for b in BASELINES)
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
            if f["above_cache"] or not on_gpu:
                star = "" if f["above_cache"] else "*"
                line += f" {f['gbs']:6.1f}{star:1s} {f['pct_copy']:5.1f}%"
            else:  # on a GPU, GB/s is quoted only for traffic well above L2
                line += f" {'-':>7s} {'-':>6s}"
            line += " " + " ".join(f"{f[k]:7.2f}" if f.get(k) else f"{'-':>7s}" for k in
                                   (f"speedup_vs_{b}" for b in BASELINES))
        lines.append(line)
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
                lines.append(f"  {r['loop']:14s} {r['provider']:16s} {r['per_step_us']:9.1f}"
                             + (f" / {over:9.1f}" if over is not None else ""))
    for note in result["omitted"]:
        lines.append(f"omitted: {note}")
    for name, reason in result["providers"]["skipped"].items():
        lines.append(f"not timed: {name}: {reason}")
    for t in result["targets"]:
        lines.append(f"target [{t['verdict']}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def write(result: dict, out_dir: Path) -> None:
    """results.json (everything), results.csv (one row per measurement), results.txt (the table)."""
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "results.txt").write_text(table(result) + "\n")
    env = result["environment"]
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("device_name", "torch", "triton", "commit", "date") + CSV_FIELDS,
                           extrasaction="ignore")
        w.writeheader()
        tag = {k: env[k] for k in ("device_name", "torch", "triton", "commit", "date")}
        for r in result["steps"] + result["loops"]:
            w.writerow({**tag, **r})
