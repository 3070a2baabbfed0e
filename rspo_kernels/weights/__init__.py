"""Per-response weights for Pass@k / Max@k and the matching unbiased metrics.

- :mod:`~rspo_kernels.weights.estimators`: the plain-torch specification (every formula, once);
- :mod:`~rspo_kernels.weights.maxrl`: the MaxRL (maximum-likelihood RL) weights' specification;
- :mod:`~rspo_kernels.weights._layout`: every input layout normalised into one canonical form;
- :mod:`~rspo_kernels.weights._validation`: reward and argument checks;
- :mod:`~rspo_kernels.weights._cpu_backend`: the C++ backend's adapter;
- :mod:`~rspo_kernels.weights.api`: the public functions (re-exported as ``rspo_kernels.*``).

The Triton kernels live in :mod:`rspo_kernels.ops.weights`; :mod:`rspo_kernels._dispatch` picks
the backend for each call.
"""

from rspo_kernels.weights.api import (
    ESTIMATORS,
    MAXRL_ESTIMATORS,
    max_at_k,
    max_at_k_weights,
    maxrl_weights,
    pass_at_k,
    pass_at_k_weights,
    risk_sensitive_weights,
)

__all__ = [
    "ESTIMATORS",
    "MAXRL_ESTIMATORS",
    "max_at_k",
    "max_at_k_weights",
    "maxrl_weights",
    "pass_at_k",
    "pass_at_k_weights",
    "risk_sensitive_weights",
]
