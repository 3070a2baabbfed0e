"""Smoke test of ``benchmarks/linear_memory.py``: it runs end to end and compares like with like."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import linear_memory  # noqa: E402


def test_linear_memory_smoke_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "cpu-linear.json"
    assert linear_memory.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == set(linear_memory.VARIANTS)
    for name in ("rspo_linear", "unfused"):
        r = rows[name]
        assert r["extra_mib"] >= r["gradients_mib"] > 0 and r["median_s"] > 0, r
    # Every variant computes the same loss on the same inputs: the comparison is fair.
    assert rows["rspo_linear"]["loss"] == pytest.approx(rows["unfused"]["loss"], rel=1e-5, abs=1e-6)
    if "error" not in rows["liger"]:
        assert rows["liger"]["loss"] == pytest.approx(rows["unfused"]["loss"], rel=1e-5, abs=1e-6)
    assert rows["rspo_two_pass"]["loss"] == pytest.approx(rows["unfused"]["loss"], rel=1e-5, abs=1e-6)
    assert set(linear_memory.TARGETS) <= set(report["ratios"])
    assert report["loss"]["pad"] == "half-response"  # the padding mask is on by default
    assert (tmp_path / "cpu-linear.md").read_text().startswith("Fused-linear RSPO loss")
    assert "| rspo_linear |" in capsys.readouterr().out


def test_padding_masks_and_the_long_preset():
    m = linear_memory.padding_mask(8, 512, "half-response")
    assert int((~m).sum()) == 256 and bool(m[1:].all()) and not bool(m[0, 256:].any())
    f = linear_memory.padding_mask(4, 16384, "fifth")
    assert abs(float((~f).float().mean()) - 0.2) < 1e-3
    assert bool(linear_memory.padding_mask(2, 3, "none").all())
    args = linear_memory._resolve(linear_memory._parser().parse_args(["--preset", "long"]))
    assert (args.n, args.h, args.v, args.pad, args.entropy_coeff) == (65536, 256, 8192, "fifth", 0.01)


def test_frontier_smoke_measures_each_block_size_against_the_same_peers(tmp_path, capsys):
    out = tmp_path / "frontier.json"
    assert linear_memory.main(["--smoke", "--frontier", "8,32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert {"rspo_linear@8", "rspo_linear@32", "unfused"} <= set(rows)
    points = {p["chunk_rows"]: p for p in report["frontier"]}
    assert sorted(points) == [8, 32]
    for k, p in points.items():
        mine = rows[f"rspo_linear@{k}"]
        # The same loss at every block size, and each ratio is this row over the peer's row.
        assert mine["loss"] == pytest.approx(rows["unfused"]["loss"], rel=1e-5, abs=1e-6)
        assert p["memory_vs_unfused"] == pytest.approx(mine["extra_mib"] / rows["unfused"]["extra_mib"])
        assert p["time_vs_unfused"] == pytest.approx(mine["median_s"] / rows["unfused"]["median_s"])
        assert p["all_met"] == all(p["met"].values())
    table = (tmp_path / "frontier.md").read_text()
    assert table.startswith("Block-size frontier") and "| 8 |" in table and "| 32 |" in table
    assert "chunk_rows" in capsys.readouterr().out
    # The figure is redrawn from results files, one line per run.
    pytest.importorskip("matplotlib")
    png = tmp_path / "again.png"
    if all(p["memory_vs_liger"] is None for p in points.values()):  # no liger-kernel here: nothing to draw
        with pytest.raises(SystemExit, match="no frontier point has both"):
            linear_memory.main(["--replot", str(out), "--out", str(png)])
    else:
        assert linear_memory.main(["--replot", str(out), str(out), "--out", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # argparse: --replot needs an --out figure
        linear_memory.main(["--replot", str(out)])
    with pytest.raises(SystemExit, match="no 'frontier'"):
        plain = tmp_path / "plain.json"
        plain.write_text(json.dumps({"results": []}))
        linear_memory.main(["--replot", str(plain), "--out", str(png)])


def test_frontier_refuses_a_non_positive_block():
    with pytest.raises(SystemExit, match="positive chunk_rows"):
        linear_memory.main(["--smoke", "--frontier", "0"])


def test_cpu_gemm_blocks_times_the_same_products_in_every_schedule(tmp_path):
    from benchmarks import cpu_gemm_blocks

    whole = cpu_gemm_blocks.schedules(40, 8, 50, 0, 16)["whole"]
    dh, dw = (t.clone() for t in whole())
    for rows in (7, 16, 40):  # a ragged last block, several head tiles (16 of 50 rows)
        for name, step in cpu_gemm_blocks.schedules(40, 8, 50, rows, 16).items():
            got_h, got_w = step()
            torch.testing.assert_close(got_h, dh, rtol=1e-5, atol=1e-6, msg=f"{name} {rows}")
            torch.testing.assert_close(got_w, dw, rtol=1e-5, atol=1e-6, msg=f"{name} {rows}")
    out = tmp_path / "gemm.json"
    assert cpu_gemm_blocks.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    got = {(r["schedule"], r["rows"]) for r in report["results"]}
    assert got == {("whole", 96), ("blocks", 16), ("tiles", 16), ("blocks", 32), ("tiles", 32)}
    s = report["shape"]
    for r in report["results"]:
        assert r["gflops"] == pytest.approx(6 * s["tokens"] * s["hidden"] * s["vocab"] / r["median_s"] / 1e9)
    assert (tmp_path / "gemm.md").read_text().startswith("The fused-linear loss's three matmuls")
