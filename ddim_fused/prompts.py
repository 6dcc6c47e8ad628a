"""Text prompts as a run's model inputs: prompt files, and the encoder hidden states of each sample.

Sample i of a run gets prompt i % P (as classes cycle), and under guidance its negative
prompt (or the empty prompt) as the unconditional input. Each distinct text is tokenized
once when the run is set up (a prompt over the tokenizer's limit warns once, naming it)
and encoded once, when a batch first needs it; encodings are kept up to a memory budget.
"""
from __future__ import annotations

import collections
import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .conditioning import Conditioning
from .models import LoadedModel

PROMPT_SUFFIXES = (".txt", ".jsonl")
# Encoder hidden states kept for reuse (SD's (77, 768) fp16 rows are 118 KB: about 9,000 prompts).
_CACHE_BYTES = 1 << 30


def read_prompt_file(path) -> list[tuple[str, Optional[str]]]:
    """The (prompt, negative prompt or None) pairs of a prompt file, in order.

    A .txt file holds one prompt per line; a .jsonl file one JSON object per line with a
    string "prompt" and an optional string (or null) "negative_prompt". Blank lines are
    skipped; trailing line breaks are not part of a prompt.

    Raises:
        ValueError: the file cannot be read, is not UTF-8, holds no prompt, or a line is
            not what the format asks; the message names the file and the line.
    """
    path = Path(path)
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise ValueError(f"{path}: expected a .txt (one prompt per line) or .jsonl file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    out = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark is not part of the prompt
        if not line.strip():
            continue
        out.append(_json_prompt(path, number, line) if jsonl else (line, None))
    if not out:
        raise ValueError(f"{path} holds no prompt")
    return out


def _json_prompt(path: Path, number: int, line: str) -> tuple[str, Optional[str]]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{path}:{number}: expected an object with a string \"prompt\"")
    negative = record.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{path}:{number}: \"negative_prompt\" must be a string or null")
    return record["prompt"], negative


class PromptConditioning(Conditioning):
    """The inputs of a text-conditioned model (a Stable Diffusion pipeline) per global sample index.

    Args:
        loaded: a LoadedModel with conditioning "prompt" (its `pipeline` tokenizes and encodes).
        prompts: P prompts; sample i gets prompts[i % P].
        negative_prompts: P negative prompts (None entries: the empty prompt), or None.
        guidance: classifier-free guidance scale; 1 is none.
        num: number of samples of the run.

    Raises:
        ValueError: no prompt, a prompt that is not a string, or P negative prompts
            for another number of prompts; the message names the argument.
    """

    def __init__(self, loaded: LoadedModel, prompts: Sequence[str], negative_prompts=None, *,
                 guidance: float = 7.5, num: Optional[int] = None):
        if loaded.conditioning != "prompt":
            raise ValueError("prompts apply to text-conditioned models (Stable Diffusion pipelines)")
        self.loaded, self.guidance, self.num = loaded, float(guidance), num
        self.classes, self.cond, self.uncond = None, None, None
        self.prompts = _texts("prompts", prompts)
        if not self.prompts:
            raise ValueError("prompts must hold at least one prompt")
        if negative_prompts is None:
            negative_prompts = [None] * len(self.prompts)
        negatives = list(negative_prompts)
        if len(negatives) != len(self.prompts):
            raise ValueError(f"negative_prompts holds {len(negatives)} entries for {len(self.prompts)} prompts")
        self.negative_prompts = [None if n is None else _texts("negative_prompts", [n])[0] for n in negatives]
        texts = list(dict.fromkeys(self.prompts + ([n or "" for n in self.negative_prompts] if self.guided else [])))
        ids, truncated = loaded.pipeline.tokenize(texts)
        limit = loaded.pipeline.max_tokens
        for text, cut in zip(texts, truncated):
            if cut:
                warnings.warn(f"prompt {_short(text)!r} is longer than the text encoder's {limit} tokens: truncated "
                              f"to its first {limit - 2}", stacklevel=2)
        self._ids = dict(zip(texts, ids))
        row_bytes = limit * loaded.pipeline.text_dim * torch.finfo(loaded.dtype).bits // 8
        self._cache_rows = max(1, _CACHE_BYTES // row_bytes)
        self._cache: collections.OrderedDict = collections.OrderedDict()

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    def inputs(self, indices) -> tuple[torch.Tensor, dict]:
        """(cond (B, L, D), {"uncond_scale", "uncond_cond" (B, L, D)} under guidance) of these samples."""
        rows = np.asarray(indices, dtype=np.int64) % len(self.prompts)
        cond = self._embed([self.prompts[r] for r in rows])
        if not self.guided:
            return cond, {}
        uncond = self._embed([self.negative_prompts[r] or "" for r in rows])
        return cond, {"uncond_scale": self.guidance, "uncond_cond": uncond}

    def labels(self, indices) -> np.ndarray:
        """(n,) int64: the index of each sample's prompt in the prompt list."""
        return np.asarray(indices, dtype=np.int64) % len(self.prompts)

    def prompt(self, index: int) -> tuple[str, Optional[str]]:
        """(prompt, negative prompt or None) of global sample `index`."""
        row = index % len(self.prompts)
        return self.prompts[row], self.negative_prompts[row]

    def sample_metadata(self, indices) -> list[dict]:
        """{"prompt", "negative_prompt" (None where there is none)} of each sample (see Conditioning)."""
        return [dict(zip(("prompt", "negative_prompt"), self.prompt(int(i)))) for i in indices]

    def identity(self) -> dict:
        """sha256 of the prompt list with its negative prompts, and their number."""
        body = json.dumps([self.prompts, self.negative_prompts], ensure_ascii=False).encode()
        return {"prompts_sha256": hashlib.sha256(body).hexdigest(), "num_prompts": len(self.prompts)}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Encoder hidden states (n, L, D) of texts: distinct ones not kept yet are encoded in one call."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            encoded = self.loaded.pipeline.encode(torch.stack([self._ids[t] for t in missing]))
            for text, row in zip(missing, encoded):
                self._cache[text] = row
        for text in dict.fromkeys(texts):
            self._cache.move_to_end(text)
        out = torch.stack([self._cache[t] for t in texts])
        while len(self._cache) > self._cache_rows:
            self._cache.popitem(last=False)
        return out


def _texts(name: str, values) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, got one string")
    out = list(values)
    for value in out:
        if not isinstance(value, str):
            raise TypeError(f"{name} must hold strings, got {type(value).__name__}")
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
