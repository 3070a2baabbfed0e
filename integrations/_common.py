"""Settings and weight computation shared by the framework adapters.

Each adapter reads the same three settings (objective, k, estimator) from its framework's own
configuration, under its own key names. :class:`RSPOSettings` checks them once, and its error
messages name the key the user has to change, in the framework's spelling.
:func:`when_imported` lets an adapter patch a framework module only once something imports it,
so that a process that never needs that module never pays for (or fails on) its imports.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

import rspo_kernels as rk
from rspo_kernels.weights.estimators import BINARY_ONLY_ESTIMATORS

__all__ = ["DEFAULT_K", "OBJECTIVES", "RSPOSettings", "unwrap", "when_imported", "wrap"]

DEFAULT_K = 4
OBJECTIVES = ("pass@k", "max@k")


def positive_int(value: Any, key: str, what: str) -> int:
    """A configuration value that must be a positive integer: an ``int`` or a string of ASCII digits.

    ``str.isdigit`` alone would admit ``"²"`` (which ``int`` refuses) and ``"٤"`` (which ``int``
    reads as 4); only ``0-9`` are accepted.

    Raises
    ------
    ValueError
        Anything else (``None``, ``"4.0"``, ``True``, ``0``), naming ``key``.
    """
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if text.isascii() and text.isdigit() else 0
    else:
        number = int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else 0
    if number < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer ({what})")
    return number


@dataclass(frozen=True)
class RSPOSettings:
    """Validated RSPO settings, with the user-facing names of the keys they came from.

    Attributes
    ----------
    objective : {"pass@k", "max@k"}
        Pass@k for binary rewards, Max@k for graded ones.
    k : int
        Sample size of the objective; every prompt group needs at least ``k`` responses.
    estimator : str
        One of :data:`rspo_kernels.ESTIMATORS`.
    keys : Mapping[str, str]
        How the framework spells each setting (``"k"``, ``"objective"``, ``"estimator"``) and the
        number of responses per prompt (``"n"``), e.g. ``{"k": "+algorithm.rspo_k", ...}``.
    """

    objective: str
    k: int
    estimator: str
    keys: Mapping[str, str]

    @classmethod
    def create(cls, objective: Any, k: Any, estimator: Any, keys: Mapping[str, str]) -> RSPOSettings:
        """Check raw configuration values and build the settings.

        Parameters
        ----------
        objective, k, estimator
            Raw values from the framework's configuration (strings from a command line are fine
            for ``k``).
        keys : Mapping[str, str]
            Key names for the error messages, see the class docstring.

        Raises
        ------
        ValueError
            Unknown objective or estimator, or k that is not a positive integer; the message names
            the key to change.
        """
        obj = str(objective).strip().lower().replace("_at_", "@")
        if obj not in OBJECTIVES:
            raise ValueError(
                f"{keys['objective']}={objective!r} is not an RSPO objective; use 'pass@k' (binary rewards) "
                "or 'max@k' (graded rewards)"
            )
        est = str(estimator).strip().lower()
        if est not in rk.ESTIMATORS:
            raise ValueError(
                f"{keys['estimator']}={estimator!r} is not an estimator; choose one of {', '.join(rk.ESTIMATORS)}"
            )
        # Command lines and environment variables hand k over as a string.
        k_int = positive_int(k, keys["k"], f"the k of {obj}")
        if est in BINARY_ONLY_ESTIMATORS and obj != "pass@k":
            raise ValueError(
                f"{keys['estimator']}={est} has no {obj} form (it is defined for binary rewards only): set "
                f"{keys['objective']}=pass@k or choose another estimator"
            )
        return cls(obj, k_int, est, dict(keys))

    def check_group_size(self, n: Any) -> None:
        """Fail at configuration time when groups of ``n`` responses cannot serve these settings.

        Beyond ``k <= n``, the estimator computes the weights of one dummy group of size ``n``,
        so that every constraint of the chosen estimator (``pkpo_loo`` needs k < n,
        ``hitchhiking`` a multiple of k, an estimator that supports only one objective, ...)
        fails now rather than after the first rollout.

        Raises
        ------
        ValueError
            Naming both configuration keys, e.g. ``rspo_k=8 but num_generations=4``.
        """
        n = positive_int(n, self.keys["n"], "the number of responses per prompt")
        if n < self.k:
            raise ValueError(
                f"{self.keys['k']}={self.k} but {self.keys['n']}={n}: {self.objective} needs at least k responses "
                f"per prompt; lower {self.keys['k']} or raise {self.keys['n']}"
            )
        self.weights(torch.tensor([[1.0] + [0.0] * (n - 1)]))

    def weights(self, rewards: torch.Tensor, **layout: Any) -> torch.Tensor:
        """RSPO weights of ``rewards`` grouped as in :func:`rspo_kernels.pass_at_k_weights`.

        Parameters
        ----------
        rewards : torch.Tensor
            ``(B, n)`` or ``(N,)`` rewards.
        **layout
            ``group_size=`` or ``group_ids=`` for 1-D rewards.

        Raises
        ------
        ValueError
            From the library (k larger than a group, non-binary rewards for Pass@k, ...), with the
            adapter's key names appended.
        """
        fn = rk.pass_at_k_weights if self.objective == "pass@k" else rk.max_at_k_weights
        try:
            return fn(rewards, self.k, estimator=self.estimator, **layout)
        except ValueError as exc:
            raise ValueError(f"{exc} [RSPO settings: {self.describe()}]") from exc

    def metric(self, rewards: torch.Tensor, **layout: Any) -> torch.Tensor:
        """Unbiased pass@k / max@k of each group (for logging)."""
        fn = rk.pass_at_k if self.objective == "pass@k" else rk.max_at_k
        return fn(rewards, self.k, validate=False, **layout)

    @property
    def metric_name(self) -> str:
        """``"pass@4"``-style name of the objective for this k."""
        return self.objective.replace("@k", f"@{self.k}")

    def describe(self) -> str:
        """The settings in the framework's own key names."""
        return (
            f"{self.keys['objective']}={self.objective}, {self.keys['k']}={self.k}, "
            f"{self.keys['estimator']}={self.estimator}; the group size is set by {self.keys['n']}"
        )


