"""The docstring examples are real: run them."""

import doctest

import pytest

import rspo_kernels._dispatch
import rspo_kernels.api
import rspo_kernels.loss.api


@pytest.mark.parametrize("module", [rspo_kernels.api, rspo_kernels._dispatch, rspo_kernels.loss.api])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
