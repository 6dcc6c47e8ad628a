"""Class adherence of generated digits per guidance scale (the guidance table of docs/models.md).

    python -m ddim_fused.digits.evaluate [--num 500] [--steps 50] [--scales 1 2 3 5] [--grid-dir DIR]
                                         [--json docs/adherence.json]

`--json` writes the measured table (docs/models.md's table is `markdown_table` of that file).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..sampler import DDIMSampler
from .classifier import load_digits_classifier
from .pretrained import load_digits_model


def guidance_accuracy(model, classifier, scale: float, *, num: int = 500, steps: int = 50, eta: float = 0.0,
                      seed: int = 0, batch_size: int = 250) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Fraction of generated digits the classifier reads as the requested class, and its mean confidence.

    Args:
        model: DigitsModel.
        classifier: DigitsClassifier.
        scale: classifier-free guidance scale (1 = no guidance).
        num: digits to generate, classes 0..9 cycling (num/10 per class).
        steps, eta, seed: DDIM settings (Philox noise, so the same seed gives the same latents
            for every scale).
        batch_size: digits per sampler call.

    Returns:
        (accuracy, mean classifier probability of the requested class, samples (num, 1, 8, 8),
        labels (num,)).
    """
    sampler = DDIMSampler(model, steps, ddim_eta=eta, seed=seed)
    labels = torch.arange(num) % 10
    out = []
    for start in range(0, num, batch_size):
        y = model.cond(labels[start:start + batch_size])
        extra = {} if scale == 1.0 else {"uncond_scale": scale, "uncond_cond": model.null_cond(len(y))}
        out.append(sampler.sample((len(y), 1, 8, 8), y, sample_offset=start, device=model.device, **extra))
    x = torch.cat(out)
    x_cpu = x.float().cpu()
    accuracy = (classifier.predict(x_cpu) == labels).float().mean().item()
    with torch.no_grad():
        prob = classifier(x_cpu.clamp(-1, 1)).softmax(dim=1)[torch.arange(num), labels].mean().item()
    return accuracy, prob, x, labels


def markdown_table(data: dict) -> str:
    """The adherence table of a `--json` file: one row per guidance scale."""
    lines = ["| guidance scale | accuracy | mean p(requested class) |", "| ---: | ---: | ---: |"]
    for row in data["rows"]:
        label = {0.0: "0 (unconditional)", 1.0: "1 (no guidance)"}.get(row["scale"], f"{row['scale']:g}")
        lines.append(f"| {label} | {row['accuracy']:.3f} | {row['prob']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Print a markdown table of accuracy per guidance scale (and optionally write sample grids)."""
    parser = argparse.ArgumentParser(prog="python -m ddim_fused.digits.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=500, help="digits per guidance scale (default 500)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="Philox seed (default 0)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0],
                        help="guidance scales; 0 is the unconditional model (default 0 1 2 3 5)")
    parser.add_argument("--grid-dir", default=None, help="folder for one PNG grid per scale (first 100 digits)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", default=None, help="also write the table's data to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, classifier = load_digits_model(), load_digits_classifier()
    print(f"classifier accuracy on held-out real digits: {classifier.test_accuracy:.3f}")
    print(f"{args.num} digits per scale, {args.steps} DDIM steps, eta {args.eta}, seed {args.seed}\n")
    print("| guidance scale | accuracy | mean p(requested class) | seconds |")
    print("| ---: | ---: | ---: | ---: |")
    rows = []
    for scale in args.scales:
        start = time.perf_counter()
        acc, prob, x, _ = guidance_accuracy(model, classifier, scale, num=args.num, steps=args.steps, eta=args.eta,
                                      seed=args.seed)
        rows.append({"scale": float(scale), "accuracy": acc, "prob": prob})
        print(f"| {scale:g} | {acc:.3f} | {prob:.3f} | {time.perf_counter() - start:.1f} |", flush=True)
        if args.grid_dir:
            from .images import save_grid  # noqa: PLC0415

            Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
            save_grid(x[:100], Path(args.grid_dir) / f"guidance_{scale:g}.png", 10)
    if args.json:
        data = {"num": args.num, "steps": args.steps, "eta": args.eta, "seed": args.seed, "threads": args.threads,
                "classifier_test_accuracy": classifier.test_accuracy, "torch": torch.__version__, "rows": rows}
        _write_json(Path(args.json), data)
        print(f"wrote {args.json}")


def _write_json(path: Path, data: dict) -> None:
    """Write to a temporary file opened exclusively, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
