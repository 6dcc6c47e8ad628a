"""The ddim-fused command line: `main` runs it (`ddim-fused`, `python -m ddim_fused`).

- `commands`: the parser and the commands sample, paint, interpolate, invert, train-digits;
- `generate`: the generate command (bulk, sharded, resumable);
- `options`: the sampler options every command shares, and their checks;
- `model`: loading and feeding `--model`;
- `errors`: exit codes and one-line messages.

This module imports nothing heavy: `main` catches Ctrl-C first, then imports the commands
(and with them torch), so an interrupt during those imports exits 130 without a traceback.
"""
from __future__ import annotations

import sys

from .status import EXIT_INTERRUPTED, PROG


def main(argv=None) -> int:
    """Entry point of `ddim-fused` and `python -m ddim_fused` (see ddim_fused.cli.commands.main).

    Args:
        argv: argument list without the program name (default: sys.argv[1:]).

    Returns:
        0 on success; otherwise SystemExit with status 1, 2 or 130 after one line on stderr.
    """
    try:
        from .commands import main as run_command  # noqa: PLC0415 - torch loads inside the handler
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return run_command(argv)


__all__ = ["main"]
