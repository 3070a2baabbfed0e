"""The fused RSPO policy loss.

Modules, in dependency order: :mod:`~rspo_kernels.loss.options` (the hyper-parameters),
:mod:`~rspo_kernels.loss.layout` (padded / packed inputs normalised into per-token vectors),
:mod:`~rspo_kernels.loss.reference` (the unfused specification), :mod:`~rspo_kernels.loss.chunked`
(the CPU fused log-probs), :mod:`~rspo_kernels.loss.policy` (log-probs to loss, shared by every
fast path) and :mod:`~rspo_kernels.loss.api` (the public functions). The Triton op lives in
:mod:`rspo_kernels.ops.token_logprobs`; :mod:`~rspo_kernels.loss.vocab_parallel` merges the
statistics of vocabulary slices held by tensor-parallel ranks. :mod:`~rspo_kernels.loss.softcap` is
the final-logit soft-capping every backend applies, and :mod:`~rspo_kernels.loss.token_stats` the
per-token statistics (sum pi^2, top-k) and multi-target log-probs.
"""

from rspo_kernels.loss import chunked as _chunked  # noqa: F401  (the CPU backend: pure torch, import it now)
from rspo_kernels.loss.api import RSPOLoss, rspo_loss, rspo_loss_with_options, token_logprobs
from rspo_kernels.loss.linear import RSPOLinearLoss, rspo_linear_loss, token_logprobs_linear
from rspo_kernels.loss.options import LOSS_AGG_MODES, LossOptions
from rspo_kernels.loss.token_stats import TokenStats

__all__ = ["LOSS_AGG_MODES", "LossOptions", "RSPOLoss", "rspo_loss", "rspo_loss_with_options", "token_logprobs"]
__all__ += ["RSPOLinearLoss", "rspo_linear_loss", "token_logprobs_linear"]
__all__ += ["TokenStats"]
