"""How a ddim-fused command ends: one line on stderr and an exit status, never a traceback.

Exit statuses:
    0    success
    1    runtime failure: a full disk, NaN/Inf output, out of memory, an internal error
    2    usage error: a bad argument or an output path that cannot be used
    130  interrupted (Ctrl-C); files are written whole or not at all, so none is partial

`--debug` prints the traceback above the line; the exit status stays the same.
"""
from __future__ import annotations

import contextlib
import errno
import sys
import traceback
import warnings

import torch

from ..atomic import OutputPathError
from ..finite import NonFiniteError
from ..generate import RankFailedError, RunLockedError, RunMismatchError

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
PROG = "ddim-fused"
# OSErrors that say the path the user gave cannot be used, not that the disk failed.
_USAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR}
_USAGE_ERRORS = (OutputPathError, RunMismatchError, RunLockedError)
# torch's CPU allocator reports a failed allocation as a plain RuntimeError with this text.
_CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


class UserError(Exception):
    """A bad argument: reported as one line `ddim-fused: error: ...`, exit status 2."""


class RuntimeFailure(Exception):
    """A failure while working (e.g. a full disk), with a message that says what to do; exit status 1."""


class Interrupted(Exception):
    """Ctrl-C, with a message that says what was kept (e.g. finished shards); exit status 130."""


def one_line(text: str) -> str:
    """text with its line breaks (every one str.splitlines knows, form feeds too) replaced by spaces."""
    return " ".join(str(text).splitlines()).strip()


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, message) for an exception that ended a command.

    Args:
        exc: any exception but SystemExit (which carries its own status).

    Returns:
        the status (1, 2 or 130) and a one-line message without the `ddim-fused: error:` prefix.
    """
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, Interrupted):
        return EXIT_INTERRUPTED, str(exc)
    if isinstance(exc, (UserError,) + _USAGE_ERRORS):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, (NonFiniteError, RankFailedError, RuntimeFailure)):
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or _CPU_ALLOCATION_FAILED in str(exc):
        return EXIT_FAILURE, "out of memory; try a smaller --batch-size or --num"
    if isinstance(exc, OSError):
        return (EXIT_USAGE if exc.errno in _USAGE_ERRNOS else EXIT_FAILURE), str(exc) or type(exc).__name__
    # A bug, or a failure the commands do not foresee: the first line of its message only
    # (torch's run over many lines); --debug shows the rest.
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return EXIT_FAILURE, f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)"


def report(exc: BaseException, debug: bool = False) -> int:
    """Print the one-line report of exc (after its traceback if debug) and return the exit status."""
    status, message = classify(exc)
    if debug:
        traceback.print_exception(exc)
    print(f"{PROG}: {'' if status == EXIT_INTERRUPTED else 'error: '}{one_line(message)}", file=sys.stderr,
          flush=True)
    return status


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr if file is None else file)


@contextlib.contextmanager
def one_line_warnings():
    """Within the block, warnings print as `ddim-fused: warning: ...` (one line, no source line)."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        yield
