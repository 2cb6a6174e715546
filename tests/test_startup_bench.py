"""benchmarks/startup_bench.py runs the scripts' own data paths, and what it reports holds together (a benchmark,
not a timed test: no speed is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_startup_benchmark_decodes_once_then_reads_the_cache_and_measures_torchrun(tmp_path):
    """today builds no entry, cold builds one per case, warm reads them all and builds none, for nerve and pneumonia;
    pneumonia under torchrun reports both processes, today and warm."""
    command = [sys.executable, str(REPO / "benchmarks" / "startup_bench.py"), "--counts", "3", "--kinds", "nerve",
               "pneumonia", "--json", str(tmp_path / "bench.json")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    for kind in ("nerve", "pneumonia"):
        result = report["results"][kind]
        assert report["counts"][kind] == 3
        assert (result["today"]["built"], result["today"]["read"]) == (0, 0)  # cache=False: the cache is not used
        assert (result["cold"]["built"], result["cold"]["read"]) == (3, 0)
        assert (result["warm"]["built"], result["warm"]["read"]) == (0, 3)
        assert all(result[mode]["seconds"] > 0 and result[mode]["peak_rss_mib"] > 0 for mode in result)
    for mode in ("today", "warm"):
        ranks = report["torchrun"][mode]
        assert len(ranks) == 2 and all(0 < rank["pss_mib"] <= rank["peak_rss_mib"] for rank in ranks)
        assert all(0 < rank["libraries_rss_mib"] <= rank["peak_rss_mib"] for rank in ranks)
    assert report["labels"]["rows"] == 30_000 and 0 < report["labels"]["patients"] <= 26_684
    assert (
        "| nerve (580x420 TIFF + mask) | 3 |" in run.stdout and "| pneumonia (1024x1024 JPEG DICOM) | 3 |" in run.stdout
    )
    assert "Pneumonia under torchrun, 2 processes, warm" in run.stdout
    assert "RSNA labels (read_patients): 30,000 rows" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # its scratch folder is gone
