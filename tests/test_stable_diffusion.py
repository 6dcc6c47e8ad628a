"""Stable Diffusion pipeline folders as --model: the same images as diffusers' pipeline, and bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fused.cli import main
from ddim_fused.generate import load_samples
from tests.helpers import assert_close
from tests.sd_models import (
    IMAGE,
    LATENT,
    needs_sd,
    reference_pipeline,
    reference_sample,
    save_sd_pipeline,
    tiny_components,
    tiny_scheduler,
    write_tokenizer,
)

pytestmark = [needs_sd, pytest.mark.usefixtures("restore_threads")]

PROMPTS = ["a cat", "a dog and a cat"]
STEPS, SEED = 4, 7
LONG_PROMPT = " ".join(["cat"] * 80)  # 80 words: over CLIP's 77 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{1: SD1-like (epsilon, leading), 2: SD2-like (v_prediction, trailing)} pipeline folders."""
    root = tmp_path_factory.mktemp("sd")
    tokenizer = write_tokenizer(root / "tokenizer")
    return {v: save_sd_pipeline(root / f"sd{v}", tiny_components(tokenizer, seed=v), tiny_scheduler(v))
            for v in (1, 2)}


@pytest.fixture(scope="module")
def references(folders):
    return {v: reference_pipeline(folder) for v, folder in folders.items()}


def run(argv, capsys):
    assert main(argv + ["--threads", "1", "--no-progress", "--device", "cpu"]) == 0
    return capsys.readouterr()


def fails(argv, capsys, code=2):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--threads", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == code and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def generate(folder, out, capsys, *extra):
    run(["generate", "--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", str(STEPS),
         "--seed", str(SEED), "--out", str(out), *extra], capsys)
    return load_samples(out)


@pytest.mark.parametrize("version,eta", [(1, 0.0), (2, 0.5)], ids=["sd1-epsilon-eta0", "sd2-v-trailing-eta0.5"])
def test_images_match_diffusers_pipeline_at_two_batch_sizes(folders, references, tmp_path, capsys, version, eta):
    num, negative = 3, "blurry"
    runs = [generate(folders[version], tmp_path / f"b{bs}", capsys, "--num", str(num), "--batch-size", str(bs),
                     "--shard-size", "2", "--eta", str(eta), "--negative-prompt", negative)
            for bs in (1, 3)]
    for i in range(num):
        expected = reference_sample(references[version], PROMPTS[i % 2], i, seed=SEED, steps=STEPS, guidance=7.5,
                                    eta=eta, negative_prompt=negative)
        expected = torch.from_numpy((expected * 255).round().astype(np.uint8))
        for samples in runs:
            got = torch.from_numpy(samples["samples"][i])
            assert got.dtype == torch.uint8 and got.shape == (IMAGE, IMAGE, 3)
            diff = (got.int() - expected.int()).abs()
            assert diff.max() <= 1, f"sample {i}: {int((diff > 1).sum())} pixels differ by more than 1/255"
    assert runs[0]["labels"].tolist() == [0, 1, 0]  # the prompt index of each sample
    records = runs[0]["metadata"]
    assert [(r["index"], r["prompt"], r["negative_prompt"]) for r in records] == \
        [(i, PROMPTS[i % 2], negative) for i in range(num)]
    assert all((r["seed"], r["steps"], r["eta"], r["guidance"]) == (SEED, STEPS, eta, 7.5) for r in records)


@pytest.mark.parametrize("version", [1, 2], ids=["sd1-epsilon", "sd2-v-trailing"])
def test_latents_match_diffusers_pipeline(folders, references, tmp_path, capsys, version):
    samples = generate(folders[version], tmp_path / "lat", capsys, "--num", "2", "--batch-size", "2",
                       "--output-type", "latent", "--eta", "0.3")["samples"]
    assert samples.shape == (2, 4, LATENT, LATENT) and samples.dtype == np.float32
    for i in range(2):
        expected = reference_sample(references[version], PROMPTS[i], i, seed=SEED, steps=STEPS, guidance=7.5,
                                    eta=0.3, output_type="latent")
        assert_close(torch.from_numpy(samples[i]), expected[0] if expected.dim() == 4 else expected, rtol=1e-4,
                     name=f"latent {i}")


