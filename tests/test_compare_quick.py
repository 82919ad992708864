"""Smoke test of benchmarks/compare.py: the --quick run on both shipped models writes its tables and plots."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def table_rows(report: str, first_cell: str) -> list[list[str]]:
    """Return the cells of the markdown table rows of `report` whose first cell is `first_cell`."""
    rows = []
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.mark.slow
def test_compare_quick_run(tmp_path):
    report_path = tmp_path / "report.md"
    plots = tmp_path / "plots"
    # The plots need the `bench` extra (matplotlib). Without it the tables are still checked.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    command = [sys.executable, "benchmarks/compare.py", "--quick", "--report", str(report_path)]
    if has_matplotlib:
        command += ["--plots-dir", str(plots)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        command,
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = report_path.read_text()

    assert "### V-MoE on MNIST" in report
    assert "### pydoc MoE LM" in report
    methods_at_75 = [row[1] for row in table_rows(report, "75 %")]
    for method in ("LExI-DP", "LExI-DP (norm-scaled inputs)", "LExI evolutionary", "LExI-DP (renormalize)"):
        assert methods_at_75.count(method) == 2, (method, methods_at_75)
    # Uniform k = 3 fits 75 % of the LM's 6 x 4 experts, but V-MoE's 6 of 8 has no uniform k.
    assert methods_at_75.count("uniform k") == 1
    assert methods_at_75.count("random k (mean ± sd of 2 seeds)") == 2
    assert "uniform k at 75 %: method 'uniform' needs" in report

    native_rows = table_rows(report, "100 %")
    assert [row[2] for row in native_rows if row[1] == "native k"] == ["2 2 2 2", "4 4 4 4 4 4"]
    pruning_rows = table_rows(report, "25 %")
    assert [row[1] for row in pruning_rows] == ["router norm", "frequency (uses data)"] * 2
    assert [row[2] for row in pruning_rows] == ["6 6 6 6"] * 2 + ["12 12 12 12 12 12"] * 2

    # The bare loop and the toolkit score the same batches, so their quality agrees.
    bare_rows = table_rows(report, "bare torch loop")
    toolkit_rows = table_rows(report, "toolkit (`Trainer.validate` + `MoEThroughput`)")
    assert len(bare_rows) == len(toolkit_rows) == 2
    for bare, toolkit in zip(bare_rows, toolkit_rows):
        assert bare[3] == toolkit[3]
    assert len(re.findall(r"Evolutionary search within 1 % of the DP objective", report)) == 2
    # LExI-DP and its evolutionary variant choose the same k at 75 %, so the run reports its timing noise.
    assert len(re.findall(r"Rows with the same per-layer k and routing weights differ by up to \d+ %", report)) == 2
    assert "Measured speed-up at least 0.9x the expert-FLOP prediction at 75 %" in report

    if not has_matplotlib:
        pytest.skip("matplotlib is not installed (pip install -e .[bench]), so the plots were not checked")
    for model in ("vision", "language"):
        for kind in ("quality_speed", "top_k", "sensitivity"):
            image = plots / f"compare_{model}_{kind}.png"
            assert image.is_file()
            assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
