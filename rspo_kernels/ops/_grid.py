"""Launch grids of the Triton kernels, within CUDA's grid limits (pure Python: testable without a GPU).

CUDA caps a grid at ``2**31 - 1`` blocks in x and 65,535 in y and z. A kernel with one program per
token row that put rows on y or z (or a 2-D ``(B, T)`` grid) would fail at 65,536 rows, as Liger's
Triton GRPO loss does; ours put rows on x only and index them as int64
(``tl.program_id(0).to(tl.int64)``), so any call the memory allows (2**20 tokens and far beyond)
launches. :func:`row_grid` is the one place that computes such a grid.
"""

from __future__ import annotations

__all__ = ["MAX_GRID_X", "MAX_GRID_YZ", "row_grid"]

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 2**16 - 1


def row_grid(n_rows: int, what: str = "token rows") -> tuple[int]:
    """The 1-D grid ``(n_rows,)`` of a kernel launching one program per row.

    Parameters
    ----------
    n_rows : int
        Number of programs (token rows, chunks), ``>= 1``.
    what : str
        What the rows are, for the error message.

    Returns
    -------
    tuple of int
        ``(n_rows,)``: rows on the grid's x dimension, whose limit is ``2**31 - 1``.

    Raises
    ------
    ValueError
        ``n_rows < 1`` (launch nothing instead), or ``n_rows > 2**31 - 1`` (split the call).
    """
    n = int(n_rows)
    if n < 1:
        raise ValueError(f"row_grid needs at least one {what}, got {n}: skip the launch instead")
    if n > MAX_GRID_X:
        raise ValueError(
            f"{n} {what} exceed CUDA's grid limit of {MAX_GRID_X} programs in x: split the call into pieces of "
            f"at most {MAX_GRID_X} {what}"
        )
    return (n,)