def test_prompt_files_cycle_over_samples_with_their_negative_prompts(folders, references, tmp_path, capsys):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a dog", "negative_prompt": "a cat"}) + "\n\n"
                     + json.dumps({"prompt": "a cat"}) + "\n", encoding="utf-8")
    out = tmp_path / "s.png"
    text = run(["sample", "--model", str(folders[1]), "--prompts", str(jsonl), "--num", "3", "--steps", "2",
                "--negative-prompt", "ugly", "--out", str(out)], capsys).out
    assert "3 samples (2 prompt(s) cycling)" in text and "guidance 7.5" in text
    scale = 64 // IMAGE  # small images are drawn upscaled, nearest neighbour
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == ((2 * (IMAGE + 1) + 1) * scale,) * 2
        grid = np.asarray(image)[::scale, ::scale]
    for i, (prompt, negative) in enumerate([("a dog", "a cat"), ("a cat", "ugly"), ("a dog", "a cat")]):
        r, c = divmod(i, 2)
        tile = grid[1 + r * (IMAGE + 1):1 + r * (IMAGE + 1) + IMAGE, 1 + c * (IMAGE + 1):1 + c * (IMAGE + 1) + IMAGE]
        expected = reference_sample(references[1], prompt, i, seed=0, steps=2, guidance=7.5, negative_prompt=negative)
        diff = np.abs(tile.astype(int) - (expected * 255).round().astype(int))
        assert diff.max() <= 1, f"sample {i} ({prompt!r}, negative {negative!r})"


def test_a_long_prompt_is_truncated_with_one_warning_naming_it(folders, tmp_path, capsys):
    txt = tmp_path / "p.txt"
    txt.write_text(f"{LONG_PROMPT}\na dog\n{LONG_PROMPT}\n", encoding="utf-8")
    err = run(["sample", "--model", str(folders[1]), "--prompts", str(txt), "--num", "1", "--steps", "1",
               "--out", str(tmp_path / "s.png")], capsys).err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cat cat cat" in warnings[0] and "truncated" in warnings[0], err


def _copy_without(folder, tmp_path, part):
    copy = shutil.copytree(folder, tmp_path / f"no-{part}")
    shutil.rmtree(copy / part)
    return copy


def test_a_missing_vae_is_named_and_latents_still_work(folders, tmp_path, capsys):
    folder = _copy_without(folders[1], tmp_path, "vae")
    argv = ["generate", "--model", str(folder), "--prompt", "a cat", "--num", "1", "--steps", "1"]
    err = fails(argv + ["--out", str(tmp_path / "o")], capsys)
    assert "no vae/: pass --output-type latent to keep latents" in err
    assert not (tmp_path / "o").exists()
    run(argv + ["--out", str(tmp_path / "lat"), "--output-type", "latent"], capsys)
    assert load_samples(tmp_path / "lat")["samples"].shape == (1, 4, LATENT, LATENT)


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer"])
def test_a_missing_text_part_is_named(folders, tmp_path, capsys, part):
    folder = _copy_without(folders[1], tmp_path, part)
    err = fails(["sample", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "s.png")], capsys)
    assert f"has no {part}/" in err


def test_two_text_encoders_are_not_supported_yet(folders, tmp_path, capsys):
    folder = shutil.copytree(folders[1], tmp_path / "xl")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_2=index["text_encoder"], tokenizer_2=index["tokenizer"],
                 _class_name="StableDiffusionXLPipeline")
    (folder / "model_index.json").write_text(json.dumps(index))
    err = fails(["sample", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "s.png")], capsys)
    assert "two text encoders" in err and "not supported yet" in err


@pytest.mark.parametrize("name,body,expected", [
    ("empty.txt", b"\n  \n", "holds no prompt"),
    ("latin1.txt", b"a cat\ncaf\xe9\n", ":2: not UTF-8"),
    ("bad.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a dog"\n', ":2: not valid JSON"),
    ("noprompt.jsonl", b'{"text": "a cat"}\n', ":1: expected an object with a string \"prompt\""),
    ("prompts.csv", b"a cat\n", "expected a .txt"),
], ids=["empty", "not-utf8", "bad-json-line", "no-prompt-key", "other-suffix"])
def test_bad_prompt_files_name_file_and_line(folders, tmp_path, capsys, name, body, expected):
    path = tmp_path / name
    path.write_bytes(body)
    err = fails(["generate", "--model", str(folders[1]), "--prompts", str(path), "--out", str(tmp_path / "o")],
                capsys)
    assert str(path) in err and expected in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,expected", [
    (["--num", "1"], "give --prompt TEXT or --prompts FILE"),
    (["--prompt", "a", "--class", "1"], "--class applies to class-conditional models; this model takes --prompt"),
    (["--prompt", "a", "--output-type", "latent"], "--output-type latent keeps latents"),
], ids=["no-prompt", "class", "latent-png"])
def test_sample_refuses_inputs_that_do_not_fit(folders, tmp_path, capsys, argv, expected):
    err = fails(["sample", "--model", str(folders[1]), *argv, "--out", str(tmp_path / "s.png")], capsys)
    assert expected in err


