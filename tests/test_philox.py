"""The host's keyed stream: an independent float64 oracle, both host paths bitwise, bad input."""
import numpy as np
import pytest
import torch

from ddim_fused import philox, native
from ddim_fused.philox import NOISE_STREAMS, _keyed_normal_ops, keyed_normal_torch, philox4x32

MASK32 = 0xFFFFFFFF


def oracle_normals(batch, numel, seed, step, stream, sample_offset):
    """The stream from its definition, element by element, in float64 numpy.

    Element e of sample b: Philox4x32-10 of counter (e // 4, sample key, step key,
    (e // 4 >> 32) * 4 + stream) under key (seed lo, seed hi) -- the rounds from
    `philox4x32`, pinned to Random123's known answers in test_noise.py -- then uniforms
    ((bits >> 9) + 0.5) / 2**23 and lane e % 4 of the two Box-Muller pairs (u0, u1), (u2, u3).
    """
    elem = np.arange(numel, dtype=np.int64)
    sample = np.repeat(np.arange(batch, dtype=np.int64) + sample_offset, numel)
    elem = np.tile(elem, batch)
    counter = elem // 4
    words = [counter & MASK32, sample & MASK32, np.full_like(counter, step & MASK32), (counter >> 32) * 4 + stream]
    bits = philox4x32(*(torch.from_numpy(w) for w in words), seed)
    u = [((b.numpy() >> 9) + 0.5) / 2.0**23 for b in bits]
    radius_a, radius_b = np.sqrt(-2 * np.log(u[0])), np.sqrt(-2 * np.log(u[2]))
    lanes = np.stack([radius_a * np.cos(2 * np.pi * u[1]), radius_a * np.sin(2 * np.pi * u[1]),
                      radius_b * np.cos(2 * np.pi * u[3]), radius_b * np.sin(2 * np.pi * u[3])])
    return lanes[elem % 4, np.arange(elem.size)].reshape(batch, numel)


@pytest.mark.parametrize("stream", list(NOISE_STREAMS))
def test_normals_match_the_float64_oracle(stream):
    seed, step, offset = 2**62 + 977, 37, 2**32 - 2  # high key word used; sample keys wrap past 2**32
    got = keyed_normal_torch(3, 203, seed, [step, 0], stream, offset)[0].double().numpy()
    want = oracle_normals(3, 203, seed, step, NOISE_STREAMS[stream], offset)
    # fp32 rounding: the angle 2*pi*u (fp32 2*pi, one product rounding) is off by <= 7.5e-7,
    # log and sqrt by about one ulp each; times a radius < 5.8 that stays below 6e-6.
    # A wrong key, counter or lane moves a value by O(1).
    np.testing.assert_allclose(got, want, rtol=0, atol=6e-6)


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 4099])
@pytest.mark.parametrize("repeat", [False, True])
def test_c_kernel_and_torch_ops_give_the_same_bits(cpu_lib, numel, repeat):
    steps = torch.tensor([9, 0, 2**32 + 5])  # step keys use their low 32 bits, as in the kernel
    for stream, stream_id in NOISE_STREAMS.items():
        fast = keyed_normal_torch(3, numel, 2**40 + 3, steps.tolist(), stream, 2**32 - 1, repeat=repeat)
        ops = _keyed_normal_ops(3, numel, 2**40 + 3, steps, stream_id, 2**32 - 1, repeat)
        assert fast.shape == (3, 3, numel)
        assert torch.equal(fast, ops), stream


def test_the_same_bits_with_one_or_two_torch_threads(cpu_lib):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = keyed_normal_torch(2, 70001, 5, 3)
        torch.set_num_threads(2)
        two = keyed_normal_torch(2, 70001, 5, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_torch_ops_path_when_the_kernel_is_disabled(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.library() is None

    def kernel_called(*args, **kwargs):
        raise AssertionError("the C kernel ran although it is disabled")

    monkeypatch.setattr(philox, "keyed_normal_native", kernel_called)
    drawn = keyed_normal_torch(2, 9, 11, 4, "orig", 1)
    want = oracle_normals(2, 9, 11, 4, NOISE_STREAMS["orig"], 1)
    np.testing.assert_allclose(drawn.double().numpy(), want, rtol=0, atol=6e-6)


@pytest.mark.parametrize("batch, numel, step_key, shape", [
    (0, 5, 3, (0, 5)), (2, 0, 3, (2, 0)), (2, 5, [], (0, 2, 5)), (2, 5, [1], (1, 2, 5)),
])
def test_empty_draws_keep_their_shape(batch, numel, step_key, shape):
    assert keyed_normal_torch(batch, numel, 1, step_key).shape == shape


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(stream="noise"), ValueError, "stream"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(batch=-1), ValueError, "batch"),
    (dict(numel=-4), ValueError, "numel"),
    (dict(sample_offset=-1), ValueError, "sample_offset"),
    (dict(step_key=[[1, 2]]), ValueError, "step_key"),
])
def test_bad_input_is_named(kwargs, error, name):
    args = dict(batch=2, numel=8, seed=1, step_key=0, stream="step", sample_offset=0) | kwargs
    with pytest.raises(error, match=name):
        keyed_normal_torch(**args)


@pytest.mark.parametrize("seed, sample_offset", [(0, 0), (12345, 7), (2**40 + 3, 2**33 + 5), (2**63 - 1, 2**32 - 2)])
@pytest.mark.parametrize("repeat", [False, True], ids=["per-sample", "repeat"])
@pytest.mark.parametrize("stream", list(NOISE_STREAMS))
def test_tensor_keys_give_the_bits_of_int_keys(seed, sample_offset, repeat, stream):
    """0-d device tensors for seed and sample_offset (CUDA-graph replays) draw what the ints draw."""
    expected = keyed_normal_torch(3, 37, seed, [0, 4, 2**32 + 9], stream, sample_offset, repeat=repeat)
    got = keyed_normal_torch(3, 37, torch.tensor(seed), [0, 4, 2**32 + 9], stream, torch.tensor(sample_offset),
                             repeat=repeat)
    assert torch.equal(got, expected)
    one_key = keyed_normal_torch(2, 10, torch.tensor(seed), 5, stream, sample_offset, repeat=repeat)
    assert torch.equal(one_key, keyed_normal_torch(2, 10, seed, 5, stream, sample_offset, repeat=repeat))


def test_tensor_keys_are_written_in_place_between_draws():
    """A draw reads the key tensors' current values: refilling them redraws, as a graph replay does."""
    seed, offset = torch.tensor(1), torch.tensor(0)
    first = keyed_normal_torch(2, 8, seed, 3, "step", offset)
    seed.fill_(99)
    offset.fill_(4)
    assert torch.equal(keyed_normal_torch(2, 8, seed, 3, "step", offset), keyed_normal_torch(2, 8, 99, 3, "step", 4))
    assert not torch.equal(first, keyed_normal_torch(2, 8, seed, 3, "step", offset))


@pytest.mark.parametrize("bad", [torch.tensor([1]), torch.tensor(1, dtype=torch.int32), torch.tensor(1.0)],
                         ids=["1-d", "int32", "float"])
@pytest.mark.parametrize("name", ["seed", "sample_offset"])
def test_bad_tensor_keys_are_refused(name, bad):
    keys = {"seed": 1, "sample_offset": 0, name: bad}
    with pytest.raises(ValueError, match=name):
        keyed_normal_torch(1, 4, keys["seed"], 0, "step", keys["sample_offset"])
