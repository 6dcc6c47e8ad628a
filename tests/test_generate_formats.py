"""generate's output formats (npz, png, webdataset): written, verified, resumed, read back bit for bit."""
import dataclasses
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ddim_fused import generate as gen
from ddim_fused.cli import main
from ddim_fused.shards import FORMAT, to_pixels
from tests.test_generate import CONFIG, INFO, TinyModel

FORMATS = ("npz", "png", "webdataset")
IMAGE_FORMATS = ("png", "webdataset")
SMALL = dataclasses.replace(CONFIG, num=10, shard_size=4, steps=4)  # shards of 4, 4 and 2


def run(out, output_format, config=SMALL, **kwargs):
    return gen.run_generation(out, dataclasses.replace(config, format=output_format), TinyModel, INFO,
                              progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The float samples and metadata of SMALL, from an npz run."""
    out = tmp_path_factory.mktemp("reference")
    run(out, "npz")
    return gen.load_samples(out)


def expected_samples(reference, output_format):
    return reference["samples"] if output_format == "npz" else to_pixels(reference["samples"])


def snapshot(out):
    """{relative path: bytes} of every file under out but the lock."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != gen.LOCK_FILE}


@pytest.mark.parametrize("output_format", FORMATS)
def test_each_format_reads_back_bit_for_bit(tmp_path, reference, output_format):
    run(tmp_path, output_format, preview=True)
    got = gen.load_samples(tmp_path)
    assert got["output_format"] == output_format
    expected = expected_samples(reference, output_format)
    assert got["samples"].dtype == expected.dtype and np.array_equal(got["samples"], expected)
    assert np.array_equal(got["indices"], np.arange(SMALL.num)) and np.array_equal(got["labels"], reference["labels"])
    assert got["metadata"] == reference["metadata"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [FORMAT[output_format].shard_name(k) for k in range(3)]
    assert (tmp_path / "preview.png").exists()


def test_png_shards_are_folders_of_pngs_with_one_json_line_each(tmp_path, reference):
    run(tmp_path, "png")
    folder = tmp_path / "shard-000001"
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [f"{i:010d}.png" for i in range(4, 8)]
    assert sorted(p.name for p in folder.iterdir()) == sorted([line["file"] for line in lines] + ["metadata.jsonl"])
    for line, pixels in zip(lines, to_pixels(reference["samples"][4:8])):
        with Image.open(folder / line["file"]) as image:
            assert image.mode == "L" and np.array_equal(np.asarray(image), pixels)
        assert {k: line[k] for k in reference["metadata"][line["index"]]} == reference["metadata"][line["index"]]


def test_webdataset_shards_are_read_by_the_webdataset_library(tmp_path, reference):
    wds = pytest.importorskip("webdataset")
    run(tmp_path, "webdataset")
    urls = [str(tmp_path / FORMAT["webdataset"].shard_name(k)) for k in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(SMALL.num)]
    for s, pixels, record in zip(samples, to_pixels(reference["samples"]), reference["metadata"]):
        with Image.open(io.BytesIO(s["png"])) as image:
            assert np.array_equal(np.asarray(image), pixels)
        meta = json.loads(s["json"])
        assert {k: meta[k] for k in record} == record and meta["config_hash"] == json.loads(
            (tmp_path / "run.json").read_text())["config_hash"]


@pytest.mark.parametrize("output_format", IMAGE_FORMATS)
def test_damaged_shards_are_regenerated_and_the_rest_kept(tmp_path, reference, output_format):
    run(tmp_path, output_format)
    fmt = FORMAT[output_format]
    first = tmp_path / fmt.shard_name(0)
    kept, first_written = snapshot(tmp_path), first.stat().st_mtime_ns
    second, third = tmp_path / fmt.shard_name(1), tmp_path / fmt.shard_name(2)
    if output_format == "png":
        (second / "0000000005.png").unlink()
        (third / "metadata.jsonl").write_text((third / "metadata.jsonl").read_text()[:50])
    else:
        second.write_bytes(second.read_bytes()[:3000])
        third.write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning, match="regenerating") as caught:
        summary = run(tmp_path, output_format)
    assert summary["samples_written"] == 6 and summary["shards_skipped"] == 1
    assert {str(w.message).split()[1] for w in caught} == {second.name, third.name}
    assert snapshot(tmp_path) == {**kept, "manifest.json": snapshot(tmp_path)["manifest.json"]}
    assert first.stat().st_mtime_ns == first_written  # kept, not rewritten
    assert np.array_equal(gen.load_samples(tmp_path)["samples"], expected_samples(reference, output_format))


@pytest.mark.parametrize("output_format", FORMATS)
def test_kill_9_while_a_shard_is_written_then_resume(tmp_path, reference, output_format):
    """The process kills itself at an fsync inside the second shard's write (a temporary file or
    folder is left), then a resume finishes the run bit for bit."""
    out = tmp_path / "run"
    script = (
        "import dataclasses, os, signal, sys\n"
        "from ddim_fused import generate as gen\n"
        "from tests.test_generate_formats import SMALL, TinyModel, INFO\n"
        "calls = [0]\nreal = os.fsync\n"
        "def fsync(fd):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == int(sys.argv[3]): os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(fd)\n"
        "os.fsync = fsync\n"
        "gen.run_generation(sys.argv[1], dataclasses.replace(SMALL, format=sys.argv[2]), TinyModel, INFO,"
        " progress=False)\n")
    # fsyncs: run.json (file, folder), shard 0 (npz, tar: file, folder; png: 4 PNGs, metadata.jsonl, its
    # temporary folder, the run folder), then shard 1's.
    kill_at = {"npz": 5, "webdataset": 5, "png": 12}[output_format]
    proc = subprocess.run([sys.executable, "-c", script, str(out), output_format, str(kill_at)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and not (out / "manifest.json").exists()
    assert os.path.lexists(out / FORMAT[output_format].shard_name(0))
    summary = run(out, output_format)
    assert summary["shards_skipped"] == 1
    assert np.array_equal(gen.load_samples(out)["samples"], expected_samples(reference, output_format))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("output_format", IMAGE_FORMATS)
def test_image_formats_refuse_latents(tmp_path, capsys, output_format):
    class LatentModel(TinyModel):
        image_shape = (4, 4, 4)

    with pytest.raises(ValueError, match=f"format '{output_format}' stores images .* shape \\(4, 4, 4\\)"):
        gen.run_generation(tmp_path / "lib", dataclasses.replace(SMALL, format=output_format), LatentModel, INFO,
                           progress=False)
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "tests.test_generate:TinyModel", "--shape", "4", "4", "4", "--num", "2",
              "--steps", "4", "--format", output_format, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and f"--format '{output_format}' stores images" in err
    assert not out.exists()


def test_the_format_is_part_of_the_run(tmp_path):
    run(tmp_path, "png")
    with pytest.raises(gen.RunMismatchError, match="config.format: 'png' there, 'webdataset' now"):
        run(tmp_path, "webdataset")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same format resumes without a word
        assert run(tmp_path, "png")["samples_written"] == 0


def test_a_png_replaced_by_another_valid_png_fails_its_sha256(tmp_path, reference):
    run(tmp_path, "png")
    folder = tmp_path / "shard-000001"
    (folder / "0000000005.png").write_bytes((folder / "0000000004.png").read_bytes())  # decodes fine
    with pytest.raises(gen.CorruptRunError, match="0000000005.png fails its sha256"):
        gen.load_samples(tmp_path)
    with pytest.warns(UserWarning, match="regenerating shard-000001: 0000000005.png fails its sha256"):
        assert run(tmp_path, "png")["samples_written"] == 4
    assert np.array_equal(gen.load_samples(tmp_path)["samples"], expected_samples(reference, "png"))
