"""Sharded, resumable, reproducible bulk generation.

Sample i of a run is keyed by (run seed, i) alone: its class label is classes[i % len(classes)]
(or row i of a cond tensor, see ddim_fused.conditioning), its initial latent
(ddim_fused.initial_noise(shape, seed, sample_offset=i)) and step noise come from the
sampler's Philox stream with global index i. So batch size, shard size, process count and
resume point never change what sample i is.

Sampling runs under torch.inference_mode. Two threads work behind it, each a bounded queue
long: one finishes each sampled batch (a pipeline's VAE decode, the finiteness check, the
copy to the host) while the next batch is sampled, and one writes each finished shard.

Layout of an output directory:
    run.json                 the run's identity (config + model), written before any shard
    shard-000000.npz ...     samples, indices, labels, seeds, metadata, config_hash, checksum (samples
                             are float32 (n, *shape), or uint8 (n, H, W, 3) pixels of decoded images);
                             or png folders / webdataset tars (config.format, see ddim_fused.shards)
    manifest.json            config, model, versions, shard list with sha256; written last
    preview.png              optional grid of the first samples, written after the manifest
    .generate.lock           held (flock) by the process that runs the folder
Every file is written through ddim_fused.atomic (exclusive temporary file, fsync, rename),
so a killed run leaves either a whole file or none; a resume re-validates each shard
(embedded checksum, indices, config hash, finite values) and regenerates what fails.
Nothing generated is replaced unless it is damaged or overwrite_mismatched says so: a folder
whose run.json, manifest or intact shards show another configuration is refused.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import queue
import re
import socket
import stat
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from . import __version__
# OutputPathError and NonFiniteError are part of this module's API: run_generation raises them.
from .atomic import TEMP_SUFFIX, OutputPathError, atomic_write, check_output_dir, remove_temp_tree, temp_target
from .conditioning import Conditioning
from .digits.images import default_scale, is_image_batch, save_grid, to_uint8
# ShardError and ForeignShardError are part of this module's API: read_shard raises them.
from .shards import (FORMAT, FORMATS, ForeignShardError, Shard, ShardError,  # noqa: F401
                     format_of, located_inside, to_pixels)
from .finite import NonFiniteError, check_finite, nonfinite_hint  # noqa: F401
# file_sha256 is part of this module's API (manifests list each shard's).
from .models import LoadedModel, file_sha256  # noqa: F401

try:
    import fcntl
except ImportError:  # Windows: no flock, runs into one folder are not locked
    fcntl = None

MANIFEST, RUN_FILE, PREVIEW, LOCK_FILE = "manifest.json", "run.json", "preview.png", ".generate.lock"
TMP_MARK = TEMP_SUFFIX  # every temporary name ends with it
# The files a run writes; only temporary files of these are ever removed from a folder.
_RUN_FILES = re.compile(r"manifest\.json|run\.json|preview\.png")  # and the shards of every format
# Temporary names of earlier versions (".shard-000003.npz.tmp.<pid>", ".preview.png.tmp.<pid>.png").
_LEGACY_TEMP = re.compile(r"\.(?P<target>.+)\.tmp\.\d+(\.png)?")
# Settings that change no sample (philox keys by global index), so a resume may change them.
_FREE_FIELDS = ("batch_size", "device", "backend")
# Finished shards waiting for the writer thread: bounds the memory a fast sampler holds.
_WRITE_QUEUE_DEPTH = 2
# Sampled batches waiting to be decoded and checked (_BatchFinisher), for the same reason.
_FINISH_DEPTH = 2


class RunMismatchError(ValueError):
    """An output directory holds a run this one cannot resume: another configuration, or a damaged run.json."""


class RunLockedError(RuntimeError):
    """Another process is generating into the same output directory."""


class RankFailedError(RuntimeError):
    """Another process of a torchrun group failed (it reports its own error)."""


class CorruptRunError(ValueError):
    """A finished run whose manifest, run.json or shards do not verify."""


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
    classes: Optional[tuple[int, ...]] = tuple(range(10))  # None: the model takes no class
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    # The whole loop replayed as one CUDA graph (DDIMSampler.sample(cuda_graph=True)). A
    # captured model is not bound to run the kernels an uncaptured one runs, so it is part of
    # the run's identity; when off it is left out, so runs made before it existed still resume.
    cuda_graph: bool = False
    # The output format (see ddim_fused.shards). Left out of the identity when "npz", so runs
    # made before formats existed still resume.
    format: str = "npz"

    def __post_init__(self):
        for name in ("num", "shard_size", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.classes is not None and not self.classes:
            raise ValueError("classes must hold at least one class (or be None for no class)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    def identity(self) -> dict:
        """The fields that define the samples (hashed into run.json's config hash)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in _FREE_FIELDS and not (k == "cuda_graph" and not v) and not (k == "format" and v == "npz")}

    @property
    def n_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num)

    @property
    def shard_format(self):
        """The ddim_fused.shards.ShardFormat of this run's format."""
        return FORMAT[self.format]


