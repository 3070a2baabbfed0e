"""The adapters' README snippets, read from README.md so that the tests run exactly what it shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(heading: str, language: str) -> str:
    """The first ``language`` code block under the README heading ``heading`` (e.g. ``"### TRL"``)."""
    text = README.read_text()
    start = text.index(f"\n{heading}")
    following = re.compile(r"^#{2,3} ", flags=re.M).search(text, start + len(heading) + 2)
    section = text[start : following.start() if following else None]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert blocks, f"no {language} block under {heading!r} in README.md"
    return blocks[0]


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
