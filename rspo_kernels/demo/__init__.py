"""The ``rspo-kernels demo``: RSPO against the baselines on a synthetic Pass@k / Max@k task.

- :mod:`~rspo_kernels.demo.config`: the task, the methods and the run's settings;
- :mod:`~rspo_kernels.demo.run`: the training and the evaluation;
- :mod:`~rspo_kernels.demo.report`: the verdicts and the printed report;
- :mod:`~rspo_kernels.demo.plot`: the figure (matplotlib is optional).
"""

from rspo_kernels.demo.config import QUICK, DemoConfig
from rspo_kernels.demo.run import run_demo

__all__ = ["QUICK", "DemoConfig", "run_demo"]
