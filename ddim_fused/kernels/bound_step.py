"""Lean launches of the fused step for a loop whose steps are known before it starts.

`launch_ddim_step` decides everything per launch: geometry, modes, the mask layout, and
Triton's own per-call work (binding the arguments, computing their specialisation key,
looking up the compiled kernel). In a sampler call only the tensors x, model_out, out
and x0_out change between launches, so `bind_ddim_step` does the rest once per call:

- per call (`CallLaunch`): the launch layout of each noise mode the steps use (one
  `step_launch`, so one source of truth for the argument list), with its geometry; a
  later call with the same steps may `rekey` them to its own seed and sample_offset;
- per step (`CallLaunch.step`): that layout with the step's coefficients and keys;
- per launch (`BoundStep.__call__`): four tensor slots filled, then the compiled kernel
  launched directly (`direct_runner`: the call Triton's `compiled[grid](*args)` runner
  makes), which skips the binder.

The compiled kernel is the one the first ordinary launch returned. Triton specialises
a kernel on its tensors' dtypes and on whether their addresses are multiples of 16, so
a runner is kept per (dtypes, alignments) of the four per-launch tensors; a launch with
a combination not seen yet goes through the ordinary launch, which compiles or finds
the right variant. Everything else in the argument list is fixed for the call.

The direct runner is used only with the Triton versions whose launch path it mirrors
(3.6 to 3.9: `JITFunction.run` returns the `CompiledKernel` and launches it with all
bound arguments in parameter order, constexprs included). Elsewhere, and under the
interpreter (whose launches return nothing), every launch is an ordinary one: the same
results, with only the per-call and per-step work saved.
"""
from __future__ import annotations

import torch
import triton
from triton import knobs

from .ddim_step import _ddim_step_kernel, step_launch
from .geometry import INTERPRETED, Launch
from .noise import check_keys

_ARG_NAMES = tuple(_ddim_step_kernel.arg_names)
_SLOT = {name: i for i, name in enumerate(_ARG_NAMES)}
_X, _EPS, _EPS_C, _OUT, _X0 = (_SLOT[n] for n in ("x_ptr", "eps_ptr", "eps_c_ptr", "out_ptr", "x0_ptr"))
_STORE_X0 = _SLOT["STORE_X0"]


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# Triton versions whose JITFunction.run launches `kernel.run(..., *bound_args.values())`.
DIRECT_VERSIONS = ((3, 6), (3, 9))
DIRECT_LAUNCH = (not INTERPRETED.value and DIRECT_VERSIONS[0] <= _version(triton.__version__) <= DIRECT_VERSIONS[1])


def _mode_key(step) -> tuple:
    """What, of a step's own arguments, changes its launch layout or kernel variant within one call."""
    drawn_orig = step.mask is not None and step.orig_noise_coef != 0.0
    return step.noise_coef != 0.0, _signature(step.noise), drawn_orig, _signature(step.orig_noise)


def _signature(t) -> tuple | None:
    """What the kernel is specialised on for a per-step tensor: batch broadcast, dtype, 16-byte alignment."""
    return None if t is None else (t.shape[0], t.dtype, t.data_ptr() % 16 == 0)


def _ordered(launch: Launch) -> tuple[list, dict]:
    """(every kernel argument in parameter order, the compile options among the kwargs)."""
    values = dict(zip(_ARG_NAMES, launch.args))
    options = {}
    for name, value in launch.kwargs.items():
        if name in _SLOT:
            values[name] = value
        else:
            options[name] = value
    return [values[name] for name in _ARG_NAMES], options


# The slots a step of a call fills from its own StepArgs (the rest is the call's).
# As step_launch passes them: coefficients as Python floats, the step key as an int.
_STEP_SLOTS = tuple((_SLOT[slot], field, kind) for slot, field, kind in (
    ("x_coef", "x_coef", float), ("eps_coef", "eps_coef", float), ("noise_coef", "noise_coef", float),
    ("orig_coef", "orig_coef", float), ("orig_noise_coef", "orig_noise_coef", float),
    ("step_key", "step_key", int), ("noise_ptr", "noise", None), ("orig_noise_ptr", "orig_noise", None),
))
_X0_X, _X0_EPS = _SLOT["x0_x_coef"], _SLOT["x0_eps_coef"]
_SEED, _OFFSET = _SLOT["seed"], _SLOT["sample_offset"]


def _int_type(value: int) -> str:
    """The type Triton gives an integer argument of this value (its binder's ranges)."""
    if -2**31 <= value < 2**31:
        return "i32"
    return "u64" if value >= 2**63 else "i64"


