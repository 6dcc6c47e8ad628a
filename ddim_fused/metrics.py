"""Error and sample-quality metrics: relative RMS error, Frechet distance."""
from __future__ import annotations

import math

import numpy as np
import torch


def relative_rms_error(actual, expected) -> float:
    """Relative RMS error ||actual - expected||_2 / ||expected||_2 (the tests' and benchmarks' metric).

    Equal to sqrt(mean((actual - expected)^2)) / sqrt(mean(expected^2)). Both inputs are
    converted to float64 on the CPU first, and both are divided by their common largest
    magnitude before squaring, so neither fp16-sized nor 1e-200-sized values underflow or
    overflow in the squares.

    Args:
        actual: tensor or numpy array of any shape (real dtype, any device).
        expected: the exact result, the same shape as actual (no broadcasting).

    Returns:
        The error as a float >= 0, with these edge cases:
        - NaN or +-Inf anywhere in either input: math.inf, so that every `error <= bound`
          check fails. (A caller that asserts `error > bound` must check finiteness itself.)
        - expected all zeros: 0.0 if actual is all zeros too, else math.inf.
        - empty inputs: 0.0 (no element differs).

    Raises:
        TypeError: an input is not a tensor or numpy array of real numbers.
        ValueError: the shapes differ.
    """
    a = _as_float64("actual", actual)
    e = _as_float64("expected", expected)
    if a.shape != e.shape:
        raise ValueError(f"actual has shape {tuple(a.shape)} and expected {tuple(e.shape)}; they must match")
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    scale = max(a.abs().max().item(), e.abs().max().item())
    if scale == 0.0:
        return 0.0
    diff_norm = torch.linalg.vector_norm(a / scale - e / scale).item()
    ref_norm = torch.linalg.vector_norm(e / scale).item()
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else math.inf
    return diff_norm / ref_norm


def _as_float64(name: str, values) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}")
        return torch.from_numpy(values.astype(np.float64))
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(values).__name__}")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}")
    return values.detach().to(device="cpu", dtype=torch.float64)


def frechet_distance(samples_a, samples_b) -> float:
    """Frechet distance between Gaussians fitted to two sample sets (FID without Inception).

    d^2 = ||m_a - m_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2), with means
    and covariances in float64. Both square roots come from symmetric eigendecompositions
    with rounding-level negative eigenvalues clamped to 0, so rank-deficient covariances
    (N <= D) and nearly singular ones stay finite.

    Args:
        samples_a: (N_a, *s) tensor or array; each sample is flattened to D = prod(s).
        samples_b: (N_b, *s') with the same D. N_a, N_b >= 2.

    Returns:
        The squared Frechet distance as a float >= 0 (the quantity FID reports).
    """
    a = _as_matrix("samples_a", samples_a)
    b = _as_matrix("samples_b", samples_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples_a has {a.shape[1]} features per sample and samples_b {b.shape[1]}; they must match")
    # d^2 scales with the square of the data: computed on data scaled to at most 1, so that
    # covariances of large values do not overflow, then scaled back.
    scale = max(float(np.abs(a).max()), float(np.abs(b).max())) or 1.0
    a, b = a / scale, b / scale
    mean_a, cov_a = a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
    mean_b, cov_b = b.mean(0), np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_cross = np.sqrt(np.clip(eig, 0.0, None)).sum()
    d2 = float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_cross)
    # Mathematically >= 0; rounding can leave about -1e-12 (relative) for identical sets.
    d2 = max(d2, 0.0) * scale * scale
    if not math.isfinite(d2):
        raise ValueError(f"the squared Frechet distance of these samples (values up to {scale:.3g}) overflows float64")
    return d2


def _sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eig, vec = np.linalg.eigh((cov + cov.T) / 2)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def _as_matrix(name: str, samples) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        if samples.is_complex() or samples.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {samples.dtype}")
        samples = samples.detach().cpu().to(torch.float64).numpy()
    elif not isinstance(samples, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(samples).__name__}")
    if samples.ndim < 2:
        raise ValueError(f"{name} must have shape (N, *sample_shape), got {samples.shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"{name} needs N >= 2 samples for a covariance, got {samples.shape[0]}")
    if not (np.issubdtype(samples.dtype, np.floating) or np.issubdtype(samples.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {samples.dtype}")
    flat = samples.reshape(samples.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{name} contains NaN or Inf")
    return flat
