"""`ddim_step`: one validated fused DDIM update on tensors, for code with its own loop.

The step is also a torch operator, `torch.ops.ddim_fused.ddim_step`, so that a user's
loop calling it runs under `torch.compile(fullgraph=True)` without a graph break:

    ddim_step(Tensor x, Tensor model_out, Tensor(a!) out, Tensor(b!)? x0_out,
              Tensor(c!)? eps_out, *, <the StepArgs fields>) -> ()

Its keyword arguments are the fields of `ddim_fused.step_args.StepArgs`, typed from
StepArgs' annotations (the one definition of them); `mask` is the raw mask tensor
(StepArgs holds its layout). It writes out (and x0_out, eps_out) and returns nothing:
an operator may not return an alias of an input. Implementations: CUDA runs the Triton
kernel (the torch path for float64), CPU the torch path (`ddim_fused.torch_step`), and a
fake one (shape propagation: nothing to allocate) serves torch.compile and meta tensors.
It is a `torch.library` custom operator, opaque to the compiler: the compiled graph
calls it as one node.

Eager calls skip the dispatcher. The wrapper validates an argument combination (the
shapes, dtypes and devices of its tensors, the names of its fields) once and remembers
it; a later call with the same combination checks only what that cannot guarantee
(tensor types, contiguity, scalar values and ranges, overlapping outputs) and calls the
operator's implementation directly. Whenever something traces (torch.compile, a fake or
functional tensor or another dispatch mode, vmap/grad, torch.jit.trace) or autograd
would see the call, it goes through the operator.
"""
from __future__ import annotations

import typing
from typing import Optional

import torch

from .backend import KERNEL_DTYPES, check_backend, step_function, step_launcher, uses_kernel
from .masks import MaskLayout, mask_layout
from .step_args import StepArgs
from .validation import FLOAT32_MAX, FLOAT_DTYPES, check_bool, check_float, check_int, check_sample_offset

OP_NAME = "ddim_fused::ddim_step"
# Schema type of each StepArgs annotation; mask is passed as the tensor, not its layout.
_SCHEMA_TYPES = {
    float: "float",
    Optional[float]: "float?",
    int: "int",
    Optional[int]: "int?",
    bool: "bool",
    Optional[torch.Tensor]: "Tensor?",
    tuple[float, float]: "float[]",
    Optional[MaskLayout]: "Tensor?",
}
STEP_FIELDS = StepArgs._fields
_DEFAULTS = StepArgs._field_defaults
_REQUIRED = tuple(name for name in STEP_FIELDS if name not in _DEFAULTS)


def _schema_default(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(float(v)) for v in value) + "]"
    return repr(value)


def op_schema() -> str:
    """The operator's schema, derived from StepArgs' fields, types and defaults."""
    hints = typing.get_type_hints(StepArgs)
    keywords = []
    for name in STEP_FIELDS:
        arg = f"{_SCHEMA_TYPES[hints[name]]} {name}"
        if name in _DEFAULTS:
            arg += "=" + _schema_default(_DEFAULTS[name])
        keywords.append(arg)
    return ("(Tensor x, Tensor model_out, Tensor(a!) out, Tensor(b!)? x0_out, Tensor(c!)? eps_out, *, "
            + ", ".join(keywords) + ") -> ()")


def _step_args(x: torch.Tensor, fields: dict) -> StepArgs:
    """StepArgs from the operator's keyword arguments (the raw mask becomes its layout).

    The dispatcher leaves out keywords equal to their schema default: StepArgs' defaults.
    """
    fields = {**_DEFAULTS, **fields}
    mask = fields["mask"]
    fields = dict(fields, x0_coefs=tuple(fields["x0_coefs"]),
                  mask=None if mask is None else mask_layout(mask, tuple(x.shape)))
    return StepArgs(**fields)


def _run_step(x, model_out, out, x0_out, eps_out, **fields) -> None:
    # "auto" on the operator's device: the kernel for CUDA kernel dtypes, torch ops otherwise.
    step_function("auto", x.device, x.dtype)(x, model_out, out, _step_args(x, fields), x0_out, eps_out)


def _fake_step(x, model_out, out, x0_out, eps_out, **fields) -> None:
    return None  # writes its outputs in place: no tensor to describe


torch.library.define(OP_NAME, op_schema())
torch.library.impl(OP_NAME, "cpu")(_run_step)
torch.library.impl(OP_NAME, "cuda")(_run_step)
torch.library.register_fake(OP_NAME)(_fake_step)


