"""Bulk generation: shards, resume, verification, atomic writes, configuration identity."""
import dataclasses
import errno
import json

import numpy as np
import pytest
import torch

from ddim_fused import generate as gen
from ddim_fused.schedules import make_alpha_bar


class TinyModel:
    """A batch-invariant class-conditional eps-model for 1x4x4 'images'."""

    n_steps = 1000
    image_shape = (1, 4, 4)
    alpha_bar = torch.from_numpy(make_alpha_bar("linear"))

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def __call__(self, x, t, cond):
        return torch.tanh(x + cond.view(-1, 1, 1, 1).float() / 10)

    def null_cond(self, batch):
        return torch.full((batch,), 10, dtype=torch.long)


CONFIG = gen.GenerateConfig(num=22, shard_size=6, batch_size=4, steps=6, eta=0.5, guidance=2.0, seed=3, classes=(1, 4, 7))
INFO = {"name": "tiny"}


def run(out, config=CONFIG):
    return gen.run_generation(out, config, TinyModel, INFO, progress=False)


def test_run_writes_shards_and_manifest(tmp_path):
    summary = run(tmp_path)
    assert summary["samples_written"] == 22
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 22
    assert [s["count"] for s in manifest["shards"]] == [6, 6, 6, 4]
    assert set(manifest["versions"]) >= {"torch", "triton", "numpy", "ddim_fused"}
    data = gen.load_samples(tmp_path)
    assert np.array_equal(data["indices"], np.arange(22))
    assert np.array_equal(data["labels"], np.array([1, 4, 7])[np.arange(22) % 3])
    assert data["samples"].shape == (22, 1, 4, 4) and np.isfinite(data["samples"]).all()
    for s in manifest["shards"]:
        assert gen.file_sha256(tmp_path / s["file"]) == s["sha256"]


def test_samples_do_not_depend_on_batch_or_shard_size(tmp_path):
    run(tmp_path / "a")
    run(tmp_path / "b", dataclasses.replace(CONFIG, batch_size=5))
    a, b = gen.load_samples(tmp_path / "a"), gen.load_samples(tmp_path / "b")
    assert np.array_equal(a["samples"], b["samples"])
    # A different shard size is a different run layout but the same samples by index.
    run(tmp_path / "c", dataclasses.replace(CONFIG, shard_size=5))
    assert np.array_equal(gen.load_samples(tmp_path / "c")["samples"], a["samples"])


def test_resume_skips_complete_shards_and_regenerates_missing_and_corrupt(tmp_path):
    run(tmp_path)
    reference = gen.load_samples(tmp_path)["samples"]
    (tmp_path / "shard-000001.npz").unlink()
    corrupt = tmp_path / "shard-000002.npz"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated
    (tmp_path / ".shard-000003.npz.tmp.999").write_bytes(b"partial")  # left by a killed run
    with pytest.warns(UserWarning, match="shard-000002.npz is unreadable"):
        summary = run(tmp_path)
    assert summary["samples_written"] == 12 and summary["shards_skipped"] == 2
    assert np.array_equal(gen.load_samples(tmp_path)["samples"], reference)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_shard_with_altered_samples_fails_its_checksum(tmp_path):
    run(tmp_path)
    path = tmp_path / "shard-000000.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["samples"] = arrays["samples"] + 1
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert run(tmp_path)["samples_written"] == 6


def test_a_different_configuration_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(gen.RunMismatchError, match="config.seed: 3 there, 4 now"):
        run(tmp_path, dataclasses.replace(CONFIG, seed=4))
    # batch size, device and backend change no sample: resuming with them is allowed.
    assert run(tmp_path, dataclasses.replace(CONFIG, batch_size=2))["samples_written"] == 0


def test_a_failing_write_loses_nothing_already_finished(tmp_path, monkeypatch):
    real_savez, calls = np.savez, []

    def savez_fails_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(gen.np, "savez", savez_fails_third)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000000.npz", "shard-000001.npz"]
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(gen.np, "savez", real_savez)
    assert run(tmp_path)["samples_written"] == 10


@pytest.mark.parametrize(
    "field,value",
    [("num", 0), ("batch_size", -1), ("shard_size", 0), ("steps", 2.5), ("classes", ()), ("seed", -1)],
)
def test_bad_configuration(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(CONFIG, **{field: value})


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(gen.OutputPathError, match="cannot create output directory"):
        run(blocker / "out")
    with pytest.raises(gen.OutputPathError, match="is a file, not a folder"):
        run(blocker)
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("local_rank, local_world, gpus, expected", [
    (1, 2, 2, 1),  # one GPU per process
    (1, 2, 1, 0),  # two processes share the only GPU
    (3, 4, 2, 1),  # round-robin
])
def test_processes_beyond_the_gpu_count_share_the_gpus(monkeypatch, local_rank, local_world, gpus, expected):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert gen._join_group("cuda")[2] == torch.device("cuda", expected)
    assert gen._join_group("cuda:0")[2] == torch.device("cuda", 0)  # an explicit GPU stays


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ranks_join_over_gloo_on_every_device(monkeypatch, device):
    """NCCL refuses two ranks on one GPU; the ranks only exchange two integers, so gloo always."""
    import torch.distributed as dist  # noqa: PLC0415

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: joined.append(dev))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    rank, world, dev = gen._join_group(device)
    assert (rank, world) == (2, 3) and joined[-1] == "gloo"
    assert dev == (torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))


def test_each_sample_carries_its_metadata(tmp_path):
    run(tmp_path)
    records = gen.load_samples(tmp_path)["metadata"]
    assert [r["index"] for r in records] == list(range(CONFIG.num))
    assert [r["class"] for r in records] == [(1, 4, 7)[i % 3] for i in range(CONFIG.num)]
    assert [r["label"] for r in records] == [r["class"] for r in records]
    for r in records:
        assert (r["seed"], r["steps"], r["eta"], r["guidance"], r["model"]) == (3, 6, 0.5, 2.0, INFO)


def test_shards_written_before_metadata_existed_still_load(tmp_path):
    run(tmp_path)
    path = tmp_path / gen.shard_name(0)
    shard = gen.read_shard(path)
    gen.write_shard(path, shard["samples"], shard["indices"], shard["labels"], CONFIG.seed, str(shard["config_hash"]))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = gen.file_sha256(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    records = gen.load_samples(tmp_path)["metadata"]
    assert records[0] == {"index": 0, "label": 1, "seed": 3} and records[6]["class"] == 1


def test_edited_metadata_fails_the_checksum(tmp_path):
    run(tmp_path)
    path = tmp_path / gen.shard_name(1)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    edited = [m.replace('"class": 4', '"class": 5') for m in arrays["metadata"].tolist()]
    assert edited != arrays["metadata"].tolist()
    np.savez(path, **{**arrays, "metadata": np.array(edited)})
    with pytest.raises(gen.ShardError, match="fails its checksum"):
        gen.read_shard(path)
