"""Train the embedded digits eps-model and its classifier (needs scikit-learn for the data).

    python -m ddim_fused.digits.train [--out DIR] [--epochs N]   (or: ddim-fused train-digits)
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..schedules import make_alpha_bar
from .classifier import save_classifier, train_classifier
from .model import N_CLASSES, NULL_CLASS, DigitsUNet
from .pretrained import MODEL_FILE

DEFAULTS = dict(epochs=300, batch_size=128, lr=2e-3, label_dropout=0.15, ema=0.999, seed=0,
                schedule="linear", n_train_steps=1000, channels=(32, 64, 96), emb_dim=128)


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to [-1, 1].

    Returns:
        (x, y): x (1797, 1, 8, 8) float32, y (1797,) long labels.
    """
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError("training needs scikit-learn: pip install 'ddim-fused[train]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(data.target, dtype=torch.long)


def split_indices(n: int, seed: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random train/test split of n items: (train_idx, test_idx)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def train_digits(out_dir=None, *, epochs: int = DEFAULTS["epochs"], seed: int = DEFAULTS["seed"],
                 threads: int = 2, log=None, progress: bool = True) -> dict:
    """Train the eps-model (EMA weights are saved) and the classifier; write both files.

    Args:
        out_dir: folder for digits_unet.pt and digits_classifier.pt; None for the package's.
        epochs: passes over the 1,797 digits (15 batches of up to 128).
        seed: seeds weights, batch order, time steps, noise and label dropout.
        threads: torch CPU threads (fixed so timings and results are reproducible).
        log: callable for progress lines (default: print above the progress bar).
        progress: show a tqdm progress bar over the training steps.

    Returns:
        dict of summary numbers (train seconds, parameter count, classifier accuracy).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    from tqdm import tqdm  # noqa: PLC0415

    log = log or tqdm.write
    out_dir = Path(out_dir) if out_dir is not None else MODEL_FILE.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    cfg = dict(DEFAULTS, epochs=epochs, seed=seed)
    x, y = load_digits_data()

    start = time.perf_counter()
    train_idx, test_idx = split_indices(len(x), seed)
    clf = train_classifier(x[train_idx], y[train_idx], seed=seed)
    clf_acc = float((clf.predict(x[test_idx]) == y[test_idx]).float().mean())
    save_classifier(clf, out_dir / "digits_classifier.pt", clf_acc)
    log(f"classifier: held-out accuracy {clf_acc:.4f} on {len(test_idx)} real digits")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsUNet(cfg["channels"], cfg["emb_dim"])
    ema = copy.deepcopy(net).requires_grad_(False)
    alpha_bar = torch.from_numpy(make_alpha_bar(cfg["schedule"], cfg["n_train_steps"])).float()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x) / cfg["batch_size"])
    total = epochs * steps_per_epoch
    warmup = min(200, total // 10)
    # Linear warmup, then cosine decay to 5% of the peak rate.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / total))))
    step = 0
    bar = tqdm(total=total, desc="train-digits", unit="step", leave=False, disable=not progress)
    for epoch in range(epochs):
        running = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(cfg["batch_size"]):
            x0, labels = x[idx], y[idx].clone()
            labels[torch.rand(len(idx), generator=gen) < cfg["label_dropout"]] = NULL_CLASS
            t = torch.randint(0, cfg["n_train_steps"], (len(idx),), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            a = alpha_bar[t].view(-1, 1, 1, 1)
            loss = nn.functional.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, labels), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                # Short EMA horizon early on so the average does not start from random weights.
                decay = min(cfg["ema"], (1 + step) / (10 + step))
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - decay)
            running += loss.item()
            bar.update(1)
        if (epoch + 1) % max(1, epochs // 20) == 0 or epoch + 1 == epochs:
            log(f"epoch {epoch + 1}/{epochs}  loss {running / steps_per_epoch:.4f}  "
                f"{time.perf_counter() - start:.0f}s")
    bar.close()
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in net.parameters())
    config = {"channels": list(cfg["channels"]), "emb_dim": cfg["emb_dim"], "n_classes": N_CLASSES,
              "null_class": NULL_CLASS, "schedule": cfg["schedule"], "n_train_steps": cfg["n_train_steps"],
              "epochs": epochs, "batch_size": cfg["batch_size"], "lr": cfg["lr"],
              "label_dropout": cfg["label_dropout"], "ema": cfg["ema"], "seed": seed,
              "train_seconds": float(seconds), "threads": threads}
    # Stored in float16 (half the file size); loading casts back to float32.
    state = {k: v.half() if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    torch.save({"config": config, "state_dict": state}, out_dir / "digits_unet.pt")
    log(f"trained {n_params} parameters for {total} steps in {seconds:.0f}s on {threads} threads; "
        f"wrote {out_dir / 'digits_unet.pt'}")
    return {"seconds": seconds, "n_params": n_params, "classifier_accuracy": clf_acc}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train-digits options, shared by this module's main and the ddim-fused CLI."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder to write digits_unet.pt and digits_classifier.pt "
                             "(default: the package's weights folder, replacing the shipped model)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                        help=f"passes over the 1,797 digits, 15 steps each (default {DEFAULTS['epochs']})")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="training seed (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(argv=None) -> None:
    """Command-line entry point of `python -m ddim_fused.digits.train`."""
    parser = argparse.ArgumentParser(prog="python -m ddim_fused.digits.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    train_digits(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads, progress=not args.no_progress)


if __name__ == "__main__":
    main()
