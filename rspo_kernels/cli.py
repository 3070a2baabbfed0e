"""The ``rspo-kernels`` command (also ``python -m rspo_kernels``).

Subcommands
-----------
demo
    Train small policies with policy gradient, the hitchhiking baseline and RSPO on a synthetic
    task where risk-seeking matters; print a results table, write a PNG and a JSON file.
weights
    Read rewards from CSV or JSONL (a group column and a reward column) and write them back with
    a ``weight`` column: the Pass@k or Max@k policy-gradient weight of each row.
bench
    Run the benchmark suite of a source checkout (``benchmarks/runner.py``).

Every user error (bad input row, impossible k, missing file) prints one line to stderr and exits
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import re
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]

_PROG = "rspo-kernels"


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- weights: reading
def _parse_reward(value: Any, line: int, column: str, fmt: str) -> float:
    """A finite float from a CSV cell or a JSON number; anything else names its line.

    JSONL rewards must be JSON numbers: a string (``"1"``) and a boolean (``true``) are both
    refused, so that no reward is read by guessing what its type meant.
    """
    if fmt == "jsonl" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        kind = "a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str) else "not a number"
        raise UsageError(
            f"line {line}: {column!r} must be a JSON number (such as 1 or 0.5), got {json.dumps(value)}, "
            f"which is {kind}; write rewards as numbers"
        )
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"line {line}: {column!r} is not a number: {value!r}") from None
    except OverflowError:  # a JSON integer beyond float64's range (a 400-digit reward)
        raise UsageError(
            f"line {line}: {column!r} is an integer of {len(str(abs(value)))} digits, beyond float64's range "
            "(about 1.8e308); rescale the rewards"
        ) from None
    if not math.isfinite(number):
        raise UsageError(f"line {line}: {column!r} must be finite, got {value!r}")
    return number


def _read_csv(stream: TextIO, group_col: str, reward_col: str) -> tuple[list[dict], list[str], list[int]]:
    """Rows (dicts of strings), the header, and the line number of each row."""
    reader = csv.DictReader(stream)
    header = reader.fieldnames
    if not header:
        raise UsageError("line 1: no header row; the first line must name the columns (e.g. 'group,reward')")
    repeated = [c for i, c in enumerate(header) if c in header[:i]]
    if repeated:  # DictReader would silently keep the last such column's values
        raise UsageError(f"line 1: the header names the column {repeated[0]!r} twice; give each column its own name")
    for column, flag in ((group_col, "--group-col"), (reward_col, "--reward-col")):
        if column not in header:
            raise UsageError(
                f"line 1: the header has no column {column!r} (columns: {', '.join(header)}); choose one with {flag}"
            )
    rows, lines = [], []
    for row in reader:
        line = reader.line_num  # the row's last physical line; rows are single-line in practice
        if None in row:
            raise UsageError(f"line {line}: {len(header) + len(row[None])} fields, but the header has {len(header)}")
        for column in (group_col, reward_col):
            if row[column] is None or row[column].strip() == "":
                raise UsageError(f"line {line}: missing value for column {column!r}")
        rows.append(row)
        lines.append(line)
    return rows, list(header), lines


def _read_jsonl(stream: TextIO, group_col: str, reward_col: str) -> tuple[list[dict], list[str], list[int]]:
    """Objects from JSON Lines (blank lines skipped), no header, and each object's line number."""
    rows, lines = [], []
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {line}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise UsageError(f"line {line}: unreadable JSON number ({exc}); rescale the rewards") from None
        if not isinstance(row, dict):
            raise UsageError(f"line {line}: expected a JSON object, got {type(row).__name__}")
        for column, flag in ((group_col, "--group-col"), (reward_col, "--reward-col")):
            if column not in row:
                fields = ", ".join(map(repr, row)) or "none"
                raise UsageError(
                    f"line {line}: missing field {column!r} (fields: {fields}); choose the field with {flag}"
                )
        group = row[group_col]
        if group is None or not isinstance(group, (str, int, float, bool)):
            raise UsageError(f"line {line}: {group_col!r} must be a string or a number, got {json.dumps(group)}")
        rows.append(row)
        lines.append(line)
    return rows, [], lines


