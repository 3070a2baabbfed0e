"""Settings and weight computation shared by the framework adapters.

Each adapter reads the same settings (objective, k, estimator, and optionally MaxRL's order and
a k schedule) from its framework's own configuration, under its own key names.
:class:`RSPOSettings` checks them once, and its error messages name the key the user has to
change, in the framework's spelling.
:func:`when_imported` lets an adapter patch a framework module only once something imports it,
so that a process that never needs that module never pays for (or fails on) its imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.util
import numbers
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import torch

import rspo_kernels as rk
from rspo_kernels.weights.estimators import BINARY_ONLY_ESTIMATORS

__all__ = ["DEFAULT_K", "OBJECTIVES", "RSPOSettings", "parse_k_schedule", "unwrap", "when_imported", "wrap"]

DEFAULT_K = 4
OBJECTIVES = ("pass@k", "max@k", "maxrl")
# "k:step" entries; ASCII digits only (str.isdigit would accept other scripts' digits).
_SCHEDULE_ENTRY = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*")


def parse_k_schedule(schedule: Any, key: str) -> tuple[tuple[int, int], ...] | None:
    """Parse a k schedule (PKPO-style annealing) into ``((start_step, k), ...)``, steps increasing.

    Parameters
    ----------
    schedule : str, int, sequence or None
        ``"8:0,4:200,1:400"``: k = 8 from step 0, 4 from step 200, 1 from step 400. A sequence
        of ``"k:step"`` strings or ``(k, step)`` pairs is read the same way. A single integer
        (``8``, or ``"8"``; Hydra hands ``key=8`` over as an int) is a constant k, ``"8:0"``.
        None or ``""``: no schedule.
    key : str
        The configuration key, for the error messages.

    Raises
    ------
    ValueError
        A malformed entry, a k below 1, steps that repeat or decrease, or no entry at step 0;
        the message names ``key``.
    """
    if schedule is None or (isinstance(schedule, str) and not schedule.strip()):
        return None
    entries: list[Any]
    if _is_int(schedule) or (isinstance(schedule, str) and schedule.strip().isascii() and schedule.strip().isdigit()):
        entries = [f"{int(schedule)}:0"]  # a constant k from step 0; a k below 1 fails below
    elif isinstance(schedule, (str, Sequence)):
        entries = schedule.split(",") if isinstance(schedule, str) else list(schedule)
    else:
        raise ValueError(
            f"{key}={schedule!r} ({type(schedule).__name__}) is not a k schedule; write e.g. "
            f"{key}='8:0,4:200,1:400' (k = 8 from step 0, 4 from step 200, 1 from step 400) or {key}=8 (constant)"
        )
    pairs = []
    for entry in entries:
        if isinstance(entry, str):
            match = _SCHEDULE_ENTRY.fullmatch(entry)
            pair = (int(match.group(1)), int(match.group(2))) if match else None
        elif isinstance(entry, Sequence) and len(entry) == 2 and all(_is_int(x) for x in entry):
            pair = (int(entry[0]), int(entry[1]))
        else:
            pair = None
        if pair is None or pair[0] < 1 or pair[1] < 0:
            raise ValueError(
                f"{key}={schedule!r}: entry {entry!r} is not 'k:step' with k >= 1 and step >= 0; "
                f"write e.g. {key}='8:0,4:200,1:400' (k = 8 from step 0, 4 from step 200, 1 from step 400)"
            )
        pairs.append((pair[1], pair[0]))
    steps = [step for step, _ in pairs]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"{key}={schedule!r}: the steps must increase from one entry to the next, got {steps}")
    if steps[0] != 0:
        raise ValueError(
            f"{key}={schedule!r} does not say which k to use from step 0: start it with 'k:0' (e.g. '8:0,4:200')"
        )
    return tuple(pairs)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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
    objective : {"pass@k", "max@k", "maxrl"}
        Pass@k for binary rewards, Max@k for graded ones, ``"maxrl"`` for maximum-likelihood RL
        (:func:`rspo_kernels.maxrl_weights`, binary rewards).
    k : int
        Sample size of the objective; every prompt group needs at least ``k`` responses.
        Unused by ``"maxrl"``, which reads ``order``.
    estimator : str
        One of :data:`rspo_kernels.ESTIMATORS` (:data:`rspo_kernels.MAXRL_ESTIMATORS` for
        ``"maxrl"``).
    keys : Mapping[str, str]
        How the framework spells each setting (``"k"``, ``"objective"``, ``"estimator"``,
        ``"order"``, ``"schedule"``) and the number of responses per prompt (``"n"``), e.g.
        ``{"k": "+algorithm.rspo_k", ...}``.
    order : int or None
        MaxRL's truncation order T (None: the group size).
    schedule : tuple of (start_step, k) or None
        The k schedule (the order's, under ``"maxrl"``); :meth:`at_step` applies it.
    """

    objective: str
    k: int
    estimator: str
    keys: Mapping[str, str]
    order: int | None = None
    schedule: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def create(
        cls,
        objective: Any,
        k: Any,
        estimator: Any,
        keys: Mapping[str, str],
        order: Any = None,
        schedule: Any = None,
    ) -> RSPOSettings:
        """Check raw configuration values and build the settings.

        Parameters
        ----------
        objective, k, estimator, order, schedule
            Raw values from the framework's configuration (strings from a command line are fine
            for ``k`` and ``order``; see :func:`parse_k_schedule` for ``schedule``).
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
                f"{keys['objective']}={objective!r} is not an RSPO objective; use 'pass@k' (binary rewards), "
                "'max@k' (graded rewards) or 'maxrl' (maximum-likelihood RL, binary rewards)"
            )
        est = str(estimator).strip().lower()
        choices = rk.MAXRL_ESTIMATORS if obj == "maxrl" else rk.ESTIMATORS
        if est not in choices:
            raise ValueError(
                f"{keys['estimator']}={estimator!r} is not an estimator for {obj}; choose one of {', '.join(choices)}"
            )
        order_int = _order(order, keys.get("order", "order"), obj)
        steps = parse_k_schedule(schedule, keys.get("schedule", "k_schedule"))
        if order_int is not None and steps is not None:  # under maxrl the schedule sets the order: one source only
            raise ValueError(
                f"{keys.get('order', 'order')}={order!r} and {keys.get('schedule', 'k_schedule')}={schedule!r} both "
                f"set MaxRL's order; keep one: {keys.get('order', 'order')} for a constant order, "
                f"{keys.get('schedule', 'k_schedule')} for one that changes with the step"
            )
        if obj == "maxrl" and est == "vr_cond" and (order_int is not None or steps is not None):
            raise ValueError(
                f"{keys['estimator']}=vr_cond has no truncation order (it estimates J_n, n the group size): "
                f"leave {keys.get('order', 'order')} and {keys.get('schedule', 'k_schedule')} unset"
            )
        # Command lines and environment variables hand k over as a string.
        k_int = positive_int(k, keys["k"], f"the k of {obj}")
        if est in BINARY_ONLY_ESTIMATORS and obj != "pass@k":
            raise ValueError(
                f"{keys['estimator']}={est} has no {obj} form (it is defined for binary rewards only): set "
                f"{keys['objective']}=pass@k or choose another estimator"
            )
        return cls(obj, k_int, est, dict(keys), order_int, steps)

    def at_step(self, step: int) -> RSPOSettings:
        """The settings in force at training step ``step``: the schedule's k (MaxRL: order) applied.

        Raises
        ------
        ValueError
            ``step`` that is not an integer >= 0 (the schedule starts at step 0).
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"at_step(step={step!r}): the training step must be an integer >= 0")
        if self.schedule is None:
            return self
        value = next(v for start, v in reversed(self.schedule) if start <= step)
        if self.objective == "maxrl":
            return dataclasses.replace(self, order=value, schedule=None)
        return dataclasses.replace(self, k=value, schedule=None)

    @property
    def min_group_size(self) -> int:
        """The fewest responses a group needs: k, or MaxRL's order (1 when the order is the group size)."""
        if self.objective == "maxrl":
            return self.order or 1
        return self.k

    @property
    def logged(self) -> tuple[str, float]:
        """``("rspo/k", k)`` (``("rspo/order", T)`` under MaxRL, 0 for the group size): the value in force."""
        if self.objective == "maxrl":
            return "rspo/order", float(self.order or 0)
        return "rspo/k", float(self.k)

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
        if self.schedule is not None:
            key = self.keys.get("schedule", "k_schedule")
            for step, value in self.schedule:
                if n < value:
                    what = "order" if self.objective == "maxrl" else "k"
                    raise ValueError(
                        f"{key} sets {what}={value} from step {step} but {self.keys['n']}={n}: {self.objective} "
                        f"needs at least {what} responses per prompt; lower it in {key} or raise {self.keys['n']}"
                    )
                self.at_step(step).check_group_size(n)
            return
        if self.objective == "maxrl":
            if self.order is not None and n < self.order:
                key = self.keys.get("order", "order")
                raise ValueError(
                    f"{key}={self.order} but {self.keys['n']}={n}: MaxRL's order T needs at least T responses "
                    f"per prompt (pass@k for k > n has no unbiased estimator); lower {key} or raise {self.keys['n']}"
                )
        elif n < self.k:
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
        try:
            if self.objective == "maxrl":
                return cast(torch.Tensor, rk.maxrl_weights(rewards, self.order, estimator=self.estimator, **layout))
            fn = rk.pass_at_k_weights if self.objective == "pass@k" else rk.max_at_k_weights
            return fn(rewards, self.k, estimator=self.estimator, **layout)
        except ValueError as exc:
            raise ValueError(f"{exc} [RSPO settings: {self.describe()}]") from exc

    def metric(self, rewards: torch.Tensor, **layout: Any) -> torch.Tensor:
        """Unbiased pass@k / max@k of each group (for logging); MaxRL: pass@1, the p of log p."""
        if self.objective == "maxrl":
            return cast(torch.Tensor, rk.pass_at_k(rewards, 1, validate=False, **layout))
        fn = rk.pass_at_k if self.objective == "pass@k" else rk.max_at_k
        return fn(rewards, self.k, validate=False, **layout)

    @property
    def metric_name(self) -> str:
        """``"pass@4"``-style name of the objective for this k (``"pass@1"`` under MaxRL)."""
        if self.objective == "maxrl":
            return "pass@1"
        return self.objective.replace("@k", f"@{self.k}")

    def describe(self) -> str:
        """The settings in the framework's own key names."""
        if self.objective == "maxrl":
            value = f"{self.keys.get('order', 'order')}={self.order if self.order is not None else 'n'}"
        else:
            value = f"{self.keys['k']}={self.k}"
        return (
            f"{self.keys['objective']}={self.objective}, {value}, "
            f"{self.keys['estimator']}={self.estimator}; the group size is set by {self.keys['n']}"
        )


def _order(order: Any, key: str, objective: str) -> int | None:
    """MaxRL's order from a config value: None / "" / "none" mean the group size."""
    if order is None or (isinstance(order, str) and order.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(order, str):
        value = int(order.strip()) if re.fullmatch(r"\s*[0-9]+\s*", order) else 0
    else:
        value = int(order) if _is_int(order) else 0
    if value < 1:
        raise ValueError(f"{key}={order!r} must be a positive integer (MaxRL's truncation order T) or unset (T = n)")
    if objective != "maxrl":
        raise ValueError(
            f"{key}={order!r} is MaxRL's truncation order: it needs the objective 'maxrl', got {objective}"
        )
    return value


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
