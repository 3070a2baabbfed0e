import sys

from rspo_kernels.cli import main

sys.exit(main())
