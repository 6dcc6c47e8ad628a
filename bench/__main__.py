"""`python -m bench [--quick] [--out-dir DIR]`: the benchmark matrix, loops, table, JSON/CSV and plot."""
import sys

from .run import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Results are written whole at the end; a cut run keeps only rows.jsonl, by design.
        print("python -m bench: interrupted", file=sys.stderr)
        sys.exit(130)
