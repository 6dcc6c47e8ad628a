"""The shipped digits model, wrapped in the samplers' model protocol."""
from __future__ import annotations

from pathlib import Path

import torch

from ..schedules import make_alpha_bar
from .model import N_CLASSES, NULL_CLASS, DigitsUNet

MODEL_FILE = Path(__file__).with_name("weights") / "digits_unet.pt"
IMAGE_SHAPE = (1, 8, 8)


class DigitsModel:
    """eps-model for 8x8 digits following the sampler protocol: n_steps, alpha_bar, model(x, t, cond).

    cond is a (B,) long tensor of class labels in [0, 10); label 10 (NULL_CLASS) is the
    unconditional input, so classifier-free guidance passes uncond_cond=model.null_cond(B).

    Args:
        net: the trained DigitsUNet.
        alpha_bar: (T,) float64 tensor of the schedule it was trained with.
        config: the training config stored with the weights.
        device, dtype: where and in what precision the network runs.
    """

    n_classes = N_CLASSES
    null_class = NULL_CLASS
    image_shape = IMAGE_SHAPE

    def __init__(self, net: DigitsUNet, alpha_bar: torch.Tensor, config: dict, device, dtype):
        self.net = net.to(device=device, dtype=dtype).eval()
        self.alpha_bar = alpha_bar
        self.n_steps = int(alpha_bar.shape[0])
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise.

        Args:
            x: (B, 1, 8, 8) float tensor on self.device.
            t: (B,) long time steps in [0, n_steps).
            cond: (B,) long class labels in [0, 10].

        Returns:
            (B, 1, 8, 8) eps in x's dtype.
        """
        if not isinstance(cond, torch.Tensor) or cond.shape != (x.shape[0],) or cond.dtype != torch.long:
            got = f"{cond.dtype} tensor of shape {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must be a ({x.shape[0]},) long tensor of class labels, got {got}")
        if tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, 1, 8, 8)")
        return self.net(x.to(self.dtype), t.to(self.device), cond.to(self.device)).to(x.dtype)

    def cond(self, labels) -> torch.Tensor:
        """Class labels (ints in [0, 10)) as the (B,) long cond tensor on the model's device."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= N_CLASSES):
            raise ValueError(f"class labels must lie in [0, {N_CLASSES}), got {labels.tolist()}")
        return labels

    def null_cond(self, batch: int) -> torch.Tensor:
        """The (batch,) unconditional cond for classifier-free guidance."""
        return torch.full((batch,), NULL_CLASS, dtype=torch.long, device=self.device)


def load_digits_model(device="cpu", dtype=torch.float32, path=None) -> DigitsModel:
    """Load the shipped (or a given) digits eps-model.

    Args:
        device: torch device (str or torch.device) the network runs on.
        dtype: torch.float32, float16, bfloat16 or float64.
        path: weights file; None for the one inside the package.

    Returns:
        DigitsModel, ready for DDIMSampler(model, n_steps).
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a torch float dtype, got {dtype!r}")
    device = torch.device(device)
    blob = torch.load(path or MODEL_FILE, map_location="cpu", weights_only=True)
    cfg = blob["config"]
    net = DigitsUNet(channels=tuple(int(c) for c in cfg["channels"]), emb_dim=int(cfg["emb_dim"]))
    net.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    alpha_bar = torch.from_numpy(make_alpha_bar(cfg["schedule"], int(cfg["n_train_steps"])))
    return DigitsModel(net, alpha_bar, cfg, device, dtype)
