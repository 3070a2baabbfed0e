"""The single place that decides which backend runs an operation.

One table maps (operation, backend) to an implementation, and one preference list per device type
says which backend to try first. Implementations are imported lazily, so a missing optional
dependency (Triton, the compiled extension) costs nothing until it is needed, and a backend that
fails to load is reported with a one-time warning instead of being swallowed.

Set ``RSPO_KERNELS_BACKEND`` to ``reference``, ``torch``, ``cpp`` or ``triton`` to force one
backend for every operation that has it (``reference`` is the plain-torch specification; use it to
debug a suspected kernel bug).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable

import torch

__all__ = ["implementation", "backend_info", "warn_if_extension_missing", "BACKEND_ENV"]

BACKEND_ENV = "RSPO_KERNELS_BACKEND"
EXTENSION = "rspo_kernels._cpu"
UNAVAILABLE_TRITON = "unavailable (no CUDA / triton not installed)"

# (operation, backend) -> "module:function". Every fast backend is tested against "reference".
_IMPLEMENTATIONS: dict[tuple[str, str], str] = {
    ("weights", "reference"): "rspo_kernels.weights.estimators:grouped_weights",
    ("pass_at_k", "reference"): "rspo_kernels.weights.estimators:grouped_pass_at_k",
    ("max_at_k", "reference"): "rspo_kernels.weights.estimators:grouped_max_at_k",
    ("risk_sensitive_weights", "reference"): "rspo_kernels.weights.estimators:grouped_risk_sensitive_weights",
    ("first_invalid", "reference"): "rspo_kernels.weights._validation:first_invalid",
    ("first_invalid", "cpp"): "rspo_kernels.weights._cpu_backend:first_invalid",
    ("weights", "triton"): "rspo_kernels.ops.weights:grouped_weights",
    # The fused log-prob op behind token_logprobs and every loss: (B, T, V) rows -> (N,) log-probs.
    ("token_logprobs", "triton"): "rspo_kernels.ops.token_logprobs:fused_token_logprobs",
    ("token_logprobs", "torch"): "rspo_kernels.loss.chunked:fused_token_logprobs",
    ("token_logprobs", "reference"): "rspo_kernels.loss.reference:fused_token_logprobs_reference",
    ("weights", "cpp"): "rspo_kernels.weights._cpu_backend:grouped_weights",
    ("pass_at_k", "cpp"): "rspo_kernels.weights._cpu_backend:grouped_pass_at_k",
    ("max_at_k", "cpp"): "rspo_kernels.weights._cpu_backend:grouped_max_at_k",
}

# Backends tried in order for tensors on each device type.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "torch", "reference"),
    "cuda": ("triton", "torch", "reference"),
}
_DEFAULT_PREFERENCE = ("torch", "reference")

# Input dtypes a backend does not take; the next backend in the preference list serves them.
_UNSUPPORTED_DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    ("token_logprobs", "triton"): (torch.float64,),
}

_cache: dict[tuple[str, str], Callable] = {}
# (op, backend) -> (what backend_info says, the load error itself).
_failures: dict[tuple[str, str], tuple[str, str]] = {}
# Backends forced through BACKEND_ENV that could not be loaded and were already reported.
_warned_forced: set[str] = set()


def _absent(exc: BaseException) -> str | None:
    """Why an optional backend is simply not installed, or ``None`` when its import is broken."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name is None:
        return None
    if exc.name == EXTENSION:
        return "unavailable (the C++ extension is not built: see the README's Requirements)"
    if exc.name.split(".")[0] == "triton":
        import torch

        return "unavailable (triton not installed)" if torch.cuda.is_available() else UNAVAILABLE_TRITON
    return None


