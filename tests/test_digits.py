"""The embedded digits model: loading, the sampler protocol, class adherence of samples, PNG output."""
import errno

import pytest
import torch
from PIL import Image

from ddim_fused import DDIMSampler
from ddim_fused.cli import main as cli_main
from ddim_fused.digits import NULL_CLASS, load_digits_classifier, load_digits_model
from ddim_fused.digits.classifier import CLASSIFIER_FILE
from ddim_fused.digits.images import save_grid
from ddim_fused.digits.pretrained import MODEL_FILE

# Measured with the shipped weights (python -m ddim_fused.digits.evaluate): guidance 3 gave
# 500/500 (50 steps, seed 0) and 200/200 (20 steps, seed 5) digits of the requested class,
# guidance 1 gave 0.990 and 0.975. Even at a 2% error rate, 40 samples fall below 0.9 (more
# than 4 misread) with probability < 1%; a model that ignored its class would score ~0.1.
MIN_ACCURACY_G3 = 0.9
# Guidance 0 is the unconditional (null-class) model: measured 0.094 on 500 digits, chance
# is 0.1; above 0.4 (16 of 40) would mean the null class still carries the label.
MAX_ACCURACY_UNCOND = 0.4


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


@pytest.mark.parametrize("path", [MODEL_FILE, CLASSIFIER_FILE], ids=["unet", "classifier"])
def test_weights_load_with_weights_only(path):
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob) == {"config", "state_dict"}
    assert all(isinstance(v, torch.Tensor) for v in blob["state_dict"].values())
    assert path.stat().st_size < 5 * 2**20


def test_model_protocol(model):
    assert model.n_steps == 1000
    ab = model.alpha_bar
    assert ab.shape == (1000,) and ab.dtype == torch.float64
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < ab[0] <= 1
    assert model.device == torch.device("cpu")
    x = torch.randn(3, 1, 8, 8)
    eps = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, NULL_CLASS]))
    assert eps.shape == x.shape and eps.dtype == x.dtype and torch.isfinite(eps).all()


def test_model_rejects_bad_cond(model):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="cond must be a \\(2,\\) long tensor"):
        model(x, torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="class labels must lie in"):
        model.cond([3, 10])


def test_eps_predicts_the_noise(model):
    """On noised real-looking inputs the model beats the trivial eps = 0 predictor by far."""
    gen = torch.Generator().manual_seed(0)
    x0 = DDIMSampler(model, 20, seed=1).sample((20, 1, 8, 8), model.cond(torch.arange(20) % 10))
    t = torch.full((20,), 300)
    eps = torch.randn(x0.shape, generator=gen)
    a = model.alpha_bar[300].float()
    pred = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, model.cond(torch.arange(20) % 10))
    assert (pred - eps).pow(2).mean() < 0.25 * eps.pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_model_runs_in_other_dtypes(dtype):
    m = load_digits_model(dtype=dtype)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    assert m(x, torch.tensor([10, 900]), torch.tensor([4, 5])).dtype == dtype


def guided_accuracy(model, scale):
    classifier = load_digits_classifier()
    labels = torch.arange(40) % 10
    sampler = DDIMSampler(model, 20, seed=123)
    x = sampler.sample((40, 1, 8, 8), model.cond(labels), uncond_scale=scale, uncond_cond=model.null_cond(40))
    return (classifier.predict(x) == labels).float().mean().item()


def test_cfg_samples_are_the_requested_class(model):
    accuracy = guided_accuracy(model, 3.0)
    assert accuracy >= MIN_ACCURACY_G3, f"accuracy {accuracy:.3f} of 40 guided samples"


def test_unconditional_samples_ignore_the_label(model):
    accuracy = guided_accuracy(model, 0.0)
    assert accuracy <= MAX_ACCURACY_UNCOND, f"accuracy {accuracy:.3f} of 40 unconditional samples"


def test_classifier_reads_real_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from ddim_fused.digits.train import split_indices

    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    _, test_idx = split_indices(len(x), seed=0)
    clf = load_digits_classifier()
    accuracy = (clf.predict(x[test_idx]) == torch.tensor(data.target)[test_idx]).float().mean().item()
    assert accuracy == pytest.approx(clf.test_accuracy, abs=1e-6)
    assert accuracy > 0.95


def full_disk_after_a_few_bytes(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_png_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    size = save_grid(torch.zeros(4, 1, 8, 8), target, ncols=2)
    old = target.read_bytes()
    assert Image.open(target).size == size
    monkeypatch.setattr(Image.Image, "save", full_disk_after_a_few_bytes)
    with pytest.raises(OSError, match="No space left"):
        save_grid(torch.ones(4, 1, 8, 8), target, ncols=4)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_sample_command_on_a_full_disk_keeps_the_previous_png(tmp_path, monkeypatch):
    target = tmp_path / "old.png"
    target.write_bytes(b"previous picture")
    monkeypatch.setattr(Image.Image, "save", full_disk_after_a_few_bytes)
    # The exit code of this failure belongs to the CLI; the file must survive either way.
    with pytest.raises((OSError, SystemExit)):
        cli_main(["sample", "--num", "2", "--steps", "2", "--no-progress", "--out", str(target)])
    assert target.read_bytes() == b"previous picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
