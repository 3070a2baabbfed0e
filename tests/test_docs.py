"""The docstring examples are real, and the mathematics they cite is in the repository."""

import doctest
import re
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
