"""A tiny MLP digit classifier, used to measure the class adherence of generated digits."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write
from .model import N_CLASSES

CLASSIFIER_FILE = Path(__file__).with_name("weights") / "digits_classifier.pt"


class DigitsClassifier(nn.Module):
    """64 -> hidden -> hidden -> 10 MLP on flattened 8x8 digits in [-1, 1]."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: (B, 1, 8, 8) or (B, 8, 8) digits in [-1, 1], any float dtype.

        Returns:
            (B, 10) float32 logits.
        """
        return self.net(x.reshape(x.shape[0], 64).float())

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer, the feature space of the Frechet distance on digits.

        Args:
            x: (B, 1, 8, 8) or (B, 8, 8) digits in [-1, 1] (clipped to it first, as predict does).

        Returns:
            (B, hidden) float32 features.
        """
        return self.net[:-1](x.clamp(-1, 1).reshape(x.shape[0], 64).float())

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes of x ((B, 1, 8, 8) or (B, 8, 8)) as a (B,) long tensor."""
        return self(x.clamp(-1, 1)).argmax(dim=1)


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, epochs: int = 150,
                     noise_std: float = 0.1) -> DigitsClassifier:
    """Train the classifier with full-batch-order-deterministic minibatch Adam.

    Light Gaussian input noise makes it tolerant of the small pixel noise that
    generated digits carry, so it measures the class and not the texture.

    Args:
        x: (N, 1, 8, 8) float32 digits in [-1, 1].
        y: (N,) long labels in [0, 10).
        seed: seeds the initial weights, batch order and noise.
        epochs: passes over x.
        noise_std: std of the input noise added during training.

    Returns:
        the trained classifier, in eval mode on CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for idx in order.split(64):
            xb = x[idx] + noise_std * torch.randn(x[idx].shape, generator=gen)
            loss = nn.functional.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


def classifier_blob(clf: DigitsClassifier, test_accuracy: float) -> dict:
    """The classifier as a plain dict (config + state dict) that torch.load reads with weights_only=True."""
    return {"config": {"hidden": clf.hidden, "test_accuracy": float(test_accuracy)}, "state_dict": clf.state_dict()}


def save_classifier(clf: DigitsClassifier, path, test_accuracy: float) -> None:
    """Save the classifier (see classifier_blob) atomically: a failed write leaves `path` as it was."""
    blob = classifier_blob(clf, test_accuracy)
    atomic_write(path, lambda f: torch.save(blob, f))


def load_digits_classifier(path=None, device="cpu") -> DigitsClassifier:
    """Load the shipped (or a given) digit classifier.

    Args:
        path: weights file; None for the one inside the package.
        device: torch device to put it on.

    Returns:
        DigitsClassifier in eval mode; `.test_accuracy` holds its held-out accuracy on real digits.
    """
    blob = torch.load(path or CLASSIFIER_FILE, map_location="cpu", weights_only=True)
    clf = DigitsClassifier(hidden=int(blob["config"]["hidden"]))
    clf.load_state_dict(blob["state_dict"])
    clf.test_accuracy = float(blob["config"]["test_accuracy"])
    return clf.to(device).eval()
