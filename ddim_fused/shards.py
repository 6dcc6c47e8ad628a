"""The shard files of a generate run, in its three output formats, and the checks they pass.

Shard k holds samples start..stop-1 of a run, with one metadata record per sample (see
ddim_fused.generate.sample_metadata):
    npz         shard-000000.npz: samples, indices, labels, seeds, metadata (one JSON string
                per sample), config_hash and a checksum over them
    png         shard-000000/: one 8-bit PNG per sample, KEY.png, and metadata.jsonl, one
                JSON line per sample: its record plus key, file, png_sha256 and config_hash
    webdataset  shard-000000.tar: KEY.png and KEY.json per sample in index order (the JSON
                is the record plus key, png_sha256 and config_hash), as the webdataset
                library reads them
KEY is the sample's index as 10 digits. png and webdataset shards hold images as 8-bit
pixels (grey (H, W) or RGB (H, W, 3)); npz shards hold float samples (images or latents) or
uint8 pixels as they come. Every shard is written whole or not at all (ddim_fused.atomic;
a png shard is built in a temporary folder and renamed), and `ShardFormat.read` verifies
everything it returns: a shard is the run's when its checksums hold, its config hash is the
run's, it holds exactly its indices, its samples are finite and no part of it leads out of
the run folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .atomic import atomic_write, atomic_write_dir
from .digits.images import to_uint8
from .models import file_sha256

SHARD_PREFIX = "shard-"
FORMATS = ("npz", "png", "webdataset")
PNG_METADATA = "metadata.jsonl"
_NPZ_KEYS = {"samples", "indices", "labels", "seeds", "config_hash", "checksum"}
_RECORD_INTS = ("index", "label", "seed")
_TAR_MTIME = 0  # fixed member times: a regenerated shard is byte for byte the same


class ShardError(ValueError):
    """A shard file that is unreadable or fails verification; the message starts with its name."""


class ForeignShardError(ShardError):
    """A shard that verifies but belongs to another configuration (another run's samples)."""


@dataclasses.dataclass
class Shard:
    """The samples of one shard, verified.

    samples: (n, *shape) float32 or uint8 pixels ((n, H, W) grey or (n, H, W, 3) RGB in png
        and webdataset shards); indices, labels, seeds: (n,) int64; metadata: n dicts;
    config_hash: the run's; sha256: what the manifest lists (the file's, or for a png
    shard its metadata.jsonl's, which holds each PNG's sha256).
    """

    samples: np.ndarray
    indices: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    metadata: list
    config_hash: str
    sha256: str = ""


def sample_key(index: int) -> str:
    """The key of a sample in png and webdataset shards: its index as 10 digits."""
    return f"{int(index):010d}"


def located_inside(out_dir: Path, name: str) -> Path:
    """out_dir/name, where it stays inside out_dir: the one rule of resume and load_samples.

    Raises:
        ShardError: it is a symlink (or leads through one) to a place outside out_dir.
    """
    path = Path(out_dir) / name
    try:
        target, root = path.resolve(), Path(out_dir).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ShardError(f"{name} cannot be resolved ({exc})") from None
    if target.parent != root:
        raise ShardError(f"{name} leads outside {out_dir} (a symlink to {target})")
    return path


def to_pixels(samples: np.ndarray) -> np.ndarray:
    """Samples as 8-bit pixels: (n, H, W) grey or (n, H, W, 3) RGB uint8.

    Args:
        samples: (n, 1 or 3, H, W) floats in [-1, 1], or uint8 (n, H, W, 3) pixels.

    Raises:
        ValueError: samples that are not grey or RGB images (latents).
    """
    if samples.dtype == np.uint8 and samples.ndim == 4 and samples.shape[3] == 3:
        return samples
    if samples.dtype != np.uint8 and samples.ndim == 4 and samples.shape[1] in (1, 3):
        return to_uint8(torch.from_numpy(samples))
    raise ValueError(f"png and webdataset shards hold grey or RGB images; these samples have shape "
                     f"{tuple(samples.shape[1:])} ({samples.dtype}): keep them in npz shards")


@dataclasses.dataclass(frozen=True)
class ShardFormat:
    """One output format: its shard names, writer and verifying reader."""

    name: str
    suffix: str
    images_only: bool
    _write: Callable
    _read: Callable

    def shard_name(self, k: int) -> str:
        """shard-000000.npz, shard-000000 (a folder) or shard-000000.tar for k = 0."""
        return f"{SHARD_PREFIX}{k:06d}{self.suffix}"

    def write(self, path: Path, shard: Shard) -> None:
        """Write `shard` to path atomically (replacing whatever is there)."""
        self._write(Path(path), shard)

    def read(self, out_dir: Path, k: int, expected: Optional[tuple[int, int]] = None,
             chash: Optional[str] = None) -> Shard:
        """Read and verify shard k of out_dir.

        Args:
            expected: (start, stop): the global indices it must hold, in order.
            chash: the config hash it must carry.

        Raises:
            ForeignShardError: it verifies, but carries another config hash.
            ShardError: anything else: missing, unreadable (whatever the reader raised),
                leading outside out_dir, wrong indices, non-finite samples.
        """
        return self.read_path(located_inside(out_dir, self.shard_name(k)), expected, chash)

    def read_path(self, path: Path, expected: Optional[tuple[int, int]] = None,
                  chash: Optional[str] = None) -> Shard:
        """read() of a shard at any path (its location is not checked)."""
        return self.verify(self.load(path), Path(path).name, expected, chash)

    def load(self, path: Path) -> Shard:
        """A shard at any path after its own checks (checksums, record structure) only.

        Raises:
            ShardError: unreadable or damaged, whatever the reader raised.
        """
        path = Path(path)
        try:
            return self._read(path)
        except ShardError:
            raise
        except Exception as exc:  # noqa: BLE001 - a flipped bit makes the readers raise nearly anything
            raise ShardError(f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})") from None

    @staticmethod
    def verify(shard: Shard, name: str, expected: Optional[tuple[int, int]] = None,
               chash: Optional[str] = None) -> Shard:
        """shard, after the run's checks: config hash, indices, finite samples (see read)."""
        if chash is not None and shard.config_hash != chash:
            raise ForeignShardError(f"{name} belongs to another configuration")
        if expected is not None and not np.array_equal(shard.indices, np.arange(*expected)):
            raise ShardError(f"{name} does not hold indices {expected[0]}..{expected[1] - 1}")
        if not np.isfinite(shard.samples).all():
            raise ShardError(f"{name} holds non-finite samples")
        return shard


