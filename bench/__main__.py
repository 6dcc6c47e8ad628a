"""`python -m bench [--quick] [--out-dir DIR]`: the benchmark matrix, loops, table, JSON/CSV and plot."""
import sys

from .run import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
