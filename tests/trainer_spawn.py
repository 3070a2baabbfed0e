"""Run a function on several gloo processes from a test, with a deadline (used by tests/test_fused_*.py).

Each child joins a fresh process group on a free port, runs with one thread (the CI machine has 2
cores for everything) and raises on failure; the parent re-raises the first child's error, or fails
when the deadline passes, so that a hung collective never hangs the suite.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run(fn: Callable[..., None], world: int = 2, *args: Any, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo processes; raise on error or timeout.

    ``fn`` must be importable by the children (a module-level function of a test module).
    """
    context = mp.start_processes(
        _entry, args=(world, free_port(), fn, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{fn.__name__} on {world} processes did not finish within {timeout:.0f} s")
