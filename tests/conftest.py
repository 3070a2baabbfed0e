"""Shared pytest configuration: a deterministic hypothesis profile and reward strategies."""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))  # lets test modules import `oracles`

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. Triton reads this
# when a kernel is decorated, so it must be set before any rspo_kernels.ops module is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def reward_groups(draw, min_n: int = 1, max_n: int = 8, binary: bool = False):
    """One group of rewards with ties on purpose: values come from a small palette."""
    n = draw(st.integers(min_n, max_n))
    if binary:
        return draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    palette = draw(
        st.lists(
            st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32),
            min_size=1,
            max_size=max(1, n // 2 + 1),
        )
    )
    return draw(st.lists(st.sampled_from(palette), min_size=n, max_size=n))
