"""DDIM's Table 1 on an exact oracle: Frechet distance to exact samples per (S, eta).

Run as `python -m ddim_fused.quality [--out-dir docs] [--quick]`. It writes
quality.json (the measured data), quality_table.md and quality.png (drawn from the data).
The model is a Gaussian mixture whose eps is exact, so every gap to the exact samples is
the sampler's own discretization error (plus finite-sample noise, measured beside it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from .atomic import atomic_write
from .coefficients import SIGMA_HAT
from .metrics import frechet_distance
from .oracle import GaussianMixture
from .sampler import DDIMSampler

STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.2, 0.5, 1.0, SIGMA_HAT)
# Uniform's "+1" rule puts the last of S = T steps at t = T, outside alpha_bar; the
# full-length column uses every time step 0..T-1 instead (DDPM's own chain).
FULL_LENGTH_DISCRETIZE = "linspace"
FLOOR_REPEATS = 3


def make_oracle(dim: int = 32, n_components: int = 6, std: float = 0.2, seed: int = 0) -> GaussianMixture:
    """The benchmark mixture: K random means in R^dim (entries N(0, 0.25)), shared std.

    Mean pairs lie about 4 apart (about 20 std), so the components are well separated
    and the sampler must move mass between modes, not only shrink a single Gaussian.

    Returns:
        GaussianMixture with the default linear schedule (T = 1000).
    """
    gen = torch.Generator().manual_seed(seed)
    means = 0.5 * torch.randn(n_components, dim, generator=gen, dtype=torch.float64)
    return GaussianMixture(means, std)


def discretization(n_steps: int, n_train_steps: int) -> str:
    """The discretization used for S steps: uniform, or linspace when S = T."""
    return FULL_LENGTH_DISCRETIZE if n_steps >= n_train_steps else "uniform"


def measure(oracle: GaussianMixture, n: int, steps=STEPS, etas=ETAS, seed: int = 0, progress=None) -> dict:
    """Frechet distance of DDIM samples to exact samples for every (S, eta), and the floor.

    The sampler (backend="torch", labml's alpha_prev convention) ends at level
    alpha_bar[0], so the exact reference is drawn at that level too (it differs from
    clean data by noise of std 0.01). Every cell starts from the same initial noise.

    Args:
        oracle: the model and exact sampler.
        n: samples per set.
        steps, etas: the grid.
        seed: seeds the reference sets and the samplers' noise.
        progress: optional callable(str) told about each finished cell.

    Returns:
        dict with "floor" (mean over FLOOR_REPEATS exact-vs-exact pairs), "floor_all",
        and "cells": a list of {"steps", "eta", "discretize", "frechet", "seconds"}.
    """
    level = float(oracle.alpha_bar[0])
    shape = (n,) + oracle.sample_shape
    reference = oracle.sample(n, torch.Generator().manual_seed(seed), a=level)
    floors = [
        frechet_distance(reference, oracle.sample(n, torch.Generator().manual_seed(seed + 1 + r), a=level))
        for r in range(FLOOR_REPEATS)
    ]
    cells = []
    for eta in etas:
        for s in steps:
            disc = discretization(s, oracle.n_steps)
            sampler = DDIMSampler(oracle, s, disc, eta, backend="torch", noise_source="torch")
            torch.manual_seed(seed + 1000)
            start = time.perf_counter()
            x = sampler.sample(shape, None, dtype=torch.float64)
            seconds = time.perf_counter() - start
            cells.append({"steps": s, "eta": eta, "discretize": disc, "frechet": frechet_distance(x, reference),
                          "seconds": seconds})
            if progress is not None:
                progress(f"S={s:4d} eta={eta!s:9} FD={cells[-1]['frechet']:.4g} ({seconds:.1f} s)")
    return {"floor": sum(floors) / len(floors), "floor_all": floors, "cells": cells}


def markdown_table(data: dict) -> str:
    """The results as a markdown table: rows eta, columns S, plus the noise-floor row."""
    steps = sorted({c["steps"] for c in data["cells"]})
    etas = list(dict.fromkeys(c["eta"] for c in data["cells"]))
    value = {(c["eta"], c["steps"]): c["frechet"] for c in data["cells"]}
    full = {c["steps"] for c in data["cells"] if c["discretize"] != "uniform"}
    head = ["eta \\ S"] + [f"{s}*" if s in full else str(s) for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for eta in etas:
        label = "sigma-hat" if eta == SIGMA_HAT else f"{eta:g}"
        lines.append("| " + " | ".join([label] + [f"{value[eta, s]:.4f}" for s in steps]) + " |")
    floor = f"{data['floor']:.4f}"
    lines.append("| " + " | ".join([f"exact vs exact (noise floor, N={data['n']})"] + [floor] * len(steps)) + " |")
    notes = [
        "",
        f"Frechet distance (squared, as FID reports it) between {data['n']} DDIM samples and {data['n']} exact samples "
        f"of a {data['n_components']}-component Gaussian mixture in D={data['dim']} (std {data['std']}), "
        "linear beta schedule, T=1000; uniform discretization, backend=\"torch\", float64.",
    ]
    if full:
        notes.append(f"\\* S=T uses the \"{FULL_LENGTH_DISCRETIZE}\" discretization (every time step 0..999): uniform's "
                     "+1 rule would put the last step at t=1000, outside the schedule.")
    spread = ", ".join(f"{f:.4f}" for f in data["floor_all"])
    notes.append(f"Noise floor: mean over {len(data['floor_all'])} independent exact-vs-exact pairs ({spread}).")
    return "\n".join(lines + notes) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError naming the extra without it."""
    try:
        import matplotlib  # noqa: PLC0415 - optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'ddim-fused[plots]'") from exc
    return plt


def plot(data: dict, path: Path) -> None:
    """Frechet distance vs S, one line per eta, log-log, with the noise floor dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for eta in dict.fromkeys(c["eta"] for c in data["cells"]):
        cells = [c for c in data["cells"] if c["eta"] == eta]
        label = "sigma-hat" if eta == SIGMA_HAT else f"eta = {eta:g}"
        ax.plot([c["steps"] for c in cells], [c["frechet"] for c in cells], marker="o", label=label)
    ax.axhline(data["floor"], color="gray", linestyle="--", label="noise floor (exact vs exact)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("DDIM steps S")
    ax.set_ylabel("Frechet distance to exact samples")
    ax.set_title(f"DDIM on an exact Gaussian-mixture oracle (D={data['dim']}, N={data['n']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    """Command-line entry: measure, then write quality.json, quality_table.md, quality.png."""
    parser = argparse.ArgumentParser(prog="python -m ddim_fused.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs", help="folder for quality.json, quality_table.md, quality.png")
    parser.add_argument("--quick", action="store_true", help="2,000 samples per set instead of 20,000 (a smoke run)")
    parser.add_argument("--n", type=int, default=None, help="samples per set (overrides --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixture, the reference and the noise")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (2000 if args.quick else 20000)
    if n < 2:
        parser.error(f"--n must be >= 2, got {n}")
    if not 0 <= args.seed < 2**62:  # seeds torch generators, offset by up to a few thousand
        parser.error(f"--seed must be in [0, 2**62), got {args.seed}")
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create --out-dir {out}: {exc}")

    dim, k, std = 32, 6, 0.2
    oracle = make_oracle(dim, k, std, seed=args.seed)
    start = time.perf_counter()
    data = measure(oracle, n, seed=args.seed, progress=lambda msg: print(msg, flush=True))
    data.update(n=n, dim=dim, n_components=k, std=std, seed=args.seed, seconds=time.perf_counter() - start,
                torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                date=time.strftime("%Y-%m-%d"))
    _write_text(out / "quality.json", json.dumps(data, indent=1) + "\n")
    _write_text(out / "quality_table.md", markdown_table(data))
    plot(data, out / "quality.png")
    print(markdown_table(data))
    print(f"wrote {out / 'quality.json'}, {out / 'quality_table.md'}, {out / 'quality.png'} "
          f"in {data['seconds']:.0f} s")
    return 0


def _write_text(path: Path, text: str) -> None:
    """Write text (UTF-8) whole or not at all."""
    body = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(body))


if __name__ == "__main__":
    sys.exit(main())