# ---------------------------------------------------------------------------- npz
def npz_checksum(samples: np.ndarray, indices: np.ndarray, labels: np.ndarray, metadata=None) -> str:
    """sha256 an npz shard embeds over its samples, indices, labels and metadata strings."""
    h = hashlib.sha256()
    for a in (samples, indices, labels):
        h.update(np.ascontiguousarray(a).tobytes())
    if metadata is not None:  # shards written before per-sample metadata existed have none
        h.update("\n".join(str(m) for m in metadata).encode())
    return h.hexdigest()


def write_npz(path: Path, shard: Shard) -> None:
    """Write an npz shard atomically (without metadata when shard.metadata is None)."""
    arrays = dict(samples=shard.samples, indices=shard.indices, labels=shard.labels, seeds=shard.seeds,
                  config_hash=np.array(shard.config_hash))
    if shard.metadata is not None:
        arrays["metadata"] = np.array([json.dumps(m, ensure_ascii=False) for m in shard.metadata], dtype=str)
    arrays["checksum"] = np.array(npz_checksum(shard.samples, shard.indices, shard.labels, arrays.get("metadata")))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz_arrays(path: Path) -> dict:
    """The arrays of an npz shard after its own checks (keys, lengths, checksum); ShardError otherwise."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = _NPZ_KEYS - arrays.keys()
    if missing:
        raise ShardError(f"{path.name} lacks {sorted(missing)}")
    samples, indices, labels = arrays["samples"], arrays["indices"], arrays["labels"]
    metadata = arrays.get("metadata")
    if not len(samples) == len(indices) == len(labels) == (len(indices) if metadata is None else len(metadata)):
        raise ShardError(f"{path.name} holds {len(samples)} samples for {len(indices)} indices")
    if str(arrays["checksum"]) != npz_checksum(samples, indices, labels, metadata):
        raise ShardError(f"{path.name} fails its checksum")
    return arrays


def _read_npz(path: Path) -> Shard:
    arrays = read_npz_arrays(path)
    if "metadata" in arrays:
        metadata = [json.loads(str(m)) for m in arrays["metadata"]]
    else:
        metadata = [{"index": int(i), "label": int(label), "seed": int(seed)}
                    for i, label, seed in zip(arrays["indices"], arrays["labels"], arrays["seeds"])]
    return Shard(arrays["samples"], arrays["indices"], arrays["labels"], arrays["seeds"], metadata,
                 str(arrays["config_hash"]), file_sha256(path))


# ---------------------------------------------------------------------------- png and webdataset
def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415 - PIL's import is slow; only image shards need it

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_pixels(name: str, data: bytes) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode not in ("L", "RGB"):
            raise ShardError(f"{name} is not an 8-bit grey or RGB PNG")
        return np.asarray(image)


def _image_samples(shard: Shard) -> list[tuple[str, bytes, dict]]:
    """(key, PNG bytes, JSON record) per sample."""
    out = []
    for pixels, record in zip(to_pixels(shard.samples), shard.metadata):
        key, png = sample_key(record["index"]), _png_bytes(pixels)
        out.append((key, png, {"key": key, **record, "png_sha256": hashlib.sha256(png).hexdigest(),
                               "config_hash": shard.config_hash}))
    return out


def _record_shard(name: str, items: list[tuple[str, bytes, bytes]], sha256: str) -> Shard:
    """A Shard from (member name, PNG bytes, JSON bytes) per sample, each checked."""
    records, images, hashes = [], [], set()
    for member, png, body in items:
        record = json.loads(body)
        if not isinstance(record, dict) or not all(type(record.get(k)) is int for k in _RECORD_INTS) \
                or not isinstance(record.get("config_hash"), str):
            raise ShardError(f"{name}: the record of {member} is malformed")
        if record.get("key") != sample_key(record["index"]) or member != record["key"]:
            raise ShardError(f"{name}: {member} holds the record of sample {record['index']}")
        if hashlib.sha256(png).hexdigest() != record.get("png_sha256"):
            raise ShardError(f"{name}: {member}.png fails its sha256")
        hashes.add(record.pop("config_hash"))
        for k in ("key", "png_sha256", "file"):
            record.pop(k, None)
        records.append(record)
        images.append(_png_pixels(f"{name}/{member}.png", png))
    if not records or len(hashes) != 1 or len({(a.shape, a.dtype) for a in images}) != 1:
        raise ShardError(f"{name} holds no samples, or samples of several runs or shapes")
    column = {k: np.array([r[k] for r in records], dtype=np.int64) for k in _RECORD_INTS}
    return Shard(np.stack(images), column["index"], column["label"], column["seed"], records, hashes.pop(), sha256)


def write_png_folder(path: Path, shard: Shard) -> None:
    """Write a png shard: a folder of KEY.png plus metadata.jsonl, built under a temporary name."""
    samples = _image_samples(shard)

    def fill(folder: Path) -> None:
        lines = []
        for key, png, record in samples:
            (folder / f"{key}.png").write_bytes(png)
            lines.append(json.dumps({**record, "file": f"{key}.png"}, ensure_ascii=False))
        (folder / PNG_METADATA).write_bytes(("\n".join(lines) + "\n").encode())

    atomic_write_dir(path, fill)


def _read_png_folder(path: Path) -> Shard:
    if not path.is_dir():
        raise ShardError(f"{path.name} is not a folder")
    index_file = located_inside(path, PNG_METADATA)
    body = index_file.read_bytes()
    items = []
    for number, line in enumerate(body.decode().splitlines(), start=1):
        record = json.loads(line)
        key = record.get("key") if isinstance(record, dict) else None
        if not isinstance(key, str) or record.get("file") != f"{key}.png":
            raise ShardError(f"{path.name}/{PNG_METADATA}: line {number} is malformed")
        items.append((key, located_inside(path, record["file"]).read_bytes(), line))
    return _record_shard(path.name, items, hashlib.sha256(body).hexdigest())


def write_tar(path: Path, shard: Shard) -> None:
    """Write a webdataset shard: a tar of KEY.png and KEY.json per sample, atomically."""
    samples = _image_samples(shard)

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, png, record in samples:
                body = json.dumps(record, ensure_ascii=False).encode()
                for member, data in ((f"{key}.png", png), (f"{key}.json", body)):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
                    tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write)


def _read_tar(path: Path) -> Shard:
    items = []
    with tarfile.open(path, mode="r:") as tar:
        members = tar.getmembers()
        if len(members) % 2:
            raise ShardError(f"{path.name} holds an odd number of members")
        for png, body in zip(members[::2], members[1::2]):
            key = png.name.removesuffix(".png")
            if not (png.isfile() and body.isfile() and png.name.endswith(".png") and body.name == f"{key}.json"):
                raise ShardError(f"{path.name}: members {png.name!r}, {body.name!r} are not a KEY.png, KEY.json pair")
            items.append((key, tar.extractfile(png).read(), tar.extractfile(body).read()))
    return _record_shard(path.name, items, file_sha256(path))


FORMAT = {
    "npz": ShardFormat("npz", ".npz", False, write_npz, _read_npz),
    "png": ShardFormat("png", "", True, write_png_folder, _read_png_folder),
    "webdataset": ShardFormat("webdataset", ".tar", True, write_tar, _read_tar),
}
_SHARD_NAMES = {fmt: re.compile(re.escape(SHARD_PREFIX) + r"\d{6,}" + re.escape(fmt.suffix)) for fmt in FORMAT.values()}


def format_of(name: str) -> Optional[ShardFormat]:
    """The format whose shard names include `name` (shard-000000.npz: npz), or None."""
    return next((fmt for fmt, pattern in _SHARD_NAMES.items() if pattern.fullmatch(name)), None)
