"""The README's data blocks, regenerated from (or checked against) the committed data files.

    python -m bench.readme                 rewrite every data block of README.md from its file
    python -m bench.readme --check         exit 1, naming each block that differs from its data
    python -m bench.readme --bench DIR     point the performance block at another results folder

A data block in README.md is

    <!-- data: KIND PATH -->
    ...text rendered from PATH...
    <!-- /data -->

with KIND one of
    bench      a results.json written by `python -m bench` (bench.report.readme_section)
    quality    docs/quality.json of `python -m ddim_fused.quality` (its markdown_table)
    adherence  docs/adherence.json of `python -m ddim_fused.digits.evaluate --json` (its markdown_table)
    table1     docs/table1.json of `python -m ddim_fused.digits.table1` (its markdown_table)
    throughput docs/throughput.json of `python -m bench.throughput` (its markdown_table)

tests/test_readme_data.py runs the check, so a README table cannot drift from its data.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ddim_fused.digits.evaluate import markdown_table as adherence_table
from ddim_fused.digits.table1 import markdown_table as table1_table
from ddim_fused.quality import markdown_table as quality_table

from .report import readme_section
from .throughput import markdown_table as throughput_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- data: (\w+) (\S+) -->\n(.*?)<!-- /data -->", re.DOTALL)
RENDER = {"bench": readme_section, "quality": quality_table, "adherence": adherence_table,
          "table1": table1_table, "throughput": throughput_table}


def render(kind: str, path: str) -> str:
    """The text of a data block of `kind` from the JSON file at `path` (relative to the repository)."""
    if kind not in RENDER:
        raise ValueError(f"unknown data block kind {kind!r}; expected one of {sorted(RENDER)}")
    data = json.loads((ROOT / path).read_text(encoding="utf-8"))
    return RENDER[kind](data)


def regenerate(text: str, bench_path: str | None = None) -> tuple[str, list[str]]:
    """(text with every data block re-rendered, names of the blocks that changed)."""
    changed = []

    def one(match):
        kind, path, old = match.group(1), match.group(2), match.group(3)
        if kind == "bench" and bench_path is not None:
            path = bench_path
        new = render(kind, path)
        if new != old:
            changed.append(f"{kind} {path}")
        return f"<!-- data: {kind} {path} -->\n{new}<!-- /data -->"

    return BLOCK.sub(one, text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1 if any)")
    parser.add_argument("--bench", type=Path, default=None,
                        help="results folder (or its results.json) for the performance block")
    args = parser.parse_args(argv)
    bench_path = None
    if args.bench is not None:
        target = args.bench if args.bench.suffix == ".json" else args.bench / "results.json"
        target = target.resolve()
        if not target.is_file():
            print(f"bench.readme: error: {target} does not exist", file=sys.stderr)
            return 2
        bench_path = target.relative_to(ROOT).as_posix()
    text = README.read_text(encoding="utf-8")
    if not BLOCK.search(text):
        print("bench.readme: error: README.md has no data blocks", file=sys.stderr)
        return 2
    try:
        new, changed = regenerate(text, bench_path)
    except (OSError, ValueError, KeyError) as err:  # a missing or malformed data file
        print(f"bench.readme: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.check:
        for name in changed:
            print(f"README block differs from its data: {name} (run python -m bench.readme)")
        return 1 if changed else 0
    if new != text:
        tmp = README.with_name(f".README.md.{os.getpid()}.tmp")
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, README)
    print(f"README.md: {len(changed)} data block(s) rewritten" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
