"""Start-up at full scale (issue 18), first part: what decoding costs per source file at the real datasets' sizes,
and what the disk cache (data_cleaning.DiskCache, prepare_cached) makes of it.

For each kind of source it writes full-size synthetic stand-ins into a scratch folder (a 1024x1024 JPEG DICOM as
RSNA's, a 580x420 TIFF as the nerve frames, a 4020x4892 16-bit PNG as the Montgomery films, a 512x512xN CT NIfTI as
COVID-19-20's), then measures three ways, each in a fresh process so that no page cache of decoded arrays and no
warm import is shared:

- today: one process decodes and resizes every file, as the scripts do now;
- cold: prepare_cached with an empty cache, on every core (forked workers), writing the entries;
- warm: prepare_cached again: every entry read back memory-mapped, nothing decoded.

It also times the RSNA label CSV (30,000 rows) read by data_cleaning.read_table and grouped per patient as
pneumonia_detection.read_patients does. It extrapolates each per-file time to the full dataset's count and writes
JSON and a Markdown table (stdout). The scripts adopt the cache pipeline by pipeline (issue 18); until then this is
the cache's measured effect on real-sized files, not the scripts' time to their first training step.

    python benchmarks/startup_bench.py                  # about 2 minutes on 2 cores
    python benchmarks/startup_bench.py --json out.json --counts 40
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL_COUNTS = {"rsna_dicom": 26_684, "nerve_tiff": 5_635, "montgomery_png": 138, "covid_nifti": 199}
FULL_SIZE = {"rsna_dicom": "1024x1024 JPEG DICOM", "nerve_tiff": "580x420 TIFF",
             "montgomery_png": "4020x4892 16-bit PNG", "covid_nifti": "512x512x120 CT NIfTI"}  # fmt: skip
SIZE = {"rsna_dicom": 512, "nerve_tiff": (96, 128), "montgomery_png": 512, "covid_nifti": 4.0}  # what each prepares


def write_sources(kind: str, folder: Path, count: int) -> list[Path]:
    """`count` full-size stand-ins of one kind (smooth noise: compresses like an image, not like a constant)."""
    import nibabel as nib
    from PIL import Image

    import sample_data

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        if kind == "rsna_dicom":
            pixels = (sample_data._smooth_noise(rng, (1024, 1024), (16, 16)) * 200 + 20).astype(np.uint8)
            uid = sample_data._dicom_uid
            tags = {"SOPInstanceUID": uid(4, i, 1), "StudyInstanceUID": uid(2, i, 1), "SeriesInstanceUID": uid(3, i, 1),
                    "PatientID": f"p{i}", "PatientName": f"p{i}", "PatientSex": "M", "PatientAge": "51",
                    "ViewPosition": "PA"}  # fmt: skip
            paths.append(folder / f"p{i}.dcm")
            sample_data._write_jpeg_dicom(paths[-1], pixels, tags)
        elif kind == "nerve_tiff":
            pixels = (sample_data._smooth_noise(rng, (420, 580), (12, 12)) * 255).astype(np.uint8)
            paths.append(folder / f"1_{i}.tif")
            sample_data._save_tiff(paths[-1], pixels)
        elif kind == "montgomery_png":
            pixels = (sample_data._smooth_noise(rng, (4892, 4020), (20, 20)) * 4000).astype(np.uint16)
            paths.append(folder / f"MCUCXR_{i:04d}_0.png")
            Image.fromarray(pixels).save(paths[-1])
        else:  # covid_nifti: int16 HU, 0.7 x 0.7 x 2.5 mm
            hu = (sample_data._smooth_noise(rng, (512, 512), (16, 16)) * 1500 - 1000).astype(np.int16)
            volume = np.repeat(hu[:, :, None], 120, axis=2)
            paths.append(folder / f"volume-covid19-A-{i:04d}_ct.nii.gz")
            nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 2.5, 1.0])), paths[-1])
    return paths


def prepare(kind: str):
    """The deterministic preparation of one source of `kind`, as the scripts do it (decode, then resize or
    resample), as a module-level function prepare_cached can hand to its forked workers."""
    return {"rsna_dicom": prepare_rsna, "nerve_tiff": prepare_nerve, "montgomery_png": prepare_montgomery,
            "covid_nifti": prepare_covid}[kind]  # fmt: skip


def _resize(pixels: np.ndarray, size) -> np.ndarray:
    from PIL import Image

    low, high = float(pixels.min()), float(pixels.max())
    unit = ((pixels - low) / max(high - low, 1e-6)).astype(np.float32)
    shape = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(unit, mode="F").resize(shape[::-1], Image.Resampling.BILINEAR)) * 255


def prepare_rsna(path: Path) -> dict:
    from data_cleaning import read_radiograph

    pixels, _ = read_radiograph(path)
    return {"image": _resize(pixels, SIZE["rsna_dicom"]).round().astype(np.uint8)}


def prepare_nerve(path: Path) -> dict:
    from data_cleaning import read_gray

    return {"image": _resize(read_gray(path), SIZE["nerve_tiff"]).round().astype(np.uint8)}


def prepare_montgomery(path: Path) -> dict:
    from data_cleaning import read_gray

    return {"image": _resize(read_gray(path), SIZE["montgomery_png"]).round().astype(np.uint8)}


def prepare_covid(path: Path) -> dict:
    import nibabel as nib
    from scipy import ndimage

    image = nib.load(path)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    zoom = [s / SIZE["covid_nifti"] for s in image.header.get_zooms()[:2]] + [1.0]  # 4 mm in-plane, as QUICK
    small = ndimage.zoom(volume, zoom, order=1)
    return {"image": np.clip((small + 1000) / 1500, 0, 1).astype(np.float16)}


def measure(kind: str, mode: str, sources: list[Path], cache_dir: Path) -> dict:
    """One way of preparing every source, in this (fresh) process: seconds and peak RSS."""
    from data_cleaning import DiskCache, Skipped, prepare_cached

    start = time.perf_counter()
    if mode == "today":
        for source in sources:
            prepare(kind)(source)
        built = read = 0
    else:
        cache = DiskCache(cache_dir / kind, {"kind": kind, "size": SIZE[kind], "version": 1}, ("image",))
        prepare_cached(sources, lambda s: [s], prepare(kind), cache, Skipped("file"), desc=kind)
        built, read = cache.built, cache.read
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "per_file_s": seconds / len(sources), "built": built, "read": read,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_worker_mib": children}  # fmt: skip


def read_labels(folder: Path, rows: int = 30_000) -> dict:
    """The RSNA label CSV at the real size: read and checked (read_table), grouped per patient."""
    import pandas as pd

    from data_cleaning import read_table

    rng = np.random.default_rng(0)
    patients = rng.integers(0, 26_684, rows)
    target = rng.random(rows) < 0.3
    table = pd.DataFrame({"patientId": [f"{p:08x}-0000" for p in patients],
                          "x": np.where(target, rng.uniform(0, 700, rows).round(), np.nan),
                          "y": np.where(target, rng.uniform(0, 700, rows).round(), np.nan),
                          "width": np.where(target, 200.0, np.nan), "height": np.where(target, 300.0, np.nan),
                          "Target": target.astype(int)})  # fmt: skip
    path = folder / "stage_2_train_labels.csv"
    table.to_csv(path, index=False)
    start = time.perf_counter()
    labels = read_table(path, {"patientId": "str", "x": "number", "y": "number", "width": "number",
                               "height": "number", "Target": "int"})  # fmt: skip
    boxes = {pid: rows[["x", "y", "width", "height"]].to_numpy() for pid, rows in labels.groupby("patientId")}
    return {"rows": rows, "patients": len(boxes), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, default=24, help="files per kind (COVID: a quarter of them)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--kinds", nargs="*", default=list(FULL_COUNTS))
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: kind, mode, scratch folder
    args = parser.parse_args()
    if args.one:  # a child process: one measurement, printed as JSON
        kind, mode, scratch = args.one
        sources = sorted((Path(scratch) / kind).glob("*.*"))
        print(json.dumps(measure(kind, mode, sources, Path(scratch) / "cache")))
        return
    report = {"counts": {}, "results": {}}
    with tempfile.TemporaryDirectory(prefix="startup_bench_") as scratch:
        for kind in args.kinds:
            count = max(2, args.counts // 4) if kind == "covid_nifti" else args.counts
            write_sources(kind, Path(scratch) / kind, count)
            report["counts"][kind] = count
            report["results"][kind] = {}
            for mode in ("today", "cold", "warm"):
                run = subprocess.run([sys.executable, __file__, "--one", kind, mode, scratch], capture_output=True,
                                     text=True, check=True)  # fmt: skip
                report["results"][kind][mode] = json.loads(run.stdout.strip().splitlines()[-1])
        report["labels"] = read_labels(Path(scratch))
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def table(report: dict) -> str:
    lines = ["| source (full size) | files | today, per file | cold, per file (all cores) | warm, per file | "
             "warm / cold | cold speed-up | full dataset: today / cold / warm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for kind, result in report["results"].items():
        today, cold, warm = (result[mode]["per_file_s"] for mode in ("today", "cold", "warm"))
        full = FULL_COUNTS[kind]
        minutes = " / ".join(f"{seconds * full / 60:.1f}" for seconds in (today, cold, warm))
        per_file = f"{today * 1e3:.1f} ms | {cold * 1e3:.1f} ms | {warm * 1e3:.2f} ms"
        lines.append(f"| {FULL_SIZE[kind]} | {report['counts'][kind]} | {per_file} | {warm / cold:.1%} | "
                     f"{today / cold:.2f}x | {full:,}: {minutes} min |")  # fmt: skip
    labels = report["labels"]
    lines.append(f"\nRSNA labels: {labels['rows']:,} rows, {labels['patients']:,} patients read, checked and grouped "
                 f"in {labels['seconds']:.2f} s")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
