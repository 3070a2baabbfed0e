"""Smoke test of benchmarks/fused_trainers.py: every variant computes the same loss, and a report is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import fused_trainers  # noqa: E402


def test_smoke_variants_agree_and_write_a_report(tmp_path, capsys):
    pytest.importorskip("trl")
    # verl's torch backend is checked against this library in tests/test_fused_verl.py; its import is slow.
    variants = ["logits", "trl_chunked", "rspo"]
    out = tmp_path / "report.json"
    argv = ["--smoke", "--repeats", "0", "--variants", ",".join(variants), "--out", str(out)]
    assert fused_trainers.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == variants
    assert all("error" not in r for r in rows.values()), rows
    # The same loss from the full logits, TRL's fused head and rspo_kernels' (float32).
    ref = rows["logits"]["loss"]
    for name, r in rows.items():
        assert r["loss"] == pytest.approx(ref, rel=1e-4), name
    assert (tmp_path / "report.md").exists()
    assert "| rspo |" in capsys.readouterr().out
