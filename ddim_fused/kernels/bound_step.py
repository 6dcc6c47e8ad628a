"""Lean launches of the fused step: its launch layout bound once, the compiled kernel called directly.

`launch_ddim_step` decides everything per launch: geometry, modes, the mask layout, and
Triton's own per-call work (binding the arguments, computing their specialisation key,
looking up the compiled kernel), about 100 us of host time. Two lean paths leave the
per-launch work to filling the slots that change:

- `launch_step` (what `ddim_fused.backend.step_function` hands out for the kernel): a
  drop-in for `launch_ddim_step` that keeps the launch layout per key (shapes, dtypes and
  device of the tensors, guidance, the noise mode, which outputs are written, the integer
  types of the noise keys, the paint mask's layout), so a launch fills the tensors,
  coefficients and keys into a copy of it.
- `bind_ddim_step`, for a sampler call whose steps are known before it starts:
  - per call (`CallLaunch`): the launch layout of each noise mode the steps use (one
    `step_launch`, so one source of truth for the argument list), with its geometry; a
    later call with the same steps may `rekey` them to its own seed and sample_offset;
  - per step (`CallLaunch.step`): that layout with the step's coefficients and keys;
  - per launch (`BoundStep.__call__`): four tensor slots filled.

Both then launch the compiled kernel directly (`direct_runner`: the call Triton's
`compiled[grid](*args)` runner makes), which skips the binder, and pass the tensors as
their addresses (Triton's C launcher would otherwise ask each tensor for its address and
the driver for its attributes).

The compiled kernel is the one the first ordinary launch returned. Triton specialises
a kernel on its tensors' dtypes and on whether their addresses are multiples of 16, so
a direct runner serves only the dtypes and alignments of the launch that made it; a
launch with a combination not seen yet goes through the ordinary launch, which compiles
or finds the right variant. Everything else in the argument list is fixed by the key.

The direct runner is used only with the Triton versions whose launch path it mirrors
(3.6 to 3.9: `JITFunction.run` returns the `CompiledKernel` and launches it with all
bound arguments in parameter order, constexprs included). Elsewhere, and under the
interpreter (whose launches return nothing), every launch is an ordinary one: the same
results, with only the binding work saved.
"""
from __future__ import annotations

import torch
import triton
from triton import knobs

from .ddim_step import _ddim_step_kernel, launch_ddim_step, step_launch
from .geometry import INTERPRETED, Launch
from .noise import KEY_LIMIT, SEED_LIMIT, check_keys

_ARG_NAMES = tuple(_ddim_step_kernel.arg_names)
_SLOT = {name: i for i, name in enumerate(_ARG_NAMES)}
_X, _EPS, _EPS_C, _OUT, _X0 = (_SLOT[n] for n in ("x_ptr", "eps_ptr", "eps_c_ptr", "out_ptr", "x0_ptr"))
_NOISE, _EPS_OUT = _SLOT["noise_ptr"], _SLOT["eps_out_ptr"]
_ORIG, _ORIG_NOISE, _MASK = _SLOT["orig_ptr"], _SLOT["orig_noise_ptr"], _SLOT["mask_ptr"]
_POINTERS = tuple(i for i, name in enumerate(_ARG_NAMES) if name.endswith("_ptr"))
_STORE_X0, _OUT_TWICE = _SLOT["STORE_X0"], _SLOT["OUT_TWICE"]
_I32_MAX = 2**31 - 1


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# Triton versions whose JITFunction.run launches `kernel.run(..., *bound_args.values())`.
DIRECT_VERSIONS = ((3, 6), (3, 9))
DIRECT_LAUNCH = (not INTERPRETED.value and DIRECT_VERSIONS[0] <= _version(triton.__version__) <= DIRECT_VERSIONS[1])
# Triton versions whose CudaLauncher.__call__ (`compiled.run`) only allocates the scratch
# buffers a kernel asks for, then calls its C `launch` with (grid, stream, function,
# cooperative, pdl, global scratch, profile scratch, *args): for a kernel without scratch
# the direct runner calls that C function itself.
C_LAUNCH_VERSIONS = ((3, 6), (3, 6))
C_LAUNCH = DIRECT_LAUNCH and C_LAUNCH_VERSIONS[0] <= _version(triton.__version__) <= C_LAUNCH_VERSIONS[1]


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
        bound = BoundStep(self, mode, grid, values, options, step.guidance is not None, self._x.shape[0],
                          self._x.numel())
        self._steps.append(bound)
        return bound


