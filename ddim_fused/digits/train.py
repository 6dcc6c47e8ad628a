"""Train the embedded digits eps-model and its classifier (needs scikit-learn for the data).

    python -m ddim_fused.digits.train [--out DIR | --replace-shipped] [--epochs N]   (or: ddim-fused train-digits)

The two weights files are written to ./digits-weights/ unless told otherwise, and only
after both models are trained, as a pair: both temporary files are written first, then
both renamed, so an interrupted run never leaves a new classifier beside an old UNet.
The shipped files in the package are replaced only with --replace-shipped.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..atomic import OutputPathError, atomic_write_all, check_output_dir
from ..schedules import make_alpha_bar
from .classifier import CLASSIFIER_FILE, classifier_blob, train_classifier
from .model import N_CLASSES, NULL_CLASS, DigitsUNet
from .pretrained import MODEL_FILE

DEFAULT_OUT_DIR = Path("digits-weights")
SHIPPED_DIR = MODEL_FILE.parent

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


def weights_dir(out_dir=None, replace_shipped: bool = False) -> Path:
    """The folder train_digits writes to, created if needed and checked before any training.

    Args:
        out_dir: a folder; None for ./digits-weights (relative to the current folder).
        replace_shipped: write into the package's own weights folder instead.

    Raises:
        OutputPathError: both arguments given; out_dir is the package's folder without
            replace_shipped; the folder is empty, a file, or not writable.
    """
    if replace_shipped:
        if out_dir is not None:
            raise OutputPathError("--out and --replace-shipped exclude each other: the latter writes into the "
                                  f"package's weights folder {SHIPPED_DIR}")
        return check_output_dir(SHIPPED_DIR, "shipped weights folder")
    folder = check_output_dir(DEFAULT_OUT_DIR if out_dir is None else out_dir, "weights folder")
    if SHIPPED_DIR.is_dir() and folder.samefile(SHIPPED_DIR):
        raise OutputPathError(f"{str(folder)!r} is the package's weights folder; pass --replace-shipped (and no "
                              "--out) to replace the shipped model")
    return folder


def train_digits(out_dir=None, *, replace_shipped: bool = False, epochs: int = DEFAULTS["epochs"],
                 seed: int = DEFAULTS["seed"], threads: int = 2, log=None, progress: bool = True) -> dict:
    """Train the eps-model (EMA weights are saved) and the classifier; write both files as a pair.

    Nothing is written until both are trained; then both files are written to temporary
    files and renamed together (see ddim_fused.atomic.atomic_write_all).

    Args:
        out_dir: folder for digits_unet.pt and digits_classifier.pt; None for ./digits-weights.
        replace_shipped: replace the package's shipped weights (out_dir must be None).
        epochs: passes over the 1,797 digits (15 batches of up to 128).
        seed: seeds weights, batch order, time steps, noise and label dropout.
        threads: torch CPU threads (fixed so timings and results are reproducible).
        log: callable for progress lines (default: print above the progress bar).
        progress: show a tqdm progress bar over the training steps.

    Returns:
        dict of summary numbers (train seconds, parameter count, classifier accuracy) and
        out_dir, the folder written to.

    Raises:
        OutputPathError: see weights_dir; raised before any training.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    from tqdm import tqdm  # noqa: PLC0415

    log = log or tqdm.write
    out_dir = weights_dir(out_dir, replace_shipped)
    torch.set_num_threads(threads)
    cfg = dict(DEFAULTS, epochs=epochs, seed=seed)
    x, y = load_digits_data()

    start = time.perf_counter()
    train_idx, test_idx = split_indices(len(x), seed)
    clf = train_classifier(x[train_idx], y[train_idx], seed=seed)
    clf_acc = float((clf.predict(x[test_idx]) == y[test_idx]).float().mean())
    log(f"classifier: held-out accuracy {clf_acc:.4f} on {len(test_idx)} real digits (written with the UNet)")

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
    unet = {"config": config, "state_dict": {k: v.half() if v.is_floating_point() else v
                                             for k, v in ema.state_dict().items()}}
    clf_blob = classifier_blob(clf, clf_acc)
    unet_path, clf_path = out_dir / MODEL_FILE.name, out_dir / CLASSIFIER_FILE.name
    atomic_write_all([(unet_path, lambda f: torch.save(unet, f)), (clf_path, lambda f: torch.save(clf_blob, f))])
    log(f"trained {n_params} parameters for {total} steps in {seconds:.0f}s on {threads} threads; "
        f"wrote {unet_path} and {clf_path}")
    return {"seconds": seconds, "n_params": n_params, "classifier_accuracy": clf_acc, "out_dir": out_dir}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train-digits options, shared by this module's main and the ddim-fused CLI."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder to write digits_unet.pt and digits_classifier.pt (default ./{DEFAULT_OUT_DIR}); "
                             "use them with --weights DIR/digits_unet.pt")
    parser.add_argument("--replace-shipped", action="store_true",
                        help="replace the model shipped in the package instead (both files, together)")
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
    try:
        train_digits(args.out, replace_shipped=args.replace_shipped, epochs=args.epochs, seed=args.seed,
                     threads=args.threads, progress=not args.no_progress)
    except OutputPathError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