def test_prompts_do_not_apply_to_other_models(tmp_path, capsys):
    err = fails(["sample", "--prompt", "a cat", "--out", str(tmp_path / "s.png")], capsys)
    assert "--prompt, --prompts and --negative-prompt apply to Stable Diffusion pipelines" in err


def test_nan_images_exit_1_and_write_no_shard(folders, tmp_path, capsys):
    folder = shutil.copytree(folders[1], tmp_path / "nan")
    components = tiny_components(folder / "tokenizer", seed=1)
    with torch.no_grad():
        components["vae"].decoder.conv_out.bias.fill_(float("nan"))
    save_sd_pipeline(folder, components, tiny_scheduler(1))
    capsys.readouterr()  # the savers' progress bars
    out = tmp_path / "o"
    err = fails(["generate", "--model", str(folder), "--prompt", "a cat", "--num", "2", "--steps", "1",
                 "--out", str(out)], capsys, code=1)
    assert "not finite" in err
    assert not list(out.glob("shard-*"))


def test_cuda_graph_refuses_a_cpu_device(folders, tmp_path, capsys):
    err = fails(["generate", "--model", str(folders[1]), "--prompt", "a cat", "--cuda-graph",
                 "--out", str(tmp_path / "o")], capsys)
    assert "--cuda-graph needs a CUDA device" in err


def test_compile_wraps_the_unet_and_the_vae_decoder(folders, tmp_path, capsys, monkeypatch):
    compiled = []

    def fake_compile(module, mode=None, **kwargs):  # records what --compile hands torch.compile
        compiled.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    run(["sample", "--model", str(folders[1]), "--prompt", "a cat", "--num", "1", "--steps", "1", "--compile",
         "--compile-mode", "max-autotune-no-cudagraphs", "--out", str(tmp_path / "s.png")], capsys)
    assert compiled == [("UNet2DConditionModel", "max-autotune-no-cudagraphs"),
                        ("Decoder", "max-autotune-no-cudagraphs")]


def test_an_edited_prompt_file_is_another_run(folders, tmp_path, capsys):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "run"
    prompts.write_text("a cat\n", encoding="utf-8")
    argv = ["generate", "--model", str(folders[1]), "--prompts", str(prompts), "--num", "1", "--steps", "2",
            "--out", str(out)]
    run(argv, capsys)
    assert run(argv, capsys).out.count("1 complete shard(s) kept") == 1  # the same file resumes
    prompts.write_text("a cat\n\n", encoding="utf-8")  # the same prompts, another file
    assert "prompt_file_sha256" in fails(argv, capsys)


def test_every_format_holds_the_same_images_and_their_prompts(folders, tmp_path, capsys):
    runs = {fmt: generate(folders[2], tmp_path / fmt, capsys, "--num", "3", "--batch-size", "2", "--shard-size", "2",
                          "--format", fmt, "--negative-prompt", "blurry")
            for fmt in ("npz", "png", "webdataset")}
    for fmt, samples in runs.items():
        assert samples["samples"].dtype == np.uint8 and samples["samples"].shape == (3, IMAGE, IMAGE, 3), fmt
        np.testing.assert_array_equal(samples["samples"], runs["npz"]["samples"], err_msg=fmt)
        assert [(m["prompt"], m["negative_prompt"]) for m in samples["metadata"]] == \
            [(PROMPTS[i % 2], "blurry") for i in range(3)], fmt


def test_image_formats_refuse_latents(folders, tmp_path, capsys):
    out = tmp_path / "lat"
    err = fails(["generate", "--model", str(folders[1]), "--prompt", "a cat", "--output-type", "latent", "--num", "1",
                 "--steps", "2", "--format", "webdataset", "--out", str(out)], capsys)
    assert "--format 'webdataset' stores images" in err and "use --format 'npz'" in err and not out.exists()
