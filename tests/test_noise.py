"""The in-kernel Philox noise: statistics, keys, and agreement with the torch stream."""
import math

import pytest
import torch

from ddim_fused.backend import kernels
from ddim_fused.philox import NOISE_STREAMS, keyed_normal_torch, philox4x32

# How far kernel noise may sit from the torch copy: 2e-6 on the precise path (the CPU
# interpreter), 1.5e-5 on the fast path every compiled launch takes.
NOISE_ATOL = kernels().noise.NOISE_ATOL[kernels().noise.FAST_MATH]


def keyed_normal(shape, seed=0, step_key=0, stream="step", sample_offset=0, *, device, dtype=torch.float32):
    """The noise kernel, with the host's stream names."""
    return kernels().keyed_normal(shape, seed, step_key, NOISE_STREAMS[stream], sample_offset, device=device,
                                  dtype=dtype)


def test_philox_matches_the_published_known_answer():
    # Random123's known-answer vector for philox4x32-10 (counter and key all ones bits).
    full = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = philox4x32(full, full, full, full, seed=0xFFFFFFFFFFFFFFFF)
    assert [int(v) for v in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    zero = torch.zeros(1, dtype=torch.int64)
    out = philox4x32(zero, zero, zero, zero, seed=0)
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_statistics_are_standard_normal(device):
    n = keyed_normal((2, 40000), seed=1234, device=device).double().flatten().cpu()
    assert abs(n.mean().item()) < 4 / math.sqrt(n.numel())  # 4 standard errors
    assert abs(n.std().item() - 1) < 0.01
    z = (n - n.mean()) / n.std()
    assert abs((z**3).mean().item()) < 0.05  # skewness
    assert abs((z**4).mean().item() - 3) < 0.1  # kurtosis
    # Kolmogorov-Smirnov distance to the normal CDF; the 0.1% critical value is 1.95 / sqrt(n).
    sorted_n, _ = n.sort()
    cdf = 0.5 * (1 + torch.erf(sorted_n / math.sqrt(2)))
    ecdf = torch.arange(1, n.numel() + 1, dtype=torch.float64) / n.numel()
    assert (cdf - ecdf).abs().max().item() < 1.95 / math.sqrt(n.numel())


def test_same_key_same_bits_and_different_keys_differ(device):
    a = keyed_normal((2, 3000), seed=7, step_key=3, device=device)
    assert torch.equal(a, keyed_normal((2, 3000), seed=7, step_key=3, device=device))
    for other in (dict(seed=8, step_key=3), dict(seed=7, step_key=4), dict(seed=7, step_key=3, stream="orig")):
        b = keyed_normal((2, 3000), device=device, **other)
        assert (a != b).float().mean() > 0.99
    # Neighbouring samples are independent streams, not shifted copies.
    assert abs(torch.corrcoef(a.cpu())[0, 1].item()) < 0.1


def test_sample_noise_does_not_depend_on_batch(device):
    batch = keyed_normal((4, 1173), seed=99, step_key=2, device=device)
    for i in range(4):
        alone = keyed_normal((1, 1173), seed=99, step_key=2, sample_offset=i, device=device)
        assert torch.equal(alone[0], batch[i])
    split = keyed_normal((2, 1173), seed=99, step_key=2, sample_offset=2, device=device)
    assert torch.equal(split, batch[2:])


def test_large_seeds_use_the_high_key_word(device):
    a = keyed_normal((1, 64), seed=5, device=device)
    b = keyed_normal((1, 64), seed=5 + 2**40, device=device)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("numel", [1, 5, 4099, 4100])
def test_torch_stream_reproduces_the_kernel(device, numel):
    kernel = keyed_normal((3, numel), seed=2**33 + 17, step_key=11, stream="orig", sample_offset=5, device=device)
    host = keyed_normal_torch(3, numel, 2**33 + 17, 11, "orig", 5, device=device)
    # Same integers; the normals differ only by the rounding of log/cos/sin.
    torch.testing.assert_close(kernel, host, rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("numel", [6, 256])
def test_half_precision_noise_is_the_stream_rounded(device, dtype, numel):
    # numel 256 draws four normals per Philox call in runs of 8 per thread, the fp16/bf16 layout.
    kernel = keyed_normal((3, numel), seed=41, step_key=2, device=device, dtype=dtype)
    host = keyed_normal_torch(3, numel, 41, 2, "step", device=device)
    assert kernel.dtype == dtype
    torch.testing.assert_close(kernel.float(), host, rtol=torch.finfo(dtype).eps, atol=NOISE_ATOL)


def test_batches_above_the_grid_y_limit(device):
    kernel = keyed_normal((70000, 3), seed=5, step_key=1, device=device)
    host = keyed_normal_torch(70000, 3, 5, 1, "step", device=device)
    torch.testing.assert_close(kernel, host, rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("keys,error,name", [
    (dict(seed=1.7), TypeError, "seed"), (dict(seed=-1), ValueError, "seed"),
    (dict(step_key=2**32), ValueError, "step_key"), (dict(sample_offset=2**32 - 1), ValueError, "sample_offset"),
])
def test_keys_that_would_wrap_are_refused(keys, error, name, device):
    args = {**dict(seed=1, step_key=0, stream=0, sample_offset=0), **keys}
    with pytest.raises(error, match=name):
        kernels().keyed_normal((2, 8), args["seed"], args["step_key"], args["stream"], args["sample_offset"],
                               device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("numel", [4098, 4096])
def test_fast_path_arithmetic_reproduces_the_stream(device, dtype, numel):
    # Every compiled launch takes the fast path. Forced here, the interpreter runs its
    # arithmetic (bit-pattern uniforms, the shifted angle, the series near u = 1) with
    # exact log2/sin/cos standing in for the GPU's approximate instructions.
    out = torch.empty(4, numel, dtype=dtype, device=device)
    launch = kernels().noise.noise_launch(out, 77, 5, NOISE_STREAMS["step"], 3)
    launch.kernel[launch.grid](*launch.args, **{**launch.kwargs, "FAST_MATH": True})
    host = keyed_normal_torch(4, numel, 77, 5, "step", 3, device=device)
    torch.testing.assert_close(out.float(), host, rtol=0 if dtype == torch.float32 else torch.finfo(dtype).eps,
                               atol=kernels().noise.NOISE_ATOL[True])
    # Pairs from u > 1 - 2**-8 have radius**2 < 2**-7: the series branch ran.
    pairs = host[:, : numel - numel % 2].reshape(4, -1, 2)
    assert ((pairs**2).sum(-1) < 2**-7).sum().item() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path (MUFU lg2/sin/cos) runs only on a GPU")
def test_fast_path_stays_within_its_documented_distance_of_the_torch_copy():
    # 4M normals: about 16,000 of them come from u > 1 - 2**-8, where -log(u) is the series.
    kernel = keyed_normal((4, 2**20), seed=2024, step_key=3, device="cuda")
    host = keyed_normal_torch(4, 2**20, 2024, 3, "step", device="cuda")
    assert (kernel - host).abs().max().item() <= kernels().noise.NOISE_ATOL[True]
    z = kernel.double().flatten()
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel()) and abs(z.std().item() - 1) < 2e-3


def test_stream_ids_are_distinct():
    assert len(set(NOISE_STREAMS.values())) == len(NOISE_STREAMS)


def test_several_steps_in_one_call_equal_separate_calls():
    together = keyed_normal_torch(3, 1173, 77, [4, 0, 9], "step", 2)
    for k, step in enumerate((4, 0, 9)):
        assert torch.equal(together[k], keyed_normal_torch(3, 1173, 77, step, "step", 2))


@pytest.mark.parametrize("shape", [(3, 2, 5), (2, 4, 4)], ids=["ungrouped", "grouped"])
def test_keys_read_from_device_memory_give_the_same_noise(device, shape):
    """What a captured loop launches: keys in 0-d tensors, read by the kernel when it runs."""
    seed, offset = 2**40 + 5, 7
    expected = kernels().keyed_normal(shape, seed, 3, NOISE_STREAMS["orig"], offset, device=device)
    seed_t = torch.tensor(seed, device=device)
    offset_t = torch.tensor(offset, device=device)
    out = torch.full(shape, float("nan"), device=device)
    got = kernels().keyed_normal(shape, seed_t, 3, NOISE_STREAMS["orig"], offset_t, device=device, out=out)
    assert got is out and torch.equal(out, expected)
    seed_t.fill_(seed + 1)  # a replay's new keys, written in place
    kernels().keyed_normal(shape, seed_t, 3, NOISE_STREAMS["orig"], offset_t, device=device, out=out)
    assert torch.equal(out, kernels().keyed_normal(shape, seed + 1, 3, NOISE_STREAMS["orig"], offset, device=device))


def test_tensor_keys_and_out_are_checked(device):
    seed_t = torch.tensor(1, device=device)
    with pytest.raises(ValueError, match="sample_offset: tensor keys"):
        kernels().keyed_normal((2, 4), seed_t, 0, 0, 0, device=device)
    with pytest.raises(ValueError, match="seed: tensor keys"):
        kernels().keyed_normal((2, 4), seed_t.to(torch.int32), 0, 0, seed_t, device=device)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernels().keyed_normal((2, 4), 1, 0, 0, 0, device=device, out=torch.empty(4, 2, device=device).t())
