"""rspo_kernels: exact risk-seeking policy-gradient weights and fused policy losses.

Public API
----------
pass_at_k_weights, max_at_k_weights
    Per-response weights whose expectation is the gradient of Pass@k / Max@k (RSPO and the
    estimators users compare against).
maxrl_weights
    Weights for maximum-likelihood RL's truncated objective sum_{k<=T} (1/k) pass@k.
risk_sensitive_weights
    RS-GRPO's risk-sensitive advantage for (1/beta) log E exp(beta R) (biased; centred).
pass_at_k, max_at_k
    The matching unbiased evaluation metrics, one value per group.
token_logprobs, rspo_loss, RSPOLoss
    Fused token log-probabilities and the clipped RSPO policy loss whose logits gradient is
    computed without materialising the (tokens x vocab) softmax.
backend_info
    Which backend (C++, Triton, torch) serves each operation.

The names are imported on first use (PEP 562), so that ``import rspo_kernels`` and the
``rspo-kernels --help`` command line do not pay for importing torch until a name is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from rspo_kernels._dispatch import backend_info
    from rspo_kernels.loss import (
        LOSS_AGG_MODES,
        LossOptions,
        RSPOLinearLoss,
        RSPOLoss,
        TokenStats,
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
        risk_sensitive_weights,
    )

__version__ = "0.1.0"

# Public name -> the module that defines it. Add a new public name here and to the block above.
_EXPORTS = {
    "backend_info": "rspo_kernels._dispatch",
    "LOSS_AGG_MODES": "rspo_kernels.loss",
    "LossOptions": "rspo_kernels.loss",
    "RSPOLinearLoss": "rspo_kernels.loss",
    "RSPOLoss": "rspo_kernels.loss",
    "rspo_linear_loss": "rspo_kernels.loss",
    "rspo_loss": "rspo_kernels.loss",
    "TokenStats": "rspo_kernels.loss",
    "token_logprobs": "rspo_kernels.loss",
    "token_logprobs_linear": "rspo_kernels.loss",
    "ESTIMATORS": "rspo_kernels.weights.api",
    "max_at_k": "rspo_kernels.weights.api",
    "max_at_k_weights": "rspo_kernels.weights.api",
    "pass_at_k": "rspo_kernels.weights.api",
    "pass_at_k_weights": "rspo_kernels.weights.api",
    "MAXRL_ESTIMATORS": "rspo_kernels.weights.api",
    "maxrl_weights": "rspo_kernels.weights.api",
    "risk_sensitive_weights": "rspo_kernels.weights.api",
}

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
__all__ += ["TokenStats"]
__all__ += ["risk_sensitive_weights"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rspo_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    # The C++ extension is optional at install time; say so once, when the library is first used.
    importlib.import_module("rspo_kernels._dispatch").warn_if_extension_missing()
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
