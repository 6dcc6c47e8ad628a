"""How a ddim-fused command ends: one line on stderr and an exit status, never a traceback.

Exit statuses:
    0    success
    1    runtime failure: a full disk, NaN/Inf output, out of memory, an internal error
    2    usage error: a bad argument or an output path that cannot be used
    130  interrupted (Ctrl-C); files are written whole or not at all, so none is partial

`--debug` prints the traceback above the line; the exit status stays the same.

stderr carries nothing else but `ddim-fused: warning: ...` lines: Python warnings and the
warnings that diffusers, transformers and huggingface_hub log come out that way (their
info and debug records only with `--debug`, as `ddim-fused: debug: ...`). stdout carries
the status lines; when it is a pipe that closes early (`ddim-fused ... | head -1`), the
rest of them is dropped and the command still writes its files.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
import warnings

import torch

from ..atomic import OutputPathError
from ..finite import NonFiniteError
from ..generate import RankFailedError, RunLockedError, RunMismatchError
from .status import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PROG

# OSErrors that say the path the user gave cannot be used, not that the disk failed.
_USAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR}
_USAGE_ERRORS = (OutputPathError, RunMismatchError, RunLockedError)
# Libraries whose logging ddim-fused routes through its own one-line format.
LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")
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


class _OneLineLogHandler(logging.Handler):
    """A library's log records as `ddim-fused: warning: ...` (WARNING and above) or `ddim-fused: debug: ...`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = "warning" if record.levelno >= logging.WARNING else "debug"
            print(f"{PROG}: {kind}: {one_line(record.getMessage())}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's rule: a failed emit never stops the program
            self.handleError(record)


class _LibraryLogs:
    """The routing that library_logs() puts in place; see route_library_logs()."""

    def __init__(self, debug: bool):
        self.handler = _OneLineLogHandler(logging.DEBUG if debug else logging.WARNING)
        self.level = logging.DEBUG if debug else None
        self.saved: dict[str, tuple] = {}

    def adopt(self) -> None:
        # Only libraries already imported: their own setup (diffusers' and transformers'
        # default stderr handler) has run, so nothing adds a handler after this.
        for name in LIBRARY_LOGGERS:
            if name not in sys.modules:
                continue
            logger = logging.getLogger(name)
            if name not in self.saved:
                self.saved[name] = (list(logger.handlers), logger.level, logger.propagate)
            logger.handlers = [self.handler]
            logger.propagate = False
            if self.level is not None:
                logger.setLevel(self.level)

    def restore(self) -> None:
        for name, (handlers, level, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


_active_logs: list[_LibraryLogs] = []


@contextlib.contextmanager
def library_logs(debug: bool = False):
    """Within the block, the LIBRARY_LOGGERS print one line per record on stderr: WARNING
    and above as `ddim-fused: warning: ...`, the rest only if debug (`ddim-fused: debug: ...`).

    Libraries imported inside the block join when route_library_logs() is called.
    """
    logs = _LibraryLogs(debug)
    _active_logs.append(logs)
    logs.adopt()
    try:
        yield
    finally:
        _active_logs.remove(logs)
        logs.restore()


def route_library_logs() -> None:
    """Route the logs of the LIBRARY_LOGGERS imported since library_logs() began (no-op outside it)."""
    for logs in _active_logs:
        logs.adopt()


class _StatusStream:
    """stdout for status lines: a closed pipe drops the rest of them instead of failing the command."""

    def __init__(self, stream):
        self._stream = stream
        self.pipe_closed = False

    def write(self, text: str) -> int:
        if not self.pipe_closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self.pipe_closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def _close(self) -> None:
        self.pipe_closed = True
        # What is still buffered goes to devnull: Python's flush at exit must not fail either.
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), self._stream.fileno())
        except (OSError, ValueError, AttributeError):  # not a file (captured), or already closed
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def status_output():
    """Within the block, sys.stdout survives a reader that closes the pipe (see _StatusStream)."""
    stream = _StatusStream(sys.stdout)
    sys.stdout = stream
    try:
        yield stream
    finally:
        stream.flush()
        if sys.stdout is stream:
            sys.stdout = stream._stream
