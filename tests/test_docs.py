"""The documentation is true: docstring examples and every README / docs code block run, and the
mathematics they cite is in the repository."""

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rspo_kernels._dispatch
import rspo_kernels.loss.api
import rspo_kernels.weights.api

_ROOT = Path(__file__).resolve().parents[1]
_MATH = _ROOT / "docs" / "math.md"
# Everything that ships in the sdist and may cite the mathematics.
_SOURCES = [
    _ROOT / "README.md",
    *(p for p in (_ROOT / "docs").glob("*.md") if p != _MATH),
    *(p for d in ("rspo_kernels", "integrations", "benchmarks", "csrc", "tests") for p in (_ROOT / d).rglob("*")),
]
_TEXT = {p: p.read_text(encoding="utf-8") for p in _SOURCES if p.suffix in (".py", ".md", ".cpp", ".hpp")}


@pytest.mark.parametrize("module", [rspo_kernels.weights.api, rspo_kernels._dispatch, rspo_kernels.loss.api])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_nothing_cites_a_math_file_outside_the_repository():
    this = Path(__file__).resolve()
    stale = [
        f"{p.relative_to(_ROOT)}"
        for p, text in _TEXT.items()
        if p.resolve() != this and re.search(r"(?<![\w/])MATH\.md", text)
    ]
    assert not stale, f"cite docs/math.md instead of MATH.md in {stale}"


def test_every_cited_section_and_fact_of_docs_math_exists():
    math = _MATH.read_text(encoding="utf-8")
    headings = {h.strip() for h in re.findall(r"^#+ (.+)$", math, flags=re.M)}
    facts = {int(n) for n in re.findall(r"^(\d+)\. \*\*", math, flags=re.M)}
    assert facts == set(range(1, 9))
    cited = 0
    for path, text in _TEXT.items():
        for section in re.findall(r"docs/math\.md,? §? ?([A-Z][a-z]+(?: [a-z]+)*)", text):
            assert any(h.startswith(section) for h in headings), (path, section)
            cited += 1
        for fact in re.findall(r"docs/math\.md fact (\d+)", text):
            assert int(fact) in facts, (path, fact)
            cited += 1
    assert cited >= 10


def test_every_result_the_package_cites_is_stated_in_docs_math():
    """Theorems, equations, lemmas and algorithms named in the package's docstrings appear in docs/math.md."""
    math = _MATH.read_text(encoding="utf-8").lower()
    pattern = r"(?:Theorem|Lemma) [0-9A-Z]\.\d+|[Ee]q\. \d+|Algorithm \d|Section \d"
    cited = {
        ref.lower()
        for path, text in _TEXT.items()
        if path.is_relative_to(_ROOT / "rspo_kernels") or path.is_relative_to(_ROOT / "csrc")
        for ref in re.findall(pattern, text)
    }
    assert {"theorem 4.3", "theorem c.4", "eq. 7", "eq. 11"} <= cited
    missing = sorted(ref for ref in cited if ref not in math)
    assert not missing, f"cited in the package but not in docs/math.md: {missing}"


def test_rspo_weights_follow_the_sign_rules_docs_math_states():
    """docs/math.md fact 3: w = R for k = 1 (negative for negative rewards), non-negative for k >= 2."""
    import numpy as np

    r = np.array([[-1.0, -2.0, 3.0, -0.5]])
    np.testing.assert_array_equal(rspo_kernels.weights.api.max_at_k_weights(r, 1), r)
    assert (rspo_kernels.weights.api.max_at_k_weights(r, 2) >= 0).all()


# --------------------------------------------------------------------------- code blocks of the docs
_PAGES = [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.M | re.S)
_NO_RUN = re.compile(r"^<!-- no-run: (.*?) -->$", flags=re.M)


def _python_blocks():
    """Every fenced python block: (page, line, code, reason not to run it or None)."""
    for page in _PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            marker = _NO_RUN.fullmatch(before)
            line = text.count("\n", 0, match.start()) + 1
            yield page.relative_to(_ROOT), line, match.group(1), marker.group(1).strip() if marker else None


_BLOCKS = list(_python_blocks())


@pytest.mark.parametrize(
    ("page", "line", "code", "no_run"),
    [
        pytest.param(
            *block,
            id=f"{block[0]}:{block[1]}",
            marks=[pytest.mark.skip(reason=f"no-run: {block[3]}")] if block[3] else [],
        )
        for block in _BLOCKS
    ],
)
def test_every_python_block_of_readme_and_docs_runs_as_written(page, line, code, no_run, monkeypatch, tmp_path):
    """Standalone: a fresh namespace, the CPU, nothing defined by an earlier block."""
    import torch

    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rng = torch.random.get_rng_state()
    try:
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__main__"})
    finally:
        torch.random.set_rng_state(rng)


