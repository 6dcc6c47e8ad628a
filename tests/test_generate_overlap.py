"""generate_shards decodes each batch on a thread while the next is sampled: same shards, bounded, failures kept."""
import dataclasses
import threading

import numpy as np
import pytest

from ddim_fused import generate as gen
from test_generate import CONFIG, INFO, TinyModel, run

TIMEOUT = 30  # seconds; a wait that long means the overlap is not there


def slow(b0):
    threading.Event().wait(0.05)  # a slow decode: the sampler runs ahead as far as it may


def test_shards_equal_batches_finished_one_by_one_on_the_sampling_thread(tmp_path):
    # Batches of 4 across shards of 6: the last batch of a shard and the first of the next overlap.
    run(tmp_path)
    data = gen.load_samples(tmp_path)
    inputs = gen._class_inputs(TinyModel(), CONFIG)
    sampler = inputs.sampler(CONFIG.steps, CONFIG.discretize, CONFIG.eta, backend=CONFIG.backend, seed=CONFIG.seed)
    expected = np.concatenate([gen.sample_batch(inputs, sampler, CONFIG, b0, min(b0 + 4, CONFIG.num))
                               for b0 in range(0, CONFIG.num, 4)])
    assert np.array_equal(data["samples"], expected)


class Recorder:
    """Stands in for sample_latents / finish_batch, recording which thread ran what and when."""

    def __init__(self, monkeypatch, finish=None):
        self.sampled, self.finished, self.threads = [], [], set()
        self.most_waiting = 0
        self.lock = threading.Lock()
        self.real_sample, self.real_finish = gen.sample_latents, gen.finish_batch
        self.finish_hook = finish
        monkeypatch.setattr(gen, "sample_latents", self.sample)
        monkeypatch.setattr(gen, "finish_batch", self.finish)

    def sample(self, inputs, sampler, config, b0, b1):
        with self.lock:
            self.sampled.append(b0)
            self.most_waiting = max(self.most_waiting, len(self.sampled) - len(self.finished) - 1)
        return self.real_sample(inputs, sampler, config, b0, b1)

    def finish(self, inputs, config, x, b0):
        self.threads.add(threading.current_thread().name)
        if self.finish_hook is not None:
            self.finish_hook(b0)
        out = self.real_finish(inputs, config, x, b0)
        with self.lock:
            self.finished.append(b0)
        return out


def test_the_next_batch_is_sampled_while_one_is_finished(tmp_path, monkeypatch):
    second_sampled = threading.Event()

    def finish(b0):
        # Finishing batch 0 waits until batch 1 is being sampled: without the overlap this never happens.
        if b0 == 0:
            assert second_sampled.wait(TIMEOUT), "batch 1 was not sampled while batch 0 was finished"

    recorder = Recorder(monkeypatch, finish)
    real_sample = recorder.sample

    def sample(inputs, sampler, config, b0, b1):
        if b0 == 4:
            second_sampled.set()
        return real_sample(inputs, sampler, config, b0, b1)

    monkeypatch.setattr(gen, "sample_latents", sample)
    assert run(tmp_path)["samples_written"] == CONFIG.num
    assert recorder.finished == recorder.sampled == [0, 4, 6, 10, 12, 16, 18]  # batches of 4 within shards of 6
    assert recorder.threads and threading.current_thread().name not in recorder.threads
    assert all(name.startswith("ddim-fused-finisher") for name in recorder.threads)


def test_at_most_finish_depth_batches_wait(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, slow)
    run(tmp_path, dataclasses.replace(CONFIG, batch_size=2))
    assert recorder.most_waiting == gen._FINISH_DEPTH


def test_a_new_batch_size_under_cuda_graph_waits_for_the_finisher(tmp_path, monkeypatch):
    # Capturing a graph for a new batch size must not meet another thread's CUDA calls.
    recorder = Recorder(monkeypatch, slow)
    real_sample = recorder.sample
    idle_at_new_size = []

    def sample(inputs, sampler, config, b0, b1):
        with recorder.lock:
            if b1 - b0 not in {s for s, _ in idle_at_new_size}:
                idle_at_new_size.append((b1 - b0, len(recorder.finished) == len(recorder.sampled)))
        return real_sample(inputs, sampler, dataclasses.replace(config, cuda_graph=False), b0, b1)

    monkeypatch.setattr(gen, "sample_latents", sample)
    config = dataclasses.replace(CONFIG, cuda_graph=True)
    chash = gen.prepare_dir(tmp_path, config, INFO)
    gen.generate_shards(tmp_path, config, TinyModel(), chash, range(config.n_shards), model_info=INFO)
    # Shards of 6 in batches of 4: sizes 4 and 2 (and 2 again), each first met with nothing in flight.
    assert idle_at_new_size == [(4, True), (2, True)]


def test_a_failed_batch_stops_the_run_and_no_shard_holding_it_is_written(tmp_path, monkeypatch):
    def fail(b0):
        if b0 == 12:  # shard 2 (samples 12..17)
            raise gen.NonFiniteError("generated samples hold NaN")

    Recorder(monkeypatch, fail)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(gen.NonFiniteError):
        run(tmp_path)
    written = sorted(p.name for p in tmp_path.glob("shard-*"))
    assert "shard-000002.npz" not in written and "shard-000003.npz" not in written
    assert set(written) <= {"shard-000000.npz", "shard-000001.npz"}
    assert not (tmp_path / "manifest.json").exists()
    # The finisher is gone: no thread of it is left behind.
    assert not [t for t in threading.enumerate() if t.name.startswith("ddim-fused-finisher") and t.name not in before]


def test_progress_counts_every_sample_once(tmp_path):
    counted = []
    config = CONFIG
    chash = gen.prepare_dir(tmp_path, config, INFO)
    gen.generate_shards(tmp_path, config, TinyModel(), chash, range(config.n_shards), on_batch=counted.append,
                        model_info=INFO)
    assert sum(counted) == config.num and counted == [4, 2, 4, 2, 4, 2, 4]
