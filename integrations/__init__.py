"""Framework adapters (verl, TRL, OpenRLHF), installed as ``rspo_kernels.integrations``.

Each adapter imports its framework lazily, so ``import rspo_kernels`` never imports one.
"""