class _PatchAfterExec(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds one module with the other finders, runs it, then hands it to the callbacks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.callbacks: list[Callable[[ModuleType], None]] = []
        self._loader: Any = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or self._loader is not None:
            return None
        sys.meta_path.remove(self)  # one shot: the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self._loader
        self._loader.exec_module(module)
        for callback in self.callbacks:
            callback(module)


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once the module ``name`` is imported: now if it already is.

    The callback runs right after the module body, before any ``from name import x`` elsewhere
    binds ``x``, so it can replace module attributes for every later importer.
    """
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    for finder in sys.meta_path:
        if isinstance(finder, _PatchAfterExec) and finder.name == name:
            finder.callbacks.append(callback)
            return
    finder = _PatchAfterExec(name)
    finder.callbacks.append(callback)
    sys.meta_path.insert(0, finder)


def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make(original)``, once; :func:`unwrap` restores it."""
    original = getattr(owner, name, None)
    if original is None:  # another version of the framework: nothing to adapt there
        return
    if getattr(original, "_rspo_original", None) is None:
        wrapper = make(original)
        wrapper._rspo_original = original
        setattr(owner, name, wrapper)


def unwrap(owner: Any, name: str) -> None:
    """Undo :func:`wrap`."""
    original = getattr(getattr(owner, name, None), "_rspo_original", None)
    if original is not None:
        setattr(owner, name, original)


@contextlib.contextmanager
def framework_import(adapter: str, extra: str) -> Iterator[None]:
    """Around an adapter's framework imports: a missing module names the extra that installs it.

    Without it a user sees ``No module named 'verl'`` (or ``'cachetools'``, which verl imports
    without declaring) and has to guess what to install. The error stays a
    ``ModuleNotFoundError`` with the same ``name``, so ``pytest.importorskip`` and
    ``except ImportError`` behave as before.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"rspo_kernels.integrations.{adapter} needs the {extra!r} extra, which is not fully installed "
            f"(No module named {exc.name!r}): from a checkout of rspo_kernels run "
            f'pip install -e ".[{extra}]" (see docs/install.md)',
            name=exc.name,
        ) from exc