def _input_format(path: str, requested: str | None, text: str) -> str:
    """``--format`` if given, else the file extension, else (stdin) the first non-blank character."""
    if requested:
        return requested
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if path == "-":
        return "jsonl" if text.lstrip().startswith("{") else "csv"
    raise UsageError(f"cannot tell the format of {path!r} from its extension; pass --format csv or --format jsonl")


def _read_text(path: str) -> str:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would otherwise
    # become part of the first column's name.
    if path == "-":
        return sys.stdin.read().removeprefix("\ufeff")
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path!r} is not UTF-8 text") from None


# --------------------------------------------------------------------------- weights: command
def _compute_weights(
    rows: list[dict],
    lines: list[int],
    group_col: str,
    reward_col: str,
    objective: str,
    k: int,
    estimator: str,
    fmt: str,
) -> list[float]:
    """Per-row weights, grouping rows by their group label (groups need not be contiguous).

    Raises
    ------
    UsageError
        A reward that is not a finite number, or anything the library rejects (k larger than a
        group, non-binary rewards for Pass@k, ...); the library's message gains the line number.
    """
    import numpy as np

    import rspo_kernels as rk

    rewards = np.array(
        [_parse_reward(row[reward_col], line, reward_col, fmt) for row, line in zip(rows, lines, strict=True)]
    )
    if estimator not in rk.ESTIMATORS:
        raise UsageError(f"--estimator {estimator!r} is not an estimator; choose one of {', '.join(rk.ESTIMATORS)}")
    groups: list[Hashable] = [row[group_col] for row in rows]
    _check_against_flags(groups, rewards, lines, objective, k, estimator)
    weight_fn = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    try:
        weights = weight_fn(rewards, k, group_ids=groups, estimator=estimator)
    except (ValueError, TypeError) as exc:
        # The library names the offending element by input index; users think in file lines.
        message = re.sub(r"input index (\d+)", lambda m: f"line {lines[int(m.group(1))]}", str(exc))
        # ... and in columns and flags, not in the library's argument names.
        message = message.replace("group_ids", f"the {group_col!r} column (--group-col)")
        raise UsageError(message) from None
    overflow = np.flatnonzero(~np.isfinite(weights))
    if overflow.size:  # rewards near float64's limit (1e308): the weight, linear in them, overflows
        row = int(overflow[0])
        raise UsageError(
            f"line {lines[row]}: the weight overflows float64 (group {groups[row]!r}, rewards up to "
            f"{float(np.abs(rewards).max()):g}); rescale the rewards"
        )
    return [float(w) for w in weights]


def _check_against_flags(
    groups: list[Hashable], rewards: Any, lines: list[int], objective: str, k: int, estimator: str
) -> None:
    """The library's checks that a flag can fix, phrased with the flag to change.

    The library's own messages suggest Python calls (``max_at_k_weights``); a CLI user needs
    ``--objective max@k``, ``-k`` or ``--estimator``. Groups are numbered as the library numbers
    them: in order of first appearance.
    """
    if k < 1:
        raise UsageError(f"-k must be at least 1, got {k}")
    first_row: dict[Hashable, int] = {}
    sizes: dict[Hashable, int] = {}
    for row, group in enumerate(groups):
        first_row.setdefault(group, row)
        sizes[group] = sizes.get(group, 0) + 1
    for number, (group, n) in enumerate(sizes.items()):
        name = f"group {number} (group_id {group!r}) has {n} samples but k={k}"
        if n < k:
            raise UsageError(
                f"{name}; {objective} needs n >= k (no unbiased estimator exists for n < k): "
                f"lower -k to at most {n}, or add responses to that group"
            )
        if estimator == "pkpo_loo" and n <= k:
            raise UsageError(f"{name}; the 'pkpo_loo' estimator needs n > k: lower -k, or choose another --estimator")
        if estimator == "hitchhiking" and n % k:
            raise UsageError(
                f"{name}; the 'hitchhiking' estimator needs group sizes that are multiples of k: "
                "change -k, or choose another --estimator"
            )
    if objective == "pass@k":
        bad = [i for i, r in enumerate(rewards) if r not in (0.0, 1.0)]
        if bad:
            row = bad[0]
            number = list(sizes).index(groups[row])
            raise UsageError(
                f"group {number} (group_id {groups[row]!r}) has reward {rewards[row]:g} at line {lines[row]}; "
                "Pass@k needs rewards in {0, 1}: pass --objective max@k for graded rewards, or threshold them"
            )


