"""Every relative link of README.md, CHANGELOG.md and docs/*.md resolves, anchors included.

A link is `[text](target)` or `![alt](target)` outside code blocks and code spans; web
links (a scheme such as https:) are not fetched. A target must exist relative to the page;
`#anchor` must be a heading of the target page, slugged as a code host does (lowercase,
punctuation dropped, spaces to hyphens, `-1`, `-2`, ... for repeats).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slugs(text: str) -> set[str]:
    """The anchors a code host gives the Markdown headings of `text`."""
    seen, out = {}, set()
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` (in the repository at `root`) whose file or anchor does not exist."""
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest.relative_to(root) if dest.is_relative_to(root) else dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
        elif anchor and dest.suffix != ".md":
            bad.append(f"{target}: an anchor into a file that is not Markdown")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert page.exists()
    assert broken_links(page) == []


def test_the_readme_links_to_every_docs_page():
    linked = {t.partition("#")[0] for t in LINK.findall(_prose((ROOT / "README.md").read_text(encoding="utf-8")))}
    # quality_table.md is an output of `python -m ddim_fused.quality`, not a page.
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - {"docs/quality_table.md"}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_slugs_follow_the_code_host_rules():
    text = "# The captured loop: `cuda_graph=True`\n## Set up and run\n## Notes\n## Notes\n```\n# not a heading\n```\n"
    assert slugs(text) == {"the-captured-loop-cuda_graphtrue", "set-up-and-run", "notes", "notes-1"}


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n## Real heading\n", encoding="utf-8")
    page = tmp_path.resolve() / "README.md"
    page.write_text("[ok](docs/a.md#real-heading) [gone](docs/b.md) [anchor](docs/a.md#nope) "
                    "[self](#a-title) [web](https://example.com/x) `[code](docs/c.md)`\n# A title\n",
                    encoding="utf-8")
    bad = broken_links(page, tmp_path.resolve())
    assert len(bad) == 2 and bad[0].startswith("docs/b.md:") and bad[1].startswith("docs/a.md#nope:"), bad
