"""Time every provider on every (case, dtype, size) of a plan; one row per measurement."""
from __future__ import annotations

import json

import torch

from .cases import CASES, DTYPES, make_inputs, min_bytes, n_elements, shape_id
from .parity import check_group
from .providers import BASELINES, FUSED, Providers, first_call_seconds
from .timing import same_size_copy, time_interleaved, time_kernel

CACHE_FACTOR = 2  # GB/s counts as memory bandwidth only for traffic >= CACHE_FACTOR x the last-level cache
SAME_COPY_BYTES = 64 * 2**20  # GPU rows from this traffic up are also judged against a copy of their size


def run_steps(providers: Providers, matrix, timed, device, copy_gbs, cache, rows_path, parity_ok, log=print):
    """Run the plan; returns (rows, {(case, dtype): compile seconds}).

    Args:
        providers: the run's one Providers (it keeps the compiled functions that the
            parity gate already built, so nothing compiles twice).
        matrix: the plan (bench.matrix.Matrix); its groups hold (B, C, H, W) shapes.
        timed: names of the providers to time.
        device: where to run.
        copy_gbs: the copy bandwidth (GB/s) that pct_copy is relative to.
        cache: last-level cache size in bytes (0 if unknown).
        rows_path: JSON-lines file that each row is appended to as it comes, so a run cut
            short keeps what it measured.
        parity_ok: whether the parity gate passed (speedups are None otherwise).
        log: progress printer.

    Every output of every provider is compared with the float64 reference again at the
    first size of each (case, dtype), and the compiled baseline at every size it is timed
    at (static shapes: each size is its own compiled graph).
    """
    rows = []
    for case_name, dtype_id, shapes in matrix.groups:
        case, dtype = CASES[case_name], DTYPES[dtype_id]
        for k, shape in enumerate(shapes):
            names = [n for n in timed if n != "compile" or matrix.times_compile(case_name, dtype_id, shape)]
            inputs = make_inputs(case, shape, dtype, device)
            group = []
            fns = {}
            for name in names:
                fn = providers.make(name, case, inputs, dtype_id)
                first = first_call_seconds(fn, device)
                fns[name] = providers.make(name, case, inputs, dtype_id)  # compile's first-call wrapper is gone now
                group.append(_row(case, dtype_id, shape, name, device, copy_gbs, cache, matrix.budget_s, first))
            checked = names if k == 0 else [n for n in names if n == "compile"]
            for check in check_group(providers, checked, case, dtype_id, inputs) if checked else []:
                row = next(r for r in group if r["provider"] == check.provider)
                row.setdefault("parity", []).append({"output": check.output, "error": check.error,
                                                     "bound": check.bound, "ok": check.ok})
                row["parity_ok"] = row.get("parity_ok", True) and check.ok
                row["parity_error"] = max(row.get("parity_error", 0.0), check.error)
            for row, t in zip(group, _timings(fns, device, matrix.budget_s)):
                gbs = row["bytes"] / t["p50"] / 1e9
                row.update(p20_s=t["p20"], p50_s=t["p50"], p80_s=t["p80"], timer=t.get("timer"),
                           gbs=gbs, pct_copy=100 * gbs / copy_gbs)
            if device.type == "cuda" and group and group[0]["bytes"] >= SAME_COPY_BYTES:
                same = same_size_copy(group[0]["bytes"], device, matrix.budget_s)
                for row in group:
                    row.update(same_copy_s=same["p50"], pct_same_copy=100 * row["gbs"] / same["gbs"])
            del fns
            _speedups(group, parity_ok)
            for row in group:
                rows.append(row)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            log(_progress(group))
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, dict(providers.compile_seconds)


def _row(case, dtype_id, shape, name, device, copy_gbs, cache, budget_s, first):
    n = n_elements(shape)
    nbytes = min_bytes(case, shape, DTYPES[dtype_id])
    return {"kind": "step", "case": case.name, "dtype": dtype_id, "shape": list(shape), "shape_id": shape_id(shape),
            "size": "x".join(str(d) for d in shape[1:]), "batch": shape[0], "elements": n, "bytes": nbytes,
            "provider": name, "device": str(device), "first_call_s": first,
            "above_cache": nbytes >= CACHE_FACTOR * cache if cache else None, "budget_s": budget_s}


def _timings(fns, device, budget_s):
    """Per-provider timings in fns' order: interleaved on CPU, do_bench one by one on CUDA."""
    if device.type == "cuda":
        return [time_kernel(fn, device, budget_s) for fn in fns.values()]
    times = time_interleaved(fns, device, budget_s)
    return [times[name] for name in fns]


def _speedups(group, parity_ok):
    """speedup_vs_<baseline> = baseline p50 / this p50, on the fused providers' rows."""
    by_name = {r["provider"]: r for r in group}
    for name in FUSED:
        if name not in by_name:
            continue
        row = by_name[name]
        for base in BASELINES:
            if base in by_name:
                row[f"speedup_vs_{base}"] = by_name[base]["p50_s"] / row["p50_s"] if parity_ok else None


def _progress(group) -> str:
    r0 = group[0]
    parts = [f"{r['provider']} {r['p50_s'] * 1e6:.0f}us" for r in group]
    return f"  {r0['case']:9s} {r0['dtype']} {r0['shape_id']:16s} " + "  ".join(parts)
