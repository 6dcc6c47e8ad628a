"""bench.launch_cost: every launcher row runs with the kernel stubbed, and the stubs are undone."""
from bench import launch_cost
from ddim_fused.backend import kernels


def test_rows_cover_every_launcher_and_restore_the_kernel():
    ks = kernels()
    before = (ks.ddim_step._ddim_step_kernel, ks.bound_step._ddim_step_kernel, ks.bound_step.DIRECT_LAUNCH,
              ks.bound_step._cuda_current)
    rows = launch_cost.launch_rows(20)
    assert list(rows) == ["launch_ddim_step", "bound step, ordinary launch", "bound step, direct runner",
                          "binding a call and one step"]
    assert all(us > 0 for us in rows.values())
    assert (ks.ddim_step._ddim_step_kernel, ks.bound_step._ddim_step_kernel, ks.bound_step.DIRECT_LAUNCH,
            ks.bound_step._cuda_current) == before


def test_global_check_counts_the_step_kernels_globals():
    count, us = launch_cost.global_check_us(20)
    assert count == 2 and us > 0  # INTERPRETED, read in cast.py and noise.py: see tests/test_host_cost.py
