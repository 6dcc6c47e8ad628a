"""Static GPU evidence: what the compiled kernels cost, read from their SASS without a GPU.

`python -m bench.static` compiles every kernel variant of `tests/compile_kernels.py` as
a real launch specialises it, for sm_90 and sm_80, and writes
bench/results/static-<date>/static.json (rows plus arch, Triton version, commit, date)
and static.txt (the table). Registers, SASS instructions per element and the width of
global accesses are properties of the code, so these numbers need no GPU and no quiet
machine; timings do, and stay "not measured" until a GPU runs bench/gpu.sh.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton

from ddim_fused.atomic import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def static_rows(archs=(90, 80)) -> list[dict]:
    """One row per (arch, kernel variant): registers, SASS per element, access widths, budget.

    Runs tests/compile_kernels.py in a subprocess without TRITON_INTERPRET (the
    interpreter has no compiled kernels to read). RuntimeError if it fails.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tests.compile_kernels", "--json", "--arch", *map(str, archs)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"compiling the kernels failed: {run.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in run.stdout.splitlines()]


def environment() -> dict:
    """Triton and torch versions, commit (and whether the tree had changes) and date of a run."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(dirty) if dirty is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _verdict(row: dict) -> str:
    budget = row["limits"]
    if budget is None:
        return "-"
    ok = (row["sass_per_elem"] <= budget["sass"] and row["regs"] <= budget.get("regs", 255)
          and row["global_narrow"] <= row["max_narrow"] and row["stack"] == 0 and row["shared"] == 0)
    limits = f"<= {budget['sass']:g}" + (f", <= {budget['regs']} regs" if "regs" in budget else "")
    return ("met " if ok else "MISSED ") + limits


def table(rows: list[dict], env: dict) -> str:
    """The static table as text, one line per row, with its header and budgets."""
    lines = [f"static GPU evidence | triton {env['triton']} | torch {env['torch']} | commit {str(env['commit'])[:10]}"
             f"{' (uncommitted changes)' if env.get('dirty') else ''} | {env['date']}",
             "compiled as launches specialise them (aligned pointers, constexprs, enable_fp_fusion); "
             "BLOCK 1024 with in-kernel noise, 2048 without, 4 warps; SASS/elem = instructions in the "
             "kernel / elements per thread; 128b / narrow = global loads+stores per thread; no GPU ran them",
             f"{'arch':<6} {'variant':<56} {'regs':>4} {'SASS/elem':>9} {'128b':>4} {'narrow':>6} {'shared':>6} "
             f"{'stack':>5}  budget"]
    for r in rows:
        lines.append(f"{r['arch']:<6} {r['variant']:<56} {r['regs']:>4} {r['sass_per_elem']:>9.2f} "
                     f"{r['global_128']:>4} {r['global_narrow']:>6} {r['shared']:>6} {r['stack']:>5}  "
                     f"{_verdict(r)}{'  (' + r['note'] + ')' if r['note'] else ''}")
    return "\n".join(lines)


def markdown_table(data: dict) -> str:
    """The static.json of this module as a markdown table: one row per variant, a column pair per arch.

    Args:
        data: {"environment": {..., "archs": [...]}, "rows": [one dict per (arch, variant)]}.
    Returns:
        The table (registers, SASS instructions per element, budget verdict per arch) and a caption.
    """
    env, rows = data["environment"], data["rows"]
    archs = env.get("archs") or list(dict.fromkeys(r["arch"] for r in rows))
    by = {(r["arch"], r["variant"]): r for r in rows}
    head = ["variant"] + [f"{arch} {what}" for arch in archs for what in ("regs", "SASS/elem")] + ["budget"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 2) + " --- |"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [by.get((arch, variant)) for arch in archs]
        cells = [f"{r['regs']} | {r['sass_per_elem']:.1f}" if r else "- | -" for r in mine]
        verdicts = sorted({_verdict(r) for r in mine if r} - {"-"}) or ["none (not budgeted)"]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {'; '.join(verdicts)} |")
    caption = (f"`python -m bench.static`: triton {env['triton']}, commit {str(env['commit'])[:7]}, {env['date'][:10]}; "
               "4 warps, BLOCK 2048 (1024 with in-kernel noise); compiled on a CPU, no GPU ran them.")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def main(argv=None) -> int:
    """Write the static table; returns 0, or 1 (one line on stderr) if compiling fails."""
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default bench/results/static-<date>")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    args = parser.parse_args(argv)
    try:
        rows = static_rows(args.arch)
    except RuntimeError as exc:
        print(f"bench.static: error: {exc}", file=sys.stderr)
        return 1
    env = {**environment(), "archs": [f"sm_{a}" for a in args.arch]}
    out_dir = args.out_dir or DEFAULT_OUT / f"static-{env['date'][:10]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(rows, env)
    _write_atomic(out_dir / "static.json", json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    _write_atomic(out_dir / "static.txt", text + "\n")
    print(text)
    print(f"wrote {out_dir / 'static.json'} and static.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
