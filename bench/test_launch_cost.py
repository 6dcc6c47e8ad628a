"""bench.launch_cost: every row runs with the kernel stubbed, and the stubs are undone."""
from bench import launch_cost
from ddim_fused import ops
from ddim_fused.backend import kernels
from ddim_fused.sampler import DDIMSampler


def _stubbed_state():
    ks = kernels()
    return (ks.ddim_step._ddim_step_kernel, ks.bound_step._ddim_step_kernel, ks.bound_step.DIRECT_LAUNCH,
            ks.bound_step._cuda_current, ks.bound_step._LAUNCHERS, ops.step_function, ops._EAGER_FIELDS,
            DDIMSampler._denoise_doubled, ks.bound_step.BoundStep.stores_twice)


def test_rows_cover_every_launcher_and_restore_the_kernel():
    before = _stubbed_state()
    rows = launch_cost.launch_rows(20)
    assert list(rows) == ["launch_ddim_step", "launch_step, bound per key", "bound step, ordinary launch",
                          "bound step, direct runner", "binding a call and one step"]
    assert all(us > 0 for us in rows.values())
    assert _stubbed_state() == before


def test_entry_rows_cover_the_op_the_scheduler_and_the_sampler_and_restore_everything():
    before = _stubbed_state()
    rows = launch_cost.entry_rows(200)
    want = ["ddim_step, operator (validated, dispatched)", "ddim_step, eager path"]
    try:
        import diffusers  # noqa: F401, PLC0415
        want += ["FusedDDIMScheduler.step, launch_ddim_step", "FusedDDIMScheduler.step, launch_step"]
    except ImportError:
        pass
    want += ["sampler step, eta0", "sampler step, guidance, torch.cat per step",
             "sampler step, guidance, doubled, copy per step", "sampler step, guidance, doubled, one launch"]
    assert list(rows) == want
    assert all(us > 0 for us in rows.values())
    assert _stubbed_state() == before


def test_global_check_counts_the_step_kernels_globals():
    count, us = launch_cost.global_check_us(20)
    assert count == 2 and us > 0  # INTERPRETED, read in cast.py and noise.py: see tests/test_host_cost.py