class CallLaunch:
    """The launches of one sampler call over (B, *s) tensors of one dtype: see the module docstring.

    Built by `bind_ddim_step`; `step(args)` binds one step. The steps of one call share
    everything but their coefficients, step key and noise tensors: shapes, seed,
    sample_offset, guidance, mask and orig (as `ddim_fused.plan` builds them).
    """

    def __init__(self, x: torch.Tensor):
        self._x = x
        # Noise mode -> (grid, argument list, compile options), from the mode's first step.
        self._layouts: dict = {}
        # Direct runners, shared by every step of the call:
        # (mode, dtypes, alignments, integer types of the keys) -> runner.
        self.runners: dict = {}
        self._steps: list = []  # every BoundStep made here, for rekey
        self.key_types: tuple = ()  # Triton's integer types of the bound seed and sample_offset

    def rekey(self, seed: int, sample_offset: int) -> None:
        """Bind every step to another call's seed and sample_offset (steps that draw keyed noise).

        Later launches of the same steps then draw that call's noise: what binding its steps
        anew would launch. Triton types an integer argument by its range (i32, i64, u64),
        so a direct runner is kept per integer type of these two as well.
        """
        check_keys(seed, 0, sample_offset, self._x.shape[0])
        for values in [layout[1] for layout in self._layouts.values()] + [step._values for step in self._steps]:
            values[_SEED], values[_OFFSET] = int(seed), int(sample_offset)
        self.key_types = (_int_type(seed), _int_type(sample_offset))

    def step(self, step) -> "BoundStep | None":
        """run(x, model_out, out, x0_out=None) -> out for one step's StepArgs; None for empty tensors.

        Launches what `launch_ddim_step(x, model_out, out, step, x0_out)` would: the same
        kernel variant and arguments.
        """
        mode = _mode_key(step)
        layout = self._layouts.get(mode)
        if layout is None:
            # step_launch reads shapes, dtypes and pointers only; x stands in for every
            # per-launch tensor (each launch fills their slots). It checks the keys too.
            launch = step_launch(self._x, self._x, self._x, step)
            if launch is None:
                return None
            layout = self._layouts[mode] = (launch.grid, *_ordered(launch))
            self.key_types = (_int_type(int(step.seed or 0)), _int_type(int(step.sample_offset)))
        elif step.draws_noise or step.draws_orig_noise:
            check_keys(step.seed, step.step_key, step.sample_offset, self._x.shape[0])
        grid, values, options = layout
        values = values.copy()
        for slot, field, kind in _STEP_SLOTS:
            value = getattr(step, field)
            values[slot] = value if kind is None else kind(value)
        values[_X0_X], values[_X0_EPS] = float(step.x0_coefs[0]), float(step.x0_coefs[1])
        bound = BoundStep(self, mode, grid, values, options, step.guidance is not None, self._x.shape[0])
        self._steps.append(bound)
        return bound


class BoundStep:
    """One step of a `CallLaunch`: run(x, model_out, out, x0_out=None) -> out.

    x, out, x0_out: (B, *s) of the call's dtype; model_out: (B, *s), or (2B, *s) guided.
    """

    __slots__ = ("_call", "_mode", "_grid", "_values", "_options", "_guided", "_batch")

    def __init__(self, call: CallLaunch, mode, grid, values: list, options: dict, guided: bool, batch: int):
        self._call, self._mode, self._grid, self._values = call, mode, grid, values
        self._options, self._guided, self._batch = options, guided, batch

    def __call__(self, x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor,
                 x0_out: torch.Tensor | None = None) -> torch.Tensor:
        values = self._values.copy()
        values[_X], values[_EPS], values[_OUT], values[_X0] = x, model_out, out, x0_out
        values[_EPS_C] = model_out[self._batch:] if self._guided else None
        values[_STORE_X0] = x0_out is not None
        if not DIRECT_LAUNCH:
            _ddim_step_kernel[self._grid](*values, **self._options)
            return out
        key = (self._mode, model_out.dtype, x.dtype, out.dtype, None if x0_out is None else x0_out.dtype,
               x.data_ptr() & 15, model_out.data_ptr() & 15, out.data_ptr() & 15,
               0 if x0_out is None else x0_out.data_ptr() & 15, self._call.key_types)
        runner = self._call.runners.get(key)
        if runner is None:
            compiled = _ddim_step_kernel[self._grid](*values, **self._options)
            if hasattr(compiled, "__getitem__") and hasattr(compiled, "function"):
                self._call.runners[key] = direct_runner(compiled, self._grid)
            return out
        runner(*values)
        return out


def _cuda_current() -> tuple:
    """(current device index (), raw current stream (device index)): how Triton's driver finds
    the stream of a launch when torch is loaded."""
    return torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream


def direct_runner(compiled, grid):
    """run(*args): the launch `compiled[grid](*args)` makes, less its per-launch Python.

    Triton's runner (3.6 to 3.9) looks up the current device and stream, builds launch
    metadata for the profiler hooks, then calls `compiled.run` with the metadata and both
    hook chains, which the C launcher calls around the launch. While both chains are empty
    (no profiler attached) this makes the same `compiled.run` call with None for the three,
    which the C launcher skips; otherwise it launches through Triton's runner.
    """
    # The runner reads grid[0], grid[1] and grid[2]; JITFunction.run pads them with 1s.
    grid = tuple(grid) + (1,) * (3 - len(grid))
    runner = compiled[grid]  # Triton's own; making it also loads the compiled module
    launch, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    device, stream = _cuda_current()
    runtime, chain = knobs.runtime, knobs.HookChain
    g0, g1, g2 = grid

    def run(*args):
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if type(enter) is chain and type(leave) is chain and not (enter.calls or leave.calls):
            launch(g0, g1, g2, stream(device()), function, metadata, None, None, None, *args)
        else:
            runner(*args)

    return run


def bind_ddim_step(x: torch.Tensor) -> CallLaunch:
    """The lean launcher of a sampler call over tensors shaped and typed like x.

    Args:
        x: (B, *s) of the call's dtype; only its shape and dtype are read, so a meta
            tensor will do (the plan binds before any tensor of the call exists).

    Returns:
        a CallLaunch; `.step(step_args)` gives each step's run(x, model_out, out, x0_out=None) -> out.
    """
    return CallLaunch(x)

