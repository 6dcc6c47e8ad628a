"""The ddim-fused command line: `main` runs it (`ddim-fused`, `python -m ddim_fused`).

- `commands`: the parser and the commands sample, paint, interpolate, invert, train-digits;
- `generate`: the generate command (bulk, sharded, resumable);
- `options`: the sampler options every command shares, and their checks;
- `model`: loading and feeding `--model`;
- `errors`: exit codes and one-line messages.
"""
from .commands import main

__all__ = ["main"]
