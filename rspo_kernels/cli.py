"""The ``rspo-kernels`` command."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import rspo_kernels as rk

    groups = {
        "binary, 2 of 8 correct": np.array([[1, 0, 0, 1, 0, 0, 0, 0]], dtype=np.float64),
        "graded with a tie": np.array([[0.1, 0.5, 0.5, 0.9]]),
        "k = n": np.array([[3.0, 1.0, 2.0, 5.0]]),
    }
    for name, r in groups.items():
        k = 4 if r.shape[1] != 4 or name == "k = n" else 2
        fn = rk.pass_at_k_weights if name.startswith("binary") else rk.max_at_k_weights
        print(f"{name}: rewards {r[0].tolist()}, k={k}")
        for est in rk.ESTIMATORS:
            if est == "pkpo_loo" and k >= r.shape[1]:
                continue
            print(f"  {est:<12} {np.round(fn(r, k, estimator=est)[0], 4).tolist()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rspo-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="print RSPO weights for a few worked groups").set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
