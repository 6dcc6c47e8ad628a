"""The numbers of README.md and docs/*.md against the committed data they come from.

Tables live in data blocks (`<!-- data: KIND PATH [PATH ...] -->`) that `python -m bench.readme`
renders from their JSON files; these tests fail when a table and its data disagree, and
check the pages' prose statements about the tables against the same data.
"""
import json
import re
from pathlib import Path

import pytest

from bench.readme import BLOCK, pages, regenerate
from bench.summary import NOT_MEASURED
from ddim_fused.digits.classifier import load_digits_classifier
from ddim_fused.digits.pretrained import load_digits_model
from ddim_fused.digits.train import DEFAULTS
from ddim_fused.coefficients import SIGMA_HAT

ROOT = Path(__file__).resolve().parent.parent
TEXTS = {page.relative_to(ROOT).as_posix(): page.read_text(encoding="utf-8") for page in pages()}
TEXT = "\n".join(TEXTS.values())
PROSE = re.sub(r"\s+", " ", TEXT)  # line breaks and indentation folded, for phrase lookups


def _blocks(kind):
    """(page, [paths]) of every data block of `kind` in the pages."""
    return [(page, m.group(2).split()) for page, text in TEXTS.items()
            for m in BLOCK.finditer(text) if m.group(1) == kind]


def _data(kind):
    blocks = _blocks(kind)
    assert len(blocks) == 1, f"expected one {kind} block in README.md and docs/, found {len(blocks)}"
    return json.loads((ROOT / blocks[0][1][0]).read_text(encoding="utf-8"))


def test_every_data_block_is_rendered_from_its_file():
    kinds = [m.group(1) for text in TEXTS.values() for m in BLOCK.finditer(text)]
    expected = ["adherence", "bench", "bench", "gpu", "gpu", "graph", "host", "host", "quality", "static", "table1",
                "throughput"]
    assert all(kinds.count(k) >= expected.count(k) for k in expected), kinds
    for page, text in TEXTS.items():
        _, changed = regenerate(text)
        assert not changed, f"{page}: blocks differ from their data: {changed}; run python -m bench.readme"


def test_a_changed_number_is_caught():
    # The check above compares whole rendered blocks: one digit changed in a table fails it.
    page, text = next((p, t) for p, t in TEXTS.items() if "<!-- data: gpu " in t)
    block = text[text.index("<!-- data: gpu "):]
    digit = re.search(r"\| (\d)", block)
    wrong = str((int(digit.group(1)) + 1) % 10)
    edited = text.replace(block, block[:digit.start(1)] + wrong + block[digit.end(1):], 1)
    _, changed = regenerate(edited)
    assert changed, f"{page}: an edited number went unnoticed"


def test_a_step_speedup_is_shown_only_from_a_run_that_passed_its_parity_gate():
    devices = set()
    for kind in ("bench", "gpu"):
        for page, paths in _blocks(kind):
            result = json.loads((ROOT / paths[0]).read_text(encoding="utf-8"))
            assert {"minimal", "labml"} <= {r["provider"] for r in result["steps"]}, (page, paths[0])
            devices.add(result["environment"]["device"].split(":")[0])
            if result["parity"]["ok"]:
                continue
            text = TEXTS[page]
            block = text[text.index(f"<!-- data: {kind} {' '.join(paths)} -->"):]
            block = block[:block.index("<!-- /data -->")]
            steps = [line for line in block.splitlines() if line.startswith(("| fp", "| bf", "| one step"))]
            assert steps and not any(re.search(r"\d\.\d\dx", line) for line in steps), (page, steps)
            assert "withheld" in block, page
    assert devices == {"cpu", "cuda"}, devices


def test_the_readme_results_table_is_measured_on_a_gpu():
    readme = [(page, paths) for page, paths in _blocks("gpu") if page == "README.md"]
    assert len(readme) == 1, "README.md has no GPU results table"
    results, graph = (json.loads((ROOT / p).read_text(encoding="utf-8")) for p in readme[0][1][:2])
    assert results["environment"]["device"].startswith("cuda") and results["environment"]["device_name"]
    # The captured loop against diffusers' loop, from the run's timed rows.
    assert {"fused-graph", "diffusers"} <= {r["provider"] for r in graph["rows"] if r.get("per_step_us")}
    # Rows without data say so instead of showing a number.
    table = TEXTS["README.md"]
    if len(readme[0][1]) < 3:
        assert f"fp16, batch 1 | {NOT_MEASURED}" in table


def test_quality_statements_hold_on_the_data():
    data = _data("quality")
    fd = {(c["eta"], c["steps"]): c["frechet"] for c in data["cells"]}
    floor = data["floor"]
    etas = {eta for eta, _ in fd}
    # "at 50 steps deterministic DDIM is closer to the data than 50 eta = 1 steps and about as
    # close as 100 of them"
    assert fd[0.0, 50] < fd[1.0, 50]
    assert 0.8 <= fd[0.0, 50] / fd[1.0, 100] <= 1.25
    # "eta = 0 is the best of all etas at every S up to 50"
    for s in (10, 20, 50):
        assert fd[0.0, s] == min(fd[eta, s] for eta in etas), f"S={s}"
    # "1000 eta = 1 steps reach the noise floor; 50 DDIM steps stay several times above it;
    # about 100 DDIM steps come within 2.5x of it"
    assert fd[1.0, 1000] <= 1.2 * floor
    assert fd[0.0, 50] >= 3 * floor
    assert fd[0.0, 100] <= 2.5 * floor
    # "Sigma-hat is the worst of all at 10 steps"
    assert fd[SIGMA_HAT, 10] == max(fd[eta, 10] for eta in etas)
    assert f"between {data['n']:,} DDIM samples and {data['n']:,} exact samples" in PROSE