class BoundStep:
    """One step of a `CallLaunch`: run(x, model_out, out, x0_out=None, out_twice=False) -> out.

    x, out, x0_out: (B, *s) of the call's dtype; model_out: (B, *s), or (2B, *s) guided.
    With out_twice, out is the first half of a contiguous (2B, *s) buffer and the same
    launch stores x_prev in its second half too (a guided loop's next model input).
    """

    stores_twice = True  # run takes out_twice (a sampler's batch-doubled loop asks for it)

    __slots__ = ("_call", "_mode", "_grid", "_values", "_options", "_guided", "_batch", "_half")

    def __init__(self, call: CallLaunch, mode, grid, values: list, options: dict, guided: bool, batch: int,
                 numel: int):
        self._call, self._mode, self._grid, self._values = call, mode, grid, values
        self._options, self._guided, self._batch = options, guided, batch
        self._half = numel  # elements of x: where the conditional half of a guided model_out starts

    def __call__(self, x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor,
                 x0_out: torch.Tensor | None = None, out_twice: bool = False) -> torch.Tensor:
        values = self._values.copy()
        values[_STORE_X0], values[_OUT_TWICE] = x0_out is not None, out_twice
        if DIRECT_LAUNCH:
            px, pm, po = x.data_ptr(), model_out.data_ptr(), out.data_ptr()
            p0 = 0 if x0_out is None else x0_out.data_ptr()
            pc = pm + self._half * model_out.element_size() if self._guided else 0
            key = (self._mode, model_out.dtype, x.dtype, out.dtype, None if x0_out is None else x0_out.dtype,
                   px & 15, pm & 15, pc & 15, po & 15, p0 & 15, self._call.key_types, out_twice)
            runner = self._call.runners.get(key)
            if runner is not None:
                values[_X], values[_EPS], values[_OUT] = px, pm, po
                values[_X0], values[_EPS_C] = p0 or None, pc or None
                if runner(*values):
                    return out
        values[_X], values[_EPS], values[_OUT], values[_X0] = x, model_out, out, x0_out
        values[_EPS_C] = model_out[self._batch:] if self._guided else None
        compiled = _ddim_step_kernel[self._grid](*values, **self._options)
        if DIRECT_LAUNCH and runner is None and _is_compiled(compiled):
            self._call.runners[key] = direct_runner(compiled, self._grid)
        return out


def _is_compiled(compiled) -> bool:
    """Whether an ordinary launch returned a CompiledKernel (the interpreter returns nothing)."""
    return hasattr(compiled, "__getitem__") and hasattr(compiled, "function")


# Launchers of `launch_step` by tensor signature; started over when full (a program uses a few).
_LAUNCHERS: dict = {}
_MAX_LAUNCHERS = 128
_EMPTY = "empty"  # the layout of tensors without elements: nothing to launch
_ORDINARY = "ordinary"  # the layout of steps that launch_ddim_step launches
# The scalar slots a launch fills from its StepArgs, as step_launch passes them.
_X_COEF, _EPS_COEF, _NOISE_COEF, _ORIG_COEF, _ORIG_NOISE_COEF = (
    _SLOT[name] for name in ("x_coef", "eps_coef", "noise_coef", "orig_coef", "orig_noise_coef"))
_GUIDANCE, _STEP_KEY = _SLOT["guidance"], _SLOT["step_key"]


class _Layout:
    """One launch layout: grid, argument template (no tensors), compile options, and the
    direct runner once an aligned ordinary launch made one."""

    __slots__ = ("grid", "values", "options", "runner")

    def __init__(self, launch: Launch):
        self.grid = launch.grid
        self.values, self.options = _ordered(launch)
        for slot in _POINTERS:  # the cache keeps no tensor alive
            self.values[slot] = None
        self.runner = None


