"""``python -m rspo_kernels``: the same command line as ``rspo-kernels``."""

import sys

from rspo_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
