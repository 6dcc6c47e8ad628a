"""train-digits writes a new folder by default and replaces the shipped pair only on request, together."""
import errno
import hashlib

import pytest
import torch

from ddim_fused import atomic
from ddim_fused.cli import main as cli_main
from ddim_fused.digits import load_digits_classifier, load_digits_model
from ddim_fused.digits import train
from ddim_fused.digits.classifier import CLASSIFIER_FILE
from ddim_fused.digits.pretrained import MODEL_FILE

NAMES = (MODEL_FILE.name, CLASSIFIER_FILE.name)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


REAL_SHIPPED = {name: digest(MODEL_FILE.parent / name) for name in NAMES}


@pytest.fixture(autouse=True)
def fake_shipped(tmp_path, monkeypatch):
    """Point 'the package's weights folder' at a copy, so no test can touch the real files."""
    folder = tmp_path / "package-weights"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes((MODEL_FILE.parent / name).read_bytes())
    monkeypatch.setattr(train, "SHIPPED_DIR", folder)
    # File handling is under test, not the model: a narrow UNet and one classifier epoch keep it quick.
    monkeypatch.setitem(train.DEFAULTS, "channels", (8, 8, 8))
    monkeypatch.setitem(train.DEFAULTS, "emb_dim", 16)
    real_train_classifier = train.train_classifier
    monkeypatch.setattr(train, "train_classifier", lambda x, y, seed: real_train_classifier(x, y, seed=seed, epochs=1))
    yield folder
    assert {name: digest(MODEL_FILE.parent / name) for name in NAMES} == REAL_SHIPPED


def quick(**kwargs):
    return train.train_digits(epochs=1, progress=False, log=lambda line: None, **kwargs)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_default_writes_a_new_folder_and_leaves_the_shipped_model(tmp_path, monkeypatch, fake_shipped):
    monkeypatch.chdir(tmp_path)
    before = snapshot(fake_shipped)
    summary = quick()
    out = tmp_path / "digits-weights"
    assert summary["out_dir"].resolve() == out and sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    assert load_digits_model(path=out / MODEL_FILE.name).config["epochs"] == 1
    assert load_digits_classifier(out / CLASSIFIER_FILE.name).test_accuracy == pytest.approx(
        summary["classifier_accuracy"])
    assert snapshot(fake_shipped) == before


def test_replace_shipped_replaces_both_files(fake_shipped):
    before = snapshot(fake_shipped)
    summary = quick(replace_shipped=True)
    after = snapshot(fake_shipped)
    assert sorted(after) == sorted(NAMES)
    assert all(after[name] != before[name] for name in NAMES)
    assert load_digits_model(path=fake_shipped / MODEL_FILE.name).config["epochs"] == 1
    assert load_digits_classifier(fake_shipped / CLASSIFIER_FILE.name).test_accuracy == pytest.approx(
        summary["classifier_accuracy"])


def test_the_shipped_folder_needs_the_flag_and_is_checked_before_training(fake_shipped, monkeypatch):
    def no_training():
        raise AssertionError("trained before checking the output folder")

    monkeypatch.setattr(train, "load_digits_data", no_training)
    with pytest.raises(atomic.OutputPathError, match="is the package's weights folder; pass --replace-shipped"):
        quick(out_dir=fake_shipped)
    with pytest.raises(atomic.OutputPathError, match="--out and --replace-shipped exclude each other"):
        quick(out_dir=fake_shipped.parent / "elsewhere", replace_shipped=True)
    with pytest.raises(atomic.OutputPathError, match="empty path"):
        quick(out_dir="")


def test_an_interrupt_during_unet_training_writes_nothing(fake_shipped, monkeypatch):
    """The classifier is trained first; it must not be written beside the old UNet."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "DigitsUNet", interrupted)
    before = snapshot(fake_shipped)
    with pytest.raises(KeyboardInterrupt):
        quick(replace_shipped=True)
    assert snapshot(fake_shipped) == before


def test_a_failing_second_write_replaces_neither_file(fake_shipped, monkeypatch):
    real_save, calls = torch.save, []

    def save_fails_second(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", save_fails_second)
    before = snapshot(fake_shipped)
    with pytest.raises(OSError, match="No space left"):
        quick(replace_shipped=True)
    assert snapshot(fake_shipped) == before  # no temporary file left either


@pytest.mark.parametrize("extra,message", [
    (["--replace-shipped", "--out", "x"], "--out and --replace-shipped exclude each other"),
    (["--out", "SHIPPED"], "pass --replace-shipped"),
])
def test_cli_refuses_ambiguous_targets_in_one_line(fake_shipped, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    extra = [str(fake_shipped) if a == "SHIPPED" else a for a in extra]
    with pytest.raises(SystemExit) as info:
        cli_main(["train-digits", "--epochs", "1", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("ddim-fused: error: ") and err.count("\n") == 1
    assert message in err