def _load(op: str, backend: str) -> Callable | None:
    key = (op, backend)
    if key in _cache:
        return _cache[key]
    if key in _failures or key not in _IMPLEMENTATIONS:
        return None
    module_name, func_name = _IMPLEMENTATIONS[key].split(":")
    try:
        # torch.compile cannot trace importlib; a module already imported is a plain dict lookup.
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        func = getattr(module, func_name)
    except Exception as exc:  # an optional backend may fail in many ways (ImportError, OSError, ...)
        error = f"{type(exc).__name__}: {exc}"
        absent = _absent(exc)
        _failures[key] = (absent or f"failed to load ({error})", error)
        if absent is None:  # a missing optional backend is normal; a broken one is worth a warning
            warnings.warn(
                f"rspo_kernels: the {backend!r} backend for {op!r} failed to load ({error}); "
                f"falling back to the next backend. Set {BACKEND_ENV}=reference to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    _cache[key] = func
    return func


_warned_extension_missing = False


def warn_if_extension_missing() -> None:
    """Warn (once per process, when ``rspo_kernels`` is first used) that the C++ extension was not built."""
    global _warned_extension_missing
    if _warned_extension_missing:
        return
    _warned_extension_missing = True
    if importlib.util.find_spec(EXTENSION) is not None:
        return
    if os.environ.get(BACKEND_ENV, "").strip().lower() in ("reference", "torch", "triton"):
        return  # the user chose a backend that does not need the extension
    warnings.warn(
        "rspo_kernels: the C++ extension (rspo_kernels._cpu) is not built, so CPU tensors use the "
        "plain-torch backend (correct, but 10x-300x slower). It is built at install time when a "
        "C++17 compiler is found: install one (Debian/Ubuntu: apt install g++; macOS: "
        "xcode-select --install; Windows: Visual Studio Build Tools) and reinstall rspo_kernels. "
        f"Set {BACKEND_ENV}=reference to silence this.",
        RuntimeWarning,
        stacklevel=3,  # the user's line that first touched an ``rspo_kernels`` name
    )


def _candidates(device_type: str) -> tuple[str, ...]:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        known = {b for _, b in _IMPLEMENTATIONS}
        if forced not in known:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; choose one of {sorted(known)}")
        return (forced, "reference")
    return _PREFERENCE.get(device_type, _DEFAULT_PREFERENCE)


def _warn_forced_unavailable(op: str, backend: str, fallback: str) -> None:
    """A backend the user forced is not there: say so once, instead of silently running another."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if backend != forced or backend in _warned_forced or (op, backend) not in _failures:
        return
    _warned_forced.add(backend)
    warnings.warn(
        f"rspo_kernels: {BACKEND_ENV}={backend} is set, but the {backend!r} backend is "
        f"{_failures[op, backend][0]}; falling back to the {fallback!r} backend. Install it, or unset "
        f"{BACKEND_ENV}.",
        UserWarning,
        stacklevel=3,
    )


def implementation(
    op: str, device_type: str, dtype: torch.dtype | None = None, *, warn: bool = True
) -> tuple[str, Callable]:
    """Return ``(backend_name, function)`` serving ``op`` for ``dtype`` tensors on ``device_type``.

    When ``RSPO_KERNELS_BACKEND`` forces a backend that cannot be loaded (e.g. ``triton`` without
    Triton installed), the first such call warns once (``UserWarning``) unless ``warn=False``.
    """
    skipped: str | None = None
    for backend in _candidates(device_type):
        if dtype is not None and dtype in _UNSUPPORTED_DTYPES.get((op, backend), ()):
            continue
        func = _load(op, backend)
        if func is not None:
            if warn and skipped is not None:
                _warn_forced_unavailable(op, skipped, backend)
            return backend, func
        skipped = skipped or backend
    raise RuntimeError(f"no backend implements {op!r} on {device_type!r}")  # pragma: no cover


def backend_info(debug: bool = False) -> dict[str, dict[str, str]]:
    """Which backend serves each operation on each device type, and why others do not.

    Parameters
    ----------
    debug : bool, default False
        Report the exception behind every backend that could not be loaded, instead of a short
        reason (``"unavailable (no CUDA / triton not installed)"``).

    Returns
    -------
    dict
        ``{device_type: {op: backend}}`` for ``"cpu"`` and ``"cuda"`` (what would serve a CUDA
        tensor, also on a machine without one), plus ``"failures"``, mapping ``"op/backend"`` to
        the reason each backend that was tried could not be used.

    Examples
    --------
    >>> import rspo_kernels as rk
    >>> rk.backend_info()["cpu"]["weights"] in {"cpp", "torch", "reference"}
    True
    """
    ops = sorted({op for op, _ in _IMPLEMENTATIONS})
    info: dict[str, dict[str, str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for device_type in ("cpu", "cuda"):
            info[device_type] = {op: implementation(op, device_type, warn=False)[0] for op in ops}
    info["failures"] = {
        f"{op}/{backend}": error if debug else reason for (op, backend), (reason, error) in sorted(_failures.items())
    }
    return info
