"""Mutation check: break the code on purpose and show that the tests notice.

    python tests/mutate.py [--only NAME ...] [--write tests/mutation-results.txt] [--list]

Each mutation is one exact text replacement in one source file. The repository's files
(tracked and untracked, not ignored) are copied once to a temporary folder; for each
mutation the file is rewritten there, only the tests that should catch it are run
(`pytest -x`), and the file is restored. The working tree is never written. A mutation
is "caught" when those tests fail, "SURVIVED" when they pass; "error" covers a run that
stopped before testing (exit status other than 0 or 1), "stale" a replacement whose text
is no longer in the source (update the mutation), "not run" one that needs a GPU.

Before any mutation the same test selections run on the unmutated copy and must pass,
otherwise a "caught" would mean nothing. Not part of the default test run (pytest
collects test_*.py only); it takes a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str
    needs_gpu: bool = False


MUTATIONS = (
    # The five that survived the audit's run of the whole suite.
    Mutation("keyed-step-noise-halved", "ddim_fused/sampler.py",
             'noise_coef = table["noise_scale"][i] * temperature\n',
             'noise_coef = table["noise_scale"][i] * temperature * (0.5 if self.noise_source == "philox" else 1)\n',
             ("tests/test_sampler_parity.py",),
             "the default keyed Philox noise adds half the step noise (both backends)"),
    Mutation("bf16-ties-away-from-zero", "ddim_fused/kernels/cast.py",
             "bits + 0x7FFF + ((bits >> 16) & 1)", "bits + 0x8000",
             ("tests/test_step_precision.py::test_exact_ties_round_to_even", "tests/test_kernel_step.py"),
             "the kernel's bf16 store rounds ties away from zero instead of to even"),
    Mutation("torch-path-low-precision-math", "ddim_fused/torch_step.py",
             "compute = x.dtype if x.dtype in COMPUTE_DTYPES else torch.float32",
             "compute = x.dtype",
             ("tests/test_step_precision.py", "tests/test_sampler_parity.py"),
             "the torch path computes fp16/bf16 steps in fp16/bf16 instead of fp32"),
    Mutation("invert-eps-5-steps-early", "ddim_fused/sampler.py",
             "torch.as_tensor(self.coefs.time_steps[indices], device=device)",
             "torch.as_tensor(np.maximum(self.coefs.time_steps[indices] - (5 if invert else 0), 0), device=device)",
             ("tests/test_invert.py",),
             "invert evaluates eps 5 training steps before the step's time step"),
    Mutation("q_sample-step-stream", "ddim_fused/plan.py",
             'self.seed, index, "orig", self.sample_offset', 'self.seed, index, "step", self.sample_offset',
             ("tests/test_sampler_parity.py",),
             'q_sample draws its keyed noise from the "step" stream instead of "orig"'),
    Mutation("kernel-int32-offsets", "ddim_fused/kernels/ddim_step.py",
             "first = pid.to(tl.int64) * BLOCK", "first = pid * BLOCK",
             ("tests/test_kernel_step.py::test_more_than_2_to_the_31_elements",),
             "element offsets in int32: past 2**31 elements the kernel writes the wrong place", needs_gpu=True),
    # More of the same kind: each breaks one thing a user would see.
    Mutation("cfg-halves-swapped", "ddim_fused/kernels/ddim_step.py",
             "b_eps = b_eps_u + guidance * (b_eps_c - b_eps_u)", "b_eps = b_eps_c + guidance * (b_eps_u - b_eps_c)",
             ("tests/test_kernel_step.py",), "the kernel's guidance reads [cond; uncond] instead of [uncond; cond]"),
    Mutation("kernel-pred_x0-sign", "ddim_fused/kernels/ddim_step.py",
             "b_x0 = x0_x_coef * b_x + x0_eps_coef * b_eps", "b_x0 = x0_x_coef * b_x - x0_eps_coef * b_eps",
             ("tests/test_kernel_step.py",), "the kernel writes pred_x0 with the eps term's sign flipped"),
    Mutation("kernel-repeat-noise-ignored", "ddim_fused/kernels/noise.py",
             "        key = b * 0\n    else:", "        key = sample_offset + b\n    else:",
             ("tests/test_kernel_step.py",), "repeat_noise in the kernel draws per-sample noise (grouped path)"),
    Mutation("torch-paint-mask-inverted", "ddim_fused/torch_step.py",
             "acc.lerp_(orig_t, _as(step.mask.mask, compute))", "acc.lerp_(orig_t, 1 - _as(step.mask.mask, compute))",
             ("tests/test_sampler_parity.py",), "the torch path keeps the original where the mask is 0"),
    Mutation("philox-sample-offset-ignored", "ddim_fused/philox.py",
             "if repeat else torch.arange(sample_offset,", "if repeat else -sample_offset + torch.arange(sample_offset,",
             ("tests/test_sampler_parity.py",),
             "the torch Philox stream ignores sample_offset (batch-dependent noise)"),
    Mutation("direct-runner-1d-grid", "ddim_fused/kernels/bound_step.py",
             "grid = tuple(grid) + (1,) * (3 - len(grid))", "grid = tuple(grid)",
             ("tests/test_host_cost.py::test_direct_runner_reused_per_dtype_and_alignment",),
             "the sampler's direct kernel runner gets the 1-D grid (Triton's runner reads three dims)"),
    Mutation("direct-runner-ignores-hooks", "ddim_fused/kernels/bound_step.py",
             "if type(enter) is chain and type(leave) is chain and not (enter.calls or leave.calls):", "if True:",
             ("tests/test_host_cost.py::test_a_launch_hook_sends_direct_launches_through_tritons_runner",),
             "the direct runner launches past a profiler's hooks"),
    Mutation("graph-repeat-noise-offset", "ddim_fused/graph.py",
             "zero_t if repeat_noise else offset_t", "offset_t",
             ("tests/test_graph.py",),
             "a captured loop's repeated noise is keyed by the call's sample offset, not sample 0"),
    Mutation("initial-latent-step-stream", "ddim_fused/plan.py",
             'keyed_normal(shape, seed, 0, "initial",', 'keyed_normal(shape, seed, 0, "step",',
             ("tests/test_sampler_parity.py",), 'the initial latent comes from the "step" stream, not "initial"'),
    Mutation("reused-steps-keep-old-noise", "ddim_fused/sampler.py",
             "            table.refill(policy, step_fn)\n", "            pass\n",
             ("tests/test_host_cost.py",), "a call reusing a sampler's steps runs with the previous call's noise"),
    Mutation("c-step-guidance-halves-swapped", "ddim_fused/cpu_kernels.c",
             "if (eps_c) e = e + guidance * (eps_c[i] - e);", "if (eps_c) e = eps_c[i] + guidance * (e - eps_c[i]);",
             ("tests/test_native.py", "tests/test_sampler_parity.py"),
             "the C step's guidance reads [cond; uncond] instead of [uncond; cond]"),
    Mutation("c-paint-mask-inverted", "ddim_fused/cpu_kernels.c",
             "out[j] = m * t + (acc[j] - m * acc[j]);", "out[j] = m * acc[j] + (t - m * t);",
             ("tests/test_native.py",), "the C paint step keeps the original where the mask is 0"),
    Mutation("c-paint-orig-noise-dropped", "ddim_fused/cpu_kernels.c",
             "if (orig_noise) t = t + c->orig_noise_coef * orig_noise[j];", "",
             ("tests/test_native.py",), "the C paint step blends in the original without its noise"),
    Mutation("c-paint-run-mask-one-value", "ddim_fused/cpu_kernels.c",
             "mask + o * inner,\n                       1, inner", "mask + o * inner,\n                       0, inner",
             ("tests/test_native.py",), "a (B, 1, H, W) mask: the C paint step reads one mask value per run"),
    Mutation("c-paint-shared-orig-per-sample", "ddim_fused/cpu_kernels.c",
             "AT(orig, orig_rows), AT(orig_noise, orig_noise_rows), mask + o * inner",
             "AT(orig, 0), AT(orig_noise, orig_noise_rows), mask + o * inner",
             ("tests/test_native.py",), "a batch-shared orig is read as if it had one row per sample"),
    Mutation("c-paint-chunk-offset", "ddim_fused/cpu_kernels.c",
             "blend_span(out + j, acc, orig + j,", "blend_span(out + j, acc, orig,",
             ("tests/test_native.py",), "the C paint step blends every chunk with the first chunk's original"),
    Mutation("scheduler-noise-unscaled", "ddim_fused/diffusers.py",
             "noise.normal_(0.0, coefs.std, generator=generator)", "noise.normal_(0.0, 1.0, generator=generator)",
             ("tests/test_diffusers_scheduler.py",), "the diffusers step adds its eta > 0 noise without std"),
)


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree, as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(copy: Path, tests, timeout_s: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout_s:.0f} s"
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    failed = next((ln for ln in lines if ln.startswith("FAILED")), "")
    return out.returncode, failed or (lines[-1] if lines else out.stderr[-300:])


def check_isolation(copy: Path) -> None:
    """The copy's tests import the copy's package and kernels, not the working tree's."""
    code = "import ddim_fused, ddim_fused.kernels; print(ddim_fused.__file__); print(ddim_fused.kernels.__file__)"
    env = dict(os.environ, PYTHONPATH=str(copy), TRITON_INTERPRET="1")
    files = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    outside = [f for f in files if not Path(f).absolute().is_relative_to(copy)]
    if outside:
        raise SystemExit(f"mutate: the copy imports modules from outside it: {outside}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/mutate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run only these mutations (by name)")
    parser.add_argument("--write", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per test run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"mutate: error: unknown mutation(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:30s} {m.path}: {m.why}")
        return 0
    try:
        import torch  # noqa: PLC0415 - only to see whether a GPU is here
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False

    # SIGTERM unwinds like Ctrl-C: subprocess.run kills the running pytest and the
    # temporary copy is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    report = [f"mutation check: {len(chosen)} mutations, tests run with {Path(sys.executable).name} "
              f"({'CUDA' if has_cuda else 'CPU, Triton interpreter'})"]
    with tempfile.TemporaryDirectory(prefix="ddim-mutate-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        check_isolation(copy)
        runnable = [m for m in chosen if has_cuda or not m.needs_gpu]
        selections = sorted({t for m in runnable for t in m.tests})
        code, last = run_tests(copy, selections, args.timeout)
        report.append(f"baseline (unmutated): {'pass' if code == 0 else 'FAIL'}: {' '.join(selections)}: {last}")
        print(report[-1], flush=True)
        if code != 0:
            print("\n".join(report))
            return 1
        counts = {}
        for m in chosen:
            target = copy / m.path
            source = target.read_text()
            hits = source.count(m.old)
            if m.needs_gpu and not has_cuda:
                verdict, detail = "not run", "needs CUDA"
            elif hits != 1:
                verdict, detail = "stale", f"the replaced text occurs {hits} times in {m.path}"
            else:
                target.write_text(source.replace(m.old, m.new))
                try:
                    code, detail = run_tests(copy, m.tests, args.timeout)
                finally:
                    target.write_text(source)
                verdict = {0: "SURVIVED", 1: "caught"}.get(code, "error")
            counts[verdict] = counts.get(verdict, 0) + 1
            report.append(f"{verdict:8s} {m.name:30s} {m.why}\n         tests: {' '.join(m.tests)}\n"
                          f"         {detail}")
            print(report[-1], flush=True)
    report.append("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                  + f" ({time.time() - started:.0f} s)")
    print(report[-1])
    if args.write:
        args.write.write_text("\n".join(report) + "\n")
    return 0 if not counts.get("SURVIVED") and not counts.get("error") and not counts.get("stale") else 1


if __name__ == "__main__":
    sys.exit(main())
