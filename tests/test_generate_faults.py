"""Property-based file-system faults against generate: a finished run folder is mutated at random
(delete, truncate, swap, symlink, or replace by another run's copy any of run.json, manifest.json,
the shards, the lock, the preview), then the run is repeated. After the second run:

- it ends with status 0 (cli.errors.classify's mapping) and every sample equals the first run's
  bit for bit, metadata included; or it is refused with status 2 and changed no file;
- load_samples and generate agree: a folder load_samples accepts is one generate keeps whole
  (nothing regenerated; only a lock that is not a plain file may refuse it), and after a run
  that ends with status 0, load_samples accepts the folder.

Runs go through ddim_fused.generate.run_generation in-process with a tiny batch-invariant model,
in all three output formats. Symlinks point inside the folder, to the same file of a finished run
of another configuration next to it, or nowhere; copies come from that other run.
DDIM_FUSED_FAULT_EXAMPLES sets the number of examples (default 30, about 20 s on 2 busy cores).
"""
import dataclasses
import os
import shutil
import warnings
from datetime import timedelta

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install 'ddim-fused[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ddim_fused import generate as gen  # noqa: E402
from ddim_fused.cli.errors import classify  # noqa: E402
from ddim_fused.shards import FORMAT  # noqa: E402
from tests.test_generate import CONFIG, INFO, TinyModel  # noqa: E402

EXAMPLES = int(os.environ.get("DDIM_FUSED_FAULT_EXAMPLES", "30"))
FAULT_CONFIG = dataclasses.replace(CONFIG, num=5, shard_size=2, batch_size=2, steps=4)  # shards of 2, 2, 1
TARGETS = ["run.json", "manifest.json", "shard0", "shard1", "shard2", gen.LOCK_FILE, gen.PREVIEW]
TARGET = st.sampled_from(TARGETS)
MUTATION = st.one_of(
    st.tuples(st.just("delete"), TARGET),
    st.tuples(st.just("truncate"), TARGET, st.integers(0, 99)),
    st.tuples(st.just("swap"), TARGET, TARGET),
    st.tuples(st.just("copy from the other run"), TARGET),
    st.tuples(st.just("symlink"), TARGET, st.sampled_from(["inside", "other run", "nowhere"]), TARGET),
)


def config(output_format, seed=FAULT_CONFIG.seed):
    return dataclasses.replace(FAULT_CONFIG, format=output_format, seed=seed)


def generate(out, cfg):
    """(status as the CLI reports it, samples written or None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "regenerating ...": what happens is checked on the files
        try:
            summary = gen.run_generation(out, cfg, TinyModel, INFO, progress=False, preview=True)
        except Exception as exc:  # noqa: BLE001 - classified as the CLI does; anything but 2 fails below
            return classify(exc)[0], repr(exc)
    return 0, summary["samples_written"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """{format: (a finished run folder, one of another configuration)}, copied per example."""
    root = tmp_path_factory.mktemp("finished")
    runs = {}
    for output_format in FORMAT:
        mine, other = root / f"{output_format}-mine", root / f"{output_format}-other"
        for out, seed in ((mine, FAULT_CONFIG.seed), (other, FAULT_CONFIG.seed + 1)):
            assert generate(out, config(output_format, seed))[0] == 0
        runs[output_format] = (mine, other)
    return runs


def name_of(target, output_format):
    return FORMAT[output_format].shard_name(int(target[-1])) if target.startswith("shard") else target


def remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def mutate(out, other, output_format, mutation):
    op, target = mutation[0], out / name_of(mutation[1], output_format)
    if op == "delete":
        remove(target)
    elif op == "truncate":
        if target.is_dir() and not target.is_symlink():  # a png shard: its index, or one of its PNGs
            pngs = sorted(target.glob("*.png"))
            target = target / "metadata.jsonl" if mutation[2] % 2 or not pngs else pngs[0]
        if target.is_file() and not target.is_symlink():
            data = target.read_bytes()
            target.write_bytes(data[:len(data) * mutation[2] // 100])
    elif op == "copy from the other run":
        source = other / target.name
        if os.path.lexists(source):
            remove(target)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    elif op == "swap":
        second = out / name_of(mutation[2], output_format)
        if target != second and os.path.lexists(target) and os.path.lexists(second):
            parked = out / "parked"
            os.rename(target, parked)
            os.rename(second, target)
            os.rename(parked, second)
    else:  # symlink
        where, to = mutation[2], name_of(mutation[3], output_format)
        link = {"inside": to, "other run": f"../{other.name}/{to}", "nowhere": "missing"}[where]
        if link != target.name:
            remove(target)
            target.symlink_to(link)


def snapshot(out):
    """{path: (kind, bytes or link target)} of everything in the folder but the lock (which a refused
    run may have taken), without following symlinks."""
    found = {}
    for here, dirs, names in os.walk(out):
        for name in dirs + names:
            path = os.path.join(here, name)
            rel = os.path.relpath(path, out)
            if rel == gen.LOCK_FILE:
                continue
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[rel] = ("file", f.read())
            else:
                found[rel] = ("dir", None)
    return found


def loads(out):
    try:
        return gen.load_samples(out)
    except gen.CorruptRunError:
        return None


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(output_format=st.sampled_from(sorted(FORMAT)), mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_faults_between_two_runs_keep_every_sample_or_refuse(finished, tmp_path_factory, output_format, mutations):
    mine, other_run = finished[output_format]
    root = tmp_path_factory.mktemp("fault")
    out, other = root / "run", root / "other"
    shutil.copytree(mine, out, symlinks=True)
    shutil.copytree(other_run, other, symlinks=True)
    reference = gen.load_samples(mine)
    for mutation in mutations:
        mutate(out, other, output_format, mutation)
    before, loaded_before = snapshot(out), loads(out)
    other_before = snapshot(other)

    status, written = generate(out, config(output_format))
    shown = f"mutations={mutations!r} format={output_format} status={status} written={written!r}"
    assert status in (0, 2), shown
    assert snapshot(other) == other_before, shown  # nothing outside the folder is written
    if status == 2:
        assert snapshot(out) == before, shown  # refused: nothing replaced
        lock = out / gen.LOCK_FILE
        lock_refused = lock.is_symlink() or (os.path.lexists(lock) and not lock.is_file())
        assert loaded_before is None or lock_refused, shown
        return
    after = loads(out)
    assert after is not None, shown
    assert np.array_equal(after["samples"], reference["samples"]), shown
    assert after["metadata"] == reference["metadata"] and np.array_equal(after["labels"], reference["labels"]), shown
    if loaded_before is not None:
        assert written == 0, shown  # a folder load_samples accepts is kept whole
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")], shown
