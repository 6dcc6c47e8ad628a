"""An exact eps-model: a Gaussian mixture whose noised score is closed form.

If x0 ~ sum_k w_k N(mu_k, s^2 I), then x_t = sqrt(a) x0 + sqrt(1 - a) e is again a
mixture, sum_k w_k N(sqrt(a) mu_k, v I) with v = a s^2 + 1 - a. Its score is
-(x - sqrt(a) E[mu | x]) / v, where E[mu | x] averages the means under the posterior
responsibilities, so the ideal denoiser's output is
    eps(x, a) = -sqrt(1 - a) * score = sqrt(1 - a) / v * (x - sqrt(a) * E[mu | x]).
Every sampler runs on it with no training, and `sample` draws exact data to compare with.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .schedules import check_alpha_bar, make_alpha_bar
from .validation import FLOAT_DTYPES, MAX_NUMEL, check_tensor

UNCONDITIONAL = -1
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class GaussianMixture:
    """Gaussian-mixture data distribution with its exact eps-predictor (the model protocol).

    Args:
        means: (K, *shape) float tensor, the component means; samples have shape `shape`.
        std: float > 0, the standard deviation shared by every component and coordinate.
        weights: (K,) non-negative float tensor/sequence (normalised here), or None for
            equal weights.
        alpha_bar: (T,) array/tensor in (0, 1], non-increasing; None for the DDPM linear
            schedule with T = 1000.

    Attributes:
        n_steps: T. alpha_bar: (T,) float64 tensor. means: (K, *shape) float64 tensor.
        weights: (K,) float64 tensor. std: float. device: the means' device.

    The model call `oracle(x, t, cond)` takes cond None (the whole mixture) or a (B,)
    integer tensor of component indices, -1 meaning the whole mixture: conditioning on
    component k gives the eps of that single Gaussian, so classifier-free guidance can be
    run with cond = k and uncond_cond = -1.
    """

    def __init__(self, means: torch.Tensor, std: float, weights=None, alpha_bar=None):
        check_tensor("means", means, dtypes=FLOAT_DTYPES)
        if means.dim() < 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, *sample_shape) with K >= 1, got {tuple(means.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")
        if isinstance(std, bool) or not isinstance(std, numbers.Real):
            raise TypeError(f"std must be a float, got {type(std).__name__}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be finite and > 0, got {std}")
        k = means.shape[0]
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            try:
                weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise TypeError(f"weights must be a ({k},) sequence or tensor of floats, got "
                                f"{type(weights).__name__}") from None
            if tuple(weights.shape) != (k,):
                raise ValueError(f"weights has shape {tuple(weights.shape)}, expected ({k},) to match means")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights.tolist()}")
            weights = weights / weights.sum()
        alpha_bar = make_alpha_bar("linear", 1000) if alpha_bar is None else check_alpha_bar(alpha_bar)

        self.device = means.device
        self.means = means.detach().to(torch.float64)
        self.weights = weights.to(self.device)
        self.std = float(std)
        self.alpha_bar = torch.from_numpy(alpha_bar)
        self.n_steps = len(alpha_bar)
        self.sample_shape = tuple(means.shape[1:])
        self._flat_means = self.means.reshape(k, -1)
        # log w_k - ||mu_k||^2 / 2 enters every responsibility; -inf for zero weights.
        self._log_weights = torch.log(self.weights)
        self._mean_sq = self._flat_means.pow(2).sum(1)

    @property
    def n_components(self) -> int:
        """K, the number of mixture components."""
        return self.means.shape[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The exact eps of the mixture noised to alpha_bar[t], in x's dtype.

        Args:
            x: (B, *shape) float tensor on the means' device.
            t: (B,) integer tensor of time steps in [0, T).
            cond: None, or a (B,) integer tensor of component indices in [-1, K), -1 for
                the whole mixture.

        Returns:
            eps: (B, *shape) tensor of x's dtype, computed in float64.
        """
        self._check_x("x", x)
        batch = x.shape[0]
        check_tensor("t", t, shape=(batch,), device=x.device, dtypes=_INT_DTYPES)
        # A range check reads t: a host sync on a GPU, acceptable for a test oracle.
        if batch and (int(t.min()) < 0 or int(t.max()) >= self.n_steps):
            raise ValueError(f"t must lie in [0, {self.n_steps}), got values in [{int(t.min())}, {int(t.max())}]")
        a = self.alpha_bar.to(x.device)[t]
        return self._eps(x, a, self._check_cond(cond, batch, x.device)).to(x.dtype)

    def eps_at(self, x: torch.Tensor, a, cond=None) -> torch.Tensor:
        """The exact eps at an arbitrary level a (float or (B,) tensor in (0, 1]), in x's dtype."""
        self._check_x("x", x)
        a = self._check_level(a, x.shape[0], x.device)
        return self._eps(x, a, self._check_cond(cond, x.shape[0], x.device)).to(x.dtype)

    def log_prob(self, x: torch.Tensor, a=1.0) -> torch.Tensor:
        """Log-density of the mixture noised to level a, differentiable in x.

        Args:
            x: (B, *shape) float tensor.
            a: alpha_bar level, a float in (0, 1] or a (B,) tensor (1.0: the data itself).

        Returns:
            (B,) float64 tensor.
        """
        self._check_x("x", x)
        a = self._check_level(a, x.shape[0], x.device)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        v = a * self.std**2 + (1 - a)
        centres = a.sqrt()[:, None, None] * self._flat_means.to(x.device)[None]
        # The direct difference (not the expanded square) keeps log_prob accurate far out.
        sq = (flat[:, None, :] - centres).pow(2).sum(-1)
        logits = self._log_weights.to(x.device)[None] - sq / (2 * v[:, None])
        dim = flat.shape[1]
        return torch.logsumexp(logits, dim=1) - 0.5 * dim * torch.log(2 * math.pi * v)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, *, a: float = 1.0) -> torch.Tensor:
        """Exact samples of the data distribution, or of it noised to level a.

        Args:
            n: number of samples, >= 1.
            generator: torch.Generator on the means' device, for reproducibility.
            a: alpha_bar level in (0, 1]; 1.0 (default) draws clean data.

        Returns:
            (n, *shape) float64 tensor on the means' device.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if int(n) * math.prod(self.sample_shape) > MAX_NUMEL:
            raise ValueError(f"n={n} samples of shape {self.sample_shape} exceed 2**62 elements")
        level = float(self._check_level(a, 1, self.device)[0])
        comp = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        noise = torch.randn((int(n),) + self.sample_shape, generator=generator, dtype=torch.float64, device=self.device)
        sd = math.sqrt(level * self.std**2 + 1 - level)
        return math.sqrt(level) * self.means[comp] + sd * noise

    # ------------------------------------------------------------------ internals
    def _eps(self, x: torch.Tensor, a: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        means = self._flat_means.to(x.device)
        v = a * self.std**2 + (1 - a)
        sqrt_a = a.sqrt()
        # Responsibilities: softmax_k(log w_k - ||x - sqrt(a) mu_k||^2 / 2v). ||x||^2 is
        # the same for every k and cancels, leaving (sqrt(a) x.mu_k - a ||mu_k||^2 / 2) / v.
        logits = (sqrt_a[:, None] * (flat @ means.T) - 0.5 * a[:, None] * self._mean_sq.to(x.device)[None]) / v[:, None]
        logits = logits + self._log_weights.to(x.device)[None]
        if cond is not None:
            # Conditioning on component k: a one-hot posterior; -1 keeps the mixture's.
            picked = cond >= 0
            one_hot = torch.full_like(logits, -math.inf)
            one_hot[picked, cond[picked]] = 0.0
            logits = torch.where(picked[:, None], one_hot, logits)
        resp = torch.softmax(logits, dim=1)
        posterior_mean = resp @ means
        eps = ((1 - a).sqrt() / v)[:, None] * (flat - sqrt_a[:, None] * posterior_mean)
        return eps.view(x.shape)

    def _check_x(self, name: str, x) -> None:
        check_tensor(name, x, device=self.device, dtypes=FLOAT_DTYPES)
        if tuple(x.shape[1:]) != self.sample_shape or x.dim() != len(self.sample_shape) + 1:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (B, *{self.sample_shape})")

    def _check_level(self, a, batch: int, device) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            if a.dim() == 0:
                a = a.reshape(1).expand(batch)
            if tuple(a.shape) != (batch,):
                raise ValueError(f"a has shape {tuple(a.shape)}, expected a float or ({batch},)")
            a = a.to(device=device, dtype=torch.float64)
        elif isinstance(a, numbers.Real) and not isinstance(a, bool):
            a = torch.full((batch,), float(a), dtype=torch.float64, device=device)
        else:
            raise TypeError(f"a must be a float or a tensor, got {type(a).__name__}")
        if not bool(((a > 0) & (a <= 1)).all()):
            raise ValueError(f"a (the alpha_bar level) must lie in (0, 1], got {a.tolist()[:4]}")
        return a

    def _check_cond(self, cond, batch: int, device) -> Optional[torch.Tensor]:
        if cond is None:
            return None
        check_tensor("cond", cond, shape=(batch,), device=device, dtypes=_INT_DTYPES)
        if batch and (int(cond.min()) < UNCONDITIONAL or int(cond.max()) >= self.n_components):
            raise ValueError(f"cond must hold component indices in [-1, {self.n_components}), "
                             f"got values in [{int(cond.min())}, {int(cond.max())}]")
        return cond.long()