class StepLauncher:
    """`launch_ddim_step` for tensors of one signature (shapes, dtypes and device of x,
    model_out, out, x0_out, eps_out), with a launch layout per step flags: guidance, the
    noise mode and its tensor's batch and dtype, repeat_noise, the integer types of the
    noise keys, and for paint the mask layout, the mask's and orig's batch and dtype and the
    orig noise mode. `launch_step` keeps one per signature; `launcher_for` hands it out.
    """

    __slots__ = ("layouts", "numel", "batch")

    def __init__(self, x: torch.Tensor):
        self.layouts: dict = {}
        self.numel, self.batch = x.numel(), x.shape[0]

    def __call__(self, x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step,
                 x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> torch.Tensor:
        """run(x, model_out, out, step, x0_out=None, eps_out=None) -> out, as launch_ddim_step."""
        seed, step_key, offset, noise, coef = step.seed, step.step_key, step.sample_offset, step.noise, step.noise_coef
        mask, batch = step.mask, self.batch
        if mask is None:
            paint = orig = orig_noise = mask_t = None
            draws = coef != 0.0 and noise is None
        else:
            orig, orig_noise, mask_t, orig_coef = step.orig, step.orig_noise, mask.mask, step.orig_noise_coef
            draws = coef != 0.0 and noise is None or orig_coef != 0.0 and orig_noise is None
            if orig_coef == 0.0:
                orig_noise = None  # the kernel does not read it
            paint = (mask.batch_stride, mask.mid, mask.inner, mask_t.shape[0], mask_t.dtype, orig.shape[0], orig.dtype,
                     orig_coef == 0.0, None if orig_noise is None else (orig_noise.shape[0], orig_noise.dtype))
        if draws and not (
                type(seed) is int and type(step_key) is int and type(offset) is int
                and 0 <= seed < SEED_LIMIT and 0 <= step_key < KEY_LIMIT and 0 <= offset <= KEY_LIMIT - batch):
            check_keys(seed, step_key, offset, batch)
        seed, step_key, offset = 0 if seed is None else int(seed), int(step_key), int(offset)
        # Triton types an int argument by its range: the three keys' types select the compiled variant.
        key_types = (None if 0 <= seed <= _I32_MAX and 0 <= step_key <= _I32_MAX and 0 <= offset <= _I32_MAX
                     else (_int_type(seed), _int_type(step_key), _int_type(offset)))
        guidance = step.guidance
        if coef == 0.0:
            noise = None  # the kernel does not read it
        key = (guidance is None, coef == 0.0, None if noise is None else (noise.shape[0], noise.dtype),
               bool(step.repeat_noise), key_types, paint)
        layout = self.layouts.get(key)
        if layout is None:
            launch = step_launch(x, model_out, out, step._replace(noise=noise, orig_noise=orig_noise), x0_out, eps_out)
            if launch is None:
                layout = _EMPTY
            elif mask is not None and launch.args[_MASK] is not mask_t:
                layout = _ORDINARY  # a mask expanded per launch (samples of 2**31 elements or more)
            else:
                layout = _Layout(launch)
            self.layouts[key] = layout
        if layout is _EMPTY:
            return out
        if layout is _ORDINARY:
            return launch_ddim_step(x, model_out, out, step, x0_out, eps_out)
        values = layout.values.copy()
        values[_X_COEF], values[_EPS_COEF], values[_NOISE_COEF] = float(step.x_coef), float(step.eps_coef), float(coef)
        values[_ORIG_COEF], values[_ORIG_NOISE_COEF] = float(step.orig_coef), float(step.orig_noise_coef)
        x0_coefs = step.x0_coefs
        values[_X0_X], values[_X0_EPS] = float(x0_coefs[0]), float(x0_coefs[1])
        values[_GUIDANCE] = 1.0 if guidance is None else float(guidance)
        values[_SEED], values[_STEP_KEY], values[_OFFSET] = seed, step_key, offset
        runner = layout.runner
        if runner is not None:
            px, pm, po = x.data_ptr(), model_out.data_ptr(), out.data_ptr()
            pc = 0 if guidance is None else pm + self.numel * model_out.element_size()
            p0 = 0 if x0_out is None else x0_out.data_ptr()
            pe = 0 if eps_out is None else eps_out.data_ptr()
            pn = 0 if noise is None else noise.data_ptr()
            if mask is None:
                pr = prn = pk = 0
            else:
                pr, pk = orig.data_ptr(), mask_t.data_ptr()
                prn = 0 if orig_noise is None else orig_noise.data_ptr()
            if not (px | pm | pc | po | p0 | pe | pn | pr | prn | pk) & 15:  # the runner's variant: all aligned
                values[_X], values[_EPS], values[_EPS_C], values[_OUT] = px, pm, pc or None, po
                values[_NOISE], values[_X0], values[_EPS_OUT] = pn or None, p0 or None, pe or None
                values[_ORIG], values[_ORIG_NOISE], values[_MASK] = pr or None, prn or None, pk or None
                if runner(*values):
                    return out
        values[_X], values[_EPS], values[_OUT], values[_NOISE] = x, model_out, out, noise
        values[_EPS_C] = None if guidance is None else model_out[batch:]
        values[_X0], values[_EPS_OUT] = x0_out, eps_out
        values[_ORIG], values[_ORIG_NOISE], values[_MASK] = orig, orig_noise, mask_t
        compiled = _ddim_step_kernel[layout.grid](*values, **layout.options)
        if DIRECT_LAUNCH and runner is None and _is_compiled(compiled) and _aligned(values):
            layout.runner = direct_runner(compiled, layout.grid)
        return out


def launcher_for(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor | None = None,
                 x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> StepLauncher:
    """The StepLauncher of these tensors' signature (out None: a tensor like x), made on first use.

    Args: as launch_ddim_step (validated inputs); only shapes, dtypes and the device are read.
    """
    key = (x.shape, x.dtype, x.device, model_out.dtype, x.dtype if out is None else out.dtype,
           None if x0_out is None else x0_out.dtype, None if eps_out is None else eps_out.dtype)
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        launcher = _LAUNCHERS[key] = StepLauncher(x)
    return launcher


def launch_step(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step,
                x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> torch.Tensor:
    """`launch_ddim_step`, with the launch layout bound once per key (see the module docstring).

    Same arguments (validated inputs: contiguous tensors on one device), same results, same
    errors for noise keys outside their words. A noise tensor with a coefficient of 0 (which
    the kernel does not read) is left out of the launch; a paint mask that the launch
    expands (samples of 2**31 elements or more) passes through to launch_ddim_step.

    Under torch.compile it is launch_ddim_step, whose `kernel[grid](...)` the compiler can trace.

    Returns:
        out.
    """
    if torch.compiler.is_compiling():
        return launch_ddim_step(x, model_out, out, step, x0_out, eps_out)
    return launcher_for(x, model_out, out, x0_out, eps_out)(x, model_out, out, step, x0_out, eps_out)


def _aligned(values: list) -> bool:
    """Whether every tensor among a launch's arguments starts on a 16-byte boundary."""
    return all(values[slot] is None or values[slot].data_ptr() % 16 == 0 for slot in _POINTERS)


def _cuda_current() -> tuple:
    """(current device index (), raw current stream (device index)): how Triton's driver finds
    the stream of a launch when torch is loaded."""
    return torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream


def direct_runner(compiled, grid):
    """run(*args) -> bool: the launch `compiled[grid](*args)` makes, less its per-launch Python.

    Triton's runner (3.6 to 3.9) looks up the current device and stream, builds launch
    metadata for the profiler hooks, then calls `compiled.run` with the metadata and both
    hook chains, which the C launcher calls around the launch. While both chains are empty
    (no profiler attached) this makes the same `compiled.run` call with None for the three,
    which the C launcher skips, and returns True. Pointer arguments may be addresses (ints).
    With a hook attached it launches nothing and returns False: the caller then makes the
    ordinary launch, with tensors, whose launch metadata the hooks get.
    """
    # The runner reads grid[0], grid[1] and grid[2]; JITFunction.run pads them with 1s.
    grid = tuple(grid) + (1,) * (3 - len(grid))
    compiled[grid]  # Triton's own runner: making it loads the compiled module
    launch, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    device, stream = _cuda_current()
    runtime, chain = knobs.runtime, knobs.HookChain
    g0, g1, g2 = grid
    c_launch = _c_launch(launch)
    if c_launch is not None:  # the C launch itself: (cooperative, pdl, no scratch, no scratch) before the rest
        launch, cooperative, pdl = c_launch
        middle = (cooperative, pdl, None, None, metadata, None, None, None)
    else:
        middle = (metadata, None, None, None)

    def run(*args) -> bool:
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if type(enter) is chain and type(leave) is chain and not (enter.calls or leave.calls):
            launch(g0, g1, g2, stream(device()), function, *middle, *args)
            return True
        return False

    return run


def _c_launch(launcher) -> tuple | None:
    """(C launch function, cooperative flag, pdl flag) of a Triton CudaLauncher whose kernel
    needs no scratch buffers, where C_LAUNCH holds; None otherwise (launch through it)."""
    if (not C_LAUNCH or type(launcher).__name__ != "CudaLauncher" or getattr(launcher, "global_scratch_size", 1)
            or getattr(launcher, "profile_scratch_size", 1) or not callable(getattr(launcher, "launch", None))):
        return None
    return launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl


def bind_ddim_step(x: torch.Tensor) -> CallLaunch:
    """The lean launcher of a sampler call over tensors shaped and typed like x.

    Args:
        x: (B, *s) of the call's dtype; only its shape and dtype are read, so a meta
            tensor will do (the plan binds before any tensor of the call exists).

    Returns:
        a CallLaunch; `.step(step_args)` gives each step's run(x, model_out, out, x0_out=None) -> out.
    """
    return CallLaunch(x)

