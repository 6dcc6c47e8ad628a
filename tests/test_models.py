"""--model sources (digits, diffusers folders, callables), their conditioning and cond files."""
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from ddim_fused import DDIMSampler
from ddim_fused import generate as gen
from ddim_fused.cli import main
from ddim_fused.conditioning import Conditioning, load_tensor_file
from ddim_fused.models import LoadedModel, file_sha256, load_model_source, optimize, source_kind
from ddim_fused.schedules import make_alpha_bar
from tests.byo_models import COND_DIM, COND_LEN, diffusers, needs_diffusers, save_pipeline, tiny_unet

USER_MODULE = '''
import torch
from ddim_fused.schedules import make_betas


class Net(torch.nn.Module):
    betas = make_betas("linear")
    sample_shape = {shape}

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, cond):
        return torch.tanh(x) * self.scale


def make(device="cpu", dtype=torch.float32):
    return Net().to(device=device, dtype=dtype)
'''


def user_module(tmp_path, monkeypatch, name, shape=(1, 4, 4)) -> str:
    """Write a user's model module into tmp_path and make it importable; returns 'name:make'."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE.format(shape=shape)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:make"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if diffusers is None:
        pytest.skip("needs diffusers (pip install 'ddim-fused[diffusers]')")
    return save_pipeline(tmp_path_factory.mktemp("models") / "pipe", tiny_unet(0), diffusers.DDIMScheduler())


def test_source_kinds(tmp_path):
    assert source_kind("digits") == "digits"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind("my_pkg.models:build") == "callable"
    with pytest.raises(ValueError, match="neither 'digits', an existing folder, nor package.module:callable"):
        source_kind("no/such/folder")
    (tmp_path / "f.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        source_kind(str(tmp_path / "f.pt"))


def test_digits_source_keeps_its_identity():
    loaded = load_model_source("digits")
    assert loaded.is_digits and loaded.sample_shape == (1, 8, 8) and loaded.conditioning == "class"
    assert loaded.n_classes == 10 and loaded.discretize == "uniform" and loaded.sampler_options == {}
    assert set(loaded.identity) == {"name", "weights_sha256"}


@needs_diffusers
def test_pipeline_folder_loads_with_diffusers_schedule(pipeline):
    loaded = load_model_source(str(pipeline))
    scheduler = diffusers.DDIMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    assert loaded.sample_shape == (3, 8, 8) and loaded.conditioning == "none"
    assert loaded.discretize == "leading"
    options = loaded.sampler_options
    assert np.array_equal(options["alpha_bar"], scheduler.alphas_cumprod.double().numpy())
    assert options["clip_sample"] and options["set_alpha_to_one"] and options["prev_timestep"] == "ratio"
    assert loaded.identity["weights_sha256"] != file_sha256(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    # The sample shape can be given (the UNet is convolutional), but not its channels.
    assert load_model_source(str(pipeline), sample_shape=(3, 16, 16)).sample_shape == (3, 16, 16)
    with pytest.raises(ValueError, match="3 input channels"):
        load_model_source(str(pipeline), sample_shape=(4, 8, 8))


@needs_diffusers
def test_a_learned_variance_unet_gives_its_eps_half(tmp_path):
    # out_channels = 2 x in_channels: eps (the first half) and the variance (the second).
    net = tiny_unet(2, out_channels=6)
    folder = save_pipeline(tmp_path / "pipe", net, diffusers.DDIMScheduler())
    loaded = load_model_source(str(folder))
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        both = net.eval()(x, t).sample
    out = loaded.model(x, t, None)
    assert out.shape == x.shape and both.shape == (2, 6, 8, 8)
    torch.testing.assert_close(out, both[:, :3], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, both[:, 3:])


@needs_diffusers
def test_bare_model_folder_needs_a_scheduler_config(tmp_path):
    tiny_unet(1).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="scheduler-config|scheduler_config"):
        load_model_source(str(tmp_path / "unet"))
    scheduler_file = tmp_path / "sched.json"
    scheduler_file.write_text(json.dumps(dict(diffusers.DDPMScheduler(prediction_type="sample").config)))
    loaded = load_model_source(str(tmp_path / "unet"), scheduler_config=scheduler_file)
    # A DDPMScheduler config: DDIM samples with its betas, as DDIMScheduler.from_config would.
    assert loaded.prediction_type == "sample" and loaded.discretize == "leading"
    assert loaded.identity["scheduler_config"] == str(scheduler_file.resolve())


@needs_diffusers
@pytest.mark.parametrize("edit,match", [
    ({"_class_name": "VQModel"}, "only UNet2DModel and UNet2DConditionModel are supported"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
])
def test_unsupported_unet_configs_are_refused(pipeline, tmp_path, edit, match):
    folder = tmp_path / "pipe"
    save_pipeline(folder, tiny_unet(0), diffusers.DDIMScheduler())
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        load_model_source(str(folder))


@needs_diffusers
def test_damaged_weights_are_a_value_error(tmp_path):
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(0), diffusers.DDIMScheduler())
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="cannot load the UNet2DModel"):
        load_model_source(str(folder))


def test_callable_source(tmp_path, monkeypatch):
    spec = user_module(tmp_path, monkeypatch, "byo_user_model_a")
    loaded = load_model_source(spec, dtype=torch.float64)
    assert loaded.sample_shape == (1, 4, 4) and loaded.conditioning == "tensor" and not loaded.cond_required
    assert loaded.identity["callable"] == spec and len(loaded.identity["module_sha256"]) == 64
    assert loaded.model.scale.dtype == torch.float64  # the factory got dtype=
    sampler = DDIMSampler(loaded.model, 5)
    assert np.allclose(sampler.coefs.alpha[-1], make_alpha_bar("linear")[sampler.time_steps[-1]])


def test_callable_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="cannot import 'byo_no_such_module'"):
        load_model_source("byo_no_such_module:make")
    spec = user_module(tmp_path, monkeypatch, "byo_user_model_b")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_model_source(spec.replace("make", "missing"))
    (tmp_path / "byo_user_model_c.py").write_text("def make():\n    return 3\n")
    with pytest.raises(ValueError, match="outside the sampler protocol"):
        load_model_source("byo_user_model_c:make")
    # A function that needs other arguments is not a factory (the CLI makes it a usage error).
    with pytest.raises(ValueError, match="'json:loads' is not a model factory"):
        load_model_source("json:loads")
    (tmp_path / "byo_user_model_classes.py").write_text(
        "import torch\n"
        "class M:\n"
        "    alpha_bar = torch.linspace(0.999, 0.01, 100, dtype=torch.float64)\n"
        "    sample_shape = (1, 4, 4)\n"
        "    def __init__(self, n):\n"
        "        self.n_classes = n\n"
        "    def __call__(self, x, t, cond):\n"
        "        return x\n"
        "def zero():\n    return M(0)\n"
        "def fraction():\n    return M(2.7)\n")
    for name in ("zero", "fraction"):
        with pytest.raises(ValueError, match="model.n_classes must be an int >= 1"):
            load_model_source(f"byo_user_model_classes:{name}")
    with pytest.raises(ValueError, match="more than 2\\*\\*62"):
        load_model_source(spec, sample_shape=(10**5,) * 4)


def test_folders_need_diffusers_while_digits_and_callables_do_not(tmp_path, monkeypatch):
    spec = user_module(tmp_path, monkeypatch, "byo_user_model_d")
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.delitem(sys.modules, "ddim_fused.diffusers_models", raising=False)
    with pytest.raises(ImportError, match=r"needs Hugging Face diffusers: pip install 'ddim-fused\[diffusers\]'"):
        load_model_source(str(folder))
    assert load_model_source("digits").is_digits
    assert load_model_source(spec).sample_shape == (1, 4, 4)


# ---------------------------------------------------------------------------- conditioning
def _tensor_model(cond_rank=2, cond_dim=COND_DIM, null=None):
    model = lambda x, t, c: x  # noqa: E731
    model.alpha_bar = make_alpha_bar("linear")
    loaded = LoadedModel.from_protocol(model, {}, conditioning="tensor", sample_shape=(1, 2, 2))
    loaded.cond_rank, loaded.cond_dim, loaded.cond_required, loaded.null_cond = cond_rank, cond_dim, True, null
    return loaded


def test_per_sample_and_shared_cond_rows():
    loaded = _tensor_model()
    table = torch.randn(4, COND_LEN, COND_DIM)
    inputs = Conditioning(loaded, cond=table, num=4)
    cond, extra = inputs.batch(1, 3)
    assert torch.equal(cond, table[1:3]) and extra == {}
    shared = Conditioning(loaded, cond=table[0], uncond=torch.zeros(1, COND_LEN, COND_DIM), guidance=2.0, num=4)
    cond, extra = shared.inputs([3, 0])
    assert torch.equal(cond, table[0].expand(2, -1, -1)) and extra["uncond_scale"] == 2.0
    assert extra["uncond_cond"].shape == (2, COND_LEN, COND_DIM) and not extra["uncond_cond"].any()
    assert shared.labels([0, 1]).tolist() == [-1, -1]
    assert set(shared.identity()) == {"cond_sha256", "uncond_sha256"}
    assert Conditioning(loaded, cond=table + 1, num=4).identity() != inputs.identity()


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "cond: this model is conditioned on a tensor"),
    (dict(cond=torch.zeros(3, COND_LEN, COND_DIM)), "3 rows"),
    (dict(cond=torch.zeros(4, COND_LEN, COND_DIM + 1)), "last dimension 7"),
    (dict(cond=torch.zeros(4, 1, COND_LEN, COND_DIM)), r"expected \(N, \*, \*\)"),
    (dict(cond=torch.zeros(4, COND_LEN, COND_DIM, dtype=torch.int64)), "floating-point"),
    (dict(cond=torch.full((COND_LEN, COND_DIM), float("nan"))), "NaN"),
    (dict(cond=torch.zeros(COND_LEN, COND_DIM), guidance=3.0), "needs uncond"),
    (dict(cond=torch.zeros(COND_LEN, COND_DIM), uncond=torch.zeros(2, COND_DIM), guidance=2.0), "uncond rows"),
    (dict(cond=torch.zeros(COND_LEN, COND_DIM), uncond=torch.zeros(COND_LEN, COND_DIM)),
     "uncond is used only with guidance other than 1"),
    (dict(classes=[1]), "classes apply to class-conditional models"),
])
def test_bad_tensor_conditioning(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conditioning(_tensor_model(), num=4, **kwargs)


def test_class_and_unconditional_models():
    digits = load_model_source("digits")
    inputs = Conditioning(digits, classes=[3, 5], guidance=2.0, num=5)
    cond, extra = inputs.batch(0, 3)
    assert cond.tolist() == [3, 5, 3] and extra["uncond_cond"].tolist() == [10, 10, 10]
    assert inputs.labels(np.arange(5)).tolist() == [3, 5, 3, 5, 3]
    unconditional = Conditioning(digits, classes=None, guidance=3.0)
    assert unconditional.batch(0, 2)[0].tolist() == [10, 10] and unconditional.batch(0, 2)[1] == {}
    with pytest.raises(ValueError, match="unknown class 10"):
        Conditioning(digits, classes=[10])
    with pytest.raises(ValueError, match="cond applies to models conditioned on tensors"):
        Conditioning(digits, classes=[1], cond=torch.zeros(1, 2))
    model = lambda x, t, c: x  # noqa: E731
    model.alpha_bar = make_alpha_bar("linear")
    plain = LoadedModel.from_protocol(model, {}, conditioning="none", sample_shape=(2,))
    assert Conditioning(plain).batch(0, 2) == (None, {})
    with pytest.raises(ValueError, match="guidance=2 needs an unconditional input"):
        Conditioning(plain, guidance=2.0)


# ---------------------------------------------------------------------------- cond files
@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_tensor_files(tmp_path, suffix):
    t = torch.randn(2, COND_LEN, COND_DIM)
    path = tmp_path / f"c{suffix}"
    if suffix == ".pt":
        torch.save(t, path)
    elif suffix == ".npy":
        np.save(path, t.numpy())
    else:
        pytest.importorskip("safetensors.torch").save_file({"cond": t}, str(path))
    assert torch.equal(load_tensor_file(path), t)


def test_bad_tensor_files(tmp_path):
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="expected a single tensor"):
        load_tensor_file(tmp_path / "two.pt")
    np.save(tmp_path / "int.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="floating-point"):
        load_tensor_file(tmp_path / "int.npy")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        load_tensor_file(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="expected a .pt"):
        load_tensor_file(tmp_path / "c.txt")


def test_generate_with_a_callable_model_equals_the_sampler(tmp_path, monkeypatch, capsys):
    spec = user_module(tmp_path, monkeypatch, "byo_user_model_e", shape=(2, 5))
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", spec, "--num", "3", "--steps", "4", "--eta", "0.3", "--seed", "2",
                     "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(before)
    run = gen.load_samples(tmp_path / "run")
    assert not (tmp_path / "run" / "preview.png").exists()  # (2, 5) samples are not images
    model = load_model_source(spec)
    sampler = DDIMSampler(model.model, 4, "uniform", 0.3)
    for i in range(3):
        x = sampler.sample((1, 2, 5), None, seed=2, sample_offset=i)
        assert torch.allclose(torch.from_numpy(run["samples"][i]), x[0], atol=1e-6)


def _spy_compile(monkeypatch) -> list:
    compiled = []

    def fake_compile(net, **options):  # optimize passes --compile-mode as mode=
        compiled.append(net)
        return net

    monkeypatch.setattr(torch, "compile", fake_compile)
    return compiled


def test_optimize_compiles_a_folder_models_unet(monkeypatch, pipeline):
    compiled = _spy_compile(monkeypatch)
    folder = optimize(load_model_source(str(pipeline)), compile=True)
    assert compiled == [folder.model.net]


def test_optimize_compiles_the_network_and_sets_channels_last(monkeypatch):
    compiled = _spy_compile(monkeypatch)
    digits = optimize(load_model_source("digits"), compile=True, channels_last=True)
    assert compiled == [digits.model.net]
    assert digits.model.net.inp.weight.is_contiguous(memory_format=torch.channels_last)
    model = lambda x, t, c: x  # noqa: E731
    model.alpha_bar = make_alpha_bar("linear")
    with pytest.raises(ValueError, match="nn.Module"):
        optimize(LoadedModel.from_protocol(model, {}, sample_shape=(2,)), compile=True)


def test_samples_that_are_not_images_go_to_generate(tmp_path, capsys, monkeypatch):
    (tmp_path / "byo_seq_model.py").write_text(
        "import torch\nfrom ddim_fused.schedules import make_alpha_bar\n\n"
        "class Seq:\n    alpha_bar = make_alpha_bar('linear')\n    sample_shape = (4, 3)\n\n"
        "    def __call__(self, x, t, cond):\n        return x * 0.1\n\n\ndef make():\n    return Seq()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _cli_error(["sample", "--model", "byo_seq_model:make"], capsys, tmp_path)
    assert "needs grey or RGB images" in line and "use ddim-fused generate" in line


def _cli_error(argv, capsys, tmp_path):
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as info:
        try:
            main(argv + ["--out", str(tmp_path / "x.png"), "--no-progress", "--threads", "1"])
        finally:
            torch.set_num_threads(before)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "Traceback" not in "\n".join(err)
    return err[-1]