def _weights(args: argparse.Namespace) -> int:
    text = _read_text(args.input)
    source = "stdin" if args.input == "-" else repr(args.input)
    if not text.strip():
        raise UsageError(f"{source} is empty: nothing to weigh")
    fmt = _input_format(args.input, args.format, text)
    reader = _read_csv if fmt == "csv" else _read_jsonl
    # A field may be as long as the input (a completion column over csv's default 131072 characters).
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        rows, header, lines = reader(io.StringIO(text, newline=""), args.group_col, args.reward_col)
    finally:
        csv.field_size_limit(limit)
    if not rows:
        raise UsageError(f"{source} has a header but no rows: nothing to weigh")
    if args.weight_col in header or any(args.weight_col in row for row in rows):
        raise UsageError(
            f"the input already has a {args.weight_col!r} column; name the output column with --weight-col"
        )
    weights = _compute_weights(
        rows, lines, args.group_col, args.reward_col, args.objective, args.k, args.estimator, fmt
    )
    out = io.StringIO(newline="")
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=[*header, args.weight_col], lineterminator="\n")
        writer.writeheader()
        writer.writerows(row | {args.weight_col: repr(w)} for row, w in zip(rows, weights, strict=True))
    else:
        out.writelines(json.dumps(row | {args.weight_col: w}) + "\n" for row, w in zip(rows, weights, strict=True))
    if args.output in (None, "-"):
        sys.stdout.write(out.getvalue())
    else:
        try:
            Path(args.output).write_text(out.getvalue(), encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError(f"cannot write {args.output!r} (-o/--output): {exc.strerror or exc}") from None
    return 0


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from rspo_kernels.demo import run as demo

    base = demo.QUICK if args.quick else demo.DemoConfig()
    overrides: dict[str, Any] = {}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seed, args.seed + args.seeds))
    elif args.seed:
        overrides["seeds"] = tuple(s + args.seed for s in base.seeds)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.task_seed is not None:
        overrides["task_seed"] = args.task_seed
    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    try:
        config = dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    progress = not args.no_progress and sys.stderr.isatty()
    result = demo.run_demo(config, progress=progress, threads=args.threads)

    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "results.json"
        json_path.write_text(json.dumps(demo.json_record(result), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write to {str(out_dir)!r} (--out): {exc.strerror or exc}") from None
    print(demo.format_report(result))
    print(f"\nwrote {json_path}")
    from rspo_kernels.demo.plot import plot_demo

    try:
        print(f"wrote {plot_demo(result, out_dir / 'results.png')}")
    except ImportError:  # pragma: no cover - matplotlib is an optional dependency
        print("matplotlib is not installed, so no figure: pip install 'rspo_kernels[plot]'")
    return 0


# --------------------------------------------------------------------------- bench
def _make_source_checkout_importable() -> None:
    """Put the repository root on ``sys.path`` when this package sits in a source checkout.

    ``python -m`` already has the working directory there; the console script does not.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def _bench(argv: list[str]) -> int:
    _make_source_checkout_importable()
    try:
        from benchmarks.runner import main as bench_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.runner"):
            raise  # the suite exists but one of its own imports is missing: show that
        print(
            f"{_PROG} bench: the benchmark suite (benchmarks/runner.py) is part of the source "
            "checkout, not of the installed package. Clone the repository and run "
            "`python -m benchmarks` (or `rspo-kernels bench`) from its root.",
            file=sys.stderr,
        )
        return 2
    try:
        return int(bench_main(argv) or 0)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2


# --------------------------------------------------------------------------- parser
_ASCII_INT = re.compile(r"[+-]?[0-9]+")


def _integer(text: str) -> int:
    """An integer flag in ASCII digits: ``int`` alone would read ``'١'`` as 1 and ``'1_0'`` as 10."""
    if not _ASCII_INT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (write it with the digits 0-9)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    # Nothing here imports torch (neither does ``import rspo_kernels``): --help and usage errors
    # answer at once. The estimator names are checked when the weights are computed.
    parser = argparse.ArgumentParser(prog=_PROG, description="Risk-seeking (Pass@k / Max@k) policy-gradient weights.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,weights,bench}")

    demo = sub.add_parser(
        "demo",
        help="train small policies: PG vs hitchhiking vs RSPO (10-15 s on 2 idle CPU cores)",
        description="Train small softmax policies with policy gradient, the hitchhiking baseline and RSPO "
        "(k = 2, 4, 8) on Pass@k and Max@k, and check the paper's claims. About 10-15 s on 2 idle CPU "
        "cores. torch runs on --threads threads (default 1): the policies are tiny, and extra threads "
        "only wait on each other, which on a busy machine made the demo 2-4x slower.",
    )
    demo.add_argument("--quick", action="store_true", help="a small run (seconds), for tests and smoke checks")
    demo.add_argument(
        "--out", default="rspo_demo_output", metavar="DIR", help="output directory (default: %(default)s)"
    )
    demo.add_argument(
        "--seeds", type=_integer, metavar="N", help="number of training seeds (default: 5, or 3 with --quick)"
    )
    demo.add_argument("--seed", type=_integer, default=0, help="first training seed (default: %(default)s)")
    demo.add_argument("--task-seed", type=_integer, help="task instance (default: 0)")
    demo.add_argument("--steps", type=_integer, help="training steps per policy (default: 1000, or 60 with --quick)")
    demo.add_argument(
        "--threads",
        type=_integer,
        default=1,
        metavar="N",
        help="torch intra-op threads while training (default: %(default)s; more only add overhead here)",
    )
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bar (also off when stderr is not a terminal)"
    )
    demo.set_defaults(func=_demo)

    weights = sub.add_parser("weights", help="per-row Pass@k / Max@k weights for rewards in a CSV or JSONL file")
    weights.add_argument(
        "input",
        nargs="?",
        default="-",
        help="CSV (header row required) or JSONL file; '-' for stdin (default)",
    )
    weights.add_argument(
        "-k", type=_integer, required=True, help="the k of Pass@k / Max@k (every group needs >= k rows)"
    )
    weights.add_argument(
        "--objective",
        choices=("pass@k", "max@k"),
        default="pass@k",
        help="default: %(default)s (binary rewards)",
    )
    weights.add_argument(
        "--estimator",
        default="rspo",
        metavar="NAME",
        help="a name in rspo_kernels.ESTIMATORS, such as plugin, hitchhiking or pkpo_loo (default: %(default)s)",
    )
    weights.add_argument(
        "--format", choices=("csv", "jsonl"), help="input and output format (default: from the extension)"
    )
    weights.add_argument(
        "--group-col",
        default="group",
        help="column / field with the group (prompt) id (default: %(default)s)",
    )
    weights.add_argument("--reward-col", default="reward", help="column / field with the reward (default: %(default)s)")
    weights.add_argument(
        "--weight-col", default="weight", help="name of the added column / field (default: %(default)s)"
    )
    weights.add_argument("-o", "--output", help="output file (default: stdout)")
    weights.set_defaults(func=_weights)

    # Parsed by hand in main() so that every argument, --help included, reaches the runner.
    sub.add_parser("bench", help="run the benchmark suite of a source checkout; arguments go to it", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        Exit status: 0 on success, 2 for a usage or input error (message on stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{_PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
