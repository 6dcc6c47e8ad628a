"""The digits Table 1 script: its measurement on a tiny grid, its table and plot."""
import json

import pytest
import torch

from ddim_fused.coefficients import SIGMA_HAT
from ddim_fused.digits import load_digits_classifier, load_digits_model
from ddim_fused.digits import table1
from ddim_fused.metrics import frechet_distance

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def data():
    measured = table1.measure(40, steps=(10,), etas=(0.0, SIGMA_HAT), batch_size=20)
    measured.update(n=40)
    return measured


def test_cells_and_references(data):
    assert [(c["steps"], c["eta"]) for c in data["cells"]] == [(10, 0.0), (10, SIGMA_HAT)]
    for cell in data["cells"]:
        assert 0.0 <= cell["accuracy"] <= 1.0 and cell["frechet"] > 0 and cell["discretize"] == "uniform"
    assert data["n_heldout"] == 359 and data["same_size_n"] == 40 and data["floor"] > 0
    # The feature space tells digits from noise: generated digits sit far closer to real ones.
    clf = load_digits_classifier()
    noise = clf.features(torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    model_cell = data["cells"][0]["frechet"]
    x, _ = table1.load_digits_data()
    _, test_idx = table1.split_indices(len(x), table1.SPLIT_SEED)
    assert frechet_distance(noise, clf.features(x[test_idx])) > 5 * model_cell


def test_generation_is_keyed_by_seed_and_index():
    model = load_digits_model()
    a, labels = table1.generate(model, 5, 0.0, 6, seed=3, batch_size=6)
    b, _ = table1.generate(model, 5, 0.0, 6, seed=3, batch_size=4)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.allclose(a, b, atol=1e-5)
    assert table1.discretization(1000, 1000) == "linspace" and table1.discretization(100, 1000) == "uniform"


def test_markdown_table_and_plot(data, tmp_path, capsys):
    table = table1.markdown_table(data)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 2  # header, one row per eta, two references
    assert rows[2].startswith("| sigma-hat | ") and f"{data['cells'][1]['frechet']:.2f}" in rows[2]
    pytest.importorskip("matplotlib")
    table1.plot(data, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert table1.main(["--markdown", str(tmp_path / "t.json")]) == 0
    assert capsys.readouterr().out == table
