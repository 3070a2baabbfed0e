"""Issue 14 §3.3: a forked child may call the C++ kernels after its parent used their OpenMP path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import numpy as np
    import rspo_kernels as rk
    from rspo_kernels import _cpu

    rng = np.random.default_rng(0)
    graded = rng.random((4096, 64)).astype(np.float32)   # 262144 samples: the parallel paths
    binary = (graded < 0.3).astype(np.float32)

    def work(_):
        return (_cpu.max_threads(), float(rk.max_at_k_weights(graded, 4).sum()),
                float(rk.pass_at_k_weights(binary, 4).sum()))

    if __name__ == "__main__":
        assert _cpu.max_threads() == 2, _cpu.max_threads()
        parent = work(0)
        with mp.get_context("fork").Pool(2) as pool:
            children = pool.map_async(work, range(2)).get(timeout=60)  # a hang fails here, not in CI
        assert all(c[1:] == parent[1:] for c in children), (parent, children)
        print("child threads", sorted({c[0] for c in children}))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_forked_pool_runs_the_parallel_kernels(tmp_path):
    pytest.importorskip("rspo_kernels._cpu")
    from rspo_kernels import _cpu

    if not _cpu.openmp:
        pytest.skip("the extension was built without OpenMP")
    script = tmp_path / "fork_pool.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="2")  # the parent must take the multi-threaded path
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child threads [1]" in proc.stdout  # the at-fork handler made each child single-threaded
