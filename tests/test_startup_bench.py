"""benchmarks/startup_bench.py runs, and what it reports holds together (a benchmark, not a timed test: no speed is
asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_startup_benchmark_decodes_once_then_reads_the_cache(tmp_path):
    """today prepares every file, cold builds one entry per file, warm reads them all and builds none."""
    command = [sys.executable, str(REPO / "benchmarks" / "startup_bench.py"), "--counts", "3", "--kinds",
               "nerve_tiff", "--json", str(tmp_path / "bench.json")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    result = report["results"]["nerve_tiff"]
    assert report["counts"]["nerve_tiff"] == 3
    assert (result["cold"]["built"], result["cold"]["read"]) == (3, 0)
    assert (result["warm"]["built"], result["warm"]["read"]) == (0, 3)
    assert all(result[mode]["seconds"] > 0 and result[mode]["peak_rss_mib"] > 0 for mode in result)
    assert report["labels"]["rows"] == 30_000 and 0 < report["labels"]["patients"] <= 26_684
    assert "| 580x420 TIFF | 3 |" in run.stdout and "RSNA labels: 30,000 rows" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # its scratch folder is gone
