"""Benchmarks of ddim-fused: the fused step and the whole sampling loop against every baseline.

Run `python -m bench [--quick]` (see bench/run.py) or `pytest bench/ --benchmark-only`.
Not installed with the package; run from the repository root.
"""
