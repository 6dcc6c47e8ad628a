"""Sharded, resumable, reproducible bulk generation.

Sample i of a run is keyed by (run seed, i) alone: its class label is classes[i % len(classes)],
its initial latent and step noise come from the sampler's Philox stream with global index i.
So batch size, shard size, process count and resume point never change what sample i is.

Layout of an output directory:
    run.json                 the run's identity (config + model), written before any shard
    shard-000000.npz ...     samples, indices, labels, seeds, config_hash, checksum
    manifest.json            config, model, versions, shard list with sha256; written last
Every file is written to a temporary name, fsynced and renamed, so a killed run leaves
either a whole file or none; a resume re-validates each shard (embedded checksum, indices,
config hash) and regenerates what fails.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .sampler import DDIMSampler

MANIFEST, RUN_FILE, SHARD_PREFIX, TMP_MARK = "manifest.json", "run.json", "shard-", ".tmp"
# Settings that change no sample (philox keys by global index), so a resume may change them.
_FREE_FIELDS = ("batch_size", "device", "backend")


class RunMismatchError(ValueError):
    """An output directory holds a run with a different configuration."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What to generate. Everything but batch_size, device and backend defines the samples."""

    num: int
    shard_size: int
    batch_size: int = 256
    steps: int = 50
    eta: float | str = 0.0
    discretize: str = "uniform"
    guidance: float = 1.0
    classes: tuple[int, ...] = tuple(range(10))
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"

    def __post_init__(self):
        for name in ("num", "shard_size", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.classes:
            raise ValueError("classes must hold at least one class")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _FREE_FIELDS}

    @property
    def n_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num)


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:06d}.npz"


