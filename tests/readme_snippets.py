"""Code blocks of the user documentation (README.md and docs/*.md), read from the files, so that the
tests run exactly what the documentation shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Searched in this order; the first page with the heading wins (other helpers' pages may reuse a
# trainer's name as a heading).
PAGES = (README, ROOT / "docs" / "trainers.md", *sorted((ROOT / "docs").glob("*.md")))


def snippet(heading: str, language: str) -> str:
    """The first ``language`` code block under the heading ``heading`` of the documentation.

    ``heading`` is matched by the start of its text at any level (``"### TRL"`` finds
    ``## TRL (1.16)`` in docs/trainers.md), in the first page of :data:`PAGES` that has it, where
    it must be unique. The section ends at the next heading of the same or a higher level.
    """
    title = heading.lstrip("#").strip()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        headings = _headings(text)
        found = [
            text[start : next((s for s, lv, _ in headings[i + 1 :] if lv <= level), len(text))]
            for i, (start, level, name) in enumerate(headings)
            if name.startswith(title)
        ]
        if found:
            break
    else:
        raise AssertionError(f"no heading {title!r} in README.md or docs/")
    assert len(found) == 1, f"heading {title!r} found {len(found)} times in {page.relative_to(ROOT)}"
    section = found[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert blocks, f"no {language} block under {title!r} in {page.relative_to(ROOT)}"
    return blocks[0]


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of each Markdown heading, skipping fenced code (a bash comment is no heading)."""
    out, offset, fenced = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#+) (.*)", line)):
            out.append((offset, len(match.group(1)), match.group(2).strip()))
        offset += len(line)
    return out


def commands(bash: str) -> list[list[str]]:
    """Shell commands of a bash snippet, split as bash would: continuation lines joined, comments
    dropped, a quoted argument may span lines."""
    out, pending = [], ""
    for line in re.sub(r"\\\n", " ", bash).splitlines():
        pending += line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            pending += "\n"
            continue
        if words:
            out.append(words)
        pending = ""
    return out