def ddim_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    eps_out: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    **step,
) -> torch.Tensor:
    """One fused DDIM update, validated, in a single kernel launch (or torch ops off CUDA).

    With backend="auto" it calls the operator `torch.ops.ddim_fused.ddim_step` (which
    dispatches on x's device), so it runs under torch.compile(fullgraph=True); "triton"
    and "torch" call that step function directly.

    Args:
        x: (B, *s) latent at the current step, contiguous.
        model_out: (B, *s) eps, or (2B, *s) [uncond; cond] halves when `guidance` is set.
        out: (B, *s) buffer for x_prev (may be x itself, or the noise tensor); allocated like x if None.
        x0_out: (B, *s) buffer for pred_x0 (needs `x0_coefs`).
        eps_out: (B, *s) buffer for the guided eps. Outputs may not otherwise share memory
            with the inputs or with each other (ValueError).
        mask: paint mask broadcastable to x (batch 1 or B), float or bool, 1 keeps `orig`.
        backend: "auto", "triton" or "torch" (see `ddim_fused.backend`).
        **step: the fields of `ddim_fused.step_args.StepArgs`: x_coef, eps_coef (required),
            guidance, noise_coef, noise (B or 1, *s), seed, step_key, sample_offset,
            repeat_noise, x0_coefs, orig (B or 1, *s), orig_coef, orig_noise_coef,
            orig_noise (B or 1, *s). Coefficients and guidance are finite real numbers
            within float32's range (the step computes in it). Noise that is needed and not
            given is drawn from the keyed Philox stream of `seed`: seed an int in
            [0, 2**63), step_key in [0, 2**32), sample_offset + B <= 2**32
            (TypeError/ValueError otherwise).

    Returns:
        out: (B, *s) x_prev, in out's dtype.
    """
    # (torch.compile traces the operator: the eager path is not even looked at.)
    key = None
    if backend == "auto" and mask is None and not torch.compiler.is_compiling():
        key = _eager_key(x, model_out, out, x0_out, eps_out, step)
        plan = _EAGER.get(key) if key is not None else None
        if plan is not None and not tracing():
            done = plan(x, model_out, out, x0_out, eps_out, step)
            if done is not None:
                return done
    check_backend(backend)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    kernel = backend == "triton" or (backend == "auto" and x.device.type == "cuda" and x.dtype in KERNEL_DTYPES)
    allowed = KERNEL_DTYPES if kernel else FLOAT_DTYPES
    _check_tensor("x", x, x.device, allowed)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    if backend == "triton":
        uses_kernel(backend, x.device, x.dtype)  # a clear error where the kernel cannot run x
    fields = _step_fields(step)
    B, sample_shape = x.shape[0], tuple(x.shape[1:])
    guided = fields["guidance"] is not None
    _check_tensor("model_out", model_out, x.device, allowed)
    want = ((2 * B) if guided else B,) + sample_shape
    if tuple(model_out.shape) != want:
        cfg = " (batch-doubled for guidance)" if guided else ""
        raise ValueError(f"model_out has shape {tuple(model_out.shape)}, expected {want}{cfg}")
    if out is None:
        out = torch.empty_like(x)
    for name, t in (("out", out), ("x0_out", x0_out), ("eps_out", eps_out)):
        if t is not None:
            _check_tensor(name, t, x.device, allowed)
            if t.shape != x.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    if x0_out is not None and "x0_coefs" not in step:
        raise ValueError("x0_out needs x0_coefs=(x0_x_coef, x0_eps_coef)")
    for name in ("noise", "orig", "orig_noise"):
        t = fields[name]
        if t is not None:
            _check_tensor(name, t, x.device, allowed)
            if tuple(t.shape[1:]) != sample_shape or t.shape[0] not in (1, B):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (1 or {B}, *{sample_shape})")
    if (mask is None) != (fields["orig"] is None):
        raise ValueError("mask and orig must be given together")
    if mask is not None:
        _check_tensor("mask", mask, x.device, allowed + (torch.bool,))
        mask_layout(mask, tuple(x.shape))  # a clear error for a mask that does not broadcast
    seed = fields["seed"]
    # Noise keys are Philox words: a value past its word would wrap onto another key's noise.
    if seed is not None:
        fields["seed"] = check_int("seed", seed, 0, 2**63 - 1)
    fields["step_key"] = check_int("step_key", fields["step_key"], 0, 2**32 - 1)
    fields["sample_offset"] = check_sample_offset(fields["sample_offset"], max(B, 1))
    draws = fields["noise_coef"] != 0.0 and fields["noise"] is None
    draws_orig = mask is not None and fields["orig_noise_coef"] != 0.0 and fields["orig_noise"] is None
    if seed is None and (draws or draws_orig):
        raise ValueError("noise_coef != 0 needs either a noise tensor or a seed for in-kernel noise "
                         "(and orig_noise_coef != 0 an orig_noise tensor or a seed)")
    if not torch.compiler.is_compiling():  # data pointers are the eager call's (torch.compile traces fakes)
        _check_no_overlap(x, model_out, out, x0_out, eps_out, fields["noise"], fields["orig"], fields["orig_noise"],
                          mask)
    if backend == "auto":
        if key is not None and x.device.type in ("cpu", "cuda") and not tracing():
            run = step_launcher(step_function("auto", x.device, x.dtype), x, model_out, out, x0_out, eps_out)
            _remember(key, _EagerPlan(run, x, model_out, fields["noise"]))
        # Only the fields given: the dispatcher parses every keyword, and the rest are defaults.
        given = {name: fields[name] for name in step}
        if mask is not None:
            given["mask"] = mask
        torch.ops.ddim_fused.ddim_step(x, model_out, out, x0_out, eps_out, **given)
        return out
    args = _step_args(x, dict(fields, mask=mask))
    return step_function(backend, x.device, x.dtype)(x, model_out, out, args, x0_out, eps_out)


