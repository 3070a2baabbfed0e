"""rspo_kernels: exact risk-seeking policy-gradient weights and fused policy losses.

Public API
----------
pass_at_k_weights, max_at_k_weights
    Per-response weights whose expectation is the gradient of Pass@k / Max@k (RSPO and the
    estimators users compare against).
maxrl_weights
    Weights for maximum-likelihood RL's truncated objective sum_{k<=T} (1/k) pass@k.
pass_at_k, max_at_k
    The matching unbiased evaluation metrics, one value per group.
token_logprobs, rspo_loss, RSPOLoss
    Fused token log-probabilities and the clipped RSPO policy loss whose logits gradient is
    computed without materialising the (tokens x vocab) softmax.
backend_info
    Which backend (C++, Triton, torch) serves each operation.
"""

from rspo_kernels._dispatch import backend_info, warn_if_extension_missing
from rspo_kernels.loss import (
    LOSS_AGG_MODES,
    LossOptions,
    RSPOLinearLoss,
    RSPOLoss,
    rspo_linear_loss,
    rspo_loss,
    token_logprobs,
    token_logprobs_linear,
)
from rspo_kernels.weights.api import (
    ESTIMATORS,
    MAXRL_ESTIMATORS,
    max_at_k,
    max_at_k_weights,
    maxrl_weights,
    pass_at_k,
    pass_at_k_weights,
)

# The C++ extension is optional at install time; say so once, here, rather than on every call.
warn_if_extension_missing()
del warn_if_extension_missing

__version__ = "0.1.0"
__all__ = [
    "ESTIMATORS",
    "LOSS_AGG_MODES",
    "LossOptions",
    "RSPOLoss",
    "backend_info",
    "max_at_k",
    "max_at_k_weights",
    "pass_at_k",
    "pass_at_k_weights",
    "rspo_loss",
    "token_logprobs",
    "__version__",
]
__all__ += ["RSPOLinearLoss", "rspo_linear_loss", "token_logprobs_linear"]
__all__ += ["MAXRL_ESTIMATORS", "maxrl_weights"]