def test_the_docs_have_runnable_blocks_and_no_run_markers_say_why():
    assert sum(1 for *_, no_run in _BLOCKS if no_run is None) >= 6
    for page in _PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _NO_RUN.finditer(text):
            after = text[match.end() :].lstrip(" ").split("\n", 2)
            assert after[0] == "" and after[1].startswith("```python"), (
                f"{page.name}: {match.group(0)} not before a fence"
            )
            assert len(match.group(1).strip()) >= 10, f"{page.name}: say why the block cannot run"


# --------------------------------------------------------------------------- what the README promises
_README = (_ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_quick_start_says_how_to_reach_the_command():
    """`rspo-kernels` lives in .venv/bin: the README says to activate the venv or to use that path."""
    quick = _README[_README.index("## Quick start") : _README.index("\n## ", _README.index("## Quick start") + 5)]
    assert "make demo" in quick and "source .venv/bin/activate" in quick and ".venv/bin/rspo-kernels" in quick
    assert quick.index("make demo") < quick.index("source .venv/bin/activate") < quick.index("rspo-kernels demo")


def test_install_instructions_are_what_works_today():
    """The package is not on the index: no page tells users to `pip install rspo_kernels[...]` from it."""
    for page in _PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"pip install [^\n`]*", text):
            command = match.group(0)
            if "rspo_kernels" in command and not re.match(r"`?\s*finds\s+nothing", text[match.end() :]):
                assert "--find-links" in command, f"{page.name}: {command!r} needs the package index"
    assert 'pip install -e ".[verl]"' in _README and "not on the Python package index" in _README


def test_no_page_claims_passk_training_std_alpha_is_below_one():
    """alpha depends on n, k and p and exceeds 1 (e.g. 2.33 at n=8, k=1, p=0.1: benchmarks/variance.py)."""
    for page in _PAGES + [_ROOT / "rspo_kernels" / "demo" / "report.py"]:
        text = re.sub(r"\s+", " ", page.read_text(encoding="utf-8"))
        assert not re.search(r"alpha ?(<|&lt;) ?1|alpha is a fraction", text), page.name
    assert "alpha depends on n, k and p and is neither bounded by 1 nor constant" in re.sub(r"\s+", " ", _README)


def test_demo_page_says_which_columns_the_seed_std_bound_covers():
    text = re.sub(r"\s+", " ", (_ROOT / "docs" / "demo.md").read_text(encoding="utf-8"))
    assert "In the pass@k columns the std over seeds is at most 0.024" in text
    assert "in the entropy column it reaches 0.055" in text


def test_readme_layout_matches_the_tree():
    layout = _README[_README.index("## Layout") :]
    block = re.search(r"```\n(.*?)```", layout, flags=re.S).group(1)
    top = set(re.findall(r"(?:^|\s)([a-z_]+)/", block, flags=re.M))
    assert top >= {"rspo_kernels", "weights", "loss", "ops", "demo", "csrc", "integrations", "benchmarks", "tests"}
    for name in top - {"results"}:
        assert (_ROOT / name).is_dir() or (_ROOT / "rspo_kernels" / name).is_dir(), name
    subpackages = {p.parent.name for p in (_ROOT / "rspo_kernels").glob("*/__init__.py")} - {"integrations"}
    assert subpackages <= top, f"subpackages missing from the README's Layout: {subpackages - top}"
    for sub in ("weights", "loss", "demo"):
        line = next(line for line in block.splitlines() if f"{sub}/ (" in line)
        start = line.index(f"{sub}/ (") + len(sub) + 3
        depth, end = 1, start
        while depth:  # the closing parenthesis of "sub/ (...)"; notes such as "(spec)" nest inside
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            end += 1
        modules = {re.sub(r"\*$", "", m.split(" ")[0]) for m in line[start : end - 1].split(" · ")}
        for module in modules:
            found = list((_ROOT / "rspo_kernels" / sub).glob(f"{module}*.py"))
            assert found, f"README Layout lists {sub}/{module}, which does not exist"
        actual = {p.stem for p in (_ROOT / "rspo_kernels" / sub).glob("*.py")} - {"__init__"}
        unlisted = {m for m in actual if not any(m.startswith(x) for x in modules)}
        assert not unlisted, f"rspo_kernels/{sub}/ has modules the README's Layout does not list: {unlisted}"


def test_the_docs_site_builds_strictly(tmp_path):
    """What `make docs` and CI run: a broken link, anchor or API reference fails the build."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra: pip install -e '.[docs]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("pass_at_k_weights", "max_at_k_weights", "rspo_loss", "RSPOLoss", "LossOptions", "backend_info"):
        assert f'id="rspo_kernels.{name}"' in api, name