def tracing() -> bool:
    """Whether a call now must go through the operator: torch.compile, a dispatch mode (fake,
    functional, proxy tensors), a functorch transform (vmap, grad) or torch.jit.trace is active."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state() is not None)


# Argument combinations the full validation accepted -> _EagerPlan; started over when full.
_EAGER: dict = {}
_MAX_EAGER = 256
# The fields an eager call may give (the paint fields go through the full validation).
_EAGER_FIELDS = frozenset(("x_coef", "eps_coef", "guidance", "noise_coef", "noise", "seed", "step_key",
                           "sample_offset", "repeat_noise", "x0_coefs"))


def _eager_key(x, model_out, out, x0_out, eps_out, step: dict) -> tuple | None:
    """What the full validation decides about this call's arguments, or None (not eligible)."""
    noise = step.get("noise")
    T = torch.Tensor
    if (type(x) is not T or type(model_out) is not T or out is not None and type(out) is not T
            or x0_out is not None and type(x0_out) is not T or eps_out is not None and type(eps_out) is not T
            or noise is not None and type(noise) is not T):
        return None
    return (tuple(step), x.shape, x.dtype, x.device, model_out.shape, model_out.dtype, model_out.device,
            None if out is None else (out.shape, out.dtype, out.device),
            None if x0_out is None else (x0_out.shape, x0_out.dtype, x0_out.device),
            None if eps_out is None else (eps_out.shape, eps_out.dtype, eps_out.device),
            None if noise is None else (noise.shape, noise.dtype, noise.device))


def _remember(key: tuple, plan: "_EagerPlan") -> None:
    if not _EAGER_FIELDS.issuperset(key[0]):
        return
    if len(_EAGER) >= _MAX_EAGER:
        _EAGER.clear()
    _EAGER[key] = plan


def _real(value) -> bool:
    """Whether value is a Python float or int the step can compute with in float32."""
    return (type(value) is float or type(value) is int) and -FLOAT32_MAX <= value <= FLOAT32_MAX


_NO_X0 = (0.0, 0.0)


