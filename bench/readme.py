"""The data blocks of README.md and docs/*.md, regenerated from (or checked against) committed data.

    python -m bench.readme                 rewrite every data block of the pages from its files
    python -m bench.readme --check         exit 1, naming each block that differs from its data
    python -m bench.readme --bench DIR     point the `bench` block of DIR's device at DIR's results

A data block in a page is

    <!-- data: KIND PATH [PATH ...] -->
    ...text rendered from the JSON files at PATH... (relative to the repository root)
    <!-- /data -->

with KIND one of
    bench      a results.json written by `python -m bench` (bench.report.readme_section)
    quality    docs/quality.json of `python -m ddim_fused.quality` (its markdown_table)
    adherence  docs/adherence.json of `python -m ddim_fused.digits.evaluate --json` (its markdown_table)
    table1     docs/table1.json of `python -m ddim_fused.digits.table1` (its markdown_table)
    throughput docs/throughput.json of `python -m bench.throughput` (its markdown_table)
    gpu        a GPU results.json, its machine's gpu_graph.json [, the SD benchmark's JSON]
               (bench.summary.gpu_summary: the README's results table)
    graph      a gpu_graph.json and the same machine's results.json (bench.summary.graph_table)
    static     a static.json of `python -m bench.static` (its markdown_table)
    host       a host.json of `python -m bench.host` (bench.summary.host_table)

tests/test_readme_data.py runs the check, so no table in the pages can drift from its data.
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
from .static import markdown_table as static_table
from .summary import gpu_summary, graph_table, host_table
from .throughput import markdown_table as throughput_table

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- data: (\w+) (\S+(?: \S+)*) -->\n(.*?)<!-- /data -->", re.DOTALL)
RENDER = {"bench": readme_section, "quality": quality_table, "adherence": adherence_table,
          "table1": table1_table, "throughput": throughput_table, "gpu": gpu_summary, "graph": graph_table,
          "static": static_table, "host": host_table}


def pages(root: Path = ROOT) -> list[Path]:
    """The user documentation whose data blocks are kept: README.md and docs/*.md."""
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def render(kind: str, paths: str) -> str:
    """The text of a data block of `kind` from the space-separated JSON files `paths` (repository-relative)."""
    if kind not in RENDER:
        raise ValueError(f"unknown data block kind {kind!r}; expected one of {sorted(RENDER)}")
    data = [json.loads((ROOT / path).read_text(encoding="utf-8")) for path in paths.split()]
    return RENDER[kind](*data)


def _on_gpu(path: str) -> bool:
    """Whether the results.json at `path` was measured on a GPU."""
    data = json.loads((ROOT / path).read_text(encoding="utf-8"))
    return data["environment"]["device"].startswith("cuda")


def regenerate(text: str, bench_path: str | None = None) -> tuple[str, list[str]]:
    """(text with every data block re-rendered, names of the blocks that changed)."""
    changed = []

    def one(match):
        kind, path, old = match.group(1), match.group(2), match.group(3)
        if kind == "bench" and bench_path is not None and _on_gpu(path) == _on_gpu(bench_path):
            path = bench_path  # --bench replaces the block of its own kind of device
        new = render(kind, path)
        if new != old:
            changed.append(f"{kind} {path}")
        return f"<!-- data: {kind} {path} -->\n{new}<!-- /data -->"

    return BLOCK.sub(one, text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1 if any)")
    parser.add_argument("--bench", type=Path, default=None,
                        help="results folder (or its results.json) for the `bench` block of its device (CPU or GPU)")
    args = parser.parse_args(argv)
    bench_path = None
    if args.bench is not None:
        target = args.bench if args.bench.suffix == ".json" else args.bench / "results.json"
        target = target.resolve()
        if not target.is_file():
            print(f"bench.readme: error: {target} does not exist", file=sys.stderr)
            return 2
        bench_path = target.relative_to(ROOT).as_posix()
    texts = {page: page.read_text(encoding="utf-8") for page in pages()}
    if not any(BLOCK.search(text) for text in texts.values()):
        print("bench.readme: error: README.md and docs/*.md have no data blocks", file=sys.stderr)
        return 2
    try:
        new = {page: regenerate(text, bench_path) for page, text in texts.items()}
    except (OSError, ValueError, KeyError) as err:  # a missing or malformed data file
        print(f"bench.readme: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.check:
        differ = [f"{page.relative_to(ROOT)}: {name}" for page, (_, changed) in new.items() for name in changed]
        for name in differ:
            print(f"block differs from its data: {name} (run python -m bench.readme)")
        return 1 if differ else 0
    for page, (text, changed) in new.items():
        if text != texts[page]:
            tmp = page.with_name(f".{page.name}.{os.getpid()}.tmp")
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, page)
        if changed:
            print(f"{page.relative_to(ROOT)}: {len(changed)} data block(s) rewritten: {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
