"""The model inputs of a run, by global sample index: cond, guidance arguments, labels.

Sample i of a run gets class classes[i % len(classes)] (class models), row i of a
per-sample cond tensor or the one shared row (tensor models), and, with guidance, the
model's unconditional input: a null class, or an uncond tensor. Like the noise, none of
it depends on how samples are batched.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .models import LoadedModel
from .sampler import DDIMSampler

TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")
NO_LABEL = -1  # the label stored for samples without a class


class Conditioning:
    """What a model is fed, per global sample index.

    Args:
        loaded: the model.
        classes: class ids cycled over the samples (class models); None: unconditional,
            through the model's null class (class models that have one).
        cond: a tensor for "tensor" models: (num, *c) one row per sample, or (1, *c) /
            (*c) (a single sample's cond, when the model knows its rank) shared by all.
        uncond: the unconditional tensor for guidance, same rules and row shape as cond.
        guidance: classifier-free guidance scale; 1 is none.
        num: number of samples of the run (rows a per-sample cond must have).

    Raises:
        ValueError: an input the model cannot take; the message names the argument
            (classes, cond, uncond, guidance).
    """

    def __init__(self, loaded: LoadedModel, *, classes: Optional[Sequence[int]] = None,
                 cond: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
                 guidance: float = 1.0, num: Optional[int] = None):
        self.loaded, self.guidance, self.num = loaded, float(guidance), num
        self.classes = None if classes is None else tuple(int(c) for c in classes)
        self.cond = self.uncond = None
        self.shared = self.uncond_shared = True
        kind = loaded.conditioning
        if kind != "class" and self.classes is not None:
            raise ValueError("classes apply to class-conditional models; this model takes "
                             + ("a cond tensor" if kind == "tensor" else "no conditioning"))
        if kind != "tensor" and (cond is not None or uncond is not None):
            name = "cond" if cond is not None else "uncond"
            raise ValueError(f"{name} applies to models conditioned on tensors (e.g. UNet2DConditionModel); "
                             f"this model takes {'classes' if kind == 'class' else 'no conditioning'}")
        if kind == "class":
            self._check_classes()
        elif kind == "tensor":
            self._check_tensors(cond, uncond)
        elif self.guidance != 1.0:
            raise ValueError(f"guidance={self.guidance:g} needs an unconditional input, and this model is "
                             "unconditional: leave guidance at 1")

    # ------------------------------------------------------------------ checks
    def _check_classes(self) -> None:
        loaded = self.loaded
        if self.classes is None:
            if loaded.null_cond is None:
                raise ValueError("classes: this class-conditional model needs class labels (it has no null class)")
            return
        if not self.classes:
            raise ValueError("classes must hold at least one class")
        n = loaded.n_classes
        bad = [c for c in self.classes if c < 0 or (n is not None and c >= n)]
        if bad:
            known = f"classes 0 to {n - 1}" if n is not None else "classes >= 0"
            raise ValueError(f"unknown class {bad[0]}: the model knows {known}")
        if self.guidance != 1.0 and loaded.null_cond is None:
            raise ValueError(f"guidance={self.guidance:g} needs an unconditional input, which this class-conditional "
                             "model does not have (no null class): leave guidance at 1")

    def _check_tensors(self, cond, uncond) -> None:
        loaded = self.loaded
        if cond is None and loaded.cond_required:
            raise ValueError("cond: this model is conditioned on a tensor (encoder hidden states); give one")
        if uncond is not None and cond is None:
            raise ValueError("uncond needs cond too")
        if uncond is not None and self.guidance == 1.0:
            # Guidance 1 runs on cond alone: an uncond given there would go unused.
            raise ValueError("uncond is used only with guidance other than 1 (guidance 1 runs on cond alone): "
                             "give guidance or leave uncond out")
        if cond is not None:
            self.cond, self.shared = self._rows("cond", cond)
        if uncond is not None:
            self.uncond, self.uncond_shared = self._rows("uncond", uncond)
            if self.uncond.shape[1:] != self.cond.shape[1:]:
                raise ValueError(f"uncond rows have shape {tuple(self.uncond.shape[1:])}, cond rows "
                                 f"{tuple(self.cond.shape[1:])}; they must match")
        if self.guidance != 1.0 and self.uncond is None and loaded.null_cond is None:
            raise ValueError(f"guidance={self.guidance:g} needs uncond, the unconditional tensor")

    def _rows(self, name: str, t) -> tuple[torch.Tensor, bool]:
        """t as (rows, *c) on the model's device, and whether its one row is shared."""
        loaded = self.loaded
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN or Inf")
        if loaded.cond_rank is not None and t.dim() == loaded.cond_rank:
            t = t.unsqueeze(0)
        if t.dim() < 2 or (loaded.cond_rank is not None and t.dim() != loaded.cond_rank + 1):
            want = f"({', '.join(['N'] + ['*'] * loaded.cond_rank)})" if loaded.cond_rank else "(N, ...)"
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
        if loaded.cond_dim is not None and t.shape[-1] != loaded.cond_dim:
            raise ValueError(f"{name} has last dimension {t.shape[-1]}; the model takes {loaded.cond_dim}")
        rows = t.shape[0]
        if rows != 1 and rows != self.num:
            raise ValueError(f"{name} has {rows} rows; expected 1 (shared by all samples) or one per sample "
                             f"({self.num})")
        return t.to(device=loaded.device, dtype=loaded.dtype).contiguous(), rows == 1

    # ------------------------------------------------------------------ inputs
    @property
    def guided(self) -> bool:
        if self.guidance == 1.0:
            return False
        return not (self.loaded.conditioning == "class" and self.classes is None)

    def inputs(self, indices) -> tuple[object, dict]:
        """(cond, sampler keyword arguments for guidance) of the samples with these global indices."""
        indices = np.asarray(indices, dtype=np.int64)
        b = len(indices)
        loaded = self.loaded
        if loaded.conditioning == "class":
            if self.classes is None:
                return loaded.null_cond(b), {}
            cond = loaded.to_cond(self.labels(indices).tolist())
            return cond, ({"uncond_scale": self.guidance, "uncond_cond": loaded.null_cond(b)} if self.guided else {})
        if loaded.conditioning == "none":
            return None, {}
        cond = None if self.cond is None else _take(self.cond, self.shared, indices)
        if not self.guided:
            return cond, {}
        uncond = (_take(self.uncond, self.uncond_shared, indices) if self.uncond is not None
                  else loaded.null_cond(b))
        return cond, {"uncond_scale": self.guidance, "uncond_cond": uncond}

    def batch(self, start: int, stop: int) -> tuple[object, dict]:
        """inputs() of samples start..stop-1."""
        return self.inputs(np.arange(start, stop))

    def labels(self, indices) -> np.ndarray:
        """(n,) int64 class labels of the samples, NO_LABEL (-1) where there is no class."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.classes is None:
            return np.full(len(indices), NO_LABEL, dtype=np.int64)
        return np.asarray(self.classes, dtype=np.int64)[indices % len(self.classes)]

    def sample_metadata(self, indices) -> list[dict]:
        """What each sample was fed, as JSON-able dicts for the per-sample metadata of a run.

        This is the hook a model kind fills: generate.sample_metadata adds the run's own
        fields (index, label, seed, steps, eta, guidance, model) around it, and every output
        format stores the result (npz shards, png shards' metadata.jsonl, webdataset KEY.json).
        A subclass overrides it to add its inputs: a text-conditioned model adds "prompt" and
        "negative_prompt" (None where there is none) per sample.

        Args:
            indices: (n,) global sample indices.

        Returns:
            n dicts: {"class": c} for class models given classes, {} otherwise.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if self.loaded.conditioning == "class" and self.classes is not None:
            return [{"class": int(c)} for c in self.labels(indices)]
        return [{} for _ in indices]

    def identity(self) -> dict:
        """sha256 of the cond and uncond tensors given (empty for class and unconditional models)."""
        out = {}
        for name, t in (("cond", self.cond), ("uncond", self.uncond)):
            if t is not None:
                out[f"{name}_sha256"] = tensor_sha256(t)
        return out

    def sampler(self, steps: int, discretize: Optional[str], eta, **options) -> DDIMSampler:
        """The DDIMSampler of this model's schedule (discretize None: the model's spacing)."""
        merged = {**self.loaded.sampler_options, **options}
        return DDIMSampler(self.loaded.model, steps, discretize or self.loaded.discretize, eta, **merged)


def _take(t: torch.Tensor, shared: bool, indices: np.ndarray) -> torch.Tensor:
    if shared:
        return t.expand(len(indices), *t.shape[1:])
    return t[torch.from_numpy(indices).to(t.device)]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and float32 values."""
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_tensor_file(path) -> torch.Tensor:
    """The one tensor in a .pt/.pth (weights_only), .npy (no pickle) or .safetensors file.

    A file holding a dict of tensors must hold exactly one. Raises ValueError naming the
    file and the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise ValueError(f"{path}: expected a {', '.join(TENSOR_SUFFIXES)} file")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        if suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            value = _safetensors().load_file(str(path))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from None
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1 or len(value) != 1:
            raise ValueError(f"{path} holds {sorted(map(str, value))}; expected a single tensor")
        value = tensors[0]
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise ValueError(f"{path} does not hold a floating-point tensor")
    return value


def _safetensors():
    # safetensors comes with diffusers; a .safetensors cond needs it, nothing else does.
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError as exc:
        raise ImportError("reading .safetensors needs the safetensors package (pip install safetensors)") from exc