def config_hash(identity: dict) -> str:
    """16 hex digits identifying a run: sha256 of its identity as canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(config: GenerateConfig, model_info: dict) -> tuple[dict, str]:
    """(identity, config hash) of a run: what run.json records and every shard carries."""
    identity = {"config": config.identity(), "model": model_info}
    return identity, config_hash(identity)


def shard_name(k: int) -> str:
    """File name of shard k: shard-000000.npz, shard-000001.npz, ..."""
    return FORMAT["npz"].shard_name(k)


def sample_metadata(config: GenerateConfig, model_info: dict, inputs: Conditioning, indices) -> list[dict]:
    """The per-sample metadata records of a run, as every output format stores them.

    Each record holds the sample's index, label (see Conditioning.labels), the run's seed,
    what the model kind adds through `inputs.sample_metadata` (a class, or a prompt and
    negative prompt), then steps, eta, guidance and the model's identity (model_info).
    A model kind adds its per-sample inputs by overriding Conditioning.sample_metadata.

    Args:
        indices: (n,) global sample indices.

    Returns:
        n JSON-able dicts.
    """
    indices = np.asarray(indices, dtype=np.int64)
    shared = {"steps": config.steps, "eta": config.eta, "guidance": config.guidance, "model": model_info}
    return [{"index": int(i), "label": int(label), "seed": config.seed, **extra, **shared}
            for i, label, extra in zip(indices, inputs.labels(indices), inputs.sample_metadata(indices))]


def write_shard(path: Path, samples: np.ndarray, indices: np.ndarray, labels: np.ndarray, seed: int, chash: str,
                metadata: Optional[list[dict]] = None):
    """Write one npz shard atomically.

    Args:
        samples: (n, *shape) float32 samples, or uint8 pixels.
        indices, labels: (n,) int64.
        metadata: n JSON-able dicts (see sample_metadata), stored as one JSON string each.
    """
    seeds = np.full(len(indices), seed, dtype=np.int64)
    FORMAT["npz"].write(Path(path), Shard(samples, indices, labels, seeds, metadata, chash))


def read_shard(path: Path, expected: Optional[tuple[int, int]] = None, chash: Optional[str] = None) -> dict:
    """Load and verify an npz shard (any format's: see ddim_fused.shards.ShardFormat.read).

    Args:
        path: the .npz file.
        expected: (start, stop): the global indices it must hold, in order.
        chash: the config hash it must carry.

    Returns:
        dict: samples (n, *shape), indices (n,), labels (n,), seeds (n,), metadata (n
        dicts; index, label and seed for shards written before it existed), config_hash
        and sha256 (str).

    Raises:
        ShardError: the file cannot be read, whatever the reason (a flipped bit can make the
            zip or npy reader raise nearly anything), or it fails a check; the message starts
            with the file name. ForeignShardError (a ShardError) when only the config hash
            differs.
    """
    return dict(vars(FORMAT["npz"].read_path(Path(path), expected, chash)))


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """Hold the exclusive lock of a run folder for the `with` block.

    flock on out_dir/.generate.lock, non-blocking; the OS releases it when the process
    ends, however it ends, so a killed run never leaves the folder locked.

    Raises:
        RunLockedError: another process holds it.
        OutputPathError: the lock file is a symlink or not a regular file (it is never followed).
        OSError: the lock file cannot be opened.
    """
    if fcntl is None:
        warnings.warn("no flock on this platform: concurrent runs into one folder are not detected", stacklevel=3)
        yield
        return
    path = Path(out_dir) / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if path.is_symlink() or exc.errno in (errno.ELOOP, errno.EISDIR):
            raise _foreign_lock(path) from None
        raise OSError(exc.errno, f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device planted at the name
            raise _foreign_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise RunLockedError(
                f"{out_dir} is in use by another generate run{f' ({holder})' if holder else ''}; wait for it to "
                "finish or use another output directory") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"cannot lock {path} ({exc.strerror}): concurrent runs into this folder are not detected",
                          stacklevel=3)
        # Who holds the lock, for the message a second run prints.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _foreign_lock(path: Path) -> OutputPathError:
    kind = "a symlink" if path.is_symlink() else "not a regular file"
    return OutputPathError(f"the lock file {path} is {kind}, which a run never follows or uses; remove it, then "
                           "rerun")


# How the refusals below end: the ways out.
_WAYS_OUT = "use another --out, the same settings to resume, or --overwrite-mismatched to replace it"


def prepare_dir(out_dir: Path, config: GenerateConfig, model_info: dict, *, overwrite: bool = False) -> str:
    """Record this run in out_dir/run.json, or check that the run recorded there is this one.

    Nothing generated is replaced unless it is damaged or `overwrite` says so: a folder
    whose run.json, manifest or (run.json missing) any intact shard shows another
    configuration is refused. With overwrite, run.json is rewritten and the other run's
    manifest and preview removed (its shards are replaced as the run reaches them).
    out_dir must exist (see ddim_fused.atomic.check_output_dir) and be locked by the caller.

    Returns:
        the config hash that every shard of this run carries.

    Raises:
        RunMismatchError: run.json, the manifest or a shard shows another configuration,
            or run.json is damaged (unless overwrite).
        OutputPathError: a folder stands where the run writes a file (manifest.json, a shard).
    """
    identity, chash = run_identity(config, model_info)
    _check_file_names(out_dir, config)
    run_file = out_dir / RUN_FILE
    recorded = os.path.lexists(run_file)
    foreign = None
    if not recorded:
        foreign = _foreign_files(out_dir, chash)
    else:
        try:
            previous = _read_run_file(out_dir)
        except RunMismatchError as exc:
            if not overwrite:
                raise
            foreign = f"a damaged {RUN_FILE} ({exc})"
        else:
            if previous["config_hash"] != chash:
                diff = _differences(previous["identity"], identity) or "values of another type"
                foreign = f"a run with a different configuration ({diff})"
    if foreign is None and _manifest_hash(out_dir) not in (None, chash):
        foreign = f"a {MANIFEST} of another configuration"
    if foreign is not None:
        if not overwrite:
            raise RunMismatchError(f"{out_dir} holds {foreign}; {_WAYS_OUT}")
        warnings.warn(f"{out_dir} holds {foreign}: replacing it (overwrite_mismatched)", stacklevel=3)
        for name in (MANIFEST, PREVIEW):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (out_dir / name).unlink()
    if not recorded or foreign is not None:
        body = json.dumps({"config_hash": chash, "identity": identity}, indent=2).encode()
        atomic_write(run_file, lambda f: f.write(body))
    return chash


def _check_file_names(out_dir: Path, config: GenerateConfig) -> None:
    """Refuse a folder (not a symlink) where the run writes a file: the manifest or a file shard.

    A rename cannot replace a folder with a file, and a folder is not the run's to delete.

    Raises:
        OutputPathError: naming it.
    """
    fmt = config.shard_format
    for entry in os.scandir(out_dir):
        # A png shard is a folder; the other formats' shards are files (a non-empty suffix).
        if entry.is_dir(follow_symlinks=False) and (
                entry.name == MANIFEST or (fmt.suffix and format_of(entry.name) is fmt)):
            raise OutputPathError(f"{Path(out_dir) / entry.name} is a folder where the run writes a file; move it "
                                  "away, then rerun")


def _manifest_hash(out_dir: Path) -> Optional[str]:
    """The config hash a readable manifest.json names, else None (missing or damaged: no evidence)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    chash = manifest.get("config_hash") if isinstance(manifest, dict) else None
    return chash if isinstance(chash, str) else None


def _foreign_files(out_dir: Path, chash: str) -> Optional[str]:
    """What shows, in a folder without run.json, another run than chash's: its manifest, or an
    intact shard of any format that carries another config hash (damaged ones prove nothing).
    None when nothing does."""
    if _manifest_hash(out_dir) not in (None, chash):
        return f"no {RUN_FILE}, and a {MANIFEST} of another configuration"
    for path in sorted(out_dir.iterdir()):
        fmt = format_of(path.name)
        if fmt is None:
            continue
        try:
            shard = fmt.load(located_inside(out_dir, path.name))
        except ShardError:
            continue
        if shard.config_hash != chash:
            return f"no {RUN_FILE}, and {path.name} belongs to another configuration"
    return None


def _read_run_file(out_dir: Path, error=RunMismatchError) -> dict:
    """run.json as a dict with a config_hash that matches its identity: the rule of resume and
    load_samples alike. Else `error` (RunMismatchError, or CorruptRunError for load_samples)."""
    def damaged(why: str) -> Exception:
        ways_out = f"; use another --out, or delete {out_dir} to start over" if error is RunMismatchError else ""
        return error(f"{out_dir} holds a damaged or foreign run: {RUN_FILE} {why}{ways_out}")

    try:
        run = json.loads((out_dir / RUN_FILE).read_bytes())
    except OSError as exc:
        raise damaged(f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise damaged(f"is not valid JSON ({exc})") from None
    if not isinstance(run, dict) or not isinstance(run.get("config_hash"), str) \
            or not isinstance(run.get("identity"), dict):
        raise damaged("does not hold a config_hash and an identity")
    if config_hash(run["identity"]) != run["config_hash"]:
        raise damaged("has a config_hash that does not match its identity (edited by hand?)")
    return run


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{k}.")
            if inner:
                parts.append(inner)
        # Compared as JSON, the form the hash sees: a tuple equals its list, 1 differs from 1.0.
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            parts.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(parts)


def remove_stale_temps(out_dir: Path) -> int:
    """Delete the temporary files of run files that a killed run left behind; returns how many.

    Only regular files named exactly like this module's temporary files are touched:
    '.<run file>.<8 hex digits>.tmp' (and the '.<run file>.tmp.<pid>' of earlier versions),
    where <run file> is a shard, run.json, manifest.json or preview.png; and folders named
    '.shard-<k>.<8 hex digits>.tmp', the temporary folders of png shards (with what they hold).
    """
    removed = 0
    for p in out_dir.iterdir():
        match = _LEGACY_TEMP.fullmatch(p.name)
        target = temp_target(p.name) or (match["target"] if match else None)
        if target is None or not (_RUN_FILES.fullmatch(target) or format_of(target)):
            continue
        with contextlib.suppress(FileNotFoundError):
            mode = p.lstat().st_mode
            if stat.S_ISREG(mode):
                p.unlink()
                removed += 1
            elif stat.S_ISDIR(mode) and temp_target(p.name) and format_of(target) is FORMAT["png"]:
                remove_temp_tree(p)
                removed += 1
    return removed


def pending_shards(out_dir: Path, config: GenerateConfig, chash: str, shards, *, overwrite: bool = False) -> list[int]:
    """The shards among `shards` that are missing or fail verification (with a warning).

    A shard fails when ShardFormat.read refuses it, which load_samples applies too: damaged,
    wrong indices, non-finite, or leading out of out_dir (a symlink: replaced by a real file).

    Raises:
        RunMismatchError: an intact shard of another configuration (unless overwrite).
    """
    fmt, todo, foreign = config.shard_format, [], []
    for k in shards:
        if not os.path.lexists(out_dir / fmt.shard_name(k)):
            todo.append(k)
            continue
        try:
            fmt.read(out_dir, k, config.shard_range(k), chash)
        except ForeignShardError as exc:
            if not overwrite:
                raise RunMismatchError(f"{out_dir}: {exc}; {_WAYS_OUT}") from None
            foreign.append(fmt.shard_name(k))
            todo.append(k)
        except ShardError as exc:
            warnings.warn(f"regenerating {exc}", stacklevel=2)
            todo.append(k)
    if foreign:
        warnings.warn(f"replacing {len(foreign)} shard(s) of another configuration ({', '.join(foreign[:3])}"
                      f"{', ...' if len(foreign) > 3 else ''}; overwrite_mismatched)", stacklevel=2)
    return todo


def generate_shards(
    out_dir: Path,
    config: GenerateConfig,
    model,
    chash: str,
    shards,
    *,
    on_batch: Optional[Callable[[int], None]] = None,
    model_info: Optional[dict] = None,
) -> int:
    """Generate and write the given shards; returns the number of samples written.

    Args:
        model: a Conditioning (a loaded model with its run inputs), or a digits-like
            protocol model (image_shape, null_cond, labels as cond) fed config.classes
            and config.guidance.
        model_info: the model's identity, stored in each sample's metadata.

    Raises:
        ValueError: the format stores images and the model's samples are not (check_format).
        NonFiniteError: a batch holds NaN or Inf (its shard is not written).
        OSError: a shard write failed; shards finished before it are kept.
    """
    inputs = model if isinstance(model, Conditioning) else _class_inputs(model, config)
    check_format(config.format, inputs.loaded)
    sampler = inputs.sampler(config.steps, config.discretize, config.eta, backend=config.backend, seed=config.seed)
    fmt = config.shard_format
    batches = []  # (b0, b1) of every batch, shard by shard: a batch never spans two shards
    for k in shards:
        start, stop = config.shard_range(k)
        batches += [(b0, min(b0 + config.batch_size, stop)) for b0 in range(start, stop, config.batch_size)]
    with _ShardWriter(out_dir, fmt) as writer, torch.inference_mode(), \
            contextlib.closing(finished_batches(inputs, sampler, config, batches)) as finished:
        parts = []
        for b0, samples in finished:
            writer.check()
            parts.append(samples)
            if on_batch is not None:
                on_batch(len(samples))
            k = b0 // config.shard_size
            start, stop = config.shard_range(k)
            if b0 + len(samples) == stop:  # the shard's last batch
                indices = np.arange(start, stop, dtype=np.int64)
                writer.put(fmt.shard_name(k), Shard(
                    np.concatenate(parts), indices, inputs.labels(indices),
                    np.full(len(indices), config.seed, np.int64),
                    sample_metadata(config, model_info or {}, inputs, indices), chash))
                parts = []
    return writer.written


def finished_batches(inputs: Conditioning, sampler, config: GenerateConfig, batches) -> Iterator[tuple]:
    """Sample and finish batches in order, each batch's finishing overlapping the next ones' sampling.

    `finish_batch` runs on a thread (`_BatchFinisher`) while this generator samples up to
    _FINISH_DEPTH batches ahead; close it (contextlib.closing) to stop that thread early.

    Args:
        batches: (b0, b1) ranges of sample indices, in the order to yield them.

    Yields:
        (b0, samples): `finish_batch`'s (b1 - b0, ...) array of each range.

    Raises:
        NonFiniteError: a batch holds NaN or Inf (raised in order: every batch before it was yielded).
    """
    pending: collections.deque = collections.deque()  # (b0, future), oldest first
    captured_sizes: set[int] = set()

    def oldest() -> tuple:
        b0, future = pending.popleft()
        return b0, future.result()

    with _BatchFinisher(inputs, config) as finisher:
        for b0, b1 in batches:
            # A new batch size under cuda_graph may capture a graph, and CUDA refuses other
            # threads' calls during a capture: the finisher goes idle first.
            idle = config.cuda_graph and b1 - b0 not in captured_sizes
            while len(pending) > (0 if idle else _FINISH_DEPTH):
                yield oldest()
            captured_sizes.add(b1 - b0)
            pending.append((b0, finisher.submit(sample_latents(inputs, sampler, config, b0, b1), b0)))
        while pending:
            yield oldest()


def check_format(output_format: str, loaded: LoadedModel) -> None:
    """Refuse an output format that stores images (png, webdataset) for a model whose samples are not.

    Raises:
        ValueError: naming the format and the samples' shape.
    """
    shape = (1,) + tuple(loaded.sample_shape)
    if FORMAT[output_format].images_only and not (loaded.decodes or is_image_batch(shape)):
        raise ValueError(f"format {output_format!r} stores images as PNG files, and this model's samples have shape "
                         f"{shape[1:]} (latents, not grey or RGB images): use format 'npz'")


def sample_latents(inputs: Conditioning, sampler, config: GenerateConfig, b0: int, b1: int) -> torch.Tensor:
    """Samples b0..b1-1 of a run as the sampler returns them, before decoding.

    Args:
        inputs: the run's Conditioning; sampler: its DDIMSampler (`inputs.sampler(...)`).
        config: the run (device, dtype, cuda_graph).

    Returns:
        (b1 - b0, *shape) samples (latents for a pipeline with a VAE) on config.device in config.dtype.
    """
    cond, extra = inputs.batch(b0, b1)
    return sampler.sample((b1 - b0,) + tuple(inputs.loaded.sample_shape), cond, sample_offset=b0,
                          device=torch.device(config.device), dtype=getattr(torch, config.dtype),
                          cuda_graph=config.cuda_graph, **extra)


def finish_batch(inputs: Conditioning, config: GenerateConfig, x: torch.Tensor, b0: int) -> np.ndarray:
    """A sampled batch as stored: decoded by the pipeline's VAE if it has one, checked, on the host.

    Args:
        x: (B, *shape) samples of `sample_latents`, the first being sample b0.
        config: the run (guidance and dtype, for the error message).

    Returns:
        (B, *shape) float32 samples, or (B, H, W, 3) uint8 pixels of decoded images.

    Raises:
        NonFiniteError: a sample (or decoded image) holds NaN or Inf.
    """
    if inputs.loaded.decodes:
        x = inputs.loaded.pipeline.decode(x)
    hint = nonfinite_hint(config.guidance, config.dtype, "its weights", "no shard holding it was written")
    check_finite(x, "generated samples", first_index=b0, hint=hint)
    return to_uint8(x) if inputs.loaded.decodes else x.float().cpu().numpy()


def sample_batch(inputs: Conditioning, sampler, config: GenerateConfig, b0: int, b1: int) -> np.ndarray:
    """Samples b0..b1-1 of a run as stored: `finish_batch` of `sample_latents`, on this thread.

    Returns:
        (b1 - b0, *shape) float32 samples, or (b1 - b0, H, W, 3) uint8 pixels of decoded images.

    Raises:
        NonFiniteError: a sample (or decoded image) holds NaN or Inf.
    """
    return finish_batch(inputs, config, sample_latents(inputs, sampler, config, b0, b1), b0)


def _class_inputs(model, config: GenerateConfig) -> Conditioning:
    """The inputs of a digits-like protocol model: labels as cond, null_cond for guidance."""
    loaded = LoadedModel.from_protocol(model, {}, conditioning="class", device=config.device)
    return Conditioning(loaded, classes=config.classes, guidance=config.guidance, num=config.num)


class _BatchFinisher:
    """Finishes sampled batches (VAE decode, finiteness check, copy to the host) on a thread.

    So the next batch is sampled while the last one is decoded. On CUDA the thread works on
    its own stream, which waits for the sampling stream's work on each batch (an event), so
    the decode overlaps the next batch's loop on the GPU too. Leaving the `with` block drops
    what has not started and waits for the rest.
    """

    def __init__(self, inputs: Conditioning, config: GenerateConfig):
        self.inputs, self.config = inputs, config
        device = torch.device(config.device)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # None: finish on the CPU
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ddim-fused-finisher")

    def __enter__(self) -> "_BatchFinisher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, x: torch.Tensor, b0: int) -> concurrent.futures.Future:
        """Queue x (B, *shape), sample b0 first; the future gives `finish_batch`'s array."""
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(x.device))
            x.record_stream(self._stream)  # x's memory is not reused before the finisher's stream is done
        return self._pool.submit(self._finish, x, b0, ready)

    def _finish(self, x: torch.Tensor, b0: int, ready) -> np.ndarray:
        # inference_mode and the current stream are per thread.
        with torch.inference_mode():
            if ready is None:
                return finish_batch(self.inputs, self.config, x, b0)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                return finish_batch(self.inputs, self.config, x, b0)


class _ShardWriter:
    """Writes finished shards on a thread, so the next shard is sampled meanwhile.

    At most _WRITE_QUEUE_DEPTH shards wait. The first failed write stops the writer (the
    shards queued after it are dropped, so no shard after a failure is written) and the
    sampling loop raises that error at its next check. Leaving the `with` block writes
    what is queued (unless a write failed) and waits for it.
    """

    def __init__(self, out_dir: Path, fmt):
        self.out_dir, self.fmt = Path(out_dir), fmt
        self.written = 0
        self.error: Optional[BaseException] = None
        self._queue: queue.Queue = queue.Queue(maxsize=_WRITE_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="ddim-fused-shard-writer", daemon=True)

    def __enter__(self) -> "_ShardWriter":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self.check()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            name, shard = item
            try:
                self.fmt.write(self.out_dir / name, shard)
                self.written += len(shard.indices)
            except BaseException as exc:  # noqa: BLE001 - handed to the sampling thread
                self.error = exc

    def check(self) -> None:
        """Raise the error of a failed write, if any."""
        if self.error is not None:
            raise self.error

    def put(self, name: str, shard: Shard) -> None:
        """Queue a shard; waits while the queue is full, raising a failed write's error."""
        while True:
            self.check()
            try:
                self._queue.put((name, shard), timeout=0.1)
                return
            except queue.Full:
                continue


def write_manifest(out_dir: Path, config: GenerateConfig, model_info: dict, chash: str) -> dict:
    """Verify every shard and write manifest.json atomically; returns the manifest."""
    fmt, shards = config.shard_format, []
    for k in range(config.n_shards):
        start, stop = config.shard_range(k)
        shard = fmt.read(out_dir, k, (start, stop), chash)
        shards.append({"file": fmt.shard_name(k), "start": start, "count": stop - start, "sha256": shard.sha256})
    manifest = {
        "format": 1,
        "output_format": config.format,
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


def write_preview(out_dir: Path, max_samples: int = 100, ncols: int = 10, output_format: str = "npz") -> bool:
    """Write out_dir/preview.png: the first samples of shard 0 as a PNG grid.

    Returns:
        False (and writes nothing) when the samples are not grey or RGB images, or preview.png
        is a folder (with a warning: it is not the run's to replace).
    """
    target = Path(out_dir) / PREVIEW
    if target.is_dir() and not target.is_symlink():
        warnings.warn(f"{target} is a folder: no preview written", stacklevel=2)
        return False
    first = FORMAT[output_format].read(out_dir, 0).samples[:max_samples]
    try:
        pixels = torch.from_numpy(to_pixels(first) if first.dtype != np.uint8 else first)
    except ValueError:  # latents
        return False
    save_grid(pixels, target, ncols=min(len(first), ncols), scale=default_scale(*pixels.shape[1:3]))
    return True


def load_samples(out_dir) -> dict:
    """All samples of a complete run in any output format, ordered by global index, after verifying the whole run.

    Checks that run.json is whole (its config hash matches its identity, as a resume
    checks), that manifest.json and run.json agree on the config hash, that the shards listed
    are the format's shard-000000..., shard-000001... inside out_dir (no path or symlink
    leaving it: the rule generate applies on resume, ddim_fused.shards.located_inside),
    that each matches its sha256 in the manifest, carries the config hash, holds exactly the
    indices of its range and only finite samples, and that the ranges cover 0..num_samples-1.

    Args:
        out_dir: the run folder.

    Returns:
        dict: samples: (num, *shape) float32 or uint8 pixels (npz: as generated); png and
        webdataset: uint8 (num, H, W) grey or (num, H, W, 3) RGB; indices (num,) int64;
        labels (num,) int64; metadata: num dicts (see sample_metadata; for npz shards
        written before per-sample metadata existed, index, label and seed only);
        output_format: "npz", "png" or "webdataset".

    Raises:
        CorruptRunError: naming the file (and shard) that fails, and why.
    """
    out_dir = Path(out_dir)
    manifest = _read_json_object(out_dir / MANIFEST)
    _read_json_object(out_dir / RUN_FILE)  # missing or not JSON: said as for the manifest
    run = _read_run_file(out_dir, CorruptRunError)
    chash = manifest.get("config_hash")
    if not isinstance(chash, str) or chash != run.get("config_hash"):
        raise CorruptRunError(f"{out_dir}: {MANIFEST} and {RUN_FILE} disagree on the config hash "
                              f"({chash!r} vs {run.get('config_hash')!r}): the files come from different runs")
    entries, num = manifest.get("shards"), manifest.get("num_samples")
    output_format = manifest.get("output_format", "npz")
    if manifest.get("complete") is not True or not isinstance(entries, list) or not _is_int(num) \
            or output_format not in FORMAT:
        raise CorruptRunError(f"{out_dir / MANIFEST} is not the manifest of a complete run")
    fmt = FORMAT[output_format]
    shards, start = [], 0
    for k, entry in enumerate(entries):
        shards.append(_verified_entry(out_dir, fmt, k, entry, start, chash))
        start += entry["count"]
    if start != num:
        raise CorruptRunError(f"{out_dir / MANIFEST}: its shards hold {start} samples, not num_samples = {num}")
    try:
        out = {k: np.concatenate([getattr(s, k) for s in shards]) for k in ("samples", "indices", "labels")}
    except ValueError:
        raise CorruptRunError(f"{out_dir}: its shards hold samples of different shapes") from None
    return {**out, "metadata": [record for s in shards for record in s.metadata], "output_format": output_format}


def _verified_entry(out_dir: Path, fmt, k: int, entry, start: int, chash: str) -> Shard:
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
            and _is_int(entry.get("start")) and _is_int(entry.get("count")) and entry["count"] > 0):
        raise CorruptRunError(f"{out_dir / MANIFEST}: shard entry {k} is malformed")
    name = entry["file"]
    if name != fmt.shard_name(k) or entry["start"] != start:
        raise CorruptRunError(f"{out_dir / MANIFEST}: shard {k} is listed as {name!r} from index {entry['start']}, "
                              f"expected {fmt.shard_name(k)!r} from index {start}")
    try:
        shard = fmt.load(located_inside(out_dir, name))
        if shard.sha256 != entry["sha256"]:
            raise CorruptRunError(f"{out_dir / name}: its sha256 differs from the manifest's (modified or replaced)")
        return fmt.verify(shard, name, (start, start + entry["count"]), chash)
    except ShardError as exc:
        raise CorruptRunError(f"{out_dir}: {exc}") from None


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CorruptRunError(f"{path} is missing: not a finished run") from None
    except OSError as exc:
        raise CorruptRunError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CorruptRunError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptRunError(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _versions() -> dict:
    versions = {"ddim_fused": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    try:
        import triton  # noqa: PLC0415 - optional on platforms without it

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
    preview: bool = False,
    overwrite_mismatched: bool = False,
) -> dict:
    """Generate a whole run into out_dir, resuming what is there; one process or a torchrun group.

    Rank 0 creates out_dir, takes its lock (held until the run ends, so a second run into
    the same folder fails at once), checks or writes run.json and removes temporary files
    a killed run left. Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo, on
    CPU and CUDA alike), takes shards k with k % world_size == rank, and rank 0 writes the
    manifest once every rank has finished. A rank that fails makes every rank raise, after
    the others have written their shards, so a resume only redoes what is missing.

    Args:
        out_dir: output directory (str or Path; created if needed; an empty string is refused).
        config: the run.
        model_factory: builds, on a device, a Conditioning (a loaded model with its inputs)
            or a digits-like protocol model (called once per process).
        model_info: JSON-able identity of the model (name, weights sha256).
        progress: show a progress bar (rank 0).
        preview: also write preview.png, a grid of the first 100 samples (grey or RGB images only).
        overwrite_mismatched: replace what another configuration left in out_dir (its
            run.json, manifest and shards, with a warning) instead of refusing the folder.

    Returns:
        summary dict: samples_written (this invocation, all ranks), seconds, samples_per_s,
        shards_skipped, rank, world_size, manifest (rank 0; None elsewhere).

    Raises:
        OutputPathError: out_dir is empty, a file, or cannot be created or written.
        RunLockedError: another process is generating into out_dir.
        RunMismatchError: out_dir holds another run (its run.json, manifest or shards say so),
            or a damaged run.json; unless overwrite_mismatched.
        ValueError: config.format stores images and the model's samples are not (check_format).
        NonFiniteError: a sample came out NaN or Inf (nothing non-finite is written).
        OSError: a write failed (a full disk); finished shards are kept.
        RankFailedError: (torchrun) another rank failed; it reports why.
    """
    if out_dir is None or not str(out_dir).strip():
        raise OutputPathError("output directory must name a folder, got an empty path")
    out_dir = Path(out_dir)
    rank, world, device = _join_group(config.device)
    start_time = time.perf_counter()
    with contextlib.ExitStack() as held:
        held.callback(_leave_group, world)
        setup_error: Optional[BaseException] = None
        if rank == 0:
            try:
                check_output_dir(out_dir, "output directory")
                held.enter_context(run_lock(out_dir))
                prepare_dir(out_dir, config, model_info, overwrite=overwrite_mismatched)
                remove_stale_temps(out_dir)
            except BaseException as exc:  # reported after the group agrees, so no rank hangs
                setup_error = exc
        # Also the barrier: no rank reads shards before rank 0 has settled the folder.
        setup_failed, _ = _gather_status(world, setup_error is not None, 0)
        if setup_error is not None:
            raise setup_error
        if setup_failed:
            raise RankFailedError(f"rank 0 could not prepare {out_dir} (see its error)")
        chash = run_identity(config, model_info)[1]
        error: Optional[BaseException] = None
        written = skipped = 0
        try:
            mine = list(range(rank, config.n_shards, world))
            todo = pending_shards(out_dir, config, chash, mine, overwrite=overwrite_mismatched)
            skipped = len(mine) - len(todo)
            model = model_factory(device)
            run_config = dataclasses.replace(config, device=str(device))
            bar = _progress_bar(sum(config.shard_range(k)[1] - config.shard_range(k)[0] for k in todo),
                                enabled=progress and rank == 0, world=world)
            written = generate_shards(out_dir, run_config, model, chash, todo, on_batch=bar.update,
                                      model_info=model_info)
            bar.close()
        except BaseException as exc:  # reported after the group agrees, so no rank hangs
            error = exc
        failed_ranks, written_all = _gather_status(world, error is not None, written)
        manifest = None
        if failed_ranks == 0 and rank == 0:
            manifest = write_manifest(out_dir, config, model_info, chash)
            if preview:
                write_preview(out_dir, output_format=config.format)
        if error is not None:
            raise error
        if failed_ranks:
            raise RankFailedError(f"{failed_ranks} of {world} ranks failed (see their errors); finished shards are "
                                  "kept, rerun to resume")
    seconds = time.perf_counter() - start_time
    return {"samples_written": written_all, "seconds": seconds, "samples_per_s": written_all / max(seconds, 1e-9),
            "shards_skipped": skipped, "rank": rank, "world_size": world, "manifest": manifest}


def _join_group(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # More processes on a node than GPUs share the GPUs round-robin.
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            # The ranks only exchange two integers (a barrier and `_gather_status`): gloo on
            # the CPU serves every layout, where NCCL refuses two ranks on one GPU.
            dist.init_process_group("gloo")
    return rank, world, dev


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()


def _gather_status(world: int, failed: bool, written: int) -> tuple[int, int]:
    if world == 1:
        return int(failed), written
    import torch.distributed as dist  # noqa: PLC0415

    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # a group the caller made may be NCCL
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
