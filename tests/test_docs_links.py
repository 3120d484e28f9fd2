"""Every relative link in README.md and docs/*.md points to a file of the repository, and every `#anchor` to a
heading of that file (GitHub's heading ids). Links inside code (fenced blocks, inline code) and HTML comments are
not links and are skipped; http(s) and mailto links are not checked (no network)."""

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def slug(heading: str) -> str:
    """GitHub's id for a heading: markdown code marks dropped, lower case, everything but letters, digits, marks,
    '-', '_' and spaces removed, spaces turned into '-'."""
    text = heading.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c.isalnum() or c in "-_ " or unicodedata.category(c).startswith("M"))
    return kept.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The heading ids of a markdown text, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def links(markdown: str) -> list[str]:
    """The link targets of a markdown text, outside code and comments."""
    text = _INLINE_CODE.sub("", _COMMENT.sub("", _FENCE.sub("", markdown)))
    return _LINK.findall(text)


def broken_links(files: list[Path], root: Path) -> tuple[list[str], int]:
    """(one message per broken relative link, the number of relative links checked)."""
    problems, checked = [], 0
    for md in files:
        for target in links(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
                continue
            checked += 1
            path_part, _, anchor = target.partition("#")
            dest = (md.parent / path_part).resolve() if path_part else md.resolve()
            where = f"{md.relative_to(root)}: ({target})"
            if root not in dest.parents and dest != root:
                problems.append(f"{where} points outside the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file {dest.relative_to(root)}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems, checked


def _doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_readme_and_docs_links_resolve():
    problems, checked = broken_links(_doc_files(ROOT), ROOT)
    assert checked >= 30, f"only {checked} relative links found: is the link pattern still matching?"
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_finds_broken_links(tmp_path):
    """The checker itself: a missing file, a missing heading and a link out of the tree are reported; code, comments,
    web links and correct links (also to a repeated heading and a heading with code and punctuation) are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Page A\n\n## 6. Defaults (the published runs)\n\n## Use `train.py`: CPU\n\n## Notes\n\n## Notes\n",
        encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#6-defaults-the-published-runs) [ok](docs/a.md#use-trainpy-cpu) "
        "[ok](docs/a.md#notes-1) [ok](#top) [web](https://example.com/x.md)\n\n# Top\n\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#nope) [out](../outside.md)\n\n"
        "`[code](docs/missing.md)`\n\n```\n[fenced](docs/missing.md)\n```\n\n~~~\n[fenced](docs/missing.md)\n~~~\n\n"
        "<!-- [comment](docs/missing.md) -->\n",
        encoding="utf-8")
    problems, checked = broken_links(_doc_files(tmp_path), tmp_path)
    assert checked == 8
    assert len(problems) == 3, problems
    assert "docs/missing.md" in problems[0] and "#nope" in problems[1] and "outside" in problems[2]