def test_table1_statements_hold_on_the_data():
    data = _data("table1")
    fd = {(c["eta"], c["steps"]): c["frechet"] for c in data["cells"]}
    acc = [c["accuracy"] for c in data["cells"]]
    etas, steps = {e for e, _ in fd}, sorted({s for _, s in fd})
    assert steps == [10, 20, 50, 100, 1000] and len(etas) == 5 and SIGMA_HAT in etas
    others = [e for e in etas if e != SIGMA_HAT]
    # sigma-hat: the worst row at S = 10, about twice every other, with the lowest accuracy;
    # the best row at S = 1000
    assert all(fd[SIGMA_HAT, 10] >= 1.8 * fd[e, 10] for e in others)
    at_10 = {c["eta"]: c["accuracy"] for c in data["cells"] if c["steps"] == 10}
    assert at_10[SIGMA_HAT] == min(acc)
    assert fd[SIGMA_HAT, 1000] == min(fd[e, 1000] for e in etas)
    # every eta > 0 falls from S = 10 to S = 50; eta = 1 and sigma-hat keep falling to S = 1000
    assert all(fd[e, 50] < fd[e, 10] for e in etas if e != 0.0)
    for e in (1.0, SIGMA_HAT):
        assert all(fd[e, a] > fd[e, b] for a, b in zip(steps, steps[1:])), e
    assert 0.95 <= min(acc) and max(acc) <= 1.0
    # at S = 10 the etas 0..1 are within the seed-to-seed spread of one cell
    repeats = data["repeat"]["frechet"]
    spread = max(repeats) - min(repeats)
    assert max(fd[e, 10] for e in others) - min(fd[e, 10] for e in others) < spread
    # from S = 50 on eta = 0 is the worst row, nearly flat, every eta > 0 below it
    for s in (50, 100, 1000):
        assert all(fd[0.0, s] > fd[e, s] for e in etas if e != 0.0), s
    assert max(fd[0.0, s] for s in (50, 100, 1000)) - min(fd[0.0, s] for s in (50, 100, 1000)) < 0.1 * spread
    draws = data["same_size_real_all"]
    assert f"gives {repeats[1]:.2f} and {repeats[2]:.2f} instead of {repeats[0]:.2f}" in PROSE
    assert f"score {min(draws):.1f} to {max(draws):.1f}" in PROSE and f"(mean {data['same_size_real']:.1f}" in PROSE
    assert f"held-out halves, {data['floor']:.1f}," in PROSE
    # the oracle table puts eta = 0 ahead of eta = 1 for S <= 100
    oracle = {(c["eta"], c["steps"]): c["frechet"] for c in _data("quality")["cells"]}
    assert all(oracle[0.0, s] < oracle[1.0, s] for s in (10, 20, 50, 100))


def test_throughput_rows_cover_the_digits_model_and_a_unet_at_one_and_two_threads():
    data = _data("throughput")
    cells = {(r["model"], r["threads"]) for r in data["rows"]}
    for model in ("digits", "tiny-unet", "small-unet"):
        assert {(model, 1), (model, 2)} <= cells, cells
    assert all(r["samples_per_s"] > 0 and r["samples"] == r["num"] for r in data["rows"])


def test_adherence_statements_hold_on_the_data():
    data = _data("adherence")
    acc = {row["scale"]: row["accuracy"] for row in data["rows"]}
    assert f"{data['num']} digits ({data['num'] // 10} per class), {data['steps']} DDIM steps, " \
           f"eta {data['eta']:g}, seed {data['seed']}" in PROSE
    # "Without guidance the conditional model is already class-faithful, guidance keeps it so,
    # and with no class the samples fall to chance"
    assert acc[1.0] >= 0.95
    assert all(a >= 0.95 for s, a in acc.items() if s > 1)
    assert acc[0.0] <= 0.2
    assert f"reads {data['classifier_test_accuracy']:.1%} of the other 20%" in PROSE


def test_digits_model_figures():
    model = load_digits_model()
    n_params = sum(p.numel() for p in model.net.parameters())
    assert f"{round(n_params / 1000)}k parameters" in PROSE
    weights = ROOT / "ddim_fused" / "digits" / "weights" / "digits_unet.pt"
    assert f"in a {weights.stat().st_size / 1e6:.1f} MB float16 file" in PROSE
    assert f"{DEFAULTS['epochs']} epochs of batch {DEFAULTS['batch_size']}" in PROSE
    assert f"{DEFAULTS['label_dropout']:.0%} of training labels" in PROSE
    clf = load_digits_classifier()
    assert f"reads {clf.test_accuracy:.1%} of the other 20%" in PROSE


@pytest.mark.parametrize("pattern", [r"\d+(\.\d+)? samples/s", r"\d+(\.\d+)? ms per step", r"about \d+ minutes"])
def test_no_unbacked_timing_claims_in_prose(pattern):
    # Timings in prose cannot be checked; the only timings are the generated tables'.
    outside = BLOCK.sub("", TEXT)
    found = re.search(pattern, outside)
    assert found is None, f"README states {found.group(0)!r} outside a data block"
