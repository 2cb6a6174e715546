"""benchmarks/startup_bench.py runs the scripts' own data paths, and what it reports holds together (a benchmark,
not a timed test: no speed is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_startup_benchmark_decodes_once_then_reads_the_cache_and_measures_torchrun(tmp_path):
    """today builds no entry, cold builds one per case, warm reads them all and builds none, for nerve and pneumonia;
    pneumonia under torchrun reports both processes, today, cold and warm, on its own count (copies added)."""
    command = [sys.executable, str(REPO / "benchmarks" / "startup_bench.py"), "--counts", "3", "--kinds", "nerve",
               "pneumonia", "--torchrun-count", "5", "--json", str(tmp_path / "bench.json")]  # fmt: skip
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
    assert list(report["torchrun"]) == ["today", "cold", "warm"]
    for ranks in report["torchrun"].values():
        assert [rank["radiographs"] for rank in ranks] == [5, 5]  # the 3 stand-ins and 2 copies, in each process
        assert all(0 < rank["private_mib"] <= rank["pss_mib"] <= rank["peak_rss_mib"] for rank in ranks)
        assert all(0 < rank["libraries_peak_rss_mib"] <= rank["peak_rss_mib"] for rank in ranks)
        assert all(rank["peak_rss_mib"] <= rank["epoch2_peak_rss_mib"] for rank in ranks)  # a peak only grows
    assert report["labels"]["rows"] == 30_000 and 0 < report["labels"]["patients"] <= 26_684
    assert (
        "| nerve (580x420 TIFF + mask) | 3 |" in run.stdout and "| pneumonia (1024x1024 JPEG DICOM) | 3 |" in run.stdout
    )
    assert "Pneumonia under torchrun, 2 processes, 5 radiographs" in run.stdout and "\n| warm | " in run.stdout
    assert "RSNA labels (read_patients): 30,000 rows" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # its scratch folder is gone