def atomic_write(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary file, fsync, rename over `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _checksum(samples: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (samples, indices, labels):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_shard(path: Path, samples: np.ndarray, indices: np.ndarray, labels: np.ndarray, seed: int, chash: str):
    arrays = dict(samples=samples, indices=indices, labels=labels, seeds=np.full(len(indices), seed, dtype=np.int64),
                  config_hash=np.array(chash), checksum=np.array(_checksum(samples, indices, labels)))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_shard(path: Path, expected: Optional[tuple[int, int]] = None, chash: Optional[str] = None) -> dict:
    """Load and verify a shard; ValueError says what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shard = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})") from None
    missing = {"samples", "indices", "labels", "seeds", "config_hash", "checksum"} - shard.keys()
    if missing:
        raise ValueError(f"{path.name} lacks {sorted(missing)}")
    if str(shard["checksum"]) != _checksum(shard["samples"], shard["indices"], shard["labels"]):
        raise ValueError(f"{path.name} fails its checksum")
    if chash is not None and str(shard["config_hash"]) != chash:
        raise ValueError(f"{path.name} belongs to another configuration")
    if expected is not None and not np.array_equal(shard["indices"], np.arange(*expected)):
        raise ValueError(f"{path.name} does not hold indices {expected[0]}..{expected[1] - 1}")
    return shard


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_dir(out_dir: Path, config: GenerateConfig, model_info: dict) -> str:
    """Create or re-open out_dir for this run; refuse one that holds a different run.

    Returns:
        the config hash that every shard of this run carries.
    """
    identity = {"config": config.identity(), "model": model_info}
    chash = config_hash(identity)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create output directory {out_dir}: {exc.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OSError(f"output directory {out_dir} is not writable")
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("config_hash") != chash:
            diff = _differences(previous.get("identity", {}), identity)
            raise RunMismatchError(
                f"{out_dir} holds a run with a different configuration ({diff}); use another --out "
                "or the same settings to resume"
            )
    else:
        body = json.dumps({"config_hash": chash, "identity": identity}, indent=2).encode()
        atomic_write(run_file, lambda f: f.write(body))
    return chash


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{k}.")
            if inner:
                parts.append(inner)
        elif a != b and not (isinstance(a, list) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            parts.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(parts)


def remove_stale_temps(out_dir: Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    stale = [p for p in out_dir.iterdir() if p.name.startswith(".") and TMP_MARK in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def pending_shards(out_dir: Path, config: GenerateConfig, chash: str, shards) -> list[int]:
    """The shards among `shards` that are missing or fail verification (with a warning)."""
    todo = []
    for k in shards:
        path = out_dir / shard_name(k)
        if not path.exists():
            todo.append(k)
            continue
        try:
            read_shard(path, config.shard_range(k), chash)
        except ValueError as exc:
            warnings.warn(f"regenerating {exc}", stacklevel=2)
            todo.append(k)
    return todo


def generate_shards(
    out_dir: Path,
    config: GenerateConfig,
    model,
    chash: str,
    shards,
    *,
    on_batch: Optional[Callable[[int], None]] = None,
) -> int:
    """Generate and write the given shards; returns the number of samples written."""
    sampler = DDIMSampler(model, config.steps, config.discretize, config.eta, backend=config.backend, seed=config.seed)
    dtype = getattr(torch, config.dtype)
    device = torch.device(config.device)
    sample_shape = tuple(model.image_shape)
    classes = np.asarray(config.classes, dtype=np.int64)
    guided = config.guidance != 1.0
    written = 0
    for k in shards:
        start, stop = config.shard_range(k)
        parts = []
        for b0 in range(start, stop, config.batch_size):
            b1 = min(b0 + config.batch_size, stop)
            labels = torch.from_numpy(classes[np.arange(b0, b1) % len(classes)]).to(device)
            extra = {"uncond_scale": config.guidance, "uncond_cond": model.null_cond(b1 - b0)} if guided else {}
            x = sampler.sample((b1 - b0,) + sample_shape, labels, sample_offset=b0, device=device, dtype=dtype, **extra)
            parts.append(x.float().cpu().numpy())
            if on_batch is not None:
                on_batch(b1 - b0)
        indices = np.arange(start, stop, dtype=np.int64)
        write_shard(out_dir / shard_name(k), np.concatenate(parts), indices, classes[indices % len(classes)],
                    config.seed, chash)
        written += stop - start
    return written


def write_manifest(out_dir: Path, config: GenerateConfig, model_info: dict, chash: str) -> dict:
    """Verify every shard and write manifest.json atomically; returns the manifest."""
    shards = []
    for k in range(config.n_shards):
        path = out_dir / shard_name(k)
        start, stop = config.shard_range(k)
        read_shard(path, (start, stop), chash)
        shards.append({"file": path.name, "start": start, "count": stop - start, "sha256": file_sha256(path)})
    manifest = {
        "format": 1,
        "complete": True,
        "num_samples": config.num,
        "config": dataclasses.asdict(config),
        "config_hash": chash,
        "model": model_info,
        "versions": _versions(),
        "shards": shards,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    body = json.dumps(manifest, indent=2).encode()
    atomic_write(out_dir / MANIFEST, lambda f: f.write(body))
    return manifest


def load_samples(out_dir: Path) -> dict:
    """All samples of a complete run, ordered by global index: samples, indices, labels."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    shards = [read_shard(Path(out_dir) / s["file"]) for s in manifest["shards"]]
    return {k: np.concatenate([s[k] for s in shards]) for k in ("samples", "indices", "labels")}


def _versions() -> dict:
    from . import __version__  # noqa: PLC0415

    versions = {"ddim_fused": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    try:
        import triton  # noqa: PLC0415

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


def run_generation(
    out_dir,
    config: GenerateConfig,
    model_factory: Callable[[torch.device], object],
    model_info: dict,
    *,
    progress: bool = True,
) -> dict:
    """Generate a whole run into out_dir, resuming what is there; one process or a torchrun group.

    Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA),
    takes shards k with k % world_size == rank, and rank 0 writes the manifest once every
    rank has finished. A rank that fails makes every rank raise, after the others have
    written their shards, so a resume only redoes what is missing.

    Args:
        out_dir: output directory (created if needed).
        config: the run.
        model_factory: builds the eps-model on a device (called once per process).
        model_info: JSON-able identity of the model (name, weights sha256).

    Returns:
        summary dict: samples_written (this invocation, all ranks), seconds, samples_per_s,
        shards_skipped, rank, world_size, manifest (rank 0; None elsewhere).
    """
    out_dir = Path(out_dir)
    rank, world, device = _join_group(config.device)
    start_time = time.perf_counter()
    error: Optional[BaseException] = None
    written = skipped = 0
    try:
        if rank == 0:
            chash = prepare_dir(out_dir, config, model_info)
            remove_stale_temps(out_dir)
        _barrier(world)
        if rank != 0:
            chash = prepare_dir(out_dir, config, model_info)
        mine = list(range(rank, config.n_shards, world))
        todo = pending_shards(out_dir, config, chash, mine)
        skipped = len(mine) - len(todo)
        model = model_factory(device)
        run_config = dataclasses.replace(config, device=str(device))
        bar = _progress_bar(sum(config.shard_range(k)[1] - config.shard_range(k)[0] for k in todo),
                            enabled=progress and rank == 0, world=world)
        written = generate_shards(out_dir, run_config, model, chash, todo, on_batch=bar.update)
        bar.close()
    except BaseException as exc:  # reported after the group agrees, so no rank hangs
        error = exc
    failed_ranks, written_all = _gather_status(world, error is not None, written)
    manifest = None
    if failed_ranks == 0 and rank == 0:
        manifest = write_manifest(out_dir, config, model_info, chash)
    _leave_group(world)
    if error is not None:
        raise error
    if failed_ranks:
        raise RuntimeError(f"{failed_ranks} of {world} ranks failed; finished shards are kept, rerun to resume")
    seconds = time.perf_counter() - start_time
    return {"samples_written": written_all, "seconds": seconds, "samples_per_s": written_all / max(seconds, 1e-9),
            "shards_skipped": skipped, "rank": rank, "world_size": world, "manifest": manifest}


def _join_group(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()


def _gather_status(world: int, failed: bool, written: int) -> tuple[int, int]:
    if world == 1:
        return int(failed), written
    import torch.distributed as dist  # noqa: PLC0415

    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    status = torch.tensor([int(failed), written], dtype=torch.int64, device=backend_device)
    dist.all_reduce(status)
    return int(status[0]), int(status[1])


def _leave_group(world: int) -> None:
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_initialized():
            dist.destroy_process_group()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, world: int):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm  # noqa: PLC0415

    desc = "generate" if world == 1 else f"generate (rank 0 of {world})"
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, smoothing=0.1)
