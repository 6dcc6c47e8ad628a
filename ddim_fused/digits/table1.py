"""The DDIM paper's Table 1 on the trained digits model: Frechet distance per (S, eta).

    python -m ddim_fused.digits.table1 [--out-dir docs] [--quick] [--n 500]
    python -m ddim_fused.digits.table1 --markdown docs/table1.json    (docs/quality.md's table)

For each number of steps S and eta, N digits are generated (classes 0..9 cycling, no
guidance, the same Philox seed for every cell) and compared with the real digits that
the shipped classifier held out (its 20% test split), in that classifier's feature space
(its last hidden layer, 128 features). Beside each cell: the fraction of the generated
digits that the classifier reads as the requested class. References: the noise floor
(real vs real, the two disjoint halves of the held-out digits); N real digits of the
classifier's training split against the held-out ones (what a perfect generator would
score at the cells' sample sizes; mean and spread over random draws of the N); and one
cell (S = 50, eta = 0) drawn again with other seeds (how much a cell moves with its noise
alone). Needs scikit-learn (the real digits) and, for the plot, matplotlib.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..coefficients import SIGMA_HAT
from ..metrics import frechet_distance
from ..quality import pyplot
from ..sampler import DDIMSampler
from .classifier import load_digits_classifier
from .pretrained import load_digits_model
from .train import load_digits_data, split_indices

STEPS = (10, 20, 50, 100, 1000)
QUICK_STEPS = (10, 20, 50, 100)
ETAS = (0.0, 0.2, 0.5, 1.0, SIGMA_HAT)
SPLIT_SEED = 0  # the classifier's train/test split (ddim_fused.digits.train, seed 0)
REAL_DRAWS = 10  # random draws of N training-split digits for the same-size reference
REPEAT_CELL, REPEAT_SEED_OFFSETS = (50, 0.0), (1, 2)  # a cell drawn again with seed + these


def discretization(n_steps: int, n_train_steps: int) -> str:
    """uniform (labml's), or linspace for S = T, where uniform's +1 would reach t = T."""
    return "linspace" if n_steps >= n_train_steps else "uniform"


def generate(model, n_steps: int, eta, n: int, *, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n digits (classes 0..9 cycling, no guidance) and their labels, keyed by (seed, index)."""
    sampler = DDIMSampler(model, n_steps, discretization(n_steps, model.n_steps), eta, seed=seed)
    labels = torch.arange(n) % 10
    out = []
    for start in range(0, n, batch_size):
        y = labels[start:start + batch_size]
        out.append(sampler.sample((len(y), 1, 8, 8), model.cond(y), sample_offset=start, device=model.device))
    return torch.cat(out), labels


def measure(n: int, steps=STEPS, etas=ETAS, *, seed: int = 0, batch_size: int = 500, progress=None) -> dict:
    """Frechet distance and class accuracy of every (S, eta) cell, and the two references.

    Returns:
        dict: cells (list of {steps, eta, discretize, frechet, accuracy, seconds}); floor;
        same_size_real (mean over REAL_DRAWS draws), same_size_real_all, same_size_n;
        repeat ({steps, eta, seeds, frechet}: REPEAT_CELL with more seeds, if in the grid);
        n_heldout, classifier_accuracy.
    """
    model, clf = load_digits_model(), load_digits_classifier()
    x, _ = load_digits_data()
    train_idx, test_idx = split_indices(len(x), SPLIT_SEED)
    heldout = clf.features(x[test_idx])
    half = len(heldout) // 2
    train_feats = clf.features(x[train_idx])
    size = min(n, len(train_feats))
    gen = torch.Generator().manual_seed(seed)
    draws = [frechet_distance(train_feats[torch.randperm(len(train_feats), generator=gen)[:size]], heldout)
             for _ in range(REAL_DRAWS)]
    data = {"n_heldout": len(heldout), "classifier_accuracy": clf.test_accuracy,
            "floor": frechet_distance(heldout[:half], heldout[half:]),
            "same_size_real": sum(draws) / len(draws), "same_size_real_all": draws, "same_size_n": size,
            "cells": []}
    for eta in etas:
        for s in steps:
            start = time.perf_counter()
            samples, labels = generate(model, s, eta, n, seed=seed, batch_size=batch_size)
            seconds = time.perf_counter() - start
            cell = {"steps": s, "eta": eta, "discretize": discretization(s, model.n_steps),
                    "frechet": frechet_distance(clf.features(samples), heldout),
                    "accuracy": float((clf.predict(samples) == labels).float().mean()), "seconds": seconds}
            data["cells"].append(cell)
            if progress is not None:
                progress(f"S={s:4d} eta={eta!s:9} FD={cell['frechet']:.3f} acc={cell['accuracy']:.3f} "
                         f"({seconds:.0f} s)")
    s, eta = REPEAT_CELL
    if s in steps and eta in etas:
        others = [seed + k for k in REPEAT_SEED_OFFSETS]
        repeats = [frechet_distance(clf.features(generate(model, s, eta, n, seed=other, batch_size=batch_size)[0]),
                                    heldout) for other in others]
        first = next(c["frechet"] for c in data["cells"] if (c["steps"], c["eta"]) == REPEAT_CELL)
        data["repeat"] = {"steps": s, "eta": eta, "seeds": [seed, *others], "frechet": [first, *repeats]}
        if progress is not None:
            progress(f"S={s} eta={eta} with seeds {data['repeat']['seeds']}: FD {data['repeat']['frechet']}")
    return data


def _eta_label(eta) -> str:
    return "sigma-hat" if eta == SIGMA_HAT else f"{eta:g}"


def markdown_table(data: dict) -> str:
    """The Table 1 table of docs/quality.md: rows eta, columns S, each cell 'FD (accuracy)', then the references."""
    steps = sorted({c["steps"] for c in data["cells"]})
    etas = list(dict.fromkeys(c["eta"] for c in data["cells"]))
    cell = {(c["eta"], c["steps"]): c for c in data["cells"]}
    full = {c["steps"] for c in data["cells"] if c["discretize"] != "uniform"}
    head = ["eta \\ S"] + [f"{s}*" if s in full else str(s) for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for eta in etas:
        row = [f"{cell[eta, s]['frechet']:.2f} ({cell[eta, s]['accuracy']:.3f})" for s in steps]
        lines.append("| " + " | ".join([_eta_label(eta)] + row) + " |")
    h = data["n_heldout"]
    lines.append(f"| real vs real: held-out halves ({h // 2} / {h - h // 2}), noise floor | "
                 + " | ".join([f"{data['floor']:.2f}"] * len(steps)) + " |")
    spread = max(data["same_size_real_all"]) - min(data["same_size_real_all"])
    lines.append(f"| real vs real: {data['same_size_n']} training-split digits vs the {h} held-out | "
                 + " | ".join([f"{data['same_size_real']:.2f} ± {spread / 2:.2f}"] * len(steps)) + " |")
    notes = [
        "",
        f"Frechet distance (squared) in the shipped classifier's 128 features between {data['n']} generated digits "
        f"and the {h} real digits it held out; in brackets the fraction of generated digits it reads as the "
        f"requested class (it reads {data['classifier_accuracy']:.3f} of the real held-out digits correctly). "
        "Classes 0..9 cycling, no guidance, one Philox seed for every cell.",
    ]
    if full:
        notes.append("\\* S = 1000 uses the linspace discretization (every time step): uniform's +1 would reach "
                     "t = 1000.")
    draws = data["same_size_real_all"]
    notes.append(f"Training-split reference: mean of {len(draws)} random draws of {data['same_size_n']} digits "
                 f"(range {min(draws):.2f} to {max(draws):.2f}, ± half of it).")
    if "repeat" in data:
        r = data["repeat"]
        notes.append(f"Noise of a cell: S = {r['steps']}, eta = {r['eta']:g} drawn with seeds "
                     f"{', '.join(map(str, r['seeds']))} gives " + ", ".join(f"{v:.2f}" for v in r["frechet"]) + ".")
    return "\n".join(lines + notes) + "\n"


def plot(data: dict, path: Path) -> None:
    """FD and class accuracy vs S, one line per eta, with the two real-vs-real references."""
    plt = pyplot()
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for eta in dict.fromkeys(c["eta"] for c in data["cells"]):
        cells = [c for c in data["cells"] if c["eta"] == eta]
        label = "sigma-hat" if eta == SIGMA_HAT else f"eta = {eta:g}"
        ax.plot([c["steps"] for c in cells], [c["frechet"] for c in cells], marker="o", label=label)
        ax_acc.plot([c["steps"] for c in cells], [c["accuracy"] for c in cells], marker="o", label=label)
    ax.axhline(data["floor"], color="gray", linestyle="--", label="real vs real (held-out halves)")
    draws = data["same_size_real_all"]
    ax.axhspan(min(draws), max(draws), color="gray", alpha=0.2,
               label=f"real vs real ({data['same_size_n']} training-split digits)")
    ax_acc.axhline(data["classifier_accuracy"], color="gray", linestyle="--", label="real held-out digits")
    for a, ylabel in ((ax, "Frechet distance (classifier features)"), (ax_acc, "class accuracy")):
        a.set_xscale("log")
        a.set_xlabel("DDIM steps S")
        a.set_ylabel(ylabel)
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"DDIM on the digits model (N={data['n']} per cell)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    """Measure and write table1.json + table1.png, or print the table of an existing JSON."""
    parser = argparse.ArgumentParser(prog="python -m ddim_fused.digits.table1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="docs", help="folder for table1.json and table1.png (default docs)")
    parser.add_argument("--quick", action="store_true",
                        help="200 digits per cell and S up to 100, into table1_quick.json/png (about a minute)")
    parser.add_argument("--n", type=int, default=None, help="digits per cell (default 500, 200 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="Philox seed of every cell (default 0)")
    parser.add_argument("--batch-size", type=int, default=500, help="digits per sampler call (default 500)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a busy machine more threads make this model slower)")
    parser.add_argument("--markdown", metavar="JSON", default=None,
                        help="print the markdown table of a finished run's JSON and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    n = args.n if args.n is not None else (200 if args.quick else 500)
    if n < 2 or args.batch_size < 1 or args.threads < 1:
        parser.error("--n must be >= 2, --batch-size and --threads >= 1")
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create --out-dir {out}: {exc}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = measure(n, QUICK_STEPS if args.quick else STEPS, seed=args.seed, batch_size=args.batch_size,
                   progress=lambda msg: print(msg, flush=True))
    data.update(n=n, seed=args.seed, seconds=time.perf_counter() - start, torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(), threads=args.threads,
                date=time.strftime("%Y-%m-%d"))
    stem = "table1_quick" if args.quick else "table1"
    body = (json.dumps(data, indent=1) + "\n").encode()
    atomic_write(out / f"{stem}.json", lambda f: f.write(body))
    plot(data, out / f"{stem}.png")
    print(markdown_table(data), end="")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')} in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
