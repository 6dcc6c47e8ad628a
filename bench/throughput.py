"""Bulk generation throughput: `ddim-fused generate` as a user runs it, samples per second.

Each row is one fresh `ddim-fused generate` process (the console script's code, run as
`python -m ddim_fused generate`) into a new temporary folder; the number is the one its
summary line prints (samples written over the sampling-and-writing time, model loading
excluded). Models:
- digits: the embedded model, guidance 3 (the model runs on the doubled batch);
- tiny-unet: a random diffusers `UNet2DModel` (3x8x8) saved as a pipeline folder with
  diffusers' default `DDIMScheduler` config (clip_sample on: two launches per step);
- small-unet: a random `UNet2DModel` for 3x32x32 samples.
The UNet folders need diffusers (the rows are left out, with that reason, without it).

    python -m bench.throughput [--out docs/throughput.json] [--threads 1 2] [--device cpu] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from .timing import source_commit

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"generated (\d+) samples in ([\d.]+) s \(([\d.]+) samples/s")
# name: (description, generate arguments, samples, batch size); --quick divides samples by 5.
CASES = {
    "digits": ("embedded digits model (1x8x8), guidance 3", ["--model", "digits", "--guidance", "3"], 500, 250),
    "tiny-unet": ("random UNet2DModel folder, 3x8x8, diffusers' default scheduler", None, 500, 250),
    "small-unet": ("random UNet2DModel folder, 3x32x32", None, 100, 50),
}
UNETS = {  # UNet2DModel configs of the folder cases
    "tiny-unet": dict(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4),
    "small-unet": dict(sample_size=32, block_out_channels=(32, 64, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3),
}


def unet_folder(name: str, folder: Path) -> tuple[Path, int]:
    """(a DDIMPipeline folder holding a seeded random UNet2DModel for case `name`, its parameter count)."""
    import diffusers  # noqa: PLC0415 - optional dependency

    config = dict(in_channels=3, out_channels=3, layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                  up_block_types=("UpBlock2D",) * 2)
    config.update(UNETS[name])
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config)
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    return folder, sum(p.numel() for p in unet.parameters())


def run_generate(args: list[str], out: Path) -> dict:
    """One `generate` process; its summary numbers (RuntimeError with its output if it failed)."""
    cmd = [sys.executable, "-m", "ddim_fused", "generate", *args, "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    found = SUMMARY.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return {"samples": int(found.group(1)), "seconds": float(found.group(2)), "samples_per_s": float(found.group(3))}


def measure(threads: list[int], device: str, quick: bool, log=print) -> dict:
    """Every case at every thread count: the data file's content."""
    rows, missing = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (what, model_args, num, batch) in CASES.items():
            params = None
            if model_args is None:
                try:
                    folder, params = unet_folder(name, Path(tmp) / name)
                except ImportError:
                    missing[name] = "needs diffusers (pip install 'ddim-fused[diffusers]')"
                    continue
                model_args = ["--model", str(folder)]
            num = max(batch, num // 5) if quick else num
            for n in threads:
                args = [*model_args, "--num", str(num), "--batch-size", str(batch), "--steps", "50",
                        "--device", device, "--threads", str(n)]
                result = run_generate(args, Path(tmp) / f"run-{name}-{n}")
                rows.append({"model": name, "what": what, "parameters": params, "threads": n, "num": num,
                             "batch_size": batch, "steps": 50, **result})
                log(f"{name:10s} {n} thread(s): {result['samples_per_s']:.1f} samples/s")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "commit": _commit(), "rows": rows, "missing": missing}


def markdown_table(data: dict) -> str:
    """The throughput table of docs/generation.md from a data file of this module."""
    threads = sorted({r["threads"] for r in data["rows"]})
    lines = ["| model | samples, batch | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in threads) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in threads) + " |"]
    for name in dict.fromkeys(r["model"] for r in data["rows"]):
        mine = {r["threads"]: r for r in data["rows"] if r["model"] == name}
        first = next(iter(mine.values()))
        params = "" if first["parameters"] is None else f", {first['parameters'] / 1e3:.0f}k parameters"
        cells = [f"{mine[n]['samples_per_s']:.1f} samples/s" if n in mine else "" for n in threads]
        lines.append(f"| {name}: {first['what']}{params} | {first['num']}, {first['batch_size']} | "
                     + " | ".join(cells) + " |")
    notes = [f"`python -m bench.throughput`, {data['date'][:10]}, {data['machine']}, device {data['device']}, "
             f"torch {data['torch']}, commit {data['commit']}; 50 steps, eta 0, float32, one process per cell."]
    notes += [f"Not measured: {name}, {why}." for name, why in data["missing"].items()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _commit() -> str:
    commit, _ = source_commit()
    return commit[:7] if commit else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "throughput.json", help="the data file")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU threads per row")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quick", action="store_true", help="a fifth of the samples")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.threads):
        parser.error("--threads: each count must be >= 1")
    data = measure(args.threads, args.device, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(markdown_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