class _EagerPlan:
    """An eager call with an argument combination the full validation accepted: the checks
    that combination leaves open, then the operator's implementation, directly."""

    __slots__ = ("run", "batch", "x_bytes", "model_bytes", "noise_bytes")

    def __init__(self, run, x, model_out, noise):
        self.run, self.batch = run, max(x.shape[0], 1)  # as check_sample_offset counts an empty batch
        # The overlap check's spans: outputs have x's size.
        self.x_bytes = x.numel() * x.element_size()
        self.model_bytes = model_out.numel() * model_out.element_size()
        self.noise_bytes = 0 if noise is None else noise.numel() * noise.element_size()

    def __call__(self, x, model_out, out, x0_out, eps_out, step: dict) -> torch.Tensor | None:
        """out (allocated when None) with the step written, or None where the full path must decide."""
        get = step.get
        x_coef, eps_coef, noise_coef, guidance = step["x_coef"], step["eps_coef"], get("noise_coef", 0.0), \
            get("guidance")
        noise, seed, step_key, offset = get("noise"), get("seed"), get("step_key", 0), get("sample_offset", 0)
        repeat, x0_coefs = get("repeat_noise", False), get("x0_coefs", _NO_X0)
        if not (_real(x_coef) and _real(eps_coef) and _real(noise_coef) and (guidance is None or _real(guidance))
                and type(x0_coefs) is tuple and len(x0_coefs) == 2 and _real(x0_coefs[0]) and _real(x0_coefs[1])
                and type(step_key) is int and 0 <= step_key < 2**32 and type(offset) is int
                and 0 <= offset <= 2**32 - self.batch and type(repeat) is bool
                and (seed is None and (noise_coef == 0.0 or noise is not None)
                     or type(seed) is int and 0 <= seed < 2**63)):
            return None
        grad = torch.is_grad_enabled()
        if (not (x.is_contiguous() and model_out.is_contiguous())
                or grad and (x.requires_grad or model_out.requires_grad)):
            return None
        for t in (out, x0_out, eps_out, noise):
            if t is not None and (not t.is_contiguous() or grad and t.requires_grad):
                return None
        if (out is not None or x0_out is not None or eps_out is not None) and not self._disjoint(
                x, model_out, noise, out, x0_out, eps_out):
            return None
        if out is None:
            out = torch.empty_like(x)
        args = StepArgs(float(x_coef), float(eps_coef), None if guidance is None else float(guidance),
                        float(noise_coef), noise, seed, step_key, offset, repeat,
                        (float(x0_coefs[0]), float(x0_coefs[1])))
        self.run(x, model_out, out, args, x0_out, eps_out)
        return out

    def _disjoint(self, x, model_out, noise, out, x0_out, eps_out) -> bool:
        """_check_no_overlap's rule on addresses: False where it would have to say more."""
        size = self.x_bytes
        spans = [(x.data_ptr(), size, True), (model_out.data_ptr(), self.model_bytes, False)]
        if noise is not None:
            spans.append((noise.data_ptr(), self.noise_bytes, True))
        for t in (out, x0_out, eps_out):
            if t is None:
                continue
            start = t.data_ptr()
            for other, n, may_be_out in spans:
                if start < other + n and other < start + size:
                    # out may be x itself or the noise tensor itself (same start, same size).
                    if not (t is out and may_be_out and other == start and n == size):
                        return False
            spans.append((start, size, False))
        return True


def _check_no_overlap(x, model_out, out, x0_out, eps_out, noise, orig, orig_noise, mask) -> None:
    """ValueError if an output shares memory with an input or another output, but for out
    being x itself or the noise tensor itself (the update reads each element before it
    writes it); any other overlap would let the torch path read what it already wrote."""
    inputs = (("x", x), ("model_out", model_out), ("noise", noise), ("orig", orig), ("orig_noise", orig_noise),
              ("mask", mask))
    outputs = (("out", out), ("x0_out", x0_out), ("eps_out", eps_out))
    seen = [(name, t) for name, t in inputs if t is not None]
    for name, t in outputs:
        if t is None:
            continue
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        for other_name, other in seen:
            other_start = other.data_ptr()
            if start < other_start + other.numel() * other.element_size() and other_start < end:
                if name == "out" and other_name in ("x", "noise") and other_start == start and other.shape == t.shape:
                    continue
                raise ValueError(f"{name} shares memory with {other_name}; outputs may not overlap the inputs or "
                                 "each other (out=x and out=noise excepted)")
        seen.append((name, t))


def _step_fields(step: dict) -> dict:
    """Every StepArgs field from the keyword arguments, defaults filled in; TypeError for unknown ones."""
    unknown = [name for name in step if name not in _DEFAULTS and name not in _REQUIRED or name == "mask"]
    if unknown:
        raise TypeError(f"ddim_step: unexpected keyword argument {unknown[0]!r}; expected the StepArgs fields "
                        f"{', '.join(n for n in STEP_FIELDS if n != 'mask')}")
    missing = [name for name in _REQUIRED if name not in step]
    if missing:
        raise TypeError(f"ddim_step: missing required keyword argument {missing[0]!r}")
    fields = dict(_DEFAULTS)
    fields.update(step)
    for name in ("x_coef", "eps_coef", "noise_coef", "orig_coef", "orig_noise_coef"):
        fields[name] = _as_float(name, fields[name])
    if fields["guidance"] is not None:
        fields["guidance"] = _as_float("guidance", fields["guidance"])
    coefs = fields["x0_coefs"]
    if not isinstance(coefs, (tuple, list)) or len(coefs) != 2:
        raise TypeError(f"x0_coefs must be a pair of floats, got {coefs!r}")
    fields["x0_coefs"] = (_as_float("x0_coefs[0]", coefs[0]), _as_float("x0_coefs[1]", coefs[1]))
    fields["repeat_noise"] = check_bool("repeat_noise", fields["repeat_noise"])
    return fields


def _as_float(name: str, value) -> float:
    # Rounded to float32 in the step: a larger value would make every output Inf or NaN.
    return check_float(name, value, -FLOAT32_MAX, FLOAT32_MAX)


def _check_tensor(name: str, t, device, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected x's device {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")
