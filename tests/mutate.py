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
             ("tests/test_host_cost.py::test_a_launch_hook_sends_direct_launches_through_tritons_launch",),
             "the direct runner launches past a profiler's hooks"),
    Mutation("launch-step-layout-ignores-guidance", "ddim_fused/kernels/bound_step.py",
             "key = (guidance is None, coef == 0.0,", "key = (False, coef == 0.0,",
             ("tests/test_host_cost.py::"
              "test_launch_step_binds_per_shape_dtype_and_flags_and_never_reuses_a_stale_layout",),
             "launch_step reuses an unguided layout for a guided step (a stale binding)"),
    Mutation("eager-op-skips-the-overlap-check", "ddim_fused/ops.py",
             "if (out is not None or x0_out is not None or eps_out is not None) and not self._disjoint(",
             "if False and not self._disjoint(",
             ("tests/test_ops.py::test_eager_path_still_names_bad_values",),
             "ddim_step's eager path writes into an output that overlaps an input"),
    Mutation("guided-loop-skips-the-second-half", "ddim_fused/sampler.py",
             "                            high.copy_(low)\n", "                            pass\n",
             ("tests/test_host_cost.py::test_guided_loop_without_cat_equals_the_loop_with_it",),
             "the guided loop's model input keeps a stale second half"),
    Mutation("kernel-stores-one-half", "ddim_fused/kernels/ddim_step.py",
             "tl.store((out_ptr + total) + offs, b_store, mask=live)", "pass",
             ("tests/test_host_cost.py::test_guided_loop_without_cat_equals_the_loop_with_it",),
             "a guided kernel step leaves the second half of the model's next input stale"),
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
             "if (eps_c) e = e + c->guidance * (eps_c[j] - e);", "if (eps_c) e = eps_c[j] + c->guidance * (e - eps_c[j]);",
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
    # One per module and rule, each a one-token slip a user would see in their samples or
    # at their terminal.
    # schedules
    Mutation("cosine-schedule-offset", "ddim_fused/schedules.py", "        s = 0.008\n", "        s = 0.08\n",
             ("tests/test_schedules.py",), "the cosine schedule's offset s is 0.08 instead of 0.008"),
    Mutation("uniform-steps-off-by-one", "ddim_fused/schedules.py",
             "steps = np.arange(0, T, T // S) + 1", "steps = np.arange(0, T, T // S)",
             ("tests/test_schedules.py",), "uniform spacing starts at time step 0 instead of 1 (labml's rule)"),
    Mutation("scaled-linear-not-squared", "ddim_fused/schedules.py",
             "math.sqrt(end), n_steps, dtype=np.float64) ** 2", "math.sqrt(end), n_steps, dtype=np.float64)",
             ("tests/test_schedules.py",), "scaled_linear betas are the square roots, not their squares"),
    # coefficients (the DDIM algebra)
    Mutation("ddim-variance-inverted", "ddim_fused/coefficients.py",
             "return (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)",
             "return (1 - alpha) / (1 - alpha_prev) * (1 - alpha / alpha_prev)",
             ("tests/test_coefficients.py",), "sigma(eta) uses (1 - a) / (1 - a_prev): eta > 0 adds the wrong noise"),
    Mutation("v-prediction-eps-sign", "ddim_fused/coefficients.py",
             "x0_split, eps = (sa, -sb, one), (sb, sa)", "x0_split, eps = (sa, -sb, one), (sb, -sa)",
             ("tests/test_coefficients.py",), "v-prediction models get eps with the x term's sign flipped"),
    Mutation("sigma-hat-noise-level", "ddim_fused/coefficients.py",
             "np.sqrt(1 - alpha / alpha_prev) if eta == SIGMA_HAT", "np.sqrt(1 - alpha) if eta == SIGMA_HAT",
             ("tests/test_coefficients.py", "tests/test_sampler_parity.py"),
             "eta='sigma_hat' adds noise of scale sqrt(1 - a) instead of sqrt(1 - a / a_prev)"),
    Mutation("inversion-x-coefficient", "ddim_fused/coefficients.py",
             "inv_x_coef = np.sqrt(alpha) * inv.x0[0]", "inv_x_coef = np.sqrt(alpha_prev) * inv.x0[0]",
             ("tests/test_invert.py",), "DDIM inversion scales x by sqrt(a_prev) instead of sqrt(a)"),
    Mutation("paint-prev-blend-last-level", "ddim_fused/coefficients.py",
             "a = 1.0 if index == 0 else float(self.alpha_prev[index])", "a = float(self.alpha_prev[index])",
             ("tests/test_sampler_parity.py",),
             "paint's alpha_prev blend re-noises the original at the last step instead of keeping it clean"),
    # x0 limits (clip, dynamic thresholding)
    Mutation("threshold-quantile-signed", "ddim_fused/x0_clip.py",
             "torch.quantile(work.abs(), self.threshold_ratio", "torch.quantile(work, self.threshold_ratio",
             ("tests/test_x0_clip.py",), "dynamic thresholding takes the quantile of x0, not of |x0|"),
    # torch path
    Mutation("torch-guidance-weight-flipped", "ddim_fused/torch_step.py",
             "torch.lerp(*mo.tensor_split(2), step.guidance)", "torch.lerp(*mo.tensor_split(2), 1 - step.guidance)",
             ("tests/test_step_precision.py", "tests/test_sampler_parity.py"),
             "the torch path's guidance weighs eps_u by the scale instead of eps_c"),
    Mutation("torch-update-without-noise-scale", "ddim_fused/torch_step.py",
             "acc = torch.add(noise_term, xc, alpha=x_coef, out=out)", "acc = torch.add(noise_term, xc, out=out)",
             ("tests/test_step_precision.py", "tests/test_sampler_parity.py"),
             "the torch path's noisy step forgets x's coefficient"),
    # Philox streams: torch, Triton and C must give the same published bits
    Mutation("philox-torch-key-bump", "ddim_fused/philox.py",
             "_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85", "_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE84",
             ("tests/test_philox.py",), "the torch Philox key schedule's second constant is off by one"),
    Mutation("philox-kernel-key-bump", "ddim_fused/kernels/noise.py",
             "k1 += 0xBB67AE85", "k1 += 0xBB67AE84",
             ("tests/test_kernel_step.py::test_in_kernel_noise_matches_the_keyed_stream",),
             "the kernel's Philox key schedule differs from the published one"),
    Mutation("philox-c-key-bump", "ddim_fused/cpu_kernels.c",
             "#define KEY_B 0xBB67AE85u", "#define KEY_B 0xBB67AE84u",
             ("tests/test_native.py",), "the C Philox key schedule differs from the torch stream"),
    # sampler and plan
    Mutation("sample-skips-the-last-step", "ddim_fused/sampler.py",
             "range(self.coefs.n_steps - 1 - skip_steps, -1, -1)", "range(self.coefs.n_steps - 1 - skip_steps, 0, -1)",
             ("tests/test_sampler_parity.py",), "sample stops one step short of x_0"),
    Mutation("guidance-halves-concatenated-backwards", "ddim_fused/plan.py",
             "return cls(model, torch.cat([uncond_cond, cond]), uncond_cond, uncond_scale)",
             "return cls(model, torch.cat([cond, uncond_cond]), uncond_cond, uncond_scale)",
             ("tests/test_sampler_parity.py",), "the guided model call gets [cond; uncond] instead of [uncond; cond]"),
    Mutation("get-eps-ignores-guidance", "ddim_fused/plan.py",
             "return uncond + (conditional - uncond) * self.scale", "return conditional",
             ("tests/test_sampler_parity.py::test_get_eps_is_the_guided_model_output",),
             "the public get_eps returns the conditional output whatever uncond_scale is"),
    Mutation("interpolation-weights-swapped", "ddim_fused/interpolation.py",
             "torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b", "torch.sin(w * theta) * a + torch.sin(w * theta) * b",
             ("tests/test_interpolation.py",), "slerp weighs the first latent by w instead of 1 - w"),
    # diffusers integration
    Mutation("scheduler-set-alpha-to-one-ignored", "ddim_fused/diffusers.py",
             "final = 1.0 if self.config.set_alpha_to_one else alphas_cumprod[0]", "final = alphas_cumprod[0]",
             ("tests/test_diffusers_scheduler.py",), "FusedDDIMScheduler's last step ignores set_alpha_to_one"),
    Mutation("learned-variance-keeps-the-variance", "ddim_fused/diffusers_models.py",
             "out = out[:, :self.channels]", "out = out[:, self.channels:]",
             ("tests/test_models.py::test_a_learned_variance_unet_gives_its_eps_half",),
             "a learned-variance UNet's variance half is taken as its eps"),
    Mutation("unet-down-sampling-factor", "ddim_fused/diffusers_models.py",
             "2 ** (len(config.down_block_types) - 1)", "2 ** (len(config.down_block_types) - 2)",
             ("tests/test_byo_cli.py::test_bad_model_folders_exit_2_before_any_work",),
             "a --shape the UNet cannot down-sample passes the check and fails mid-run"),
    Mutation("bin-weights-asked-as-safetensors", "ddim_fused/diffusers_models.py",
             "local_files_only=True, use_safetensors=safetensors)", "local_files_only=True)",
             ("tests/test_byo_cli.py::test_a_folder_with_bin_weights_loads_with_nothing_on_stderr",),
             "a folder of .bin weights prints diffusers' 'An error occurred' line on success"),
    # k-diffusion
    Mutation("k-diffusion-sigma-up-uncapped", "ddim_fused/k_diffusion.py",
             "up = min(sigma_next, eta * math.sqrt(", "up = (eta * math.sqrt(",
             ("tests/test_k_diffusion.py::test_eta_above_1_caps_the_noise_as_k_diffusion_does",),
             "above eta 1 sigma_up exceeds sigma_next (k-diffusion caps it)"),
    Mutation("k-diffusion-euler-ratio", "ddim_fused/k_diffusion.py",
             "        ratio = sigma_down / sigma\n", "        ratio = sigma_next / sigma\n",
             ("tests/test_k_diffusion.py",), "the ancestral step moves to sigma_next instead of sigma_down"),
    # model loading
    Mutation("folder-shape-from-out-channels", "ddim_fused/models.py",
             'sample_shape = (config["in_channels"],) + tuple(hw)', 'sample_shape = (config["out_channels"],) + tuple(hw)',
             ("tests/test_models.py",), "a folder's default sample shape takes the UNet's output channels"),
    Mutation("digits-weights-ignored", "ddim_fused/models.py",
             "load_digits_model(device=device, dtype=dtype, path=weights)",
             "load_digits_model(device=device, dtype=dtype, path=None)",
             ("tests/test_cli_errors.py",), "--weights is ignored: the shipped digits model runs instead"),
    Mutation("uncond-without-guidance-accepted", "ddim_fused/conditioning.py",
             "if uncond is not None and self.guidance == 1.0:", "if uncond is not None and self.guidance == 0.0:",
             ("tests/test_models.py", "tests/test_byo_cli.py::test_uncond_without_guidance_is_refused"),
             "--uncond without guidance is silently unused (yet hashed into run.json)"),
    # generation
    Mutation("generate-noise-keyed-by-batch", "ddim_fused/generate.py",
             "cond, sample_offset=b0,", "cond, sample_offset=b0 % config.shard_size,",
             ("tests/test_generate.py",), "a shard's noise is keyed by the index within the shard, not the run"),
    Mutation("decode-not-overlapped", "ddim_fused/generate.py",
             "while len(pending) > (0 if idle else _FINISH_DEPTH):", "while len(pending) > 0:",
             ("tests/test_generate_overlap.py",), "each batch is decoded before the next is sampled"),
    Mutation("capture-meets-the-finisher", "ddim_fused/generate.py",
             "idle = config.cuda_graph and b1 - b0 not in captured_sizes", "idle = False",
             ("tests/test_generate_overlap.py",),
             "a new batch size is captured while the finisher thread makes CUDA calls"),
    Mutation("resume-keeps-foreign-shards", "ddim_fused/shards.py",
             "if chash is not None and shard.config_hash != chash:", "if False and shard.config_hash != chash:",
             ("tests/test_generate_foreign.py",),
             "an intact shard of another configuration is kept as this run's (and listed in its manifest)"),
    Mutation("no-run-json-shard-hash-unchecked", "ddim_fused/generate.py",
             "        if shard.config_hash != chash:", "        if False:",
             ("tests/test_generate_foreign.py::test_without_run_json_another_configuration_is_refused_and_nothing_"
              "is_replaced",),
             "without run.json, the shards' own config hash is never read: another configuration overwrites them"),
    Mutation("shard-symlinks-lead-out", "ddim_fused/shards.py",
             "    if target.parent != root:", "    if False:",
             ("tests/test_generate_foreign.py",),
             "a shard linked out of the run folder is kept by a resume and read by load_samples"),
    Mutation("png-sha256-unchecked", "ddim_fused/shards.py",
             'if hashlib.sha256(png).hexdigest() != record.get("png_sha256"):', "if False:",
             ("tests/test_generate_formats.py",), "a PNG replaced by another valid PNG passes as the sample"),
    # atomic writes
    Mutation("atomic-file-not-fsynced", "ddim_fused/atomic.py",
             "                f.flush()\n                os.fsync(f.fileno())\n", "                f.flush()\n",
             ("tests/test_atomic.py",), "only the folder is fsynced: a crash can leave a renamed, empty file"),
    Mutation("atomic-temp-not-exclusive", "ddim_fused/atomic.py",
             "os.O_WRONLY | os.O_CREAT | os.O_EXCL |", "os.O_WRONLY | os.O_CREAT |",
             ("tests/test_atomic.py",), "a file or symlink planted at the temporary name is written through"),
    Mutation("atomic-failed-write-leaves-temps", "ddim_fused/atomic.py",
             "        for tmp in temps:\n            _unlink_quietly(tmp)\n", "        for tmp in temps:\n            pass\n",
             ("tests/test_atomic.py",), "a failed write leaves its temporary files behind"),
    # the command line
    Mutation("cli-usage-errors-exit-1", "ddim_fused/cli/status.py",
             "EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130", "EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 1, 130",
             ("tests/test_cli_errors.py",), "bad arguments exit 1 like runtime failures"),
    Mutation("cli-closed-pipe-fails-the-command", "ddim_fused/cli/errors.py",
             "                return self._stream.write(text)\n            except BrokenPipeError:",
             "                return self._stream.write(text)\n            except ValueError:",
             ("tests/test_cli_entry.py::test_a_closed_stdout_pipe_still_writes_the_png",),
             "status output to a closed pipe aborts the command before it writes its PNG"),
    Mutation("cli-library-info-logs-shown", "ddim_fused/cli/errors.py",
             "_OneLineLogHandler(logging.DEBUG if debug else logging.WARNING)", "_OneLineLogHandler(logging.DEBUG)",
             ("tests/test_cli_options.py",), "diffusers' info logs reach stderr without --debug"),
    Mutation("cli-renames-inside-paths", "ddim_fused/cli/options.py",
             'argument = r"(?<![^\\s(\\[])(', 'argument = r"(?<![^\\s(\\[/])(',
             ("tests/test_cli_options.py",), "argument names inside paths are renamed to flags"),
    Mutation("cli-interrupt-during-import-unhandled", "ddim_fused/cli/__init__.py",
             "    except KeyboardInterrupt:\n", "    except ImportError:\n",
             ("tests/test_cli_entry.py::test_ctrl_c_while_torch_imports_exits_130_without_a_traceback",),
             "Ctrl-C while torch imports prints a traceback"),
    Mutation("cli-paint-default-region-top", "ddim_fused/cli/commands.py",
             '"bottom": (slice(h // 2, h), slice(None))', '"bottom": (slice(0, h // 2), slice(None))',
             ("tests/test_cli.py",), "paint's default --region bottom repaints the top half"),
    # the rest of the host package: backend choice, checks, metrics, the exact oracle, conditioning rows
    Mutation("auto-backend-kernel-on-cpu", "ddim_fused/backend.py",
             'return device.type == "cuda" and dtype in KERNEL_DTYPES', "return dtype in KERNEL_DTYPES",
             ("tests/test_backend.py",), "backend='auto' runs the Triton kernel on CPU tensors (the slow interpreter)"),
    Mutation("finite-check-any", "ddim_fused/finite.py",
             "if bool(torch.isfinite(x).all()):", "if bool(torch.isfinite(x).any()):",
             ("tests/test_finite.py",), "a batch with one NaN sample passes the finite check and is written"),
    Mutation("frechet-cross-term-halved", "ddim_fused/metrics.py",
             "- 2.0 * trace_cross)", "- trace_cross)",
             ("tests/test_metrics.py",), "frechet_distance subtracts the cross term once instead of twice"),
    Mutation("check-int-upper-bound-open", "ddim_fused/validation.py",
             "if not low <= value <= high:", "if not low <= value <= high + 1:",
             ("tests/test_sampler_errors.py",), "integer arguments one past their upper bound are accepted"),
    Mutation("oracle-eps-variance", "ddim_fused/oracle.py",
             "        v = a * self.std**2 + (1 - a)\n        sqrt_a = a.sqrt()",
             "        v = a * self.std + (1 - a)\n        sqrt_a = a.sqrt()",
             ("tests/test_oracle.py",), "the exact oracle's eps uses the component std where its variance belongs"),
    Mutation("cond-rows-by-batch-position", "ddim_fused/conditioning.py",
             "return t[torch.from_numpy(indices).to(t.device)]", "return t[: len(indices)]",
             ("tests/test_models.py",), "per-sample cond rows are taken by batch position, not by global sample index"),
    Mutation("cli-default-guidance-for-every-model", "ddim_fused/cli/model.py",
             "return args.command_guidance if loaded.is_digits else 1.0", "return args.command_guidance",
             ("tests/test_byo_cli.py",), "models other than digits get the digits' default guidance 3"),
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
